"""Measure a model's known weaknesses on scanned tissue it was not trained on; record them on its card.

Example (from the repository root)::

    python -m models.defects_check --model models/tumour-cnn.onnx [--write]

Each finding is measured here, on data the model never trained on, and says what a lab should do:

* **inflammation**: the inflamed windows of ``models.compare`` (immune nuclei dominate; MoNuSAC
  patients and CoNSeP test tiles not trained on, all non-tumour): mean P(tumour), share called;
* **defocus**: ``models.blur_check`` on the GlaS validation tiles: AUC, share called and share the
  focus check counts out of focus at 0, 1 and 1.5 um of Gaussian blur;
* **tissue folds**: healthy GlaS tiles of the held-out patients (validation and test; colon mucosa),
  each laid over another healthy tile of the same patient turned by 90 degrees, as a fold lays tissue
  over tissue: optical densities add (Beer-Lambert, :func:`models.augment.overlay_tissue`). Simulated
  on real scans (no real fold is in the shared data): share called tumour and mean P, as scanned and
  folded, and the same tiles made twice as dark without a second layer (darkness alone told from doubled
  nuclei);
* **benign squamous epithelium**: the bundled sample (benign skin, CC0) run through the pipeline:
  its label, max P and OOD score;
* **stain far from training**: ``models.stain_check`` (GlaS validation tiles re-stained to the real H&E
  references of the shared data: AUC, share called, OOD warnings; and as ``--normalize macenko`` scores
  them) and the TCGA-CR head-and-neck carcinoma section of the shared data (no mpp in the file; 1.0
  um/px assumed): its label, max P and OOD score.

A finding whose data is absent is left out (the output says so). ``--write`` stores the findings as
the card's ``known_defects`` section and re-renders ``MODEL_CARD.md``, as ``models.fp16_check`` does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.augment import fold_over_partners, overlay_tissue
from models.blur_check import blur_table
from models.card import write_markdown
from models.compare import compare
from models.evaluate import build_sets, default_index, score_sets
from models.scanned import shared_tiles_dir
from models.stain_check import STAIN_DIR, stain_table
from wsi_pipeline.inference.card import load_card, write_card
from wsi_pipeline.tiling.focus import WARN_SHARE

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "CMU-1-Small-Region.svs"
TCGA = shared_tiles_dir().parent / "slides" / "aperio" / "tcga-cr-7395-01a-01-ts1.svs"


def fold_figures(model: Path) -> dict[str, Any] | None:
    """Share called tumour and mean P of the healthy GlaS tiles of the held-out patients (validation
    and test: never trained on, and no choice is made on this figure) as scanned, folded
    (:func:`overlay_tissue` with another healthy tile of the same patient, turned 90 degrees; partners
    drawn with a fixed seed) and twice as dark (optical density doubled, one layer); ``None`` without
    GlaS tiles or when the card did not train on GlaS (its patient split is then not held out)."""
    card = load_card(model.with_suffix(".json"))
    if not (card.raw.get("data") or {}).get("glas"):
        return None
    sets = [s for s in build_sets(card.raw, None, splits=("val", "test")) if s.name.startswith("glas-")]
    if not sets:
        return None
    labels = np.concatenate([np.asarray(s.labels).astype(str) for s in sets])
    healthy = np.flatnonzero(np.char.endswith(labels, "healthy"))
    groups = np.concatenate([np.asarray(s.groups) for s in sets])[healthy]
    images = np.concatenate([s.images for s in sets])
    scanned = images[healthy]
    variants = {
        "scanned": scanned,
        "folded": fold_over_partners(scanned, groups),
        "twice_as_dark": overlay_tissue(scanned, scanned),
    }
    probs = score_sets(
        model, [replace(sets[0], images=v, tumour=np.zeros(len(v), np.int64)) for v in variants.values()]
    )
    out: dict[str, Any] = {"tiles": len(healthy), "patients": len(set(groups.tolist()))}
    for name, p in zip(variants, probs, strict=True):
        out[f"{name}_called"] = round(float((p >= card.threshold).mean()), 4)
        out[f"{name}_mean_p"] = round(float(p.mean()), 4)
    return out


def stain_figures(model: Path) -> dict[str, Any]:
    """``models.stain_check``'s table summarised: the as-scanned row, the lowest and highest AUC and
    share called over the re-stained rows, and the most patients the OOD check warned on for one."""
    rows = stain_table(model)
    scanned = next(r for r in rows if r["stain"] == "as scanned")
    others = [r for r in rows if r["stain"] not in ("as scanned", "round trip")]

    def pick(f: Any) -> dict[str, Any]:
        return {"auc": f(r["auc"] for r in others), "called": f(r["called"] for r in others)}

    warned = max(int(r.get("ood_warned", 0)) for r in others)
    return {
        "references": len(others),
        "as_scanned": scanned,
        "restained_min": pick(min),
        "restained_max": pick(max),
        "ood_warned_max": f"{warned} of {scanned.get('patients', '?')}",
        "rows": rows,
    }


def _slide_result(model: Path, slide: Path, mpp: float | None) -> dict[str, Any]:
    """Label, max P, tumour area and OOD score of ``slide`` run through the pipeline with ``model``."""
    from wsi_pipeline.pipeline import RunOptions, run_slide
    from wsi_pipeline.tiling.plan import TileOptions

    opts = RunOptions(tile=replace(TileOptions(), mpp_override=mpp), workers=2)
    with tempfile.TemporaryDirectory() as tmp:
        m = run_slide(slide, Path(tmp) / "out.tif", model=model, options=opts)
    label, ood = m["label"], m["label"].get("ood") or {}
    pos = m["model"]["positive_class"]
    return {
        "label": label["label"],
        "max_p": round(float(label["evidence"]["max_p"]), 3),
        "area_mm2": label["evidence"].get(f"{pos}_area_mm2"),
        "positive_tiles": label["evidence"].get(f"{pos}_tiles"),
        "min_area_mm2": (label.get("rule") or {}).get("min_area_mm2"),
        "ood_score": ood.get("score"),
        "ood_warning": bool(ood.get("warning")),
    }


def measure(model: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``known_defects`` section of ``model``'s card, and the findings left out (no data)."""
    card = load_card(model.with_suffix(".json"))
    thr = card.threshold
    findings: list[dict[str, Any]] = []
    missing: list[str] = []
    rows = compare([model], "val", default_index()) if default_index().exists() else []
    row = rows[0] if rows else {}
    if row.get("immune_val_tiles"):
        n, mean_p, called = row["immune_val_tiles"], row["immune_val_mean_p"], row["immune_val_called"]
        findings.append({
            "name": "inflammation",
            "finding": f"{n} held-out windows crowded with lymphocytes and other immune cells (MoNuSAC and "
            f"CoNSeP, not trained on; all non-tumour) score mean P {mean_p}; {called:.0%} are called tumour",
            "advice": "check lymphoid aggregates and inflamed regions by eye",
            "figures": {k: row[k] for k in ("immune_val_tiles", "immune_val_mean_p", "immune_val_called")},
        })  # fmt: skip
    else:
        missing.append("inflammation (MoNuSAC / CoNSeP tiles absent)")
    glas = shared_tiles_dir() / "glas-colon"
    if glas.exists() and (card.raw.get("data") or {}).get("glas"):
        table = blur_table(model, (0.0, 1.0, 1.5))
        sharp, one, worst = table
        findings.append({
            "name": "defocus",
            "finding": f"GlaS validation AUC {sharp['auc']} sharp, {one['auc']} at 1 um of Gaussian blur, "
            f"{worst['auc']} at 1.5 um; share called tumour {sharp['called']} sharp, {one['called']} at "
            f"1 um; the pipeline's focus check counts {one['out_of_focus_jpeg80']:.0%} of these tiles out of "
            f"focus at 1 um and {worst['out_of_focus_jpeg80']:.0%} at 1.5 um (stored as JPEG at quality 80) "
            f"and warns about a slide from {WARN_SHARE:.0%} of its tiles",
            "advice": "a slide with a focus warning has no negative result: re-scan it before trusting a "
            "'no tumour'",
            "figures": {"blur": table},
        })  # fmt: skip
    else:
        missing.append(f"defocus ({glas} absent)")
    folds = fold_figures(model) if glas.exists() else None
    if folds is not None:
        findings.append({
            "name": "tissue folds",
            "finding": f"{folds['tiles']} healthy colon tiles of {folds['patients']} held-out GlaS patients "
            f"(validation and test), "
            f"each folded over another (simulated: optical densities of the two layers added), are called "
            f"tumour {folds['folded_called']:.0%} of the time (mean P {folds['folded_mean_p']}) against "
            f"{folds['scanned_called']:.0%} as scanned; made twice as dark without a second layer, "
            f"{folds['twice_as_dark_called']:.0%}; the pipeline does not detect folds",
            "advice": "check tumour calls on folded (dark, doubled) tissue by eye",
            "figures": folds,
        })  # fmt: skip
    else:
        missing.append(f"tissue folds ({glas} absent, or the card has no GlaS)")
    if not SAMPLE.exists():
        missing.append(f"benign squamous epithelium ({SAMPLE} absent)")
    else:
        r = _slide_result(model, SAMPLE, None)
        findings.append({
            "name": "benign squamous epithelium",
            "finding": f"the bundled sample (benign skin) is labelled {r['label']}, with "
            f"{r['positive_tiles']} tiles ({r['area_mm2']} mm^2; the label's minimum area is "
            f"{r['min_area_mm2']} mm^2) called tumour: max P {r['max_p']}, OOD score {r['ood_score']} "
            f"({'' if r['ood_warning'] else 'not '}warned); no benign squamous epithelium was in training",
            "advice": "skin, oesophagus, cervix and other squamous epithelium: do not use",
            "figures": r,
        })  # fmt: skip
    stains = stain_figures(model) if glas.exists() and STAIN_DIR.is_dir() else None
    if stains is None:
        missing.append(f"stain far from training, re-stained GlaS ({glas} or {STAIN_DIR} absent)")
    if TCGA.exists() or stains is not None:
        r = _slide_result(model, TCGA, 1.0) if TCGA.exists() else None
        text = []
        if stains is not None:
            s0, lo, hi = stains["as_scanned"], stains["restained_min"], stains["restained_max"]
            text.append(
                f"GlaS validation tiles re-stained to {stains['references']} other labs' real H&E "
                f"references keep AUC {lo['auc']}-{hi['auc']} (as scanned {s0['auc']}) but "
                f"{lo['called']:.0%}-{hi['called']:.0%} of them are called tumour (as scanned "
                f"{s0['called']:.0%}): the threshold does not carry to another stain, and the OOD check "
                f"warns on at most {stains['ood_warned_max']} patients per stain; normalized to the "
                f"standard reference (--normalize macenko) the same tissue as scanned is called "
                f"{s0['called_normalized']:.0%} (AUC {s0['auc_normalized']})"
            )
        if r is not None:
            text.append(
                f"a very pink TCGA head-and-neck squamous carcinoma section is labelled {r['label']}: max P "
                f"{r['max_p']}, OOD score {r['ood_score']} ({'' if r['ood_warning'] else 'not '}warned)"
            )
        findings.append({
            "name": "stain far from training",
            "finding": "; ".join(text),
            "advice": "a slide stained unlike the training data can lose its tumour calls without an OOD "
            "warning: do not trust a 'no tumour' from a lab or stain the model has not been checked on, "
            "and do not use --normalize macenko with this model (trained on raw colours). The ranking "
            "mostly holds where the threshold does not, so a lab can choose its own tile threshold on "
            "annotated slides of its own (wsi-infer evaluate --sweep, then --tile-threshold; README, "
            "'Choosing an operating point')",
            "figures": {**(r or {}), **({"restained": stains} if stains else {})},
        })  # fmt: skip
    else:
        missing.append(f"stain far from training ({TCGA} absent)")
    shown = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
    section = {
        "findings": findings,
        "command": f"python -m models.defects_check --model {Path(shown).as_posix()} --write",
        "threshold": thr,
    }
    return section, missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.defects_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "tumour-cnn.onnx")
    p.add_argument("--write", action="store_true", help="store the findings as the card's known_defects")
    args = p.parse_args(argv)
    model = args.model.resolve()
    section, missing = measure(model)
    print(json.dumps(section, indent=1, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))
    for m in missing:
        print(f"left out: {m}")
    if args.write:
        card_path = model.with_suffix(".json")
        raw = dict(load_card(card_path).raw)
        raw["known_defects"] = section
        write_card(raw, card_path)
        write_markdown(raw, model.parent / "MODEL_CARD.md")
        print(f"wrote the known_defects section of {card_path} ({len(section['findings'])} findings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
