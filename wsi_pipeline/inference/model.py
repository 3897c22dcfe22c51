"""Classifier models: the model card (JSON beside the .onnx) and onnxruntime sessions.

A model is an ONNX file plus a card that says what it expects (input name, size, dtype, layout,
resolution in um/px, preprocessing) and what it returns (class names, positive class), with the
sha256 of the ONNX file. The pipeline refuses a model whose file, card or input does not fit.

Execution providers are explicit: asking for ``cuda`` or ``tensorrt`` where onnxruntime cannot use
them is a :class:`~wsi_pipeline.errors.DeviceError`, never a silent CPU run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import DeviceError, ModelError
from wsi_pipeline.provenance import file_sha256

DEFAULT_MODEL_NAME = "tumour-cnn"
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class ModelCard:
    """What a classifier expects and returns (validated from the card JSON)."""

    path: Path  # the card file
    onnx_path: Path
    name: str
    version: str
    classes: tuple[str, ...]
    positive_class: str
    input_name: str
    input_size_px: int
    input_dtype: str  # "uint8" (0-255) or "float32"
    input_layout: str  # "NHWC" or "NCHW"
    output_name: str
    mpp: float  # micrometres per pixel the model was trained at
    in_graph: bool  # preprocessing is inside the ONNX graph
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    sha256: str = ""
    ood_output: str = ""  # per-tile out-of-distribution distance output ("" when the model has none)
    ood_d_ref: float = 0.0  # reference distance: slide OOD score = median tile distance / ood_d_ref
    ood_warn_above: float = 1.0  # slide OOD score above which the slide gets a warning
    threshold: float = 0.5  # P(positive) threshold chosen on validation data
    stain_normalization: str = "none"  # "macenko": the model expects slide-level Macenko-normalized tiles
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)


def _bad(path: Path, what: str) -> ModelError:
    return ModelError(
        f"{path}: {what}; use a card written by `python -m models.export` (see models/MODEL_CARD.md)"
    )


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate a model card; the ONNX file is ``onnx_file`` beside it."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ModelError(f"{p}: model card not found; a model needs its JSON card beside the .onnx") from None
    except (OSError, ValueError) as exc:
        raise _bad(p, f"not a readable JSON model card ({exc})") from exc
    if not isinstance(raw, dict):
        raise _bad(p, "the card is not a JSON object")
    try:
        inp, out, pre = raw["input"], raw["output"], raw.get("preprocessing", {})
        classes = tuple(str(c) for c in raw["classes"])
        card = ModelCard(
            path=p,
            onnx_path=p.parent / str(raw.get("onnx_file") or p.with_suffix(".onnx").name),
            name=str(raw["name"]),
            version=str(raw.get("version", "")),
            classes=classes,
            positive_class=str(raw["positive_class"]),
            input_name=str(inp["name"]),
            input_size_px=int(inp["size_px"]),
            input_dtype=str(inp.get("dtype", "uint8")),
            input_layout=str(inp.get("layout", "NHWC")),
            output_name=str(out["name"]),
            mpp=float(raw["mpp"]),
            in_graph=bool(pre.get("in_graph", False)),
            mean=tuple(float(v) for v in pre.get("mean", ())),
            std=tuple(float(v) for v in pre.get("std", ())),
            sha256=str(raw.get("sha256", "")),
            ood_output=str((raw.get("ood") or {}).get("output", "")),
            ood_d_ref=float((raw.get("ood") or {}).get("d_ref", 0.0)),
            ood_warn_above=float((raw.get("ood") or {}).get("warn_above", 1.0)),
            threshold=float((raw.get("threshold") or {}).get("value", 0.5)),
            stain_normalization=str(pre.get("stain_normalization", "none")),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad(p, f"the card lacks or mistypes {exc}") from exc
    if len(classes) < 2 or card.positive_class not in classes:
        raise _bad(p, f"positive_class {card.positive_class!r} is not one of the classes {list(classes)}")
    if card.input_size_px < 8 or not 0.05 <= card.mpp <= 20:
        raise _bad(p, f"implausible input size {card.input_size_px} px or mpp {card.mpp}")
    if card.input_dtype not in ("uint8", "float32") or card.input_layout not in ("NHWC", "NCHW"):
        raise _bad(p, f"unsupported input dtype/layout {card.input_dtype}/{card.input_layout}")
    shape = (raw.get("input") or {}).get("shape")
    if shape is not None:
        s_px = card.input_size_px
        want = [s_px, s_px, 3] if card.input_layout == "NHWC" else [3, s_px, s_px]
        if not isinstance(shape, list) or len(shape) != 4 or list(shape[1:]) != want:
            raise _bad(p, f"input.shape {shape} contradicts size_px {s_px} and layout {card.input_layout}")
    if card.ood_output and not card.ood_d_ref > 0:
        raise _bad(p, f"ood.d_ref must be > 0 when ood.output is given, got {card.ood_d_ref}")
    if card.stain_normalization not in ("none", "macenko"):
        raise _bad(
            p, f"preprocessing.stain_normalization must be none or macenko, not {card.stain_normalization!r}"
        )
    if not 0.0 < card.threshold < 1.0:
        raise _bad(p, f"threshold.value must be in (0, 1), got {card.threshold}")
    if not card.in_graph and (len(card.mean) != 3 or len(card.std) != 3):
        raise _bad(p, "preprocessing is not in the graph, so the card needs 3 mean and 3 std values")
    return card


def default_model_dir() -> Path:
    """Folder of the shipped model: ``models/`` of a source checkout, else the installed data files."""
    here = Path(__file__).resolve().parents[2] / "models"
    if (here / f"{DEFAULT_MODEL_NAME}.json").exists():
        return here
    return Path(sys.prefix) / "share" / "wsi-pipeline" / "models"


def resolve_model(model: str | os.PathLike[str] | None = None) -> ModelCard:
    """The card of ``model`` (.onnx with its .json beside it, or the .json), else the shipped model.

    Checks that the ONNX file exists and matches the card's sha256.
    """
    if model is None:
        card_path = default_model_dir() / f"{DEFAULT_MODEL_NAME}.json"
        if not card_path.exists():
            raise ModelError(
                f"{card_path}: the shipped model is missing from this installation; reinstall "
                f"wsi-pipeline or pass --model PATH.onnx"
            )
    else:
        p = Path(model)
        if not p.exists():
            raise ModelError(f"{p}: no such model file; pass an .onnx file with its .json card beside it")
        card_path = p if p.suffix == ".json" else p.with_suffix(".json")
    card = load_card(card_path)
    if model is not None and Path(model).suffix != ".json":
        card = _with_onnx(card, Path(model))
    if not card.onnx_path.exists():
        raise ModelError(f"{card.onnx_path}: the ONNX file named by {card.path.name} is missing")
    if not card.sha256:  # without it neither the model's identity nor resume protection holds
        raise ModelError(
            f"{card.path}: the card has no sha256 of {card.onnx_path.name}; add "
            f'"sha256": "<output of sha256sum {card.onnx_path.name}>" to the card'
        )
    if card.sha256:
        actual = file_sha256(card.onnx_path)
        if actual != card.sha256:
            raise ModelError(
                f"{card.onnx_path}: sha256 {actual[:12]}... does not match its card ({card.sha256[:12]}...); "
                f"the file is corrupt or not the model the card describes - re-export or re-download it"
            )
    return card


def _with_onnx(card: ModelCard, onnx_path: Path) -> ModelCard:
    from dataclasses import replace

    return replace(card, onnx_path=onnx_path)


def create_session(card: ModelCard, device: str = "auto", *, threads: int | None = None) -> tuple[Any, str]:
    """An onnxruntime session for ``card`` on ``device``; returns (session, provider really used).

    ``auto`` takes CUDA when onnxruntime offers it, else the CPU. ``cuda``/``tensorrt`` that are not
    available raise :class:`DeviceError`; so does a session that silently fell back to the CPU.
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
    providers = [provider] if wanted == "cpu" else [provider, PROVIDERS["cpu"]]
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(card.onnx_path), sess_options=opts, providers=providers)
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
    check_io(session, card)
    return session, used


def check_io(session: Any, card: ModelCard) -> None:
    """Refuse a model whose ONNX inputs/outputs do not match its card."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    where = card.onnx_path
    if card.input_name not in inputs:
        raise ModelError(f"{where}: no input {card.input_name!r} (has {list(inputs)}); card and model differ")
    inp = inputs[card.input_name]
    s = card.input_size_px
    expected = [s, s, 3] if card.input_layout == "NHWC" else [3, s, s]
    dims = list(inp.shape[1:])
    if len(inp.shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(dims, expected, strict=True)):
        raise ModelError(
            f"{where}: input shape {inp.shape} does not fit {card.input_layout} tiles of {s} px; "
            f"use a model exported for {s} px tiles"
        )
    want_type = "tensor(uint8)" if card.input_dtype == "uint8" else "tensor(float)"
    if inp.type != want_type:
        raise ModelError(f"{where}: input type {inp.type}, the card says {card.input_dtype}")
    if card.output_name not in outputs:
        raise ModelError(f"{where}: has no output {card.output_name!r} (has {list(outputs)})")
    if card.ood_output and card.ood_output not in outputs:
        raise ModelError(f"{where}: has no output {card.ood_output!r} named by the card's ood section")
    last = outputs[card.output_name].shape[-1]
    if isinstance(last, int) and last != len(card.classes):
        raise ModelError(f"{where}: {last} outputs but the card lists {len(card.classes)} classes")


def prepare_batch(tiles: np.ndarray, card: ModelCard) -> np.ndarray:
    """uint8 NHWC RGB tiles -> the model's input (only a layout change when preprocessing is in graph)."""
    nchw = card.input_layout == "NCHW"
    if card.input_dtype == "uint8":
        return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2) if nchw else tiles)
    x: np.ndarray = tiles.astype(np.float32) / np.float32(255.0)
    if not card.in_graph:
        x = (x - np.asarray(card.mean, np.float32)) / np.asarray(card.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if nchw else x)


def predict(session: Any, card: ModelCard, tiles: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, n_classes) float32 for uint8 (N, H, W, 3) tiles, in batches."""
    return predict_with_ood(session, card, tiles, batch_size=batch_size)[0]


def predict_with_ood(
    session: Any, card: ModelCard, tiles: np.ndarray, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (N, n_classes) and, when the card names one, the per-tile OOD distance (N,)."""
    if tiles.shape[1:] != (card.input_size_px, card.input_size_px, 3):
        raise ModelError(
            f"{card.onnx_path}: tiles of shape {tiles.shape[1:]} given, the model takes "
            f"{card.input_size_px} px RGB tiles; tile at the model's size"
        )
    out = np.empty((len(tiles), len(card.classes)), np.float32)
    ood = np.empty(len(tiles), np.float32) if card.ood_output else None
    names = [card.output_name] + ([card.ood_output] if card.ood_output else [])
    for i in range(0, len(tiles), batch_size):
        x = prepare_batch(tiles[i : i + batch_size], card)
        res = session.run(names, {card.input_name: x})
        out[i : i + len(x)] = res[0]
        if ood is not None:
            ood[i : i + len(x)] = np.asarray(res[1], np.float32).reshape(-1)
    return out, ood
