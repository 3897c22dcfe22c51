"""Import a model from elsewhere: a WSInfer model-zoo model becomes an ONNX file and our card.

A WSInfer model is a folder with ``config.json`` (WSInfer's model config, ``spec_version`` 1.0:
``architecture``, ``num_classes``, ``class_names``, ``patch_size_pixels``, ``spacing_um_px`` and a
``transform`` list of ``{"name": ..., "arguments": {...}}``) and ``torchscript_model.pt``.
:func:`import_wsinfer` converts the TorchScript model to ONNX with torch (the ``train`` extra; torch
is imported inside the functions that need it, never by the runtime) and writes the card:

* ``class_names`` -> ``classes``; the positive class is the one named tumour/tumor, or chosen;
* ``ToTensor`` + ``Normalize(mean, std)`` -> float32 NCHW input, ``preprocessing.mean``/``std``
  outside the graph (the session feeds ``(tile / 255 - mean) / std``, exactly what they compute);
* ``Resize(s)``: with ``s == patch_size_pixels`` nothing happens. Otherwise WSInfer reads
  ``patch_size_pixels`` px at ``spacing_um_px`` and shrinks (or enlarges) them to ``s`` px, so the
  network sees ``s`` px covering the same field at ``spacing_um_px * patch / s`` um/px. The card asks
  for exactly that: ``s`` px tiles at that um/px, cut by our tiler (which reads the nearest pyramid
  level and resamples once), so the field of view and pixel size match WSInfer's and only the
  resampling filter differs (PIL's bilinear there, a pyramid level or box/bilinear resize here);
* the output is ``logits`` (WSInfer applies a softmax to the model's output), turned into
  probabilities by :func:`~wsi_pipeline.inference.session.to_probabilities`.

Other transforms (crops, colour changes, ...) cannot be reproduced by the pipeline and are refused,
named. Parity (TorchScript on torch-side preprocessing vs onnxruntime on the pipeline's own
preprocessing, on real tissue tiles of the bundled sample slide) is measured and recorded in the card;
an import above ``tolerance`` is refused.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import ModelError, OutputError
from wsi_pipeline.inference.card import OUTPUT_KINDS, card_from_dict, write_card
from wsi_pipeline.provenance import file_sha256, refuse_overwriting_inputs

CONFIG_FILE = "config.json"
TORCHSCRIPT_FILE = "torchscript_model.pt"
SPEC_VERSIONS = ("1.0",)
TRANSFORMS = ("Resize", "ToTensor", "Normalize")  # what the pipeline can reproduce
TORCH_HINT = "pip install 'wsi-pipeline[train]'"
INPUT_NAME = "tiles"
OPSET = 17
_NEGATIONS = {"no", "non", "not", "free", "normal", "benign", "without", "other"}


@dataclass(frozen=True)
class WsinferConfig:
    """A WSInfer model config, checked, with what the card needs."""

    path: Path
    raw: dict[str, Any]
    architecture: str
    classes: tuple[str, ...]
    patch_px: int
    spacing_um_px: float
    resize_px: int | None  # None: no Resize transform
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (0, 0, 0) / (1, 1, 1) without Normalize
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    notes: tuple[str, ...] = field(default=())

    @property
    def tile_px(self) -> int:
        """Tile side the network takes (after WSInfer's Resize)."""
        return self.resize_px or self.patch_px

    @property
    def mpp(self) -> float:
        """um/px of the pixels the network sees: the patch's field of view over the tile side."""
        return self.spacing_um_px * self.patch_px / self.tile_px


def _cfg_error(path: Path, field_: str, what: str) -> ModelError:
    return ModelError(f"{path}: {field_}: {what}; this is not a WSInfer model config this importer can read")


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)


def _resize_px(path: Path, i: int, args: dict[str, Any]) -> int:
    size = args.get("size")
    if isinstance(size, list) and len(size) in (1, 2) and all(isinstance(v, int) for v in size):
        if len(size) == 2 and size[0] != size[1]:
            raise ModelError(
                f"{path}: transform[{i}] Resize to {size} (not square) cannot be reproduced: the pipeline "
                "cuts square tiles; export a model that takes square tiles"
            )
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise _cfg_error(
            path, f"transform[{i}].arguments.size", f"Resize needs a size in pixels (>= 8), not {size!r}"
        )
    return size


def _triple(path: Path, i: int, args: dict[str, Any], key: str) -> tuple[float, float, float]:
    v = args.get(key)
    if not isinstance(v, list) or len(v) != 3 or not all(_number(x) for x in v):
        raise _cfg_error(
            path, f"transform[{i}].arguments.{key}", f"Normalize needs 3 numbers (R, G, B), not {v!r}"
        )
    return (float(v[0]), float(v[1]), float(v[2]))


def read_wsinfer_config(path: str | os.PathLike[str]) -> WsinferConfig:
    """Read and check a WSInfer ``config.json``; refuse transforms the pipeline cannot reproduce.

    Raises :class:`ModelError` naming the file and the field (or every transform it cannot reproduce).
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{p}: not found; a WSInfer model folder holds {CONFIG_FILE} and {TORCHSCRIPT_FILE}"
        ) from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{p}: not a readable JSON config ({exc})") from exc
    if not isinstance(raw, dict):
        raise _cfg_error(p, "the config", "not a JSON object")
    for key in ("spec_version", "architecture", "num_classes", "class_names", "patch_size_pixels",
                "spacing_um_px", "transform"):  # fmt: skip
        if key not in raw:
            raise _cfg_error(p, key, "missing")
    if str(raw["spec_version"]) not in SPEC_VERSIONS:
        raise ModelError(
            f"{p}: spec_version {raw['spec_version']!r} is not one this importer knows "
            f"({', '.join(SPEC_VERSIONS)}); convert the model to ONNX yourself and write a card "
            "(see `wsi-infer model-schema`)"
        )
    names = raw["class_names"]
    if not isinstance(names, list) or not all(isinstance(c, str) and c.strip() for c in names):
        raise _cfg_error(p, "class_names", f"must be a list of names, not {names!r}")
    if len(set(names)) != len(names):
        raise _cfg_error(p, "class_names", f"names repeat: {names}")
    n = raw["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n != len(names):
        raise _cfg_error(p, "num_classes", f"{n!r} does not match the {len(names)} class_names")
    if n < 2:
        raise ModelError(
            f"{p}: num_classes {n}: a single-output model (one score per tile) is not supported; the "
            "pipeline needs one output per class (e.g. 2 for tumour vs other)"
        )
    patch = raw["patch_size_pixels"]
    if not isinstance(patch, int) or isinstance(patch, bool) or patch < 8:
        raise _cfg_error(p, "patch_size_pixels", f"must be an integer >= 8, not {patch!r}")
    spacing = raw["spacing_um_px"]
    if not _number(spacing) or spacing <= 0:
        raise _cfg_error(p, "spacing_um_px", f"must be a positive number, not {spacing!r}")
    transforms = raw["transform"]
    if not isinstance(transforms, list):
        raise _cfg_error(p, "transform", f"must be a list, not {transforms!r}")
    unknown = [
        f"transform[{i}] {t.get('name')!r}" if isinstance(t, dict) else f"transform[{i}] {t!r}"
        for i, t in enumerate(transforms)
        if not isinstance(t, dict) or t.get("name") not in TRANSFORMS
    ]
    if unknown:
        raise ModelError(
            f"{p}: cannot reproduce {', '.join(unknown)}: the pipeline reproduces only "
            f"{', '.join(TRANSFORMS)}; use a model without it, or convert it yourself and describe its "
            "input in a card (see `wsi-infer model-schema`)"
        )
    resize: int | None = None
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    seen: dict[str, int] = {}
    notes: list[str] = []
    for i, t in enumerate(transforms):
        name, args = t["name"], t.get("arguments") or {}
        if not isinstance(args, dict):
            raise _cfg_error(p, f"transform[{i}].arguments", f"must be an object, not {args!r}")
        if name in seen:
            raise ModelError(
                f"{p}: transform[{i}] {name} repeats transform[{seen[name]}]; cannot reproduce it"
            )
        seen[name] = i
        if name == "Resize":
            resize = _resize_px(p, i, args)
            extra = sorted(k for k in args if k != "size")
            if extra and resize != patch:
                notes.append(f"Resize arguments {extra} not reproduced: tiles are resampled by the tiler")
        elif name == "Normalize":
            mean, std = _triple(p, i, args, "mean"), _triple(p, i, args, "std")
            if min(std) <= 0:
                raise _cfg_error(p, f"transform[{i}].arguments.std", f"must be > 0, not {list(std)}")
        elif args:
            raise _cfg_error(p, f"transform[{i}].arguments", f"ToTensor takes no arguments, not {args}")
    if "ToTensor" not in seen:
        raise ModelError(
            f"{p}: transform has no ToTensor, so the model's input scale is unknown; the pipeline feeds "
            "RGB / 255 (ToTensor) then Normalize"
        )
    if "Normalize" in seen and seen["Normalize"] < seen["ToTensor"]:
        raise ModelError(
            f"{p}: transform[{seen['Normalize']}] Normalize comes before ToTensor; cannot reproduce it"
        )
    if resize is not None and resize != patch:
        notes.append(
            f"WSInfer resizes {patch} px patches at {spacing} um/px to {resize} px; here {resize} px tiles "
            f"are cut at {spacing * patch / resize:g} um/px (same field of view and pixel size; only the "
            "resampling filter differs)"
        )
    return WsinferConfig(
        path=p, raw=raw, architecture=str(raw["architecture"]), classes=tuple(names), patch_px=patch,
        spacing_um_px=float(spacing), resize_px=resize, mean=mean, std=std, notes=tuple(notes),
    )  # fmt: skip


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^a-z]+", name.lower()) if w]


def choose_positive_class(classes: tuple[str, ...], wanted: str | None, *, where: Path) -> str:
    """``wanted`` (must be a class), else the one class named tumour/tumor (not "notumor",
    "non-tumour", "tumor-free"), else :class:`ModelError` asking for ``--positive-class``."""
    if wanted is not None:
        if wanted not in classes:
            raise ModelError(
                f"{where}: --positive-class {wanted!r} is not one of the classes {list(classes)}"
            )
        return wanted
    found = [
        c for c in classes
        if any(w in ("tumor", "tumour") for w in _words(c)) and not set(_words(c)) & _NEGATIONS
    ]  # fmt: skip
    if len(found) == 1:
        return found[0]
    raise ModelError(
        f"{where}: no single class is named tumour/tumor among {list(classes)}; choose the class the "
        f"heatmap shows with --positive-class (one of {', '.join(classes)})"
    )


def card_from_wsinfer(
    cfg: WsinferConfig,
    *,
    name: str,
    onnx_file: str,
    sha256: str,
    positive_class: str,
    output_kind: str = "logits",
    torchscript_sha256: str | None = None,
) -> dict[str, Any]:
    """Our card (a dict that validates against the schema) for an imported WSInfer model."""
    if output_kind not in OUTPUT_KINDS:
        raise ModelError(
            f"{cfg.path}: output kind must be one of {', '.join(OUTPUT_KINDS)}, not {output_kind!r}"
        )
    s = cfg.tile_px
    output_name = "logits" if output_kind == "logits" else "probabilities"
    resize = (
        f"Resize({cfg.resize_px}) of {cfg.patch_px} px patches at {cfg.spacing_um_px:g} um/px: tiles are cut "
        f"at {s} px and {cfg.mpp:g} um/px instead (same field of view and pixel size)"
        if cfg.resize_px is not None and cfg.resize_px != cfg.patch_px
        else "none (no Resize, or Resize to the patch size: a no-op)"
    )
    return {
        "name": name,
        "version": f"wsinfer-{sha256[:12]}",
        "description": (
            f"{cfg.architecture} imported from the WSInfer model {cfg.path.parent.name} "
            f"({len(cfg.classes)} classes: {', '.join(cfg.classes)}) by wsi-infer import-model"
        ),
        "classes": list(cfg.classes),
        "positive_class": positive_class,
        "input": {
            "name": INPUT_NAME,
            "size_px": s,
            "dtype": "float32",
            "layout": "NCHW",
            "channels": "RGB",
            "shape": ["N", 3, s, s],
        },
        "output": {"name": output_name, "kind": output_kind, "shape": ["N", len(cfg.classes)]},
        "mpp": round(cfg.mpp, 6),
        "mpp_note": (
            f"WSInfer config: {cfg.patch_px} px patches at spacing_um_px {cfg.spacing_um_px:g}; "
            + (
                resize
                if cfg.resize_px is not None and cfg.resize_px != cfg.patch_px
                else f"tile at {cfg.mpp:g} um/px"
            )
        ),
        "preprocessing": {
            "in_graph": False,
            "scale": 1 / 255,
            "mean": list(cfg.mean),
            "std": list(cfg.std),
            "formula": "(tiles / 255 - mean) / std per RGB channel, NHWC -> NCHW "
            "(WSInfer's ToTensor, Normalize)",
            "stain_normalization": "none",
        },
        "onnx_file": onnx_file,
        "sha256": sha256,
        "threshold": {
            "value": 0.5,
            "note": "not chosen on validation data: a WSInfer config carries no threshold (WSInfer reports "
            "probabilities only); choose one on your own labelled slides and pass --tile-threshold",
        },
        "architecture": {"name": cfg.architecture},
        "limitations": [
            "Imported: wsi-pipeline has not measured this model's accuracy; see where it was published.",
            "Tiles come from wsi-pipeline's tissue mask and grid, not WSInfer's patching, so the set of "
            "tiles (and their exact pixels) differs from a WSInfer run on the same slide.",
        ],
        "imported": {
            "format": f"WSInfer model config {cfg.raw.get('spec_version')}",
            "source": str(cfg.path.parent),
            "config": cfg.raw,
            "config_sha256": file_sha256(cfg.path),
            **({"torchscript_sha256": torchscript_sha256} if torchscript_sha256 else {}),
            "resize": resize,
            "notes": list(cfg.notes),
        },
    }


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelError(
            f"import-model needs torch to read TorchScript models, and it is not installed: {TORCH_HINT}"
        ) from exc
    return torch


@dataclass(frozen=True)
class ImportReport:
    onnx_path: Path
    card_path: Path
    card: dict[str, Any]
    parity_max_abs_diff: float  # probabilities, TorchScript vs onnxruntime
    parity_output_max_abs_diff: float  # raw outputs
    parity_tiles: int
    parity_source: str
    notes: tuple[str, ...] = ()


def _torch_reference(model: Any, tiles: np.ndarray, cfg: WsinferConfig) -> np.ndarray:
    """The TorchScript model on ToTensor + Normalize done in torch (as WSInfer's transforms do it)."""
    torch = _require_torch()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(cfg.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(cfg.std, dtype=torch.float32)[None, :, None, None]
        out = model((x - mean) / std)
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"{cfg.path.parent / TORCHSCRIPT_FILE}: the model returns {type(out).__name__}, not one tensor "
            "[N, classes]; only single-output classifiers can be imported"
        )
    return np.asarray(out.float().numpy())


def _export(model: Any, out: Path, size: int, output_name: str, metadata: dict[str, str]) -> None:
    torch = _require_torch()
    try:
        import onnx
    except ImportError as exc:
        raise ModelError(
            f"import-model needs the onnx package, and it is not installed: {TORCH_HINT}"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 3, size, size),), str(out), dynamo=False, input_names=[INPUT_NAME],
            output_names=[output_name], dynamic_axes={INPUT_NAME: {0: "N"}, output_name: {0: "N"}},
            opset_version=OPSET, do_constant_folding=True,
        )  # fmt: skip
    proto = onnx.load(str(out))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def import_wsinfer(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    positive_class: str | None = None,
    output_kind: str = "logits",
    parity_slide: str | os.PathLike[str] | None = None,
    parity_tiles: int = 32,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    command: str | None = None,
) -> ImportReport:
    """Convert the WSInfer model in ``model_dir`` to ``out`` (.onnx) and write its card beside it.

    Checks the config (and refuses what the pipeline cannot reproduce) before torch is loaded.
    Parity: the TorchScript model (preprocessed in torch) and the ONNX model (preprocessed by the
    pipeline's session) on ``parity_tiles`` tissue tiles of ``parity_slide`` (default: the bundled
    sample; synthetic tiles when absent), at batch sizes 1 and all; above ``tolerance`` (max abs
    difference of the probabilities) the import is refused and nothing is written.
    """
    from wsi_pipeline.inference.check import sample_tiles, synthetic_tiles
    from wsi_pipeline.inference.session import create_session, predict, prepare_batch, to_probabilities

    src = Path(model_dir)
    out_p = Path(out)
    if not src.is_dir():
        raise ModelError(
            f"{src}: not a folder; give the WSInfer model folder (with {CONFIG_FILE} and {TORCHSCRIPT_FILE})"
        )
    if out_p.suffix != ".onnx":
        raise ModelError(f"{out_p}: --out must name an .onnx file (the card NAME.json is written beside it)")
    card_p = out_p.with_suffix(".json")
    cfg = read_wsinfer_config(src / CONFIG_FILE)
    ts_path = src / TORCHSCRIPT_FILE
    if not ts_path.is_file():
        raise ModelError(
            f"{ts_path}: missing; a WSInfer model folder holds {CONFIG_FILE} and {TORCHSCRIPT_FILE}"
        )
    refuse_overwriting_inputs([out_p, card_p], [src / CONFIG_FILE, ts_path])
    existing = [p for p in (out_p, card_p) if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]}: already exists; choose another --out or pass --overwrite")
    pos = choose_positive_class(cfg.classes, positive_class, where=cfg.path)
    if output_kind not in OUTPUT_KINDS:
        raise ModelError(f"{src}: output kind must be one of {', '.join(OUTPUT_KINDS)}, not {output_kind!r}")
    torch = _require_torch()
    try:
        with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, the format WSInfer ships
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(ts_path), map_location="cpu").eval()
    except Exception as exc:  # torch raises RuntimeError/ValueError for anything not a TorchScript archive
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{ts_path}: not a loadable TorchScript model ({msg})") from exc
    size = cfg.tile_px
    probe = _torch_reference(model, synthetic_tiles(size, 2), cfg)
    if probe.ndim != 2 or probe.shape != (2, len(cfg.classes)):
        raise ModelError(
            f"{ts_path}: the model returns shape {list(probe.shape)} for 2 tiles of {size} px, the config "
            f"says [2, {len(cfg.classes)}] (num_classes {len(cfg.classes)}); fix class_names/num_classes"
        )
    output_name = "logits" if output_kind == "logits" else "probabilities"
    out_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_p.with_name(f".{out_p.name}.partial")
    try:
        try:
            _export(
                model,
                tmp,
                size,
                output_name,
                {"source": f"WSInfer {src.name}", "architecture": cfg.architecture},
            )
        except ModelError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{ts_path}: torch cannot export this model to ONNX ({msg})") from exc
        sha = file_sha256(tmp)
        raw = card_from_wsinfer(
            cfg,
            name=name or src.name,
            onnx_file=out_p.name,
            sha256=sha,
            positive_class=pos,
            output_kind=output_kind,
            torchscript_sha256=file_sha256(ts_path),
        )
        card = replace(card_from_dict(raw, card_p), onnx_path=tmp)
        session, _ = create_session(card, "cpu")
        got = sample_tiles(size, card.mpp, parity_tiles, slide=parity_slide)
        ref_out = _torch_reference(model, got.tiles, cfg)
        ref_p = to_probabilities(ref_out.copy(), card)
        looks_like_p = (
            ref_out.min() >= 0 and ref_out.max() <= 1 and np.allclose(ref_out.sum(axis=1), 1, atol=1e-3)
        )
        if output_kind == "logits" and looks_like_p:
            raw["imported"]["notes"].append(
                "the model's output already looks like probabilities; it is softmaxed again, as WSInfer "
                "does (import with --output-kind probabilities to read it as it is)"
            )
        worst_p = worst_out = 0.0
        for bs in sorted({1, len(got.tiles)}):
            for i in range(0, len(got.tiles), bs):
                batch = got.tiles[i : i + bs]
                o = np.asarray(session.run([card.output_name], {INPUT_NAME: prepare_batch(batch, card)})[0])
                worst_out = max(worst_out, float(np.abs(o - ref_out[i : i + bs]).max()))
            p = predict(session, card, got.tiles, batch_size=bs)
            worst_p = max(worst_p, float(np.abs(p - ref_p).max()))
        if not worst_p <= tolerance:
            raise ModelError(
                f"{ts_path}: onnxruntime differs from TorchScript by {worst_p:.3g} in probability on "
                f"{got.source} (tolerance {tolerance:g}); the ONNX export is not faithful, so nothing was "
                "written"
            )
        import onnxruntime

        raw["export"] = {
            "command": command or "wsi-infer import-model " + shlex.join([str(src), "--out", str(out_p)]),
            "opset": OPSET,
            "exporter": f"torch {torch.__version__} torch.onnx.export (TorchScript-based, dynamo=False)",
            "onnxruntime": onnxruntime.__version__,
            "parity_max_abs_diff": worst_p,
            "parity_output_max_abs_diff": worst_out,
            "parity_tiles": len(got.tiles),
            "parity_tolerance": tolerance,
            "parity_source": got.source,
            "parity_note": "TorchScript on torch-side ToTensor/Normalize vs onnxruntime on the pipeline's "
            "preprocessing (prepare_batch), batch sizes 1 and all; probabilities (softmax of logits) and raw "
            "outputs",
        }
        # key order: export before limitations/imported, as in our own cards
        ordered = {k: raw[k] for k in raw if k not in ("export", "limitations", "imported")}
        ordered.update(export=raw["export"], limitations=raw["limitations"], imported=raw["imported"])
        tmp.replace(out_p)
        write_card(ordered, card_p)
    finally:
        tmp.unlink(missing_ok=True)
    notes = tuple(raw["imported"]["notes"])
    return ImportReport(out_p, card_p, ordered, worst_p, worst_out, len(got.tiles), got.source, notes)
