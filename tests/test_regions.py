"""--regions: only the tissue inside a pathologist's polygons is tiled and scored; exclusions are cut
out; a file for another slide, or with no area, is refused naming it; the regions are part of what a
finished run must share to be skipped."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from shapely import box

from conftest import Fixture
from wsi_pipeline.cli import main
from wsi_pipeline.errors import AnnotationError
from wsi_pipeline.evaluation.annotations import write_asap_xml
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.regions import read_regions, region_mask, regions_for, slide_geometry


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _geojson(path: Path, polygons: list[tuple[str, list[tuple[float, float]]]]) -> Path:
    feats = [
        {"type": "Feature", "properties": {"classification": {"name": name}},
         "geometry": {"type": "Polygon", "coordinates": [[*map(list, pts), list(pts[0])]]}}
        for name, pts in polygons
    ]  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def _boxes(plan: Any) -> np.ndarray:
    return np.asarray(plan.grid.boxes_l0(plan.colrow), float)


def test_tiles_lie_inside_the_regions_and_exclusions_are_cut_out(
    aperio_slide: Fixture, tmp_path: Path
) -> None:
    """A region over the left half of the tissue, with an excluded square in it (ASAP group _2): every
    kept tile has at least --min-tissue of its area inside region minus exclusion; the rest of the
    tissue gives none."""
    region, hole = _rect(500, 200, 1700, 1900), _rect(850, 550, 1550, 1450)
    ann = write_asap_xml(tmp_path / "aperio.xml", [("ROI", region), ("_2", hole)])
    limit = read_regions(ann)
    assert limit.format == "asap" and limit.polygons == 1
    reader = open_slide(aperio_slide.path)
    whole = plan_slide(reader, TileOptions())
    opts = TileOptions(regions=limit)
    part = plan_slide(reader, opts)
    area = box(*region[0], *region[2]).difference(box(*hole[0], *hole[2]))
    boxes = _boxes(part)
    inside = np.array([area.intersection(box(*b)).area / box(*b).area for b in boxes])
    assert 0 < part.n_tiles < whole.n_tiles
    assert (inside >= opts.min_tissue_fraction - 0.05).all()  # the mask's pixels are 8 um: a little slack
    in_hole = [box(*b).within(box(*hole[0], *hole[2]).buffer(1)) for b in _boxes(whole)]
    assert any(in_hole) and not any(box(*b).within(box(*hole[0], *hole[2]).buffer(1)) for b in boxes)
    assert part.regions is not None and part.regions["sha256"] == limit.sha256
    assert part.regions["area_mm2"] == pytest.approx(area.area * 0.25**2 / 1e6, rel=1e-3)
    assert opts.store_params()["regions_sha256"] == limit.sha256
    assert "regions_sha256" not in TileOptions().store_params()  # runs without regions keep their params


def test_qupath_geojson_is_moved_from_qupath_frame_and_cut_to_the_slide(tmp_path: Path) -> None:
    """On a slide QuPath crops (MIRAX, Leica) its GeoJSON counts from the scanned rectangle: moved back
    by the slide's QuPath origin, as evaluate does; ASAP XML is in OpenSlide's frame already."""
    gj = read_regions(_geojson(tmp_path / "a.geojson", [("Tumor", _rect(10, 20, 110, 70))]))
    xml = read_regions(write_asap_xml(tmp_path / "a.xml", [("ROI", _rect(10, 20, 110, 70))]))
    assert slide_geometry(gj, (1000, 500), (5000, 5000)).bounds == (1010, 520, 1110, 570)
    assert slide_geometry(xml, (1000, 500), (5000, 5000)).bounds == (10, 20, 110, 70)
    assert slide_geometry(xml, (0, 0), (60, 5000)).bounds == (10, 20, 60, 70)  # cut to the slide
    mask = region_mask(slide_geometry(xml, (0, 0), (400, 400)), (40, 40), 10.0)
    assert mask[2:7, 1:11].all() and mask.sum() == pytest.approx(5 * 10, abs=12)


def test_bad_region_files_are_refused_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"nope\.xml: no such region file"):
        read_regions(tmp_path / "nope.xml")
    only_excluded = _geojson(tmp_path / "x.geojson", [("Ignore*", _rect(0, 0, 10, 10))])
    with pytest.raises(AnnotationError, match=r"x\.geojson: holds no region to score"):
        read_regions(only_excluded)
    far = read_regions(write_asap_xml(tmp_path / "far.xml", [("ROI", _rect(9000, 9000, 9100, 9100))]))
    with pytest.raises(AnnotationError, match=r"far\.xml: its regions .* lie outside the slide"):
        slide_geometry(far, (0, 0), (3072, 2048))
    (tmp_path / "folder").mkdir()
    with pytest.raises(
        AnnotationError, match=r"s1\.svs: no region file for it in .*s1\.geojson\|\.json\|\.xml"
    ):
        regions_for(Path("/scans/s1.svs"), tmp_path / "folder")


def _magenta(heatmap: Path) -> int:
    """Pixels of the regions' colour on a run's overlay."""
    from PIL import Image

    from wsi_pipeline.io.outputs import ROI_RGB

    img = np.asarray(Image.open(heatmap.with_suffix(".overlay.png")).convert("RGB"))
    return int((img == np.array(ROI_RGB, np.uint8)).all(axis=2).sum())


def test_cli_scores_only_the_regions_and_a_new_file_means_a_new_run(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "res" / "t.tif"
    base = [str(tumour_slide.path), "--out", str(out), "--model", str(test_model), "-q"]
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 0, r.output
    whole = json.loads(out.with_suffix(".run.json").read_text())["n_tiles"]
    assert _magenta(out) == 0
    ann = write_asap_xml(tmp_path / "roi.xml", [("ROI", _rect(300, 200, 2000, 2800))])
    r = CliRunner().invoke(main, [*base, "--regions", str(ann)])
    assert r.exit_code == 0, r.output  # other parameters: scored again, not "already done"
    assert "inside the 1 region(s) of roi.xml" in r.output
    m = json.loads(out.with_suffix(".run.json").read_text())
    assert 0 < m["n_tiles"] < whole and m["tissue"]["regions"]["file"] == str(ann)
    page = Path(m["outputs"]["report"]).read_text()
    assert "scored only inside the regions of" in page and "roi.xml" in page
    assert _magenta(out) > 100  # the overlay outlines the regions (and its legend says so)
    r = CliRunner().invoke(main, [*base, "--regions", str(ann)])
    assert r.exit_code == 0 and "already done" in r.output  # the same file: nothing to do
    off = write_asap_xml(tmp_path / "off.xml", [("ROI", _rect(5, 5, 60, 60))])  # glass, no tissue
    r = CliRunner().invoke(main, [*base, "--regions", str(off)])
    assert r.exit_code == 5 and "no tissue tiles inside the regions of" in r.output and "off.xml" in r.output


def test_folder_run_takes_each_slides_file_and_reports_a_slide_without_one(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    folder, regions = tmp_path / "in", tmp_path / "regions"
    folder.mkdir()
    regions.mkdir()
    for f in (tumour_slide, benign_slide):
        shutil.copy(f.path, folder / f.path.name)
    _geojson(regions / "tumour.geojson", [("Region*", _rect(300, 200, 2000, 2800))])
    out = tmp_path / "results"
    args = [str(folder), "--out", str(out), "--model", str(test_model), "-q"]
    r = CliRunner().invoke(main, [*args, "--regions", str(regions)])
    assert r.exit_code == 1, r.output
    assert "benign.svs: no region file for it in" in r.output
    rows = {Path(x["slide"]).name: x for x in json.loads((out / "summary.json").read_text())["slides"]}
    assert rows["tumour.svs"]["status"] == "ok" and rows["benign.svs"]["status"] == "failed"
    assert rows["benign.svs"]["error_code"] == 9
    r = CliRunner().invoke(main, [*args, "--regions", str(regions / "tumour.geojson")])
    assert r.exit_code == 2 and "a folder run needs a folder of region files" in r.output


def test_a_finished_tile_store_cannot_take_regions(aperio_slide: Fixture, tmp_path: Path) -> None:
    ann = write_asap_xml(tmp_path / "aperio.xml", [("ROI", _rect(500, 200, 1700, 1900))])
    store = tmp_path / "a.zarr"
    r = CliRunner().invoke(
        main, ["tile", str(aperio_slide.path), "--out", str(store), "-q", "--regions", str(ann)]
    )
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "a.tile-report.json").read_text())
    assert report["options"]["regions_sha256"] == read_regions(ann).sha256
    r = CliRunner().invoke(main, [str(store), "--out", str(tmp_path / "s.tif"), "--regions", str(ann)])
    assert r.exit_code == 2 and "is a finished tile store" in r.output
    r = CliRunner().invoke(
        main, [str(store), "--out", str(tmp_path / "s.tif")]
    )  # the store keeps its regions
    assert r.exit_code == 0 and "inside the 1 region(s) of aperio.xml" in r.output, r.output
    m = json.loads((tmp_path / "s.run.json").read_text())
    assert (
        m["tissue"]["regions"]["sha256"] == m["params"]["tile"]["regions_sha256"] == read_regions(ann).sha256
    )
    assert replace(TileOptions(), regions=None) == TileOptions()


def test_python_api_takes_regions_as_tile_options(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """From Python: ``TileOptions(regions=read_regions(path))``, as the README shows."""
    from wsi_pipeline import RunOptions, TileOptions, read_regions, run_slide

    ann = write_asap_xml(tmp_path / "roi.xml", [("ROI", _rect(300, 200, 2000, 2800))])
    opts = RunOptions(tile=TileOptions(regions=read_regions(ann)), workers=1)
    m = run_slide(tumour_slide.path, tmp_path / "t.tif", model=test_model, options=opts)
    assert m["tissue"]["regions"]["sha256"] == read_regions(ann).sha256 and m["n_tiles"] > 0
    assert m["params"]["tile"]["regions_sha256"] == read_regions(ann).sha256


def test_a_csv_manifest_gives_each_slide_its_own_region_file(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A CSV's ``regions`` column (relative to the CSV, like ``slide``): that slide is limited to its
    file, a slide with an empty cell is scored whole; one slide listed with two files is refused."""
    from wsi_pipeline.batch import read_manifest_csv

    write_asap_xml(tmp_path / "t-roi.xml", [("ROI", _rect(300, 200, 2000, 2800))])
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text(f"slide,regions\n{tumour_slide.path},t-roi.xml\n{benign_slide.path},\n")
    items = read_manifest_csv(csv_path)
    assert [i.regions for i in items] == [tmp_path / "t-roi.xml", None]
    out = tmp_path / "res"
    r = CliRunner().invoke(main, [str(csv_path), "--out", str(out), "--model", str(test_model), "-q"])
    assert r.exit_code == 0, r.output
    t, b = (json.loads((out / f"{n}.run.json").read_text()) for n in ("tumour", "benign"))
    assert t["tissue"]["regions"]["file"] == str(tmp_path / "t-roi.xml") and b["tissue"]["regions"] is None
    csv_path.write_text(f"slide,regions\n{tumour_slide.path},t-roi.xml\n{tumour_slide.path},other.xml\n")
    with pytest.raises(Exception, match=r"lines 2 and 3 list tumour.svs with different regions"):
        read_manifest_csv(csv_path)
