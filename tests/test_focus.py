"""The focus check: each tile's focus score and the slide's out-of-focus warning, on the real bundled
scan as it is, blurred (testkit.defocus: a Gaussian over level 0, stored as JPEG like a scanner's
tiles) and as if scanned at 1 um/px."""

from __future__ import annotations

import csv
import itertools
import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from testkit.defocus import defocus, write_defocused_sample
from wsi_pipeline.cli import main
from wsi_pipeline.inference.card import resolve_model
from wsi_pipeline.inference.scoring import make_tasks, read_units, score_chunk, stream_score
from wsi_pipeline.inference.session import create_session
from wsi_pipeline.io.outputs import HATCH_RGB
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.tiling.focus import (
    SHARP_AT_LEAST,
    WARN_MIN_TILES,
    focus_measurable,
    focus_scores,
    focus_summary,
)
from wsi_pipeline.tiling.plan import TileOptions
from wsi_pipeline.tiling.source import open_source, read_chunk

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "CMU-1-Small-Region.svs"
MODEL = ROOT / "models" / "tumour-cnn.onnx"


@pytest.fixture(scope="module")
def sample_tiles() -> np.ndarray:
    """The sample's tissue tiles at 0.5 um/px, as the pipeline reads them."""
    source = open_source(SAMPLE, TileOptions())
    return read_chunk(source.task_source(), source.layout.colrow, 0)


def _jpeg(tiles: np.ndarray, quality: int = 80) -> np.ndarray:
    out = np.empty_like(tiles)
    for i, t in enumerate(tiles):
        buf = BytesIO()
        Image.fromarray(t).save(buf, format="JPEG", quality=quality)
        out[i] = np.asarray(Image.open(BytesIO(buf.getvalue())).convert("RGB"))
    return out


def _blur(tiles: np.ndarray, sigma_um: float, mpp: float = 0.5) -> np.ndarray:
    return np.stack([defocus(t, sigma_um / mpp) for t in tiles])


def test_sharp_real_tiles_pass_and_blurred_ones_do_not(sample_tiles: np.ndarray) -> None:
    sharp = focus_scores(sample_tiles, 0.5)
    assert sharp is not None and sharp.shape == (len(sample_tiles),) and sharp.dtype == np.float32
    assert (sharp >= SHARP_AT_LEAST).all()
    for sigma in (1.5, 2.0, 3.0, 5.0):  # as a scanner stores it: JPEG blocks must not pass for detail
        blurred = focus_scores(_jpeg(_blur(sample_tiles, sigma)), 0.5)
        assert blurred is not None and (blurred < SHARP_AT_LEAST).all(), sigma


def test_the_score_falls_with_defocus_jpeg_or_not(sample_tiles: np.ndarray) -> None:
    tiles = sample_tiles[::4]
    for encode in (lambda t: t, _jpeg):
        medians = [float(np.median(focus_scores(encode(_blur(tiles, s)), 0.5))) for s in (0, 0.5, 1, 2, 3, 5)]
        assert all(a > b for a, b in itertools.pairwise(medians)), medians


def test_the_score_does_not_depend_on_stain_darkness(sample_tiles: np.ndarray) -> None:
    pale = np.rint(255 - 0.5 * (255 - sample_tiles.astype(np.float32))).astype(np.uint8)
    a, b = focus_scores(sample_tiles, 0.5), focus_scores(pale, 0.5)
    assert a is not None and b is not None
    assert np.median(np.abs(b / a - 1)) < 0.1
    assert (b >= SHARP_AT_LEAST).all()


def test_the_score_is_measured_in_micrometres(sample_tiles: np.ndarray) -> None:
    """The same tissue at 0.25 um/px (each pixel doubled) scores as at 0.5 um/px; tiles coarser than
    1 um/px, or too small, are not scored."""
    tiles = sample_tiles[:6]
    doubled = tiles.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(focus_scores(doubled, 0.25), focus_scores(tiles, 0.5), rtol=1e-6)
    assert focus_scores(tiles, 2.0) is None and not focus_measurable(224, 2.0)
    assert focus_scores(tiles[:, :24, :24], 0.5) is None and not focus_measurable(24, 0.5)
    assert focus_measurable(224, 0.5) and focus_measurable(32, 0.5)
    assert focus_scores(tiles[:0], 0.5).shape == (0,)  # type: ignore[union-attr]


def test_summary_warns_on_a_share_of_the_tiles() -> None:
    sharp = np.full(100, 0.8, np.float32)
    assert focus_summary(None) is None
    quiet = focus_summary(sharp)
    assert quiet is not None and quiet["tiles_out_of_focus"] == 0 and quiet["warning"] is None
    few = sharp.copy()
    few[:9] = 0.1  # 9 %: below the share
    assert focus_summary(few)["warning"] is None  # type: ignore[index]
    many = sharp.copy()
    many[:10] = 0.1
    s = focus_summary(many)
    assert (
        s is not None
        and s["share_out_of_focus"] == 0.1
        and "10% of the tissue tiles look out of focus" in s["warning"]
    )
    tiny = np.array([0.1] * (WARN_MIN_TILES - 1), np.float32)  # every tile, but too few to mean anything
    assert focus_summary(tiny)["warning"] is None  # type: ignore[index]
    assert "a 'no tumour' is not a negative result" in s["warning"]
    other = focus_summary(many, positive_name="Tumor")  # an imported model's class, as its label says
    assert other is not None and "a 'no Tumor' is not a negative result" in other["warning"]
    called = focus_summary(many, called="tumour")  # a slide called tumour: its area may be larger
    assert called is not None and "its tumour area may be larger than measured" in called["warning"]
    coarse = focus_summary(np.full(20, 0.1, np.float32), coarse_scan_mpp=1.0)
    assert coarse is not None and "scanned at 1 um/px" in coarse["warning"]


def test_the_streaming_scorer_keeps_each_tiles_focus_in_its_place() -> None:
    """Several readers, units cut across batches: every focus score is the one of its own tile."""
    card = resolve_model(MODEL)
    source = open_source(SAMPLE, TileOptions())
    tasks = make_tasks(source, card, batch_size=8, chunk_tiles=20)
    units = read_units(tasks, 8, first=3)
    session, _ = create_session(card, "cpu", threads=1)
    _, _, focus, _ = stream_score(units, session, card, batch_size=8, readers=3)
    tiles = read_chunk(source.task_source(), source.layout.colrow, 0)
    np.testing.assert_array_equal(focus, focus_scores(tiles, card.mpp))
    # a cluster task (its units start mid-slide) returns its own tiles' scores
    later = tasks[1]
    assert later.start > 0
    np.testing.assert_array_equal(
        score_chunk(later)[5], focus_scores(tiles[later.start : later.start + 20], card.mpp)
    )


def _hatch_share(overlay: Path) -> float:
    """Share of an overlay's pixels in the out-of-focus stripes' grey."""
    return float((np.asarray(Image.open(overlay).convert("RGB")) == HATCH_RGB).all(axis=-1).mean())


def _run(slide: Path, out: Path, *extra: str) -> tuple[int, str, dict]:
    r = CliRunner().invoke(main, [str(slide), "--out", str(out / f"{slide.stem}.tif"), *extra])
    manifest = out / f"{slide.stem}.run.json"
    return r.exit_code, r.output, json.loads(manifest.read_text()) if manifest.exists() else {}


@pytest.fixture(scope="module")
def defocused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("defocus")
    return {
        "sharp": write_defocused_sample(d / "sharp.svs", 0.0),
        "blurred": write_defocused_sample(d / "blurred.svs", 1.5),
        "right-half": write_defocused_sample(d / "right-half.svs", 2.0, right_fraction=0.5),
        "coarse": write_defocused_sample(d / "coarse.svs", 0.0, mpp=2.0),
    }


def test_a_sharp_scan_gets_no_warning_and_a_blurred_one_does(
    defocused: dict[str, Path], tmp_path: Path
) -> None:
    code, out, m = _run(defocused["sharp"], tmp_path / "sharp")
    assert code == 0 and "out of focus" not in out
    f = m["label"]["focus"]
    assert f["warning"] is None and f["tiles_out_of_focus"] == 0 and f["median_score"] > 2 * SHARP_AT_LEAST

    code, out, m = _run(defocused["blurred"], tmp_path / "blurred")
    assert code == 0, out
    f = m["label"]["focus"]
    assert f["share_out_of_focus"] == 1.0 and f["tiles_out_of_focus"] == m["n_tiles"]
    assert "blurred.svs: WARNING 100% of the tissue tiles look out of focus" in out
    page = (tmp_path / "blurred" / "blurred.report.html").read_text()
    assert "100% of the tissue tiles look out of focus" in page and "tiles out of focus" in page
    geo = json.loads((tmp_path / "blurred" / "blurred.geojson").read_text())
    blur = [g for g in geo["features"] if g["properties"]["classification"]["name"] == "Out of focus"]
    assert blur and all(g["properties"]["isLocked"] for g in blur)
    # hatched on the overlay (the stripes' grey also occurs in anti-aliased text: count, not presence)
    sharp_hatch = _hatch_share(tmp_path / "sharp" / "sharp.overlay.png")
    assert sharp_hatch < 0.001 and _hatch_share(tmp_path / "blurred" / "blurred.overlay.png") > 0.02
    tiles = [g for g in geo["features"] if g["properties"]["objectType"] == "detection"]
    assert all(g["properties"]["measurements"]["Focus score"] < SHARP_AT_LEAST for g in tiles)


def test_the_blurred_half_of_a_slide_is_where_the_tiles_score_low(
    defocused: dict[str, Path], tmp_path: Path
) -> None:
    code, out, m = _run(defocused["right-half"], tmp_path)
    assert code == 0, out
    with (tmp_path / "right-half.tiles.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    width = open_slide(defocused["right-half"], "openslide").dimensions[0]
    # tiles wholly on one side of the blur's edge (by more than the Gaussian's reach, 3 sigma = 12 px)
    left = [float(r["focus"]) for r in rows if float(r["x_l0"]) + 224 < width / 2 - 12]
    right = [float(r["focus"]) for r in rows if float(r["x_l0"]) > width / 2 + 12]
    assert len(left) >= 10 and len(right) >= 10
    assert all(v >= SHARP_AT_LEAST for v in left) and all(v < SHARP_AT_LEAST for v in right)
    f = m["label"]["focus"]
    assert f["tiles_out_of_focus"] == sum(float(r["focus"]) < SHARP_AT_LEAST for r in rows)
    assert f["warning"]  # more than half the tissue is blurred; what it means follows the slide's label
    meaning = (
        "tumour area may be larger than measured" if m["label"]["positive"] else "is not a negative result"
    )
    assert meaning in f["warning"]
    # the blurred half is outlined for QuPath and hatched on the overlay, the sharp half is not
    geo = json.loads((tmp_path / "right-half.geojson").read_text())
    blur = [g for g in geo["features"] if g["properties"]["classification"]["name"] == "Out of focus"]
    xs = [x for g in blur for ring in g["geometry"]["coordinates"] for x, _ in ring]
    assert xs and min(xs) >= width / 2 - 224
    ov = m["heatmap"]["overlay"]
    picture = np.asarray(Image.open(tmp_path / "right-half.overlay.png").convert("RGB"))[
        :, : ov["size_px"][0]
    ]
    picture = picture[: ov["slide_px"][1], : ov["slide_px"][0]]  # the slide picture, not the legend
    _, hx = np.nonzero((picture == HATCH_RGB).all(axis=-1))
    x_l0 = ov["origin_l0"][0] + hx * ov["l0_per_px"]
    assert hx.size > 1000 and (x_l0 < width / 2 - 224).mean() < 0.01


def test_a_scan_coarser_than_the_tiles_is_named_as_the_cause(
    defocused: dict[str, Path], tmp_path: Path
) -> None:
    """The sharp sample said to be scanned at 2 um/px: its tiles at 0.5 um/px are upsampled 4x and lack
    the detail at 1 um/px (at 1 um/px a scan still has it, and is not warned about)."""
    code, out, m = _run(defocused["coarse"], tmp_path)
    assert code == 0, out
    warning = m["label"]["focus"]["warning"]
    assert warning and "scanned at 2 um/px" in warning and "upsampled" in warning
    assert "coarse.svs: WARNING" in out and "scanned at 2 um/px" in out


def test_a_new_label_rule_keeps_the_focus_record(defocused: dict[str, Path], tmp_path: Path) -> None:
    _, _, first = _run(defocused["blurred"], tmp_path)
    code, out, again = _run(defocused["blurred"], tmp_path, "--tile-threshold", "0.6")
    assert code == 0, out
    assert again.get("scores_reused") and again["label"]["focus"] == first["label"]["focus"]


def test_a_folder_run_counts_the_slides_out_of_focus(defocused: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for k in ("sharp", "blurred"):
        (src / f"{k}.svs").symlink_to(defocused[k])
    r = CliRunner().invoke(main, [str(src), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "1 out of focus: review by eye" in r.output
    doc = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert doc["totals"]["labels"]["focus_warning"] == 1
    with (tmp_path / "out" / "summary.csv").open() as fh:
        rows = {Path(r["slide"]).stem: r for r in csv.DictReader(fh)}
    assert rows["blurred"]["focus_warning"] == "True" and float(rows["blurred"]["out_of_focus"]) == 1.0
    assert rows["sharp"]["focus_warning"] == "False" and float(rows["sharp"]["out_of_focus"]) == 0.0
    page = (tmp_path / "out" / "report.html").read_text()
    assert "1 with much tissue out of focus" in page


def test_evaluation_names_the_slides_the_run_warned_about_its_focus(
    defocused: dict[str, Path], tmp_path: Path
) -> None:
    """Scored against an expert's outline, a blurred slide's row says the run warned about its focus
    (metrics.json, metrics.csv, the page and a warning line): misses there may be the blur's."""
    from wsi_pipeline.evaluation.annotations import write_asap_xml

    for k in ("sharp", "blurred"):
        _run(defocused[k], tmp_path / "runs")
    ann = tmp_path / "ann"
    ann.mkdir()
    for k in ("sharp", "blurred"):  # one annotated tumour square in each slide
        write_asap_xml(ann / f"{k}.xml", [("tumour", [(900, 900), (1300, 900), (1300, 1300), (900, 1300)])])
    r = CliRunner().invoke(
        main, ["evaluate", str(tmp_path / "runs"), "-a", str(ann), "-o", f"{tmp_path}/ev/"]
    )
    assert r.exit_code == 0, r.output
    assert "warning: blurred.svs: the run warned: 100% of the tissue tiles look out of focus" in r.output
    assert "warning: sharp.svs" not in r.output
    rows = {
        Path(s["slide"]).stem: s for s in json.loads((tmp_path / "ev" / "metrics.json").read_text())["slides"]
    }
    assert rows["blurred"]["focus_warning"] is True and rows["blurred"]["out_of_focus"] == 1.0
    assert rows["sharp"]["focus_warning"] is False and rows["sharp"]["out_of_focus"] == 0.0
    with (tmp_path / "ev" / "metrics.csv").open() as fh:
        flat = {Path(x["slide"]).stem: x for x in csv.DictReader(fh)}
    assert flat["blurred"]["focus_warning"] == "True" and flat["sharp"]["focus_warning"] == "False"
    page = (tmp_path / "ev" / "metrics.html").read_text()
    assert "out of focus (share)" in page and "1 !</td>" in page


def test_a_tile_store_keeps_each_tiles_focus_and_the_tile_command_warns(
    defocused: dict[str, Path], tmp_path: Path
) -> None:
    from wsi_pipeline.io.tilestore import open_tile_store

    out = tmp_path / "rh.zarr"
    r = CliRunner().invoke(main, ["tile", str(defocused["right-half"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "right-half.svs: WARNING" in r.output and "look out of focus" in r.output
    store = open_tile_store(out)
    assert store.focus is not None
    np.testing.assert_array_equal(store.focus, focus_scores(store.tiles[:], 0.5))
    report = json.loads((tmp_path / "rh.tile-report.json").read_text())
    assert report["focus"]["tiles_out_of_focus"] == int((store.focus < SHARP_AT_LEAST).sum()) > 10
    assert store.meta["focus"] == report["focus"]
    # scoring the store gives the same record as scoring the slide
    code, out_text, m = _run(out, tmp_path / "scored")
    assert code == 0, out_text
    scored, tiled = dict(m["label"]["focus"]), dict(report["focus"])
    assert bool(scored.pop("warning")) == bool(tiled.pop("warning"))  # worded after the label when scored
    assert scored == tiled
