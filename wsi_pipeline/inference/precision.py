"""Half precision (fp16) on a GPU, where the model's card allows it.

fp16 halves the bytes every layer moves and runs on a GPU's tensor cores; it also rounds weights and
activations to 11 significant bits, so a model's probabilities move. A card allows fp16 only with a
measurement: its ``fp16`` section (``python -m models.fp16_check --write``) records the largest
change of P and the labels that flip at the card's threshold on the held-out real tiles, and
``allowed`` by a rule written in the section.

``--precision auto`` (the default) runs fp16 on ``cuda``/``tensorrt`` when the card allows it, fp32
otherwise; ``fp16`` asked for where it cannot run (the CPU, or a card without the measurement) is
an error, never a silent fp32 run. CUDA runs an fp16 copy of the graph (inputs and outputs keep
their types: tiles go in and probabilities come out as before), converted once with onnxruntime's
own converter and kept in :mod:`~wsi_pipeline.inference.model_cache`'s folder; TensorRT builds its
engine in fp16 from the fp32 graph.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import shutil
from pathlib import Path

from wsi_pipeline.errors import DeviceError, ModelError, OutputError
from wsi_pipeline.inference.card import ModelCard
from wsi_pipeline.inference.model_cache import file_stem
from wsi_pipeline.provenance import atomic_write_bytes, file_sha256

PRECISIONS = ("auto", "fp32", "fp16")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


#: ops kept in fp32 in the fp16 copy: the head's arithmetic, cheap and where fp16 hurts: a softmax's
#: rows must sum to 1 within 1e-3 (rounding each value to fp16 moves a sum by up to ~7e-4), and
#: squared distances (an OOD output) overflow fp16 at 65504, a distance of 256
FP32_OPS = ("Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "ReduceSum", "ReduceSumSquare", "ReduceL2")


def fp16_allowed(card: ModelCard) -> bool:
    """Whether ``card`` records an fp16 measurement that allows it (``fp16.allowed``)."""
    section = card.raw.get("fp16")
    return bool(isinstance(section, dict) and section.get("allowed") is True)


def resolve_precision(card: ModelCard, provider: str, precision: str) -> str:
    """``fp32`` or ``fp16`` for a session of ``card`` on ``provider`` (an onnxruntime provider name).

    ``auto``: fp16 on a GPU provider when the card allows it (and, on CUDA, the ``onnx`` package is
    there to convert the model), else fp32 (:func:`why_fp32` says why). ``fp16`` on the CPU, or for
    a card that does not allow it, raises (:class:`DeviceError`, :class:`ModelError`)."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    on_gpu = provider in GPU_PROVIDERS
    if precision == "auto":
        return "fp32" if why_fp32(card, provider) else "fp16"
    if precision == "fp16":
        if not on_gpu:
            raise DeviceError(
                f"--precision fp16 runs on a GPU (--device cuda or tensorrt), not on {provider}: "
                "onnxruntime's CPU kernels gain nothing from it; use --precision fp32 or auto"
            )
        if not fp16_allowed(card):
            raise ModelError(
                f"{card.path}: the card does not allow fp16 (no fp16 section with allowed: true); measure "
                "it with python -m models.fp16_check --model MODEL.onnx --write, or use --precision fp32"
            )
    return precision


def why_fp32(card: ModelCard, provider: str) -> str:
    """Why ``--precision auto`` runs ``card`` in fp32 on ``provider`` ("" when it runs fp16)."""
    if provider not in GPU_PROVIDERS:
        return f"{provider} runs fp32 (fp16 only on a GPU)"
    if not fp16_allowed(card):
        return "the model card does not allow fp16 (no measured fp16 section)"
    if provider == "CUDAExecutionProvider" and importlib.util.find_spec("onnx") is None:
        return "the onnx package, which converts the model to fp16, is not installed (pip install onnx)"
    return ""


def fp16_model_path(card: ModelCard, ort_version: str, folder: Path) -> Path:
    """Where the fp16 copy of ``card``'s model is kept in ``folder`` (a digest of the model's
    sha256 and the onnxruntime version that converted it)."""
    digest = card.sha256 or file_sha256(card.onnx_path)
    key = hashlib.sha256(f"{digest}|{ort_version}|fp16".encode()).hexdigest()
    return folder / f"{file_stem(card.onnx_path)}-fp16-{key[:24]}.onnx"


def convert_fp16(src: Path, dst: Path) -> Path:
    """Write an fp16 copy of the ONNX model ``src`` to ``dst`` (atomically); its inputs and outputs
    keep their types and :data:`FP32_OPS` stay fp32. Needs the ``onnx`` package (in the ``gpu``
    extra). A folder that cannot take it raises :class:`OutputError` (an ``OSError``)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError as exc:
        raise DeviceError(
            f"{src}: fp16 needs the onnx package to convert the model ({exc}); pip install "
            "'wsi-pipeline[gpu]' (or onnx), or use --precision fp32"
        ) from exc
    try:
        blocked = [*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=blocked)
    except Exception as exc:
        raise ModelError(f"{src}: cannot convert the model to fp16 ({exc}); use --precision fp32") from exc
    return atomic_write_bytes(dst, model.SerializeToString())


def fp16_model(card: ModelCard, ort_version: str) -> Path:
    """The fp16 copy of ``card``'s model (whose file was checked against the card's sha256 before any
    session), converted on first use and kept in the cache folder; with caching off, or a cache
    folder that cannot be written, converted into a new temporary folder of this process.

    Raises :class:`OutputError` when no folder can take the copy (a full disk)."""
    import tempfile

    from wsi_pipeline.cache import cache_dir

    folder = cache_dir()
    if folder is not None:
        path = fp16_model_path(card, ort_version, folder / "onnxruntime")
        if path.is_file():
            return path
        try:
            return convert_fp16(card.onnx_path, path)
        except OSError:
            pass  # a cache that cannot be written only means no cache
    try:
        tmp = Path(tempfile.mkdtemp(prefix="wsi-pipeline-fp16-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # this process's copy only
        return convert_fp16(card.onnx_path, fp16_model_path(card, ort_version, tmp))
    except OSError as exc:
        raise OutputError(
            f"{card.onnx_path}: cannot write its fp16 copy ({exc.strerror or exc}); free disk space, set "
            "WSI_PIPELINE_CACHE to a writable folder, or use --precision fp32"
        ) from exc
