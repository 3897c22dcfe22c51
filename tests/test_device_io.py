"""The GPU path's parts that run anywhere (issue 17): I/O binding with pinned host buffers, fp16 where
the model card allows it, and refusals that never fall back silently. A GPU itself is checked by
``benchmarks/bench_gpu.py`` on a GPU machine; here the same code runs on onnxruntime's CPU provider."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from wsi_pipeline.cli import main
from wsi_pipeline.errors import DeviceError, ModelError
from wsi_pipeline.inference import binding
from wsi_pipeline.inference.binding import BoundRunner, describe_runner, make_runner
from wsi_pipeline.inference.card import ModelCard, load_card, resolve_model
from wsi_pipeline.inference.precision import (
    convert_fp16,
    fp16_allowed,
    fp16_model,
    fp16_model_path,
    resolve_precision,
)
from wsi_pipeline.inference.scoring import make_tasks, read_units, stream_score
from wsi_pipeline.inference.session import _tensorrt_options, create_session, prepare_batch, run_prepared
from wsi_pipeline.pipeline import output_paths
from wsi_pipeline.tiling.plan import TileOptions
from wsi_pipeline.tiling.source import open_source, read_chunk

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "CMU-1-Small-Region.svs"
CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


@pytest.fixture(scope="module")
def shipped() -> ModelCard:
    return resolve_model(None)


@pytest.fixture(scope="module")
def sample_tiles(shipped: ModelCard) -> np.ndarray:
    """The bundled sample's tissue tiles (real scanned H&E) at the shipped model's size."""
    source = open_source(SAMPLE, TileOptions(target_mpp=shipped.mpp, tile_px=shipped.input_size_px))
    return read_chunk(source.task_source(), source.layout.colrow, 0)


@pytest.fixture(scope="module")
def cpu_session(shipped: ModelCard) -> Any:
    return create_session(shipped, "cpu")[0]


def test_bound_runner_gives_session_run_results_for_every_batch_shape(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any
) -> None:
    run = BoundRunner(cpu_session, shipped, CPU)
    assert not run.pinned and run.describe()["io_binding"] is True
    for n in (16, 5, 16, 1):  # full, short and repeated shapes through one binding
        x = prepare_batch(sample_tiles[:n], shipped)
        p, d = run(x)
        q, e = run_prepared(cpu_session, shipped, x)
        assert p.shape == (n, 2) and np.array_equal(p, q)
        assert d is not None and e is not None and np.array_equal(d, e)


class _HostValues:
    """Stands in for onnxruntime's pinned allocator on a machine without a GPU: plain host OrtValues,
    counted, so the copy-into-a-kept-buffer path runs for real."""

    def __init__(self) -> None:
        self.made: list[tuple[int, ...]] = []

    def __call__(self, shape: list[int], dtype: Any, memory_info: Any = None) -> Any:
        assert memory_info == "pinned-host"
        self.made.append(tuple(shape))
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype))


def test_pinned_buffers_are_made_once_and_filled_every_batch(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = _HostValues()
    monkeypatch.setattr(binding, "host_memory_info", lambda provider: ("pinned-host", ""))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", values)
    run = BoundRunner(cpu_session, shipped, CUDA)
    assert run.describe() == {"io_binding": True, "pinned_input": True}
    for start, n in ((0, 8), (8, 8), (16, 3), (19, 8)):
        x = prepare_batch(sample_tiles[start : start + n], shipped)
        p, _ = run(x)
        assert np.array_equal(p, run_prepared(cpu_session, shipped, x)[0])  # this batch's, not a stale one
    assert values.made == [(8, 224, 224, 3)]  # the short batch was padded into the same buffer


def test_pinned_memory_that_cannot_be_had_is_recorded_and_batches_still_run(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a CPU memory info that onnxruntime has no allocator for: the allocation itself fails
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_DEVICE_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    monkeypatch.setattr(binding, "host_memory_info", lambda provider: (info, ""))
    run = BoundRunner(cpu_session, shipped, CUDA)
    x = prepare_batch(sample_tiles[:6], shipped)
    assert np.array_equal(run(x)[0], run_prepared(cpu_session, shipped, x)[0])
    d = run.describe()
    assert d["pinned_input"] is False and "pinned buffer failed" in d["pinned_input_why_not"]


def test_a_pinned_buffer_that_cannot_be_filled_falls_back_to_pageable_input(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unfillable:
        def update_inplace(self, x: np.ndarray) -> None:
            raise RuntimeError("copy to this memory is not supported")

    monkeypatch.setattr(binding, "host_memory_info", lambda provider: ("pinned-host", ""))
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", lambda *a, **k: Unfillable())
    run = BoundRunner(cpu_session, shipped, CUDA)
    for n in (4, 4):
        x = prepare_batch(sample_tiles[:n], shipped)
        assert np.array_equal(run(x)[0], run_prepared(cpu_session, shipped, x)[0])
    assert (
        run.describe()["pinned_input"] is False and "not supported" in run.describe()["pinned_input_why_not"]
    )


def test_a_binding_that_fails_where_session_run_works_is_recorded_and_batches_run_plainly(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any
) -> None:
    class NoBinding:  # a session whose I/O binding is broken, its session.run fine
        def __init__(self, real: Any) -> None:
            self.real = real

        def io_binding(self) -> Any:
            return self.real.io_binding()

        def run_with_iobinding(self, binding: Any) -> None:
            raise RuntimeError("binding not supported here")

        def run(self, *a: Any) -> Any:
            return self.real.run(*a)

    run = BoundRunner(NoBinding(cpu_session), shipped, CUDA)
    for n in (5, 3):
        x = prepare_batch(sample_tiles[:n], shipped)
        assert np.array_equal(run(x)[0], run_prepared(cpu_session, shipped, x)[0])
    d = run.describe()
    assert d["io_binding"] is False and "binding not supported here" in d["io_binding_why_not"]


def test_a_model_error_under_binding_is_still_the_models_error(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any
) -> None:
    class Broken:  # both ways fail: the model's own error, not hidden by a fallback
        def io_binding(self) -> Any:
            return cpu_session.io_binding()

        def run_with_iobinding(self, binding: Any) -> None:
            raise RuntimeError("CUDA error: out of memory")

        def run(self, *a: Any) -> Any:
            raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        BoundRunner(Broken(), shipped, CUDA)(prepare_batch(sample_tiles[:2], shipped))


def test_no_pinned_memory_on_a_provider_without_it_says_why() -> None:
    info, why = binding.host_memory_info(CUDA)  # this onnxruntime has no CUDA device
    assert info is None and CUDA in why


def test_bound_runner_is_safe_from_several_threads(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any
) -> None:
    run = BoundRunner(cpu_session, shipped, CPU)
    batches = [prepare_batch(sample_tiles[i : i + 4 + i % 3], shipped) for i in range(0, 24, 4)]
    want = [run_prepared(cpu_session, shipped, x)[0] for x in batches]
    got: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        for _ in range(3):
            got[k] = run(batches[k])[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[k], want[k]) for k in range(len(batches)))


def test_streaming_through_the_binding_equals_plain_runs(shipped: ModelCard, cpu_session: Any) -> None:
    source = open_source(SAMPLE, TileOptions(target_mpp=shipped.mpp, tile_px=shipped.input_size_px))
    units = read_units(make_tasks(source, shipped, chunk_tiles=20), 7, first=3)
    plain = stream_score(units, cpu_session, shipped, batch_size=8, readers=2)
    bound = stream_score(
        units,
        cpu_session,
        shipped,
        batch_size=8,
        readers=2,
        runner=BoundRunner(cpu_session, shipped, CPU),
    )
    assert np.array_equal(plain[0], bound[0]) and np.array_equal(plain[1], bound[1])
    assert describe_runner(make_runner(cpu_session, shipped, CPU)) == {"io_binding": False}


def _card_with(shipped: ModelCard, tmp_path: Path, fp16: Any) -> ModelCard:
    raw = json.loads(shipped.path.read_text())
    if fp16 is None:
        raw.pop("fp16", None)
    else:
        raw["fp16"] = fp16
    shutil.copy(shipped.onnx_path, tmp_path / shipped.onnx_path.name)
    (tmp_path / shipped.path.name).write_text(json.dumps(raw))
    return load_card(tmp_path / shipped.path.name)


def test_precision_follows_the_device_and_the_card(shipped: ModelCard, tmp_path: Path) -> None:
    assert fp16_allowed(shipped)  # the shipped card carries its measurement
    plain = _card_with(shipped, tmp_path, None)
    assert not fp16_allowed(plain)
    assert resolve_precision(shipped, CPU, "auto") == "fp32"
    assert resolve_precision(shipped, CUDA, "auto") == "fp16"
    assert resolve_precision(shipped, TRT, "auto") == "fp16"
    assert resolve_precision(plain, CUDA, "auto") == "fp32"
    assert resolve_precision(shipped, CUDA, "fp32") == "fp32"
    with pytest.raises(DeviceError, match="GPU"):
        resolve_precision(shipped, CPU, "fp16")
    with pytest.raises(ModelError, match=r"does not allow fp16.*models\.fp16_check"):
        resolve_precision(plain, CUDA, "fp16")
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_precision(shipped, CUDA, "int4")


def test_a_card_with_a_malformed_fp16_section_is_refused(shipped: ModelCard, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="fp16"):
        _card_with(shipped, tmp_path, {"allowed": "yes", "rule": "", "max_abs_dp": 0, "label_flips": 0,
                                       "n_tiles": 1})  # fmt: skip


def test_fp16_copy_keeps_inputs_and_outputs_and_agrees_with_fp32_on_real_tiles(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any, tmp_path: Path
) -> None:
    half = convert_fp16(shipped.onnx_path, tmp_path / "half.onnx")
    s16 = ort.InferenceSession(str(half), providers=[CPU])
    s32 = cpu_session
    assert [(i.name, i.type, i.shape) for i in s16.get_inputs()] == [
        (i.name, i.type, i.shape) for i in s32.get_inputs()
    ]
    assert [(o.name, o.type) for o in s16.get_outputs()] == [(o.name, o.type) for o in s32.get_outputs()]
    x = prepare_batch(sample_tiles, shipped)
    p16, p32 = run_prepared(s16, shipped, x)[0], run_prepared(s32, shipped, x)[0]
    dp = np.abs(p16 - p32).max()
    assert 0 < dp <= 0.02  # rounded (the graph really is fp16), within the card's rule
    assert half.stat().st_size < 0.6 * shipped.onnx_path.stat().st_size  # weights stored in half


def test_fp16_copy_is_converted_once_and_kept(
    shipped: ModelCard, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "cache"))
    first = fp16_model(shipped, ort.__version__)
    assert first == fp16_model_path(shipped, ort.__version__, tmp_path / "cache" / "onnxruntime")

    def fail(*a: Any) -> Any:
        raise AssertionError("converted again")

    monkeypatch.setattr("wsi_pipeline.inference.precision.convert_fp16", fail)
    assert fp16_model(shipped, ort.__version__) == first and first.is_file()
    assert not list(first.parent.glob(".*partial"))


def test_tensorrt_builds_fp16_engines_only_when_asked_and_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path))
    assert _tensorrt_options(True) == {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "tensorrt"),
    }  # fmt: skip
    assert _tensorrt_options(False)["trt_fp16_enable"] is False
    monkeypatch.setenv("WSI_PIPELINE_CACHE", "off")
    assert _tensorrt_options(True) == {"trt_fp16_enable": True}


def test_missing_gpu_is_reported_before_precision(shipped: ModelCard) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match=r"no CUDAExecutionProvider"):
        create_session(shipped, "cuda", precision="fp16")
    with pytest.raises(DeviceError, match="GPU"):
        create_session(shipped, "cpu", precision="fp16")


def test_cli_fp16_on_the_cpu_fails_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "h.tif"
    r = CliRunner().invoke(main, [str(SAMPLE), "--out", str(out), "--device", "cpu", "--precision", "fp16"])
    assert r.exit_code == 10, r.output
    assert "--precision fp16" in r.stderr and r.stderr.count("\n") == 1
    assert not any(p.exists() for p in output_paths(out).values())


def test_manifest_records_precision_and_how_batches_ran(tmp_path: Path) -> None:
    out = tmp_path / "h.tif"
    r = CliRunner().invoke(main, [str(SAMPLE), "--out", str(out), "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    m = json.loads(output_paths(out)["manifest"].read_text())
    assert m["precision_requested"] == "auto"
    assert m["run"] == {"precision": "fp32", "io_binding": False}


def test_gpu_benchmark_script_runs_through_on_the_cpu_and_refuses_a_missing_gpu(tmp_path: Path) -> None:
    """benchmarks/bench_gpu.py is the device check: prepared here so a GPU's few minutes go to measuring."""
    from benchmarks import bench_gpu

    report = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--tiles", "64", "--repeat", "1", "--no-resnet", "--work", str(tmp_path)]
    assert bench_gpu.main([*args, "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    rows = {(m["precision"], m["batch"], m["io"]): m for m in r["models"]}
    assert len(rows) == 8 and all(m["tiles_per_s"] > 0 for m in rows.values())
    assert all(
        rows[("fp32", b, io)]["max_abs_dp_vs_cpu_fp32"] == 0 for b in (64, 256) for io in ("plain", "bound")
    )
    assert 0 < rows[("fp16", 64, "bound")]["max_abs_dp_vs_cpu_fp32"] <= 0.02
    e2e = {row["precision_requested"]: row for row in r["end_to_end"]}
    assert e2e["auto"]["run"] == {"precision": "fp32", "io_binding": False} and e2e["auto"]["tiles"] > 0
    if CUDA not in ort.get_available_providers():
        assert bench_gpu.main(["--device", "cuda", "--work", str(tmp_path)]) == 10
    # where the slide libraries are missing: the sample's tiles saved here, measured there
    saved = tmp_path / "tiles.npy"
    assert bench_gpu.main(["--save-tiles", str(saved)]) == 0 and np.load(saved).shape[1:] == (224, 224, 3)
    again = tmp_path / "again.json"
    assert bench_gpu.main([*args, "--tiles-from", str(saved), "--no-e2e", "--json", str(again)]) == 0
    r2 = json.loads(again.read_text())
    assert r2["end_to_end"] == [] and len(r2["models"]) == 8
    assert all(m["max_abs_dp_vs_cpu_fp32"] == 0 for m in r2["models"] if m["precision"] == "fp32")


def test_auto_precision_on_cuda_without_onnx_runs_fp32_and_says_why(
    shipped: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from wsi_pipeline.inference.precision import why_fp32
    from wsi_pipeline.inference.scoring import run_details

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    assert resolve_precision(shipped, CUDA, "auto") == "fp32" and "onnx" in why_fp32(shipped, CUDA)
    assert resolve_precision(shipped, TRT, "auto") == "fp16"  # TensorRT converts by itself
    details = run_details(shipped, CUDA, "auto")
    assert details["precision"] == "fp32" and "pip install onnx" in details["why_fp32"]
    assert (
        resolve_precision(shipped, CUDA, "fp16") == "fp16"
    )  # asked for: converting then says what is missing


def test_a_gpu_session_keeps_one_bound_runner_and_a_cpu_session_runs_plainly(
    shipped: ModelCard, cpu_session: Any
) -> None:
    from wsi_pipeline.inference.scoring import session_runner

    gpu = session_runner(cpu_session, shipped, CUDA)  # what a CUDA session gets (here on a CPU session)
    assert isinstance(gpu, BoundRunner) and session_runner(cpu_session, shipped, CUDA) is gpu
    assert gpu.describe()["pinned_input"] is False  # this onnxruntime has no CUDA device to pin for
    assert not isinstance(session_runner(cpu_session, shipped, CPU), BoundRunner)


def test_the_report_says_how_a_gpu_run_went() -> None:
    from wsi_pipeline.io.report import _precision

    assert _precision({"precision": "fp16", "io_binding": True, "pinned_input": True}) == (
        "fp16, I/O binding, pinned input"
    )
    why = {"precision": "fp32", "why_fp32": "no onnx", "io_binding": True, "pinned_input": False}
    assert _precision(why) == "fp32 (no onnx), I/O binding, pageable input"
    assert _precision({"precision": "fp32", "io_binding": False}) == "fp32" and _precision({}) is None
    plain = {"precision": "fp16", "io_binding": False, "io_binding_why_not": "I/O binding failed: X"}
    assert _precision(plain) == "fp16, plain runs (I/O binding failed: X)"


def test_fp16_copy_goes_to_a_temporary_folder_when_the_cache_cannot_take_it(
    shipped: ModelCard, unwritable_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_pipeline.errors import OutputError
    from wsi_pipeline.inference import precision

    path = fp16_model(shipped, ort.__version__)
    assert path.is_file() and unwritable_cache not in path.parents
    assert ort.InferenceSession(str(path), providers=[CPU]).get_inputs()[0].type == "tensor(uint8)"

    def full(src: Path, dst: Path) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(precision, "convert_fp16", full)
    with pytest.raises(OutputError, match=r"tumour-cnn.onnx: cannot write its fp16 copy \(No space left"):
        fp16_model(shipped, ort.__version__)


def test_a_temporary_fp16_copy_is_removed_when_the_process_ends(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    code = (
        "import onnxruntime as ort; from wsi_pipeline.inference.card import resolve_model; "
        "from wsi_pipeline.inference.precision import fp16_model; "
        "p = fp16_model(resolve_model(None), ort.__version__); assert p.is_file(); print(p)"
    )
    env = {**os.environ, "WSI_PIPELINE_CACHE": "off"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not Path(r.stdout.strip()).exists()


def test_fp16_copy_keeps_the_heads_softmax_and_distance_in_fp32(shipped: ModelCard, tmp_path: Path) -> None:
    import onnx

    from wsi_pipeline.inference.precision import FP32_OPS

    model = onnx.shape_inference.infer_shapes(
        onnx.load(str(convert_fp16(shipped.onnx_path, tmp_path / "h.onnx")))
    )
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    head = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert {n.op_type for n in head} >= {"Softmax", "Pow", "ReduceSum", "Sqrt"}
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in head)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in convs)  # the bulk is fp16


def test_short_batches_are_padded_to_one_shape_and_give_their_own_rows(
    shipped: ModelCard, sample_tiles: np.ndarray, cpu_session: Any
) -> None:
    shapes: list[int] = []

    class Recording:  # the CPU session, recording the batch sizes the binding really runs
        def io_binding(self) -> Any:
            return cpu_session.io_binding()

        def run_with_iobinding(self, binding: Any) -> None:
            shapes.append(self.n)
            cpu_session.run_with_iobinding(binding)

    rec = Recording()
    run = BoundRunner(rec, shipped, CUDA)
    real_bind = run._state

    def state() -> Any:
        binding_, buffers = real_bind()
        original = binding_.bind_cpu_input

        def bind(name: str, x: np.ndarray) -> None:
            rec.n = len(x)
            original(name, x)

        binding_.bind_cpu_input = bind
        return binding_, buffers

    run._state = state  # type: ignore[method-assign]
    for start, n in ((0, 4), (4, 16), (20, 16), (36, 7)):
        x = prepare_batch(sample_tiles[start : start + n], shipped)
        p, d = run(x)
        q, e = run_prepared(cpu_session, shipped, x)
        assert p.shape == (n, 2) and d is not None and e is not None and d.shape == (n,)
        np.testing.assert_allclose(p, q, atol=1e-6)
        np.testing.assert_allclose(d, e, rtol=1e-5)
    assert shapes == [4, 16, 16, 16]  # the last batch of 7 ran as 16


def test_check_model_on_a_device_runs_tiles_as_a_run_would_and_compares_with_the_cpu(
    shipped: ModelCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wsi_pipeline.inference import session as session_module
    from wsi_pipeline.inference.check import DEVICE_TILES, check_model

    real = session_module.create_session

    def as_if_cuda(card: ModelCard, device: str = "auto", **kw: Any) -> Any:
        s, provider = real(card, "cpu", **{**kw, "precision": "fp32"})
        return s, (CUDA if device == "cuda" else provider)  # a CPU session standing in for the GPU's

    monkeypatch.setattr(session_module, "create_session", as_if_cuda)
    report = check_model(shipped.onnx_path, device="cuda", precision="fp32")
    assert report.device is not None and report.device.provider == CUDA
    assert report.device.tiles == DEVICE_TILES and report.device.max_abs_dp == 0.0
    assert report.device.run["io_binding"] is True and report.device.run["precision"] == "fp32"
    assert "on CUDAExecutionProvider (precision fp32, io_binding True" in report.line()
    assert check_model(shipped.onnx_path, device="auto").device is None  # no GPU here: the CPU check


def test_cli_check_model_on_a_missing_gpu_fails_in_one_line(shipped: ModelCard) -> None:
    if CUDA in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    r = CliRunner().invoke(main, ["check-model", str(shipped.onnx_path), "--device", "cuda"])
    assert r.exit_code == 10 and "CUDAExecutionProvider" in r.stderr and r.stderr.count("\n") == 1
