"""Annotations (ASAP XML, ImageScope XML, GeoJSON) and evaluation metrics: exact toy cases checked
against hand computations with shapely, hostile XML, the recursive search for runs, end to end."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from click.testing import CliRunner
from shapely.geometry import Point, Polygon, box

from conftest import Fixture, shared
from wsi_pipeline.cli import main
from wsi_pipeline.errors import AnnotationError
from wsi_pipeline.evaluation.annotations import (
    GroupMapping,
    read_annotations,
    read_asap_xml,
    read_geojson,
    read_imagescope_xml,
    read_xml,
    write_asap_xml,
)
from wsi_pipeline.evaluation.evaluate import (
    area_overlap,
    box_coverage,
    evaluate_grid,
    evaluate_runs,
    evaluate_slide,
    find_runs,
    rasterize_fraction,
)
from wsi_pipeline.evaluation.metrics import binary_metrics
from wsi_pipeline.evaluation.summary import format_summary, summarize
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


def test_summary_means_cover_tumour_slides_and_benign_slides_are_apart() -> None:
    rs: list[dict[str, Any]] = [
        {"dice": 0.5, "precision": 1, "recall": 1, "cell_dice": 0.6, "auc": None, "slide_truth_positive": True,
         "slide_predicted_positive": True, "slide_label_correct": True, "false_positive_mm2": 0.0},
        {"dice": 0.7, "precision": 1, "recall": 1, "cell_dice": 0.8, "auc": 0.9, "slide_truth_positive": True,
         "slide_predicted_positive": False, "slide_label_correct": False, "false_positive_mm2": 0.1},
        # benign, called tumour: Dice 0 by the metric's rule, but not averaged with the tumour slides
        {"dice": 0.0, "precision": 0.0, "recall": None, "cell_dice": 0.0, "auc": None,
         "slide_truth_positive": False, "slide_predicted_positive": True, "slide_label_correct": False,
         "false_positive_mm2": 0.25},
        # benign, nothing predicted: Dice undefined
        {"dice": None, "precision": None, "recall": None, "cell_dice": None, "auc": None,
         "slide_truth_positive": False, "slide_predicted_positive": False, "slide_label_correct": True,
         "false_positive_mm2": 0.0},
    ]  # fmt: skip
    s = summarize(rs)
    assert s["n_slides"] == 4 and s["n_tumour_slides"] == 2 and s["n_benign_slides"] == 2
    assert (
        s["dice"]["mean"] == 0.6
        and s["dice"]["n"] == 2
        and s["dice"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    )
    assert s["cell_dice"]["mean"] == 0.7 and s["auc"]["n"] == 1 and s["slide_label_accuracy"] == 0.5
    b = s["benign"]
    assert b["n"] == 2 and b["called_tumour"] == 1 and b["with_false_positive_area"] == 1
    assert b["false_positive_mm2"] == {"mean": 0.125, "max": 0.25, "total": 0.25, "n": 2}


def _cells_union(pred: np.ndarray, cell: float, origin: float = 0.0) -> Any:
    """Hand computation: the predicted cells as one shapely geometry (cell (r, c) at origin + c * cell)."""
    rr, cc = np.nonzero(pred)
    return shapely.union_all([box(origin + c * cell, origin + r * cell, origin + (c + 1) * cell,
                                  origin + (r + 1) * cell) for r, c in zip(rr, cc, strict=True)])  # fmt: skip


def _hand_dice(truth: Any, predicted: Any) -> float:
    tp = truth.intersection(predicted).area
    return 2 * tp / (truth.area + predicted.area)


def test_area_exact_dice_is_the_shapely_overlap_and_differs_from_cell_dice() -> None:
    """Issue 14: the cell Dice rounds the truth to cells (0.951 where the area-exact Dice of the same
    prediction was 0.910). Here the prediction is exactly the cells at least half covered by a disk:
    on cells it is perfect (Dice 1.0); on areas it is what shapely says."""
    cell, shape = 100.0, (10, 10)
    disk = Point(500, 500).buffer(330, quad_segs=64)
    frac = rasterize_fraction(disk, shape, cell)
    pred = frac >= 0.5
    cells = evaluate_grid(np.where(pred, 0.9, 0.1), frac)
    assert cells["dice"] == 1.0
    area = area_overlap(pred, frac, disk.area, cell)
    predicted = _cells_union(pred, cell)
    assert area["predicted"] == pytest.approx(predicted.area)
    assert area["tp"] == pytest.approx(disk.intersection(predicted).area)
    assert area["fp"] == pytest.approx(predicted.difference(disk).area)
    assert area["fn"] == pytest.approx(disk.difference(predicted).area)
    dice = 2 * area["tp"] / (2 * area["tp"] + area["fp"] + area["fn"])
    assert dice == pytest.approx(_hand_dice(disk, predicted)) and 0.9 < dice < 0.97


def test_area_overlap_with_centred_cells_and_unscored_area() -> None:
    """Cells centred on overlapping tiles start at origin_l0 > 0; unscored area is predicted negative."""
    cell, origin, shape = 64.0, 32.0, (6, 8)
    truth = Polygon([(40, 50), (400, 20), (350, 300), (90, 360)])
    rng = np.random.default_rng(3)
    pred = rng.random(shape) > 0.5
    frac = rasterize_fraction(truth, shape, cell, origin)
    area = area_overlap(pred, frac, truth.area, cell)
    predicted = _cells_union(pred, cell, origin)
    assert area["tp"] == pytest.approx(truth.intersection(predicted).area)
    assert area["fn"] == pytest.approx(truth.difference(predicted).area)  # includes truth left of origin
    assert area["fp"] == pytest.approx(predicted.difference(truth).area)


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


def _imagescope(
    path: Path, layers: list[tuple[dict[str, str], list[str], list[tuple[str, list[tuple[str, str]]]]]]
) -> Path:
    """ImageScope XML: layers of (layer attributes, attribute names, [(NegativeROA, vertices)])."""
    out = ['<Annotations MicronsPerPixel="0.252000">']
    for i, (attrs, names, regions) in enumerate(layers, 1):
        a = " ".join(f'{k}="{v}"' for k, v in {"Id": str(i), "Name": "", "LineColor": "255", **attrs}.items())
        out.append(f'<Annotation {a} Type="4"><Attributes>')
        out += [f'<Attribute Name="{n}" Id="0" Value=""/>' for n in names]
        out.append("</Attributes><Regions><RegionAttributeHeaders/>")
        for j, (neg, verts) in enumerate(regions, 1):
            out.append(f'<Region Id="{j}" Type="0" NegativeROA="{neg}"><Attributes/><Vertices>')
            out += [f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in verts]
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    path.write_text("\n".join(out))
    return path


def _xy(poly: Sequence[tuple[float, float]]) -> list[tuple[str, str]]:
    return [(str(x), str(y)) for x, y in poly]


OUTER = [(1000, 1000), (5000, 1000), (5000, 4000), (1000, 4000)]
HOLE = [(2000, 2000), (3000, 2000), (2500, 3000)]


def test_imagescope_xml_negative_region_is_a_hole(tmp_path: Path) -> None:
    p = _imagescope(tmp_path / "case.xml", [
        ({}, ["CaP"], [("0", _xy(OUTER)), ("1", _xy(HOLE))]),
        ({"Name": "stroma"}, ["Description"], [("0", _xy([(6000, 0), (7000, 0), (7000, 500)]))]),
        ({}, ["Description"], [("0", _xy([(0, 6000), (100, 6000)]))]),  # a ruler: no area
    ])  # fmt: skip
    hand = Polygon(OUTER, [HOLE])  # the hand-made polygon with its hole
    stroma = Polygon([(6000, 0), (7000, 0), (7000, 500)])
    ann = read_annotations(p)  # .xml: told from ASAP by the root element
    assert ann.format == "imagescope" and ann.negative == 1
    assert ann.groups == {"CaP": 2, "stroma": 1} and ann.skipped == {"degenerate": 1}
    assert ann.tumour.area == pytest.approx(hand.area + stroma.area)  # every layer counts by default
    assert ann.tumour.symmetric_difference(hand.union(stroma)).area == pytest.approx(0, abs=1e-6)
    cap = read_imagescope_xml(p, GroupMapping(positive=frozenset({"cap"})))  # names are case-insensitive
    assert cap.tumour.area == pytest.approx(hand.area) == pytest.approx(12e6 - 0.5e6)
    # a layer without a name or attribute is "layer <Id>"; an exclusion name makes it a hole
    q = _imagescope(tmp_path / "q.xml", [
        ({}, ["Description"], [("0", _xy(OUTER))]), ({"Name": "Exclusion"}, [], [("0", _xy(HOLE))]),
    ])  # fmt: skip
    ann = read_xml(q)
    assert ann.groups == {"layer 1": 1, "Exclusion": 1} and ann.tumour.area == pytest.approx(hand.area)
    # a negative region in a layer the mapping ignores cuts nothing
    ign = read_imagescope_xml(p, GroupMapping(positive=frozenset({"stroma"})))
    assert ign.tumour.area == pytest.approx(stroma.area) and ign.negative == 0


def test_imagescope_decimal_comma_and_hostile_xml(tmp_path: Path) -> None:
    p = _imagescope(
        tmp_path / "c.xml", [({}, [], [("0", [("10,5", "0"), ("110,5", "0"), ("110,5", "100")])])]
    )
    assert read_annotations(p).tumour.area == pytest.approx(5000)
    bomb = tmp_path / "bomb.xml"
    bomb.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
                    "<Annotations>&b;</Annotations>")  # fmt: skip
    with pytest.raises(AnnotationError, match="refused unsafe XML"):
        read_annotations(bomb)
    other = tmp_path / "other.xml"
    other.write_text("<Slide/>")
    with pytest.raises(AnnotationError, match=r"neither <ASAP_Annotations>.*nor <Annotations>"):
        read_annotations(other)
    far = _imagescope(tmp_path / "far.xml", [({}, [], [("0", [("0", "0"), ("1e12", "0"), ("0", "5")])])])
    with pytest.raises(AnnotationError, match="far outside any slide"):
        read_annotations(far)


def test_decimal_comma_asap_xml_evaluates_like_decimal_point(tmp_path: Path) -> None:
    """ASAP writes the locale's decimal separator: X="2100,5" under a comma-decimal locale."""

    def asap(path: Path, sep: str) -> Path:
        pts = [
            ("100" + sep + "25", "100"),
            ("2100" + sep + "5", "100"),
            ("2100" + sep + "5", "900" + sep + "25"),
        ]
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(pts))
        path.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="a" '
                        f'Type="Polygon" PartOfGroup="Tumor"><Coordinates>{coords}</Coordinates></Annotation>'
                        "</Annotations><AnnotationGroups/></ASAP_Annotations>")  # fmt: skip
        return path

    comma, dot = (
        read_annotations(asap(tmp_path / "c.xml", ",")),
        read_annotations(asap(tmp_path / "d.xml", ".")),
    )
    assert comma.format == "asap" and comma.tumour.equals(dot.tumour)
    assert comma.tumour.area == pytest.approx(0.5 * 2000.25 * 800.25)


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
@pytest.mark.parametrize(
    ("name", "groups", "invalid"),
    [("TCGA-EJ-5518-01Z-00-DX1.xml", {"CaP": 2, "layer 3": 1, "layer 4": 1}, 3),
     ("TCGA-EJ-5519-01Z-00-DX1.xml", {"CaP": 1, "layer 3": 1, "layer 4": 1}, 2)],
)  # fmt: skip
def test_real_tcga_imagescope_xml(name: str, groups: dict[str, int], invalid: int) -> None:
    """Real TCGA ImageScope XML: layers named by their attribute ("CaP") or Id; self-intersecting
    regions repaired; each valid region's area equals the Area ImageScope itself recorded."""
    path = shared("annotations", "imagescope", name)
    ann = read_annotations(path)
    assert ann.format == "imagescope" and ann.groups == groups and ann.repaired == invalid
    recorded = [float(a) for a in re.findall(r'<Region [^>]* Area="([0-9.]+)"', path.read_text())]
    polys = [Polygon([(float(x), float(y)) for x, y in re.findall(r'<Vertex X="([0-9.]+)" Y="([0-9.]+)"', r)])
             for r in path.read_text().split("<Region ")[1:]]  # fmt: skip
    valid = [(p.area, a) for p, a in zip(polys, recorded, strict=True) if p.is_valid]
    assert len(valid) == len(polys) - invalid and valid
    for mine, theirs in valid:
        assert mine == pytest.approx(theirs, abs=0.1)
    cap = read_annotations(path, GroupMapping(positive=frozenset({"CaP"})))
    assert 0 < cap.tumour.area <= ann.tumour.area


@pytest.mark.realdata
def test_real_qupath_geojson_with_hole() -> None:
    ann = read_geojson(shared("annotations", "geojson", "histoqc-holed.geojson"))
    assert len(list(getattr(ann.tumour, "interiors", []))) == 1 or any(
        len(g.interiors) for g in getattr(ann.tumour, "geoms", [])
    )
    ex = read_geojson(shared("annotations", "geojson", "histoqc-geojson_example.json"))
    assert set(ex.groups) == {"Tumor", "Invborder"}


# --- runs written by hand: the search, the matching, area-exact metrics, benign slides -------------

MPP = 0.5  # um/px at level 0 of the hand-made runs


def _fake_run(
    folder: Path,
    stem: str,
    probs: np.ndarray,
    *,
    cell: float = 100.0,
    origin: float = 0.0,
    status: str = "complete",
    model: tuple[str, str, str] = ("tumour-cnn", "0.3.0", "ab" * 32),
) -> Path:
    """A finished run as the pipeline writes it (manifest + tile table), without scoring a slide:
    ``probs`` (rows, cols) P(tumour) per heatmap cell, NaN where no tile was scored."""
    folder.mkdir(parents=True, exist_ok=True)
    tile = cell + 2 * origin  # the cell is the stride square centred on its tile
    rows, cols = probs.shape
    rr, cc = np.nonzero(~np.isnan(probs))
    with (folder / f"{stem}.tiles.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x_l0", "y_l0", "width_l0", "height_l0", "col", "row", "tissue_fraction", "p_benign",
                    "p_tumour"])  # fmt: skip
        for r, c in zip(rr, cc, strict=True):
            p = float(probs[r, c])
            w.writerow([c * cell, r * cell, tile, tile, c, r, 1.0, 1 - p, p])
    positive = bool(np.nansum(probs >= 0.5) > 0)
    manifest = {
        "status": status, "slide": f"/scanner/{stem}.svs", "label": {"label": "tumour" if positive else
        "benign", "positive": positive}, "model": {"positive_class": "tumour", "name": model[0],
        "version": model[1], "sha256": model[2]},
        "resolution": {"mpp_x": MPP, "mpp_y": MPP},
        "grid": {"cols": cols, "rows": rows}, "heatmap": {"cell_l0_px": cell, "origin_l0": origin,
        "shape": [rows, cols]}, "outputs": {"tiles_csv": f"/elsewhere/{stem}.tiles.csv"},
    }  # fmt: skip
    path = folder / f"{stem}.run.json"
    path.write_text(json.dumps(manifest))
    return path


def _asap_file(path: Path, polygon: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_asap_xml(
        path, [("Tumor", list(polygon.exterior.coords)[:-1])] if polygon is not None else []
    )


def _invoke(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["evaluate", *args])
    return r.exit_code, r.output


TRUTH = Polygon([(130, 140), (720, 90), (800, 610), (260, 700)])


def test_evaluate_slide_area_exact_against_hand_computation(tmp_path: Path) -> None:
    probs = np.full((8, 10), np.nan)
    probs[1:7, 1:8] = 0.2
    probs[1:6, 2:8] = 0.8  # called tumour
    probs[6, 1] = 0.9  # a false positive cell
    run = _fake_run(tmp_path / "results", "case1", probs)
    r = evaluate_slide(run, _asap_file(tmp_path / "ann" / "case1.xml", TRUTH))
    predicted = _cells_union(probs >= 0.5, 100.0)
    assert r["dice"] == pytest.approx(_hand_dice(TRUTH, predicted))
    assert r["precision"] == pytest.approx(TRUTH.intersection(predicted).area / predicted.area)
    assert r["recall"] == pytest.approx(TRUTH.intersection(predicted).area / TRUTH.area)
    to_mm2 = MPP * MPP / 1e6
    assert r["area_mm2"]["fp"] == pytest.approx(predicted.difference(TRUTH).area * to_mm2, abs=1e-6)
    assert r["area_mm2"]["truth"] == pytest.approx(TRUTH.area * to_mm2, abs=1e-6)
    assert r["false_positive_mm2"] == r["area_mm2"]["fp"] and r["truth"] == "tumour"
    # the cell Dice is a second figure that rounds the truth to cells: it differs here
    assert r["cell_dice"] == r["cell"]["dice"] and abs(r["cell_dice"] - r["dice"]) > 0.01
    assert r["annotation_format"] == "asap" and r["slide_label"] == "tumour"


def test_evaluate_finds_runs_in_subfolders(tmp_path: Path) -> None:
    """Issue 14: a run in results/case1/ was not found and evaluate exited 0 with '0 slides scored'."""
    probs = np.full((8, 10), 0.1)
    probs[2:6, 2:7] = 0.9
    results = tmp_path / "results"
    _fake_run(results / "case1", "case1", probs)
    _fake_run(results / "batch" / "deeper", "case2", probs)
    _fake_run(results / ".hidden", "case3", probs)  # hidden folders are not entered
    store = results / "case1" / "case1.zarr"  # nor tile stores
    _fake_run(store, "case4", probs)
    (store / "zarr.json").write_text("{}")
    (results / "other.run.json").write_text(json.dumps({"tool": "someone else's"}))  # not ours: ignored
    ann = tmp_path / "ann"
    for stem in ("case1", "case2", "case3", "case4"):
        _asap_file(ann / f"{stem}.xml", TRUTH)
    search = find_runs(results)
    assert [p.name for p in search.manifests] == ["case2.run.json", "case1.run.json", "other.run.json"]
    assert search.stores_skipped == 1
    code, out = _invoke(str(results), "--annotations", str(ann), "--out", str(tmp_path / "m.json"))
    assert code == 0, out
    data = json.loads((tmp_path / "m.json").read_text())
    assert sorted(Path(s["slide"]).name for s in data["slides"]) == ["case1.svs", "case2.svs"]
    assert data["ignored"] and "not a wsi-pipeline run manifest" in out
    assert data["searched"]["recursive"] and data["searched"]["manifests"] == 3
    assert "2 slides scored at P >= 0.5; 2 with tumour: Dice" in out and "(area-exact; cell Dice" in out
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert header.startswith("slide,truth,dice,precision,recall,cell_dice,")


def test_evaluate_without_runs_exits_1_saying_what_it_searched(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "a" / "b").mkdir(parents=True)
    (results / "a" / "slide.tif").write_bytes(b"")
    ann = tmp_path / "ann"
    _asap_file(ann / "slide.xml", TRUTH)
    code, out = _invoke(str(results), "--annotations", str(ann), "--out", str(tmp_path / "m.json"))
    assert code == 1 and out.count("\n") == 1, out
    assert "no run manifests found" in out and str(results) in out and "*.run.json" in out
    assert "3 folder(s)" in out and "0 manifest(s) found" in out
    assert not (tmp_path / "m.json").exists()
    # manifests that are all unfinished: also exit 1, counted
    _fake_run(results / "a", "slide", np.full((2, 2), 0.9), status="running")
    code, out = _invoke(str(results), "--annotations", str(ann), "--out", str(tmp_path / "m.json"))
    assert code == 1 and "no finished run manifests" in out and "1 unfinished or unreadable" in out, out


def test_evaluate_without_matching_annotation_exits_9_saying_what_it_searched(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _fake_run(results / "case1", "case1", np.full((4, 4), 0.9))
    _fake_run(results, "case2", np.full((4, 4), 0.9))
    ann = tmp_path / "ann"
    _asap_file(ann / "someone-else.xml", TRUTH)
    (ann / "notes.txt").write_text("not an annotation")
    code, out = _invoke(str(results), "--annotations", str(ann), "--out", str(tmp_path / "m.json"))
    assert code == 9 and out.count("\n") == 1, out
    for part in (str(ann), str(results), "*.run.json", "2 finished run(s)", "<slide stem>.xml|.geojson|.json",
                 "1 annotation file(s): someone-else.xml", "case1.svs, case2.svs"):  # fmt: skip
        assert part in out, (part, out)


def test_unfinished_run_in_a_folder_is_listed_and_the_others_scored(tmp_path: Path) -> None:
    results = tmp_path / "results"
    _fake_run(results / "done", "case1", np.full((8, 10), 0.9))
    _fake_run(results / "running", "case2", np.full((8, 10), 0.9), status="running")
    ann = tmp_path / "ann"
    _asap_file(ann / "case1.xml", TRUTH)
    _asap_file(ann / "case2.xml", TRUTH)
    res = evaluate_runs(results, ann)
    assert [Path(s["slide"]).name for s in res["slides"]] == ["case1.svs"]
    assert len(res["errors"]) == 1 and "did not finish" in res["errors"][0]["error"]
    code, out = _invoke(str(results), "--annotations", str(ann), "--out", str(tmp_path / "m.json"))
    assert code == 1 and "did not finish" in out and "1 slides scored" in out, out


def test_benign_slides_are_reported_apart_and_not_in_the_mean_dice(tmp_path: Path) -> None:
    results, ann = tmp_path / "results", tmp_path / "ann"
    tumour = np.full((8, 10), 0.1)
    tumour[1:6, 2:8] = 0.8
    _fake_run(results, "tumour", tumour)
    called = np.full((8, 10), 0.1)
    called[0:2, 0:3] = 0.95  # 6 cells of 100 x 100 px called tumour on a benign slide
    _fake_run(results, "benign-fp", called)
    _fake_run(results, "benign-clean", np.full((8, 10), 0.1))
    _asap_file(ann / "tumour.xml", TRUTH)
    _asap_file(ann / "benign-fp.xml", None)  # annotated, no tumour
    (ann / "benign-clean.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    res = evaluate_runs(results, ann)
    rows = {Path(s["slide"]).stem: s for s in res["slides"]}
    t, fp, clean = rows["tumour"], rows["benign-fp"], rows["benign-clean"]
    assert t["truth"] == "tumour" and fp["truth"] == "benign" and clean["truth"] == "benign"
    assert fp["false_positive_mm2"] == pytest.approx(6 * 100 * 100 * MPP**2 / 1e6)
    assert fp["slide_label"] == "tumour" and not fp["slide_label_correct"]
    assert clean["false_positive_mm2"] == 0 and clean["dice"] is None and clean["slide_label_correct"]
    s = res["summary"]
    assert s["n_tumour_slides"] == 1 and s["dice"]["n"] == 1 and s["dice"]["mean"] == round(t["dice"], 4)
    assert s["benign"]["n"] == 2 and s["benign"]["called_tumour"] == 1
    assert s["benign"]["false_positive_mm2"]["max"] == pytest.approx(0.015)
    code, out = _invoke(str(results), "--annotations", str(ann), "--out", str(tmp_path / "m.json"))
    assert (
        code == 0 and "2 benign: 1 called tumour, false-positive area mean 0.0075 mm^2 (max 0.0150)" in out
    ), out


def test_metrics_record_the_models_parameters_and_command_behind_them(tmp_path: Path) -> None:
    """A validation record must say which model made the figures and how: metrics.json's ``run``, the
    CSV's model columns and the page's Run table. Runs of two models are flagged, as their means mix."""
    results, ann = tmp_path / "results", tmp_path / "ann"
    probs = np.full((8, 10), 0.1)
    probs[1:6, 2:8] = 0.8
    for stem in ("a", "b"):
        _fake_run(results, stem, probs)
        _asap_file(ann / f"{stem}.xml", TRUTH)
    code, out = _invoke(
        str(results), "-a", str(ann), "-o", str(tmp_path / "m.json"), "--truth-fraction", "0.4"
    )
    assert code == 0, out
    data = json.loads((tmp_path / "m.json").read_text())
    run = data["run"]
    assert run["models"] == [{"model": "tumour-cnn 0.3.0", "sha256": "ab" * 32, "slides": 2}]
    assert run["parameters"]["truth_fraction"] == 0.4 and run["parameters"]["threshold"] is None
    assert run["command"][:2] == ["wsi-infer", "evaluate"] and "--truth-fraction" in run["command"]
    assert run["versions"]["numpy"] and run["results"] == str(results)
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert {r["model"] for r in rows} == {"tumour-cnn 0.3.0"} and rows[0]["model_sha256"] == "ab" * 32
    page = (tmp_path / "m.html").read_text()
    assert "<h2>Run</h2>" in page and "tumour-cnn 0.3.0 (sha256 abababababab): 2 slide(s)" in page
    assert "different models" not in out + page

    _fake_run(results, "c", probs, model=("tumour-cnn", "0.4.0", "cd" * 32))
    _asap_file(ann / "c.xml", TRUTH)
    code, out = _invoke(str(results), "-a", str(ann), "-o", str(tmp_path / "m2.json"))
    assert code == 0, out
    assert (
        "warning: the runs were scored by 2 different models (tumour-cnn 0.3.0 (sha256 abababababab): " in out
    )
    assert "tumour-cnn 0.4.0 (sha256 cdcdcdcdcdcd): 1 slide(s))" in out
    assert "the runs were scored by 2 different models" in (tmp_path / "m2.html").read_text()
    assert [m["slides"] for m in json.loads((tmp_path / "m2.json").read_text())["run"]["models"]] == [2, 1]


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
    assert r["dice"] > 0.85 and r["recall"] > 0.85 and r["cell"]["specificity"] > 0.98
    assert r["cell_dice"] > 0.85 and r["auc"] > 0.98 and r["slide_label_correct"]
    truth_mm2 = float(np.pi * 700 * 550 * 0.25 / 1e6)
    assert r["truth_area_mm2"] == pytest.approx(truth_mm2, rel=0.01)
    b = evaluate_slide(
        output_paths(runs / "benign.heatmap.tif")["manifest"], runs / "annotations" / "benign.xml"
    )
    # no tumour in truth nor in the prediction: Dice and precision are undefined (null), not 1.0
    assert b["dice"] is None and b["precision"] is None and b["auc"] is None
    assert b["cell"]["specificity"] == 1.0 and b["false_positive_mm2"] == 0.0 and b["truth"] == "benign"
    assert b["slide_label_correct"] and not b["slide_truth_positive"]


def test_evaluate_cli_folder_reports_unannotated(runs: Path, tmp_path: Path) -> None:
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "tumour.xml").write_bytes((runs / "annotations" / "tumour.xml").read_bytes())
    out = tmp_path / "metrics.json"
    r = CliRunner().invoke(main, ["evaluate", str(runs), "--annotations", str(ann), "--out", str(out)])
    assert r.exit_code == 0, r.stderr
    assert "1 slides scored at P >= 0.5; 1 with tumour: Dice" in r.stdout
    assert "slide labels correct: 1 of 1" in r.stdout  # a count, not "1.0 correct"
    assert "no annotation file for" in r.stderr and "benign" in r.stderr
    data = json.loads(out.read_text())
    assert len(data["slides"]) == 1 and data["unannotated"] and data["summary"]["dice"]["mean"] > 0.85
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].startswith("slide,truth,dice") and len(rows) == 2


def test_evaluate_scores_each_run_at_the_threshold_it_called_tumour_with(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Evaluation counted P >= 0.5 as tumour while the run's outlines, GeoJSON regions and label used
    its card's threshold (0.79 for the shipped model): the Dice was of a map nobody was shown. It now
    takes each run's own tile threshold unless --threshold is given."""
    from wsi_pipeline.aggregate import LabelRule

    res = tmp_path / "res"
    opts = RunOptions(chunk_tiles=64, label=LabelRule(tile_threshold=0.9))
    run_slide(tumour_slide.path, res / "tumour.tif", model=test_model, options=opts)
    ann = tmp_path / "tumour.xml"
    write_asap_xml(ann, [("Tumor", e.polygon(96)) for e in tumour_slide.spec.tumour])
    manifest = output_paths(res / "tumour.tif")["manifest"]
    own = evaluate_slide(manifest, ann)
    assert own["threshold"] == 0.9 and own["threshold_source"] == "run"
    import csv

    with (res / "tumour.tiles.csv").open() as fh:
        p = [float(r["p_tumour"]) for r in csv.DictReader(fh)]
    called = sum(v >= 0.9 for v in p)  # the tiles the run called tumour
    assert 0 < called < sum(v >= 0.5 for v in p)
    assert own["tile"]["tp"] + own["tile"]["fp"] == called
    given = evaluate_slide(manifest, ann, threshold=0.5)
    assert given["threshold"] == 0.5 and given["threshold_source"] == "given"
    assert given["area_mm2"]["predicted"] > own["area_mm2"]["predicted"]
    r = CliRunner().invoke(main, ["evaluate", str(res), "-a", str(ann), "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 0 and "1 slides scored at P >= 0.9;" in r.stdout, r.output


def test_evaluate_cli_bad_annotation_exit_code(runs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "tumour.xml"
    bad.write_text("<ASAP_Annotations><oops")
    r = CliRunner().invoke(
        main,
        ["evaluate", str(runs / "tumour.heatmap.run.json"), "-a", str(bad), "-o", str(tmp_path / "m.json")],
    )
    assert r.exit_code == 1 and "malformed XML" in r.stderr


def test_evaluate_out_never_replaces_an_annotation_it_did_not_write(tmp_path: Path) -> None:
    """`--out ann/case1.json` (a NCRF/QuPath annotation file of that name) is refused and left as it
    was; the metrics file it wrote itself is replaced on the next run."""
    probs = np.full((8, 10), 0.1)
    probs[2:6, 2:7] = 0.9
    results = tmp_path / "results"
    _fake_run(results, "case1", probs)
    ann = tmp_path / "ann"
    _asap_file(ann / "case1.xml", TRUTH)
    theirs = ann / "case2.json"
    theirs.write_text('{"positive": [{"name": "a pathologist\'s polygon", "vertices": [[0, 0], [1, 1]]}]}')
    before = theirs.read_bytes()
    code, out = _invoke(str(results), "--annotations", str(ann / "case1.xml"), "--out", str(theirs))
    assert code == 6 and f"{theirs}: already exists and was not written by wsi-pipeline" in out
    assert theirs.read_bytes() == before and not (ann / "case2.csv").exists()
    mine = tmp_path / "m.json"
    for _ in range(2):
        code, out = _invoke(str(results), "--annotations", str(ann / "case1.xml"), "--out", str(mine))
        assert code == 0, out


def test_a_runs_own_geojson_is_never_taken_for_the_expert_annotation(tmp_path: Path) -> None:
    """With --annotations the results folder, `case1.geojson` (the run's own predictions) was scored
    as case1's truth: the predictions measured against themselves."""
    from shapely.geometry import mapping

    from wsi_pipeline.io.outputs import geojson_features, write_compact_json

    probs = np.full((8, 10), 0.1)
    probs[2:6, 2:7] = 0.9
    res = tmp_path / "results"
    for stem in ("case1", "case2"):
        _fake_run(res, stem, probs)
    boxes = np.array([[0.0, 0.0, 100.0, 100.0]])
    ours = geojson_features(boxes, np.array([[0.1, 0.9]]), ("benign", "tumour"), 1, tile_threshold=0.5,
                            regions=TRUTH)  # fmt: skip
    write_compact_json(res / "case1.geojson", ours)  # as a run writes it
    theirs = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": mapping(TRUTH),
              "properties": {"classification": {"name": "Tumor"}}}]}  # fmt: skip
    (res / "case2.geojson").write_text(json.dumps(theirs))  # e.g. ours, corrected in QuPath and saved
    code, out = _invoke(str(res), "--annotations", str(res), "--out", str(tmp_path / "m.json"))
    assert code == 0, out
    data = json.loads((tmp_path / "m.json").read_text())
    assert [Path(s["slide"]).name for s in data["slides"]] == ["case2.svs"]
    assert [Path(s).name for s in data["unannotated"]] == ["case1.svs"]
    assert f"{res / 'case1.geojson'}: written by wsi-pipeline (a run's own predictions)" in out
    # named explicitly, it is refused
    code, out = _invoke(str(res / "case1.run.json"), "--annotations", str(res / "case1.geojson"), "--out",
                        str(tmp_path / "m1.json"))  # fmt: skip
    assert code == 9 and "not an expert annotation" in out


def test_evaluate_out_is_a_json_file_or_a_folder(tmp_path: Path) -> None:
    """`--out metrics/` wrote a file called `metrics` and one called `metrics.csv`."""
    probs = np.full((8, 10), 0.1)
    probs[2:6, 2:7] = 0.9
    _fake_run(tmp_path / "results", "case1", probs)
    _asap_file(tmp_path / "ann" / "case1.xml", TRUTH)
    args = [str(tmp_path / "results"), "--annotations", str(tmp_path / "ann"), "--out"]
    code, out = _invoke(*args, f"{tmp_path / 'metrics'}/")
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == [
        "metrics.csv",
        "metrics.html",
        "metrics.json",
    ]
    code, out = _invoke(*args, str(tmp_path / "results2"))
    assert code == 2 and "neither NAME.json nor an existing folder" in out
    assert not (tmp_path / "results2").exists() and not (tmp_path / "results2.csv").exists()


def test_the_runs_asap_xml_holds_its_tumour_regions_exactly(runs: Path, tmp_path: Path) -> None:
    """`NAME.asap.xml` (to open the predictions in ASAP beside a pathologist's annotations): scored as
    if it were the truth, after ASAP saved it (which drops our mark), it matches the run's own tumour
    area exactly; the file as written is refused as truth, as the run's GeoJSON is."""
    own = output_paths(runs / "tumour.heatmap.tif")["asap_xml"]
    text = own.read_text()
    assert text.splitlines()[1].startswith("<!-- generator: wsi-pipeline")
    saved = tmp_path / "tumour.xml"
    saved.write_text("\n".join(line for line in text.splitlines() if "generator" not in line))
    r = evaluate_slide(output_paths(runs / "tumour.heatmap.tif")["manifest"], saved)
    assert r["dice"] == pytest.approx(1.0) and r["precision"] == pytest.approx(1.0)
    assert r["recall"] == pytest.approx(1.0) and r["annotation_format"] == "asap"
    code, out = _invoke(str(output_paths(runs / "tumour.heatmap.tif")["manifest"]), "--annotations", str(own),
                        "--out", str(tmp_path / "m.json"))  # fmt: skip
    assert code == 9 and "not an expert annotation" in out


def test_asap_output_keeps_holes_as_exclusions(tmp_path: Path) -> None:
    """A tumour ring around stroma: the hole is written in group Exclusion, which readers cut out."""
    from shapely.geometry import Polygon

    from wsi_pipeline.pipeline import _write_asap

    ring = Polygon(
        [(0, 0), (900, 0), (900, 900), (0, 900)], [[(300, 300), (600, 300), (600, 600), (300, 600)]]
    )
    _write_asap(tmp_path / "r.asap.xml", ring, "tumour")
    ann = read_asap_xml(tmp_path / "r.asap.xml")
    assert ann.groups == {"tumour": 1, "Exclusion": 1}
    assert ann.tumour.area == pytest.approx(ring.area) and ann.tumour.symmetric_difference(ring).area < 1e-6
    _write_asap(tmp_path / "none.asap.xml", Polygon(), "tumour")  # no tumour: a file with no regions
    assert read_asap_xml(tmp_path / "none.asap.xml").tumour.is_empty


def test_truth_picture_outlines_the_annotation_in_cyan_on_the_overlay(
    runs: Path, tumour_slide: Fixture
) -> None:
    from wsi_pipeline.evaluation.evaluate import truth_picture

    manifest = output_paths(runs / "tumour.heatmap.tif")["manifest"]
    pic = truth_picture(manifest, runs / "annotations" / "tumour.xml", long_side_px=2000)
    assert pic is not None
    m = json.loads(manifest.read_text())
    l0_per_px = m["heatmap"]["overlay"]["l0_per_px"]
    cyan = (pic[..., 0] < 40) & (pic[..., 1] > 200) & (pic[..., 2] > 230)
    ys, xs = np.nonzero(cyan)
    assert len(xs) > 100
    # every cyan pixel lies on an annotated ellipse's outline (in overlay pixels), none elsewhere
    from shapely.geometry import Point, Polygon

    rings = [Polygon(e.polygon(96)).exterior for e in tumour_slide.spec.tumour]
    far = [(x, y) for x, y in zip(xs, ys, strict=True)
           if min(r.distance(Point(x * l0_per_px, y * l0_per_px)) for r in rings) > 6 * l0_per_px]  # fmt: skip
    assert not far, far[:5]
    assert truth_picture(output_paths(runs / "benign.heatmap.tif")["manifest"], None) is not None


def test_a_damaged_overlay_leaves_the_evaluation_page_without_its_picture(runs: Path, tmp_path: Path) -> None:
    import shutil

    from wsi_pipeline.evaluation.evaluate import truth_picture

    copy = tmp_path / "res"
    shutil.copytree(runs, copy)
    (copy / "tumour.heatmap.overlay.png").write_bytes(b"not a png")
    assert truth_picture(output_paths(copy / "tumour.heatmap.tif")["manifest"], None) is None
    code, out = _invoke(str(copy / "tumour.heatmap.run.json"), "--annotations",
                        str(copy / "annotations" / "tumour.xml"), "--out", f"{tmp_path}/m/")  # fmt: skip
    assert code == 0 and (tmp_path / "m" / "metrics.html").is_file(), out


def test_lesion_level_detection_counts_found_missed_and_false_positive_regions(tmp_path: Path) -> None:
    """Three annotated foci: one overlapped by a predicted region (found), one with no prediction and
    one a predicted cell only touches along an edge (both missed: a shared edge has no area); two
    predicted regions overlap no focus (false-positive regions)."""
    probs = np.full((10, 12), 0.1)
    probs[1:3, 1:3] = 0.9  # region A over focus 1
    probs[6, 8:10] = 0.9  # region B: nothing annotated there
    probs[8, 1] = 0.9  # region C: x 100-200, touching focus 3 (x 200-300) along x = 200
    run = _fake_run(tmp_path / "results", "case1", probs)
    foci = [box(120, 120, 280, 280), box(500, 100, 600, 200), box(200, 800, 300, 900)]
    ann = write_asap_xml(
        tmp_path / "ann" / "case1.xml", [("Tumor", list(f.exterior.coords)[:-1]) for f in foci]
    )
    r = evaluate_slide(run, ann)
    assert r["lesions"] == {"lesions": 3, "found": 1, "sensitivity": pytest.approx(1 / 3),
                            "predicted_regions": 3, "false_positive_regions": 2}  # fmt: skip
    s = summarize([r, evaluate_slide(_fake_run(tmp_path / "results", "case2", np.full((4, 4), 0.1)), None)])
    assert s["lesions"] == {"n": 3, "found": 1, "sensitivity": 0.3333, "false_positive_regions": 2,
                            "false_positive_regions_per_slide": 1.0, "n_slides": 2,
                            "sensitivity_ci95": [0.3333, 0.3333]}  # fmt: skip
    code, out = _invoke(str(tmp_path / "results" / "case1.run.json"), "-a", str(ann),
                        "-o", str(tmp_path / "m" / "metrics.json"))  # fmt: skip
    assert code == 0, out
    assert "tumour foci found 1 of 3, false-positive regions 2 per slide" in out
    row = next(csv.DictReader((tmp_path / "m" / "metrics.csv").open()))
    assert (row["lesions"], row["lesions_found"], row["false_positive_regions"]) == ("3", "1", "2")
    page = (tmp_path / "m" / "metrics.html").read_text()
    assert "foci found" in page and "false-positive regions" in page


def test_summary_gives_slide_level_sensitivity_and_specificity_with_intervals() -> None:
    """A validation's figures: tumour slides called tumour and benign slides called benign, each with
    its Wilson 95 % interval, and the mean Dice with a bootstrap interval over slides."""
    rows = [
        {"slide_truth_positive": True, "slide_predicted_positive": i < 9, "slide_label_correct": i < 9,
         "dice": 0.8 + 0.01 * i, "threshold": 0.5}
        for i in range(10)
    ] + [
        {"slide_truth_positive": False, "slide_predicted_positive": i == 0, "slide_label_correct": i != 0,
         "false_positive_mm2": 0.0, "threshold": 0.5}
        for i in range(5)
    ]  # fmt: skip
    s = summarize(rows)
    sens, spec = s["slide_level"]["sensitivity"], s["slide_level"]["specificity"]
    assert (sens["k"], sens["n"], sens["value"]) == (9, 10, 0.9)
    assert sens["ci95"] == [pytest.approx(0.5958, abs=1e-4), pytest.approx(0.9821, abs=1e-4)]
    assert (spec["k"], spec["n"]) == (4, 5) and spec["ci95"][0] == pytest.approx(0.3755, abs=1e-4)
    lo, hi = s["dice"]["ci95"]
    assert lo < s["dice"]["mean"] < hi and lo >= 0.8 and hi <= 0.89
    line = format_summary(s)
    assert "tumour slides called tumour 9 of 10, 95% CI 0.60-0.98" in line
    assert "benign slides called no tumour 4 of 5, 95% CI 0.38-0.96" in line
    assert "(95% CI " in line.split("Dice", 1)[1].split("cell")[0]


def test_sweep_gives_operating_points_consistent_with_the_runs(runs: Path, tmp_path: Path) -> None:
    """--sweep scores every run at thresholds 0.05-0.95 and its own: the row at the runs' own
    threshold equals the plain summary, each slide label recomputed there is the one the run recorded,
    and slide sensitivity falls / specificity rises with the threshold."""
    from wsi_pipeline.evaluation.evaluate import label_at, load_case

    for stem in ("tumour", "benign"):
        case = load_case(
            output_paths(runs / f"{stem}.heatmap.tif")["manifest"], runs / "annotations" / f"{stem}.xml"
        )
        assert label_at(case, 0.5) == case.m["label"]["positive"]  # the run's own threshold and rule
    out = tmp_path / "m" / "metrics.json"
    r = CliRunner().invoke(
        main, ["evaluate", str(runs), "-a", str(runs / "annotations"), "-o", str(out), "--sweep"]
    )
    assert r.exit_code == 0, r.stderr
    data = json.loads(out.read_text())
    points = {p["threshold"]: p for p in data["sweep"]}
    assert set(points) == {round(0.05 * i, 2) for i in range(1, 20)}  # 0.5, the runs' own, is one of them
    own = points[0.5]
    assert own["dice"] == data["summary"]["dice"]["mean"]
    assert own["slide_sensitivity"] == data["summary"]["slide_level"]["sensitivity"]["value"] == 1.0
    assert own["slide_specificity"] == 1.0 and own["foci_found"] == own["foci"] == 1
    ordered = [points[t] for t in sorted(points)]
    sens = [p["slide_sensitivity"] for p in ordered]
    spec = [p["slide_specificity"] for p in ordered]
    assert sens == sorted(sens, reverse=True) and spec == sorted(spec)
    assert points[0.05]["false_positive_regions_per_slide"] >= own["false_positive_regions_per_slide"]
    rows = list(csv.DictReader(out.with_suffix(".sweep.csv").open()))
    assert len(rows) == 19 and float(rows[9]["threshold"]) == 0.5
    page = out.with_suffix(".html").read_text()
    assert "Operating points" in page
    # the two thresholds to start from, as the sweep's own rows say them
    best = data["sweep_best"]
    top = max(p["dice"] for p in ordered)
    assert best["dice"] == {
        "threshold": min(p["threshold"] for p in ordered if p["dice"] == top),
        "dice": top,
    }
    sc = best["screening"]
    assert sc["slide_sensitivity"] == max(sens) and points[sc["threshold"]]["slide_sensitivity"] == max(sens)
    assert all(p["slide_sensitivity"] < max(sens) for p in ordered if p["threshold"] > sc["threshold"])
    line = f"tumour slides called tumour stay at their best (1.00) up to tile threshold {sc['threshold']:g}"
    assert line in r.output and "operating points on these slides: best mean Dice" in r.output
    assert line in page


def test_best_operating_points_pick_the_best_dice_and_the_most_specific_full_sensitivity() -> None:
    from wsi_pipeline.evaluation.evaluate import best_operating_points, format_best

    def pt(t: float, dice: float | None, sens: float | None, spec: float | None) -> dict:
        return {"threshold": t, "dice": dice, "slide_sensitivity": sens, "slide_specificity": spec}

    points = [pt(0.7, 0.6, 0.5, 1.0), pt(0.3, 0.8, 1.0, 0.5), pt(0.5, 0.8, 1.0, 0.75), pt(0.1, 0.4, 1.0, 0.0)]
    best = best_operating_points(points)
    assert best["dice"] == {"threshold": 0.3, "dice": 0.8}  # a tie: the lower threshold misses less
    assert best["screening"] == {"threshold": 0.5, "slide_sensitivity": 1.0, "slide_specificity": 0.75}
    assert "best mean Dice 0.800 at tile threshold 0.3" in format_best(best)
    assert "benign slides called no tumour 0.75 there" in format_best(best)
    # benign slides only: no Dice and no sensitivity, so nothing to name
    none = best_operating_points([pt(0.5, None, None, 0.9)])
    assert none == {"dice": None, "screening": None} and format_best(none) == ""
    # tumour slides only: no specificity
    only = best_operating_points([pt(0.5, 0.7, 1.0, None), pt(0.9, 0.2, 0.0, None)])
    assert "no benign slides" in format_best(only) and only["screening"]["threshold"] == 0.5
    # no threshold calls any tumour slide: no screening point to name
    missed = best_operating_points([pt(0.5, 0.0, 0.0, 1.0), pt(0.9, 0.0, 0.0, 1.0)])
    assert missed == {"dice": None, "screening": None} and format_best(missed) == ""


def test_a_given_threshold_recomputes_the_slide_label(tmp_path: Path) -> None:
    """--threshold P scores the slide label by the run's rule at P, not the label the run recorded at
    its own threshold."""
    probs = np.full((10, 10), 0.1)
    probs[2:6, 2:6] = 0.6  # 16 cells of 100 px at 0.5 um/px: 0.04 mm^2
    probs[2:4, 2:4] = 0.95  # 0.01 mm^2
    run = _fake_run(tmp_path / "results", "case1", probs)
    manifest = json.loads(run.read_text())
    manifest["label"]["rule"] = {"rule": "area", "tile_threshold": 0.5, "min_area_mm2": 0.02, "top_k": 5,
                                 "topk_threshold": 0.5}  # fmt: skip
    run.write_text(json.dumps(manifest))
    ann = _asap_file(tmp_path / "ann" / "case1.xml", box(200, 200, 600, 600))
    assert evaluate_slide(run, ann)["slide_predicted_positive"]  # the run's own: 0.04 mm^2 >= 0.02
    r = evaluate_slide(run, ann, threshold=0.9)  # only 0.01 mm^2 at 0.9
    assert (
        not r["slide_predicted_positive"] and r["slide_label"] == "no tumour" and not r["slide_label_correct"]
    )


def test_lesion_detection_on_the_grid_equals_the_polygon_outlines() -> None:
    """Regions counted on the cell grid (edge-joined cells) and foci found through cells give what
    the drawn outlines give: shapely's union of the predicted cells' squares, intersected with each
    annotated focus by area (random grids, random foci, corner-touching cells included)."""
    from wsi_pipeline.aggregate import tumour_regions
    from wsi_pipeline.evaluation.metrics import lesion_detection

    rng = np.random.default_rng(5)
    cell = 10.0
    for _ in range(25):
        pred = rng.random((12, 14)) < rng.uniform(0.05, 0.4)
        foci = shapely.unary_union([
            Point(rng.uniform(0, 140), rng.uniform(0, 120)).buffer(rng.uniform(2, 15)) for _ in range(4)
        ])  # fmt: skip
        parts = list(getattr(foci, "geoms", [foci]))
        masks = [rasterize_fraction(g, pred.shape, cell) > 0 for g in parts]
        got = lesion_detection(pred, masks)
        rr, cc = np.nonzero(pred)
        boxes = np.stack([cc * cell, rr * cell, (cc + 1) * cell, (rr + 1) * cell], axis=1)
        union = tumour_regions(boxes, np.ones(len(boxes), bool))
        regions = [g for g in getattr(union, "geoms", [union]) if not g.is_empty]
        found = sum(any(g.intersection(r).area > 0 for r in regions) for g in parts)
        false_pos = sum(not any(r.intersection(g).area > 0 for g in parts) for r in regions)
        assert (got["lesions"], got["found"], got["predicted_regions"], got["false_positive_regions"]) == (
            len(parts), found, len(regions), false_pos,
        )  # fmt: skip
