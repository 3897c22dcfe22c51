"""Annotations (ASAP XML, GeoJSON) and evaluation metrics: exact toy cases, hostile XML, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from shapely.geometry import Polygon, box

from conftest import Fixture, shared
from wsi_pipeline.cli.commands import main
from wsi_pipeline.errors import AnnotationError
from wsi_pipeline.evaluation.annotations import (
    GroupMapping,
    read_annotations,
    read_asap_xml,
    read_geojson,
    write_asap_xml,
)
from wsi_pipeline.evaluation.evaluate import (
    box_coverage,
    evaluate_grid,
    evaluate_slide,
    rasterize_fraction,
    summarize,
)
from wsi_pipeline.evaluation.metrics import binary_metrics
from wsi_pipeline.pipeline import RunOptions, output_paths, run_slide

SQUARE = [(0, 0), (100, 0), (100, 100), (0, 100)]


# --- metrics on toy rasters with known answers ------------------------------------------------------


def test_dice_precision_recall_exact_on_known_squares() -> None:
    truth = rasterize_fraction(Polygon(SQUARE), (20, 20), 10.0) >= 0.5  # 10 x 10 cells
    pred = rasterize_fraction(box(50, 0, 150, 100), (20, 20), 10.0) >= 0.5  # overlaps half
    m = binary_metrics(pred, truth)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (50, 50, 50, 250)
    assert m["dice"] == pytest.approx(0.5) and m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["specificity"] == pytest.approx(250 / 300) and m["accuracy"] == pytest.approx(300 / 400)
    assert m["f1"] == m["dice"]


def test_empty_prediction_and_truth_leave_ratios_undefined() -> None:
    """One rule (wsi_pipeline.evaluation.metrics): nothing to divide by -> undefined (nan), not 0 or 1."""
    z = np.zeros((5, 5), bool)
    m = binary_metrics(z, z)
    assert np.isnan(m["dice"]) and np.isnan(m["precision"]) and np.isnan(m["recall"])
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    m = binary_metrics(z, ~z)
    assert m["dice"] == 0.0 and m["recall"] == 0.0 and np.isnan(m["precision"])


def test_rasterize_fraction_is_exact() -> None:
    tri = Polygon([(0, 0), (10, 0), (0, 10)])  # half of cell (0, 0)
    f = rasterize_fraction(tri, (2, 2), 10.0)
    np.testing.assert_allclose(f, [[0.5, 0.0], [0.0, 0.0]])
    f = rasterize_fraction(box(5, 5, 15, 15), (2, 2), 10.0)
    np.testing.assert_allclose(f, [[0.25, 0.25], [0.25, 0.25]])


def test_grid_metrics_treat_unscored_cells_as_negative() -> None:
    canvas = np.full((4, 4), np.nan)
    canvas[0, 0] = 0.9
    truth = np.zeros((4, 4))
    truth[0, :2] = 1.0
    m = evaluate_grid(canvas, truth)
    assert (m["tp"], m["fn"], m["fp"]) == (1, 1, 0) and m["dice"] == pytest.approx(2 / 3)


def test_box_coverage() -> None:
    f = box_coverage(Polygon(SQUARE), np.array([[0, 0, 50, 50], [50, 50, 150, 150], [200, 200, 210, 210]]))
    np.testing.assert_allclose(f, [1.0, 0.25, 0.0])


def test_summary_mean_sd_and_label_accuracy() -> None:
    rs = [
        {"dice": 0.5, "precision": 1, "recall": 1, "specificity": 1, "accuracy": 1, "f1": 1, "auc": None,
         "slide_label_correct": True},
        {"dice": 0.7, "precision": 1, "recall": 1, "specificity": 1, "accuracy": 1, "f1": 1, "auc": 0.9,
         "slide_label_correct": False},
    ]  # fmt: skip
    s = summarize(rs)
    assert s["dice"]["mean"] == 0.6 and s["dice"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert s["auc"]["n"] == 1 and s["slide_label_accuracy"] == 0.5


# --- annotation readers -------------------------------------------------------------------------


def test_asap_roundtrip_holes_and_exclusions(tmp_path: Path) -> None:
    p = write_asap_xml(
        tmp_path / "a.xml",
        [("Tumor", SQUARE), ("Tumor", [(200, 0), (300, 0), (300, 100), (200, 100)]), ("_2", [(25, 25), (75, 25), (75, 75), (25, 75)])],
    )  # fmt: skip
    ann = read_asap_xml(p)
    assert ann.groups == {"Tumor": 2, "_2": 1}
    assert ann.positive.area == pytest.approx(20_000)
    assert ann.tumour.area == pytest.approx(20_000 - 2_500)  # the exclusion is a hole
    # Explicit mapping: only "_2" listed as positive and nothing excluded.
    only = read_asap_xml(p, GroupMapping(positive=frozenset({"_2"}), exclusion=frozenset()))
    assert only.tumour.area == pytest.approx(2_500)


def test_invalid_polygon_is_repaired(tmp_path: Path) -> None:
    bowtie = [(0, 0), (100, 100), (100, 0), (0, 100)]  # self-intersecting
    ann = read_asap_xml(write_asap_xml(tmp_path / "b.xml", [("Tumor", bowtie)]))
    assert ann.repaired == 1 and ann.tumour.is_valid
    assert ann.tumour.area == pytest.approx(5_000)  # two triangles, area kept


def test_rectangle_dot_and_pointset(tmp_path: Path) -> None:
    xml = """<?xml version="1.0"?><ASAP_Annotations><Annotations>
    <Annotation Name="r" Type="Rectangle" PartOfGroup="Tumor"><Coordinates>
      <Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="10" Y="0"/>
      <Coordinate Order="2" X="10" Y="20"/><Coordinate Order="3" X="0" Y="20"/></Coordinates></Annotation>
    <Annotation Name="d" Type="Dot" PartOfGroup="Tumor"><Coordinates><Coordinate Order="0" X="5" Y="5"/>
    </Coordinates></Annotation></Annotations><AnnotationGroups/></ASAP_Annotations>"""
    p = tmp_path / "r.xml"
    p.write_text(xml)
    ann = read_asap_xml(p)
    assert ann.tumour.area == 200 and ann.skipped == {"dot": 1}


def test_scaling_between_levels(tmp_path: Path) -> None:
    ann = read_asap_xml(write_asap_xml(tmp_path / "s.xml", [("Tumor", SQUARE)]))
    level2 = ann.scaled(4.0)  # level with downsample 4
    assert level2.area == pytest.approx(10_000 / 16) and level2.bounds == (0, 0, 25, 25)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("<ASAP_Annotations><Annotations><Annotation", "malformed XML"),
        ("<Other/>", "not an ASAP file"),
        (
            '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">'
            '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;">]><ASAP_Annotations>&lol3;</ASAP_Annotations>',
            "refused unsafe XML",
        ),
        (
            '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
            "<ASAP_Annotations>&xxe;</ASAP_Annotations>",
            "refused unsafe XML",
        ),
        (
            '<ASAP_Annotations><Annotations><Annotation Type="Polygon" PartOfGroup="T"><Coordinates>'
            '<Coordinate Order="0" X="abc" Y="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>',
            "not a number",
        ),
    ],
    ids=["truncated", "wrong-root", "xml-bomb", "external-entity", "bad-number"],
)
def test_bad_xml_gives_clear_error(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "bad.xml"
    p.write_text(content)
    with pytest.raises(AnnotationError, match=match) as info:
        read_asap_xml(p)
    assert "bad.xml" in str(info.value) and "\n" not in str(info.value)


def test_geojson_holes_and_classes(tmp_path: Path) -> None:
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
                [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]], [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]]},
             "properties": {"classification": {"name": "Tumor"}}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
                [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}, "properties": {"classification": {"name": "Normal"}}},
        ],
    }  # fmt: skip
    p = tmp_path / "a.geojson"
    p.write_text(json.dumps(fc))
    ann = read_geojson(p)
    assert ann.tumour.area == pytest.approx(10_000 - 400 - 100)  # hole kept, "Normal" excluded
    assert ann.skipped == {"point": 1}
    with pytest.raises(AnnotationError, match="unknown annotation format"):
        read_annotations(tmp_path / "a.txt")


@pytest.mark.realdata
def test_real_camelyon_asap_xml() -> None:
    ann = read_asap_xml(shared("annotations", "asap", "patient_004_node_4.xml"))
    assert ann.groups == {"Tumor": 3}
    assert ann.tumour.area == pytest.approx(252_947, rel=0.01)
    dot = read_asap_xml(shared("annotations", "asap", "asap-dot.xml"))
    assert dot.tumour.is_empty and dot.skipped == {"dot": 1}
    ps = read_asap_xml(shared("annotations", "asap", "asap-pointset.xml"))
    assert ps.tumour.is_empty and ps.skipped == {"pointset": 1}


@pytest.mark.realdata
def test_real_qupath_geojson_with_hole() -> None:
    ann = read_geojson(shared("annotations", "geojson", "histoqc-holed.geojson"))
    assert len(list(getattr(ann.tumour, "interiors", []))) == 1 or any(
        len(g.interiors) for g in getattr(ann.tumour, "geoms", [])
    )
    ex = read_geojson(shared("annotations", "geojson", "histoqc-geojson_example.json"))
    assert set(ex.groups) == {"Tumor", "Invborder"}


# --- end to end: slide -> heatmap -> Dice ---------------------------------------------------------


@pytest.fixture(scope="module")
def runs(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("eval")
    for f in (tumour_slide, benign_slide):
        run_slide(
            f.path, out / f"{f.path.stem}.heatmap.tif", model=test_model, options=RunOptions(chunk_tiles=64)
        )
    ann = out / "annotations"
    ann.mkdir()
    write_asap_xml(ann / "tumour.xml", [("Tumor", e.polygon(96)) for e in tumour_slide.spec.tumour])
    write_asap_xml(ann / "benign.xml", [])  # annotated, no tumour
    return out


def test_evaluate_slide_against_known_truth(runs: Path) -> None:
    r = evaluate_slide(
        output_paths(runs / "tumour.heatmap.tif")["manifest"], runs / "annotations" / "tumour.xml"
    )
    assert r["dice"] > 0.85 and r["recall"] > 0.85 and r["specificity"] > 0.98
    assert r["auc"] > 0.98 and r["slide_label_correct"]
    truth_mm2 = float(np.pi * 700 * 550 * 0.25 / 1e6)
    assert r["truth_area_mm2"] == pytest.approx(truth_mm2, rel=0.01)
    b = evaluate_slide(
        output_paths(runs / "benign.heatmap.tif")["manifest"], runs / "annotations" / "benign.xml"
    )
    # no tumour in truth nor in the prediction: Dice and precision are undefined (null), not 1.0
    assert b["dice"] is None and b["precision"] is None and b["auc"] is None and b["specificity"] == 1.0
    assert b["slide_label_correct"] and not b["slide_truth_positive"]


def test_evaluate_cli_folder_reports_unannotated(runs: Path, tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "tumour.xml").write_bytes((runs / "annotations" / "tumour.xml").read_bytes())
    out = tmp_path / "metrics.json"
    r = CliRunner().invoke(main, ["evaluate", str(runs), "--annotations", str(ann), "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert (
        "1 slides scored: Dice" in r.stdout and "no annotation file for" in r.stderr and "benign" in r.stderr
    )
    data = json.loads(out.read_text())
    assert len(data["slides"]) == 1 and data["unannotated"] and data["summary"]["dice"]["mean"] > 0.85
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("slide,dice") and len(rows) == 2


def test_evaluate_cli_bad_annotation_exit_code(runs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tumour.xml"
    bad.write_text("<ASAP_Annotations><oops")
    r = CliRunner().invoke(
        main,
        ["evaluate", str(runs / "tumour.heatmap.run.json"), "-a", str(bad), "-o", str(tmp_path / "m.json")],
    )
    assert r.exit_code == 1 and "malformed XML" in r.stderr
