"""Measure a model in half precision (fp16) against fp32 on its held-out tiles; allow it on the card.

Example (from the repository root)::

    python -m models.fp16_check --model models/tumour-cnn.onnx [--write | --check]

converts the model to fp16 with onnxruntime's converter (inputs and outputs keep their types, as
``wsi-infer --precision fp16`` runs it on CUDA), scores the evaluation sets of the card
(``models.evaluate``: LC25000 test, GlaS test patients, Kather, NCT-CRC-HE) with both graphs on the
CPU, and prints per set the largest change of P(positive), the tiles whose label at the card's
threshold flips, and both AUCs. ``--write`` stores the result as the card's ``fp16`` section;
``--check`` exits with 1 when a fresh measurement disagrees with it.

The rule (:data:`RULE`) was written before the shipped model was measured. Here fp16 runs on
onnxruntime's CPU kernels: the weights and the activations between layers are rounded to fp16 as
on a GPU, but a GPU's fp16 kernels round their sums differently; ``benchmarks/bench_gpu.py``
measures the GPU's own agreement with this CPU when a GPU is there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.card import write_markdown
from models.evaluate import build_sets, default_index, score_sets
from wsi_pipeline.evaluation.metrics import roc_auc
from wsi_pipeline.inference.card import load_card, write_card
from wsi_pipeline.inference.precision import convert_fp16

#: when a card allows fp16 (written before the shipped model was measured): a heatmap level is 1/255
#: (0.004), so 0.02 is 5 levels at most; label flips and AUC within what a re-export would move
MAX_ABS_DP = 0.02
MAX_FLIP_SHARE = 0.005
MAX_AUC_CHANGE = 0.002
RULE = (
    f"allowed iff, on every evaluation set, |P(fp16) - P(fp32)| <= {MAX_ABS_DP} for every tile, at most "
    f"{MAX_FLIP_SHARE:.1%} of the tiles change label at the card's threshold and the AUC moves by at most "
    f"{MAX_AUC_CHANGE}"
)


def _auc(y: npt.NDArray[np.int64], p: npt.NDArray[np.floating]) -> float | None:
    value = roc_auc(y, p) if 0 < int(y.sum()) < len(y) else None
    return None if value is None or not np.isfinite(value) else round(float(value), 4)


def compare_precisions(
    names: list[str],
    tumour: list[npt.NDArray[np.int64]],
    p32: list[npt.NDArray[np.floating]],
    p16: list[npt.NDArray[np.floating]],
    threshold: float,
) -> dict[str, Any]:
    """The ``fp16`` card section from P(positive) of the same tiles in fp32 and fp16, per set."""
    sets: dict[str, Any] = {}
    allowed = True
    worst, flips, n_all = 0.0, 0, 0
    for name, y, a, b in zip(names, tumour, p32, p16, strict=True):
        dp = float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(initial=0.0))
        flip = int(((a >= threshold) != (b >= threshold)).sum())
        auc32, auc16 = _auc(y, a), _auc(y, b)
        auc_moved = None if auc32 is None or auc16 is None else abs(auc32 - auc16)
        sets[name] = {"n": len(a), "max_abs_dp": round(dp, 6), "label_flips": flip,
                      "auc_fp32": auc32, "auc_fp16": auc16}  # fmt: skip
        allowed &= dp <= MAX_ABS_DP and flip <= MAX_FLIP_SHARE * len(a)
        allowed &= auc_moved is None or auc_moved <= MAX_AUC_CHANGE
        worst, flips, n_all = max(worst, dp), flips + flip, n_all + len(a)
    return {"allowed": bool(allowed and n_all > 0), "rule": RULE, "max_abs_dp": round(worst, 6),
            "label_flips": flips, "n_tiles": n_all, "sets": sets}  # fmt: skip


def measure(model: Path, card: dict[str, Any], threshold: float, index: Path, threads: int) -> dict[str, Any]:
    """Score the card's evaluation sets with ``model`` in fp32 and its fp16 copy; the ``fp16`` section."""
    sets = build_sets(card, index)
    with tempfile.TemporaryDirectory(prefix="fp16-check-") as tmp:
        half = convert_fp16(model, Path(tmp) / "model-fp16.onnx")
        p32 = score_sets(model, sets, threads)
        p16 = score_sets(half, sets, threads)
    section = compare_precisions(
        [s.name for s in sets], [s.tumour for s in sets], list(p32), list(p16), threshold
    )
    section["measured_with"] = (
        f"onnxruntime {ort.__version__} CPUExecutionProvider on the graph from "
        "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True), with the head's "
        "softmax and distance ops kept fp32 (wsi_pipeline.inference.precision.FP32_OPS)"
    )
    shown = os.path.relpath(model) if model.resolve().is_relative_to(Path.cwd()) else str(model)
    section["command"] = f"python -m models.fp16_check --model {Path(shown).as_posix()} --write"
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.fp16_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "tumour-cnn.onnx")
    p.add_argument("--index", type=Path, default=None, help="index CSV (default: shared LC25000 lung)")
    p.add_argument("--threads", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="store the measurement as the card's fp16 section")
    g.add_argument("--check", action="store_true", help="exit 1 when it disagrees with the card's")
    args = p.parse_args(argv)
    card_path = args.model.with_suffix(".json")
    model_card = load_card(card_path)
    index = args.index or default_index()
    if not index.exists():
        print(f"error: index {index} not found; pass --index", file=sys.stderr)
        return 2
    section = measure(args.model, model_card.raw, model_card.threshold, index, args.threads)
    print(json.dumps(section, indent=2))
    if args.write:
        raw = dict(model_card.raw)
        raw["fp16"] = section
        write_card(raw, card_path)
        write_markdown(raw, args.model.parent / "MODEL_CARD.md")
        print(f"wrote the fp16 section of {card_path} (allowed: {section['allowed']})")
    if args.check:
        then = model_card.raw.get("fp16")
        if not isinstance(then, dict):
            print(f"MISMATCH {card_path} has no fp16 section; run with --write", file=sys.stderr)
            return 1
        bad = [f"allowed: card {then['allowed']}, now {section['allowed']}"] if then["allowed"] != section[
            "allowed"] else []  # fmt: skip
        if abs(float(then["max_abs_dp"]) - section["max_abs_dp"]) > 0.005:
            bad.append(f"max_abs_dp: card {then['max_abs_dp']}, now {section['max_abs_dp']}")
        if abs(int(then["label_flips"]) - section["label_flips"]) > max(2, section["n_tiles"] // 1000):
            bad.append(f"label_flips: card {then['label_flips']}, now {section['label_flips']}")
        for line in bad:
            print(f"MISMATCH {line}", file=sys.stderr)
        if bad:
            return 1
        print("matches the card's fp16 section")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
