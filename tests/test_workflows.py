"""Cluster workflows: workflows/batch_folder.py on real multi-process Dask clusters (results equal a
local run; GPU tasks only on GPU workers, refused where there is none) and the dask-jobqueue SLURM
recipe (job scripts, without submitting)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import Fixture, write_test_model
from wsi_pipeline.cli import main as cli_main
from wsi_pipeline.pipeline import output_paths

distributed = pytest.importorskip("distributed")

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch_folder() -> ModuleType:
    return load(WORKFLOWS / "batch_folder.py", "wsi_batch_folder")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("wf-model"))


@pytest.fixture(scope="module")
def folder(
    tmp_path_factory: pytest.TempPathFactory, tumour_slide: Fixture, benign_slide: Fixture, not_a_slide: Path
) -> Path:
    d = tmp_path_factory.mktemp("wf-slides")
    for p in (tumour_slide.path, benign_slide.path, not_a_slide):
        shutil.copy(p, d / p.name)
    return d


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """Three worker processes, no resources (CPU-only workers)."""
    with distributed.LocalCluster(
        n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None
    ) as c:
        yield c


@pytest.fixture(scope="module")
def local_run(folder: Path, model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same folder scored by the CLI with local Dask threads."""
    out = tmp_path_factory.mktemp("wf-local")
    r = CliRunner().invoke(cli_main, [str(folder), "--out", str(out), "--model", str(model), "-q",
                                      "--chunk-tiles", "32"])  # fmt: skip
    assert r.exit_code == 1, r.stderr  # the bad slide
    return out


def summary(out: Path) -> dict[str, dict[str, Any]]:
    return {Path(r["slide"]).name: r for r in json.loads((out / "summary.json").read_text())["slides"]}


def test_batch_folder_on_a_local_cluster_equals_a_local_run(
    batch_folder: ModuleType, cluster: Any, folder: Path, model: Path, local_run: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    argv = [str(folder), "--out", str(out), "--scheduler", cluster.scheduler_address, "--model", str(model),
            "--chunk-tiles", "32"]  # fmt: skip
    monkeypatch.setenv("WSI_PIPELINE_PROGRESS_SECONDS", "0")  # a progress line at every finished task
    code = batch_folder.main(argv)
    captured = capsys.readouterr()
    assert code == 1  # carried on past the bad slide, reported it
    assert "3 slides, 2 done, 1 failed" in captured.out and "; 1 tumour, 1 no tumour -> " in captured.out
    assert any(ln.startswith("tumour.svs: ") and "tiles/s, ETA" in ln for ln in captured.out.splitlines())
    assert "[2/3] " in captured.out and "so far, ETA" in captured.out
    assert "notes.svs" in captured.err and captured.err.startswith("error: ")
    dist, local = summary(out), summary(local_run)
    assert dist["notes.svs"]["status"] == "failed" and not list(out.glob("notes*"))
    for name in ("tumour.svs", "benign.svs"):
        for key in ("status", "label", "n_tiles", "max_p"):
            assert dist[name][key] == local[name][key], (name, key)
        stem = Path(name).stem
        a = output_paths(local_run / f"{stem}.tif")
        b = output_paths(out / f"{stem}.tif")
        assert a["tiles_csv"].read_text() == b["tiles_csv"].read_text()
        ma, mb = json.loads(a["manifest"].read_text()), json.loads(b["manifest"].read_text())
        assert ma["label"] == mb["label"] and mb["scheduler"] == f"distributed {cluster.scheduler_address}"
        assert mb["timings"]["tasks"] >= 2
        assert mb["command"]["argv"] == ["workflows/batch_folder.py", *argv]  # the job, as it was started
    assert mb["precision_requested"] == "auto" and mb["run"] == {"precision": "fp32"}  # CPU workers
    job = json.loads((out / "batch-job.json").read_text())
    assert len(job["workers"]) == 3 and job["task_resources"] is None and job["precision"] == "auto"
    assert job["probe_provider"] == "CPUExecutionProvider"
    # Resume: a second run skips the finished slides.
    assert batch_folder.main([*argv, "-q"]) == 1
    assert {n: r["status"] for n, r in summary(out).items()} == {
        "benign.svs": "skipped (done)", "notes.svs": "failed", "tumour.svs": "skipped (done)"
    }  # fmt: skip


def test_gpu_job_refuses_a_cluster_without_gpu_workers(
    batch_folder: ModuleType, cluster: Any, folder: Path, model: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """--device cuda needs workers with the GPU resource; none here: a clear error, nothing runs on CPUs."""
    out = tmp_path / "out"
    with distributed.Client(cluster) as client, distributed.get_task_stream(client) as ts:
        code = batch_folder.main([str(folder), "--out", str(out), "--scheduler", cluster.scheduler_address,
                                  "--model", str(model), "--device", "cuda", "--wait-timeout", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 10
    assert err.count("\n") == 1 and "no worker of the Dask cluster advertises GPU=1" in err
    assert "--resources GPU=1" in err and cluster.scheduler_address in err
    assert ts.data == [] and not out.exists()  # no task ran anywhere, nothing written


@pytest.fixture(scope="module")
def mixed_cluster() -> Iterator[Any]:
    """One CPU-only worker and one that advertises GPU=1 (as `dask worker --resources GPU=1` would)."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        "cpu-0": {"cls": Nanny, "options": {"nthreads": 1}},
        "gpu-0": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
    }
    with SpecCluster(
        workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}}, asynchronous=False
    ) as c:  # fmt: skip
        yield c


def test_gpu_resource_tasks_run_only_on_gpu_workers(
    batch_folder: ModuleType, mixed_cluster: Any, folder: Path, model: Path, local_run: Path, tmp_path: Path
) -> None:
    """Scoring tasks that require GPU=1 all land on the GPU worker (here run with --device cpu, since
    this machine has no CUDA: the routing is what is tested)."""
    out = tmp_path / "out"
    with distributed.Client(mixed_cluster) as client:
        client.wait_for_workers(2, timeout=60)
        gpu = [a for a, w in client.scheduler_info()["workers"].items() if w["resources"].get("GPU")]
        with distributed.get_task_stream(client) as ts:
            code = batch_folder.main([str(folder), "--out", str(out), "--scheduler", mixed_cluster.scheduler_address,
                                      "--model", str(model), "--device", "cpu", "--resources", "GPU=1",
                                      "--chunk-tiles", "32", "-q"])  # fmt: skip
    assert code == 1  # notes.svs
    scoring = [t for t in ts.data if "score_chunk" in str(t["key"]) or "probe_session" in str(t["key"])]
    assert len(scoring) > 5
    assert {t["worker"] for t in scoring} == set(gpu)
    for stem in ("tumour", "benign"):
        a = output_paths(local_run / f"{stem}.tif")["tiles_csv"]
        assert a.read_text() == output_paths(out / f"{stem}.tif")["tiles_csv"].read_text()
    assert json.loads((out / "batch-job.json").read_text())["task_resources"] == {"GPU": 1.0}


def test_gpu_worker_without_cuda_is_reported_once(
    batch_folder: ModuleType, mixed_cluster: Any, folder: Path, model: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A worker that advertises a GPU but whose onnxruntime has no CUDA: the probe fails (exit 10)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    code = batch_folder.main([str(folder), "--out", str(out), "--scheduler", mixed_cluster.scheduler_address,
                              "--model", str(model), "--device", "cuda"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 10 and err.count("\n") == 1 and "CUDAExecutionProvider" in err
    assert not out.exists()


def test_fp16_on_cpu_workers_is_refused_by_the_probe_before_any_slide(
    batch_folder: ModuleType, cluster: Any, folder: Path, model: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    out = tmp_path / "out"
    code = batch_folder.main([str(folder), "--out", str(out), "--scheduler", cluster.scheduler_address,
                              "--model", str(model), "--device", "cpu", "--precision", "fp16"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 10 and err.count("\n") == 1 and "--precision fp16" in err
    assert not out.exists()


def test_script_with_local_cluster_refuses_gpu_and_bad_arguments(
    folder: Path, model: Path, tmp_path: Path
) -> None:
    """The script entry point: --local N starts its own cluster; errors are one line with a code."""
    script = str(WORKFLOWS / "batch_folder.py")
    r = subprocess.run(
        [sys.executable, script, str(folder), "--out", str(tmp_path / "o"), "--local", "1", "--model", str(model),
         "--device", "cuda", "--wait-timeout", "0.5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 10, r.stderr
    assert r.stderr.startswith("error: ") and "GPU=1" in r.stderr and not (tmp_path / "o").exists()
    r = subprocess.run(
        [sys.executable, script, str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--local", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr


def test_resource_arguments(batch_folder: ModuleType) -> None:
    from wsi_pipeline.errors import WsiError

    assert batch_folder.task_resources("cuda", None) == {"GPU": 1.0}
    assert batch_folder.task_resources("tensorrt", None, "A100") == {"A100": 1.0}
    assert batch_folder.task_resources("auto", None) is None
    assert batch_folder.task_resources("cpu", ["GPU=1", "MEM=2e9"]) == {"GPU": 1.0, "MEM": 2e9}
    assert batch_folder.task_resources("cuda", []) is None  # explicitly none
    with pytest.raises(WsiError, match="NAME=AMOUNT"):
        batch_folder.parse_resources(["GPU"])


# --- SLURM (dask-jobqueue): job scripts only, nothing is submitted -----------------------------------


@pytest.fixture(scope="module")
def run_slurm() -> ModuleType:
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install dask-jobqueue)")
    return load(WORKFLOWS / "slurm" / "run_slurm.py", "wsi_run_slurm")


@pytest.mark.parametrize("pool", ["gpu", "cpu"])
def test_slurm_job_scripts(
    run_slurm: ModuleType, pool: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe builds a SLURMCluster from jobqueue.yaml; its job script (no sbatch needed) asks
    SLURM for a GPU and advertises it to Dask on the GPU pool only."""
    code = run_slurm.main([str(folder), "--out", str(tmp_path / "o"), "--pool", pool, "--dry-run",
                           "--queue", "short", "--model", "m.onnx"])  # fmt: skip
    script = capsys.readouterr().out
    assert code == 0
    assert script.startswith("#!/usr/bin/env bash") and "#SBATCH -p short" in script
    assert "distributed.cli.dask_worker" in script and "--nthreads 8" in script
    batch_line = next(line for line in script.splitlines() if line.startswith("# batch_folder.py"))
    assert "--model m.onnx" in batch_line and "--scheduler tcp://" in batch_line
    if pool == "gpu":
        assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
        assert "--device cuda" in batch_line
    else:
        assert "--gres" not in script and "--resources" not in script and "--device" not in batch_line
    assert not (tmp_path / "o").exists()


def test_cluster_runs_check_the_model_on_the_cpu_and_leave_the_device_to_the_workers(
    cluster: Any, tumour_slide: Fixture, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head node without a GPU sends --device cuda work to GPU workers: it only checks the model, on
    its CPU; the device is the workers' (here CPU-only workers refuse it, naming the provider)."""
    import onnxruntime as ort

    from wsi_pipeline import pipeline
    from wsi_pipeline.errors import DeviceError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    checked: list[tuple[str, str]] = []
    real = pipeline._verified_session

    def record(verify: Any, card: Any, device: str, threads: Any, precision: str) -> Any:
        checked.append((device, precision))
        return real(verify, card, device, threads, precision)

    monkeypatch.setattr(pipeline, "_verified_session", record)
    opts = pipeline.RunOptions(device="cuda", precision="fp16", chunk_tiles=64)
    with distributed.Client(cluster) as client, pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        pipeline.run_slide(tumour_slide.path, tmp_path / "t.tif", model=model, options=opts, client=client)
    assert checked == [("cpu", "fp32")]
    assert not (tmp_path / "t.run.json").exists()


def test_recursive_reaches_case_folders_in_batch_folder_and_tile(
    batch_folder: ModuleType, tmp_path: Path
) -> None:
    """`--recursive` is wired through the cluster workflow's item list and `wsi-infer tile`."""
    sample = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"
    src = tmp_path / "scans"
    (src / "case1").mkdir(parents=True)
    shutil.copy(sample, src / "case1" / "a.svs")
    args = batch_folder.build_parser().parse_args(
        [str(src), "--out", str(tmp_path / "o"), "--local", "1", "-r"]
    )
    assert args.recursive
    assert [i.slide for i in batch_folder.list_items(src, recursive=True)] == [
        (src / "case1" / "a.svs").resolve()
    ]
    with pytest.raises(Exception, match=r"subfolders hold 1 slide file \(e.g. case1/a.svs\): --recursive"):
        batch_folder.list_items(src)
    r = CliRunner().invoke(
        cli_main, ["tile", str(src), "--out", str(tmp_path / "stores"), "-q", "--recursive"]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "stores" / "a.zarr").is_dir()


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--batch-size", "0", "0 is out of range (must be >= 1)"),  # hung the job before
        ("--chunk-tiles", "0", "0 is out of range (must be >= 1)"),  # a traceback before
        ("--min-tissue", "2", "2 is out of range (must be >= 0 and <= 1)"),  # failed every slide
        ("--tile-threshold", "1.5", "1.5 is out of range (must be >= 0 and <= 1)"),  # ran, nothing positive
        ("--target-mpp", "0", "0 is out of range (must be > 0)"),  # ran, ignoring it
        ("--top-k", "0", "0 is out of range (must be >= 1)"),
        ("--batch-size", "x", "'x' is not an integer"),
    ],
)
def test_batch_folder_refuses_impossible_options_before_any_cluster_starts(
    batch_folder: ModuleType, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    option: str, value: str, says: str,
) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        batch_folder.main([str(folder), "--out", str(tmp_path / "out"), "--local", "1", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: {says}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_options_that_would_never_finish_are_refused_by_the_library_too() -> None:
    """`run_slide` callers get the CLI's checks: a batch of 0 tiles made the scorer loop forever."""
    from wsi_pipeline.aggregate import LabelRule
    from wsi_pipeline.errors import UsageError
    from wsi_pipeline.pipeline import RunOptions
    from wsi_pipeline.tiling.plan import TileOptions

    for make in (
        lambda: RunOptions(batch_size=0),
        lambda: RunOptions(chunk_tiles=0),
        lambda: TileOptions(tile_px=0),
        lambda: TileOptions(target_mpp=0.0),
        lambda: TileOptions(min_tissue_fraction=1.5),
        lambda: LabelRule(tile_threshold=1.5),
        lambda: LabelRule(top_k=0),
    ):
        with pytest.raises(UsageError):
            make()


def test_sigterm_stops_the_script_cleanly_with_its_summary(
    tumour_slide: Fixture, model: Path, tmp_path: Path
) -> None:
    """A SLURM time limit sends SIGTERM: the job used to die where it stood, with no summary. It now
    exits 143 with one line, summary.json marked interrupted and listing what was done."""
    import signal
    import time

    src = tmp_path / "slides"
    src.mkdir()
    for i in range(6):
        shutil.copyfile(tumour_slide.path, src / f"s{i}.svs")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(WORKFLOWS / "batch_folder.py"), str(src), "--out", str(out), "--local", "1",
         "--model", str(model), "--chunk-tiles", "16", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.run.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the job finished before the signal arrived")
    assert proc.returncode == 143, err
    assert (
        "error: terminated (SIGTERM: a time limit" in err
        and "re-run the same command" in err
        and "Traceback" not in err
    )
    rows = json.loads((out / "summary.json").read_text())
    assert rows["interrupted"] is True and len(rows["slides"]) == 6
    done = {p.name.removesuffix(".run.json") + ".svs" for p in out.glob("*.run.json")}
    assert {Path(r["slide"]).name for r in rows["slides"] if r["status"] == "ok"} == done


def test_batch_folder_scores_only_each_slides_regions(
    batch_folder: ModuleType, cluster: Any, folder: Path, model: Path, local_run: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """--regions as in wsi-infer: each slide's file from the folder; a slide without one fails (exit 9 in
    its row) and the others run; a single file for a folder job is refused before any cluster starts."""
    from wsi_pipeline.evaluation.annotations import write_asap_xml

    regions = tmp_path / "regions"
    regions.mkdir()
    write_asap_xml(regions / "tumour.xml", [("ROI", [(300, 200), (2000, 200), (2000, 2800), (300, 2800)])])
    out = tmp_path / "out"
    argv = [str(folder), "--out", str(out), "--scheduler", cluster.scheduler_address, "--model", str(model),
            "--regions", str(regions), "-q"]  # fmt: skip
    assert batch_folder.main(argv) == 1
    rows, local = summary(out), summary(local_run)
    assert rows["benign.svs"]["status"] == "failed" and rows["benign.svs"]["error_code"] == 9
    assert 0 < rows["tumour.svs"]["n_tiles"] < local["tumour.svs"]["n_tiles"]
    assert "benign.svs: no region file for it in" in capsys.readouterr().err
    code = batch_folder.main([argv[0], "--out", str(tmp_path / "o2"), "--local", "1",
                              "--regions", str(regions / "tumour.xml")])  # fmt: skip
    assert code == 2 and "a folder run needs a folder of region files" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_batch_folder_prints_each_slides_warnings_as_the_cli_does(
    batch_folder: ModuleType, cluster: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blurred real scan scored on the cluster: its focus warning (and the sample's OOD warning) is on
    the job's output, not only in the summary."""
    from testkit.defocus import write_defocused_sample

    src = tmp_path / "in"
    src.mkdir()
    write_defocused_sample(src / "blurred.svs", 1.5)
    code = batch_folder.main(
        [str(src), "--out", str(tmp_path / "out"), "--scheduler", cluster.scheduler_address]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "blurred.svs: WARNING 100% of the tissue tiles look out of focus" in out
    row = summary(tmp_path / "out")["blurred.svs"]
    assert row["focus_warning"] is True and row["out_of_focus"] == 1.0
    assert "1 out of focus: review by eye" in out
