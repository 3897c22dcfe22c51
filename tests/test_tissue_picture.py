"""The overlay, the slide page's picture and the evaluation page show the tissue when it is small on the
glass (a biopsy): 1000 px for the whole slide left a needle core a few dozen pixels wide.

The slide here is synthetic (8,000 x 6,000 px at 0.5 um/px, one small tissue piece with a tumour
focus, levels 1/4/16): the picture is then the tissue and a margin, and every drawing on it (heatmap
cells, the model's outlines, the expert's outline on the evaluation page) is placed by its recorded
level-0 origin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide
from wsi_pipeline.cli import main
from wsi_pipeline.evaluation.annotations import write_asap_xml
from wsi_pipeline.evaluation.evaluate import truth_picture

BIOPSY = SyntheticSpec(
    width=8000, height=6000, mpp=0.5, tissue=(Ellipse(2500, 4000, 700, 420),),
    tumour=(Ellipse(2600, 4000, 300, 220),), downsamples=(1, 4, 16), seed=11,
)  # fmt: skip


@pytest.fixture(scope="module")
def biopsy_run(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("biopsy")
    slide = write_synthetic_slide(d / "biopsy.svs", BIOPSY)
    out = d / "out"
    r = CliRunner().invoke(main, [str(slide), "--out", f"{out}/", "--model", str(test_model), "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_a_small_piece_of_tissue_is_pictured_large(biopsy_run: Path) -> None:
    m = json.loads((biopsy_run / "biopsy.run.json").read_text())
    ov = m["heatmap"]["overlay"]
    assert ov["background"] == "slide (tissue)"
    whole = max(BIOPSY.width, BIOPSY.height) / 1000
    assert ov["l0_per_px"] < whole / 2.5  # the tissue at more than 2.5x the size it had
    x0, y0 = ov["origin_l0"]
    tiles = np.genfromtxt(biopsy_run / "biopsy.tiles.csv", delimiter=",", names=True)
    assert x0 <= tiles["x_l0"].min() and y0 <= tiles["y_l0"].min()
    picture_w = ov["slide_px"][0] * ov["l0_per_px"]
    assert x0 + picture_w >= (tiles["x_l0"] + tiles["width_l0"]).max()
    assert "The tissue: the slide cut to it" in (biopsy_run / "biopsy.report.html").read_text()


def test_heatmap_cells_sit_on_their_tiles_in_the_cropped_picture(biopsy_run: Path) -> None:
    """The highest-P tile's centre is coloured red in the overlay, the lowest-P tile's centre is not."""
    m = json.loads((biopsy_run / "biopsy.run.json").read_text())
    ov = m["heatmap"]["overlay"]
    img = np.asarray(Image.open(biopsy_run / "biopsy.overlay.png").convert("RGB")).astype(int)
    tiles = np.genfromtxt(biopsy_run / "biopsy.tiles.csv", delimiter=",", names=True)
    x0, y0 = ov["origin_l0"]

    def at(i: int) -> np.ndarray:
        cx = tiles["x_l0"][i] + tiles["width_l0"][i] / 2
        cy = tiles["y_l0"][i] + tiles["height_l0"][i] / 2
        return img[int((cy - y0) / ov["l0_per_px"]), int((cx - x0) / ov["l0_per_px"])]

    hi, lo = int(np.argmax(tiles["p_tumour"])), int(np.argmin(tiles["p_tumour"]))
    assert tiles["p_tumour"][hi] > 0.9 and tiles["p_tumour"][lo] < 0.2
    r, g, b = at(hi)
    assert r > g + 40 and r > b + 40, at(hi)  # the ramp's red, blended over the slide
    r, g, b = at(lo)
    assert not (r > g + 40 and r > b + 40), at(lo)


def test_the_evaluation_picture_outlines_the_truth_on_the_cropped_overlay(
    biopsy_run: Path, tmp_path: Path
) -> None:
    ann = write_asap_xml(tmp_path / "biopsy.xml", [("Tumor", e.polygon(96)) for e in BIOPSY.tumour])
    pic = truth_picture(biopsy_run / "biopsy.run.json", ann, long_side_px=4000)
    assert pic is not None
    ov = json.loads((biopsy_run / "biopsy.run.json").read_text())["heatmap"]["overlay"]
    ys, xs = np.nonzero((pic[..., 0] < 40) & (pic[..., 1] > 200) & (pic[..., 2] > 230))
    assert len(xs) > 100
    x0, y0 = ov["origin_l0"]
    lx, ly = xs * ov["l0_per_px"] + x0, ys * ov["l0_per_px"] + y0
    e = BIOPSY.tumour[0]
    radial = np.hypot((lx - e.cx) / e.rx, (ly - e.cy) / e.ry)  # 1 on the ellipse
    assert np.abs(radial - 1).max() < 0.05


def test_a_slide_whose_tissue_fills_it_is_pictured_whole(
    tumour_slide: object, test_model: Path, tmp_path: Path
) -> None:
    r = CliRunner().invoke(
        main, [str(tumour_slide.path), "--out", f"{tmp_path}/", "--model", str(test_model), "-q"]
    )  # type: ignore[attr-defined]
    assert r.exit_code == 0, r.output
    ov = json.loads((tmp_path / "tumour.run.json").read_text())["heatmap"]["overlay"]
    assert ov["background"] == "slide" and ov["origin_l0"] == [0.0, 0.0]


def test_scoring_the_slides_tile_store_pictures_the_same_tissue(
    biopsy_run: Path, test_model: Path, tmp_path: Path
) -> None:
    slide = biopsy_run.parent / "biopsy.svs"
    store = tmp_path / "biopsy.zarr"
    assert CliRunner().invoke(main, ["tile", str(slide), "--out", str(store), "-q"]).exit_code == 0
    r = CliRunner().invoke(
        main, [str(store), "--out", str(tmp_path / "b.tif"), "--model", str(test_model), "-q"]
    )
    assert r.exit_code == 0, r.output
    from_store = json.loads((tmp_path / "b.run.json").read_text())["heatmap"]["overlay"]
    from_slide = json.loads((biopsy_run / "biopsy.run.json").read_text())["heatmap"]["overlay"]
    assert from_store == from_slide


def test_a_crop_that_cannot_be_read_falls_back_to_the_whole_slide(
    biopsy_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_pipeline.tiling.pictures as pictures
    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.tiling.plan import TileOptions
    from wsi_pipeline.tiling.source import open_source

    source = open_source(biopsy_run.parent / "biopsy.svs", TileOptions(), picture_px=1000)
    assert pictures.slide_picture(source, 1000).origin == "slide (tissue)"

    def damaged(*a: object, **k: object) -> None:
        raise SlideError("biopsy.svs: cannot read pixels (Corrupt JPEG data)")

    monkeypatch.setattr(pictures, "_tissue_picture", damaged)
    whole = pictures.slide_picture(source, 1000)
    assert whole.origin == "slide" and whole.origin_l0 == (0.0, 0.0)
