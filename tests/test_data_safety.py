"""Never lose or mix up a user's files (issue 13, data-loss cases 1-4 and 7).

Each test runs the exact command a user typed and checks that every input file is byte-for-byte
unchanged, that nothing of the user's was deleted or renamed, and that the error is one line with a
non-zero exit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TUMOUR_SPEC, Fixture
from wsi_pipeline.cli import main
from wsi_pipeline.synthetic import write_synthetic_slide

pytestmark = pytest.mark.reliability


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(fixture: Fixture, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(fixture.path, dest)
    return dest


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, [*args, "-q"])
    return res.exit_code, res.output


@pytest.mark.parametrize("name", ["a.svs", "a.tif"])
def test_run_refuses_an_output_that_is_the_slide(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path, name: str
) -> None:
    """Case 1: `wsi-infer a.svs --out a.svs` replaced the slide with an 819-byte heatmap (exit 0)."""
    slide = _copy(tumour_slide, tmp_path / name)
    before = _sha(slide)
    code, out = _invoke(str(slide), "--out", str(slide), "--model", str(test_model))
    assert code != 0
    assert "would overwrite the input" in out and str(slide) in out
    assert _sha(slide) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written beside it


def test_run_refuses_an_output_that_is_the_model(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m" / test_model.name
    shutil.copytree(test_model.parent, model.parent)
    before = _sha(model)
    code, out = _invoke(str(tumour_slide.path), "--out", str(model), "--model", str(model))
    assert code != 0 and "would overwrite the input" in out
    assert _sha(model) == before


def test_tile_overwrite_never_deletes_an_ordinary_folder(tumour_slide: Fixture, tmp_path: Path) -> None:
    """Case 2: `tile good.svs --out results --overwrite` deleted the contents of results/."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "report.docx").write_bytes(b"a pathologist's report")
    for extra in ([], ["--overwrite"]):
        code, out = _invoke("tile", str(tumour_slide.path), "--out", str(results), *extra)
        assert code == 6, out
        assert "not a wsi-pipeline tile store" in out and "left alone" in out
        assert "pass --overwrite" not in out  # the old message suggested the destructive option
        assert (results / "report.docx").read_bytes() == b"a pathologist's report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_tile_overwrite_still_replaces_a_store_it_wrote(tumour_slide: Fixture, tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    assert _invoke("tile", str(tumour_slide.path), "--out", str(store))[0] == 0
    code, out = _invoke("tile", str(tumour_slide.path), "--out", str(store), "--min-tissue", "0.9")
    assert code == 6 and "other parameters" in out
    code, out = _invoke(
        "tile", str(tumour_slide.path), "--out", str(store), "--min-tissue", "0.9", "--overwrite"
    )
    assert code == 0, out
    meta = json.loads((store / "zarr.json").read_text())["attributes"]["wsi_pipeline"]
    assert meta["params"]["min_tissue_fraction"] == 0.9


def test_tile_refuses_a_store_path_that_is_the_slide(tumour_slide: Fixture, tmp_path: Path) -> None:
    """Case 3: `tile b.svs --out b.svs --overwrite` renamed the slide to b.svs.old-PID."""
    slide = _copy(tumour_slide, tmp_path / "b.svs")
    before = _sha(slide)
    code, out = _invoke("tile", str(slide), "--out", str(slide), "--overwrite")
    assert code != 0 and "would overwrite the input" in out
    assert _sha(slide) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.svs"]


def test_slides_sharing_a_stem_get_their_own_outputs(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Case 4: `case1.svs` + `case1.tif` in one folder both wrote case1.heatmap.*; the second overwrote
    the first and every resume recomputed both."""
    src = tmp_path / "slides"
    _copy(tumour_slide, src / "case1.svs")
    _copy(tumour_slide, src / "case1.tif")
    out = tmp_path / "out"
    code, text = _invoke(str(src), "--out", str(out), "--model", str(test_model))
    assert code == 0, text
    manifests = {p.name: json.loads(p.read_text()) for p in out.glob("*.run.json")}
    assert set(manifests) == {"case1.svs.heatmap.run.json", "case1.tif.heatmap.run.json"}
    assert {Path(m["slide"]).name for m in manifests.values()} == {"case1.svs", "case1.tif"}
    code, text = _invoke(str(src), "--out", str(out), "--model", str(test_model))  # resume: both skipped
    assert code == 0 and text.count("already done") == 2, text


def test_csv_slides_with_one_name_in_two_folders_get_their_own_outputs(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    _copy(tumour_slide, tmp_path / "sub1" / "s.svs")
    other = write_synthetic_slide(tmp_path / "sub2" / "s.svs", TUMOUR_SPEC, kind="generic")
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text("slide\nsub1/s.svs\nsub2/s.svs\n")
    out = tmp_path / "out"
    code, text = _invoke(str(csv_path), "--out", str(out), "--model", str(test_model))
    assert code == 0, text
    names = sorted(p.name for p in out.glob("*.run.json"))
    assert names == ["sub1__s.svs.heatmap.run.json", "sub2__s.svs.heatmap.run.json"]
    slides = {json.loads((out / n).read_text())["slide"] for n in names}
    assert slides == {str(tmp_path / "sub1" / "s.svs"), str(other)}


def test_folder_run_into_its_own_folder_does_not_score_its_outputs(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Case 7: running a folder twice with --out inside it treated its own *.heatmap.tif as slides."""
    src = tmp_path / "slides"
    _copy(tumour_slide, src / "case.svs")
    for _ in range(2):
        code, text = _invoke(str(src), "--out", str(src), "--model", str(test_model), "--overwrite")
        assert code == 0, text
    summary = json.loads((src / "summary.json").read_text())
    assert [Path(r["slide"]).name for r in summary["slides"]] == ["case.svs"], summary
