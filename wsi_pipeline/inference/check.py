"""Check a model against its card, and real tiles to run through it.

:func:`check_model` (``wsi-infer check-model NAME.onnx``) compares the card with the ONNX graph field by
field (input name, rank, layout, tile size and dtype; output name, shape and class count; the OOD
output) and runs one tile through the model as the pipeline would (:func:`~wsi_pipeline.inference.
session.prepare_batch`, then :func:`~wsi_pipeline.inference.session.to_probabilities`). Every mismatch is
one :class:`~wsi_pipeline.errors.ModelError` line naming the card, the field and the fix.

:func:`sample_tiles` cuts tiles from a slide (by default the bundled sample) the way a run would: at
the model's um/px and tile size, tissue tiles only. Without a slide, synthetic tiles stand in.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import DeviceError, ModelError, WsiError
from wsi_pipeline.inference.card import ModelCard, resolve_model

SAMPLE_NAME = "CMU-1-Small-Region.svs"
_ORT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32"}


def sample_slide() -> Path | None:
    """The bundled sample slide (``samples/`` of a source checkout, or the installed data files)."""
    for folder in (
        Path(__file__).resolve().parents[2] / "samples",
        Path(sys.prefix) / "share" / "wsi-pipeline" / "samples",
    ):
        if (folder / SAMPLE_NAME).is_file():
            return folder / SAMPLE_NAME
    return None


@dataclass(frozen=True)
class SampleTiles:
    """Tiles (n, size, size, 3) uint8 RGB and where they came from, in words."""

    tiles: np.ndarray
    source: str
    real: bool


def synthetic_tiles(size_px: int, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` H&E-coloured noise tiles (uint8 RGB), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    base = np.array([215.0, 160.0, 200.0])  # pink-purple, eosin and haematoxylin mixed
    coarse = rng.normal(0.0, 25.0, (n, 8, 8, 3))
    reps = -(-size_px // 8)
    field = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :size_px, :size_px]
    noise = rng.normal(0.0, 8.0, (n, size_px, size_px, 3))
    return np.clip(base + field + noise, 0, 255).astype(np.uint8)


def sample_tiles(
    size_px: int, mpp: float, n: int, *, slide: str | os.PathLike[str] | None = None
) -> SampleTiles:
    """Up to ``n`` tissue tiles of ``slide`` (default: the bundled sample) cut as a run would cut them
    (at ``mpp`` um/px and ``size_px`` px, spread over the slide's tile order).

    A slide that cannot give tiles (absent, not readable, no tissue) yields ``n`` synthetic tiles
    instead, said so in ``source``; a slide the caller named explicitly raises instead.
    """
    from wsi_pipeline.tiling.plan import TileOptions
    from wsi_pipeline.tiling.source import open_source, read_chunk

    path = Path(slide) if slide is not None else sample_slide()
    if path is None:
        return SampleTiles(synthetic_tiles(size_px, n), "synthetic tiles (no sample slide installed)", False)
    try:
        source = open_source(path, TileOptions(target_mpp=mpp, tile_px=size_px))
        colrow = source.layout.colrow
        if len(colrow) == 0:
            raise ModelError(f"{path}: no tissue tiles at {mpp} um/px")
        idx = np.unique(np.linspace(0, len(colrow) - 1, min(n, len(colrow))).round().astype(int))
        tiles = read_chunk(source.task_source(), np.ascontiguousarray(colrow[idx]), 0)
    except WsiError as exc:
        if slide is not None:
            raise
        return SampleTiles(synthetic_tiles(size_px, n), f"synthetic tiles ({exc})", False)
    return SampleTiles(tiles, f"{len(tiles)} tissue tile(s) of {path.name} at {mpp:g} um/px", True)


def _fix(card: ModelCard, field: str, what: str, fix: str) -> ModelError:
    return ModelError(f"{card.path}: {field}: {what}; {fix}")


def _session(card: ModelCard) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise DeviceError(
            "onnxruntime is not installed; pip install 'wsi-pipeline[cpu]' (or '[gpu]' on a CUDA machine)"
        ) from exc
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(
            str(card.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{card.onnx_path}: not a loadable ONNX model ({msg}); re-export the model") from exc


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
    naming the first field that differs and how to fix the card."""
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
            card, "input.size_px", f"the card says {card.input_size_px} but the model takes {shape}",
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


@dataclass(frozen=True)
class CheckReport:
    card: ModelCard
    provider: str
    tiles: str  # where the tile came from
    probabilities: np.ndarray  # (n_classes,) of the tile
    note: str = ""

    def line(self) -> str:
        c = self.card
        shape = [3, c.input_size_px, c.input_size_px] if c.input_layout == "NCHW" else [
            c.input_size_px, c.input_size_px, 3
        ]  # fmt: skip
        p = float(self.probabilities[c.positive_index])
        note = f" (note: {self.note})" if self.note else ""
        return (
            f"{c.onnx_path}: OK: card {c.path.name} matches the graph (input {c.input_name!r} "
            f"{c.input_dtype} {c.input_layout} [N, {', '.join(map(str, shape))}], "
            f"output {c.output_name!r} = {c.output_kind} "
            f"of {len(c.classes)} classes {list(c.classes)}, {c.mpp:g} um/px); {self.tiles} scored: "
            f"P({c.positive_class}) = {p:.4f}{note}"
        )


def check_model(model: str | os.PathLike[str], *, slide: str | os.PathLike[str] | None = None) -> CheckReport:
    """Validate the card of ``model`` (schema, sha256), compare it with the graph, run one tile.

    The tile comes from ``slide`` (default: the bundled sample; synthetic when it is absent), cut at
    the card's um/px and size. Raises :class:`ModelError` naming the field and the fix.
    """
    from wsi_pipeline.inference.session import check_io, prepare_batch, to_probabilities

    card = resolve_model(model)
    session = _session(card)
    check_graph(session, card)
    check_io(session, card)  # the runtime's own check, which the pipeline runs before scoring
    got = sample_tiles(card.input_size_px, card.mpp, 1, slide=slide)
    tile = got.tiles[:1]
    try:
        raw = np.asarray(session.run([card.output_name], {card.input_name: prepare_batch(tile, card)})[0])
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{card.onnx_path}: running one tile failed ({msg}); check input and preprocessing"
        ) from exc
    probs = to_probabilities(raw.copy(), card)
    note = ""
    if card.output_kind == "logits":
        looks = raw.min() >= 0 and raw.max() <= 1 and np.allclose(raw.sum(axis=1), 1, atol=1e-3)
        if looks:
            note = (
                "the raw output already looks like probabilities; if it is, set output.kind to "
                '"probabilities", else a softmax flattens it'
            )
    return CheckReport(card, "CPUExecutionProvider", got.source, probs[0], note)
