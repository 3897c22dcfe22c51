"""Recompute an ONNX model's held-out metrics with onnxruntime (torch-free).

Example (from the repository root)::

    python -m models.evaluate --model models/tumour-cnn.onnx --check

rebuilds the group split recorded in the model card from the index, runs the model on the test
tiles and prints accuracy, precision, recall, specificity, F1 and AUC; ``--check`` exits with 1
when they differ from the card's by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.card import load_card
from models.data import iterate_batches, load_tiles
from models.metrics import binary_metrics
from models.split import DEFAULT_FRACTIONS, DEFAULT_SEED, read_index, sample_rows, split_rows

METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def default_index() -> Path:
    """``<repo>/../shared/data/tiles/lc25000-lung/index.csv`` (the shared data next to the checkout)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles" / "lc25000-lung" / "index.csv"


def make_session(model_path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; ``threads`` > 0 sets the intra-op thread count."""
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    if "CPUExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"{model_path}: CPUExecutionProvider unavailable ({session.get_providers()})")
    return session


def predict(
    session: ort.InferenceSession, images: npt.NDArray[np.uint8], batch_size: int = 64
) -> npt.NDArray[np.float32]:
    """Probabilities ``[N, 2]`` for uint8 NHWC RGB tiles (input ``tiles``, output ``probabilities``)."""
    out = [
        session.run(["probabilities"], {"tiles": np.ascontiguousarray(images[idx])})[0]
        for idx in iterate_batches(len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.empty((0, 2), np.float32)


def evaluate_model(
    model_path: str | Path,
    index_csv: str | Path,
    seed: int = DEFAULT_SEED,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    split: str = "test",
    max_tiles: int = 0,
    sample_seed: int = 0,
    threads: int = 0,
) -> dict[str, Any]:
    """Metrics of an ONNX model on one split of ``index_csv`` (all of it, or a fixed sample).

    Returns ``binary_metrics`` plus ``per_label`` accuracy, ``groups`` (number of groups),
    ``group_accuracy`` (a group called tumour when its tiles' mean P(tumour) >= 0.5) and
    ``groups_with_errors`` (groups holding at least one misclassified tile).
    """
    rows = read_index(index_csv)
    idx = split_rows(rows, fractions, seed)[split]
    if max_tiles:
        idx = sample_rows(idx, rows, max_tiles, sample_seed)
    tiles = load_tiles([rows[i] for i in idx])
    session = make_session(model_path, threads)
    prob = predict(session, tiles.images)[:, 1]
    metrics: dict[str, Any] = binary_metrics(tiles.tumour, prob)
    labels = np.array([r.label for r in tiles.rows])
    metrics["per_label"] = {
        str(lab): {
            "n": int((labels == lab).sum()),
            "accuracy": float(((prob[labels == lab] >= 0.5) == tiles.tumour[labels == lab]).mean()),
        }
        for lab in sorted(set(labels.tolist()))
    }
    groups = np.array([r.group for r in tiles.rows])
    names, inverse = np.unique(groups, return_inverse=True)
    mean_prob = np.bincount(inverse, weights=prob) / np.bincount(inverse)
    group_tumour = np.zeros(len(names), dtype=np.int64)
    group_tumour[inverse] = tiles.tumour
    metrics["groups"] = len(names)
    metrics["group_accuracy"] = float(((mean_prob >= 0.5) == group_tumour).mean())
    metrics["groups_with_errors"] = sorted(
        {str(g) for g, p_, t in zip(groups, prob, tiles.tumour, strict=True) if (p_ >= 0.5) != t}
    )
    return metrics


def compare(card_metrics: dict[str, Any], metrics: dict[str, Any], tolerance: float) -> list[str]:
    """Lines describing each metric that differs by more than ``tolerance`` (after rounding to 4 places)."""
    bad = []
    for k in METRIC_KEYS:
        # the card stores 4 decimals and None for undefined (NaN) values
        now = None if math.isnan(metrics[k]) else round(float(metrics[k]), 4)
        then = card_metrics[k]
        if (now is None) != (then is None) or (now is not None and abs(float(then) - now) > tolerance):
            bad.append(f"{k}: card {then}, now {now}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n")[1])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "tumour-cnn.onnx")
    p.add_argument("--card", type=Path, help="model card JSON (default: <model>.json, minus any -int8)")
    p.add_argument("--index", type=Path, default=None, help="index CSV (default: shared LC25000 lung)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--max-tiles", type=int, default=0, help="evaluate a fixed sample of this many tiles")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--check", action="store_true", help="exit 1 when metrics differ from the card's")
    p.add_argument("--tolerance", type=float, default=0.005)
    args = p.parse_args(argv)

    card_path = args.card or args.model.with_suffix(".json")
    if args.card is None and not card_path.exists():  # an int8 variant shares the fp32 model's card
        card_path = args.model.with_name(args.model.name.replace("-int8", "")).with_suffix(".json")
    card = load_card(card_path)
    reference = card["metrics"]["test"]
    int8 = card.get("int8") or {}
    if int8.get("onnx_file") == args.model.name:
        reference = int8["metrics"]["test"]
    split_info = card["data"]["split"]
    index = args.index or default_index()
    if not index.exists():
        print(f"error: index {index} not found; pass --index", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    metrics = evaluate_model(
        args.model,
        index,
        split_info["seed"],
        split_info["fractions"],
        args.split,
        args.max_tiles,
        threads=args.threads,
    )
    print(
        f"{args.model.name} on {args.split}: {metrics['n']} tiles, {metrics['groups']} groups "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print(json.dumps({k: metrics[k] for k in (*METRIC_KEYS, "tp", "fp", "tn", "fn")}, indent=2))
    if args.check:
        if args.split != "test" or args.max_tiles:
            print("error: --check compares the full test split only", file=sys.stderr)
            return 2
        bad = compare(reference, metrics, args.tolerance)
        for line in bad:
            print(f"MISMATCH {line}", file=sys.stderr)
        if bad:
            return 1
        print(f"matches the card within {args.tolerance}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
