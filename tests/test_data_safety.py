"""Never lose or mix up a user's files (issue 13, data-loss cases 1-4 and 7).

Each test runs the exact command a user typed and checks that every input file is byte-for-byte
unchanged, that nothing of the user's was deleted or renamed, and that the error is one line with a
non-zero exit.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import select
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TUMOUR_SPEC, Fixture
from testkit.synthetic import write_synthetic_slide
from wsi_pipeline.cli import main

pytestmark = pytest.mark.reliability
SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy(fixture: Fixture, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(fixture.path, dest)
    return dest


def _invoke(*args: str) -> tuple[int, str]:
    quiet = [] if args[0] == "evaluate" else ["-q"]
    res = CliRunner().invoke(main, [*args, *quiet])
    return res.exit_code, res.output


@pytest.mark.parametrize("name", ["a.svs", "a.tif"])
def test_run_refuses_an_output_that_is_the_slide(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path, name: str
) -> None:
    """Case 1: `wsi-infer a.svs --out a.svs` replaced the slide with an 819-byte heatmap (exit 0)."""
    slide = _copy(tumour_slide, tmp_path / name)
    before = _sha(slide)
    code, out = _invoke(str(slide), "--out", str(slide), "--model", str(test_model))
    assert code != 0 and str(slide) in out
    # a .tif slide is caught by the input guard; any other name is not a heatmap name to begin with
    assert ("would overwrite the input" if name.endswith(".tif") else "neither NAME.tif") in out
    assert _sha(slide) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing written beside it


def test_run_refuses_an_output_that_is_the_model(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    from wsi_pipeline.errors import OutputError
    from wsi_pipeline.pipeline import run_slide

    model = tmp_path / "m" / test_model.name
    shutil.copytree(test_model.parent, model.parent)
    before = _sha(model)
    code, out = _invoke(str(tumour_slide.path), "--out", str(model), "--model", str(model))
    assert code == 2 and "neither NAME.tif" in out and str(model) in out
    with pytest.raises(OutputError, match="would overwrite the input"):  # the library's own guard
        run_slide(tumour_slide.path, model, model=model)
    assert _sha(model) == before
    assert sorted(p.name for p in model.parent.iterdir()) == sorted(
        p.name for p in test_model.parent.iterdir()
    )


def test_run_out_names_a_heatmap_or_a_folder(tumour_slide: Fixture, test_model: Path, tmp_path: Path) -> None:
    """`--out results` (no .tif, no such folder) used to write files named `results`,
    `results.overlay.png`, ...; it is refused. `--out results/` makes the folder and writes NAME.tif in it."""
    code, out = _invoke(
        str(tumour_slide.path), "--out", str(tmp_path / "results"), "--model", str(test_model)
    )
    assert (
        code == 2 and "neither NAME.tif nor an existing folder" in out and f"{tmp_path / 'results'}/" in out
    )
    assert list(tmp_path.iterdir()) == []
    code, out = _invoke(
        str(tumour_slide.path), "--out", f"{tmp_path / 'results'}/", "--model", str(test_model)
    )
    assert code == 0, out
    stem = tumour_slide.path.stem
    assert (tmp_path / "results" / f"{stem}.tif").is_file()
    assert (tmp_path / "results" / f"{stem}.run.json").is_file()


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
    assert set(manifests) == {"case1.svs.run.json", "case1.tif.run.json"}
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
    assert names == ["sub1__s.svs.run.json", "sub2__s.svs.run.json"]
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


# --------------------------------------------------------------------------- evaluate: no mix-ups


@pytest.fixture(scope="module")
def two_runs(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from wsi_pipeline.pipeline import RunOptions, run_slide

    results = tmp_path_factory.mktemp("results")
    for fx in (tumour_slide, benign_slide):
        run_slide(fx.path, results / f"{fx.path.stem}.tif", model=test_model, options=RunOptions(workers=2))
    return results


def _tumour_xml(tumour_slide: Fixture, path: Path) -> Path:
    from wsi_pipeline.evaluation.annotations import write_asap_xml

    return write_asap_xml(path, [("Tumor", e.polygon(96)) for e in tumour_slide.spec.tumour])


def test_one_annotation_file_applies_only_to_the_slide_of_its_name(
    two_runs: Path, tumour_slide: Fixture, tmp_path: Path
) -> None:
    """Case 5: `evaluate RESULTS --annotations one.xml` applied that file to every slide."""
    xml = _tumour_xml(tumour_slide, tmp_path / "tumour.xml")
    code, out = _invoke(
        "evaluate", str(two_runs), "--annotations", str(xml), "--out", str(tmp_path / "m.json")
    )
    assert code == 0, out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert [Path(s["slide"]).name for s in metrics["slides"]] == ["tumour.svs"]
    assert [Path(s).name for s in metrics["unannotated"]] == ["benign.svs"]
    other = _tumour_xml(tumour_slide, tmp_path / "somebody-else.xml")
    code, out = _invoke(
        "evaluate", str(two_runs), "--annotations", str(other), "--out", str(tmp_path / "n.json")
    )
    assert code == 9 and "matches none of them by name" in out, out
    # one manifest and one file, both named by the user: an explicit pair, whatever the names
    run = two_runs / "tumour.run.json"
    code, out = _invoke("evaluate", str(run), "--annotations", str(other), "--out", str(tmp_path / "p.json"))
    assert code == 0, out


def test_evaluate_reads_the_outputs_beside_the_manifest(
    two_runs: Path, tumour_slide: Fixture, tmp_path: Path
) -> None:
    """Case 6: tiles.csv was read by the path recorded at run time: from another directory it failed, and a
    copied results folder silently read the original's table."""
    copy = tmp_path / "copied-results"
    shutil.copytree(two_runs, copy)
    for p in two_runs.glob("*.tiles.csv"):
        p.rename(p.with_name(p.name + ".moved"))  # the original tables are gone
    try:
        ann = tmp_path / "ann"
        ann.mkdir()
        _tumour_xml(tumour_slide, ann / "tumour.xml")
        code, out = _invoke(
            "evaluate", str(copy), "--annotations", str(ann), "--out", str(tmp_path / "m.json")
        )
        assert code == 0, out
        (s,) = json.loads((tmp_path / "m.json").read_text())["slides"]
        assert s["dice"] > 0.5
    finally:
        for p in two_runs.glob("*.tiles.csv.moved"):
            p.rename(p.with_name(p.name[: -len(".moved")]))


def test_evaluate_with_nothing_to_score_fails_saying_what_it_searched(two_runs: Path, tmp_path: Path) -> None:
    """Case 24: no matching annotation, or a folder without runs, exited 0 with '0 slides scored'."""
    empty = tmp_path / "ann"
    empty.mkdir()
    code, out = _invoke(
        "evaluate", str(two_runs), "--annotations", str(empty), "--out", str(tmp_path / "m.json")
    )
    assert code == 9 and str(empty) in out and "no annotation" in out, out
    no_runs = tmp_path / "nothing"
    no_runs.mkdir()
    code, out = _invoke(
        "evaluate", str(no_runs), "--annotations", str(empty), "--out", str(tmp_path / "n.json")
    )
    assert code != 0 and "no run manifests" in out, out


# --------------------------------------------------------------------------- bad slides


@pytest.mark.parametrize("size", [100, 5_000, 500_000])
def test_truncated_svs_is_one_line_exit_3_everywhere(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path, size: int
) -> None:
    """Case 8: truncated SVS files gave IndexError tracebacks in info, tile and scoring (the bundled real
    Aperio sample, cut; synthetic tifffile slides cut the same way were already refused cleanly)."""
    cut = tmp_path / f"cut{size}.svs"
    cut.write_bytes(SAMPLE.read_bytes()[:size])
    for args in (
        ["info", str(cut)],
        ["tile", str(cut), "--out", str(tmp_path / "s.zarr"), "-q"],
        [str(cut), "--out", str(tmp_path / "o.tif"), "--model", str(test_model), "-q"],
    ):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 3, (args, res.output)
        assert "Traceback" not in res.output and str(cut) in res.output
        assert "truncated" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [cut.name]


def test_truncated_slide_in_a_folder_does_not_stop_the_batch(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    src = tmp_path / "slides"
    _copy(tumour_slide, src / "b-good.svs")
    (src / "a-cut.svs").write_bytes(SAMPLE.read_bytes()[:5_000])
    out = tmp_path / "out"
    code, text = _invoke(str(src), "--out", str(out), "--model", str(test_model))
    assert code == 1, text
    rows = {Path(r["slide"]).name: r for r in json.loads((out / "summary.json").read_text())["slides"]}
    assert rows["b-good.svs"]["status"] == "ok"
    assert rows["a-cut.svs"]["status"] != "ok" and "truncated" in json.dumps(rows["a-cut.svs"])


def _claiming_tiff(path: Path, claimed: int) -> Path:
    """A 512 x 512 tiled TIFF (4 tiles) whose header is patched to claim ``claimed`` x ``claimed`` px."""
    import struct

    import numpy as np
    import tifffile

    rng = np.random.default_rng(0)
    img = rng.integers(120, 230, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        offsets = tags["ImageWidth"].valueoffset, tags["ImageLength"].valueoffset
        fmt = "<I" if tags["ImageWidth"].dtype == 4 else "<H"
    data = bytearray(path.read_bytes())
    for off in offsets:
        struct.pack_into(fmt, data, off, claimed)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("claimed", [65_000, 1_000_000])
def test_header_claiming_more_pixels_than_the_file_holds_is_refused_at_once(
    tmp_path: Path, claimed: int
) -> None:
    """Case 9: a small TIFF claiming 65,000^2 px ran for minutes; 1e6^2 raised MemoryError."""
    import time

    slide = _claiming_tiff(tmp_path / "claims.tif", claimed)
    for args in (["info", str(slide)], ["tile", str(slide), "--out", str(tmp_path / "s.zarr"), "-q"]):
        t0 = time.perf_counter()
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 3, res.output
        assert f"claims {claimed} x {claimed} px" in res.output and "4 of the" in res.output
        assert time.perf_counter() - t0 < 20  # refused before any work scales with the claim


def test_unknown_compression_is_unreadable_before_any_mpp_question(tmp_path: Path) -> None:
    """Case 10: an unreadable TIFF (unknown compression) was reported as missing mpp."""
    import tifffile

    slide = tmp_path / "odd.tif"
    import numpy as np

    tifffile.imwrite(slide, np.full((512, 512, 3), 128, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="zlib")  # fmt: skip
    with tifffile.TiffFile(slide) as tif:
        off = tif.pages.first.tags["Compression"].valueoffset
    data = bytearray(slide.read_bytes())
    data[off : off + 2] = (52479).to_bytes(2, "little")
    slide.write_bytes(bytes(data))
    for args in (
        ["tile", str(slide), "--out", str(tmp_path / "s.zarr"), "-q"],
        [str(slide), "--out", str(tmp_path / "o.tif"), "-q"],
    ):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 3, res.output
        assert "COMPRESSION" in res.output and "--mpp" not in res.output


def test_uniform_white_slide_has_no_tissue_not_grayscale(tmp_path: Path) -> None:
    """Case 11: a uniform white RGB slide was reported as "grayscale" (exit 3); it has no tissue (exit 5)."""
    import numpy as np
    import tifffile

    slide = tmp_path / "white.tif"
    tifffile.imwrite(slide, np.full((2048, 2048, 3), 255, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")  # fmt: skip
    res = CliRunner().invoke(main, ["tile", str(slide), "--out", str(tmp_path / "s.zarr"), "-q"])
    assert res.exit_code == 5, res.output
    assert "no tissue" in res.output and "grayscale" not in res.output


# --------------------------------------------------------------------------- inputs and outputs


def test_csv_with_excel_bom_and_blank_rows(tumour_slide: Fixture, test_model: Path, tmp_path: Path) -> None:
    """Case 15: a UTF-8 BOM gave "needs a 'slide' column"; blank rows became failed slides."""
    _copy(tumour_slide, tmp_path / "a.svs")
    csv_path = tmp_path / "slides.csv"
    csv_path.write_bytes("\ufeffslide,mpp\r\na.svs,\r\n\r\n   ,  \r\n".encode())
    out = tmp_path / "out"
    code, text = _invoke(str(csv_path), "--out", str(out), "--model", str(test_model))
    assert code == 0, text
    rows = json.loads((out / "summary.json").read_text())["slides"]
    assert [Path(r["slide"]).name for r in rows] == ["a.svs"] and rows[0]["status"] == "ok"
    csv_path.write_text("slide,mpp\na.svs,\n,0.5\n")
    code, text = _invoke(str(csv_path), "--out", str(out), "--model", str(test_model))
    assert code != 0 and "line 3" in text and "empty 'slide' cell" in text


def test_csv_as_a_spreadsheet_saves_it(tumour_slide: Fixture, test_model: Path, tmp_path: Path) -> None:
    """Excel where the decimal mark is a comma saves "CSV" with semicolons (``0,499``), others with
    tabs, headers as typed ("Slide", "MPP"): each used to fail with "needs a 'slide' column"."""
    _copy(tumour_slide, tmp_path / "a.svs")
    csv_path = tmp_path / "slides.csv"
    out = tmp_path / "out"
    for i, text in enumerate(["\ufeffSlide;MPP\r\na.svs;0,5\r\n", "slide\tmpp\na.svs\t0.5\n"]):
        csv_path.write_bytes(text.encode())
        code, log = _invoke(str(csv_path), "--out", str(out / str(i)), "--model", str(test_model))
        assert code == 0, log
        m = json.loads((out / str(i) / "a.run.json").read_text())
        assert m["resolution"]["mpp_source"] == "override" and m["resolution"]["mpp_x"] == 0.5
    _copy(tumour_slide, tmp_path / "Schnitt ä.svs")  # Excel's plain "CSV" on Windows: Windows-1252
    csv_path.write_bytes("slide;mpp\r\nSchnitt ä.svs;0,5\r\n".encode("cp1252"))
    code, log = _invoke(str(csv_path), "--out", str(out / "2"), "--model", str(test_model))
    assert code == 0 and (out / "2" / "Schnitt ä.run.json").is_file(), log
    csv_path.write_text("file;mpp\na.svs;0,5\n")
    code, log = _invoke(str(csv_path), "--out", str(out / "x"), "--model", str(test_model))
    assert code != 0 and "needs a header with a 'slide' column" in log and "'file', 'mpp'" in log


def test_a_csv_written_on_windows_is_read_with_its_paths(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """`sub\\a.svs` (a relative path written on Windows) was "no such file" here: its backslashes are
    folder separators. `C:\\slides\\b.svs` and a share path cannot be opened on this machine, and
    the error now says that, not "check the path" beside the CSV's folder."""
    _copy(tumour_slide, tmp_path / "sub" / "a.svs")
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text("slide\r\nsub\\a.svs\r\nC:\\slides\\b.svs\r\n\\\\server\\share\\c.svs\r\n")
    out = tmp_path / "out"
    code, text = _invoke(str(csv_path), "--out", str(out), "--model", str(test_model))
    assert code == 1, text
    rows = json.loads((out / "summary.json").read_text())["slides"]
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert rows[0]["slide"] == str(tmp_path / "sub" / "a.svs")
    assert rows[1]["error"].startswith("C:\\slides\\b.svs: a Windows path, which this machine cannot open")
    assert "a Windows path" in rows[2]["error"] and rows[2]["error_code"] == 3


def test_a_slide_listed_twice_in_a_csv_is_scored_once(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A manifest that lists one slide on three lines (``a.svs``, again, ``./a.svs``) scored it three
    times under a hashed name (``a.svs~cfee317d``), each copy taking the other for "another run"; with
    two mpp values it would have kept whichever finished last. Now it is scored once, named ``a``, with
    a note; different mpp for one slide stop the run before any work, naming both lines."""
    _copy(tumour_slide, tmp_path / "a.svs")
    csv_path = tmp_path / "slides.csv"
    csv_path.write_text("slide,mpp\na.svs,\na.svs,\n./a.svs,\n")
    out = tmp_path / "out"
    code, text = _invoke(str(csv_path), "--out", str(out), "--model", str(test_model))
    assert code == 0, text
    assert "note: slides.csv: a.svs is listed on lines 2, 3, 4; taken once" in text
    assert "another run" not in text
    rows = json.loads((out / "summary.json").read_text())["slides"]
    assert [(Path(r["slide"]).name, r["status"]) for r in rows] == [("a.svs", "ok")]
    assert (out / "a.run.json").is_file() and not list(out.glob("*~*"))
    csv_path.write_text("slide,mpp\na.svs,0.5\n./a.svs,0.25\n")
    code, text = _invoke(str(csv_path), "--out", str(tmp_path / "out2"), "--model", str(test_model))
    assert code != 0 and "lines 2 and 3 list a.svs with different mpp (0.5 and 0.25)" in text, text
    assert not (tmp_path / "out2").exists()
    code, text = _invoke("tile", str(csv_path), "--out", str(tmp_path / "stores"))
    assert code != 0 and "different mpp" in text, text  # `tile` takes a manifest too (it said "not a slide")
    csv_path.write_text("slide,mpp\na.svs,0.5\n./a.svs,0.5\n")
    code, text = _invoke("tile", str(csv_path), "--out", str(tmp_path / "stores"))
    assert code == 0 and "taken once" in text, text
    report = json.loads((tmp_path / "stores" / "a.tile-report.json").read_text())
    assert report["store"]["resolution"]["mpp_source"] == "override"


def test_out_naming_an_existing_folder_for_one_slide(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Case 16: `--out` naming an existing folder scored the slide, then failed writing. The CLI now
    writes DIR/<slide>.tif; the Python API refuses a folder before any work."""
    from wsi_pipeline.errors import OutputError
    from wsi_pipeline.pipeline import RunOptions, run_slide

    folder = tmp_path / "results"
    folder.mkdir()
    code, text = _invoke(str(tumour_slide.path), "--out", str(folder), "--model", str(test_model))
    assert code == 0, text
    assert (folder / f"{tumour_slide.path.stem}.tif").is_file()
    assert (folder / f"{tumour_slide.path.stem}.run.json").is_file()
    with pytest.raises(OutputError, match="is a folder"):
        run_slide(tumour_slide.path, folder, model=test_model, options=RunOptions(workers=2))


# --------------------------------------------------------------------------- concurrency and leftovers


def _write_many(args: tuple[str, int]) -> int:
    from wsi_pipeline.provenance import atomic_write_bytes

    path, tag = args
    failures = 0
    for i in range(50):
        try:
            atomic_write_bytes(path, f"{tag}:{i}\n".encode() * 2000)
        except OSError:
            failures += 1
    return failures


def test_two_processes_writing_one_file_never_break_each_other(tmp_path: Path) -> None:
    """Case 18: 11 of 50 writes failed because each writer's stale-temp cleanup deleted the other's
    temporary file."""
    import multiprocessing as mp

    target = tmp_path / "summary.json"
    with mp.get_context("fork").Pool(2) as pool:
        failures = pool.map(_write_many, [(str(target), 1), (str(target), 2)])
    assert failures == [0, 0]
    text = target.read_text()
    assert len(set(text.splitlines())) == 1  # one whole write, never a mix
    assert not list(tmp_path.glob(".summary.json.*.tmp"))


def test_temp_file_of_a_dead_writer_is_cleaned(tmp_path: Path) -> None:
    from wsi_pipeline.provenance import atomic_write_bytes

    dead = tmp_path / ".out.json.999999999.abc.tmp"  # no such PID
    legacy = tmp_path / ".out.json.xyz.tmp"
    dead.write_text("half")
    legacy.write_text("half")
    atomic_write_bytes(tmp_path / "out.json", b"{}")
    assert not dead.exists() and not legacy.exists()


def test_two_tile_processes_on_one_store(tumour_slide: Fixture, tmp_path: Path) -> None:
    """Case 17: the second `tile` process died with KeyError: 'chunk_done' and left a .partial behind.
    Now it gets one clean error while the first holds the store, and the first finishes normally."""
    import fcntl
    import os

    store = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)  # a first writer holds the store (this test process)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242", 0)
    try:
        import subprocess
        import sys

        res = subprocess.run(
            [sys.executable, "-m", "wsi_pipeline.cli", "tile", str(tumour_slide.path), "--out", str(store), "-q"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        lock.unlink()
    assert res.returncode == 11, res.stderr  # BusyError: another run is working on it
    assert "another run (4242) is writing this tile store" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind by the refused run
    code, out = _invoke("tile", str(tumour_slide.path), "--out", str(store))
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tile-report.json", "s.zarr"]  # no lock left


# --------------------------------------------------------------------------- annotations


def _asap(path: Path, coords: list[tuple[str, str]]) -> Path:
    pts = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(coords))
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" '
        f'PartOfGroup="Tumor"><Coordinates>{pts}</Coordinates></Annotation></Annotations>'
        "<AnnotationGroups/></ASAP_Annotations>"
    )
    return path


def test_comma_decimal_asap_xml_is_read(tmp_path: Path) -> None:
    """Case 20: ASAP XML written under a comma-decimal locale (X="2100,0000") was refused whole."""
    from wsi_pipeline.evaluation.annotations import read_asap_xml

    comma = _asap(
        tmp_path / "c.xml", [("100,0000", "100,0000"), ("2100,5000", "100,0000"), ("2100,5000", "900,2500")]
    )
    dot = _asap(tmp_path / "d.xml", [("100.0", "100.0"), ("2100.5", "100.0"), ("2100.5", "900.25")])
    assert read_asap_xml(comma).tumour.equals(read_asap_xml(dot).tumour)
    assert read_asap_xml(comma).tumour.area == pytest.approx(0.5 * 2000.5 * 800.25)


def test_absurd_coordinates_are_refused_and_json_stays_strict(tmp_path: Path) -> None:
    """Case 21: coordinates of 1e300 gave shapely warnings and Infinity in metrics.json."""
    from wsi_pipeline.errors import AnnotationError
    from wsi_pipeline.evaluation.annotations import read_annotations
    from wsi_pipeline.provenance import atomic_write_json

    bad = _asap(tmp_path / "b.xml", [("0", "0"), ("1e300", "0"), ("1e300", "1e300")])
    with pytest.raises(AnnotationError, match="far outside any slide"):
        read_annotations(bad)
    geo = tmp_path / "b.geojson"
    geo.write_text(json.dumps({"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [[[0, 0], [1e300, 0], [1e300, 1e300], [0, 0]]]}}))  # fmt: skip
    with pytest.raises(AnnotationError, match="far outside any slide"):
        read_annotations(geo)
    out = atomic_write_json(tmp_path / "m.json", {"a": float("inf"), "b": [float("nan"), 1.5]})
    assert json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) == {
        "a": None, "b": [None, 1.5]}  # fmt: skip


def test_polygon_outside_the_slide_counts_consistently(two_runs: Path, tmp_path: Path) -> None:
    """Case 22: a polygon wholly outside the slide gave pixel metrics of 'no tumour' (Dice 1.0) while the
    slide-level truth said tumour."""
    ann = tmp_path / "ann"
    ann.mkdir()
    _asap(ann / "benign.xml", [("1e7", "1e7"), ("1.1e7", "1e7"), ("1.1e7", "1.1e7")])
    res = CliRunner().invoke(
        main, ["evaluate", str(two_runs), "--annotations", str(ann), "--out", str(tmp_path / "m.json")]
    )
    assert res.exit_code == 0, res.output
    (s,) = json.loads((tmp_path / "m.json").read_text())["slides"]
    assert s["slide_truth_positive"] is False  # same clipped truth as the pixel metrics
    assert s["annotation_outside_slide_fraction"] == 1.0
    assert "lies outside the slide" in res.output


def test_empty_annotation_file_means_no_tumour(two_runs: Path, tmp_path: Path) -> None:
    """Case 23: a 0-byte annotation file was 'malformed XML' although the README says it means no tumour."""
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "benign.xml").write_bytes(b"")
    (ann / "tumour.geojson").write_bytes(b"  \n")
    res = CliRunner().invoke(
        main, ["evaluate", str(two_runs), "--annotations", str(ann), "--out", str(tmp_path / "m.json")]
    )
    assert res.exit_code == 0, res.output
    rows = {Path(s["slide"]).name: s for s in json.loads((tmp_path / "m.json").read_text())["slides"]}
    assert (
        rows["benign.svs"]["slide_truth_positive"] is False
        and rows["tumour.svs"]["slide_truth_positive"] is False
    )


def test_failed_runs_leave_no_empty_output_folders(test_model: Path, tmp_path: Path) -> None:
    """Case 19: failed runs left empty output folders."""
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"not a slide" * 100)
    code, _ = _invoke(
        str(bad), "--out", str(tmp_path / "new" / "deeper" / "x.tif"), "--model", str(test_model)
    )
    assert code == 3
    code, _ = _invoke("tile", str(bad), "--out", str(tmp_path / "stores" / "x.zarr"))
    assert code == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.svs"]


def test_old_store_left_by_a_kill_inside_finalize_is_removed(tumour_slide: Fixture, tmp_path: Path) -> None:
    """Case 19: a kill at the very end (between the renames of finalize) left `.old-PID` folders."""
    store = tmp_path / "s.zarr"
    assert _invoke("tile", str(tumour_slide.path), "--out", str(store))[0] == 0
    shutil.copytree(store, tmp_path / "s.zarr.old-999999999")  # a dead writer's old store
    (tmp_path / "s.zarr.old-notes").mkdir()  # not ours: left alone
    code, out = _invoke("tile", str(tumour_slide.path), "--out", str(store))
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tile-report.json", "s.zarr", "s.zarr.old-notes"]


def test_symlink_loop_is_one_line_exit_3(test_model: Path, tmp_path: Path) -> None:
    (tmp_path / "a.svs").symlink_to(tmp_path / "b.svs")
    (tmp_path / "b.svs").symlink_to(tmp_path / "a.svs")
    for args in (["info", str(tmp_path / "a.svs")], [str(tmp_path / "a.svs"), "--out", str(tmp_path / "o" / "x.tif"),
                                                     "--model", str(test_model), "-q"]):  # fmt: skip
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 3 and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_link_to_a_moved_slide_fails_named_in_a_folder_run(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """A folder of links into slide storage where one slide moved (or its share is not mounted): that
    slide is a failed row saying so, not silently absent from the run; the others are scored."""
    src = tmp_path / "slides"
    _copy(tumour_slide, tmp_path / "store" / "a.svs")
    src.mkdir()
    (src / "a.svs").symlink_to(tmp_path / "store" / "a.svs")
    (src / "b.svs").symlink_to(tmp_path / "store" / "b.svs")  # b.svs was moved away
    out = tmp_path / "out"
    res = CliRunner().invoke(main, [str(src), "--out", str(out), "--model", str(test_model), "-q"])
    assert res.exit_code == 1, res.output
    rows = {Path(r["slide"]).name: r for r in csv.DictReader((out / "summary.csv").open())}
    assert rows["a.svs"]["status"] == "ok"
    assert rows["b.svs"]["status"] == "failed"
    assert f"a link to {tmp_path / 'store' / 'b.svs'}, which does not exist" in rows["b.svs"]["error"]
    assert "b.svs: a link to" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(("signame", "code", "says"), [
    ("SIGINT", 130, "interrupted; re-run the same command to resume"),
    ("SIGTERM", 143, "terminated (SIGTERM: a time limit, docker stop, a shutdown); re-run the same command"),
    ("SIGHUP", 129, "hung up (SIGHUP: the terminal or SSH session closed"),
])  # fmt: skip
def test_a_stopped_folder_run_says_so_keeps_its_record_and_resumes(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path, signame: str, code: int, says: str
) -> None:
    """Ctrl-C, and SIGTERM (a SLURM time limit, docker stop: the process used to die where it stood,
    with no summary): one line saying how to resume; nothing half-written; summary.json and
    report.html list the slides done and those not run; the re-run finishes the rest."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "slides"
    for i in range(8):
        _copy(tumour_slide, src / f"s{i}.svs")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(src), "--out", str(out), "--model", str(test_model),
           "--chunk-tiles", "8", "-q"]  # fmt: skip

    def default_signals() -> None:  # a test run in the background (`pytest &`) has SIGINT ignored, and
        for sig in (signal.SIGINT, signal.SIGHUP):  # under nohup SIGHUP: its children would inherit that
            signal.signal(sig, signal.SIG_DFL)

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.run.json")):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == code, err
    assert says in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and len(summary["slides"]) == 8
    status = {Path(r["slide"]).name: r["status"] for r in summary["slides"]}
    done = {p.name.removesuffix(".run.json") + ".svs" for p in out.glob("*.run.json")}
    assert done and {k for k, v in status.items() if v == "ok"} == done, (status, done)
    assert set(status.values()) == {"ok", "not run (interrupted)"}, status
    assert "This run was interrupted before its end" in (out / "report.html").read_text()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("*.run.json"))) == 8
    assert "interrupted" not in json.loads((out / "summary.json").read_text())


def _slides(tumour_slide: Fixture, root: Path, n: int) -> Path:
    src = root / "slides"
    for i in range(n):
        _copy(tumour_slide, src / f"s{i}.svs")
    return src


def test_a_console_that_goes_away_does_not_stop_the_run(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """`wsi-infer slides/ --out res/ | head -1` (or a `tee` that dies): the next line raised
    BrokenPipeError, and the run stopped after its first slide with no summary. The results are files:
    the run now lets the console go and finishes every slide."""
    import subprocess
    import sys

    src = _slides(tumour_slide, tmp_path, 3)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(src), "--out", str(out), "--model", str(test_model)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"[1/3]")
    proc.stdout.close()  # as `head -1` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = json.loads((out / "summary.json").read_text())["slides"]
    assert [r["status"] for r in rows] == ["ok"] * 3


def test_a_hung_up_terminal_stops_the_run_in_order(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """The SSH session of an interactive run closes: its terminal hangs up (SIGHUP, and every write to
    it fails with EIO). The run used to die where it stood, with no summary. It now stops as Ctrl-C
    does: the slide being written is finished, the summary says which slides were not run, exit 129,
    and the one line goes to stderr where that is a file."""
    import fcntl
    import pty
    import signal
    import subprocess
    import sys
    import termios
    import time

    src = _slides(tumour_slide, tmp_path, 6)
    out = tmp_path / "out"
    log = tmp_path / "stderr.txt"
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # the pty becomes the session's terminal, as sshd's is
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # not ignored, even when the tests run under nohup
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(src), "--out", str(out), "--model", str(test_model),
           "--chunk-tiles", "8"]  # fmt: skip
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=err, preexec_fn=controlling_terminal)
    os.close(slave)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*.run.json")):
        try:  # keep the terminal drained, as a terminal emulator does
            os.read(master, 65536) if select.select([master], [], [], 0.05)[0] else None
        except OSError:
            break
    os.close(master)  # hang up
    proc.wait(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the hang-up")
    assert proc.returncode == 129, log.read_text()
    assert "hung up (SIGHUP" in log.read_text() and "Traceback" not in log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert "ok" in {r["status"] for r in summary["slides"]}
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]


# --- files that share an output's name but are not ours ------------------------------------------


def _folder_of_two(tumour_slide: Fixture, benign_slide: Fixture, root: Path) -> Path:
    src = root / "slides"
    _copy(tumour_slide, src / "case1.svs")
    _copy(benign_slide, src / "case2.svs")
    return src


ANNOTATION = b'{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"by":"pathologist"}}]}'


def test_folder_run_into_the_slide_folder_never_replaces_a_pathologists_geojson(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Case 24: with --out the slide folder (as the README allows), a QuPath export `case1.geojson`
    beside `case1.svs` was silently replaced by the run's GeoJSON."""
    src = _folder_of_two(tumour_slide, benign_slide, tmp_path)
    (src / "case1.geojson").write_bytes(ANNOTATION)
    code, out = _invoke(str(src), "--out", str(src), "--model", str(test_model))
    assert code == 1  # case1 failed, case2 ran
    assert f"{src / 'case1.geojson'}: already exists and was not written by wsi-pipeline" in out
    assert (src / "case1.geojson").read_bytes() == ANNOTATION
    assert not (src / "case1.tif").exists() and not (src / "case1.run.json").exists()
    assert (src / "case2.run.json").is_file()


def test_reruns_replace_their_own_outputs_but_not_ones_edited_since(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    from wsi_pipeline.io.ownership import has_mark

    slide = _copy(tumour_slide, tmp_path / "case1.svs")
    res = tmp_path / "res"
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model))
    assert code == 0, out
    written = sorted(res.iterdir())
    assert len(written) == 8 and all(has_mark(p) for p in written), [
        p.name for p in written if not has_mark(p)
    ]
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model), "--overwrite")
    assert code == 0, out  # its own files, unchanged: replaced
    # QuPath opened the GeoJSON, the pathologist corrected it and saved it under the same name
    edited = res / "case1.geojson"
    edited.write_bytes(ANNOTATION)
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model))
    assert code == 0 and "already done" in out  # resuming writes nothing: the slide is skipped as before
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model), "--overwrite")
    assert (
        code == 6
        and f"{edited}: already exists and was not written by wsi-pipeline (or was changed since)" in out
    )
    assert edited.read_bytes() == ANNOTATION


def test_outputs_of_versions_before_the_marks_are_still_replaced(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Older versions wrote no mark into the PNG, GeoJSON and HTML and no sha256 into the manifest:
    the manifest that lists them is what makes them ours."""
    from PIL import Image

    slide = _copy(tumour_slide, tmp_path / "case1.svs")
    res = tmp_path / "res"
    assert _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model))[0] == 0
    geo = json.loads((res / "case1.geojson").read_text())
    del geo["generator"]
    (res / "case1.geojson").write_text(json.dumps(geo))
    Image.open(res / "case1.overlay.png").save(res / "case1.overlay.png")  # without the text chunk
    html = (res / "case1.report.html").read_text()
    (res / "case1.report.html").write_text(html.replace('<meta name="generator"', '<meta name="x"'))
    manifest = json.loads((res / "case1.run.json").read_text())
    del manifest["output_sha256"]
    (res / "case1.run.json").write_text(json.dumps(manifest))
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model), "--overwrite")
    assert code == 0, out
    assert "generator" in json.loads((res / "case1.geojson").read_text())


def test_folder_run_stops_before_any_slide_on_a_report_html_of_the_labs(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    src = _folder_of_two(tumour_slide, benign_slide, tmp_path)
    res = tmp_path / "res"
    res.mkdir()
    (res / "report.html").write_text("<html><title>Lab QA report, November</title></html>")
    code, out = _invoke(str(src), "--out", str(res), "--model", str(test_model))
    assert code == 6 and f"{res / 'report.html'}: already exists and was not written by wsi-pipeline" in out
    assert sorted(p.name for p in res.iterdir()) == ["report.html"]
    # the folder's own report and summaries are replaced by the next run
    (res / "report.html").unlink()
    assert _invoke(str(src), "--out", str(res), "--model", str(test_model))[0] == 0
    assert _invoke(str(src), "--out", str(res), "--model", str(test_model), "--overwrite")[0] == 0


def test_tile_never_replaces_a_tile_report_it_did_not_write(tumour_slide: Fixture, tmp_path: Path) -> None:
    report = tmp_path / "case1.tile-report.json"
    report.write_text('{"qa": "the lab\'s own notes"}')
    code, out = _invoke("tile", str(tumour_slide.path), "--out", str(tmp_path / "case1.zarr"))
    assert code == 6 and f"{report}: already exists and was not written by wsi-pipeline" in out
    assert report.read_text() == '{"qa": "the lab\'s own notes"}'
    assert not (tmp_path / "case1.zarr").exists()


def test_run_never_replaces_another_slide_named_as_the_output(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """`wsi-infer case1.svs --out case2.tif` where case2.tif is another (generic TIFF) slide of the lab:
    not an input of this run, so the input guard let the heatmap replace it."""
    other = _copy(benign_slide, tmp_path / "case2.tif")
    before = _sha(other)
    code, out = _invoke(str(tumour_slide.path), "--out", str(other), "--model", str(test_model))
    assert code == 6 and f"{other}: already exists and was not written by wsi-pipeline" in out
    assert _sha(other) == before and sorted(p.name for p in tmp_path.iterdir()) == ["case2.tif"]


def test_a_moved_results_folder_links_its_own_reports_and_knows_its_own_outputs(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Results copied to the lab's share and re-run there (to add new slides): the folder report
    linked each skipped slide's page at the old location (`../res1/case1.report.html`)."""
    from PIL import Image

    from wsi_pipeline.errors import OutputError
    from wsi_pipeline.io.ownership import refuse_foreign_files

    src = _folder_of_two(tumour_slide, benign_slide, tmp_path)
    assert _invoke(str(src), "--out", str(tmp_path / "res1"), "--model", str(test_model))[0] == 0
    res = tmp_path / "res2"
    shutil.move(tmp_path / "res1", res)
    code, out = _invoke(str(src), "--out", str(res), "--model", str(test_model))
    assert code == 0 and out.count("already done") == 2, out
    rows = list(csv.DictReader((res / "summary.csv").open()))
    assert [r["report"] for r in rows] == ["case1.report.html", "case2.report.html"]
    html = (res / "report.html").read_text()
    assert 'href="case1.report.html"' in html and "res1" not in html
    # the manifest's checksums still prove its outputs in the new place (no mark needed)
    png = res / "case1.overlay.png"
    Image.open(png).save(png)  # the same picture without our Software chunk
    manifest = json.loads((res / "case1.run.json").read_text())
    manifest["output_sha256"]["overlay"] = hashlib.sha256(png.read_bytes()).hexdigest()
    (res / "case1.run.json").write_text(json.dumps(manifest))
    refuse_foreign_files([png], manifest=res / "case1.run.json")
    png.write_bytes(png.read_bytes() + b"\0")  # changed since: not ours
    with pytest.raises(OutputError, match="was not written by wsi-pipeline"):
        refuse_foreign_files([png], manifest=res / "case1.run.json")


def test_another_models_results_are_kept_unless_overwrite(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    """Results of one model are not replaced by another model's run into the same folder (a model
    upgrade, a lab's own model tried on the archive): that slide fails naming both models and the way
    out, the folder run goes on; --overwrite replaces them."""
    from conftest import write_test_model

    other = write_test_model(tmp_path / "other", name="other-model", ood_d_ref=50.0)
    src = tmp_path / "slides"
    slide = _copy(tumour_slide, src / "case1.svs")
    res = tmp_path / "res"
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(test_model))
    assert code == 0, out
    before = {p.name: _sha(p) for p in res.iterdir()}
    code, out = _invoke(str(slide), "--out", f"{res}/", "--model", str(other))
    assert code == 6, out
    assert f"{res / 'case1.run.json'}: holds the results of model colour-model test" in out
    assert "not of other-model test" in out and "give another --out to keep both, or --overwrite" in out
    assert {p.name: _sha(p) for p in res.iterdir()} == before  # nothing of them changed
    # a folder run: that slide is reported, the new one is scored
    _copy(benign_slide, src / "case2.svs")
    code, out = _invoke(str(src), "--out", f"{res}/", "--model", str(other))
    assert code == 1, out
    rows = {Path(r["slide"]).name: r for r in csv.DictReader((res / "summary.csv").open())}
    assert rows["case1.svs"]["status"] == "failed" and rows["case1.svs"]["error_code"] == "6"
    assert rows["case2.svs"]["status"] == "ok"
    assert all(_sha(res / name) == sha for name, sha in before.items())
    code, out = _invoke(str(src), "--out", f"{res}/", "--model", str(other), "--overwrite")
    assert code == 0, out
    assert json.loads((res / "case1.run.json").read_text())["model"]["name"] == "other-model"
