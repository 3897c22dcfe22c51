"""Whole-slide accuracy of the shipped model on benchmark slides with exact ground truth.

Composes ``--slides`` pyramidal slides (default 4, 8192 x 8192 px at 0.5 um/px) from real LC25000
lung tiles laid out inside random polygons (``testkit.benchslides``), using only the groups of
the classifier's held-out TEST split (rebuilt from the model card's split seed with
``models/split.py``), so no source picture seen in training or early stopping appears. Slide 0 has
no tumour, slide 1 an exclusion (``_2``) inside a tumour. Each slide is scored end to end with
``run_slide`` (default options, the shipped model unless ``--model``), then evaluated against its
ASAP XML with ``wsi_pipeline.evaluation.evaluate.evaluate_slide``: the area-exact Dice (predicted
cells against the annotated polygons, the headline), the cell Dice beside it (truth rounded to heatmap
cells), precision, recall, tile-level AUC, slide label; a benign slide by its false-positive area.
Prints one row per slide, the mean/sd over the slides with tumour, the benign slides apart, a pooled
tile AUC (all slides' tiles together: the benign slide has no tile AUC of its own) and the time of
each stage.

Caveat when reading the figures: the texture is a patchwork of LC25000 photographs (microscope
camera, clean centred fields), not scanner tiles; every pipeline tile straddles up to 4 source
pictures. This measures the pipeline and the model on real H&E texture with exact truth, not
transfer to real whole-slide scans.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_evaluate [--slides 4] [--size 8192] [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INDEX = REPO.parent / "shared" / "data" / "tiles" / "lc25000-lung" / "index.csv"


def heldout_groups(index: Path, card_json: Path, split: str) -> list[str]:
    """Groups of ``split`` in the model's train/val/test split (seed and fractions from its card)."""
    from models.split import read_index, split_groups
    from wsi_pipeline.inference.card import load_card

    info = (load_card(card_json).raw.get("data") or {}).get("split")
    if not info:
        raise SystemExit(f"{card_json}: the model card records no data split; cannot choose held-out groups")
    rows = read_index(index)
    parts = split_groups([r.group for r in rows], [r.label for r in rows], info["fractions"], info["seed"])
    return parts[split]


def tile_truth(tiles_csv: Path, xml: Path, positive: str) -> tuple[np.ndarray, np.ndarray]:
    """(P(positive), truth) of every scored tile: truth = tile at least half covered by tumour."""
    import csv

    from wsi_pipeline.evaluation.annotations import read_asap_xml
    from wsi_pipeline.evaluation.evaluate import box_coverage

    with tiles_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([float(r["x_l0"]) for r in rows])
    y = np.array([float(r["y_l0"]) for r in rows])
    w = np.array([float(r["width_l0"]) for r in rows])
    p = np.array([float(r[f"p_{positive}"]) for r in rows])
    cover = box_coverage(read_asap_xml(xml).tumour, np.stack([x, y, x + w, y + w], axis=1))
    return p, cover >= 0.5


def fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="LC25000 lung index.csv")
    ap.add_argument("--slides", type=int, default=4, help="number of benchmark slides (at least 2)")
    ap.add_argument("--size", type=int, default=8192, help="slide side, level-0 px")
    ap.add_argument("--mpp", type=float, default=0.5, help="level-0 um/px of the composed slides")
    ap.add_argument("--seed", type=int, default=0, help="slide i uses seed + i")
    ap.add_argument("--split", default="test", choices=["test", "val", "train"], help="source groups")
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument(
        "--threshold", type=float, default=None,
        help="P(tumour) threshold for Dice etc. (default: the run's own, the model card's)",
    )  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-evaluate")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.slides < 2:
        ap.error("--slides must be at least 2 (one benign slide, one with an exclusion)")
    if not args.index.is_file():
        print(f"skipped: {args.index} not found (the shared LC25000 tiles are needed to compose slides; "
              f"pass --index)", file=sys.stderr)  # fmt: skip
        return

    from testkit.benchslides import PhotoPool, random_spec, write_bench_slide
    from wsi_pipeline.evaluation.evaluate import SWEEP_THRESHOLDS, evaluate_slide, load_case, sweep
    from wsi_pipeline.evaluation.metrics import is_undefined, roc_auc
    from wsi_pipeline.evaluation.summary import summarize
    from wsi_pipeline.inference.card import resolve_model
    from wsi_pipeline.pipeline import RunOptions, run_slide

    card = resolve_model(args.model)
    groups = heldout_groups(args.index, Path(card.path), args.split)
    source = PhotoPool.from_index(args.index, groups=groups)
    print(
        f"model {card.name} {card.version} ({card.sha256[:12]}); source: {args.split} split of the model "
        f"card's seed, {len(groups)} groups, {len(source.benign)} benign + {len(source.tumour)} tumour tiles"
    )
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    cases: list[Any] = []
    pooled_p: list[np.ndarray] = []
    pooled_t: list[np.ndarray] = []
    t_all = time.perf_counter()
    for i in range(args.slides):
        seed = args.seed + i
        n_tumour = 0 if i == 0 else None
        spec = random_spec(
            args.size, args.size, seed=seed, n_tumour=n_tumour, with_exclusion=i == 1, mpp=args.mpp
        )
        name = f"bench-{i:02d}-s{seed}"
        t = time.perf_counter()
        slide, xml = write_bench_slide(args.work / f"{name}.svs", spec, source)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        manifest = run_slide(slide, args.work / f"{name}.tif", model=args.model, options=RunOptions(),
                             overwrite=True)  # fmt: skip
        t_run = time.perf_counter() - t
        t = time.perf_counter()
        manifest_path = Path(manifest["outputs"]["manifest"])
        res = evaluate_slide(manifest_path, xml, threshold=args.threshold)
        t_eval = time.perf_counter() - t
        p, truth = tile_truth(Path(manifest["outputs"]["tiles_csv"]), xml, card.positive_class)
        pooled_p.append(p)
        pooled_t.append(truth)
        results.append(res)
        cases.append(load_case(manifest_path, xml))
        area_um2 = spec.tumour_geometry().area * args.mpp**2 if spec.tumour else 0.0
        row = {
            "slide": slide.name,
            "tumour_regions": len(spec.tumour),
            "exclusions": len(spec.exclusion),
            "tumour_mm2": round(area_um2 / 1e6, 3),
            "tiles": int(manifest["n_tiles"]),
            "truth_tiles": int(res["tile"]["n_truth_positive"]),
            "pred_tiles": int(res["tile"]["tp"] + res["tile"]["fp"]),
            **{k: res[k] for k in ("dice", "cell_dice", "precision", "recall")},
            "cell_specificity": res["cell"]["specificity"],
            "truth": res["truth"],
            "false_positive_mm2": res["false_positive_mm2"],
            "tile_auc": res["auc"],
            "tile_dice": res["tile"]["dice"],
            "lesions": res["lesions"],
            "label_truth": res["slide_truth_positive"],
            "label_pred": res["slide_predicted_positive"],
            "label_correct": res["slide_label_correct"],
            "write_s": round(t_write, 2),
            "run_s": round(t_run, 2),
            "eval_s": round(t_eval, 2),
            "tiles_per_s": manifest["tiles_per_s"],
        }
        rows.append(row)
        print(
            f"  {row['slide']}: {row['tumour_regions']} tumour ({row['tumour_mm2']} mm^2), "
            f"{row['exclusions']} excl; {row['tiles']} tiles, truth {row['truth_tiles']} pred "
            f"{row['pred_tiles']}; Dice {fmt(row['dice'])} (cell {fmt(row['cell_dice'])}) prec "
            f"{fmt(row['precision'])} rec {fmt(row['recall'])} FP {fmt(row['false_positive_mm2'], 4)} mm^2 "
            f"cell spec {fmt(row['cell_specificity'])} tileAUC {fmt(row['tile_auc'])}; foci found "
            f"{row['lesions']['found']}/{row['lesions']['lesions']}, FP regions "
            f"{row['lesions']['false_positive_regions']}; "
            f"label {row['label_pred']} (truth {row['label_truth']}); write {row['write_s']} s, "
            f"run {row['run_s']} s, eval {row['eval_s']} s",
            flush=True,
        )
    summary = summarize(results)
    t = time.perf_counter()
    points = sweep(cases, SWEEP_THRESHOLDS)
    sweep_s = time.perf_counter() - t
    p_all, t_all_truth = np.concatenate(pooled_p), np.concatenate(pooled_t)
    pooled_auc = roc_auc(t_all_truth, p_all)
    out = {
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256},
        "source": {"index": str(args.index), "split": args.split, "groups": len(groups),
                   "benign_tiles": len(source.benign), "tumour_tiles": len(source.tumour)},
        "slides": {"n": args.slides, "size_px": args.size, "mpp": args.mpp, "seed": args.seed},
        "threshold": args.threshold if args.threshold is not None else card.threshold,
        "summary": summary,
        "pooled_tile_auc": None if is_undefined(pooled_auc) else round(pooled_auc, 4),
        "pooled_tiles": len(p_all),
        "per_slide": rows,
        "sweep": points,
        "sweep_s": round(sweep_s, 3),
        "seconds_total": round(time.perf_counter() - t_all, 1),
        "cpus": os.cpu_count(),
    }  # fmt: skip
    d, c, a, b = summary["dice"], summary["cell_dice"], summary["auc"], summary["benign"]
    les = summary["lesions"]
    print(
        f"mean Dice (area-exact) {fmt(d['mean'], 4)} (sd {fmt(d['sd'], 4)}, n {d['n']} slides with tumour); "
        f"cell Dice {fmt(c['mean'], 4)} (sd {fmt(c['sd'], 4)}); benign slides {b['n']}: "
        f"{b['called_tumour']} called tumour, FP area max {fmt(b['false_positive_mm2']['max'], 4)} mm^2; "
        f"tile AUC mean {fmt(a['mean'], 4)} (sd {fmt(a['sd'], 4)}, n {a['n']}), pooled "
        f"{fmt(out['pooled_tile_auc'], 4)} over {out['pooled_tiles']} tiles; tumour foci found "
        f"{les['found']} of {les['n']}, false-positive regions {les['false_positive_regions_per_slide']} per "
        f"slide; --sweep ({len(SWEEP_THRESHOLDS)} thresholds, {len(cases)} slides) {sweep_s:.2f} s; "
        f"slide labels "
        f"{summary['slide_label_accuracy']}; total {out['seconds_total']} s"
    )
    (args.work / "bench_evaluate.json").write_text(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
