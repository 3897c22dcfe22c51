"""DICOM slides: a series of .dcm files is one slide, in folder runs, as a folder argument and on disk."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import shared
from testkit.dicomslide import write_dicom_slide
from wsi_pipeline.batch import batch_items, find_slides, output_stems
from wsi_pipeline.cli import main
from wsi_pipeline.errors import SlideError
from wsi_pipeline.io.dicom import group_series, is_dicom_slide_folder, series_file
from wsi_pipeline.io.slide import open_slide, slide_fingerprint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "CMU-1-Small-Region.svs"


def _rgb(h: int = 300, w: int = 420, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _sample_rgb() -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(SAMPLE)) as s:
        return np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))


def test_a_series_is_one_slide_opened_from_its_folder_with_its_pixels(tmp_path: Path) -> None:
    rgb = _rgb()
    files = write_dicom_slide(tmp_path / "case", rgb, mpp=0.5, tile=128, levels=2)
    assert len(files) == 3  # two levels and a thumbnail
    (series,) = group_series(files)
    assert series.main == files[0] and series.files == tuple(files)
    assert is_dicom_slide_folder(tmp_path / "case") and series_file(tmp_path / "case") == files[0]
    reader = open_slide(tmp_path / "case")
    try:
        assert reader.level_count == 2 and reader.dimensions == (420, 300)
        assert reader.metadata_mpp() == pytest.approx((0.5, 0.5))
        np.testing.assert_array_equal(reader.read_region((0, 0), 0, (420, 300)), rgb)
    finally:
        reader.close()


def test_folders_with_several_series_or_none_are_refused_naming_the_folder(tmp_path: Path) -> None:
    write_dicom_slide(tmp_path / "two", _rgb(seed=1), mpp=0.5, prefix="a")
    write_dicom_slide(tmp_path / "two", _rgb(seed=2), mpp=0.5, prefix="b")
    assert not is_dicom_slide_folder(tmp_path / "two")
    with pytest.raises(SlideError, match=r"two: holds 2 DICOM series \(slides\), not one.*a_0\.dcm"):
        open_slide(tmp_path / "two")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("x")
    with pytest.raises(SlideError, match="none: a folder, not a slide file, and it holds no DICOM"):
        open_slide(tmp_path / "none")


def test_folder_runs_find_each_series_once(tmp_path: Path) -> None:
    """Flat: one slide per series (its VOLUME file), an unreadable .dcm on its own; subfolders: the
    folder of one series, the files of a folder holding several."""
    src = tmp_path / "src"
    a = write_dicom_slide(src, _rgb(seed=1), mpp=0.5, levels=2, prefix="a")
    b = write_dicom_slide(src, _rgb(seed=2), mpp=0.5, prefix="b")
    (src / "junk.dcm").write_bytes(b"not dicom at all")
    shutil.copy(SAMPLE, src / "skin.svs")
    write_dicom_slide(src / "caseA", _rgb(seed=3), mpp=0.5)
    c = write_dicom_slide(src / "mixed", _rgb(seed=4), mpp=0.5, prefix="c")
    d = write_dicom_slide(src / "mixed", _rgb(seed=5), mpp=0.5, prefix="d")
    (src / "empty").mkdir()
    found = find_slides(src)
    assert found == sorted([a[0], b[0], src / "junk.dcm", src / "skin.svs", src / "caseA", c[0], d[0]])
    items = batch_items(src)
    names = dict(zip([i.slide for i in items], output_stems(items), strict=True))
    assert names[src / "caseA"] == "caseA" and names[a[0]] == "a_0"
    # a folder that is one slide is a batch of one
    assert [i.slide for i in batch_items(src / "caseA")] == [src / "caseA"]


def test_fingerprint_of_a_series_folder_ignores_results_written_into_it(tmp_path: Path) -> None:
    files = write_dicom_slide(tmp_path / "case", _rgb(), mpp=0.5)
    before = slide_fingerprint(tmp_path / "case")
    (tmp_path / "case" / "case.tif").write_bytes(b"results beside the slide")
    assert slide_fingerprint(tmp_path / "case") == before
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF  # one pixel of the slide changed
    files[0].write_bytes(bytes(data))
    assert slide_fingerprint(tmp_path / "case") != before


def _probabilities(tiles_csv: Path) -> list[float]:
    with tiles_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    col = next(c for c in rows[0] if c.startswith("p_"))
    return [float(r[col]) for r in rows]


def test_a_dicom_copy_of_the_sample_scores_like_the_svs_and_once_in_a_folder_run(tmp_path: Path) -> None:
    """The bundled sample as a DICOM series (its decoded pixels, uncompressed, plus a thumbnail file):
    scored from its folder it gives the .svs's tiles and probabilities; in a folder run beside the
    .svs it is one slide, not one per file."""
    src = tmp_path / "slides"
    write_dicom_slide(src / "skin-dicom", _sample_rgb(), mpp=0.499)
    shutil.copy(SAMPLE, src / "skin.svs")
    runner = CliRunner()
    r = runner.invoke(main, [str(src / "skin-dicom"), "--out", f"{tmp_path / 'one'}/", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, [str(src), "--out", str(tmp_path / "all"), "-q"])
    assert r.exit_code == 0, r.output
    assert "2 slides, 2 done" in r.output
    one = _probabilities(tmp_path / "one" / "skin-dicom.tiles.csv")
    assert len(one) == 56
    assert one == _probabilities(tmp_path / "all" / "skin-dicom.tiles.csv")
    np.testing.assert_allclose(one, _probabilities(tmp_path / "all" / "skin.tiles.csv"), atol=1e-6)


@pytest.mark.realdata
def test_openslide_fixture_pair_is_one_slide(tmp_path: Path) -> None:
    """openslide-python's DICOM fixture: a VOLUME and a THUMBNAIL file of one 16 x 16 slide."""
    pair = shared("slides", "tiny-fixtures", "dicom-boxes")
    shutil.copytree(pair, tmp_path / "boxes")
    assert find_slides(tmp_path) == [tmp_path / "boxes"]
    assert find_slides(tmp_path / "boxes") == [tmp_path / "boxes" / "boxes_0.dcm"]
    reader = open_slide(tmp_path / "boxes")
    try:
        assert reader.vendor == "dicom" and reader.dimensions == (16, 16)
    finally:
        reader.close()


@pytest.mark.realdata
def test_a_dicom_instance_openslide_cannot_place_is_refused_with_what_to_export() -> None:
    """The quirky single-level TCGA instance (no ImageType, frames column-major, its levels absent): it
    said "check it is a complete .svs/.tif/... slide"; the fix is a complete, conforming series."""
    with pytest.raises(SlideError, match="cannot open as a DICOM whole-slide image") as info:
        open_slide(shared("slides", "dicom-quirky", "tcga-xk-aaju-single-level.dcm"))
    assert "as a complete series" in str(info.value) and ".svs/.tif" not in str(info.value)


def test_recursive_folder_runs_walk_case_folders_but_not_stores_mirax_data_or_hidden_ones(
    tmp_path: Path,
) -> None:
    """`--recursive`: slides at any depth (a DICOM series folder is one slide), same stems in two case
    folders get their paths as names; tile stores, MIRAX data folders, hidden folders and links back
    up the tree are not entered. Without it, only the folder itself and DICOM one level down."""
    src = tmp_path / "scans"
    for sub in ("2026-11/case1", "2026-11/case2", "2026-12/case3"):
        (src / sub).mkdir(parents=True)
    shutil.copy(SAMPLE, src / "2026-11" / "case1" / "slide.svs")
    shutil.copy(SAMPLE, src / "2026-11" / "case2" / "slide.svs")
    shutil.copy(SAMPLE, src / "top.svs")
    write_dicom_slide(src / "2026-12" / "case3" / "dicom", _rgb(), mpp=0.5)
    (src / "old.zarr" / "c").mkdir(parents=True)
    shutil.copy(SAMPLE, src / "old.zarr" / "c" / "x.svs")  # inside a tile store: never a slide
    (src / "m.mrxs").write_bytes(b"mirax index")
    (src / "m").mkdir()
    (src / "m" / "Data0000.tif").write_bytes(b"mirax data")  # a MIRAX data folder's file
    (src / ".trash").mkdir()
    shutil.copy(SAMPLE, src / ".trash" / "deleted.svs")
    (src / "2026-11" / "loop").symlink_to(src, target_is_directory=True)
    found = find_slides(src, recursive=True)
    assert found == sorted([
        src / "top.svs", src / "m.mrxs",
        src / "2026-11" / "case1" / "slide.svs", src / "2026-11" / "case2" / "slide.svs",
        src / "2026-12" / "case3" / "dicom",
    ])  # fmt: skip
    assert find_slides(src) == [src / "m.mrxs", src / "top.svs"]
    items = batch_items(src, recursive=True)
    names = sorted(output_stems(items))
    assert names == sorted(["top", "m", "2026-11__case1__slide.svs", "2026-11__case2__slide.svs", "dicom"])


def test_recursive_cli_scores_the_case_folders(tmp_path: Path) -> None:
    src = tmp_path / "scans"
    (src / "a").mkdir(parents=True)
    (src / "b" / "deeper").mkdir(parents=True)
    shutil.copy(SAMPLE, src / "a" / "s1.svs")
    shutil.copy(SAMPLE, src / "b" / "deeper" / "s2.svs")
    runner = CliRunner()
    r = runner.invoke(main, [str(src), "--out", str(tmp_path / "flat"), "-q"])
    # the one level down is counted (b/deeper is not: a listing as cheap as the DICOM search)
    assert r.exit_code != 0 and "its subfolders hold 1 slide file (e.g. a/s1.svs): --recursive" in r.output
    r = runner.invoke(main, [str(src), "--out", str(tmp_path / "res"), "-q", "--recursive"])
    assert r.exit_code == 0, r.output
    assert "2 slides, 2 done" in r.output
    assert (tmp_path / "res" / "s1.run.json").is_file() and (tmp_path / "res" / "s2.run.json").is_file()


def test_a_folder_run_without_recursive_names_the_slides_of_subfolders_it_leaves(tmp_path: Path) -> None:
    """A lab that points a run at a folder of case folders without --recursive gets its top-level
    slides scored and a note that says how many slide files the subfolders hold and the flag that
    scores them; with --recursive, or with no slide below, no such note. DICOM series in subfolders
    are scored anyway (not counted), and hidden folders and tile stores are not counted."""
    from wsi_pipeline.batch import batch_notes

    src = tmp_path / "scans"
    for sub in ("case1", "case2", ".trash", "old.zarr"):
        (src / sub).mkdir(parents=True)
    shutil.copy(SAMPLE, src / "top.svs")
    shutil.copy(SAMPLE, src / "case1" / "a.svs")
    shutil.copy(SAMPLE, src / "case2" / "b.svs")
    shutil.copy(SAMPLE, src / ".trash" / "gone.svs")
    shutil.copy(SAMPLE, src / "old.zarr" / "x.svs")
    write_dicom_slide(src / "case3", _rgb(), mpp=0.5)  # a DICOM slide folder: scored, not counted
    items = batch_items(src)
    assert [i.slide for i in items] == [src / "case3", src / "top.svs"]
    (note,) = batch_notes(src, items)
    assert note == (
        f"{src}: only the slides directly in it are scored; its subfolders hold 2 slide files "
        "(e.g. case1/a.svs): --recursive scores them"
    )
    assert batch_notes(src, batch_items(src, recursive=True), recursive=True) == []
    assert batch_notes(src / "case1", batch_items(src / "case1")) == []
    r = CliRunner().invoke(main, ["info", str(src)])
    assert r.exit_code == 0 and "its subfolders hold 2 slide files" in r.output


def test_an_unreadable_subfolder_is_named_not_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores permissions, so the folder that cannot be listed is simulated."""
    src = tmp_path / "scans"
    (src / "locked").mkdir(parents=True)
    shutil.copy(SAMPLE, src / "top.svs")
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # type: ignore[no-untyped-def]
        if self.name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    for recursive in (False, True):  # the folder is an item of the batch, so the run reports it
        assert find_slides(src, recursive=recursive) == [src / "locked", src / "top.svs"]
    with pytest.raises(SlideError, match=r"locked: cannot list the folder \(Permission denied\)"):
        open_slide(src / "locked")
    r = CliRunner().invoke(main, [str(src), "--out", str(tmp_path / "res"), "-q", "-r"])
    assert r.exit_code == 1 and "2 slides, 1 done, 1 failed" in r.output
    assert "locked: cannot list the folder (Permission denied); check its permissions" in r.output
