"""Binary classification metrics in numpy (no scikit-learn)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def roc_auc(y_true: npt.ArrayLike, score: npt.ArrayLike) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic (ties get average ranks).

    Returns ``nan`` when only one class is present.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and score {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first row
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = (first_rank + (counts - 1) / 2.0)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else float("nan")


def binary_metrics(y_true: npt.ArrayLike, p_pos: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall (sensitivity), specificity, F1, balanced accuracy and AUC.

    ``y_true`` holds 0/1 labels (1 = positive class), ``p_pos`` the positive-class probability; a tile
    is called positive when ``p_pos >= threshold``. Counts (``n``, ``tp``, ...) are included.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(p_pos, dtype=np.float64).ravel()
    pred = p >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    tn = int(np.sum(~pred & ~y))
    fn = int(np.sum(~pred & y))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    return {
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int((~y).sum()),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, int(y.size)),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (recall + specificity) / 2.0,
        "auc": roc_auc(y, p),
    }
