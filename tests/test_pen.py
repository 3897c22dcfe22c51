"""Marker-pen ink is left out of the tissue: a pen ring on the glass is not scored (the shipped model
called such ink tumour), while real H&E, including the bundled sample's own margin ink, is untouched."""

from __future__ import annotations

import colorsys
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import shared
from testkit.ink import write_inked_sample
from wsi_pipeline.cli import main
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.tiling.plan import SlidePlan, TileOptions, plan_slide
from wsi_pipeline.tiling.tissue import (
    PEN_HUES,
    TissueParams,
    hue_degrees,
    pen_mask,
    saturation,
    tissue_and_pen_masks,
)

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def inked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """The bundled real sample rewritten without ink, and with a blue and a green pen ring."""
    d = tmp_path_factory.mktemp("inked")
    return {c or "none": write_inked_sample(d / f"{c or 'none'}.svs", c) for c in (None, "blue", "green")}


def _plan(path: Path, pen_min_area_um2: float = TissueParams().pen_min_area_um2) -> SlidePlan:
    opts = TileOptions(tissue=TissueParams(pen_min_area_um2=pen_min_area_um2))
    return plan_slide(open_slide(path, "openslide"), opts)


def test_hue_degrees_is_the_hsv_hue() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = hue_degrees(rgb)
    for y, x in [(0, 0), (5, 7), (31, 40), (63, 63), (20, 50)]:
        h = colorsys.rgb_to_hsv(*(rgb[y, x] / 255.0))[0] * 360
        assert ours[y, x] == pytest.approx(h, abs=1e-3) or (
            h == 0 and ours[y, x] == pytest.approx(0, abs=1e-3)
        )


@pytest.mark.parametrize("colour", ["blue", "green"])
def test_a_pen_ring_on_the_glass_is_not_tissue(
    inked: dict[str, tuple[Path, np.ndarray]], colour: str
) -> None:
    clean = _plan(inked["none"][0])
    path, cover = inked[colour]
    with_filter, without = _plan(path), _plan(path, pen_min_area_um2=0)
    ds = clean.thumbnail.downsample

    def clean_tissue(plan: SlidePlan) -> np.ndarray:
        """The clean slide's tissue fraction under each of ``plan``'s tiles."""
        from wsi_pipeline.tiling.tissue import tissue_fraction_in_boxes

        boxes = plan.grid.boxes_l0(plan.colrow)
        return tissue_fraction_in_boxes(clean.mask, boxes, ds)

    # without the filter the ring's glass is tiled and scored: tiles with (almost) no tissue beneath
    assert (clean_tissue(without) < 0.05).sum() >= 10
    # with it, every kept tile has tissue beneath, as on the clean slide
    assert (clean_tissue(with_filter) < 0.05).sum() == 0
    assert with_filter.n_tiles >= clean.n_tiles - 8  # tissue under the ring may be left out, little else
    # the area reported is the ring where it lies on glass (and 24 um of its edge)
    thumb_cover = cover[:: int(ds), :: int(ds)][: clean.mask.shape[0], : clean.mask.shape[1]]
    on_glass_mm2 = ((thumb_cover > 0.5) & ~clean.mask).sum() * clean.thumbnail.mpp**2 / 1e6
    assert 0.7 * on_glass_mm2 <= with_filter.pen_marks_mm2 <= 1.6 * on_glass_mm2
    assert without.pen_marks_mm2 == 0.0


def test_real_slides_without_pen_marks_lose_nothing(inked: dict[str, tuple[Path, np.ndarray]]) -> None:
    """The bundled sample has real green margin ink along its edge, in threads thinner than a pen mark."""
    for path in (SAMPLE, inked["none"][0]):
        plan = _plan(path)
        assert plan.pen_px == 0
        assert plan.n_tiles == _plan(path, pen_min_area_um2=0).n_tiles


def test_a_blue_stain_over_most_of_the_tissue_is_left_as_tissue() -> None:
    """Blue or green over most of the tissue is a stain (not H&E), not pen: the filter stands back and
    the stain and OOD checks speak."""
    thumb = np.full((200, 200, 3), 245, np.uint8)
    thumb[30:170, 30:170] = (60, 90, 170)  # all the tissue is blue
    mask, pen = tissue_and_pen_masks(thumb, mpp=8.0)
    assert mask[30:170, 30:170].mean() > 0.95 and not pen.any()


def _thumb_8um(path: Path, mpp: float) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float32)
    f = max(1, round(8.0 / mpp))
    h, w = rgb.shape[0] // f * f, rgb.shape[1] // f * f
    return rgb[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)


@pytest.mark.realdata
def test_real_scanned_h_and_e_is_never_pen_coloured() -> None:
    """The pen hues (PEN_HUES) against every real scanned H&E source here, at the mask's 8 um/px:
    tissue pixels of those hues and saturations are rarer than 1 in 10,000, and tiled edge to edge into
    one picture (so pieces could join up) no piece reaches the pen filter's area."""
    sources = {
        "glas-colon": ("images/*/*.png", 0.62),
        "kather2016-samples": ("**/*.tif", 0.495),
        "monusac-lung": ("images/*", 0.25),
        "monuseg-lung": ("images/*", 0.25),
        "nct-crc-he-100k-samples": ("images/*", 0.5),
    }
    tissue_px = ink_px = 0
    glas: list[np.ndarray] = []
    for folder, (pattern, mpp) in sources.items():
        files = sorted(shared("tiles", folder).glob(pattern))
        assert files, folder
        for f in files:
            t = _thumb_8um(f, mpp)
            if t.size == 0:
                continue
            hue, sat = hue_degrees(t), saturation(t)
            tissue = (sat >= 0.07) & (t.max(axis=-1) >= 40)
            ink = np.zeros(t.shape[:2], bool)
            for lo, hi, min_sat in PEN_HUES:
                ink |= (hue >= lo) & (hue < hi) & (sat >= min_sat)
            tissue_px += int(tissue.sum())
            ink_px += int((ink & tissue).sum())
            if folder == "glas-colon":
                glas.append(t)
    assert tissue_px > 300_000
    print(f"pen-coloured tissue pixels: {ink_px} of {tissue_px}")
    assert ink_px / tissue_px < 1e-4, (ink_px, tissue_px)
    side = max(max(t.shape[0], t.shape[1]) for t in glas)
    cols = 13
    mosaic = np.full((side * (len(glas) // cols + 1), side * cols, 3), 245, np.uint8)
    for i, t in enumerate(glas):
        y, x = (i // cols) * side, (i % cols) * side
        mosaic[y : y + t.shape[0], x : x + t.shape[1]] = t
    assert not pen_mask(mosaic, mpp=8.0).any()


@pytest.mark.realdata
def test_real_slides_of_other_scanners_have_no_pen_marks() -> None:
    slide = shared("slides", "aperio", "tcga-cr-7395-01a-01-ts1.svs")  # no mpp in its metadata
    plan = plan_slide(open_slide(slide, "openslide"), TileOptions(mpp_override=0.25))
    assert plan.pen_px == 0


def test_the_run_says_how_much_ink_it_left_out(
    inked: dict[str, tuple[Path, np.ndarray]], tmp_path: Path
) -> None:
    res = CliRunner().invoke(main, [str(inked["blue"][0]), "--out", str(tmp_path / "b.tif"), "-q"])
    assert res.exit_code == 0, res.output
    tissue = json.loads((tmp_path / "b.run.json").read_text())["tissue"]
    assert tissue["pen_marks_mm2"] > 0.05
    assert (
        f"note: {tissue['pen_marks_mm2']:g} mm^2 of marker-pen ink was left out of the tissue" in res.output
    )
    assert "marker-pen ink left out of the tissue" in (tmp_path / "b.report.html").read_text()
    # for QuPath: the ink as locked annotations; for scripts: the tiles beside it
    geo = json.loads((tmp_path / "b.geojson").read_text())
    pens = [f for f in geo["features"] if f["properties"]["classification"]["name"] == "Pen ink"]
    assert pens and all(f["properties"]["isLocked"] for f in pens)
    assert sum(f["properties"]["measurements"]["Area mm^2"] for f in pens) >= tissue["pen_marks_mm2"]
    rows = list(csv.DictReader((tmp_path / "b.tiles.csv").open()))
    near = json.loads((tmp_path / "b.run.json").read_text())["label"]["evidence"]["pen"]
    assert sum(int(r["near_pen_ink"]) for r in rows) == near["tiles_near_ink"] > 0
    res = CliRunner().invoke(main, [str(inked["none"][0]), "--out", str(tmp_path / "n.tif"), "-q"])
    assert res.exit_code == 0 and "marker-pen" not in res.output
    assert json.loads((tmp_path / "n.run.json").read_text())["tissue"]["pen_marks_mm2"] == 0.0
    assert "near_pen_ink" not in (tmp_path / "n.tiles.csv").read_text().splitlines()[0]
    assert "Pen ink" not in (tmp_path / "n.geojson").read_text()


@pytest.mark.realdata
def test_blue_shifted_photographs_tiled_together_are_not_pen() -> None:
    """LC25000's camera photographs have the bluest hematoxylin here (1.4 % of their tissue pixels are
    of a pen's colour): 100 pictures of each class tiled edge to edge still form no pen piece."""
    images = shared("tiles", "lc25000-lung", "images")
    for cls in ("lung_aca", "lung_scc", "lung_n"):
        thumbs = [_thumb_8um(f, 0.5) for f in sorted(images.glob(f"**/{cls}/*.jpeg"))[:100]]
        assert len(thumbs) == 100, cls
        side, cols = max(t.shape[0] for t in thumbs), 10
        mosaic = np.full((side * 10, side * cols, 3), 245, np.uint8)
        for i, t in enumerate(thumbs):
            y, x = (i // cols) * side, (i % cols) * side
            mosaic[y : y + t.shape[0], x : x + t.shape[1]] = t
        assert not pen_mask(mosaic, mpp=8.0).any(), cls


def test_tiling_a_pen_marked_slide_says_so(inked: dict[str, tuple[Path, np.ndarray]], tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["tile", str(inked["green"][0]), "--out", str(tmp_path / "g.zarr")])
    assert res.exit_code == 0, res.output
    assert "(marker-pen ink left out: " in res.output
    res = CliRunner().invoke(main, ["info", str(inked["green"][0])])
    assert "marker-pen ink: " in res.output and "mm^2 left out of the tissue" in res.output


def test_tiles_beside_the_ink_are_counted_for_review(inked: dict[str, tuple[Path, np.ndarray]]) -> None:
    """Ink over tissue is still scored (it looks like hematoxylin): the evidence counts the scored
    tiles within 50 um of the ink left out, which are where the ring crosses the tissue."""
    from wsi_pipeline.pipeline import PEN_REACH_UM, RunOptions, _pen_ink
    from wsi_pipeline.tiling.source import open_source

    path, cover = inked["blue"]
    opts = RunOptions()
    source = open_source(path, opts.tile, "openslide")
    layout = source.layout
    boxes = layout.grid.boxes_l0(layout.colrow)
    positive = np.zeros(len(boxes), bool)
    positive[::2] = True
    pen = _pen_ink(layout, opts.tile.tissue, boxes)
    ev = {"tiles_near_ink": int(pen.near.sum()), "positive_tiles_near_ink": int((pen.near & positive).sum())}
    assert PEN_REACH_UM == 50.0 and len(pen.near) == len(boxes)
    # the ring's own geometry (level 0) says which tiles it passes through or beside
    ring = cover > 0.5
    mpp = layout.mpp_l0

    def ring_within(box: np.ndarray, um: float) -> bool:
        g = round(um / mpp)
        x0, y0, x1, y1 = (int(v) for v in box)
        return bool(ring[max(0, y0 - g) : y1 + g, max(0, x0 - g) : x1 + g].any())

    through = [ring_within(b, 0) for b in boxes]
    far = [not ring_within(b, 200) for b in boxes]
    assert sum(through) >= 5
    assert ev["tiles_near_ink"] >= sum(through) * 0.8  # the tiles the ring crosses are counted
    assert ev["tiles_near_ink"] <= len(boxes) - sum(far)  # tiles far from it are not
    assert 0 < ev["positive_tiles_near_ink"] <= ev["tiles_near_ink"]


def test_a_call_that_rests_only_on_tiles_beside_ink_is_flagged() -> None:
    from wsi_pipeline.cli.group import _Bars
    from wsi_pipeline.cli.score import _result_line

    def manifest(near_pos: int, pos: int) -> dict[str, object]:
        warning = "every tumour tile lies beside pen ink: ..." if near_pos == pos else None
        evidence = {"tumour_area_mm2": 0.05, "max_p": 0.99, "tiles": 40,
                    "pen": {"reach_um": 50.0, "tiles_near_ink": 6, "positive_tiles_near_ink": near_pos,
                            "positive_tiles": pos, "warning": warning}}  # fmt: skip
        return {"label": {"label": "tumour", "evidence": evidence}, "model": {"positive_class": "tumour"},
                "n_tiles": 40, "seconds": 1.0, "tiles_per_s": 40.0, "provider": "CPUExecutionProvider",
                "outputs": {}, "tissue": {"pen_marks_mm2": 0.2}}  # fmt: skip

    lines: list[str] = []
    bars = _Bars(enabled=False)
    bars.echo = lines.append  # type: ignore[method-assign]
    _result_line(Path("s.svs"), Path("r/s.tif"), manifest(3, 3), bars)
    assert "6 scored tiles lie within 50 um of it, 3 of them tumour" in lines[1]
    assert lines[2].startswith("s.svs: WARNING every tumour tile lies beside pen ink")
    lines.clear()
    _result_line(Path("s.svs"), Path("r/s.tif"), manifest(3, 5), bars)
    assert len(lines) == 2 and "WARNING" not in " ".join(lines)


def test_the_folder_summary_shows_which_slides_had_pen_ink(
    inked: dict[str, tuple[Path, np.ndarray]], tmp_path: Path
) -> None:
    import shutil

    from wsi_pipeline.io.report import folder_report_html

    src = tmp_path / "slides"
    src.mkdir()
    for name in ("blue", "none"):
        shutil.copy(inked[name][0], src / f"{name}.svs")
    res = CliRunner().invoke(main, [str(src), "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    rows = {Path(r["slide"]).stem: r for r in csv.DictReader((tmp_path / "out" / "summary.csv").open())}
    assert float(rows["blue"]["pen_mm2"]) > 0.05 and float(rows["none"]["pen_mm2"]) == 0.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "1 with marker-pen ink left out of the tissue (0 marked !" in page
    # a slide whose every positive tile lies beside ink is marked in the table
    row = {"slide": "s.svs", "label": "tumour", "positive": True, "pen_mm2": 0.3, "pen_warning": True}
    assert "0.3 !</td>" in folder_report_html([row])


def test_the_pen_warning_needs_every_positive_tile_beside_ink() -> None:
    from wsi_pipeline.aggregate import pen_evidence

    near = np.array([True, True, False, False])
    ev = pen_evidence(near, np.array([True, True, False, False]), positive_name="tumour", reach_um=50.0)
    assert (ev["tiles_near_ink"], ev["positive_tiles_near_ink"], ev["positive_tiles"]) == (2, 2, 2)
    assert ev["warning"].startswith("every tumour tile lies beside pen ink")
    ev = pen_evidence(near, np.array([True, False, True, False]), positive_name="tumour", reach_um=50.0)
    assert ev["warning"] is None and ev["positive_tiles_near_ink"] == 1
    ev = pen_evidence(near, np.zeros(4, bool), positive_name="tumour", reach_um=50.0)
    assert ev["warning"] is None  # nothing positive: nothing to blame on the ink
