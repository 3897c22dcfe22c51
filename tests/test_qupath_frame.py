"""GeoJSON lands where QuPath shows the tissue, also on slides QuPath crops.

OpenSlide's level 0 of a 3DHISTECH MIRAX or Leica SCN slide covers the scanner's whole coordinate plane,
and the ``openslide.bounds-*`` properties give the scanned rectangle inside it; QuPath's OpenSlide server
crops to that rectangle, so its pixel (0, 0) is level-0 pixel (bounds-x, bounds-y). Our GeoJSON used
OpenSlide's plane: imported into QuPath, every tile and tumour outline sat (bounds-x, bounds-y) pixels
off the tissue. The slide here is a Leica SCN written with tifffile whose main image lies at (512, 256)
inside a 2048 x 1536 collection, which OpenSlide opens with those bounds (synthetic: no small real
MIRAX or SCN slide exists in ../shared/data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsi_pipeline.cli import main
from wsi_pipeline.evaluation.annotations import write_asap_xml
from wsi_pipeline.io.slide import open_slide, qupath_origin_l0

MPP = 0.5
COLLECTION = (2048, 1536)  # level-0 px of the scanner's plane
ORIGIN = (512, 256)  # the main image's place in it: QuPath's (0, 0)
MAIN = (1024, 768)
BLOCK = (300, 200, 800, 600)  # dark tissue, in the main image's own pixels (QuPath's frame)


def _nm(px: int) -> int:
    return round(px * MPP * 1000)


def write_leica_scn(path: Path) -> Path:
    """A Leica SCN (BigTIFF, XML description in the Leica namespace) with one brightfield main image
    of two levels placed at :data:`ORIGIN` inside the collection."""
    import tifffile

    img = np.full((MAIN[1], MAIN[0], 3), 236, np.uint8)
    x0, y0, x1, y1 = BLOCK
    img[y0:y1, x0:x1] = (90, 40, 120)  # red 90: the test model's tumour
    xml = f"""<?xml version="1.0" encoding="utf-8"?>
<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">
<collection name="test" sizeX="{_nm(COLLECTION[0])}" sizeY="{_nm(COLLECTION[1])}">
<barcode>TEST</barcode>
<image name="main">
<device model="Leica SCN400" version="1.4"/>
<pixels sizeX="{MAIN[0]}" sizeY="{MAIN[1]}">
<dimension sizeX="{MAIN[0]}" sizeY="{MAIN[1]}" r="0" ifd="0"/>
<dimension sizeX="{MAIN[0] // 4}" sizeY="{MAIN[1] // 4}" r="1" ifd="1"/>
</pixels>
<view sizeX="{_nm(MAIN[0])}" sizeY="{_nm(MAIN[1])}" offsetX="{_nm(ORIGIN[0])}" offsetY="{_nm(ORIGIN[1])}"/>
<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings>
<illuminationSettings><illuminationSource>brightfield</illuminationSource></illuminationSettings>
</scanSettings>
</image>
</collection>
</scn>"""
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for ds in (1, 4):
            tw.write(img[::ds, ::ds], tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                     description=xml if ds == 1 else None, resolution=(1e4 / (MPP * ds),) * 2,
                     resolutionunit="CENTIMETER")  # fmt: skip
    return path


@pytest.fixture(scope="module")
def scn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_leica_scn(tmp_path_factory.mktemp("scn") / "case.scn")


@pytest.fixture(scope="module")
def scored(scn: Path, test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scn-out")
    r = CliRunner().invoke(main, [str(scn), "--out", f"{out}/", "--model", str(test_model), "-q"])
    assert r.exit_code == 0, r.output
    return out


def test_the_synthetic_scn_has_bounds_and_qupaths_origin(scn: Path) -> None:
    reader = open_slide(scn, "openslide")
    try:
        assert reader.vendor == "leica" and reader.dimensions == COLLECTION
        assert reader.properties["openslide.bounds-x"] == str(ORIGIN[0])
        assert qupath_origin_l0(reader) == ORIGIN
        # the block's pixels are at ORIGIN + BLOCK in OpenSlide's plane
        px = reader.read_region((ORIGIN[0] + BLOCK[0] + 5, ORIGIN[1] + BLOCK[1] + 5), 0, (1, 1))
        assert tuple(int(v) for v in px[0, 0]) == pytest.approx((90, 40, 120), abs=6)
    finally:
        reader.close()


def test_info_says_where_qupath_counts_from(scn: Path) -> None:
    r = CliRunner().invoke(main, ["info", str(scn)])
    assert r.exit_code == 0 and f"scanned rectangle from level-0 ({ORIGIN[0]}, {ORIGIN[1]})" in r.output
    r = CliRunner().invoke(main, ["info", str(scn), "--json"])
    assert json.loads(r.output)["qupath_origin_l0"] == list(ORIGIN)


def test_slides_without_bounds_keep_level_0(aperio_slide: object) -> None:
    reader = open_slide(aperio_slide.path, "openslide")  # type: ignore[attr-defined]
    try:
        assert qupath_origin_l0(reader) == (0, 0)
    finally:
        reader.close()


def test_geojson_is_in_qupaths_frame_and_the_tile_table_in_openslides(scored: Path) -> None:
    doc = json.loads((scored / "case.geojson").read_text())
    manifest = json.loads((scored / "case.run.json").read_text())
    assert doc["origin_l0"] == list(ORIGIN) and manifest["qupath_origin_l0"] == list(ORIGIN)
    tiles = np.genfromtxt(scored / "case.tiles.csv", delimiter=",", names=True)
    dets = [f for f in doc["features"] if f["properties"]["objectType"] == "detection"]
    assert len(dets) == len(tiles) > 0
    corners = sorted(tuple(f["geometry"]["coordinates"][0][0]) for f in dets)
    assert corners == sorted(
        (x - ORIGIN[0], y - ORIGIN[1]) for x, y in zip(tiles["x_l0"], tiles["y_l0"], strict=True)
    )
    # In QuPath's frame the tumour outline covers the dark block where QuPath shows it.
    from shapely.geometry import box, shape

    regions = [
        shape(f["geometry"]) for f in doc["features"] if f["properties"].get("name") == "tumour region"
    ]
    assert regions and sum(r.intersection(box(*BLOCK)).area for r in regions) >= 0.9 * box(*BLOCK).area


def test_evaluate_moves_qupath_annotations_back_and_agrees_with_asap(scored: Path, tmp_path: Path) -> None:
    """The same truth drawn in QuPath (its frame) and in ASAP (OpenSlide's level 0) scores the same."""
    x0, y0, x1, y1 = BLOCK
    qupath = tmp_path / "qupath" / "case.geojson"
    qupath.parent.mkdir()
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    qupath.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))  # fmt: skip
    asap = tmp_path / "asap" / "case.xml"
    asap.parent.mkdir()
    ox, oy = ORIGIN
    write_asap_xml(asap, [("tumour", [(x + ox, y + oy) for x, y in ring[:-1]])])
    results = {}
    for name, ann in (("qupath", qupath.parent), ("asap", asap.parent)):
        r = CliRunner().invoke(main, ["evaluate", str(scored), "-a", str(ann), "-o", f"{tmp_path}/{name}/"])
        assert r.exit_code == 0, r.output
        (results[name],) = json.loads((tmp_path / name / "metrics.json").read_text())["slides"]
    q, a = results["qupath"], results["asap"]
    assert q["annotation_origin_l0"] == list(ORIGIN) and a["annotation_origin_l0"] == [0, 0]
    assert q["dice"] == pytest.approx(a["dice"]) and q["dice"] > 0.5
    assert q["tile"]["n_truth_positive"] == a["tile"]["n_truth_positive"] > 0
    assert q["truth_area_mm2"] == pytest.approx(a["truth_area_mm2"])


def test_a_store_of_the_slide_keeps_the_origin(
    scn: Path, scored: Path, test_model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "case.zarr"
    r = CliRunner().invoke(main, ["tile", str(scn), "--out", str(store), "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        main, [str(store), "--out", str(tmp_path / "case.tif"), "--model", str(test_model), "-q"]
    )
    assert r.exit_code == 0, r.output
    from_store = json.loads((tmp_path / "case.geojson").read_text())
    assert from_store["origin_l0"] == list(ORIGIN)
    assert from_store["features"] == json.loads((scored / "case.geojson").read_text())["features"]


def test_results_from_before_the_fix_are_redone_for_cropped_formats_only(
    scn: Path, aperio_slide: object, test_model: Path, tmp_path: Path
) -> None:
    """A finished .scn run whose manifest lacks ``qupath_origin_l0`` (an older version's, GeoJSON in
    OpenSlide's plane) is scored again; an .svs run of the same age is kept (its frame was right)."""
    import shutil

    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy(scn, src / "case.scn")
    shutil.copy(aperio_slide.path, src / "other.svs")  # type: ignore[attr-defined]
    out = tmp_path / "out"
    args = [str(src), "--out", str(out), "--model", str(test_model), "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    for name in ("case", "other"):
        m = out / f"{name}.run.json"
        data = json.loads(m.read_text())
        del data["qupath_origin_l0"]
        m.write_text(json.dumps(data))
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "other.svs: already done" in r.output and "case.scn: already done" not in r.output
    assert json.loads((out / "case.run.json").read_text())["qupath_origin_l0"] == list(ORIGIN)
