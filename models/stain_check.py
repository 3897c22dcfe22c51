"""How a model's tile scores move when the same tissue is stained as other labs stain it: GlaS
validation tiles re-stained (Macenko) to real H&E reference images, scored again.

Example (from the repository root)::

    python -m models.stain_check --model models/tumour-cnn.onnx [--json out.json]

The references are the real H&E images of the shared data (``../shared/data/stain``: the tiles that
tiatoolbox, torchstain and HistoQC ship as stain-normalisation targets and test sources; other labs,
other scanners). Each GlaS validation patient's tiles are re-stained from their own stain (one Macenko
fit per patient on its pooled tissue pixels, as the pipeline fits one per slide) to the reference's
stain vectors and concentration range: the tissue stays, the colours are another lab's. Rows:

* ``as scanned``: the tiles unchanged;
* ``round trip``: re-stained to their own fit (what Macenko's reconstruction alone changes);
* one row per reference image;
* with ``--decompose``, per reference also ``<name>: hue only`` (its stain vectors with each patient's
  own maximum concentrations) and ``<name>: amounts only`` (its maximum concentrations, that is the
  H:E balance and depth, with each patient's own vectors): which of the two moves the scores.

A model whose card asks for Macenko normalization is scored as the pipeline would score it: each row's
tiles normalized per patient first, to the card's own reference stain (``preprocessing.stain_reference``)
or, without one, to the standard reference (a model trained with ``models.train --stain macenko``).

Per row: AUC (the card's GlaS label rule, adenomas as negatives), the share of tiles called tumour at
the card's threshold, the tumour tiles' mean P, and the OOD score a slide of each patient would get
(median tile distance / d_ref, as the pipeline scores a slide): the highest over the patients and how
many of them would be warned. Then the same tiles as ``wsi-infer --normalize macenko`` would score
them (each patient normalized to the pipeline's standard reference): ``auc_normalized``,
``called_normalized`` (left out for a card with its own reference). This is the measurement behind
the card's "stain far from training". The JSON's ``summary`` gives the lowest AUC over the reference
images (``auc_min``) and the largest distance of their share called from ``--baseline-called``
(default: this model's as-scanned share; ``called_max_shift``): the figures ``models.rule`` judges as
``stain_auc_min`` and ``stain_called_max_shift``.

``--make-candidate DIR`` writes DIR/<model file> (a copy) and its card asking for every slide to be
normalized to the model's training stain: one Macenko fit (``fit_slide``, defaults) on the tiles of the
GlaS training patients.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluate import EvalSet, build_sets, make_session, predict
from models.scanned import shared_tiles_dir
from wsi_pipeline.evaluation.metrics import roc_auc
from wsi_pipeline.inference.card import load_card
from wsi_pipeline.stain.macenko import REFERENCE, StainModel, apply_macenko, fit_slide, reference_from_image

STAIN_DIR = shared_tiles_dir().parent / "stain"


PARTS = ("both", "hue", "amounts")
"""What of a reference's stain :func:`restain` gives: all of it; its stain vectors only (each group
keeps its own maximum concentrations); its maximum concentrations only (each group keeps its vectors)."""


def restain(tiles: EvalSet, reference: StainModel | None, part: str = "both") -> EvalSet:
    """``tiles`` with each group's tiles (a patient, a source tile: one slide's worth) re-stained from
    the group's own Macenko fit to ``reference`` (``None``: to its own fit, a round trip), as the
    pipeline normalizes a slide; ``part`` (:data:`PARTS`) takes only the reference's hue or amounts."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    images = tiles.images.copy()
    groups = np.asarray(tiles.groups)
    for g in sorted(set(tiles.groups)):
        idx = np.flatnonzero(groups == g)
        own = fit_slide([tiles.images[idx]])
        target = reference or own
        if part == "hue":
            target = StainModel(target.stain_matrix, own.max_concentrations)
        elif part == "amounts":
            target = StainModel(own.stain_matrix, target.max_concentrations)
        images[idx] = apply_macenko(tiles.images[idx], own, target)
    return dataclasses.replace(tiles, images=images)


def training_stain() -> StainModel:
    """The stain of the GlaS training patients' tiles (the card's label rule; one ``fit_slide``)."""
    from models.scanned import GLAS_SPLIT, LabelRule, glas_tiles, load_glas

    tiles = glas_tiles(load_glas(None, GLAS_SPLIT["train"]), LabelRule())[0]
    return fit_slide([tiles])


def card_reference(card: dict[str, Any]) -> StainModel | None:
    """The reference stain a card asks every slide to be normalized to, if it names one."""
    ref = (card.get("preprocessing") or {}).get("stain_reference")
    return StainModel.from_dict(ref) if ref else None


def scoring_reference(card: dict[str, Any]) -> StainModel | None:
    """The stain the pipeline normalizes every slide to for this card: its own reference, the standard
    :data:`REFERENCE` for a card that asks for Macenko without one (``models.train --stain macenko``),
    ``None`` for a model of raw colours."""
    own = card_reference(card)
    if own is None and (card.get("preprocessing") or {}).get("stain_normalization") == "macenko":
        return REFERENCE
    return own


def references(folder: Path = STAIN_DIR) -> dict[str, StainModel]:
    """The stain model of every reference image in ``folder`` (``*.png``), by file name."""
    return {p.name: reference_from_image(p) for p in sorted(folder.glob("*.png"))}


def stain_row(
    name: str,
    tiles: EvalSet,
    session: Any,
    ood: dict[str, Any] | None,
    threshold: float,
    own_reference: StainModel | None = None,
) -> dict[str, Any]:
    """AUC, share called, tumour mean P and per-patient OOD slide scores of ``tiles`` (first normalized
    per patient to ``own_reference``, the card's, when given: as the pipeline would score them)."""
    if own_reference is not None:
        tiles = restain(tiles, own_reference)
    outputs = ["probabilities", *([ood["output"]] if ood else [])]
    parts = [
        session.run(outputs, {"tiles": np.ascontiguousarray(tiles.images[i : i + 64])})
        for i in range(0, len(tiles.images), 64)
    ]  # one pass for the probabilities and the OOD distances
    p = np.concatenate([b[0] for b in parts])[:, 1]
    tumour = tiles.tumour.astype(bool)
    row: dict[str, Any] = {
        "stain": name,
        "tiles": len(p),
        "auc": round(float(roc_auc(tiles.tumour, p)), 4),
        "called": round(float((p >= threshold).mean()), 4),
        "tumour_mean_p": round(float(p[tumour].mean()), 4),
    }
    if own_reference is None:
        q = predict(session, restain(tiles, REFERENCE).images)[:, 1]  # as --normalize macenko scores them
        row["auc_normalized"] = round(float(roc_auc(tiles.tumour, q)), 4)
        row["called_normalized"] = round(float((q >= threshold).mean()), 4)
    if ood:
        d = np.concatenate([b[1] for b in parts]).astype(np.float64).reshape(-1)
        groups = np.asarray(tiles.groups)
        scores = [float(np.median(d[groups == g]) / float(ood["d_ref"])) for g in sorted(set(tiles.groups))]
        row["ood_max"] = round(max(scores), 3)
        row["ood_warned"] = sum(s > float(ood["warn_above"]) for s in scores)
        row["patients"] = len(scores)
    return row


def stain_table(model: Path, folder: Path = STAIN_DIR, decompose: bool = False) -> list[dict[str, Any]]:
    """One row per stain (as scanned, round trip, each reference image) on GlaS validation; with
    ``decompose`` also each reference's hue alone and amounts alone (rows ``"<name>: hue only"`` and
    ``"<name>: amounts only"``, with ``part``; left out of :func:`summary`)."""
    card = load_card(model.with_suffix(".json"))
    as_scanned = {"stain_normalization": "none"}  # build the tiles as scanned; normalized below if asked
    raw = {**card.raw, "preprocessing": {**(card.raw.get("preprocessing") or {}), **as_scanned}}
    sets = [s for s in build_sets(raw, None, splits=("val",)) if s.name == "glas-val"]
    if not sets:
        raise SystemExit(
            f"{shared_tiles_dir() / 'glas-colon'}: GlaS tiles not found (or the card has no GlaS)"
        )
    if not folder.is_dir():
        raise SystemExit(f"{folder}: stain reference images not found (the shared data's stain/ folder)")
    (glas,) = sets
    session = make_session(model)
    ood = card.raw.get("ood")
    variants: dict[str, EvalSet] = {"as scanned": glas, "round trip": restain(glas, None)}
    parts = {"hue": "hue only", "amounts": "amounts only"} if decompose else {}
    part_of: dict[str, str] = {}
    for name, ref in references(folder).items():
        variants[name] = restain(glas, ref)
        for part, label in parts.items():
            variants[f"{name}: {label}"] = restain(glas, ref, part)
            part_of[f"{name}: {label}"] = part
    own = scoring_reference(card.raw)
    rows = [stain_row(name, tiles, session, ood, card.threshold, own) for name, tiles in variants.items()]
    return [{**row, "part": part_of[row["stain"]]} if row["stain"] in part_of else row for row in rows]


def summary(rows: list[dict[str, Any]], baseline_called: float | None = None) -> dict[str, Any]:
    """Over the reference images' rows: the lowest AUC and the largest distance of the share called
    from ``baseline_called`` (default: the as-scanned row's)."""
    base = next(r["called"] for r in rows if r["stain"] == "as scanned")
    base = base if baseline_called is None else baseline_called
    refs = [r for r in rows if r["stain"] not in ("as scanned", "round trip") and "part" not in r]
    return {
        "references": len(refs),
        "baseline_called": base,
        "auc_min": min(r["auc"] for r in refs),
        "called_max_shift": round(max(abs(r["called"] - base) for r in refs), 4),
    }


def make_candidate(model: Path, out_dir: Path) -> Path:
    """Copy ``model`` into ``out_dir`` with a card asking for every slide to be normalized to the
    model's training stain (:func:`training_stain`); returns the copy's path."""
    import shutil

    from wsi_pipeline.inference.card import write_card

    card = dict(load_card(model.with_suffix(".json")).raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx = out_dir / model.name
    shutil.copyfile(model, onnx)
    card["preprocessing"] = {
        **(card.get("preprocessing") or {}),
        "stain_normalization": "macenko",
        "stain_reference": training_stain().to_dict(),
        "stain_note": "every slide Macenko-normalized (one fit per slide) to the stain of the GlaS training "
        "patients' tiles (models.stain_check.training_stain), the stain its threshold was chosen on",
    }
    write_card(card, onnx.with_suffix(".json"))
    return onnx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.stain_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tumour-cnn.onnx"))
    p.add_argument("--stains", type=Path, default=STAIN_DIR, help="folder of H&E reference images (*.png)")
    p.add_argument("--json", type=Path, help="also write the rows and their summary here")
    p.add_argument("--baseline-called", type=float, help="share called that the summary's shift is from")
    p.add_argument(
        "--decompose", action="store_true",
        help="also each reference's hue alone (its stain vectors, each patient's own amounts) and amounts "
        "alone (its maximum concentrations, each patient's own vectors)",
    )  # fmt: skip
    p.add_argument("--make-candidate", type=Path, metavar="DIR", help="write the training-stain candidate")
    args = p.parse_args(argv)
    if args.make_candidate:
        print(f"wrote {make_candidate(args.model, args.make_candidate)} and its card")
        return 0
    rows = stain_table(args.model, args.stains, args.decompose)
    cols = ["stain", "tiles", "auc", "called", "tumour_mean_p", "ood_max", "ood_warned", "auc_normalized"]
    cols += ["called_normalized"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        shown = {**r, "ood_warned": f"{r['ood_warned']} of {r['patients']}"} if "patients" in r else r
        print("| " + " | ".join(str(shown.get(c, "")) for c in cols) + " |")
    summ = summary(rows, args.baseline_called)
    print(f"summary: {summ}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows, "summary": summ}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
