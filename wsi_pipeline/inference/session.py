"""onnxruntime sessions for a classifier, and tiles through them.

The model's card (what it expects and returns) is :mod:`wsi_pipeline.inference.card`; a session is
checked against it (input name, shape and type, output names, number of classes) before it is used.

Execution providers are explicit: asking for ``cuda`` or ``tensorrt`` where onnxruntime cannot use
them is a :class:`~wsi_pipeline.errors.DeviceError`, never a silent CPU run.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.cores import cpu_limit
from wsi_pipeline.errors import DeviceError, ModelError
from wsi_pipeline.inference.card import ModelCard
from wsi_pipeline.inference.model_cache import optimized_model_path

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def create_session(
    card: ModelCard,
    device: str = "auto",
    *,
    threads: int | None = None,
    spinning: bool = True,
    cache: bool = False,
    precision: str = "fp32",
) -> tuple[Any, str]:
    """An onnxruntime session for ``card`` on ``device``; returns (session, provider really used).

    ``threads``: intra-op threads (default: onnxruntime's, one per core of the host, or one per
    whole CPU of a container's CPU quota where one limits this process); ``spinning=False`` lets
    them sleep between batches, which matters when reader threads share the cores. ``cache``: a CPU
    session loads the model's optimized copy from :mod:`~wsi_pipeline.inference.model_cache` (or
    saves it there while it is built), skipping the graph optimization of every later run.
    ``auto`` takes CUDA when onnxruntime offers it, else the CPU. ``cuda``/``tensorrt`` that are not
    available raise :class:`DeviceError`; so does a session that silently fell back to the CPU.
    ``precision``: ``fp32``, ``fp16`` or ``auto`` (fp16 only on a GPU and where the card allows it:
    :func:`~wsi_pipeline.inference.precision.resolve_precision`). TensorRT engines are kept in the
    cache folder.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DeviceError(
            "onnxruntime is not installed; pip install 'wsi-pipeline[cpu]' (or '[gpu]' on a CUDA machine)"
        ) from exc
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    available = ort.get_available_providers()
    auto = "cuda" if PROVIDERS["cuda"] in available else "cpu"
    wanted = auto if device == "auto" else device
    provider = PROVIDERS[wanted]
    if provider not in available:
        raise DeviceError(
            f"--device {device}: onnxruntime here has no {provider} (available: {', '.join(available)}); "
            f"install the GPU build (pip install 'wsi-pipeline[gpu]') on a machine with CUDA, or use "
            f"--device cpu"
        )
    from wsi_pipeline.inference.precision import fp16_model, resolve_precision

    half = resolve_precision(card, provider, precision) == "fp16"
    providers: list[Any] = [provider] if wanted == "cpu" else [provider, PROVIDERS["cpu"]]
    if wanted == "tensorrt":  # TensorRT builds its own fp16 engine from the fp32 graph; what it
        # cannot take runs on CUDA where onnxruntime has it, not on the CPU
        cuda = [PROVIDERS["cuda"]] if PROVIDERS["cuda"] in available else []
        providers = [(provider, _tensorrt_options(half)), *cuda, PROVIDERS["cpu"]]
    model_path = fp16_model(card, ort.__version__) if half and wanted == "cuda" else card.onnx_path

    if not threads and cpu_limit().quota is not None:  # onnxruntime counts the host's cores
        threads = cpu_limit().cores

    def options() -> Any:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not spinning:  # idle intra-op threads sleep instead of spinning: reader threads need the cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        return opts

    cached = optimized_model_path(card, provider, ort.__version__) if cache else None
    session = _load_optimized(ort, cached, options(), providers) if cached is not None else None
    try:
        if session is None:
            session = _build_session(ort, model_path, cached, options, providers)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if wanted != "cpu" and "provider" in msg.lower():
            raise DeviceError(f"{card.onnx_path}: cannot start {provider} ({msg}); use --device cpu") from exc
        raise ModelError(f"{card.onnx_path}: not a loadable ONNX model ({msg}); re-export the model") from exc
    used = session.get_providers()[0]
    if used != provider:
        raise DeviceError(
            f"{card.onnx_path}: asked for {provider} but onnxruntime runs on {used} (CUDA libraries "
            f"missing?); fix the CUDA install or use --device cpu"
        )
    check_graph(session, card)
    return session, used


def _load_optimized(ort: Any, cached: Path, opts: Any, providers: list[Any]) -> Any:
    """The session from the cached optimized model (optimization off: it is done), or None when
    there is none or it does not load (then it is removed and rebuilt)."""
    if not cached.is_file():
        return None
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(cached), sess_options=opts, providers=providers)
    except Exception:
        with contextlib.suppress(OSError):
            cached.unlink()
        return None


def _tensorrt_options(half: bool) -> dict[str, Any]:
    """TensorRT provider options: fp16 engines when ``half``; engines kept in the cache folder (the
    first run of a model builds its engine, for minutes; later runs load it)."""
    from wsi_pipeline.cache import cache_dir

    opts: dict[str, Any] = {"trt_fp16_enable": half}
    folder = cache_dir()
    if folder is not None:
        opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder / "tensorrt")}
    return opts


def _build_session(ort: Any, model: Path, cached: Path | None, options: Any, providers: list[Any]) -> Any:
    """The session from the model file; when ``cached`` is given, its optimized graph is saved there
    too (under a temporary name, then renamed). A cache that cannot be written only means no cache."""
    tmp: Path | None = None
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{threading.get_ident()}.partial")
        except OSError:
            tmp = None
    opts = options()
    if tmp is not None:
        opts.optimized_model_filepath = str(tmp)
    try:
        session = ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    except Exception:
        if tmp is None:
            raise
        with contextlib.suppress(OSError):
            tmp.unlink()
        # perhaps only the cache could not be written: the model's own error comes from a plain load
        return ort.InferenceSession(str(model), sess_options=options(), providers=providers)
    if tmp is not None and cached is not None:
        try:
            os.replace(tmp, cached)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return session


_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


def _fix(card: ModelCard, field: str, what: str, fix: str) -> ModelError:
    return ModelError(f"{card.path}: {field}: {what}; {fix} (model {card.onnx_path.name})")


def _layout_of(dims: list[Any]) -> str | None:
    """NCHW or NHWC from an input's non-batch dims, None when the shape does not tell."""
    first, last = dims[0] == 3, dims[2] == 3
    if first and not last:
        return "NCHW"
    if last and not first:
        return "NHWC"
    return None


def check_graph(session: Any, card: ModelCard) -> None:
    """Compare the card with the graph of ``session``, field by field; raise one :class:`ModelError`
    naming the first field that differs and how to fix the card. Every session is checked so
    (``create_session``: runs and ``wsi-infer check-model`` alike)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if card.input_name not in inputs:
        names = list(inputs)
        fix = f'set input.name to "{names[0]}"' if len(names) == 1 else f"set input.name to one of {names}"
        raise _fix(
            card, "input.name", f"the model has no input {card.input_name!r} (its inputs: {names})", fix
        )
    inp = inputs[card.input_name]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise _fix(
            card, "input", f"the model's input {inp.name!r} has shape {shape}",
            "wsi-pipeline feeds a batch of RGB tiles, [N, 3, size, size] (NCHW) or [N, size, size, 3] "
            "(NHWC): use a model with a 4-d image input",
        )  # fmt: skip
    dims = shape[1:]
    layout = _layout_of(dims)
    if layout is not None and layout != card.input_layout:
        raise _fix(
            card, "input.layout", f"the card says {card.input_layout} but the model takes {shape} ({layout})",
            f'set input.layout to "{layout}" (and input.shape to match)',
        )  # fmt: skip
    spatial = dims[1:] if card.input_layout == "NCHW" else dims[:2]
    channels = dims[0] if card.input_layout == "NCHW" else dims[2]
    if isinstance(channels, int) and channels != 3:
        raise _fix(
            card, "input", f"the model's input {inp.name!r} {shape} has {channels} channels",
            "wsi-pipeline feeds RGB tiles (3 channels): use an RGB model",
        )  # fmt: skip
    sizes = [d for d in spatial if isinstance(d, int)]
    if sizes and any(d != card.input_size_px for d in sizes):
        raise _fix(
            card, "input.size_px",
            f"the card says {card.input_size_px} but the model's input shape is {shape}",
            f"set input.size_px to {sizes[0]} (and mpp to the um/px the model was trained at)",
        )  # fmt: skip
    dtype = _ORT_TYPES.get(inp.type)
    if dtype is None:
        raise _fix(
            card, "input.dtype", f"the model takes {inp.type}",
            "wsi-pipeline feeds uint8 (0-255) or float32 tiles: re-export the model with one of those",
        )  # fmt: skip
    if dtype != card.input_dtype:
        how = (
            "tiles are then fed as RGB / 255, normalized by preprocessing.mean/std unless "
            "preprocessing.in_graph"
            if dtype == "float32"
            else "tiles are then fed as 0-255 RGB"
        )
        raise _fix(
            card, "input.dtype", f"the card says {card.input_dtype} but the model takes {inp.type}",
            f'set input.dtype to "{dtype}" ({how})',
        )  # fmt: skip
    if card.output_name not in outputs:
        names = list(outputs)
        fix = f'set output.name to "{names[0]}"' if len(names) == 1 else f"set output.name to one of {names}"
        raise _fix(
            card, "output.name", f"the model has no output {card.output_name!r} (its outputs: {names})", fix
        )
    out_shape = list(outputs[card.output_name].shape)
    if len(out_shape) != 2:
        raise _fix(
            card, "output.name", f"output {card.output_name!r} has shape {out_shape}",
            "it must be [N, number of classes]: name the output with one value per class",
        )  # fmt: skip
    n_out = out_shape[1]
    if isinstance(n_out, int) and n_out != len(card.classes):
        raise _fix(
            card, "classes", f"the card lists {len(card.classes)} classes but output {card.output_name!r} "
            f"gives {n_out} values per tile",
            f"list {n_out} class names, in the order of the output",
        )  # fmt: skip
    if card.ood_output and card.ood_output not in outputs:
        raise _fix(
            card, "ood.output", f"the model has no output {card.ood_output!r} (its outputs: {list(outputs)})",
            "name the model's OOD distance output, or remove the ood section",
        )  # fmt: skip


def prepare_batch(tiles: np.ndarray, card: ModelCard) -> np.ndarray:
    """uint8 NHWC RGB tiles -> the model's input (only a layout change when preprocessing is in graph)."""
    nchw = card.input_layout == "NCHW"
    if card.input_dtype == "uint8":
        return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2) if nchw else tiles)
    # One float32 buffer in the model's layout, scaled and normalized in place: the same arithmetic
    # as (x / 255 - mean) / std on a float copy (bit for bit), 6x faster than four temporaries.
    n, h, w, c = tiles.shape
    x = np.empty((n, c, h, w) if nchw else (n, h, w, c), np.float32)
    x[...] = tiles.transpose(0, 3, 1, 2) if nchw else tiles
    x /= np.float32(255.0)
    if not card.in_graph:
        shape = (c, 1, 1) if nchw else (c,)
        x -= np.asarray(card.mean, np.float32).reshape(shape)
        x /= np.asarray(card.std, np.float32).reshape(shape)
    return x


def predict(session: Any, card: ModelCard, tiles: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, n_classes) float32 for uint8 (N, H, W, 3) tiles, in batches."""
    return predict_with_ood(session, card, tiles, batch_size=batch_size)[0]


def predict_with_ood(
    session: Any, card: ModelCard, tiles: np.ndarray, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (N, n_classes) and, when the card names one, the per-tile OOD distance (N,).

    The class output is read as the card's ``output.kind`` says (:func:`to_probabilities`).
    """
    check_tiles(tiles, card)
    out = np.empty((len(tiles), len(card.classes)), np.float32)
    ood = np.empty(len(tiles), np.float32) if card.ood_output else None
    for i in range(0, len(tiles), batch_size):
        p, d = run_prepared(session, card, prepare_batch(tiles[i : i + batch_size], card))
        out[i : i + len(p)] = p
        if ood is not None and d is not None:
            ood[i : i + len(p)] = d
    return out, ood


def check_tiles(tiles: np.ndarray, card: ModelCard) -> None:
    """Raise :class:`ModelError` unless ``tiles`` are (N, size, size, 3) at the model's input size."""
    if tiles.shape[1:] != (card.input_size_px, card.input_size_px, 3):
        raise ModelError(
            f"{card.onnx_path}: tiles of shape {tiles.shape[1:]} given, the model takes "
            f"{card.input_size_px} px RGB tiles; tile at the model's size"
        )


def run_prepared(session: Any, card: ModelCard, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """One ``session.run`` on a batch already in the model's input form (:func:`prepare_batch`):
    probabilities (n, n_classes) float32 and the OOD distances (n,) when the card names that output."""
    names = [card.output_name] + ([card.ood_output] if card.ood_output else [])
    res = session.run(names, {card.input_name: x})
    ood = np.asarray(res[1], np.float32).reshape(-1) if card.ood_output else None
    return to_probabilities(res[0], card), ood


#: an output declared as probabilities may leave [0, 1] by this much (float rounding), no more
PROB_RANGE_TOL = 1e-5
#: ... and each tile's probabilities must sum to 1 within this
PROB_SUM_TOL = 1e-3


def to_probabilities(raw: np.ndarray, card: ModelCard) -> np.ndarray:
    """A batch of the class output (n, n_classes) as probabilities, per the card's ``output.kind``.

    ``logits``: a numerically stable softmax over the classes. ``probabilities``: checked, not changed
    (beyond clipping float rounding into [0, 1]); values outside [0, 1], rows that do not sum to 1 or
    non-finite values raise :class:`ModelError` naming the model, in the worker that ran the batch.
    """
    x = np.asarray(raw, np.float32)
    if x.ndim != 2 or x.shape[1] != len(card.classes):
        raise ModelError(
            f"{card.onnx_path}: output {card.output_name!r} has shape {list(x.shape)}, the card lists "
            f"{len(card.classes)} classes; it must be [N, {len(card.classes)}]"
        )
    if not np.isfinite(x).all():
        raise ModelError(f"{card.onnx_path}: output {card.output_name!r} holds NaN or infinite values")
    if card.output_kind == "logits":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        out: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return out
    low, high = (float(x.min()), float(x.max())) if x.size else (0.0, 1.0)
    sums = x.sum(axis=1)
    worst = float(np.abs(sums - 1.0).max(initial=0.0))
    if low < -PROB_RANGE_TOL or high > 1.0 + PROB_RANGE_TOL or worst > PROB_SUM_TOL:
        what = (
            f"values from {low:.4g} to {high:.4g}"
            if low < -PROB_RANGE_TOL or high > 1.0 + PROB_RANGE_TOL
            else f"rows summing to {float(sums[np.argmax(np.abs(sums - 1.0))]):.4g}"
        )
        raise ModelError(
            f"{card.onnx_path}: model {card.name!r} gives {what} in output {card.output_name!r}, which its "
            f"card ({card.path.name}) declares as probabilities (in [0, 1], summing to 1 per tile); if "
            f'the output is logits, set "output": {{"kind": "logits"}} in the card (a softmax is then '
            f"applied), else fix the model"
        )
    return np.clip(x, 0.0, 1.0, out=x)
