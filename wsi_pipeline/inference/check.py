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

from wsi_pipeline.errors import ModelError, WsiError
from wsi_pipeline.inference.card import ModelCard, resolve_model

SAMPLE_NAME = "CMU-1-Small-Region.svs"


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


@dataclass(frozen=True)
class DeviceCheck:
    """The same tiles through the device's session as a run would use it, against the CPU."""

    provider: str
    run: dict[str, Any]  # precision, I/O binding, pinned input (as in the run manifest)
    tiles: int
    max_abs_dp: float  # largest |P - P(CPU fp32)| of the positive class over the tiles

    def text(self) -> str:
        how = ", ".join(f"{k} {v}" for k, v in self.run.items())
        dp = f"{self.max_abs_dp:.2e}"
        return f"; on {self.provider} ({how}): {self.tiles} tile(s), largest |P - P(CPU)| = {dp}"


@dataclass(frozen=True)
class CheckReport:
    card: ModelCard
    provider: str
    tiles: str  # where the tile came from
    probabilities: np.ndarray  # (n_classes,) of the tile
    note: str = ""
    device: DeviceCheck | None = None

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
            f"P({c.positive_class}) = {p:.4f}{note}{self.device.text() if self.device else ''}"
        )


def check_model(
    model: str | os.PathLike[str],
    *,
    slide: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    precision: str = "auto",
) -> CheckReport:
    """Validate the card of ``model`` (schema, sha256), compare it with the graph, run one tile.

    The tile comes from ``slide`` (default: the bundled sample; synthetic when it is absent), cut at
    the card's um/px and size. Raises :class:`ModelError` naming the field and the fix. With a GPU
    ``device`` (``cuda``, ``tensorrt``, or ``auto`` where CUDA is there), :data:`DEVICE_TILES` tiles
    also run through that device's session and runner as a run would use them (``precision``, I/O
    binding), compared with the CPU; a device onnxruntime cannot use raises :class:`DeviceError`.
    """
    from wsi_pipeline.inference.session import create_session, prepare_batch, to_probabilities

    card = resolve_model(model)
    session, _ = create_session(card, "cpu")  # checks the card against the graph, as every run does
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
    checked = _device_check(card, session, device, precision, slide) if device != "cpu" else None
    return CheckReport(card, "CPUExecutionProvider", got.source, probs[0], note, checked)


#: tiles run on the device and the CPU by ``check-model --device``
DEVICE_TILES = 16


def _device_check(
    card: ModelCard, cpu: Any, device: str, precision: str, slide: str | os.PathLike[str] | None
) -> DeviceCheck | None:
    """The tiles through ``device`` as a run would run them, against the CPU session ``cpu``; None
    when ``auto`` finds no GPU (then the CPU check is the device check)."""
    from wsi_pipeline.inference.scoring import run_details, session_runner
    from wsi_pipeline.inference.session import create_session, prepare_batch, run_prepared

    session, provider = create_session(card, device, precision=precision)
    if provider == "CPUExecutionProvider":
        return None
    tiles = sample_tiles(card.input_size_px, card.mpp, DEVICE_TILES, slide=slide).tiles
    x = prepare_batch(tiles, card)
    run = session_runner(session, card, provider)
    got, want = run(x)[0], run_prepared(cpu, card, x)[0]
    dp = float(np.abs(got[:, card.positive_index] - want[:, card.positive_index]).max())
    return DeviceCheck(provider, run_details(card, provider, precision, run), len(tiles), dp)
