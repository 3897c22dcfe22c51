"""Benchmark slides composed from labelled tiles: exact truth, readable pyramids, matching ASAP XML.

Tests marked ``realdata`` use the LC25000 lung tiles of the shared data folder and skip with a reason
when it is absent; the others compose slides from small synthetic tiles written into a temp folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from testkit.benchslides import (
    GLASS_RGB,
    BenchRenderer,
    BenchSlideSpec,
    PhotoPool,
    orient,
    random_spec,
    write_bench_slide,
)
from wsi_pipeline.evaluation.annotations import read_asap_xml

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LC25000_INDEX = DATA / "tiles" / "lc25000-lung" / "index.csv"
REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("openslide", "tiffslide")


def lc25000_index() -> Path:
    if not LC25000_INDEX.is_file():
        pytest.skip(f"real data not available: {LC25000_INDEX} (the shared data folder is absent)")
    return LC25000_INDEX


def heldout_test_groups(index: Path) -> list[str]:
    """The classifier's held-out test groups: the split of models/split.py with the card's seed."""
    from models.split import read_index, split_groups

    card = json.loads((REPO / "models" / "tumour-cnn.json").read_text())["data"]["split"]
    rows = read_index(index)
    parts = split_groups([r.group for r in rows], [r.label for r in rows], card["fractions"], card["seed"])
    return parts["test"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_points(geom: object, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` integer level-0 pixels whose centres lie inside ``geom`` (shapely)."""
    import shapely

    x0, y0, x1, y1 = geom.bounds  # type: ignore[attr-defined]
    xs = rng.integers(int(x0), int(x1) + 1, 20 * n)
    ys = rng.integers(int(y0), int(y1) + 1, 20 * n)
    inside = shapely.contains_xy(geom, xs + 0.5, ys + 0.5)
    return [(int(x), int(y)) for x, y in zip(xs[inside][:n], ys[inside][:n], strict=True)]


# --- a small index of synthetic tiles (lossless PNG), so construction is checked without real data ---


@pytest.fixture(scope="module")
def fake_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake-tiles")
    rng = np.random.default_rng(5)
    rows = []
    for kind, base, tumour in (("benign", (225, 160, 200), 0), ("tumour", (140, 90, 200), 1)):
        for i in range(6):
            img = np.clip(np.asarray(base) + rng.normal(0, 6, (224, 224, 3)), 0, 255).astype(np.uint8)
            img[:8, :16] = (i * 40, 255 - i * 40, 0)  # a corner mark: orientation is visible
            name = f"{kind}{i}.png"
            Image.fromarray(img).save(root / name)
            rows.append({"path": name, "label": kind, "tumour": tumour, "group": f"{kind}-g{i // 2}"})
    index = root / "index.csv"
    with index.open("w", newline="") as fh:
        w = csv.DictWriter(fh, ["path", "label", "tumour", "group"])
        w.writeheader()
        w.writerows(rows)
    return index


SMALL = BenchSlideSpec(
    width=1300,
    height=1000,
    tissue=(((60, 80), (1240, 60), (1200, 950), (100, 900)),),
    tumour=(((400, 300), (900, 280), (950, 700), (420, 720)),),
    exclusion=(((600, 450), (700, 450), (700, 560), (600, 560)),),
    downsamples=(1, 4, 16),
    seed=3,
)


# --- geometry and layout -------------------------------------------------------------------------


def test_polygon_mask_is_exact_at_pixel_centres() -> None:
    import shapely

    spec = random_spec(2048, 1536, seed=11, n_tumour=2, with_exclusion=True)
    tissue, tumour = spec.masks(0, 0, spec.width, spec.height)
    yy, xx = np.mgrid[0 : spec.height, 0 : spec.width]
    truth = shapely.contains_xy(spec.tumour_geometry(), xx.ravel() + 0.5, yy.ravel() + 0.5)
    assert np.array_equal(tumour.ravel(), truth)
    tissue_truth = shapely.contains_xy(spec.tissue_geometry(), xx.ravel() + 0.5, yy.ravel() + 0.5)
    assert np.array_equal(tissue.ravel(), tissue_truth)
    # windows agree with the whole
    assert np.array_equal(spec.masks(300, 200, 257, 129)[1], tumour[200:329, 300:557])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_spec_layout(seed: int) -> None:
    from shapely import Polygon

    spec = random_spec(4096, 3072, seed=seed, with_exclusion=True)
    assert spec == random_spec(4096, 3072, seed=seed, with_exclusion=True)
    assert 1 <= len(spec.tissue) <= 2 and 1 <= len(spec.tumour) <= 3 and len(spec.exclusion) == 1
    tissue = spec.tissue_geometry()
    assert tissue.area / (spec.width * spec.height) > 0.3
    x0, y0, x1, y1 = tissue.bounds
    assert x0 > 0 and y0 > 0 and x1 < spec.width and y1 < spec.height
    for t in spec.tumour:
        assert Polygon(t).is_valid and tissue.contains(Polygon(t))
    assert Polygon(spec.tumour[0]).contains(Polygon(spec.exclusion[0]))
    assert spec.tumour_geometry().area < Polygon(spec.tumour[0]).area + sum(
        Polygon(t).area for t in spec.tumour[1:]
    )


def test_random_spec_variants() -> None:
    assert random_spec(4096, 4096, seed=1) != random_spec(4096, 4096, seed=2)
    benign = random_spec(4096, 4096, seed=1, n_tumour=0)
    assert benign.tumour == () and benign.exclusion == () and benign.tissue
    assert len(random_spec(6000, 3000, seed=4, n_tumour=3, n_tissue=2).tissue) == 2
    with pytest.raises(ValueError, match="exclusion"):
        random_spec(4096, 4096, seed=1, n_tumour=0, with_exclusion=True)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="divide tile_px"):
        BenchSlideSpec(width=512, height=512, downsamples=(1, 3))
    with pytest.raises(ValueError, match="starting at 1"):
        BenchSlideSpec(width=512, height=512, downsamples=(2, 4))
    with pytest.raises(ValueError, match="3 vertices"):
        BenchSlideSpec(width=512, height=512, tissue=(((0, 0), (10, 10)),))


# --- texture source ------------------------------------------------------------------------------


def test_missing_index_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "index.csv"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        write_bench_slide(tmp_path / "s.svs", SMALL, missing)
    assert not (tmp_path / "s.svs").exists()


def test_groups_restrict_the_source(fake_index: Path) -> None:
    src = PhotoPool.from_index(fake_index, groups=["benign-g1", "tumour-g2"])
    assert {t.group for t in src.benign} == {"benign-g1"} and {t.group for t in src.tumour} == {"tumour-g2"}
    with pytest.raises(ValueError, match="not in the index"):
        PhotoPool.from_index(fake_index, groups=["benign-g1", "no-such-group"])
    only_benign = PhotoPool.from_index(fake_index, groups=["benign-g0"])
    with pytest.raises(ValueError, match="no tumour tiles"):
        BenchRenderer(SMALL, only_benign)


def test_lru_cache_is_bounded(fake_index: Path) -> None:
    src = PhotoPool.from_index(fake_index, cache_tiles=3)
    for t in (*src.benign, *src.benign):
        src.load(t)
    assert len(src._cache) == 3 and src.loads == 12  # 6 tiles cycled through 3 slots: no hit


def test_bad_source_tile_leaves_nothing_behind(tmp_path: Path) -> None:
    rows = []
    for name, tumour, px in (("b.png", 0, 224), ("t.png", 1, 100)):
        Image.fromarray(np.full((px, px, 3), 200, np.uint8)).save(tmp_path / name)
        rows.append(f"{name},x,{tumour},g{tumour}")
    index = tmp_path / "index.csv"
    index.write_text("path,label,tumour,group\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"t\.png: source tile is 100x100"):
        write_bench_slide(out / "s.svs", SMALL, index)
    assert list(out.iterdir()) == []  # no partial slide, no temporary level files


# --- composition by construction -----------------------------------------------------------------


def test_every_pixel_comes_from_its_source(fake_index: Path) -> None:
    src = PhotoPool.from_index(fake_index)
    r = BenchRenderer(SMALL, src)
    img = r.render(0, 0, SMALL.width, SMALL.height)
    tissue, tumour = SMALL.masks(0, 0, SMALL.width, SMALL.height)
    rng = np.random.default_rng(0)
    pts = list(zip(rng.integers(0, SMALL.width, 3000), rng.integers(0, SMALL.height, 3000), strict=True))
    pts += [(96, 500), (97, 500), (320, 60), (321, 61)]  # around the source grid's first seams
    for x, y in pts:
        kind, tile, code, u, v = r.source_at(int(x), int(y))
        assert kind == ("tumour" if tumour[y, x] else "benign" if tissue[y, x] else "glass")
        if tile is None:
            assert np.abs(img[y, x].astype(int) - GLASS_RGB).max() <= 6
        else:
            assert tile.label == kind
            assert np.array_equal(img[y, x], orient(src.load(tile), code)[v, u])
    # the source grid is offset from the tiler's (origin 0, 0, 224 px): cells start at 97 + 224 k
    assert r.cell(96, 0)[0] != r.cell(97, 0)[0] and r.cell(97, 0)[2] == 97
    assert r.cell(0, 60)[1] != r.cell(0, 61)[1] and r.cell(0, 61)[3] == 61


def test_written_pyramid_and_xml(fake_index: Path, tmp_path: Path) -> None:
    import tiffslide
    from shapely import Polygon

    slide, xml = write_bench_slide(tmp_path / "small.svs", SMALL, fake_index)
    assert slide.exists() and xml == tmp_path / "small.xml"
    info = json.loads((tmp_path / "small.bench.json").read_text())
    assert info["spec"]["seed"] == 3 and info["source"]["tumour_tiles"] == 6
    render = BenchRenderer(SMALL, PhotoPool.from_index(fake_index)).render(0, 0, SMALL.width, SMALL.height)
    with tiffslide.TiffSlide(slide) as s:
        assert s.level_dimensions == ((1300, 1000), (325, 250), (82, 63))
        l0 = np.asarray(s.read_region((0, 0), 0, (1300, 1000)).convert("RGB"), np.float64)
        l1 = np.asarray(s.read_region((0, 0), 1, (325, 250)).convert("RGB"), np.float64)
    assert np.abs(l0 - render).mean() < 4  # JPEG q90 of the exact render
    block = render[:1000, :1300].reshape(250, 4, 325, 4, 3).mean(axis=(1, 3))
    assert np.abs(l1 - block).mean() < 3  # lower levels: block means of level 0
    ann = read_asap_xml(xml)
    assert ann.groups == {"Tumor": 1, "_2": 1}
    assert ann.positive.symmetric_difference(Polygon(SMALL.tumour[0])).area == 0
    assert ann.tumour.area == pytest.approx(Polygon(SMALL.tumour[0]).area - 100 * 110)


def test_deterministic_for_a_seed(fake_index: Path, tmp_path: Path) -> None:
    spec = random_spec(1024, 768, seed=7, downsamples=(1, 4))
    a, ax = write_bench_slide(tmp_path / "a.svs", spec, fake_index)
    b, bx = write_bench_slide(tmp_path / "b.svs", spec, fake_index)
    c, _ = write_bench_slide(
        tmp_path / "c.svs", random_spec(1024, 768, seed=8, downsamples=(1, 4)), fake_index
    )
    assert sha(a) == sha(b) and ax.read_bytes() == bx.read_bytes()
    assert sha(a) != sha(c)


def test_benign_slide_has_empty_truth(fake_index: Path, tmp_path: Path) -> None:
    spec = random_spec(1024, 1024, seed=2, n_tumour=0, downsamples=(1, 4))
    _, xml = write_bench_slide(tmp_path / "benign.svs", spec, fake_index)
    ann = read_asap_xml(xml)
    assert ann.tumour.is_empty and ann.groups == {}


# --- real LC25000 tiles --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, BenchSlideSpec, list[str]]:
    index = lc25000_index()
    groups = heldout_test_groups(index)
    spec = random_spec(3072, 2560, seed=21, n_tumour=2, with_exclusion=True)
    slide, xml = write_bench_slide(tmp_path_factory.mktemp("bench") / "real.svs", spec, index, groups=groups)
    return slide, xml, spec, groups


@pytest.mark.realdata
@pytest.mark.parametrize("backend", BACKENDS)
def test_real_slide_opens_as_aperio(
    real_slide: tuple[Path, Path, BenchSlideSpec, list[str]], backend: str
) -> None:
    from wsi_pipeline.io.slide import open_slide, resolve_mpp

    slide, _, spec, _ = real_slide
    r = open_slide(slide, backend)
    try:
        assert r.backend == backend and r.vendor == "aperio"
        assert resolve_mpp(r).mpp == pytest.approx(spec.mpp)
        assert r.level_dimensions == ((3072, 2560), (768, 640), (192, 160))
        assert r.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    finally:
        r.close()


@pytest.mark.realdata
def test_real_slide_pixels_follow_the_truth(real_slide: tuple[Path, Path, BenchSlideSpec, list[str]]) -> None:
    import openslide

    slide, _, spec, groups = real_slide
    src = PhotoPool.from_index(LC25000_INDEX, groups=groups)
    renderer = BenchRenderer(spec, src)
    rng = np.random.default_rng(1)
    deep_tumour = spec.tumour_geometry().buffer(-40)
    benign_area = spec.tissue_geometry().difference(spec.tumour_geometry()).buffer(-40)
    held_out = set(groups)
    with openslide.OpenSlide(slide) as s:
        l0 = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    # By construction: well inside the tumour every pixel is a tumour tile's pixel (LC25000 aca/scc
    # from a held-out group), reproduced by the renderer, and the file holds it up to JPEG error.
    for x, y in sample_points(deep_tumour, rng, 200):
        kind, tile, code, u, v = renderer.source_at(x, y)
        assert kind == "tumour" and tile is not None and tile.label in ("lung_aca", "lung_scc")
        assert tile.group in held_out
        expected = orient(src.load(tile), code)[v, u].astype(int)
        assert np.abs(l0[max(0, y - 3) : y + 4, max(0, x - 3) : x + 4].astype(int) - expected).min() <= 12
    render = renderer.render(0, 0, spec.width, spec.height)
    assert np.abs(l0.astype(np.float64) - render).mean() < 4
    # Statistics: LC25000 tumour is bluer and less red than benign lung.
    tissue, tumour = spec.masks(0, 0, spec.width, spec.height)
    t_mean = l0[tumour].mean(axis=0)
    b_mean = l0[tissue & ~tumour].mean(axis=0)
    assert t_mean[0] < b_mean[0] - 20 and t_mean[2] > b_mean[2] + 10
    for x, y in sample_points(benign_area, rng, 50):
        assert renderer.source_at(x, y)[0] == "benign"
    # Glass outside the tissue: near-white, a little noise.
    glass = l0[~tissue]
    assert np.abs(glass.mean(axis=0) - GLASS_RGB).max() < 3 and glass.std(axis=0).max() < 4


@pytest.mark.realdata
def test_real_slide_xml_round_trips(real_slide: tuple[Path, Path, BenchSlideSpec, list[str]]) -> None:
    from shapely import Polygon, union_all

    _, xml, spec, _ = real_slide
    ann = read_asap_xml(xml)
    assert ann.groups == {"Tumor": len(spec.tumour), "_2": len(spec.exclusion)}
    positive = union_all([Polygon(p) for p in spec.tumour])
    assert ann.positive.area == pytest.approx(positive.area, rel=1e-3)
    assert ann.positive.symmetric_difference(positive).area < 1e-3 * positive.area
    assert ann.exclusion.area == pytest.approx(Polygon(spec.exclusion[0]).area, rel=1e-3)
    # the exclusion (group _2) is cut out of what predictions are scored against
    assert ann.tumour.area == pytest.approx(positive.area - ann.exclusion.area, rel=1e-3)
    assert ann.tumour.symmetric_difference(spec.tumour_geometry()).area < 1e-3 * ann.tumour.area


@pytest.mark.realdata
def test_tiler_finds_the_tissue(real_slide: tuple[Path, Path, BenchSlideSpec, list[str]]) -> None:
    from wsi_pipeline.io.slide import open_slide
    from wsi_pipeline.tiling.plan import TileOptions, plan_slide

    slide, _, spec, _ = real_slide
    r = open_slide(slide)
    try:
        plan = plan_slide(r, TileOptions())
    finally:
        r.close()
    truth = spec.tissue_geometry().area / (spec.width * spec.height)
    assert plan.slide_tissue_fraction == pytest.approx(truth, abs=0.05)
    assert plan.grid.tile_l0_px == 224 and plan.n_tiles > 0
