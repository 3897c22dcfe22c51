"""Across slides: the summary of an evaluation's per-slide results, its one-line form, its CSV rows,
and the models behind them.

Pure functions over the per-slide records of :func:`wsi_pipeline.evaluation.evaluate.case_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from wsi_pipeline.evaluation.metrics import bootstrap_interval, is_undefined, wilson_interval


def _stat(values: Sequence[Any]) -> dict[str, Any]:
    vals = np.array([v for v in values if not is_undefined(v)], np.float64)
    return {
        "mean": round(float(vals.mean()), 4) if len(vals) else None,
        "sd": round(float(vals.std(ddof=1)), 4) if len(vals) > 1 else None,
        "n": len(vals),
    }


def _rounded(interval: tuple[float, float]) -> list[float | None]:
    return [None if is_undefined(v) else round(v, 4) for v in interval]


def _proportion(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "value": round(k / n, 4) if n else None, "ci95": _rounded(wilson_interval(k, n))}


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Summary across slides: tumour slides and benign slides apart.

    ``dice``, ``precision``, ``recall`` (area-exact) and ``cell_dice``: mean and sd over the slides
    with tumour in truth (a record without ``slide_truth_positive`` counts as one); ``auc`` (tile
    level) over every slide where it is defined; ``slide_label_accuracy`` over every slide;
    ``benign``: how many benign slides, how many were called tumour, and their false-positive area.
    A value undefined for a slide (null) is left out of its mean; ``n`` counts the slides averaged.
    """
    tumour = [r for r in results if r.get("slide_truth_positive", True)]
    benign = [r for r in results if not r.get("slide_truth_positive", True)]
    out: dict[str, Any] = {"n_slides": len(results), "n_tumour_slides": len(tumour),
                           "n_benign_slides": len(benign)}  # fmt: skip
    for k in ("dice", "precision", "recall", "cell_dice"):
        out[k] = _stat([r.get(k) for r in tumour])
    dice = [float(r["dice"]) for r in tumour if not is_undefined(r.get("dice"))]
    out["dice"]["ci95"] = _rounded(bootstrap_interval(dice))  # over slides: a validation's spread
    out["auc"] = _stat([r.get("auc") for r in results])
    les = [r["lesions"] for r in results if isinstance(r.get("lesions"), dict)]
    n_les, found = sum(x["lesions"] for x in les), sum(x["found"] for x in les)
    out["lesions"] = {
        "n": n_les,
        "found": found,
        "sensitivity": round(found / n_les, 4) if n_les else None,  # pooled over the slides' lesions
        "false_positive_regions": sum(x["false_positive_regions"] for x in les),
        "false_positive_regions_per_slide": (
            round(sum(x["false_positive_regions"] for x in les) / len(les), 4) if les else None
        ),
        "n_slides": len(les),
        # resampling slides, not foci: foci of one slide are not independent
        "sensitivity_ci95": _rounded(
            bootstrap_interval(
                [(x["found"], x["lesions"]) for x in les],
                lambda a: a[:, 0].sum() / a[:, 1].sum() if a[:, 1].sum() else math.nan,
            )
        ),
    }
    out["thresholds"] = sorted({float(r["threshold"]) for r in results if r.get("threshold") is not None})
    out["models"] = models_of(results)
    correct = [bool(r["slide_label_correct"]) for r in results]
    out["slide_label_accuracy"] = round(sum(correct) / len(correct), 4) if correct else None
    out["slide_labels_correct"] = sum(correct)
    called = [bool(r.get("slide_predicted_positive")) for r in tumour]
    cleared = [not r.get("slide_predicted_positive") for r in benign]
    out["slide_level"] = {  # the figures a lab's validation reports, with Wilson 95 % intervals
        "sensitivity": _proportion(sum(called), len(called)),  # tumour slides called tumour
        "specificity": _proportion(sum(cleared), len(cleared)),  # benign slides called no tumour
        "accuracy": _proportion(sum(correct), len(correct)),
    }
    fp = [float(r["false_positive_mm2"]) for r in benign if not is_undefined(r.get("false_positive_mm2"))]
    out["benign"] = {
        "n": len(benign),
        "called_tumour": sum(bool(r.get("slide_predicted_positive")) for r in benign),
        "with_false_positive_area": sum(v > 0 for v in fp),
        "false_positive_mm2": {
            "mean": round(float(np.mean(fp)), 6) if fp else None,
            "max": round(float(np.max(fp)), 6) if fp else None,
            "total": round(float(np.sum(fp)), 6) if fp else None,
            "n": len(fp),
        },
    }
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """One line for people: the area-exact Dice first, the cell Dice beside it, benign slides apart."""

    def f(v: dict[str, Any]) -> str:
        if v["mean"] is None:
            return "n/a"
        ci = v.get("ci95") or [None, None]
        return (
            f"{v['mean']:.3f}"
            + (f" +/- {v['sd']:.3f}" if v["sd"] else "")
            + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci[0] is not None else "")
        )

    s, b = summary, summary["benign"]
    fp = b["false_positive_mm2"]
    benign = (
        f"{b['n']} benign: {b['called_tumour']} called tumour, false-positive area mean "
        f"{fp['mean']:.4f} mm^2 (max {fp['max']:.4f})"
        if b["n"] and fp["mean"] is not None
        else f"{b['n']} benign: {b['called_tumour']} called tumour"
    )
    les = s.get("lesions") or {}
    lesions = (
        f"tumour foci found {les['found']} of {les['n']}, false-positive regions "
        f"{les['false_positive_regions_per_slide']:g} per slide; "
        if les.get("n_slides")
        else ""
    )
    thresholds = s.get("thresholds") or []
    at = " at P >= " + "/".join(f"{t:g}" for t in thresholds) if thresholds else ""
    return (
        f"{s['n_slides']} slides scored{at}; {s['n_tumour_slides']} with tumour: Dice {f(s['dice'])} "
        f"(area-exact; cell Dice {f(s['cell_dice'])}), precision {f(s['precision'])}, recall "
        f"{f(s['recall'])}, tile AUC {f(s['auc'])}; {lesions}{benign}; slide labels correct: "
        f"{s.get('slide_labels_correct', '?')} of {s['n_slides']}{_slide_level_text(s)}"
    )


def _slide_level_text(summary: dict[str, Any]) -> str:
    """`` (tumour slides called tumour 9 of 10, 95% CI 0.60-0.98; ...)`` from the summary's
    ``slide_level`` (nothing for a summary without it)."""

    def one(what: str, p: dict[str, Any] | None) -> str | None:
        if not p or not p.get("n"):
            return None
        lo, hi = p["ci95"]
        return f"{what} {p['k']} of {p['n']}, 95% CI {lo:.2f}-{hi:.2f}"

    sl = summary.get("slide_level") or {}
    parts = [
        x
        for x in (
            one("tumour slides called tumour", sl.get("sensitivity")),
            one("benign slides called no tumour", sl.get("specificity")),
        )
        if x
    ]
    return f" ({'; '.join(parts)})" if parts else ""


CSV_COLUMNS = ("slide", "truth", "dice", "precision", "recall", "cell_dice", "truth_mm2", "predicted_mm2",
               "false_positive_mm2", "auc", "lesions", "lesions_found", "false_positive_regions",
               "slide_label", "slide_truth_positive",
               "slide_predicted_positive", "slide_label_correct", "out_of_focus", "focus_warning",
               "annotation", "threshold", "model", "model_sha256")  # fmt: skip


def csv_rows(slides: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per slide for ``metrics.csv`` (columns :data:`CSV_COLUMNS`)."""
    return [
        {**r, "truth_mm2": (r.get("area_mm2") or {}).get("truth"),
         "predicted_mm2": (r.get("area_mm2") or {}).get("predicted"),
         "lesions": (r.get("lesions") or {}).get("lesions"),
         "lesions_found": (r.get("lesions") or {}).get("found"),
         "false_positive_regions": (r.get("lesions") or {}).get("false_positive_regions")}
        for r in slides
    ]  # fmt: skip


def models_of(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The models behind ``results`` (per-slide rows): name and version, sha256 and how many slides,
    most slides first; runs that record no model count under ``None``."""
    counts: dict[tuple[Any, Any], int] = {}
    for r in results:
        key = (r.get("model"), r.get("model_sha256"))
        counts[key] = counts.get(key, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return [{"model": name, "sha256": sha, "slides": n} for (name, sha), n in ordered]


def mixed_models_warning(models: Sequence[dict[str, Any]]) -> str | None:
    """One line when the slides were scored by more than one model (their means mix the models)."""
    if len(models) < 2:
        return None
    named = "; ".join(
        f"{m['model'] or 'unrecorded'}"
        + (f" (sha256 {m['sha256'][:12]})" if m["sha256"] else "")
        + f": {m['slides']} slide(s)"
        for m in models
    )
    return (
        f"the runs were scored by {len(models)} different models ({named}): the means mix them; "
        "evaluate each model's results folder on its own"
    )
