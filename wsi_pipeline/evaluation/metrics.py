"""Binary metrics, in one place: confusion counts, the ratios built on them, and the ROC AUC.

Used for a heatmap against an annotation (``wsi_pipeline.evaluation.evaluate``: areas with
:func:`overlap_ratios`, cells with :func:`binary_metrics`) and for tiles of a classifier against their
labels (``models/``: training, export, ``models.evaluate``). numpy only (no scikit-learn).

Undefined values, one rule everywhere: a ratio whose denominator is zero (precision when nothing is
called positive, recall when nothing is positive in truth, Dice/F1 when both are empty, any ratio of
an empty array) and an AUC with only one class present are *undefined*. The functions here return
``nan`` for them, never a made-up 0 or 1; what derives from an undefined value (balanced accuracy) is
undefined too. Written records (model cards, ``metrics.json``, ``metrics.csv``) hold ``null`` (an
empty CSV cell) for them: :func:`wsi_pipeline.provenance.strict_json` converts. Summaries over slides
or sets leave undefined values out (:func:`is_undefined`) and say how many values they averaged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

RATIO_KEYS = ("precision", "recall", "specificity", "accuracy", "f1", "balanced_accuracy")


class Confusion(NamedTuple):
    """Counts of a binary decision against the truth."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def confusion(pred: npt.ArrayLike, truth: npt.ArrayLike) -> Confusion:
    """Confusion counts of boolean (or 0/1) ``pred`` against ``truth``, flattened; shapes must agree."""
    p = np.asarray(pred).astype(bool).ravel()
    t = np.asarray(truth).astype(bool).ravel()
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    return Confusion(
        tp=int(np.count_nonzero(p & t)),
        fp=int(np.count_nonzero(p & ~t)),
        fn=int(np.count_nonzero(~p & t)),
        tn=int(np.count_nonzero(~p & ~t)),
    )


def ratio(num: float, den: float) -> float:
    """``num / den``, or ``nan`` when ``den`` is 0 (the module's rule for undefined ratios)."""
    return float(num / den) if den else math.nan


def ratios(c: Confusion) -> dict[str, float]:
    """Precision, recall (sensitivity), specificity, accuracy, F1 (= Dice) and balanced accuracy.

    Each is ``nan`` when undefined (see the module docstring).
    """
    recall = ratio(c.tp, c.tp + c.fn)
    specificity = ratio(c.tn, c.tn + c.fp)
    return {
        "precision": ratio(c.tp, c.tp + c.fp),
        "recall": recall,
        "specificity": specificity,
        "accuracy": ratio(c.tp + c.tn, c.n),
        "f1": ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "balanced_accuracy": (recall + specificity) / 2.0,  # nan when either is
    }


def overlap_ratios(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, precision and recall of an overlap given as counts or areas (true positive, false
    positive, false negative): ``2 tp / (2 tp + fp + fn)``, ``tp / (tp + fp)``, ``tp / (tp + fn)``.

    Each is ``nan`` when undefined (see the module docstring): Dice when there is nothing in truth nor
    in the prediction, precision when nothing is predicted, recall when nothing is in truth.
    """
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def binary_metrics(pred: npt.ArrayLike, truth: npt.ArrayLike) -> dict[str, Any]:
    """Counts ``tp``, ``fp``, ``fn``, ``tn`` and every ratio of :func:`ratios` for boolean arrays,
    plus ``dice`` (equal to F1 for sets of cells)."""
    c = confusion(pred, truth)
    r = ratios(c)
    return {**c._asdict(), "dice": r["f1"], **r}


def roc_auc(y_true: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counted one half (the Mann-Whitney U statistic from average ranks).

    ``nan`` when only one class is present (undefined).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and score {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first row
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = (first_rank + (counts - 1) / 2.0)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(
    y_true: npt.ArrayLike, p_pos: npt.ArrayLike, threshold: float = 0.5
) -> dict[str, Any]:
    """Metrics of a scored binary classifier, the set a model card records.

    ``y_true`` holds 0/1 labels (1 = positive class), ``p_pos`` the positive-class probability; an item
    is called positive when ``p_pos >= threshold``. Returns ``n``, ``n_positive``, ``n_negative``,
    the counts, ``threshold``, the ratios of :func:`ratios` and ``auc`` (undefined ones ``nan``).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(p_pos, dtype=np.float64).ravel()
    c = confusion(p >= threshold, y)
    r = ratios(c)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
        "threshold": float(threshold),
        "accuracy": r["accuracy"],
        "precision": r["precision"],
        "recall": r["recall"],
        "specificity": r["specificity"],
        "f1": r["f1"],
        "balanced_accuracy": r["balanced_accuracy"],
        "auc": roc_auc(y, p),
    }


def lesion_detection(pred: npt.ArrayLike, lesion_cells: Any) -> dict[str, Any]:
    """Lesion-level detection on a grid of cells.

    ``pred`` (rows, cols) bool: the cells called tumour; ``lesion_cells``: per annotated tumour focus,
    a (rows, cols) bool mask of the cells it overlaps with a positive area. A predicted region is a
    group of predicted cells joined by shared edges (the outline a run draws around touching cells;
    cells meeting only at a corner are two regions). A focus is *found* when a predicted region
    overlaps it with a positive area, i.e. when one of its cells is predicted; a predicted region
    that overlaps no focus is a *false-positive region*. Returns ``lesions``, ``found``,
    ``sensitivity`` (found / lesions; undefined, nan, without lesions), ``predicted_regions`` and
    ``false_positive_regions``.
    """
    from scipy import ndimage

    p = np.asarray(pred, bool)
    masks = [np.asarray(m, bool) for m in lesion_cells]
    labels, n_regions = ndimage.label(p)  # 4-connected: edges, not corners
    found = sum(bool((p & m).any()) for m in masks)
    covered = np.zeros_like(p)
    for m in masks:
        covered |= m
    hit = np.unique(labels[p & covered])
    return {
        "lesions": len(masks),
        "found": found,
        "sensitivity": ratio(float(found), float(len(masks))),
        "predicted_regions": int(n_regions),
        "false_positive_regions": int(n_regions - np.count_nonzero(hit)),
    }


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of the proportion ``k`` of ``n``; undefined (nan) for
    ``n`` 0. Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n of n,
    which small validation sets (every slide called right) hit."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(
    values: npt.ArrayLike, stat: Any = np.mean, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``stat`` over the rows of ``values`` (resampled with
    replacement, ``seed`` fixed so a report is reproducible); undefined (nan) for fewer than 2 rows.
    ``stat`` takes the resampled array (rows in its first axis) and returns a number."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    draws = np.array([stat(v[rng.integers(0, len(v), len(v))]) for _ in range(n_boot)], np.float64)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return (math.nan, math.nan)
    return (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))


def is_undefined(value: Any) -> bool:
    """True for ``None`` (an undefined value read back from JSON) and for ``nan``."""
    return value is None or (isinstance(value, float) and math.isnan(value))
