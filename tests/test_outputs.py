"""Issue 14: outputs a pathologist can read and a script can trust.

The probability TIFF (pyramid, scored mask, geometry, three readers), the colour TIFF, the overlay
(slide left as it looks below the visible floor, colour bar, threshold, outlines, scale bar), the
compact GeoJSON with region measurements and the tiles switch, and one naming rule for single and
folder runs (manifest naming the slide and the store).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import Fixture
from wsi_pipeline.batch import BatchItem, find_slides, heatmap_path, is_own_output, output_stems
from wsi_pipeline.cli import main
from wsi_pipeline.io.outputs import (
    geojson_features,
    heatmap_canvas,
    overlay_alpha,
    probability_u8,
    render_overlay,
    visible_floor,
    write_colour_tiff,
    write_probability_tiff,
)
from wsi_pipeline.pipeline import RunOptions, output_paths, run_slide

OPTS = RunOptions(chunk_tiles=64, workers=2)


def _canvas(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.random((rows, cols)).astype(np.float32)
    c[rng.random((rows, cols)) < 0.3] = np.nan
    return c


# --------------------------------------------------------------------------- probability TIFF


def test_probability_tiff_is_a_pyramid_with_its_scored_mask(tmp_path: Path) -> None:
    import openslide
    import tifffile
    import tiffslide

    canvas = _canvas(600, 700)
    path = write_probability_tiff(
        tmp_path / "p.tif", canvas, cell_l0_px=224.0, mpp_l0=0.25, origin_l0=16.0,
        slide_wh=(700 * 224 + 10, 600 * 224 - 5), description={"slide": "s.svs", "value": "P(tumour)"},
    )  # fmt: skip
    u8 = probability_u8(canvas)
    assert u8[np.isnan(canvas)].max() == 0
    ok = ~np.isnan(canvas)
    assert np.abs(u8[ok].astype(float) - 255 * canvas[ok]).max() <= 0.5 + 1e-4
    with tifffile.TiffFile(path) as tf:
        pyramid, mask = tf.series[0], tf.series[1]
        assert len(tf.series) == 2 and len(pyramid.levels) == 3
        assert all(p.is_tiled for p in tf.pages[:3]) and not tf.pages[3].is_tiled
        assert (pyramid.levels[0].asarray() == u8).all() and pyramid.levels[0].dtype == np.uint8
        lv1 = pyramid.levels[1].asarray()  # highest P of each 2 x 2 block
        assert lv1.shape == (300, 350) and (lv1 == u8.reshape(300, 2, 350, 2).max(axis=(1, 3))).all()
        assert ((mask.asarray() == 255) == ok).all()
        desc = json.loads(tf.pages[0].description)
        assert desc["wsi_pipeline_heatmap"] == 2 and desc["downsample"] == 224.0
        assert desc["origin_l0"] == [16.0, 16.0] and desc["mpp"] == pytest.approx(56.0)
        assert desc["slide_size_l0"] == [700 * 224 + 10, 600 * 224 - 5] and desc["slide"] == "s.svs"
        assert tf.pages[0].tags["ResolutionUnit"].value == 3  # centimetre
        assert tf.pages[0].tags["XResolution"].value[0] / tf.pages[0].tags["XResolution"].value[1] == (
            pytest.approx(1e4 / 56.0)
        )
    for reader in (openslide.OpenSlide(str(path)), tiffslide.TiffSlide(path)):
        assert reader.level_count == 3 and reader.dimensions == (700, 600)  # the mask is not a level
        assert float(reader.properties[f"{type(reader).__module__.split('.')[0]}.mpp-x"]) == pytest.approx(
            56.0
        )
        region = np.asarray(reader.read_region((100, 50), 0, (64, 32)))
        grey = region[..., 0] if region.ndim == 3 else region
        assert (grey == u8[50:82, 100:164]).all()
        reader.close()
    assert is_own_output(path)


def test_small_probability_tiff_is_one_tiled_level(tmp_path: Path) -> None:
    import tifffile

    path = write_probability_tiff(
        tmp_path / "s.tif", _canvas(14, 10), cell_l0_px=224.0, mpp_l0=0.5, description={}
    )  # fmt: skip
    with tifffile.TiffFile(path) as tf:
        assert len(tf.series[0].levels) == 1 and tf.pages[0].is_tiled and tf.series[0].shape == (14, 10)


def test_colour_tiff_is_an_rgb_pyramid_with_the_same_geometry(tmp_path: Path) -> None:
    import openslide
    import tifffile

    canvas = _canvas(300, 520)
    path = write_colour_tiff(tmp_path / "c.tif", canvas, cell_l0_px=112.0, mpp_l0=0.5, description={})
    with tifffile.TiffFile(path) as tf:
        lv = tf.series[0].levels
        assert len(lv) == 3 and lv[0].shape == (300, 520, 3) and lv[2].shape == (75, 130, 3)
        rgb = lv[0].asarray()
        assert (rgb[np.isnan(canvas)] == 255).all()  # white = not scored
        desc = json.loads(tf.pages[0].description)
        assert desc["kind"] == "colour" and desc["downsample"] == 112.0 and desc["grid_shape"] == [300, 520]
    assert openslide.OpenSlide(str(path)).level_count == 3
    assert is_own_output(path)


def test_canvas_ends_with_the_last_cell_that_overlaps_the_slide() -> None:
    grid = np.zeros((3, 4), np.float32)
    for origin in (0.0, 16.0):
        c = heatmap_canvas(grid, (1000, 700), 224.0, origin)
        rows, cols = c.shape
        assert origin + (cols - 1) * 224 < 1000 <= origin + cols * 224
        assert origin + (rows - 1) * 224 < 700 <= origin + rows * 224
        assert np.isnan(c[:, 4:]).all() and (c[:3, :4] == 0).all()
    assert heatmap_canvas(grid, (896, 672), 224.0).shape == (3, 4)  # an exact fit: no extra cell


# --------------------------------------------------------------------------- overlay


def test_overlay_leaves_low_p_and_unscored_tissue_as_the_slide_looks() -> None:
    bg = np.full((400, 600, 3), (230, 160, 200), np.uint8)  # pink "tissue"
    canvas = np.full((4, 6), np.nan, np.float32)  # cells of 100 picture px (l0_per_px = 2, cell 200)
    canvas[0, 0], canvas[0, 1], canvas[0, 2], canvas[1, 1] = 0.05, 0.5, 0.95, 0.95
    from shapely import box

    region = box(400, 0, 600, 200)  # level-0 px: cell (0, 2)
    img = render_overlay(
        bg, canvas, l0_per_px=2.0, cell_l0_px=200.0, mpp_l0=0.5, threshold=0.5, regions=region,
    )  # fmt: skip
    assert img.shape[0] >= 400 and img.shape[1] > 600  # the legend panel is beside the picture
    assert (img[50, 50] == bg[0, 0]).all()  # P 0.05: below the floor, untouched
    assert (img[150, 550] == bg[0, 0]).all()  # not scored: untouched
    low, high = img[50, 150].astype(int), img[150, 150].astype(int)
    assert np.abs(low - bg[0, 0]).sum() > 20 and np.abs(high - bg[0, 0]).sum() > np.abs(low - bg[0, 0]).sum()
    assert high[0] > high[2]  # high P is red
    assert (img[100, 200:300].max(axis=-1) < 40).any() and (
        img[50, 199:203].max(axis=-1) < 40
    ).any()  # outline
    assert (img[330:400, 0:150].max(axis=-1) < 30).sum() > 100  # the scale bar (bottom left)
    panel = img[:, 600:]
    assert len(np.unique(panel.reshape(-1, 3), axis=0)) > 50  # the colour bar's ramp
    assert visible_floor(0.5) == 0.2 and visible_floor(0.1) == 0.1
    a = overlay_alpha(np.array([np.nan, 0.1, 0.2, 0.6, 1.0]), 0.2)
    assert a[0] == a[1] == 0 and 0 < a[2] < a[3] < a[4] <= 0.7


def test_overlay_blends_each_pixel_with_the_colour_and_opacity_of_its_cell() -> None:
    """Colour and opacity computed per cell and spread to pixels equal computing them per pixel."""
    from wsi_pipeline.io.outputs import ramp_colours

    rng = np.random.default_rng(5)
    bg = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    canvas = _canvas(7, 11, seed=2)
    l0_per_px, cell, origin = 3.3, 150.0, -20.0
    img = render_overlay(bg, canvas, l0_per_px=l0_per_px, cell_l0_px=cell, mpp_l0=0.5, threshold=0.6,
                         origin_l0=origin)  # fmt: skip
    ys, xs = np.mgrid[0:300, 0:500]
    r = np.floor(((ys + 0.5) * l0_per_px - origin) / cell).astype(int)
    c = np.floor(((xs + 0.5) * l0_per_px - origin) / cell).astype(int)
    inside = (r >= 0) & (r < 7) & (c >= 0) & (c < 11)
    p = np.where(inside, canvas[r.clip(0, 6), c.clip(0, 10)], np.nan)
    a = overlay_alpha(p, visible_floor(0.6))[..., None]
    expected = np.round(bg.astype(np.float32) * (1 - a) + ramp_colours(np.nan_to_num(p, nan=0.0)) * a)
    np.testing.assert_array_equal(img[:150, :500], expected[:150].astype(np.uint8))  # above the scale bar


@pytest.mark.parametrize("long_side", [100, 200, 1000])
def test_overlay_picture_comes_from_the_planning_read(
    any_slide: Fixture, long_side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source opened for a picture size keeps that picture's base from the thumbnail's read: the
    same pixels as reading the slide again, and the slide is not opened again for it. Where the
    thumbnail's level is too coarse for the picture the slide is read as before."""
    import wsi_pipeline.tiling.pictures as pictures
    from wsi_pipeline.tiling.plan import TileOptions
    from wsi_pipeline.tiling.source import open_source

    separate = pictures.slide_picture(open_source(any_slide.path, TileOptions()), long_side)
    source = open_source(any_slide.path, TileOptions(), picture_px=long_side)
    layout = source.layout
    thumbnail_level_ds = {"aperio": 16, "generic": 8}[any_slide.kind]  # levels 1/4/16 and 1/2/8
    if max(layout.slide_wh) / long_side < thumbnail_level_ds:  # the picture needs a finer level
        assert layout.picture is None
    else:
        assert layout.picture is not None and layout.picture_px == long_side

        def no_reading(_: object) -> None:
            raise AssertionError("the slide was opened again for its picture")

        monkeypatch.setattr(pictures, "_open_reader", no_reading)
    shared = pictures.slide_picture(source, long_side)
    assert shared.origin == separate.origin == "slide" and shared.l0_per_px == separate.l0_per_px
    np.testing.assert_array_equal(shared.image, separate.image)


def test_bundled_sample_is_decoded_once_for_thumbnail_and_overlay(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real single-level sample: its 1000 px overlay picture comes from the thumbnail's read
    (level 0 decoded once, not twice), with the same pixels as a separate read."""
    import wsi_pipeline.io.slide as slide_io
    import wsi_pipeline.tiling.pictures as pictures
    from wsi_pipeline.tiling.plan import TileOptions
    from wsi_pipeline.tiling.source import open_source

    sample = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"
    separate = pictures.slide_picture(open_source(sample, TileOptions()), 1000)
    pixels = {"n": 0}
    real = slide_io._LibrarySlide.read_region

    def counting(self: Any, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        pixels["n"] += size[0] * size[1]
        return real(self, loc, level, size)

    monkeypatch.setattr(slide_io._LibrarySlide, "read_region", counting)
    source = open_source(sample, TileOptions(), picture_px=1000)
    shared = pictures.slide_picture(source, 1000)
    w, h = source.layout.slide_wh
    assert pixels["n"] <= w * h * 1.05  # one pass over level 0 (plus the missing-tile probes)
    np.testing.assert_array_equal(shared.image, separate.image)
    one_thread = open_source(sample, TileOptions(workers=1), picture_px=1000)  # decoded on 1 thread
    np.testing.assert_array_equal(one_thread.layout.thumbnail, source.layout.thumbnail)
    np.testing.assert_array_equal(pictures.slide_picture(one_thread, 1000).image, shared.image)


@pytest.mark.parametrize("long_side", [1000, 997, 1023, 333, 5000])
def test_slide_picture_spans_the_slide_at_any_size(any_slide: Fixture, long_side: int) -> None:
    """The overlay's background: the whole slide read at the needed resolution (upsampled when the
    slide is smaller), tissue where the slide has tissue, glass where it has none."""
    from wsi_pipeline.tiling.pictures import slide_picture
    from wsi_pipeline.tiling.plan import TileOptions
    from wsi_pipeline.tiling.source import open_source

    spec = any_slide.spec
    pic = slide_picture(open_source(any_slide.path, TileOptions()), long_side)
    h, w = pic.image.shape[:2]
    assert max(h, w) == long_side and pic.origin == "slide"
    assert pic.l0_per_px == pytest.approx(max(spec.width, spec.height) / long_side)
    assert (
        abs(w * pic.l0_per_px - spec.width) <= pic.l0_per_px
        and abs(h * pic.l0_per_px - spec.height) <= pic.l0_per_px
    )
    e = spec.tissue[0]
    inside = pic.image[int(e.cy / pic.l0_per_px), int(e.cx / pic.l0_per_px)].astype(int)
    glass = pic.image[int(5 / pic.l0_per_px), -1].astype(int)  # top right corner: no tissue
    assert glass.min() > 200 and inside[1] < glass[1] - 30  # H&E pink/purple is low in green


# --------------------------------------------------------------------------- GeoJSON


def test_geojson_regions_are_measured_and_tiles_can_be_left_out() -> None:
    from wsi_pipeline.aggregate import tumour_regions

    boxes = np.array(
        [[0, 0, 100, 100], [100, 0, 200, 100], [500, 500, 600, 600], [300, 300, 400, 400]], float
    )
    probs = np.array([[0.1, 0.9], [0.4, 0.6], [0.2, 0.8], [0.9, 0.1]])
    regions = tumour_regions(boxes, probs[:, 1] >= 0.5)
    fc = geojson_features(
        boxes, probs, ("non-tumour", "tumour"), 1, tile_threshold=0.5, regions=regions, mpp_l0=0.5
    )  # fmt: skip
    ann = sorted(
        (f["properties"]["measurements"] for f in fc["features"] if f["properties"]["objectType"] == "annotation"),
        key=lambda m: -m["Tiles"],
    )  # fmt: skip
    # Length: the greatest dimension, here the diagonal of the 200 x 100 px (100 x 50 um) outline
    assert ann[0] == {"Area um^2": 5000.0, "Area mm^2": 0.005, "Length um": 111.8, "Mean P(tumour)": 0.75,
                      "Max P(tumour)": 0.9, "Tiles": 2}  # fmt: skip
    assert ann[1]["Tiles"] == 1 and ann[1]["Max P(tumour)"] == 0.8 and ann[1]["Area um^2"] == 2500.0
    assert ann[1]["Length um"] == 70.7
    assert sum(f["properties"]["objectType"] == "detection" for f in fc["features"]) == 4
    fc2 = geojson_features(
        boxes, probs, ("non-tumour", "tumour"), 1, tile_threshold=0.5, regions=regions, mpp_l0=0.5, tiles=False
    )  # fmt: skip
    assert [f["properties"]["objectType"] for f in fc2["features"]] == ["annotation", "annotation"]


def test_cli_switches_for_geojson_tiles_and_overlay_size(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.tif"
    args = [str(tumour_slide.path), "--out", str(out), "--model", str(test_model), "-q"]
    r = CliRunner().invoke(main, [*args, "--no-geojson-tiles", "--overlay-size", "400"])
    assert r.exit_code == 0, r.output
    paths = output_paths(out)
    gj = json.loads(paths["geojson"].read_text())
    assert {f["properties"]["objectType"] for f in gj["features"]} == {"annotation"}
    m = json.loads(paths["manifest"].read_text())
    assert max(m["heatmap"]["overlay"]["slide_px"]) == 400 and m["heatmap"]["geojson_tiles"] is False
    from PIL import Image

    assert Image.open(paths["overlay"]).size == tuple(m["heatmap"]["overlay"]["size_px"])
    assert "report.html" in " ".join(m["outputs"].values()) and paths["report"].is_file()


# --------------------------------------------------------------------------- naming, manifest


def test_one_naming_rule_for_single_and_folder_runs(tmp_path: Path) -> None:
    paths = output_paths(tmp_path / "case1.tif")
    assert {k: v.name for k, v in paths.items()} == {
        "heatmap": "case1.tif", "colour": "case1.colour.tif", "overlay": "case1.overlay.png",
        "geojson": "case1.geojson", "asap_xml": "case1.asap.xml", "tiles_csv": "case1.tiles.csv", "report": "case1.report.html",
        "manifest": "case1.run.json",
    }  # fmt: skip
    assert list(paths)[-1] == "manifest"  # written last
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "b.tif").write_bytes(b"x")
    items = [BatchItem(tmp_path / "a.svs"), BatchItem(tmp_path / "b.tif")]
    assert output_stems(items) == ["a", "b"]
    # Into their own folder: b's b.tif would be the slide itself, so b is named after its file name.
    assert output_stems(items, tmp_path) == ["a", "b.tif"]
    assert heatmap_path(tmp_path, "b.tif").name == "b.tif.tif"
    assert output_stems(items, tmp_path / "results") == ["a", "b"]


def test_names_that_differ_only_in_case_get_distinct_outputs(tmp_path: Path) -> None:
    """Results on a Windows or macOS share (case-insensitive): Case1.* and case1.* would be one set of
    files, and the second slide would take the first one's result as its own."""
    for name in ("Case1.svs", "case1.svs", "b.svs", "sub/B.svs"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    stems = output_stems([BatchItem(tmp_path / n) for n in ("Case1.svs", "case1.svs", "b.svs", "sub/B.svs")])
    assert len({s.casefold() for s in stems}) == 4, stems
    assert stems[2:] == ["b.svs", "sub__B.svs"] and stems[0].startswith("Case1.svs~"), stems


def test_a_tif_slide_scored_into_its_own_folder_keeps_its_name_and_resumes(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    src = tmp_path / "slides"
    src.mkdir()
    slide = src / "case.tif"
    shutil.copy2(tumour_slide.path, slide)
    before = slide.read_bytes()
    args = [str(src), "--out", str(src), "--model", str(test_model), "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert slide.read_bytes() == before and (src / "case.tif.run.json").is_file()
    assert find_slides(src) == [slide]  # case.tif.tif and case.tif.colour.tif are ours, not slides
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "already done" in r.output, r.output
    rows = json.loads((src / "summary.json").read_text())["slides"]
    assert [(Path(x["slide"]).name, x["status"], x["report"]) for x in rows] == [
        ("case.tif", "skipped (done)", "case.tif.report.html")
    ]
    assert (src / "report.html").is_file()


def test_names_near_the_file_system_limit_are_shortened_distinctly() -> None:
    from wsi_pipeline.batch import MAX_STEM_BYTES, fit_name

    assert fit_name("case 1") == "case 1"
    long = ["S" * 250, "S" * 249 + "T", "ä" * 150]  # the last: 300 bytes, a 2-byte character at the cut
    fitted = [fit_name(n) for n in long]
    assert len(set(fitted)) == 3 and all(len(f.encode()) <= MAX_STEM_BYTES for f in fitted)
    assert fitted[2].startswith("ää") and fitted[2].encode().decode() == fitted[2]
    assert fit_name(long[0]) == fitted[0]  # the same name every run: resume finds its outputs


def test_folder_run_scores_a_slide_whose_name_is_near_255_bytes(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A 250-byte slide name (file systems allow 255): NAME.report.html could not be written, and the
    run used to stop with a traceback. Its outputs now get a shortened name, and the re-run resumes."""
    src = tmp_path / "slides"
    src.mkdir()
    name = "Biopsie " + "x" * 238  # + ".svs": 250 bytes
    shutil.copy2(tumour_slide.path, src / f"{name}.svs")
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--model", str(test_model), "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    (row,) = json.loads((out / "summary.json").read_text())["slides"]
    assert row["status"] == "ok" and row["report"].startswith("Biopsie xxx") and "~" in row["report"]
    assert (out / row["report"]).is_file() and len(list(out.glob("Biopsie*"))) == 8
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "already done" in r.output, r.output


def test_slides_whose_names_are_not_utf8_are_scored_named_and_resumed(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A Latin-1 name (``caf\\xe9.svs`` from an old Windows share or a zip; Python keeps its byte as a
    surrogate) crashed the folder run with a traceback while writing the slide's page, and a console
    under ``en_US.UTF-8`` (strict, as ``CliRunner``'s is) could not print the name. Now the outputs
    keep the name's bytes, pages and tables show it as ``caf\\xe9`` in valid UTF-8, and it resumes."""
    import os

    src = tmp_path / "slides"
    src.mkdir()
    name = os.fsdecode(b"caf\xe9")
    shutil.copy2(tumour_slide.path, src / f"{name}.svs")
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--model", str(test_model)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "caf\\xe9.svs: TUMOUR" in r.stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(name)) == [
        f"{name}{suffix}" for suffix in sorted(
            [".tif", ".colour.tif", ".overlay.png", ".geojson", ".asap.xml", ".tiles.csv", ".report.html",
             ".run.json"]
        )
    ]  # fmt: skip
    summary = (out / "summary.csv").read_bytes().decode("utf-8")  # valid UTF-8, for pandas and Excel
    assert "caf\\xe9.svs,ok,tumour" in summary
    assert "caf\\xe9.svs" in (out / f"{name}.report.html").read_bytes().decode("utf-8")
    assert 'href="caf%E9.report.html"' in (out / "report.html").read_text()  # the file's own bytes
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "caf\\xe9.svs: already done" in r.stdout, r.output
    one = tmp_path / "one"
    r = CliRunner().invoke(main, [str(src / f"{name}.svs"), "--out", f"{one}/", "--model", str(test_model)])
    assert r.exit_code == 0 and (one / f"{name}.report.html").is_file(), r.output
    r = CliRunner().invoke(main, ["tile", str(src / f"{name}.svs"), "--out", str(tmp_path / "t.zarr")])
    assert r.exit_code == 0 and "caf\\xe9.svs: " in r.stdout, r.output


def test_an_out_name_too_long_for_the_file_system_stops_before_any_work(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "res" / ("x" * 225 + ".tif")  # NAME.overlay.png: 237 bytes, 4 too many
    for args in ([str(tumour_slide.path), "--out", str(out)], ["tile", str(tumour_slide.path), "--out",
                                                               str(out.with_suffix(".zarr"))]):  # fmt: skip
        r = CliRunner().invoke(main, [*args, "--model", str(test_model), "-q"] if args[0] != "tile" else args)
        assert r.exit_code == 6, r.output
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].endswith("bytes shorter"), r.output
    assert not (tmp_path / "res").exists()


def test_folder_run_with_tiles_out_keeps_a_store_per_slide(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """--tiles-out in a folder run wrote every slide's tiles to the one path given: each slide replaced
    the previous one's store (or, without --overwrite, failed on it)."""
    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy2(tumour_slide.path, src / "t.svs")
    shutil.copy2(benign_slide.path, src / "b.svs")
    stores = tmp_path / "stores"
    args = [
        str(src),
        "--out",
        str(tmp_path / "res"),
        "--model",
        str(test_model),
        "--tiles-out",
        str(stores),
        "-q",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in stores.glob("*.zarr")) == ["b.zarr", "t.zarr"]
    for name in ("b", "t"):
        m = json.loads((tmp_path / "res" / f"{name}.run.json").read_text())
        assert Path(m["store"]) == stores / f"{name}.zarr", m["store"]
    r = CliRunner().invoke(main, [str(stores / "t.zarr"), "--out", str(tmp_path / "again" / "t.tif"),
                                  "--model", str(test_model), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "again" / "t.run.json").read_text())["label"]
    assert again == json.loads((tmp_path / "res" / "t.run.json").read_text())["label"]


def test_old_heatmaps_are_still_recognised_as_outputs(tmp_path: Path) -> None:
    """Results folders of older versions hold NAME.heatmap.tif (RGB, format 1): never slides."""
    import tifffile

    old = tmp_path / "case1.heatmap.tif"
    tifffile.imwrite(old, np.zeros((8, 8, 3), np.uint8), description=json.dumps({"wsi_pipeline_heatmap": 1}))
    assert is_own_output(old) and find_slides(tmp_path) == []


def test_manifest_names_the_slide_and_the_store(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    slide = tmp_path / "slide.svs"
    shutil.copy2(tumour_slide.path, slide)
    store = tmp_path / "t.zarr"
    m = run_slide(slide, tmp_path / "s.tif", model=test_model, options=RunOptions(tiles_out=store))
    assert Path(m["slide"]).resolve() == slide.resolve()
    assert m["store"] == str(store) and m["outputs"]["store"] == str(store)
    import tifffile

    with tifffile.TiffFile(m["outputs"]["heatmap"]) as tf:
        assert json.loads(tf.pages[0].description)["slide"] == "slide.svs"
    # Scoring the store: the slide is still named, the store too (not an output of this run).
    m2 = run_slide(store, tmp_path / "z.tif", model=test_model, options=OPTS)
    assert Path(m2["slide"]).resolve() == slide.resolve() and m2["store"] == str(store)
    assert "store" not in m2["outputs"] and m2["heatmap"]["overlay"]["background"] == "slide"
    # A store whose slide is gone: the overlay is drawn on the store's thumbnail, upsampled.
    slide.rename(tmp_path / "moved.svs")
    m3 = run_slide(store, tmp_path / "y.tif", model=test_model, options=OPTS)
    assert m3["heatmap"]["overlay"]["background"] == "store thumbnail"
    assert max(m3["heatmap"]["overlay"]["slide_px"]) == 1000
    assert output_paths(tmp_path / "y.tif")["report"].is_file()


def test_png_encoding_is_lossless_and_no_larger_than_zlib_defaults() -> None:
    """The overlay's PNG settings (level 3, run-length strategy, chosen for speed) keep every pixel and,
    on real scanned tissue, make a smaller file than zlib's default strategy at the same level."""
    import io
    import zlib

    from PIL import Image

    from wsi_pipeline.io.outputs import encode_image
    from wsi_pipeline.io.slide import open_slide

    sample = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"
    reader = open_slide(sample)
    try:
        picture = reader.read_region((0, 0), 0, (1000, 1000))
    finally:
        reader.close()
    data = encode_image(picture, "PNG")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), picture)
    default = io.BytesIO()
    Image.fromarray(picture).save(
        default, format="PNG", compress_level=3, compress_type=zlib.Z_DEFAULT_STRATEGY
    )
    assert len(data) < len(default.getvalue())


def test_the_manifest_records_the_command_line_as_typed(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A result is made again from its manifest: the command (as typed, with the folder it was typed in)
    is recorded beside the parameters, outside the resume key."""
    import os

    args = [
        str(tumour_slide.path),
        "--out",
        f"{tmp_path}/",
        "--model",
        str(test_model),
        "--min-area",
        "0.2",
        "-q",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "tumour.run.json").read_text())
    assert m["command"] == {"argv": ["wsi-infer", *args], "cwd": os.getcwd()}
    assert (
        f"<th>command</th><td>wsi-infer {tumour_slide.path} --out"
        in (tmp_path / "tumour.report.html").read_text()
    )
    again = CliRunner().invoke(main, [*args[:-1]])  # the same run without -q: still done, not re-scored
    assert again.exit_code == 0 and "already done" in again.output
