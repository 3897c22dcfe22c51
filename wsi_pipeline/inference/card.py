"""Model cards: the JSON beside each .onnx file, its published JSON Schema, one loader, one writer.

A model is an ONNX file plus a card that says what it expects (input name, size, dtype, layout,
resolution in um/px, preprocessing) and what it returns (class names, positive class), with the
sha256 of the ONNX file, and records how it was trained and measured. The card's format is
``model_card.schema.json`` beside this module (JSON Schema draft 2020-12, shipped in the wheel).

:func:`load_card` reads a card strictly (no NaN/Infinity tokens), validates it against the schema,
then checks what the schema cannot say; :func:`write_card` runs the same checks before it writes, so
``python -m models.export`` cannot write a card that ``wsi-infer`` refuses. Every problem is one
:class:`~wsi_pipeline.errors.ModelError` line naming the card file and the field.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from wsi_pipeline.cache import cache_dir
from wsi_pipeline.errors import ModelError
from wsi_pipeline.provenance import atomic_write_bytes, file_sha256

DEFAULT_MODEL_NAME = "tumour-cnn"
SCHEMA_FILE = "model_card.schema.json"
#: what a model's class output may hold (``output.kind``); a card without it means probabilities
OUTPUT_KINDS = ("probabilities", "logits")


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
    stain_reference: dict[str, Any] | None = None  # the stain it expects them normalized to (None: standard)
    # what output_name holds: "probabilities" (read as they are, checked) or "logits" (softmax applied)
    output_kind: str = "probabilities"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the whole card JSON

    @property
    def positive_index(self) -> int:
        return self.classes.index(self.positive_class)

    @property
    def known_defects(self) -> list[dict[str, str]]:
        """The card's measured weaknesses (``known_defects.findings``: name, finding, advice), for
        every run's manifest and page; empty when the card records none."""
        section = self.raw.get("known_defects") or {}
        return [{k: str(f[k]) for k in ("name", "finding", "advice")} for f in section.get("findings", [])]


def _bad(path: Path, what: str) -> ModelError:
    return ModelError(
        f"{path}: {what}; use a card written by `python -m models.export` or `wsi-infer import-model`, "
        f"or check a hand-written one against `wsi-infer model-schema`"
    )


@functools.cache
def card_schema() -> dict[str, Any]:
    """The model card's JSON Schema (``model_card.schema.json``, package data of this module)."""
    text = resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _schema_bytes() -> bytes:
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_bytes()


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(card_schema())


def _where(parts: Any) -> str:
    """``input.size_px``, ``metrics.test.auc``, ``classes[1]``: a field's path for a message."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: Any) -> str:
    """One schema violation as 'the card ... <field> (...)', the field named by its path."""
    at = list(error.absolute_path)
    kind, want, value = error.validator, error.validator_value, error.instance
    if kind == "required":
        missing = [k for k in want if isinstance(value, dict) and k not in value]
        return f"the card lacks or mistypes {_where([*at, missing[0] if missing else '?'])} (required)"
    if kind == "additionalProperties" and isinstance(value, dict):
        known = list(error.schema.get("properties", {}))
        extra = sorted(k for k in value if k not in known)
        name = extra[0] if extra else "?"
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {_where([*at, close[0]])}?" if close else f"not in {SCHEMA_FILE}"
        return f"the card has an unknown field {_where([*at, name])} ({hint})"
    field_ = _where(at) or "the card"
    if kind == "type":
        types = want if isinstance(want, list) else [want]
        reason = f"must be {' or '.join(types)}, not {_short(value)}"
    elif kind == "enum":
        reason = f"must be one of {', '.join(json.dumps(v) for v in want)}, not {_short(value)}"
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        reason = f"must be {op} {want}, not {_short(value)}"
    elif kind in ("minItems", "maxItems"):
        reason = f"must have {'at least' if kind == 'minItems' else 'at most'} {want} items"
    elif kind == "pattern":
        reason = f"{_short(value)} is not in the expected form (64 lower-case hex digits for a sha256)"
    else:
        reason = error.message if len(error.message) <= 120 else error.message[:117] + "..."
    return f"the card lacks or mistypes {field_} ({reason})"


def validate_card(raw: Any, path: str | os.PathLike[str]) -> None:
    """Check a card's JSON (a dict) against ``model_card.schema.json``.

    Raises :class:`ModelError` naming ``path`` and the first offending field (the one nearest the top
    of the card); returns None when the card conforms.
    """
    marker = _valid_marker(raw)
    if marker is not None and marker.exists():
        return  # this very card passed this very schema before
    from jsonschema.exceptions import best_match

    errors = list(_validator().iter_errors(raw))
    if errors:
        first = best_match(errors)  # the shallowest; inside anyOf, the most specific alternative
        more = f"; {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
        raise _bad(Path(path), _describe(first) + more)
    if marker is not None:
        with contextlib.suppress(OSError):  # no cache: the next run validates again
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()


def _valid_marker(raw: Any) -> Path | None:
    """The cache file whose presence says a card with exactly this content passed the schema
    (importing jsonschema and validating cost 0.04 s of every command); None when caching is off."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        text = json.dumps(raw, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None
    key = hashlib.sha256(text.encode() + b"\0" + _schema_bytes()).hexdigest()
    return folder / "valid-cards" / key[:32]


def card_from_dict(raw: Any, path: str | os.PathLike[str]) -> ModelCard:
    """A :class:`ModelCard` from a card's JSON, validated (schema, then the checks a schema cannot
    express). ``path`` is where the card lives or is going; its ONNX file is ``onnx_file`` beside it."""
    p = Path(path)
    if not isinstance(raw, dict):
        raise _bad(p, "the card is not a JSON object")
    validate_card(raw, p)
    try:
        inp, out, pre = raw["input"], raw["output"], raw.get("preprocessing") or {}
        ood, thr = raw.get("ood") or {}, raw.get("threshold") or {}
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
            ood_output=str(ood.get("output", "")),
            ood_d_ref=float(ood.get("d_ref", 0.0)),
            ood_warn_above=float(ood.get("warn_above", 1.0)),
            threshold=float(thr.get("value", 0.5)),
            stain_normalization=str(pre.get("stain_normalization", "none")),
            stain_reference=pre.get("stain_reference"),
            output_kind=str(out.get("kind", "probabilities")),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:  # the schema should have caught it
        raise _bad(p, f"the card lacks or mistypes {exc}") from exc
    # What a schema cannot express (the positive class is a class, input.shape agrees with size_px and
    # layout, mean/std when preprocessing is outside the graph), then ranges the schema checks as well
    # (kept, with their messages, as a second line of defence).
    if len(classes) < 2 or card.positive_class not in classes:
        raise _bad(p, f"positive_class {card.positive_class!r} is not one of the classes {list(classes)}")
    if card.input_size_px < 8 or not 0.05 <= card.mpp <= 20:
        raise _bad(p, f"implausible input size {card.input_size_px} px or mpp {card.mpp}")
    if card.input_dtype not in ("uint8", "float32") or card.input_layout not in ("NHWC", "NCHW"):
        raise _bad(p, f"unsupported input dtype/layout {card.input_dtype}/{card.input_layout}")
    shape = inp.get("shape")
    if shape is not None:
        s_px = card.input_size_px
        want = [s_px, s_px, 3] if card.input_layout == "NHWC" else [3, s_px, s_px]
        if not isinstance(shape, list) or len(shape) != 4 or list(shape[1:]) != want:
            raise _bad(p, f"input.shape {shape} contradicts size_px {s_px} and layout {card.input_layout}")
    if card.ood_output and not card.ood_d_ref > 0:
        raise _bad(p, f"ood.d_ref must be > 0 when ood.output is given, got {card.ood_d_ref}")
    if card.output_kind not in OUTPUT_KINDS:
        raise _bad(p, f"output.kind must be one of {', '.join(OUTPUT_KINDS)}, not {card.output_kind!r}")
    if card.stain_normalization not in ("none", "macenko"):
        raise _bad(
            p, f"preprocessing.stain_normalization must be none or macenko, not {card.stain_normalization!r}"
        )
    if card.stain_reference is not None:
        from wsi_pipeline.errors import StainError
        from wsi_pipeline.stain.macenko import StainModel

        if card.stain_normalization != "macenko":
            raise _bad(p, "preprocessing.stain_reference is given but stain_normalization is not macenko")
        try:
            StainModel.from_dict(card.stain_reference)
        except (StainError, ValueError) as exc:
            raise _bad(p, f"preprocessing.stain_reference is not a stain model: {exc}") from exc
    if not 0.0 < card.threshold < 1.0:
        raise _bad(p, f"threshold.value must be in (0, 1), got {card.threshold}")
    if not card.in_graph and (len(card.mean) != 3 or len(card.std) != 3):
        raise _bad(p, "preprocessing is not in the graph, so the card needs 3 mean and 3 std values")
    return card


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON (an undefined value is written as null)")


def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read and validate a model card; the ONNX file is ``onnx_file`` beside it."""
    p = Path(path)
    return card_from_dict(_read_card_json(p), p)


def _read_card_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except FileNotFoundError:
        raise ModelError(f"{p}: model card not found; a model needs its JSON card beside the .onnx") from None
    except (OSError, ValueError) as exc:
        raise _bad(p, f"not a readable JSON model card ({exc})") from exc


def write_card(raw: dict[str, Any], path: str | os.PathLike[str]) -> ModelCard:
    """Validate ``raw`` as :func:`load_card` would, then write it to ``path`` atomically.

    A card that is written also has to pin its model: ``version``, ``onnx_file`` and ``sha256`` are
    required here. Strict JSON, indented by 2; key order kept. Returns the card as loaded.
    """
    p = Path(path)
    missing = [k for k in ("version", "onnx_file", "sha256") if not raw.get(k)]
    if missing:
        raise _bad(p, f"the card lacks or mistypes {missing[0]} (required in a written card)")
    card = card_from_dict(raw, p)
    try:
        text = json.dumps(raw, indent=2, allow_nan=False)
    except ValueError as exc:
        raise _bad(p, f"the card holds NaN or Infinity ({exc}); write undefined values as None") from exc
    atomic_write_bytes(p, (text + "\n").encode("utf-8"))
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
    card, verify = resolve_model_deferred(model)
    verify()
    return card


#: files that hold a network's weights for a training framework, which a run cannot score with
WEIGHTS_SUFFIXES = {
    ".pt": "a PyTorch checkpoint or TorchScript file",
    ".pth": "a PyTorch checkpoint",
    ".ckpt": "a training checkpoint",
    ".safetensors": "a safetensors weights file",
    ".h5": "a Keras/TensorFlow weights file",
    ".keras": "a Keras model",
    ".pb": "a TensorFlow graph",
}


def resolve_model_deferred(
    model: str | os.PathLike[str] | None = None,
) -> tuple[ModelCard, Callable[[], None]]:
    """:func:`resolve_model`, with the sha256 check still running: returns the card and ``verify``, which
    waits for the model file's hash and raises :class:`ModelError` when it does not match the card.

    The file is hashed on another thread while the card is validated and while the caller sets up
    (a 45 MB ResNet-18 takes 0.03 s to hash); call ``verify`` before the model is used.
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
        if p.suffix.lower() in WEIGHTS_SUFFIXES:
            raise ModelError(
                f"{p}: {WEIGHTS_SUFFIXES[p.suffix.lower()]}, not an ONNX model; export it to ONNX and "
                "write its JSON card (README, 'Use your own model'; a WSInfer model-zoo folder: "
                "wsi-infer import-model)"
            )
        card_path = p if p.suffix == ".json" else p.with_suffix(".json")
    raw = _read_card_json(card_path)
    onnx_given = model is not None and Path(model).suffix != ".json"
    if onnx_given:
        onnx: Path | None = Path(str(model))
    elif isinstance(raw, dict):  # where card_from_dict will look for it
        onnx = card_path.parent / str(raw.get("onnx_file") or card_path.with_suffix(".onnx").name)
    else:
        onnx = None  # not a card: card_from_dict says so
    ex = ThreadPoolExecutor(1, thread_name_prefix="wsi-sha256")
    try:
        digest = ex.submit(file_sha256, onnx) if onnx is not None and onnx.is_file() else None
    finally:
        ex.shutdown(wait=False)
    card = card_from_dict(raw, card_path)
    if onnx_given:
        card = replace(card, onnx_path=Path(str(model)))
    if digest is None:
        raise ModelError(f"{card.onnx_path}: the ONNX file named by {card.path.name} is missing")
    if not card.sha256:  # without it neither the model's identity nor resume protection holds
        raise ModelError(
            f"{card.path}: the card has no sha256 of {card.onnx_path.name}; add "
            f'"sha256": "<output of sha256sum {card.onnx_path.name}>" to the card'
        )
    expected = card.sha256

    def verify() -> None:
        actual = digest.result()
        if actual != expected:
            raise ModelError(
                f"{card.onnx_path}: sha256 {actual[:12]}... does not match its card ({expected[:12]}...); "
                f"the file is corrupt or not the model the card describes - re-export or re-download it"
            )

    return card, verify
