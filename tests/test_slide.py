"""Readers, resolution and level choice, on both backends, with generated and real slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import Fixture, shared
from wsi_pipeline.errors import ResolutionError, SlideError
from wsi_pipeline.io.slide import (
    ArraySlide,
    SlideReader,
    choose_level,
    open_slide,
    read_thumbnail,
    read_thumbnails,
    resolve_mpp,
    slide_fingerprint,
)


def test_aperio_fixture_is_detected_as_aperio(aperio_slide: Fixture, backend: str) -> None:
    r = open_slide(aperio_slide.path, backend)
    assert isinstance(r, SlideReader)
    assert r.backend == backend
    assert r.vendor == "aperio"
    assert r.level_dimensions == ((3072, 2048), (768, 512), (192, 128))
    assert r.level_downsamples == (1.0, 4.0, 16.0)
    assert r.metadata_mpp() == (0.25, 0.25)


def test_generic_tiff_reads_resolution_tags(generic_slide: Fixture, backend: str) -> None:
    r = open_slide(generic_slide.path, backend)
    assert r.vendor == "generic-tiff"
    # Level counts may differ between backends (tiffslide skips a level smaller than one tile
    # here); the levels both report agree.
    assert r.level_downsamples[:2] == (1.0, 2.0)
    assert r.level_downsamples == ((1.0, 2.0, 8.0) if backend == "openslide" else (1.0, 2.0))
    mx, my = r.metadata_mpp()
    assert mx == pytest.approx(0.5) and my == pytest.approx(0.5)
    res = resolve_mpp(r)
    assert (res.mpp, res.source) == (pytest.approx(0.5), "metadata")


def test_auto_reads_large_svs_slides_with_tiffslide_and_the_same_pixels(
    generic_slide: Fixture, aperio_slide: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` opens large Aperio .svs with tiffslide (it decodes about twice as fast on one thread),
    small ones and other formats with OpenSlide: the tiles must be the very pixels OpenSlide gives."""
    import wsi_pipeline.io.slide as slide_module
    from wsi_pipeline.tiling.plan import TileOptions, plan_slide
    from wsi_pipeline.tiling.read import iter_tiles

    assert open_slide(aperio_slide.path).backend == "openslide"  # a few MB: below the size
    monkeypatch.setattr(slide_module, "TIFFSLIDE_MIN_BYTES", 0)
    assert open_slide(generic_slide.path).backend == "openslide"  # not Aperio: OpenSlide's metadata
    for fixture in (aperio_slide,):
        auto = open_slide(fixture.path)
        assert auto.backend == "tiffslide"
        tiles = {}
        for r in (auto, open_slide(fixture.path, "openslide")):
            plan = plan_slide(r, TileOptions())
            tiles[r.backend] = (
                plan.coords_l0,
                np.concatenate([t for _, t in iter_tiles(r, plan, workers=1)]),
            )
            r.close()
        np.testing.assert_array_equal(tiles["tiffslide"][0], tiles["openslide"][0])
        np.testing.assert_array_equal(tiles["tiffslide"][1], tiles["openslide"][1])


def test_read_region_is_rgb_and_matches_known_content(any_slide: Fixture, backend: str) -> None:
    r = open_slide(any_slide.path, backend)
    spec = any_slide.spec
    e = spec.tissue[0]
    centre = r.read_region((int(e.cx) - 32, int(e.cy) - 32), 0, (64, 64))
    corner = r.read_region((r.dimensions[0] - 64, 0), 0, (64, 64))
    assert centre.shape == (64, 64, 3) and centre.dtype == np.uint8
    # Tissue is pink/purple (saturated), the corner is near-white glass.
    assert (centre.max(-1).astype(int) - centre.min(-1)).mean() > 40
    assert corner.min() > 220


def test_backends_agree_on_pixels(generic_slide: Fixture) -> None:
    a = open_slide(generic_slide.path, "openslide").read_region((256, 300), 1, (200, 150))
    b = open_slide(generic_slide.path, "tiffslide").read_region((256, 300), 1, (200, 150))
    np.testing.assert_array_equal(a, b)


def test_missing_mpp_is_a_clear_error_and_override_fixes_it(nompp_slide: Fixture, backend: str) -> None:
    r = open_slide(nompp_slide.path, backend)
    with pytest.raises(ResolutionError, match=r"nompp\.tif.*--mpp"):
        resolve_mpp(r)
    res = resolve_mpp(r, override=0.5)
    assert (res.mpp_x, res.mpp_y, res.source) == (0.5, 0.5, "override")


def test_override_beats_metadata(aperio_slide: Fixture) -> None:
    res = resolve_mpp(open_slide(aperio_slide.path), override=0.2527)
    assert res.mpp == 0.2527 and res.source == "override"


def test_implausible_mpp_is_rejected() -> None:
    # 72 dpi default tags claim ~352.8 um/px: treat as missing, not as a real resolution.
    slide = ArraySlide(np.zeros((64, 64, 3), np.uint8), mpp=352.78)
    with pytest.raises(ResolutionError, match="no scanner produces"):
        resolve_mpp(slide)
    with pytest.raises(ResolutionError, match="plausible range"):
        resolve_mpp(slide, override=0.0)


@pytest.mark.parametrize(
    ("downsamples", "mpp0", "target", "level", "scale", "effective"),
    [
        ((1, 4, 16), 0.25, 0.5, 0, 0.5, 0.5),  # 40x slide, 20x tiles: read level 0, halve
        ((1, 2, 8), 0.25, 0.5, 1, 1.0, 0.5),  # an exact 20x level: no resize
        ((1, 4, 16), 0.499, 0.5, 0, 1.0, 0.499),  # within tolerance: use as is, report 0.499
        ((1, 4, 16), 0.2527, 1.0, 1, 1.0, 1.0108),  # 1.0108 is within 10 % of 1.0
        ((1, 4, 16), 0.25, 2.0, 1, 0.5, 2.0),  # coarsest level not coarser than the target
        ((1,), 1.0, 0.5, 0, 2.0, 0.5),  # finer than level 0: upscale
    ],
)
def test_choose_level(
    downsamples: tuple[int, ...], mpp0: float, target: float, level: int, scale: float, effective: float
) -> None:
    c = choose_level(downsamples, mpp0, target)
    assert c.level == level
    assert c.scale == pytest.approx(scale)
    assert c.effective_mpp == pytest.approx(effective, rel=1e-3)


def test_choose_level_tolerance_is_respected() -> None:
    assert choose_level((1,), 0.55, 0.5, tolerance=0.05).scale == pytest.approx(0.55 / 0.5)
    assert choose_level((1,), 0.54, 0.5, tolerance=0.1).scale == 1.0


def test_thumbnail_is_built_in_blocks_with_known_geometry(aperio_slide: Fixture, backend: str) -> None:
    r = open_slide(aperio_slide.path, backend)
    # 8 um/px from 0.25 um/px: downsample 32 = level 2 (16) reduced by 2.
    th = read_thumbnail(r, 0.25, target_mpp=8.0, block_px=50)
    assert th.downsample == 32 and th.mpp == pytest.approx(8.0)
    assert th.image.shape == (64, 96, 3)
    whole = read_thumbnail(r, 0.25, target_mpp=8.0, block_px=4096)
    np.testing.assert_array_equal(th.image, whole.image)  # tiled equals eager


@pytest.mark.parametrize("workers", [1, 3])
def test_one_read_gives_thumbnails_at_several_resolutions(
    aperio_slide: Fixture, backend: str, workers: int
) -> None:
    """read_thumbnails: each thumbnail equals the one read on its own (same level, same factor), in
    any block size and on any number of threads; a target finer than the first one's level gets
    None (it needs a finer level)."""
    r = open_slide(aperio_slide.path, backend)
    # 0.25 um/px, levels 1/4/16: 8 um/px is level 2 by 2; 4 and 16 um/px are level 2 by 1 and by 4;
    # 1 um/px needs level 1.
    targets = [8.0, 4.0, 16.0, 1.0]
    for block in (50, 4096):
        got = read_thumbnails(r, 0.25, targets, block_px=block, workers=workers)
        assert got[3] is None
        for t, th in zip(targets[:3], got[:3], strict=True):
            own = read_thumbnail(r, 0.25, target_mpp=t)
            assert th is not None and th.downsample == own.downsample and th.mpp == pytest.approx(own.mpp)
            np.testing.assert_array_equal(th.image, own.image)


def test_thumbnails_whose_cells_only_align_in_huge_blocks_are_left_to_their_own_read() -> None:
    """Factors 16 and 17 align every 272 px; 61 and 64 only every 3904 px, more than a 2048 px block:
    that second thumbnail is not derived (a block that large would hold a GB on a big slide)."""
    img = np.random.default_rng(1).integers(0, 255, (700, 1100, 3), dtype=np.uint8)
    s = ArraySlide(img, mpp=0.5, downsamples=(1,))
    a, b = read_thumbnails(s, 0.5, [8.0, 8.5], block_px=2048)  # factors 16 and 17
    assert a is not None and b is not None
    np.testing.assert_array_equal(b.image, read_thumbnail(s, 0.5, target_mpp=8.5).image)
    c, d = read_thumbnails(s, 0.5, [32.0, 30.5], block_px=2048)  # factors 64 and 61
    assert c is not None and d is None
    np.testing.assert_array_equal(c.image, read_thumbnail(s, 0.5, target_mpp=32.0).image)


def test_array_slide_pyramid() -> None:
    img = np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    s = ArraySlide(img, mpp=0.5, downsamples=(1, 2))
    assert s.level_dimensions == ((96, 64), (48, 32))
    np.testing.assert_array_equal(s.read_region((10, 20), 0, (5, 7)), img[20:27, 10:15])
    out = s.read_region((90, 60), 0, (10, 10))  # beyond the edge: white, like a transparent region
    assert (out[5:, :] == 255).all()


def test_fingerprint_changes_with_content(tmp_path, aperio_slide: Fixture) -> None:  # type: ignore[no-untyped-def]
    data = aperio_slide.path.read_bytes()
    a, b = tmp_path / "a.svs", tmp_path / "b.svs"
    a.write_bytes(data)
    b.write_bytes(data[:-10] + b"0123456789")
    assert slide_fingerprint(a) == slide_fingerprint(aperio_slide.path)
    assert slide_fingerprint(a) != slide_fingerprint(b)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_path(tmp_path, backend: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs", backend)


def test_empty_file(tmp_path, backend: str) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "empty.svs"
    p.write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        open_slide(p, backend)


def test_not_a_slide(not_a_slide, backend: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SlideError, match=r"notes\.svs: cannot open"):
        open_slide(not_a_slide, backend)


def test_truncated_slide_fails_at_open_or_read(truncated_slide, backend: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SlideError, match=r"truncated\.svs"):
        r = open_slide(truncated_slide, backend)
        for y in range(0, r.dimensions[1], 512):
            r.read_region((0, y), 0, (r.dimensions[0], 512))


def test_unknown_backend(aperio_slide: Fixture) -> None:
    with pytest.raises(SlideError, match="unknown backend"):
        open_slide(aperio_slide.path, "bioformats")


# --- real slides (../shared/data) --------------------------------------------------------------


@pytest.mark.realdata
def test_real_aperio_svs(backend: str) -> None:
    r = open_slide(shared("slides", "aperio", "CMU-1-Small-Region.svs"), backend)
    assert r.vendor == "aperio"
    assert r.dimensions == (2220, 2967)
    res = resolve_mpp(r)
    assert res.mpp == pytest.approx(0.499) and res.source == "metadata"


@pytest.mark.realdata
def test_real_svs_without_mpp_needs_override(backend: str) -> None:
    r = open_slide(shared("slides", "aperio", "tcga-cr-7395-01a-01-ts1.svs"), backend)
    with pytest.raises(ResolutionError, match=r"tcga-cr-7395.*--mpp"):
        resolve_mpp(r)


@pytest.mark.realdata
def test_real_72dpi_tiff_is_not_a_resolution() -> None:
    r = open_slide(shared("slides", "tiny-fixtures", "boxes.tiff"))
    with pytest.raises(ResolutionError, match="no scanner produces"):
        resolve_mpp(r)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["random-bytes.svs", "unopenable.tiff", "unreadable.svs"])
def test_real_broken_slides_raise_slide_error(name: str, backend: str) -> None:
    p = shared("slides", "broken", name)
    with pytest.raises(SlideError, match=name.replace(".", r"\.")):
        r = open_slide(p, backend)
        r.read_region((0, 0), 0, r.dimensions)


@pytest.mark.realdata
@pytest.mark.parametrize("backend", ["auto", "tiffslide"])
def test_a_compression_no_reader_decodes_is_not_called_corruption(backend: str) -> None:
    """unopenable.tiff is a whole file whose tiles use compression 52479: the fix is converting it, not
    re-copying it."""
    p = shared("slides", "broken", "unopenable.tiff")
    with pytest.raises(SlideError, match="compression no reader here decodes") as info:
        open_slide(p, backend)
    assert "corrupt or truncated" not in str(info.value)


@pytest.mark.realdata
def test_real_plain_tiff_opens_with_tiffslide_fallback() -> None:
    r = open_slide(shared("slides", "plain-tiff", "kidney-48-5.tif"))
    assert r.backend == "tiffslide"
    assert r.dimensions == (1493, 901)


@pytest.mark.realdata
def test_real_multiplex_qptiff_is_refused_as_not_rgb() -> None:
    with pytest.raises(SlideError, match="not RGB"):
        open_slide(shared("slides", "qptiff", "small_vectra.qptiff"), "tiffslide")


def test_a_slide_that_cannot_be_opened_and_just_changed_may_still_be_copying(tmp_path: Path) -> None:
    """A nightly run over a scanner's folder meets a slide still being written: its error says so
    (a slide broken for good, changed long ago, gets the plain error)."""
    import os
    import time

    from wsi_pipeline.io.slide import open_slide

    sample = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"
    part = tmp_path / "scan.svs"
    part.write_bytes(sample.read_bytes()[:200_000])  # the first 10 % of the copy
    with pytest.raises(
        SlideError, match=r"\(scan\.svs changed \d+ s ago: if it is still being copied or scanned"
    ):
        open_slide(part)
    hour_ago = time.time() - 3600
    os.utime(part, (hour_ago, hour_ago))
    with pytest.raises(SlideError) as err:
        open_slide(part)
    assert "changed" not in str(err.value) and "not truncated" in str(err.value)


def test_our_own_heatmap_or_a_plain_folder_is_refused_as_what_it_is(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A heatmap given back as the slide (tab completion picks results/case.tif) was opened as a
    generic TIFF and asked for --mpp, advice that would have scored the heatmap; both it and a folder
    of .svs files opened as a slide got "changed N s ago: still being copied?" as well."""
    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    out = tmp_path / "res"
    r = CliRunner().invoke(
        main, [str(tumour_slide.path), "--out", str(out / "case.tif"), "--model", str(test_model), "-q"]
    )
    assert r.exit_code == 0, r.output
    for name in ("case.tif", "case.colour.tif"):
        for args in (["info", str(out / name)], [str(out / name), "--out", str(tmp_path / "x.tif"), "-q"]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 3, r.output
            assert (
                f"wsi-pipeline wrote for {tumour_slide.path.name}, not a slide; score the scanned slide itself"
                in r.output
            )
            assert "--mpp" not in r.output and "changed" not in r.output
    from wsi_pipeline.io.slide import open_slide

    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a.svs").write_bytes(b"x")
    with pytest.raises(SlideError) as err:
        open_slide(folder)
    assert "holds no DICOM" in str(err.value) and "changed" not in str(err.value)
