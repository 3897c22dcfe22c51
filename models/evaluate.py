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
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.data import iterate_batches, load_tiles
from models.scanned import shared_tiles_dir
from models.split import DEFAULT_FRACTIONS, DEFAULT_SEED, read_index, sample_rows, split_rows
from wsi_pipeline.evaluation.metrics import classification_metrics, is_undefined
from wsi_pipeline.inference.card import load_card
from wsi_pipeline.provenance import strict_json

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

    Returns ``classification_metrics`` plus ``per_label`` accuracy, ``groups`` (number of groups),
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
    metrics: dict[str, Any] = classification_metrics(tiles.tumour, prob)
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


@dataclass(frozen=True)
class EvalSet:
    """Labelled tiles of one source: ``images`` uint8 NHWC, ``tumour`` 0/1, per-tile class ``labels``
    and bootstrap unit ``groups`` (patient, slide or source picture)."""

    name: str
    images: npt.NDArray[np.uint8]
    tumour: npt.NDArray[np.int64]
    labels: tuple[str, ...]
    groups: tuple[str, ...]
    note: str = ""


def build_sets(card: dict[str, Any], index: Path | None, splits: Sequence[str] = ("test",)) -> list[EvalSet]:
    """The evaluation sets a card's figures come from, rebuilt from the data folders.

    ``test`` (and ``val``): the card's index split (LC25000 for the shipped model); ``glas-test`` /
    ``glas-val``: GlaS patients of ``models.scanned.GLAS_SPLIT`` with the card's label rule (only when
    the model was trained with GlaS); ``kather2016`` and ``nct-crc-he``: every tile (0.495 and 0.5
    um/px, mirror-padded to 224 px), when the shared data is there. A card whose
    ``preprocessing.stain_normalization`` is ``macenko`` gets every set Macenko-normalized (one fit per
    source picture, GlaS region or Kather tile), as the pipeline normalizes each slide.
    """
    from models.scanned import (
        GLAS_SPLIT,
        LabelRule,
        glas_tiles,
        load_glas,
        load_labelled_tiles,
        macenko_groups,
    )

    split_info = card["data"]["split"]
    stain = (card.get("preprocessing") or {}).get("stain_normalization", "none")
    out: list[EvalSet] = []
    if index is not None and index.exists():
        rows = read_index(index)
        parts = split_rows(rows, split_info["fractions"], split_info["seed"])
        for split in splits:
            tiles = load_tiles([rows[i] for i in parts[split]])
            images = tiles.images
            if stain == "macenko":  # one fit per source picture, as the pipeline fits one per slide
                images = macenko_groups(images, [r.group for r in tiles.rows])
            out.append(
                EvalSet(split, images, tiles.tumour, tuple(r.label for r in tiles.rows),
                        tuple(r.group for r in tiles.rows), f"{index.parent.name} {split} split")
            )  # fmt: skip
    tiles_dir = shared_tiles_dir()
    glas = (card["data"].get("glas") or {}).get("label_rule")
    if glas is not None and (tiles_dir / "glas-colon").exists():
        rule = LabelRule(**glas)
        for split in splits:
            imgs, lab, grades, groups = glas_tiles(
                load_glas(tiles_dir / "glas-colon", GLAS_SPLIT[split]), rule
            )
            out.append(
                EvalSet(f"glas-{split}", imgs, lab, tuple(grades), tuple(groups),
                        f"GlaS patients {list(GLAS_SPLIT[split])}, grid tiles at 0.5 um/px")
            )  # fmt: skip
    if "test" in splits:
        for name, folder in (("kather2016", "kather2016-samples"), ("nct-crc-he", "nct-crc-he-100k-samples")):
            if (tiles_dir / folder / "index.csv").exists():
                imgs, lab, classes, groups = load_labelled_tiles(tiles_dir / folder, stain=stain)
                out.append(EvalSet(name, imgs, lab, tuple(classes), tuple(groups), f"tiles/{folder}"))
    return out


def group_resamples(groups: Sequence[str], n_boot: int, seed: int = 0) -> Iterator[npt.NDArray[np.intp]]:
    """``n_boot`` bootstrap draws of tile indices that resample whole ``groups`` (one per tile) with
    replacement, ``seed`` fixed so a report is reproducible."""
    names, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(names), len(names))])


def bootstrap_ci(
    tumour: npt.NDArray[np.int64],
    p: npt.NDArray[np.floating],
    groups: Sequence[str],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, list[float | None]]:
    """95 % percentile intervals of AUC, sensitivity and specificity, resampling whole ``groups``."""
    draws: dict[str, list[float]] = {"auc": [], "recall": [], "specificity": []}
    for idx in group_resamples(groups, n_boot, seed):
        m = classification_metrics(tumour[idx], p[idx], threshold)
        for k in draws:
            if not is_undefined(m[k]):  # a resample without positives has no recall, and so on
                draws[k].append(m[k])
    return {
        k: (
            [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            if v
            else [None, None]
        )
        for k, v in draws.items()
    }


def set_metrics(
    s: EvalSet, p: npt.NDArray[np.floating], threshold: float, n_boot: int = 1000
) -> dict[str, Any]:
    """``classification_metrics`` at ``threshold``, group-bootstrap intervals and per-class results."""
    m: dict[str, Any] = classification_metrics(s.tumour, p, threshold)
    m["groups"] = len(set(s.groups))
    m["ci95"] = bootstrap_ci(s.tumour, p, s.groups, threshold, n_boot)
    labels = np.asarray(s.labels)
    m["per_label"] = {
        str(lab): {
            "n": int((labels == lab).sum()),
            "tumour": int(s.tumour[labels == lab].max()),
            "mean_p": float(p[labels == lab].mean()),
            "called_tumour": float((p[labels == lab] >= threshold).mean()),
        }
        for lab in sorted(set(s.labels))
    }
    return m


def choose_threshold(sets: Sequence[EvalSet], probs: Sequence[npt.NDArray[np.floating]]) -> float:
    """Threshold (0.05..0.95, step 0.01) maximising the mean over ``sets`` of balanced accuracy;
    ties go to the value nearest 0.5. Use validation sets only."""
    grid = np.round(np.arange(0.05, 0.951, 0.01), 2)
    scores = [
        np.mean(
            [
                classification_metrics(s.tumour, p, float(t))["balanced_accuracy"]
                for s, p in zip(sets, probs, strict=True)
            ]
        )
        for t in grid
    ]
    best = max(scores)
    return float(
        min((t for t, sc in zip(grid, scores, strict=True) if sc >= best - 1e-9), key=lambda t: abs(t - 0.5))
    )


def score_sets(
    model_path: str | Path, sets: Sequence[EvalSet], threads: int = 0
) -> list[npt.NDArray[np.float32]]:
    """P(tumour) of every tile of every set."""
    session = make_session(model_path, threads)
    return [predict(session, s.images)[:, 1] for s in sets]


def compare(card_metrics: dict[str, Any], metrics: dict[str, Any], tolerance: float) -> list[str]:
    """Lines describing each metric that differs by more than ``tolerance`` (after rounding to 4 places)."""
    bad = []
    for k in METRIC_KEYS:
        # the card stores 4 decimals and null for undefined values (wsi_pipeline.evaluation.metrics)
        now = None if is_undefined(metrics[k]) else round(float(metrics[k]), 4)
        then = card_metrics[k]
        if (now is None) != (then is None) or (now is not None and abs(float(then) - now) > tolerance):
            bad.append(f"{k}: card {then}, now {now}")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n")[1])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "tumour-cnn.onnx")
    p.add_argument("--card", type=Path, help="model card JSON (default: <model>.json)")
    p.add_argument("--index", type=Path, default=None, help="index CSV (default: shared LC25000 lung)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--check", action="store_true", help="exit 1 when metrics differ from the card's")
    p.add_argument(
        "--tolerance", type=float, default=None,
        help="largest allowed difference from the card (default 0.005; 0.02 for an int8 card, whose "
        "figures depend on the CPU's instruction set)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write the metrics to this file")
    args = p.parse_args(argv)

    model_card = load_card(args.card or args.model.with_suffix(".json"))
    card = model_card.raw
    if args.tolerance is None:
        args.tolerance = 0.02 if card.get("quantization") else 0.005
    threshold = model_card.threshold
    index = args.index or default_index()
    if not index.exists():
        print(f"error: index {index} not found; pass --index", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    sets = build_sets(card, index)
    probs = score_sets(args.model, sets, args.threads)
    results = {s.name: set_metrics(s, pr, threshold) for s, pr in zip(sets, probs, strict=True)}
    print(f"{args.model.name}: {sum(len(s.tumour) for s in sets)} tiles in {len(sets)} sets, "
          f"threshold {threshold} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    for name, m in results.items():
        print(
            f"  {name:12s} n {m['n']:5d} groups {m['groups']:3d} auc {m['auc']:.4f} {m['ci95']['auc']} "
            f"sens {m['recall']:.4f} spec {m['specificity']:.4f} f1 {m['f1']:.4f} acc {m['accuracy']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(strict_json(results), indent=2, default=float))
    if args.check:
        bad = []
        for name, reference in card["metrics"].items():
            if name not in results:
                print(f"note: set {name!r} of the card is not available here; not checked", file=sys.stderr)
                continue
            bad += [f"{name} {line}" for line in compare(reference, results[name], args.tolerance)]
        for line in bad:
            print(f"MISMATCH {line}", file=sys.stderr)
        if bad:
            return 1
        print(f"matches the card within {args.tolerance}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
