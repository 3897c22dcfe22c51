"""One tile source, one identity (issue 15): each bug the redesign fixed, as a test that failed before.

* a slide replaced at the same path inside one process was read through the old, cached handle;
* a store tiled at another resolution than the model's was scored without complaint;
* a store re-tiled with other parameters at the same path kept the old results ("finished");
* a resumed store did not compare the recomputed plan with the tiles already written;
* at a non-integer downsample, tiles cut from block reads differed from ``read_region`` at their origin;
* with ``--overlap`` the heatmap cell was the tile's top-left stride square, not the square centred on it.
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import BACKENDS, Fixture, shared
from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide
from wsi_pipeline.errors import ModelError
from wsi_pipeline.evaluation.evaluate import evaluate_slide
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.io.tilestore import TileStoreWriter, open_tile_store, partial_path
from wsi_pipeline.pipeline import RunOptions, output_paths, run_slide
from wsi_pipeline.tiling.grid import level_to_l0
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.read import iter_tiles, read_tile
from wsi_pipeline.tiling.source import SlideSource, StoreSource, open_source
from wsi_pipeline.tiling.tiler import tile_slide


def _tiles_csv(manifest: dict) -> dict[str, np.ndarray]:
    with open(manifest["outputs"]["tiles_csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]} if rows else {}


def _spec(tumour_x: int, seed: int) -> SyntheticSpec:
    return SyntheticSpec(
        width=2048, height=1536, mpp=0.5, tissue=(Ellipse(1024, 768, 900, 650),),
        tumour=(Ellipse(tumour_x, 768, 330, 300),), downsamples=(1, 4), seed=seed,
    )  # fmt: skip


def test_slide_replaced_at_the_same_path_is_read_anew(tmp_path: Path, test_model: Path) -> None:
    """Worker threads cached slide handles by path: the second run read the old file's pixels."""
    left, right = _spec(600, 5), _spec(1450, 6)
    reference = write_synthetic_slide(tmp_path / "reference.svs", right)
    opts = RunOptions(backend="tiffslide", workers=2, chunk_tiles=16)
    expected = _tiles_csv(run_slide(reference, tmp_path / "ref" / "r.tif", model=test_model, options=opts))

    path = tmp_path / "case.svs"
    write_synthetic_slide(path, left)
    first = _tiles_csv(run_slide(path, tmp_path / "a" / "case.tif", model=test_model, options=opts))
    write_synthetic_slide(tmp_path / "next.svs", right).replace(path)  # a re-export lands on the same path
    second = _tiles_csv(run_slide(path, tmp_path / "b" / "case.tif", model=test_model, options=opts))

    assert not np.allclose(first["p_tumour"], expected["p_tumour"])  # the two slides differ
    np.testing.assert_array_equal(second["x_l0"], expected["x_l0"])
    np.testing.assert_allclose(second["p_tumour"], expected["p_tumour"], atol=1e-6)


def test_store_at_another_resolution_than_the_model_is_refused(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "coarse.zarr"
    tile_slide(tumour_slide.path, store, TileOptions(target_mpp=2.0))
    with pytest.raises(ModelError, match=r"2 um/px.*trained at 0.5 um/px"):
        run_slide(store, tmp_path / "out.tif", model=test_model)
    assert not output_paths(tmp_path / "out.tif")["manifest"].exists()


def test_retiled_store_is_scored_again_not_skipped(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    store, out = tmp_path / "s.zarr", tmp_path / "out" / "s.tif"
    tile_slide(tumour_slide.path, store, TileOptions())
    first = run_slide(store, out, model=test_model)
    tile_slide(tumour_slide.path, store, TileOptions(min_tissue_fraction=0.9), overwrite=True)
    second = run_slide(store, out, model=test_model)
    n_store = len(open_tile_store(store))
    assert n_store < first["n_tiles"]
    assert not second.get("skipped") and second["n_tiles"] == n_store
    assert second["params"]["source"] != first["params"]["source"]
    assert len(_tiles_csv(second)["x_l0"]) == n_store
    # Unchanged store: the finished run is recognised and skipped.
    assert run_slide(store, out, model=test_model).get("skipped")


def test_source_identity_covers_content_and_every_tiling_parameter(
    tumour_slide: Fixture, benign_slide: Fixture, tmp_path: Path
) -> None:
    a = SlideSource(tumour_slide.path, TileOptions())
    assert a.identity == SlideSource(tumour_slide.path, TileOptions()).identity
    assert a.identity != SlideSource(benign_slide.path, TileOptions()).identity
    assert a.identity != SlideSource(tumour_slide.path, TileOptions(min_tissue_fraction=0.5)).identity
    assert a.identity != SlideSource(tumour_slide.path, TileOptions(overlap_px=32)).identity
    store = tmp_path / "t.zarr"
    tile_slide(tumour_slide.path, store, TileOptions())
    s = open_source(store, TileOptions(min_tissue_fraction=0.99))  # a store keeps its own tiles
    assert isinstance(s, StoreSource) and s.layout.n_tiles == len(open_tile_store(store))
    assert s.identity != a.identity and s.slide_path == tumour_slide.path.resolve()


def test_resume_with_another_plan_starts_over_instead_of_mixing_layouts(
    tumour_slide: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_pipeline.tiling.plan as plan_module

    out = tmp_path / "r.zarr"
    opts = TileOptions(chunk_tiles=16)
    calls = {"n": 0}
    real_write = TileStoreWriter.write_chunk

    def interrupted(self: TileStoreWriter, k: int, tiles: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt  # killed after two chunks
        real_write(self, k, tiles)

    monkeypatch.setattr(TileStoreWriter, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tile_slide(tumour_slide.path, out, opts)
    monkeypatch.setattr(TileStoreWriter, "write_chunk", real_write)
    assert partial_path(out).exists()

    # Same parameters, another tissue mask (as another scikit-image version might compute).
    real_masks = plan_module.tissue_and_pen_masks

    def shifted(*a: Any, **k: Any) -> tuple[np.ndarray, np.ndarray]:
        mask, pen = real_masks(*a, **k)
        return np.roll(mask, 7, axis=1), pen

    monkeypatch.setattr(plan_module, "tissue_and_pen_masks", shifted)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tile_slide(tumour_slide.path, out, opts)
    assert any("starts over" in str(w.message) for w in caught)

    store = open_tile_store(out)
    reader = open_slide(tumour_slide.path)
    plan = plan_slide(reader, opts)
    np.testing.assert_array_equal(store.grid_colrow, plan.colrow)
    tiles = np.asarray(store.tiles[:])
    for i in range(0, len(store), max(1, len(store) // 12)):  # tiles are where the store says they are
        np.testing.assert_array_equal(tiles[i], read_tile(reader, plan.grid, *store.grid_colrow[i]))
    reader.close()


# 2051 x 1541 with a level of ceil(size / 2): downsample (2051/1026 + 1541/771) / 2 = 1.9988..., which
# is where a 0.25 um/px slide is read for a 0.5 um/px model.
ODD_SPEC = SyntheticSpec(
    width=2051, height=1541, mpp=0.25, tissue=(Ellipse(1000, 760, 900, 700),), downsamples=(1, 2, 8), seed=4
)


def _assert_tiles_equal_read_region(path: Path, backend: str, opts: TileOptions) -> None:
    reader = open_slide(path, backend)
    plan = plan_slide(reader, opts)
    grid = plan.grid
    assert grid.level > 0 and abs(grid.level_downsample - round(grid.level_downsample)) > 1e-6
    idx = np.arange(min(40, plan.n_tiles))
    tiles = np.concatenate([t for _, t in iter_tiles(reader, plan, idx, workers=1)])
    for i in idx:
        x, y = (int(v) for v in plan.coords_l0[i])
        ref = reader.read_region((x, y), grid.level, (grid.read_px, grid.read_px))
        np.testing.assert_array_equal(tiles[i], ref, err_msg=f"{backend} tile {i} at ({x}, {y})")
    reader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_equal_read_region_at_a_non_integer_downsample(tmp_path: Path, backend: str) -> None:
    path = write_synthetic_slide(tmp_path / "odd.svs", ODD_SPEC)
    _assert_tiles_equal_read_region(path, backend, TileOptions())


@pytest.mark.realdata
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_equal_read_region_on_the_tcga_section(backend: str) -> None:
    """The real TCGA-CR section: level 1 at downsample 2.0005 (read there with --mpp 0.25)."""
    path = shared("slides", "aperio", "tcga-cr-7395-01a-01-ts1.svs")
    _assert_tiles_equal_read_region(path, backend, TileOptions(mpp_override=0.25))


def test_trunc_rule_gives_the_first_level0_location_of_each_level_pixel() -> None:
    ds = 2.0005055500659967
    v = np.arange(1, 5000)
    l0 = level_to_l0(v, ds, "trunc")
    assert np.array_equal((l0 / ds).astype(np.int64), v)  # what tiffslide computes maps back exactly
    assert np.all(((l0 - 1) / ds).astype(np.int64) < v)  # and it is the first such location
    assert np.array_equal(level_to_l0(v, 4.0, "trunc"), v * 4)


def test_overlap_heatmap_cells_are_centred_on_their_tiles(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Truth drawn exactly as the centred cells of the positive tiles must score Dice 1."""
    opts = RunOptions(tile=TileOptions(overlap_px=96))
    m = run_slide(tumour_slide.path, tmp_path / "o" / "t.tif", model=test_model, options=opts)
    grid, heat = m["grid"], m["heatmap"]
    tile_l0, stride_l0 = grid["tile_l0_px"], grid["stride_l0_px"]
    assert heat["origin_l0"] == pytest.approx((tile_l0 - stride_l0) / 2) and heat["origin_l0"] > 0
    tiles = _tiles_csv(m)
    threshold = float(m["params"]["label"]["tile_threshold"])
    pos = tiles["p_tumour"] >= threshold
    assert 0 < pos.sum() < len(pos)
    o = heat["origin_l0"]
    # Cell centres are the tile centres.
    x0 = tiles["x_l0"][pos] + o
    y0 = tiles["y_l0"][pos] + o
    cells = [
        f'<Annotation Name="t{i}" Type="Polygon" PartOfGroup="tumor"><Coordinates>'
        + "".join(
            f'<Coordinate Order="{j}" X="{cx}" Y="{cy}"/>'
            for j, (cx, cy) in enumerate(
                [(x, y), (x + stride_l0, y), (x + stride_l0, y + stride_l0), (x, y + stride_l0)]
            )
        )
        + "</Coordinates></Annotation>"
        for i, (x, y) in enumerate(zip(x0, y0, strict=True))
    ]
    xml = tmp_path / "truth.xml"
    xml.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>' + "".join(cells) + "</Annotations>"
        '<AnnotationGroups><Group Name="tumor" PartOfGroup="None" Color="#ff0000"/></AnnotationGroups>'
        "</ASAP_Annotations>"
    )
    result = evaluate_slide(output_paths(tmp_path / "o" / "t.tif")["manifest"], xml, threshold=threshold)
    assert result["dice"] == pytest.approx(1.0)
    # The tile centre of a positive tile falls in a positive heatmap cell of the written TIFF too.
    import tifffile

    with tifffile.TiffFile(tmp_path / "o" / "t.tif") as tf:
        desc = json.loads(tf.pages[0].description)
    assert desc["origin_l0"] == [pytest.approx(o), pytest.approx(o)]
    shutil.rmtree(tmp_path / "o")
