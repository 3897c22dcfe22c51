"""The one metrics module (wsi_pipeline.evaluation.metrics): AUC against its pairwise definition, the
confusion counts, and the rule for undefined values, as the model card and metrics.json record them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from wsi_pipeline.evaluation.metrics import (
    binary_metrics,
    classification_metrics,
    confusion,
    is_undefined,
    ratio,
    roc_auc,
)
from wsi_pipeline.evaluation.summary import summarize
from wsi_pipeline.provenance import strict_json


def pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Brute force: over every (positive, negative) pair, 1 when the positive scores higher, 1/2 on a tie."""
    pos, neg = s[y.astype(bool)], s[~y.astype(bool)]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_with_ties_equals_the_pairwise_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 150)
    s = np.round(rng.random(150) + 0.3 * y, 1)  # one decimal: many ties, within and across classes
    assert len(np.unique(s)) < 30
    assert roc_auc(y, s) == pytest.approx(pairwise_auc(y, s), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: chance
    assert roc_auc([True, False], np.array([0.7, 0.3], np.float32)) == 1.0  # bool labels, float32 scores
    with pytest.raises(ValueError, match="shape"):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_confusion_counts() -> None:
    c = confusion([1, 1, 0, 0, 1, 0], [1, 0, 1, 0, 1, 0])
    assert (c.tp, c.fp, c.fn, c.tn, c.n) == (2, 1, 1, 2, 6)
    m = classification_metrics([1, 1, 1, 0, 0, 0, 0, 1], [0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4, 0.7])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert (m["n"], m["n_positive"], m["n_negative"], m["threshold"]) == (8, 4, 4, 0.5)
    for k in ("accuracy", "precision", "recall", "specificity", "f1", "balanced_accuracy"):
        assert m[k] == pytest.approx(0.75), k
    assert m["auc"] == pytest.approx(pairwise_auc(np.array([1, 1, 1, 0, 0, 0, 0, 1]),
                                                  np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4, 0.7])))  # fmt: skip
    # the threshold is inclusive: p >= threshold is positive
    assert classification_metrics([1, 0], [0.5, 0.49], 0.5)["tp"] == 1


def test_undefined_ratios_are_nan_never_zero_or_one() -> None:
    assert math.isnan(ratio(0, 0)) and ratio(0, 4) == 0.0 and ratio(3, 4) == 0.75
    # nothing called positive: precision undefined; nothing positive in truth: recall undefined
    m = classification_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"])
    assert math.isnan(m["balanced_accuracy"]) and math.isnan(m["auc"])  # derived from undefined / one class
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    # positives present but none called: recall 0 (defined), precision still undefined
    m = classification_metrics([1, 1, 0], [0.1, 0.2, 0.3])
    assert m["recall"] == 0.0 and math.isnan(m["precision"]) and m["f1"] == 0.0
    # an empty set: every ratio undefined
    m = binary_metrics(np.zeros(0, bool), np.zeros(0, bool))
    assert all(math.isnan(m[k]) for k in ("dice", "precision", "recall", "specificity", "accuracy"))


def test_undefined_values_are_null_when_written_and_skipped_by_summaries() -> None:
    m = classification_metrics([0, 0], [0.1, 0.9])
    text = json.dumps(strict_json(m), allow_nan=False)  # strict JSON: no NaN token
    back = json.loads(text)
    assert back["recall"] is None and back["auc"] is None and back["precision"] == 0.0
    assert is_undefined(None) and is_undefined(math.nan) and not is_undefined(0.0)
    rows = [
        {"dice": 0.5, "auc": None, "slide_label_correct": True},
        {"dice": math.nan, "auc": 0.9, "slide_label_correct": True},
        {"dice": 0.7, "auc": math.nan, "slide_label_correct": False},
    ]
    s = summarize(rows)
    assert s["dice"]["mean"] == 0.6 and s["dice"]["n"] == 2
    assert s["auc"]["mean"] == 0.9 and s["auc"]["n"] == 1 and s["auc"]["sd"] is None
    assert s["precision"] == {"mean": None, "sd": None, "n": 0}


def test_wilson_interval_matches_published_values_and_stays_in_range() -> None:
    from wsi_pipeline.evaluation.metrics import wilson_interval

    assert wilson_interval(5, 10) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(10, 10)  # every slide right: the interval is not [1, 1]
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_interval_is_reproducible_and_covers_the_mean() -> None:
    from wsi_pipeline.evaluation.metrics import bootstrap_interval

    v = np.random.default_rng(1).normal(0.8, 0.05, 40)
    a, b = bootstrap_interval(v), bootstrap_interval(v)
    assert a == b and a[0] < v.mean() < a[1]
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * v.std() / np.sqrt(40), rel=0.25)
    assert all(math.isnan(x) for x in bootstrap_interval([0.5]))
