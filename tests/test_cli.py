"""The ``wsi-infer`` command line: tile, info, folder mode, one-line errors and exit codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import Fixture, shared
from wsi_pipeline.cli import main
from wsi_pipeline.io.tilestore import open_tile_store, partial_path


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_tile_writes_store_report_and_summary(generic_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "g.zarr"
    code, stdout, stderr = _run("tile", str(generic_slide.path), "--out", str(out), "-q")
    assert code == 0, stderr
    store = open_tile_store(out)
    assert f"{len(store)} tiles" in stdout and "tiles/s" in stdout and str(out) in stdout
    report = json.loads((tmp_path / "g.tile-report.json").read_text())
    assert report["n_tiles"] == len(store) and report["status"] == "written"
    assert report["versions"]["zarr"] and report["store"]["resolution"]["mpp_source"] == "metadata"
    assert report["options"]["tile_px"] == 224
    assert report["argv"] == ["wsi-infer", "tile", str(generic_slide.path), "--out", str(out), "-q"]
    code, stdout, _ = _run("tile", str(generic_slide.path), "--out", str(out), "-q")
    assert code == 0 and "already complete" in stdout


def test_tile_options_reach_the_store(generic_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "o.zarr"
    code, _, err = _run(
        "tile", str(generic_slide.path), "-o", str(out), "-q", "--tile-size", "128", "--overlap", "16",
        "--target-mpp", "1.0", "--min-tissue", "0.9", "--backend", "tiffslide",
    )  # fmt: skip
    assert code == 0, err
    meta = open_tile_store(out).meta
    assert meta["grid"]["tile_px"] == 128 and meta["grid"]["overlap_px"] == 16
    assert meta["resolution"]["target_mpp"] == 1.0 and meta["slide"]["backend"] == "tiffslide"
    assert min(open_tile_store(out).tissue_fraction) >= 0.9


def test_missing_mpp_exit_code_and_one_line_error(nompp_slide: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "n.zarr"
    code, _, err = _run("tile", str(nompp_slide.path), "-o", str(out), "-q")
    assert code == 4
    assert err.count("\n") == 1 and err.startswith("error: ") and "nompp.tif" in err and "--mpp" in err
    assert not out.exists() and not partial_path(out).exists()
    code, _, err = _run("tile", str(nompp_slide.path), "-o", str(out), "-q", "--mpp", "0.5")
    assert code == 0, err


def test_not_a_slide_exit_code(not_a_slide: Path, tmp_path: Path) -> None:
    code, _, err = _run("tile", str(not_a_slide), "-o", str(tmp_path / "x.zarr"))
    assert code == 3 and "notes.svs: cannot open" in err and err.count("\n") == 1


def test_info_table_and_json(aperio_slide: Fixture) -> None:
    code, out, _ = _run("info", str(aperio_slide.path))
    assert code == 0 and "aperio" in out and "0.25" in out and "metadata" in out and "tissue" in out
    code, out, _ = _run("info", str(aperio_slide.path), "--json")
    data = json.loads(out)
    assert data["vendor"] == "aperio" and data["width"] == 3072
    assert data["resolution"] == {"mpp_x": 0.25, "mpp_y": 0.25, "source": "metadata"}
    assert [lv["downsample"] for lv in data["levels"]] == [1.0, 4.0, 16.0]
    assert 0.2 < data["tissue"]["fraction"] < 0.5
    assert data["tiling"]["level"] == 0 and data["tiling"]["tissue_tiles"] > 0


def test_info_reports_missing_mpp_without_failing(nompp_slide: Fixture) -> None:
    code, out, _ = _run("info", str(nompp_slide.path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["resolution"]["source"] == "missing" and "--mpp" in data["resolution"]["hint"]


def test_info_on_a_folder_checks_every_slide_before_a_run(
    aperio_slide: Fixture, nompp_slide: Fixture, not_a_slide: Path, tmp_path: Path
) -> None:
    """`info slides/`: one row per slide, then each problem with its fix; exit 1 when a slide cannot
    be read (it used to say the folder was no DICOM slide, "changed N s ago")."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (aperio_slide.path, nompp_slide.path, not_a_slide):
        shutil.copy(p, folder / p.name)
    code, out, _ = _run("info", str(folder), "--json")
    assert code == 1
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert rows[aperio_slide.path.name]["tiling"]["tissue_tiles"] > 0
    assert rows[nompp_slide.path.name]["resolution"]["source"] == "missing"
    assert "cannot open" in rows[not_a_slide.name]["error"]
    code, out, _ = _run("info", str(folder))
    assert code == 1
    assert (
        f"{not_a_slide.name}: cannot open" in out and f"{nompp_slide.path.name}: " in out and "--mpp" in out
    )
    assert "3 slides, 1 ready to score, 2 with a problem" in out
    csv_path = tmp_path / "list.csv"  # a CSV's per-slide mpp is the one checked
    csv_path.write_text(f"slide,mpp\n{folder / nompp_slide.path.name},0.5\n")
    code, out, _ = _run("info", str(csv_path), "--json")
    assert code == 0 and json.loads(out)[0]["resolution"]["source"] == "override"
    code, out, _ = _run("info", str(folder), "--mpp", "0.5")  # 2x the aperio slide's own 0.25 um/px
    assert f"{aperio_slide.path.name}: --mpp 0.5 overrides the slide's own 0.25 um/px (2x)" in out
    assert "1 with an --mpp warning (listed above)" in out


def test_info_on_a_tile_store_says_what_it_holds(aperio_slide: Fixture, tmp_path: Path) -> None:
    store = tmp_path / "a.zarr"
    assert _run("tile", str(aperio_slide.path), "-o", str(store))[0] == 0
    code, out, _ = _run("info", str(store), "--json")
    data = json.loads(out)
    assert code == 0 and data["kind"] == "tile store" and data["slide"] == str(aperio_slide.path)
    assert data["tiles"] > 0 and data["tile_px"] == 224 and abs(data["effective_mpp"] - 0.5) < 0.01
    code, out, _ = _run("info", str(store))
    assert code == 0 and f"{data['tiles']} tiles of 224 px" in out


def test_folder_continues_past_bad_slide(
    generic_slide: Fixture, aperio_slide: Fixture, not_a_slide: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (generic_slide.path, aperio_slide.path, not_a_slide):
        shutil.copy(p, folder / p.name)
    out = tmp_path / "stores"
    code, stdout, err = _run("tile", str(folder), "-o", str(out), "-q")
    assert code == 1
    assert "3 slides, 2 done, 1 failed" in stdout and "notes.svs" in err
    assert open_tile_store(out / "generic.zarr") and open_tile_store(out / "aperio.zarr")
    summary = json.loads((out / "tile-summary.json").read_text())
    assert [r["status"] for r in summary["slides"]] == ["written", "written", "failed"]
    assert not (out / "notes.zarr").exists() and not partial_path(out / "notes.zarr").exists()


def test_folder_failures_carry_their_exit_code_and_missing_mpp_points_to_a_csv(
    generic_slide: Fixture, nompp_slide: Fixture, not_a_slide: Path, tmp_path: Path
) -> None:
    """A folder run's failed rows say what kind of failure each was (the exit code a run of that slide
    alone gives), and slides without an mpp get one hint towards a CSV: "pass --mpp" on a folder would
    rescale every slide."""
    folder = tmp_path / "in"
    folder.mkdir()
    for p in (generic_slide.path, nompp_slide.path, not_a_slide):
        shutil.copy(p, folder / p.name)
    code, _, err = _run("tile", str(folder), "-o", str(tmp_path / "stores"), "-q")
    assert code == 1
    rows = {
        Path(r["slide"]).name: r
        for r in json.loads((tmp_path / "stores" / "tile-summary.json").read_text())["slides"]
    }
    assert rows[nompp_slide.path.name]["error_code"] == 4 and rows[not_a_slide.name]["error_code"] == 3
    assert "error_code" not in rows[generic_slide.path.name]
    assert "hint: 1 slide has no usable resolution (mpp)" in err and "CSV" in err


def test_folder_reports_slides_of_formats_no_reader_opens(generic_slide: Fixture, tmp_path: Path) -> None:
    """A Zeiss .czi or Philips .isyntax in the folder used to be passed over without a word: it is a
    failed row naming the format and the way out (convert to OME-TIFF or DICOM)."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(generic_slide.path, folder / generic_slide.path.name)
    (folder / "case2.czi").write_bytes(b"ZISRAWFILE" + bytes(100))
    (folder / "case3.isyntax").write_bytes(b"<?xml" + bytes(100))
    (folder / "notes.txt").write_text("not a slide: still passed over")
    out = tmp_path / "stores"
    code, stdout, err = _run("tile", str(folder), "-o", str(out), "-q")
    assert code == 1 and "3 slides, 1 done, 2 failed" in stdout
    assert "case2.czi: Zeiss CZI slides cannot be read here" in err and "OME-TIFF or DICOM" in err
    assert "case3.isyntax: Philips iSyntax slides cannot be read here" in err
    code, _, err = _run("info", str(folder / "case2.czi"))
    assert code == 3 and "Zeiss CZI slides cannot be read here" in err


def test_version_and_help() -> None:
    code, out, _ = _run("--version")
    assert code == 0 and "wsi-infer" in out
    code, out, _ = _run("tile", "--help")
    assert code == 0 and "--mpp" in out and "--backend" in out


@pytest.mark.realdata
def test_real_info_cli() -> None:
    p = shared("slides", "aperio", "CMU-1-Small-Region.svs")
    code, out, _ = _run("info", str(p), "--json")
    assert code == 0 and json.loads(out)["resolution"]["source"] == "metadata"


def test_normalize_with_a_reference_image(generic_slide: Fixture, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from wsi_pipeline.io.slide import open_slide
    from wsi_pipeline.stain.macenko import REFERENCE, StainModel

    # A reference cut from the aperio-like synthetic tissue (other stain colours than the default).
    r = open_slide(generic_slide.path)
    ref_img = r.read_region((500, 500), 0, (300, 300))
    ref_png = tmp_path / "ref.png"
    Image.fromarray(ref_img).save(ref_png)
    out = tmp_path / "r.zarr"
    code, stdout, err = _run(
        "tile", str(generic_slide.path), "-o", str(out), "-q", "--normalize", "macenko",
        "--stain-reference", str(ref_png),
    )  # fmt: skip
    assert code == 0, err
    assert "Macenko fitted" in stdout
    stain = open_tile_store(out).meta["stain"]
    assert stain["reference_name"].startswith("ref.png (sha256 ")
    assert StainModel.from_dict(stain["reference"]) != REFERENCE
    # Normalizing a slide to a reference cut from itself keeps it closer to the raw colours than
    # normalizing it to the default reference does.
    raw, default = tmp_path / "raw.zarr", tmp_path / "default.zarr"
    assert _run("tile", str(generic_slide.path), "-o", str(raw), "-q")[0] == 0
    assert _run("tile", str(generic_slide.path), "-o", str(default), "-q", "--normalize", "macenko")[0] == 0
    raw_t = open_tile_store(raw).tiles[:16].astype(int)
    to_self = np.abs(raw_t - open_tile_store(out).tiles[:16]).mean()
    to_default = np.abs(raw_t - open_tile_store(default).tiles[:16]).mean()
    assert to_self < to_default


def test_unusable_stain_reference_is_a_clear_error(generic_slide: Fixture, tmp_path: Path) -> None:
    bad = tmp_path / "white.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (250, 250, 250)).save(bad)
    out = tmp_path / "w.zarr"
    code, _, err = _run(
        "tile",
        str(generic_slide.path),
        "-o",
        str(out),
        "--normalize",
        "macenko",
        "--stain-reference",
        str(bad),
    )
    assert code == 7 and "white.png" in err and err.count("\n") == 1
    assert not out.exists() and not partial_path(out).exists()


def test_info_reports_an_unscorable_slide_without_failing(tmp_path: Path) -> None:
    import numpy as np
    import tifffile

    grey = np.repeat(np.random.default_rng(0).integers(100, 250, (512, 512, 1), dtype=np.uint8), 3, axis=2)
    p = tmp_path / "grey.tif"
    tifffile.imwrite(
        p, grey, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    code, out, _ = _run("info", str(p), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["tissue"]["fraction"] is None and "grayscale" in data["tissue"]["note"]
    code, out, _ = _run("info", str(p))
    assert code == 0 and "not scorable" in out


def test_the_version_is_one_number_for_the_package_and_its_metadata() -> None:
    """``wsi_pipeline.__version__`` is the single source pyproject.toml reads; the installed
    metadata, ``--version`` and the manifests all report it."""
    from importlib.metadata import version

    import wsi_pipeline

    assert wsi_pipeline.__version__ == version("wsi-pipeline")
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and wsi_pipeline.__version__ in result.output
