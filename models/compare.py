"""Compare candidate models on the same tiles: the measurement behind a training choice.

Example (from the repository root)::

    python -m models.compare --split val models/runs/A/tumour-cnn.onnx models/runs/B/tumour-cnn.onnx

Every model is scored on one set of tiles: the LC25000 split and the GlaS patients of ``--split``
(adenomas kept, labelled by the default rule), so choices are compared on equal terms. Reported per
model: AUC on LC25000, AUC of GlaS malignant tumour glands against healthy tissue and tumour stroma
(adenomas left out), the same with adenomas as negatives, mean P(tumour) per GlaS class, and
sensitivity/specificity at each model's own card threshold. Choose on ``val``; ``test`` is for the
record once the choice is made. With ``--split val`` the official CoNSeP test tiles (never trained on)
are scored too (``consep_val_auc``: epithelium-rich vs stroma/inflammation windows), and so are the
epithelium-rich windows of the validation MoNuSAC lung patients (scanned lung adenocarcinoma, all weak
tumour labels: ``lung_val_called`` is the share called tumour at the model's threshold, a sensitivity).
``immune_val_mean_p`` and ``immune_val_called`` are the mean P(tumour) and the share called tumour of
the inflamed windows (immune nuclei dominate) of MoNuSAC patients not trained on and of CoNSeP's
official test tiles: all non-tumour. ``lc25000_benign_called`` is the share of benign LC25000 lung
pictures called tumour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.evaluate import EvalSet, build_sets, default_index, score_sets
from models.scanned import (
    IMMUNE_VAL_MONUSAC,
    MONUSAC_SPLIT,
    LabelRule,
    glas_tiles,
    immune_tiles,
    load_consep,
    load_immune,
    load_monusac,
    shared_tiles_dir,
)
from wsi_pipeline.evaluation.metrics import classification_metrics, roc_auc
from wsi_pipeline.inference.card import load_card

Sets = tuple[EvalSet, EvalSet, EvalSet | None, EvalSet | None, EvalSet | None]


def _sets(ref_card: dict[str, Any], split: str, index: Path, stain: str) -> Sets:
    card = {
        "data": {"split": ref_card["data"]["split"], "glas": {"label_rule": {"adenoma": "negative"}}},
        "preprocessing": {"stain_normalization": stain},
    }
    sets = {s.name: s for s in build_sets(card, index, splits=(split,))}
    consep = None
    if split == "val" and (shared_tiles_dir() / "consep-patches").exists():  # CoNSeP's official test tiles
        imgs, lab, _, groups = glas_tiles(load_consep(None, "test", stain=stain), LabelRule())
        consep = EvalSet("consep-val", imgs, lab, ("consep",) * len(lab), tuple(groups))
    lung = None
    if split == "val" and (shared_tiles_dir() / "monusac-lung").exists():
        imgs, lab, _, groups = glas_tiles(load_monusac(None, MONUSAC_SPLIT["val"], stain=stain), LabelRule())
        lung = EvalSet("lung-val", imgs, lab, ("monusac",) * len(lab), tuple(groups))
    immune = None
    if split == "val" and (shared_tiles_dir() / "monusac-lung").exists():
        imgs, groups = immune_tiles(load_immune(None, IMMUNE_VAL_MONUSAC, "test", stain=stain))
        zeros = np.zeros(len(groups), np.int64)
        immune = EvalSet("immune-val", imgs, zeros, ("immune",) * len(groups), tuple(groups))
    return sets[split], sets[f"glas-{split}"], consep, lung, immune


def _score(model: Path, sets: Sets) -> tuple[npt.NDArray[np.floating], ...]:
    """P(tumour) of each set (an empty array for a set that is absent)."""
    probs = iter(score_sets(model, [s for s in sets if s is not None]))
    return tuple(next(probs) if s is not None else np.empty(0) for s in sets)


def compare(models: list[Path], split: str, index: Path) -> list[dict[str, Any]]:
    """One row of figures per model (see the module docstring); each model sees its own input
    (Macenko-normalized when its card says so)."""
    cards = [load_card(m.with_suffix(".json")).raw for m in models]
    cache: dict[str, Sets] = {}
    rows = []
    for model, card in zip(models, cards, strict=True):
        stain = (card.get("preprocessing") or {}).get("stain_normalization", "none")
        if stain not in cache:
            cache[stain] = _sets(cards[0], split, index, stain)
        lc, glas, consep, lung, immune = cache[stain]
        grades = np.asarray(glas.labels)
        adenoma = np.char.endswith(grades.astype(str), "adenomatous")
        thr = float((card.get("threshold") or {}).get("value", 0.5))
        p_lc, p_glas, p_consep, p_lung, p_immune = _score(model, cache[stain])
        benign = np.asarray(lc.labels) == "lung_n"
        g = classification_metrics(glas.tumour, p_glas, thr)
        stroma = (glas.tumour == 0) & np.char.startswith(grades.astype(str), "malignant")
        rows.append(
            {
                "model": str(model),
                "stain": stain,
                "threshold": thr,
                "lc25000_auc": round(roc_auc(lc.tumour, p_lc), 4),
                "lc25000_benign_called": round(float((p_lc[benign] >= thr).mean()), 4),
                "consep_val_auc": round(roc_auc(consep.tumour, p_consep), 4) if consep else None,
                "lung_val_called": round(float((p_lung >= thr).mean()), 4) if lung else None,
                "lung_val_mean_p": round(float(p_lung.mean()), 3) if lung else None,
                "lung_val_tiles": len(p_lung) if lung else None,
                "immune_val_mean_p": round(float(p_immune.mean()), 3) if immune else None,
                "immune_val_called": round(float((p_immune >= thr).mean()), 4) if immune else None,
                "immune_val_tiles": len(p_immune) if immune else None,
                "glas_auc_without_adenoma": round(roc_auc(glas.tumour[~adenoma], p_glas[~adenoma]), 4),
                "glas_auc_adenoma_negative": round(roc_auc(glas.tumour, p_glas), 4),
                "glas_sensitivity": round(g["recall"], 4),
                "glas_specificity": round(g["specificity"], 4),
                "glas_mean_p": {
                    str(k): round(float(p_glas[grades == k].mean()), 3) for k in sorted(set(glas.labels))
                },
                "glas_stroma_mean_p": round(float(p_glas[stroma].mean()), 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.compare", description=__doc__.split("\n")[0])
    p.add_argument("models", type=Path, nargs="+", help="ONNX models with their cards")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--index", type=Path, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    rows = compare(args.models, args.split, args.index or default_index())
    for r in rows:
        print(json.dumps(r))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
