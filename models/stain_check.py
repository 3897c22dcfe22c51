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
* one row per reference image.

Per row: AUC (the card's GlaS label rule, adenomas as negatives), the share of tiles called tumour at
the card's threshold, the tumour tiles' mean P, and the OOD score a slide of each patient would get
(median tile distance / d_ref, as the pipeline scores a slide): the highest over the patients and how
many of them would be warned. Then the same tiles as ``wsi-infer --normalize macenko`` would score
them (each patient normalized to the pipeline's standard reference): ``auc_normalized``,
``called_normalized``. This is the measurement behind the card's "stain far from training".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluate import EvalSet, build_sets, make_session, predict
from models.ood_check import session_distances
from models.scanned import shared_tiles_dir
from wsi_pipeline.evaluation.metrics import roc_auc
from wsi_pipeline.inference.card import load_card
from wsi_pipeline.stain.macenko import REFERENCE, StainModel, apply_macenko, fit_slide, reference_from_image

STAIN_DIR = shared_tiles_dir().parent / "stain"


def restain(glas: EvalSet, reference: StainModel | None) -> EvalSet:
    """``glas`` with each patient's tiles re-stained from the patient's own Macenko fit to
    ``reference`` (``None``: to the patient's own fit, a round trip)."""
    images = glas.images.copy()
    groups = np.asarray(glas.groups)
    for g in sorted(set(glas.groups)):
        idx = np.flatnonzero(groups == g)
        own = fit_slide([glas.images[idx]])
        images[idx] = apply_macenko(glas.images[idx], own, reference or own)
    return dataclasses.replace(glas, images=images)


def references(folder: Path = STAIN_DIR) -> dict[str, StainModel]:
    """The stain model of every reference image in ``folder`` (``*.png``), by file name."""
    return {p.name: reference_from_image(p) for p in sorted(folder.glob("*.png"))}


def stain_row(
    name: str, tiles: EvalSet, session: Any, ood: dict[str, Any] | None, threshold: float
) -> dict[str, Any]:
    """AUC, share called, tumour mean P and per-patient OOD slide scores of ``tiles``."""
    p = predict(session, tiles.images)[:, 1]
    tumour = tiles.tumour.astype(bool)
    row: dict[str, Any] = {
        "stain": name,
        "tiles": len(p),
        "auc": round(float(roc_auc(tiles.tumour, p)), 4),
        "called": round(float((p >= threshold).mean()), 4),
        "tumour_mean_p": round(float(p[tumour].mean()), 4),
    }
    q = predict(session, restain(tiles, REFERENCE).images)[:, 1]  # as --normalize macenko scores them
    row["auc_normalized"] = round(float(roc_auc(tiles.tumour, q)), 4)
    row["called_normalized"] = round(float((q >= threshold).mean()), 4)
    if ood:
        d = session_distances(session, ood["output"], tiles.images)
        groups = np.asarray(tiles.groups)
        scores = [float(np.median(d[groups == g]) / float(ood["d_ref"])) for g in sorted(set(tiles.groups))]
        row["ood_max"] = round(max(scores), 3)
        row["ood_warned"] = sum(s > float(ood["warn_above"]) for s in scores)
        row["patients"] = len(scores)
    return row


def stain_table(model: Path, folder: Path = STAIN_DIR) -> list[dict[str, Any]]:
    """One row per stain (as scanned, round trip, each reference image) on GlaS validation."""
    card = load_card(model.with_suffix(".json"))
    sets = [s for s in build_sets(card.raw, None, splits=("val",)) if s.name == "glas-val"]
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
    variants.update({name: restain(glas, ref) for name, ref in references(folder).items()})
    return [stain_row(name, tiles, session, ood, card.threshold) for name, tiles in variants.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.stain_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tumour-cnn.onnx"))
    p.add_argument("--stains", type=Path, default=STAIN_DIR, help="folder of H&E reference images (*.png)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    rows = stain_table(args.model, args.stains)
    cols = ["stain", "tiles", "auc", "called", "tumour_mean_p", "ood_max", "ood_warned", "auc_normalized"]
    cols += ["called_normalized"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        shown = {**r, "ood_warned": f"{r['ood_warned']} of {r['patients']}"} if "patients" in r else r
        print("| " + " | ".join(str(shown.get(c, "")) for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
