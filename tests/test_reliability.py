"""Reliability suite: kill -9 and resume, Dask workers dying mid-run, corrupt and hostile inputs,
full and read-only disks. Every case checks the error is one clear line naming the file, the exit
code, and that nothing half-written is left under a final name.

Real versus simulated: disk-full and read-only cases use a real tmpfs (``mount``, needs root and
CAP_SYS_ADMIN); where mounting is not possible they fall back to a simulated OSError and say so in the
closing tally, which is printed at the end of the module (cases tried / passed / skipped).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import BENIGN_SPEC, Fixture, write_test_model
from testkit.synthetic import SyntheticSpec, write_synthetic_slide
from wsi_pipeline.cli import main
from wsi_pipeline.io.tilestore import open_tile_store, partial_path
from wsi_pipeline.pipeline import RunOptions, output_paths, run_slide
from wsi_pipeline.tiling.plan import TileOptions
from wsi_pipeline.tiling.tiler import tile_slide

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]

# --- tally: every case counts as tried; passed/skipped/failed as it ends ---------------------------

TALLY: dict[str, Any] = {"tried": 0, "passed": 0, "skipped": 0, "failed": 0, "notes": []}


def counted(fn: Callable[..., None]) -> Callable[..., None]:
    """Count a test case in :data:`TALLY` (pytest sees the original signature via ``__wrapped__``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        TALLY["tried"] += 1
        try:
            fn(*args, **kwargs)
        except pytest.skip.Exception:
            TALLY["skipped"] += 1
            raise
        except BaseException:
            TALLY["failed"] += 1
            raise
        TALLY["passed"] += 1

    return wrapper


def note(text: str) -> None:
    TALLY["notes"].append(text)


@pytest.fixture(scope="module", autouse=True)
def _report_tally(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    lines = [
        f"reliability: {TALLY['tried']} cases tried, {TALLY['passed']} passed, "
        f"{TALLY['skipped']} skipped, {TALLY['failed']} failed",
        *(f"reliability: {n}" for n in TALLY["notes"]),
    ]
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        if tr is not None:
            tr.ensure_newline()
        for line in lines:
            if tr is not None:
                tr.write_line(line)
            else:  # pragma: no cover
                print(line, file=sys.__stderr__)


# --- helpers ---------------------------------------------------------------------------------------


def cli(*args: str | Path) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def one_line_error(err: str, *names: str) -> None:
    """stderr is exactly one line, "error: ...", naming each of ``names``."""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for n in names:
        assert n in err, (n, err)


def files_under(folder: Path) -> list[str]:
    return (
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if folder.exists()
        else []
    )


def tiles_rows(path: Path) -> list[str]:
    return path.read_text().splitlines()


def complete_outputs(heatmap: Path) -> None:
    """Every output of a finished slide exists, parses, and the manifest says complete."""
    import tifffile
    from PIL import Image

    paths = output_paths(heatmap)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["status"] == "complete"
    with tifffile.TiffFile(paths["heatmap"]) as tf:
        assert tf.pages[0].asarray().ndim == 2  # the probability map: one channel
    with tifffile.TiffFile(paths["colour"]) as tf:
        assert tf.pages[0].asarray().ndim == 3
    Image.open(paths["overlay"]).load()
    assert paths["report"].read_text().rstrip().endswith("</html>")
    assert json.loads(paths["geojson"].read_text())["type"] == "FeatureCollection"
    assert len(tiles_rows(paths["tiles_csv"])) == manifest["n_tiles"] + 1


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    s = open_tile_store(path)
    return {
        n: np.asarray(s.array(n)[...])
        for n in ("tiles", "coords_l0", "grid_colrow", "tissue_fraction", "focus")
    }


OPTS = RunOptions(chunk_tiles=32, workers=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("rel-model"))


# --- kill -9 and resume ----------------------------------------------------------------------------

# Runs the real CLI; WSI_TEST_STALL names an output whose atomic write stalls (after its temporary
# file is written, before the rename) so the test can SIGKILL the process at that exact point;
# WSI_TEST_SLOW_CHUNK_S slows tile-store chunk writes so a kill lands between chunks.
BOOT = r"""
import os, sys, time
stall = os.environ.get("WSI_TEST_STALL")
if stall:
    import wsi_pipeline.provenance as prov
    _fsync = os.fsync
    def fsync(fd):
        _fsync(fd)
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith("." + stall + "."):
            time.sleep(60)
    prov.os.fsync = fsync
slow = float(os.environ.get("WSI_TEST_SLOW_CHUNK_S", "0"))
if slow:
    import wsi_pipeline.io.tilestore as ts
    _write = ts.TileStoreWriter.write_chunk
    def write_chunk(self, k, tiles):
        _write(self, k, tiles)
        time.sleep(slow)
    ts.TileStoreWriter.write_chunk = write_chunk
from wsi_pipeline.cli import main
sys.argv[0] = "wsi-infer"
main()
"""


def run_until_then_kill(
    args: list[str], ready: Callable[[], bool], env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Start the CLI, SIGKILL it as soon as ``ready()``; fails if it ends first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BOOT, *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point: {out}\n{err}")
            if time.monotonic() > deadline:
                pytest.fail("the kill point was never reached")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def slide_folder(
    tmp_path_factory: pytest.TempPathFactory,
    aperio_slide: Fixture,
    benign_slide: Fixture,
    tumour_slide: Fixture,
) -> Path:
    folder = tmp_path_factory.mktemp("rel-folder")
    for f in (aperio_slide, benign_slide, tumour_slide):
        shutil.copy(f.path, folder / f.path.name)
    return folder


NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")


@NEEDS_PROC
@counted
def test_kill_folder_run_mid_write_then_resume(slide_folder: Path, model: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    code, _, err = cli(slide_folder, "--out", ref, "--model", model, "-q", "--chunk-tiles", "32")
    assert code == 0, err
    out = tmp_path / "out"
    args = [str(slide_folder), "--out", str(out), "--model", str(model), "-q", "--chunk-tiles", "32"]
    # Sorted order: aperio, benign, tumour. Kill while benign's tile table sits in its temporary file.
    stalled = "benign.tiles.csv"
    run_until_then_kill(
        args, lambda: any(out.glob(f".{stalled}.*.tmp")), {"WSI_TEST_STALL": stalled}
    )  # fmt: skip
    # What the kill left: aperio finished; benign's first outputs under final names, no manifest;
    # the temporary file of the write in progress; no summary.
    complete_outputs(out / "aperio.tif")
    assert not (out / "benign.run.json").exists() and not (out / "benign.tiles.csv").exists()
    assert not (out / "summary.csv").exists()
    import tifffile  # the outputs benign did finish are whole files, not halves

    with tifffile.TiffFile(out / "benign.tif") as tf:
        tf.pages.first.asarray()
    assert json.loads((out / "benign.geojson").read_text())["type"] == "FeatureCollection"
    leftovers = sorted(p.name for p in out.glob(".*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{stalled}.")
    note(
        f"kill -9 inside an atomic write leaves its hidden temporary file ({leftovers[0]}); resume removes it"
    )
    # Resume: aperio skipped, benign and tumour scored; identical results to the uninterrupted run.
    code, _, err = cli(*args)
    assert code == 0, err
    summary = {Path(r.split(",")[0]).name: r.split(",")[1] for r in tiles_rows(out / "summary.csv")[1:]}
    assert summary == {"aperio.svs": "skipped (done)", "benign.svs": "ok", "tumour.svs": "ok"}
    for stem in ("aperio", "benign", "tumour"):
        complete_outputs(out / f"{stem}.tif")
        a, b = output_paths(ref / f"{stem}.tif"), output_paths(out / f"{stem}.tif")
        assert tiles_rows(a["tiles_csv"]) == tiles_rows(b["tiles_csv"])
        assert (
            json.loads(a["manifest"].read_text())["label"] == json.loads(b["manifest"].read_text())["label"]
        )
    assert not list(out.glob(".*.tmp"))  # the stale temporary file was removed, never read or renamed


@counted
def test_kill_folder_run_between_slides_then_resume(slide_folder: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = [str(slide_folder), "--out", str(out), "--model", str(model), "-q", "--chunk-tiles", "32"]
    run_until_then_kill(args, lambda: (out / "aperio.run.json").exists(), {})
    # kill -9 may land while the next slide's outputs are written (on the writer thread, overlapping
    # the slide after): their temporary files stay, named with the dead writer's PID, which the
    # resumed run removes (checked below); such a slide has no manifest, so it is not taken as done
    for tmp in out.glob(".*.tmp"):
        final = tmp.name[1:].rsplit(".", 3)[0]  # .NAME.PID.RANDOM.tmp
        stem = next(s for s in ("aperio", "benign", "tumour") if final.startswith(s + "."))
        assert not (out / f"{stem}.run.json").exists(), tmp.name
    for manifest in out.glob("*.run.json"):  # whatever finished is complete
        complete_outputs(manifest.with_name(manifest.name.replace(".run.json", ".tif")))
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "already done" in stdout
    for stem in ("aperio", "benign", "tumour"):
        complete_outputs(out / f"{stem}.tif")
    assert not list(out.glob(".*.tmp"))


@counted
def test_kill_tile_then_resume_gives_identical_store(tumour_slide: Fixture, tmp_path: Path) -> None:
    ref = tmp_path / "ref.zarr"
    tile_slide(tumour_slide.path, ref, TileOptions())
    out = tmp_path / "t.zarr"
    part = partial_path(out)
    run_until_then_kill(
        ["tile", str(tumour_slide.path), "--out", str(out), "-q"],
        lambda: (part / "chunk_done" / "c" / "0").exists(),
        {"WSI_TEST_SLOW_CHUNK_S": "1.0"},
    )
    assert part.exists() and not out.exists()  # the final name never holds half a store
    code, stdout, err = cli("tile", tumour_slide.path, "--out", out, "-q")
    assert code == 0, err
    assert "resumed" in stdout and not part.exists()
    a, b = store_arrays(ref), store_arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert open_tile_store(out).meta["run"]["resumed"] is True


# --- Dask workers dying mid-run --------------------------------------------------------------------


def _arm_worker_kill(marker: str) -> None:
    """In a worker process: the first scoring task of the whole cluster SIGKILLs its own worker."""
    import os
    import signal

    import wsi_pipeline.inference.scoring as scoring

    original = scoring.score_chunk

    def score_chunk_first_one_dies(task: Any) -> Any:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return original(task)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        return None  # pragma: no cover

    scoring.score_chunk = score_chunk_first_one_dies


@pytest.fixture(scope="module")
def local_reference(tumour_slide: Fixture, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel-ref") / "tumour.tif"
    run_slide(tumour_slide.path, out, model=model, options=OPTS)
    return out


def _pickle_this_module_by_value() -> None:
    import cloudpickle

    with contextlib.suppress(ValueError):  # already registered
        cloudpickle.register_pickle_by_value(sys.modules[__name__])


@counted
def test_worker_killed_mid_run_is_restarted_and_run_completes(
    tumour_slide: Fixture, model: Path, local_reference: Path, tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    _pickle_this_module_by_value()
    marker = tmp_path / "killed.pid"
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        before = set(client.run(os.getpid).values())
        client.run(_arm_worker_kill, str(marker))
        out = tmp_path / "d.tif"
        m = run_slide(tumour_slide.path, out, model=model, options=OPTS, client=client)
        after = set(client.run(os.getpid).values())
    killed = int(marker.read_text())
    assert killed in before and killed not in after  # that worker died; its nanny started a new one
    assert m["scheduler"].startswith("distributed") and m["timings"]["tasks"] > 2
    assert tiles_rows(output_paths(out)["tiles_csv"]) == tiles_rows(
        output_paths(local_reference)["tiles_csv"]
    )


@counted
def test_worker_lost_for_good_mid_run_other_worker_finishes(
    tumour_slide: Fixture, model: Path, local_reference: Path, tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    _pickle_this_module_by_value()
    marker = tmp_path / "killed.pid"
    procs: list[subprocess.Popen[bytes]] = []
    with (
        distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        try:
            for i in range(2):  # workers without a nanny, as separate processes: a killed one stays dead
                cmd = [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address]
                cmd += ["--no-nanny", "--nthreads", "1", "--name", f"w{i}", "--no-dashboard"]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            client.wait_for_workers(2, timeout=60)
            client.run(_arm_worker_kill, str(marker))
            out = tmp_path / "d.tif"
            m = run_slide(tumour_slide.path, out, model=model, options=OPTS, client=client)
            alive = client.run(os.getpid)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=20)
                if p.poll() is None:
                    p.kill()
    assert len(alive) == 1 and int(marker.read_text()) not in alive.values()
    assert sum(p.returncode == -signal.SIGKILL for p in procs) == 1
    assert m["label"]["label"] == "tumour"
    assert tiles_rows(output_paths(out)["tiles_csv"]) == tiles_rows(
        output_paths(local_reference)["tiles_csv"]
    )


# --- corrupt and hostile inputs ----------------------------------------------------------------------


def _tag_value_offsets(path: Path, *names: str) -> dict[str, tuple[int, str]]:
    """File offset and struct format of the (first) value of TIFF tags of page 0."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        tags = tf.pages.first.tags
        fmt = {3: "H", 4: "I", 16: "Q"}
        return {n: (tags[n].valueoffset, tf.byteorder + fmt[int(tags[n].dtype)]) for n in names}


def _zero_tiles(src: Path, dst: Path, tiles: list[tuple[int, int]]) -> Path:
    """Copy ``src`` with the given (col, row) level-0 tiles marked absent (offset and byte count 0)."""
    import tifffile

    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.pages.first
        across = -(-page.imagewidth // page.tilewidth)
    off = _tag_value_offsets(src, "TileOffsets", "TileByteCounts")
    for col, row in tiles:
        i = row * across + col
        for pos, fmt in off.values():
            struct.pack_into(fmt, data, pos + i * struct.calcsize(fmt), 0)
    dst.write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory: pytest.TempPathFactory, benign_slide: Fixture, truncated_slide: Path,
            nompp_slide: Fixture) -> dict[str, Path]:  # fmt: skip
    """Broken slides, one per failure mode, all with a slide suffix."""
    import tifffile

    d = tmp_path_factory.mktemp("corrupt")
    out: dict[str, Path] = {"truncated": truncated_slide, "no-mpp": nompp_slide.path}
    good = benign_slide.path.read_bytes()
    with tifffile.TiffFile(benign_slide.path) as tf:
        second_ifd = tf.pages[1].offset
    (d / "cut-pyramid.svs").write_bytes(good[:second_ifd])  # level 0 whole, the rest of the file gone
    out["truncated-after-level-0"] = d / "cut-pyramid.svs"
    (d / "magic.svs").write_bytes(b"XX*\x00" + good[4:])
    out["wrong-magic"] = d / "magic.svs"
    (d / "empty.svs").write_bytes(b"")
    out["zero-bytes"] = d / "empty.svs"
    generic = write_synthetic_slide(d / "generic-src.tif", BENIGN_SPEC, kind="generic")
    # BENIGN_SPEC: 2048 px square, 256 px TIFF tiles, tissue ellipse around (1000, 1000).
    out["missing-tiles"] = _zero_tiles(generic, d / "holes.tif", [(2, 3), (3, 3), (4, 3), (3, 4), (4, 4)])
    absurd = bytearray(generic.read_bytes())
    for pos, fmt in _tag_value_offsets(generic, "ImageWidth", "ImageLength").values():
        assert fmt.endswith("I"), "tifffile wrote a SHORT dimension; the patch needs LONG"
        struct.pack_into(fmt, absurd, pos, 10**7)
    (d / "absurd.tif").write_bytes(absurd)
    out["absurd-dimensions"] = d / "absurd.tif"
    blank = SyntheticSpec(2048, 2048, mpp=0.5, tissue=(), downsamples=(1, 4), seed=5)
    out["all-background"] = write_synthetic_slide(d / "blank.tif", blank, kind="generic")
    gray = np.full((2048, 2048), 232, np.uint8)
    gray[400:1600, 500:1500] = 140
    with tifffile.TiffWriter(d / "gray.tif") as tw:
        for ds in (1, 4):
            tw.write(gray[::ds, ::ds], tile=(256, 256), compression="zlib", resolution=(1e4 / (0.5 * ds),) * 2,
                     resolutionunit="CENTIMETER", subfiletype=1 if ds > 1 else 0, metadata=None)  # fmt: skip
    out["grayscale"] = d / "gray.tif"
    return out


# case -> (exit code, words the message must contain)
SLIDE_CASES = {
    "truncated": (3, ""),
    "truncated-after-level-0": (3, "truncated"),
    "wrong-magic": (3, "cannot open"),
    "zero-bytes": (3, "empty"),
    "missing-tiles": (3, "lacks image data under tissue"),
    "absurd-dimensions": (3, ""),
    "no-mpp": (4, "--mpp"),
    "all-background": (5, "no tissue"),
    "grayscale": (3, "grayscale"),
}


@counted
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_corrupt_slide_run_is_one_clear_error_and_no_output(
    case: str, backend: str, corrupt: dict[str, Path], model: Path, tmp_path: Path
) -> None:
    slide = corrupt[case]
    code_expected, words = SLIDE_CASES[case]
    out = tmp_path / "out"
    code, _, err = cli(slide, "--out", out / "x.tif", "--model", model, "-q", "--backend", backend)
    assert code == code_expected, err
    one_line_error(err, slide.name, words)
    assert files_under(out) == []


@counted
@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_corrupt_slide_tile_is_one_clear_error_and_no_store(
    case: str, corrupt: dict[str, Path], tmp_path: Path
) -> None:
    slide = corrupt[case]
    code_expected, words = SLIDE_CASES[case]
    code, _, err = cli("tile", slide, "--out", tmp_path / "s.zarr", "-q")
    assert code == code_expected, err
    one_line_error(err, slide.name, words)
    assert files_under(tmp_path) == []


@counted
def test_missing_tiles_in_background_are_accepted(model: Path, tmp_path: Path) -> None:
    """Scanners leave empty background tiles out (sparse levels): that is not corruption."""
    src = write_synthetic_slide(tmp_path / "src.tif", BENIGN_SPEC, kind="generic")
    sparse = _zero_tiles(src, tmp_path / "sparse.tif", [(0, 0), (7, 0), (0, 7), (7, 7)])
    for backend in ("openslide", "tiffslide"):
        code, _, err = cli(sparse, "--out", tmp_path / backend / "x.tif", "--model", model, "-q",
                           "--backend", backend)  # fmt: skip
        assert code == 0, err
        complete_outputs(tmp_path / backend / "x.tif")


def _onnx_not_a_model(folder: Path, model: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    bad = folder / "garbage.onnx"
    bad.write_bytes(b"\x08\x07definitely not a protobuf ONNX graph" * 50)
    from wsi_pipeline.provenance import file_sha256

    card = json.loads(model.with_suffix(".json").read_text())
    card.update(onnx_file=bad.name, sha256=file_sha256(bad))  # the checksum matches: the content is bad
    bad.with_suffix(".json").write_text(json.dumps(card))
    return bad


def _onnx_wrong_input(folder: Path, model: Path) -> Path:
    onnx_path = write_test_model(folder, size_px=128, name="small-input")
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    card["input"]["size_px"] = 224  # the card claims 224 px, the graph takes 128 px
    onnx_path.with_suffix(".json").write_text(json.dumps(card))
    return onnx_path


MODEL_CASES = {"not-a-model": (_onnx_not_a_model, "not a loadable ONNX"), "wrong-input-shape": (
    _onnx_wrong_input, "input shape")}  # fmt: skip


@counted
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_onnx_is_one_clear_error_and_no_output(
    case: str, benign_slide: Fixture, model: Path, tmp_path: Path
) -> None:
    make, words = MODEL_CASES[case]
    bad = make(tmp_path / "model", model)
    out = tmp_path / "out"
    code, _, err = cli(benign_slide.path, "--out", out / "x.tif", "--model", bad, "-q")
    assert code == 8, err
    one_line_error(err, bad.name, words)
    assert files_under(out) == []


@counted
def test_folder_of_bad_inputs_skips_and_reports_each(
    corrupt: dict[str, Path], benign_slide: Fixture, model: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for case, p in corrupt.items():
        shutil.copy(p, folder / f"{case}{p.suffix}")
    shutil.copy(benign_slide.path, folder / "good.svs")
    out = tmp_path / "out"
    code, stdout, err = cli(folder, "--out", out, "--model", model, "-q")
    assert code == 1
    n = len(corrupt)
    assert f"{n + 1} slides, 1 done, {n} failed" in stdout
    summary = json.loads((out / "summary.json").read_text())["slides"]
    status = {Path(r["slide"]).stem: r for r in summary}
    assert status["good"]["status"] == "ok"
    for case in corrupt:
        assert status[case]["status"] == "failed" and f"{case}." in status[case]["error"], case
        assert f"{case}." in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("good.")) == [
        "report.html", "summary.csv", "summary.json"
    ]  # fmt: skip
    # tile mode: the same, with stores
    code, stdout, _ = cli("tile", folder, "--out", tmp_path / "stores", "-q")
    assert code == 1 and f"{n + 1} slides, 1 done, {n} failed" in stdout
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == [
        "good.tile-report.json", "good.zarr", "tile-summary.csv", "tile-summary.json"
    ]  # fmt: skip


XML_CASES = {
    "malformed": ("<ASAP_Annotations><Annotations><Annotation Name='a'", "malformed XML"),
    "billion-laughs": (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(
            f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
        )
        + "]><ASAP_Annotations>&lol9;</ASAP_Annotations>",
        "unsafe XML",
    ),
    "external-entity": (
        '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        "<ASAP_Annotations><Annotations><Annotation Name='&xxe;' Type='Polygon'/></Annotations>"
        "</ASAP_Annotations>",
        "unsafe XML",
    ),
    "not-asap": ("<svg><rect/></svg>", "not an ASAP file"),
    "non-numeric-coordinate": (
        "<ASAP_Annotations><Annotations><Annotation Name='t' Type='Polygon' PartOfGroup='Tumor'>"
        "<Coordinates><Coordinate Order='0' X='1e3' Y='oops'/></Coordinates></Annotation></Annotations>"
        "</ASAP_Annotations>",
        "not a number",
    ),
}


@counted
@pytest.mark.parametrize("case", list(XML_CASES))
def test_malformed_and_hostile_annotation_xml(case: str, tmp_path: Path) -> None:
    annotations = pytest.importorskip("wsi_pipeline.evaluation.annotations")
    read_asap_xml = getattr(annotations, "read_asap_xml", None)
    if read_asap_xml is None:
        pytest.skip("wsi_pipeline.evaluation.annotations.read_asap_xml does not exist yet")
    from wsi_pipeline.errors import AnnotationError

    text, words = XML_CASES[case]
    p = tmp_path / f"{case}.xml"
    p.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(AnnotationError) as info:
        read_asap_xml(p)
    assert time.perf_counter() - t0 < 5  # no entity expansion
    msg = str(info.value)
    assert str(p) in msg and words in msg and "\n" not in msg
    assert "root:x" not in msg  # the external entity was not resolved into the message


# --- full disk and read-only output ---------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``path`` (True) or do nothing when mounting is not allowed (False)."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(path)]
    ok = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(cmd, capture_output=True).returncode == 0
    )
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def fill_disk(folder: Path) -> Path:
    """Write a ballast file until the filesystem is full; returns it."""
    ballast = folder / "ballast"
    with ballast.open("wb") as fh:
        block = b"\0" * 65536
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    for size in (4096, 512, 1):  # and the last partial pages
        with contextlib.suppress(OSError), ballast.open("ab") as fh:
            while True:
                fh.write(b"\0" * size)
                fh.flush()
    return ballast


@contextlib.contextmanager
def simulated_enospc(match: str) -> Iterator[None]:
    """Without a mountable filesystem: os.fsync raises ENOSPC for temporary files naming ``match``."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if match in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        yield


@counted
def test_disk_full_while_writing_results(
    benign_slide: Fixture, tumour_slide: Fixture, model: Path, tmp_path: Path
) -> None:
    d = tmp_path / "disk"
    with tmpfs(d, "4m") as real:
        code, _, err = cli(benign_slide.path, "--out", d / "benign.tif", "--model", model, "-q")
        assert code == 0, err
        before = {p: (d / p).read_bytes() for p in files_under(d)}
        if real:
            ballast = fill_disk(d)
            code, _, err = cli(tumour_slide.path, "--out", d / "tumour.tif", "--model", model, "-q")
            note("disk full while writing results: real (tmpfs filled up)")
        else:
            with simulated_enospc("tumour"):
                code, _, err = cli(tumour_slide.path, "--out", d / "tumour.tif", "--model", model, "-q")
            note("disk full while writing results: SIMULATED (cannot mount a tmpfs here)")
        assert code == 6, err
        # A full disk is found before the slide is read (the output folder is probed) or, when space
        # runs out later, while writing the file: the error names the folder or the file.
        one_line_error(err, str(d), "disk full")
        assert not (d / "tumour.run.json").exists() and not list(d.glob(".*.tmp"))
        assert {p: (d / p).read_bytes() for p in before} == before  # earlier results intact
        if real:
            ballast.unlink()
        code, _, err = cli(tumour_slide.path, "--out", d / "tumour.tif", "--model", model, "-q")
        assert code == 0, err
        complete_outputs(d / "tumour.tif")


@counted
def test_disk_full_while_tiling_resumes_to_identical_store(tumour_slide: Fixture, tmp_path: Path) -> None:
    d = tmp_path / "disk"
    with tmpfs(d, "7m") as real:  # room for the first 64-tile chunk (~5 MB), not for the second
        out = d / "t.zarr"
        if real:
            code, _, err = cli("tile", tumour_slide.path, "--out", out, "-q")
            note("disk full while tiling: real (7 MB tmpfs, then remounted larger and resumed)")
        else:
            import zarr.storage._local as zarr_local

            real_put = zarr_local._put

            def put(path: Path, *a: Any, **k: Any) -> Any:
                if "tiles/c/1/" in str(path):  # the second chunk of tiles
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_put(path, *a, **k)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(zarr_local, "_put", put)
                code, _, err = cli("tile", tumour_slide.path, "--out", out, "-q")
            note("disk full while tiling: SIMULATED (zarr chunk write raises ENOSPC; cannot mount here)")
        assert code == 6, err
        one_line_error(err, "t.zarr.partial", "disk full")
        assert not out.exists() and partial_path(out).exists()  # kept for resuming
        if real:
            remount(d, "size=64m")
        code, stdout, err = cli("tile", tumour_slide.path, "--out", out, "-q")
        assert code == 0 and "resumed" in stdout, err
        ref = tmp_path / "ref.zarr"
        tile_slide(tumour_slide.path, ref, TileOptions())
        a, b = store_arrays(ref), store_arrays(out)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@counted
def test_read_only_output_directory(
    benign_slide: Fixture, tumour_slide: Fixture, model: Path, tmp_path: Path
) -> None:
    d = tmp_path / "ro"
    with tmpfs(d, "16m") as real:
        code, _, err = cli(benign_slide.path, "--out", d / "benign.tif", "--model", model, "-q")
        assert code == 0, err
        before = {p: (d / p).read_bytes() for p in files_under(d)}
        if real:
            remount(d, "ro")
            how = "real (tmpfs remounted read-only)"
        elif os.geteuid() != 0:
            d.chmod(0o555)
            how = "real (chmod 0555, not root)"
        else:
            how = None
        if how is None:
            with pytest.MonkeyPatch.context() as mp:
                import tempfile

                def mkstemp(*a: Any, **k: Any) -> Any:
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

                mp.setattr(tempfile, "mkstemp", mkstemp)
                code, _, err = cli(tumour_slide.path, "--out", d / "tumour.tif", "--model", model, "-q")
            how = "SIMULATED (root cannot be stopped by chmod and cannot mount here)"
        else:
            code, _, err = cli(tumour_slide.path, "--out", d / "tumour.tif", "--model", model, "-q")
        note(f"read-only output directory: {how}")
        assert code == 6, err
        one_line_error(err, str(d), "cannot write here")
        assert {p: (d / p).read_bytes() for p in files_under(d)} == before
        if real:
            code, _, err = cli("tile", tumour_slide.path, "--out", d / "t.zarr", "-q")
            assert code == 6, err
            one_line_error(err, "t.zarr", "cannot write here")
            assert files_under(d) == sorted(before)
