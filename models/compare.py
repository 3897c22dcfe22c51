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
pictures called tumour. ``fold_val_called`` and ``fold_val_mean_p``: the healthy GlaS tiles of
``--split``, each with another healthy tile of its patient folded over it (simulated: the optical
densities of the two layers add), called tumour at the model's threshold: all non-tumour.
``consep_all_auc``: the same CoNSeP measure on all 41 source tiles (the official train and test
tiles: 3x the tissue of ``consep_val_auc``), for a model whose recipe never drew from CoNSeP (no
``--consep``, no ``--immune-fraction``, whose inflamed windows include CoNSeP's train tiles); None
for one that did (``consep_all_note`` says why).

With ``--paired`` the first model is the reference: for every other model each headline figure's
difference (model - reference) gets a 95 % paired bootstrap interval that resamples whole groups
(patients, source tiles) of each set, scoring both models on the same draw. Validation sets are
small (4 GlaS patients, 14 CoNSeP source tiles (41 for ``consep_all_auc``), 11 inflamed windows),
so a margin that a decision rule turns on can sit well inside that interval: read it before trusting
a 0.01.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from models.augment import fold_over_partners
from models.evaluate import EvalSet, build_sets, default_index, group_resamples, score_sets
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
from models.stain_check import card_reference, restain, scoring_reference
from wsi_pipeline.errors import WsiError
from wsi_pipeline.evaluation.metrics import classification_metrics, roc_auc
from wsi_pipeline.inference.card import load_card

Sets = tuple[EvalSet, EvalSet, EvalSet | None, EvalSet | None, EvalSet | None, EvalSet | None]


def drew_from_consep(card: dict[str, Any]) -> bool:
    """Whether a model's training recipe used any CoNSeP tile: its CoNSeP windows (``--consep``) or
    its inflamed windows (``--immune-fraction``: MoNuSAC's and CoNSeP's train tiles)."""
    recipe = (card.get("training") or {}).get("recipe") or {}
    return bool(recipe.get("consep") or recipe.get("immune_fraction"))


def _sets(ref_card: dict[str, Any], split: str, index: Path, stain: str) -> Sets:
    card = {
        "data": {"split": ref_card["data"]["split"], "glas": {"label_rule": {"adenoma": "negative"}}},
        "preprocessing": {"stain_normalization": stain},
    }
    sets = {s.name: s for s in build_sets(card, index, splits=(split,))}
    consep = consep_all = None
    if split == "val" and (shared_tiles_dir() / "consep-patches").exists():  # CoNSeP's official test tiles
        test = load_consep(None, "test", stain=stain)
        imgs, lab, _, groups = glas_tiles(test, LabelRule())
        consep = EvalSet("consep-val", imgs, lab, ("consep",) * len(lab), tuple(groups))
        imgs, lab, _, groups = glas_tiles(load_consep(None, "train", stain=stain) + test, LabelRule())
        consep_all = EvalSet("consep-all", imgs, lab, ("consep",) * len(lab), tuple(groups))
    lung = None
    if split == "val" and (shared_tiles_dir() / "monusac-lung").exists():
        imgs, lab, _, groups = glas_tiles(load_monusac(None, MONUSAC_SPLIT["val"], stain=stain), LabelRule())
        lung = EvalSet("lung-val", imgs, lab, ("monusac",) * len(lab), tuple(groups))
    immune = None
    if split == "val" and (shared_tiles_dir() / "monusac-lung").exists():
        imgs, groups = immune_tiles(load_immune(None, IMMUNE_VAL_MONUSAC, "test", stain=stain))
        zeros = np.zeros(len(groups), np.int64)
        immune = EvalSet("immune-val", imgs, zeros, ("immune",) * len(groups), tuple(groups))
    return sets[split], sets[f"glas-{split}"], consep, lung, immune, consep_all


def _score(model: Path, sets: Sets) -> tuple[npt.NDArray[np.floating], ...]:
    """P(tumour) of each set (an empty array for a set that is absent)."""
    probs = iter(score_sets(model, [s for s in sets if s is not None]))
    return tuple(next(probs) if s is not None else np.empty(0) for s in sets)


Stat = Callable[[npt.NDArray[np.int64], npt.NDArray[np.floating], float], float]

PAIRED: dict[str, tuple[int, Stat, bool]] = {
    # figure: (index into Sets, statistic on (tumour, p, threshold), adenomas left out of GlaS)
    "lc25000_auc": (0, lambda t, p, thr: roc_auc(t, p), False),
    "glas_auc_adenoma_negative": (1, lambda t, p, thr: roc_auc(t, p), False),
    "glas_auc_without_adenoma": (1, lambda t, p, thr: roc_auc(t, p), True),
    "consep_val_auc": (2, lambda t, p, thr: roc_auc(t, p), False),
    "lung_val_called": (3, lambda t, p, thr: float((p >= thr).mean()), False),
    "immune_val_mean_p": (4, lambda t, p, thr: float(p.mean()), False),
    "immune_val_called": (4, lambda t, p, thr: float((p >= thr).mean()), False),
    "consep_all_auc": (5, lambda t, p, thr: roc_auc(t, p), False),
}
"""The figures ``--paired`` puts an interval on; each model is judged at its own card threshold."""


def paired_difference(
    s: EvalSet,
    ref: tuple[npt.NDArray[np.floating], float],
    cand: tuple[npt.NDArray[np.floating], float],
    stat: Stat,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """``stat(candidate) - stat(reference)`` on set ``s`` with a 95 % percentile interval from resampling
    whole groups of ``s`` (both models on the same draw); ``ref`` and ``cand`` are (P(tumour) per tile,
    threshold). Draws where the statistic is undefined (one class only) are dropped."""
    (p_ref, t_ref), (p_cand, t_cand) = ref, cand
    draws = []
    for idx in group_resamples(s.groups, n_boot, seed):
        d = stat(s.tumour[idx], p_cand[idx], t_cand) - stat(s.tumour[idx], p_ref[idx], t_ref)
        if not math.isnan(d):
            draws.append(d)
    diff = stat(s.tumour, p_cand, t_cand) - stat(s.tumour, p_ref, t_ref)
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (math.nan, math.nan)
    return {
        "diff": round(float(diff), 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "groups": len(set(s.groups)),
        "tiles": len(s.tumour),
    }


def _paired(
    sets: Sets, ref: tuple[tuple[npt.NDArray[np.floating], ...], float],
    cand: tuple[tuple[npt.NDArray[np.floating], ...], float], n_boot: int, skip: frozenset[str] = frozenset(),
) -> dict[str, Any]:  # fmt: skip
    """Every ``PAIRED`` figure of one candidate against the reference (absent sets and ``skip`` left out)."""
    out = {}
    for name, (i, stat, drop_adenoma) in PAIRED.items():
        s = sets[i]
        if s is None or name in skip:
            continue
        p_ref, p_cand = ref[0][i], cand[0][i]
        if drop_adenoma:
            keep = ~np.char.endswith(np.asarray(s.labels).astype(str), "adenomatous")
            s = EvalSet(s.name, s.images[keep], s.tumour[keep], tuple(np.asarray(s.labels)[keep]),
                        tuple(np.asarray(s.groups)[keep]))  # fmt: skip
            p_ref, p_cand = p_ref[keep], p_cand[keep]
        out[name] = paired_difference(s, (p_ref, ref[1]), (p_cand, cand[1]), stat, n_boot)
    return out


def _as_scanned(stain: str) -> str:
    """The tiles a stain key's sets were made from: a Macenko card's are the tiles as scanned, each
    group normalized afterwards (the same tiles, labels and groups: such rows pair with raw ones)."""
    return "none" if stain.startswith("macenko to ") else stain


def _folded(glas: EvalSet) -> EvalSet | None:
    """The healthy GlaS tiles, each with another healthy tile of its patient folded over it (None
    when the split has no healthy tiles)."""
    healthy = np.char.endswith(np.asarray(glas.labels).astype(str), "healthy")
    if not healthy.any():
        return None
    groups = np.asarray(glas.groups)[healthy]
    images = fold_over_partners(glas.images[healthy], groups)
    return EvalSet(
        "glas-folded", images, glas.tumour[healthy], tuple(np.asarray(glas.labels)[healthy]), tuple(groups)
    )


def compare(
    models: list[Path], split: str, index: Path, paired: bool = False, n_boot: int = 2000
) -> list[dict[str, Any]]:
    """One row of figures per model (see the module docstring); each model sees its own input (for a
    card that asks for Macenko, the tiles as scanned with each group normalized to its reference stain
    or the standard one, as the pipeline normalizes a slide). With ``paired`` every row after the first
    also has ``paired``: each ``PAIRED`` figure's difference from the first model with its interval."""
    cards = [load_card(m.with_suffix(".json")).raw for m in models]
    cache: dict[str, Sets] = {}
    folded: dict[str, EvalSet | None] = {}  # per stain, made once for every model
    rows = []
    scored: list[tuple[str, tuple[npt.NDArray[np.floating], ...], float]] = []
    for model, card in zip(models, cards, strict=True):
        stain = (card.get("preprocessing") or {}).get("stain_normalization", "none")
        if (own := scoring_reference(card)) is not None:  # the tiles as scanned, each group normalized
            whose = "the card's reference" if card_reference(card) is not None else "the standard reference"
            stain = f"macenko to {whose} " + json.dumps(own.to_dict(), sort_keys=True)
            if "none" not in cache:
                cache["none"] = _sets(cards[0], split, index, "none")
            cache[stain] = cast(Sets, tuple(None if s is None else restain(s, own) for s in cache["none"]))
            raw_folds = _folded(cache["none"][1])  # folded as scanned, then the slide normalized
            folded[stain] = None if raw_folds is None else restain(raw_folds, own)
        if stain not in cache:
            cache[stain] = _sets(cards[0], split, index, stain)
            folded[stain] = _folded(cache[stain][1])
        lc, glas, consep, lung, immune, consep_all = cache[stain]
        grades = np.asarray(glas.labels)
        adenoma = np.char.endswith(grades.astype(str), "adenomatous")
        thr = float((card.get("threshold") or {}).get("value", 0.5))
        probs = _score(model, cache[stain])
        p_lc, p_glas, p_consep, p_lung, p_immune, p_consep_all = probs
        all_ok = consep_all is not None and not drew_from_consep(card)
        fold_set = folded[stain]
        (p_fold,) = score_sets(model, [fold_set]) if fold_set is not None else (np.empty(0),)
        scored.append((stain, probs, thr))
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
                "consep_all_auc": round(roc_auc(consep_all.tumour, p_consep_all), 4) if all_ok else None,
                "consep_all_tiles": len(p_consep_all) if all_ok else None,
                "consep_all_note": (
                    "trained on CoNSeP's train tiles (--consep or --immune-fraction): not a validation set"
                    if consep_all is not None and not all_ok
                    else None
                ),
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
                "fold_val_called": round(float((p_fold >= thr).mean()), 4) if p_fold.size else None,
                "fold_val_mean_p": round(float(p_fold.mean()), 3) if p_fold.size else None,
                "fold_val_tiles": len(p_fold),
            }
        )
    if paired and len(models) > 1:
        ref_stain, ref_probs, ref_thr = scored[0]
        for row, card, (stain, probs, thr) in zip(rows[1:], cards[1:], scored[1:], strict=True):
            if _as_scanned(stain) != _as_scanned(ref_stain):  # other input tiles: no pairing
                row["paired"] = None
                continue
            row["paired_against"] = str(models[0])
            drew = drew_from_consep(cards[0]) or drew_from_consep(card)
            skip = frozenset({"consep_all_auc"} if drew else ())
            row["paired"] = _paired(cache[stain], (ref_probs, ref_thr), (probs, thr), n_boot, skip)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.compare", description=__doc__.split("\n")[0])
    p.add_argument("models", type=Path, nargs="+", help="ONNX models with their cards")
    p.add_argument("--split", choices=["val", "test"], default="val")
    p.add_argument("--index", type=Path, default=None)
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--paired", action="store_true",
        help="the first model is the reference: paired group-bootstrap 95%% intervals of each other "
        "model's differences from it",
    )  # fmt: skip
    args = p.parse_args(argv)
    try:
        rows = compare(args.models, args.split, args.index or default_index(), paired=args.paired)
    except WsiError as e:  # a model without its card, a card that does not match: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "paired"}))
    for r in rows[1:] if args.paired else []:
        print(f"\n{r['model']} - {rows[0]['model']} (paired, 95 % interval over resampled groups):")
        print("| figure | difference | 95 % interval | groups | tiles |\n| --- | --- | --- | --- | --- |")
        for name, d in (r.get("paired") or {}).items():
            print(f"| {name} | {d['diff']:+.4f} | {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f} | "
                  f"{d['groups']} | {d['tiles']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
