"""Tiler end to end into Zarr stores: correctness against read_region, coverage, resume, errors."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import Fixture, box_distance_outside, box_inside, shared
from testkit.synthetic import Ellipse, SyntheticSlide, SyntheticSpec
from wsi_pipeline.errors import ResolutionError, SlideError, StoreError, TissueError
from wsi_pipeline.io.slide import ArraySlide, open_slide
from wsi_pipeline.io.tilestore import open_tile_store, partial_path
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.read import iter_tiles, read_tile
from wsi_pipeline.tiling.tiler import tile_slide

SMALL_CHUNKS = TileOptions(chunk_tiles=8, block_tiles=3)


def _no_output(out: Path) -> bool:
    return not out.exists() and not partial_path(out).exists()


def test_store_tiles_equal_read_region(any_slide: Fixture, backend: str, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    rep = tile_slide(any_slide.path, out, SMALL_CHUNKS, backend=backend)
    assert rep.status == "written" and rep.n_tiles > 10
    store = open_tile_store(out)
    meta = store.meta
    assert meta["complete"] and meta["slide"]["backend"] == backend
    reader = open_slide(any_slide.path, backend)
    plan = plan_slide(reader, SMALL_CHUNKS)
    tiles = store.tiles[:]
    assert tiles.shape == (rep.n_tiles, 224, 224, 3)
    for i, (col, row) in enumerate(store.grid_colrow):
        np.testing.assert_array_equal(tiles[i], read_tile(reader, plan.grid, int(col), int(row)))
    # Coordinates are level-0 pixels: the tile's origin maps back to its grid position.
    np.testing.assert_array_equal(store.coords_l0, plan.grid.origins_l0(store.grid_colrow))


def test_aperio_40x_is_read_at_level0_and_halved(aperio_slide: Fixture, tmp_path: Path) -> None:
    rep = tile_slide(aperio_slide.path, tmp_path / "a.zarr", SMALL_CHUNKS)
    meta = rep.meta
    assert meta["resolution"]["level"] == 0 and meta["resolution"]["resize_scale"] == 0.5
    assert meta["grid"]["read_px"] == 448 and meta["grid"]["tile_l0_px"] == 448
    assert rep.effective_mpp == 0.5 and rep.mpp_source == "metadata"


def test_level_at_target_is_used_without_resize(tmp_path: Path, generic_slide: Fixture) -> None:
    # Level 1 of the generic slide is exactly 1.0 um/px.
    rep = tile_slide(generic_slide.path, tmp_path / "g.zarr", TileOptions(target_mpp=1.0, tile_px=64))
    assert rep.level == 1 and rep.meta["resolution"]["resize_scale"] == 1.0


def test_grid_covers_known_tissue_and_skips_background(any_slide: Fixture, tmp_path: Path) -> None:
    spec = any_slide.spec
    out = tmp_path / "c.zarr"
    tile_slide(any_slide.path, out, SMALL_CHUNKS)
    store = open_tile_store(out)
    reader = open_slide(any_slide.path)
    plan = plan_slide(reader, SMALL_CHUNKS)
    kept = {tuple(c) for c in store.grid_colrow.tolist()}
    all_pos = plan.grid.all_positions()
    boxes = plan.grid.boxes_l0(all_pos)
    inside = [tuple(p) for p, b in zip(all_pos.tolist(), boxes, strict=True) if box_inside(spec, b)]
    outside = [
        tuple(p) for p, b in zip(all_pos.tolist(), boxes, strict=True) if box_distance_outside(spec, b, 64)
    ]
    assert inside and outside
    assert set(inside) <= kept, "every tile fully inside known tissue is kept"
    assert not set(outside) & kept, "no tile clear of tissue is kept"
    # Tissue fractions recorded per tile: 1.0 inside, >= threshold for all kept.
    frac = dict(zip(map(tuple, store.grid_colrow.tolist()), store.tissue_fraction.tolist(), strict=True))
    assert min(frac[p] for p in inside) > 0.95
    assert min(frac.values()) >= SMALL_CHUNKS.min_tissue_fraction


def test_store_is_self_describing(aperio_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    tile_slide(aperio_slide.path, out, SMALL_CHUNKS)
    g = zarr.open_group(str(out), mode="r")
    meta = dict(g.attrs)["wsi_pipeline"]
    assert meta["format"] == "wsi-pipeline.tilestore"
    for key in ("path", "fingerprint", "backend", "vendor"):
        assert meta["slide"][key]
    r = meta["resolution"]
    assert (r["target_mpp"], r["effective_mpp"], r["mpp_source"]) == (0.5, 0.5, "metadata")
    assert meta["grid"]["tile_px"] == 224 and meta["grid"]["stride_read_px"] == 448
    assert meta["tissue"]["params"]["min_tissue_um2"] == 10_000.0
    assert meta["package_version"]
    assert g["tiles"].chunks == (8, 224, 224, 3)
    assert g["tissue_mask"].shape == g["thumbnail"].shape[:2]


def test_rerun_on_complete_store_does_nothing(generic_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "r.zarr"
    tile_slide(generic_slide.path, out, SMALL_CHUNKS)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rep = tile_slide(generic_slide.path, out, SMALL_CHUNKS)
    assert rep.status == "already complete" and rep.tiles_written == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_store_from_other_parameters_is_refused(generic_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "p.zarr"
    tile_slide(generic_slide.path, out, SMALL_CHUNKS)
    other = TileOptions(chunk_tiles=8, block_tiles=3, tile_px=128)
    with pytest.raises(StoreError, match=r"other parameters \(.*tile_px: 224 -> 128.*--overwrite"):
        tile_slide(generic_slide.path, out, other)
    assert open_tile_store(out).tiles.shape[1] == 224  # the old result is intact
    rep = tile_slide(generic_slide.path, out, other, overwrite=True)
    assert rep.status == "written" and open_tile_store(out).tiles.shape[1] == 128
    assert not list(tmp_path.glob("*.old-*"))


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_store(any_slide: Fixture, tmp_path: Path) -> None:
    ref = tmp_path / "ref.zarr"
    tile_slide(any_slide.path, ref, SMALL_CHUNKS)
    out = tmp_path / "x.zarr"
    calls = []

    def stop_midway(done: int, total: int) -> None:
        calls.append(done)
        if done >= total // 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        tile_slide(any_slide.path, out, SMALL_CHUNKS, progress=stop_midway)
    assert not out.exists() and partial_path(out).exists()  # never a half store under the final name
    with pytest.raises(StoreError, match="incomplete"):
        open_tile_store(partial_path(out))
    done_chunks = int(np.asarray(zarr.open_group(str(partial_path(out)))["chunk_done"][:]).sum())
    assert done_chunks >= 1
    seen: list[int] = []
    rep = tile_slide(any_slide.path, out, SMALL_CHUNKS, progress=lambda d, t: seen.append(d))
    assert rep.status == "resumed"
    assert seen[0] == done_chunks * 8  # started from the finished chunks
    assert rep.tiles_written == rep.n_tiles - done_chunks * 8
    a, b = open_tile_store(ref), open_tile_store(out)
    np.testing.assert_array_equal(a.tiles[:], b.tiles[:])
    np.testing.assert_array_equal(a.coords_l0, b.coords_l0)
    assert a.focus is not None and b.focus is not None and np.isfinite(b.focus).all()
    np.testing.assert_array_equal(a.focus, b.focus)  # the chunks of both runs have their focus scores


def test_partial_from_other_parameters_is_refused(generic_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "q.zarr"

    def stop(done: int, total: int) -> None:
        if done:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        tile_slide(generic_slide.path, out, SMALL_CHUNKS, progress=stop)
    with pytest.raises(StoreError, match="interrupted run with other parameters"):
        tile_slide(generic_slide.path, out, TileOptions(chunk_tiles=8, block_tiles=3, overlap_px=16))


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_count_does_not_change_tiles(aperio_slide: Fixture, workers: int) -> None:
    reader = open_slide(aperio_slide.path)
    plan = plan_slide(reader, SMALL_CHUNKS)
    serial = np.concatenate([t for _, t in iter_tiles(reader, plan, block_tiles=3, workers=1)])
    parallel = list(iter_tiles(reader, plan, block_tiles=3, workers=workers))
    np.testing.assert_array_equal(np.concatenate([i for i, _ in parallel]), np.arange(plan.n_tiles))
    np.testing.assert_array_equal(np.concatenate([t for _, t in parallel]), serial)


def test_overlap_tiles_share_pixels(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    img[:, :, 1] //= 3  # saturated everywhere: all tissue
    reader = ArraySlide(img, mpp=0.5)
    opts = TileOptions(tile_px=128, overlap_px=32, min_tissue_fraction=0.0, mask_mpp=4.0)
    plan = plan_slide(reader, opts)
    tiles = dict(
        zip(
            map(tuple, plan.colrow.tolist()),
            np.concatenate([t for _, t in iter_tiles(reader, plan)]),
            strict=True,
        )
    )
    np.testing.assert_array_equal(tiles[(0, 0)][:, 96:], tiles[(1, 0)][:, :32])
    np.testing.assert_array_equal(tiles[(1, 0)], img[0:128, 96:224])


def test_huge_slide_streams_in_bounded_memory() -> None:
    """A 100k x 100k (25 mm at 0.25 um/px) slide: peak Python memory stays far below one level."""
    spec = SyntheticSpec(
        width=100_000, height=100_000, mpp=0.25, tissue=(Ellipse(60_000, 40_000, 3000, 2500),),
        downsamples=(1, 4, 32),
    )  # fmt: skip
    reader = SyntheticSlide(spec)
    tracemalloc.start()
    try:
        plan = plan_slide(reader, TileOptions())
        n = sum(len(i) for i, _ in iter_tiles(reader, plan, workers=2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == plan.n_tiles > 50
    level0_bytes = 100_000 * 100_000 * 3
    assert peak < 400e6, f"peak {peak / 1e6:.0f} MB"  # vs 30,000 MB for level 0
    assert peak < level0_bytes / 75


# --- bad input leaves nothing behind ----------------------------------------------------------


def test_missing_mpp_without_override(nompp_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "n.zarr"
    with pytest.raises(ResolutionError, match=r"nompp\.tif.*--mpp"):
        tile_slide(nompp_slide.path, out)
    assert _no_output(out)
    rep = tile_slide(nompp_slide.path, out, TileOptions(mpp_override=0.5, chunk_tiles=8))
    assert (
        rep.mpp_source == "override" and open_tile_store(out).meta["resolution"]["mpp_source"] == "override"
    )


@pytest.mark.parametrize("bad", ["truncated_slide", "not_a_slide"])
def test_bad_slides_leave_no_store(
    bad: str, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(bad)
    out = tmp_path / "bad.zarr"
    with pytest.raises(SlideError, match=path.name.replace(".", r"\.")):
        tile_slide(path, out, SMALL_CHUNKS, backend=backend)
    assert _no_output(out)


def test_missing_path_leaves_no_store(tmp_path: Path) -> None:
    out = tmp_path / "m.zarr"
    with pytest.raises(SlideError, match="no such file"):
        tile_slide(tmp_path / "absent.svs", out)
    assert _no_output(out)


def test_no_tissue_is_an_error(tmp_path: Path) -> None:
    from testkit.synthetic import write_synthetic_slide

    p = write_synthetic_slide(tmp_path / "blank.svs", SyntheticSpec(width=1024, height=1024, mpp=0.5))
    out = tmp_path / "blank.zarr"
    with pytest.raises(TissueError, match=r"blank\.svs: no tissue tiles \(tissue covers 0\.0%"):
        tile_slide(p, out)
    assert _no_output(out)


@pytest.mark.realdata
def test_real_svs_tiles(backend: str, tmp_path: Path) -> None:
    path = shared("slides", "aperio", "CMU-1-Small-Region.svs")
    rep = tile_slide(path, tmp_path / "cmu.zarr", SMALL_CHUNKS, backend=backend)
    assert 40 <= rep.n_tiles <= 80  # about a third of the 9 x 13 grid is tissue
    store = open_tile_store(tmp_path / "cmu.zarr")
    reader = open_slide(path, backend)
    plan = plan_slide(reader, SMALL_CHUNKS)
    for i in (0, len(store) // 2, len(store) - 1):
        col, row = store.grid_colrow[i]
        np.testing.assert_array_equal(store.tiles[i], read_tile(reader, plan.grid, int(col), int(row)))


@pytest.mark.realdata
def test_real_corrupt_tile_slide_leaves_no_store(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "u.zarr"
    with pytest.raises(SlideError, match=r"unreadable\.svs"):
        tile_slide(shared("slides", "broken", "unreadable.svs"), out, backend=backend)
    assert _no_output(out)


@pytest.mark.realdata
def test_real_fluorescence_slide_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "f.zarr"
    with pytest.raises(SlideError, match="fluorescence"):
        tile_slide(shared("slides", "hamamatsu", "test3-TRITC-2-560.ndpi"), out)
    assert _no_output(out)


def test_read_error_midway_removes_partial_store(
    aperio_slide: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tile that cannot be decoded half-way through: clear error, no partial store left."""
    import wsi_pipeline.tiling.tiler as tiler

    real_open = tiler.open_slide

    class Flaky:
        def __init__(self, inner):  # type: ignore[no-untyped-def]
            self._inner, self.calls = inner, 0

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self._inner, name)

        def read_region(self, loc, level, size):  # type: ignore[no-untyped-def]
            if level == 0:
                self.calls += 1
                if self.calls > 2:
                    raise SlideError(f"{self._inner.path}: cannot read pixels (Bogus marker length)")
            return self._inner.read_region(loc, level, size)

    monkeypatch.setattr(tiler, "open_slide", lambda p, b="auto": Flaky(real_open(p, b)))
    out = tmp_path / "f.zarr"
    with pytest.raises(SlideError, match="Bogus marker"):
        tile_slide(aperio_slide.path, out, TileOptions(chunk_tiles=4, block_tiles=2, workers=1))
    assert _no_output(out)


# --- stain normalization in the store -----------------------------------------------------------

MACENKO = TileOptions(chunk_tiles=8, block_tiles=3, normalize="macenko", stain_fit_tiles=16)


def test_normalized_store_equals_slide_fit_applied_to_read_region(
    aperio_slide: Fixture, tmp_path: Path
) -> None:
    from wsi_pipeline.stain.macenko import REFERENCE, StainModel, apply_macenko

    out = tmp_path / "n.zarr"
    tile_slide(aperio_slide.path, out, MACENKO)
    store = open_tile_store(out)
    stain = store.meta["stain"]
    assert stain["fit_status"] == "fitted" and stain["fit_tiles"] == min(16, len(store))
    assert StainModel.from_dict(stain["reference"]) == REFERENCE
    source = StainModel.from_dict(stain["source"])
    assert source != REFERENCE
    reader = open_slide(aperio_slide.path)
    plan = plan_slide(reader, MACENKO)
    for i in (0, len(store) // 3, len(store) - 1):
        col, row = (int(v) for v in store.grid_colrow[i])
        expected = apply_macenko(read_tile(reader, plan.grid, col, row), source, REFERENCE)
        np.testing.assert_array_equal(store.tiles[i], expected)
    # Normalization moved the colours: the raw store differs.
    raw = tmp_path / "raw.zarr"
    tile_slide(aperio_slide.path, raw, SMALL_CHUNKS)
    assert np.abs(open_tile_store(raw).tiles[:8].astype(int) - store.tiles[:8]).mean() > 5


def test_normalized_resume_reuses_the_fitted_model(generic_slide: Fixture, tmp_path: Path) -> None:
    ref, out = tmp_path / "ref.zarr", tmp_path / "x.zarr"
    tile_slide(generic_slide.path, ref, MACENKO)

    def stop(done: int, total: int) -> None:
        if done >= total // 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        tile_slide(generic_slide.path, out, MACENKO, progress=stop)
    assert tile_slide(generic_slide.path, out, MACENKO).status == "resumed"
    a, b = open_tile_store(ref), open_tile_store(out)
    assert a.meta["stain"] == b.meta["stain"]
    np.testing.assert_array_equal(a.tiles[:], b.tiles[:])


def test_normalization_is_part_of_the_store_parameters(generic_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "p.zarr"
    tile_slide(generic_slide.path, out, SMALL_CHUNKS)
    with pytest.raises(StoreError, match="normalize: 'none' -> 'macenko'"):
        tile_slide(generic_slide.path, out, MACENKO)
