"""Whole-slide sanity on every real slide in ../shared/data/slides: label, tumour area, max P, OOD score,
share of tiles out of focus (none of these real scans should be warned about its focus).

Runs the full pipeline (``run_slide``) with the shipped model and, for comparison, the LC25000-only
baseline (``models/baselines/``), in the same process. Slides without mpp metadata get a stated
override (``MPP_ASSUMED``); slides the pipeline refuses (fluorescence, broken files) are listed with
their error. Outputs (heatmaps, overlays) go to ``--out`` so the overlays can be looked at.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_slides [--out /tmp/wsi-bench-slides] [--json slides.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import WsiError
from wsi_pipeline.pipeline import RunOptions, run_slide
from wsi_pipeline.tiling.plan import TileOptions

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"
MODELS = {
    "shipped": ROOT / "models" / "tumour-cnn.onnx",
    "baseline-lc25000": ROOT / "models" / "baselines" / "tumour-cnn-lc25000-0.1.0.onnx",
}
MPP_ASSUMED = {
    # No mpp in the file. Lymphocytes (~7 um) are ~7 px and tumour nuclei 10-12 px across at level 0,
    # so about 1.0 um/px (a 10x-equivalent crop); the pipeline upsamples it 2x to 0.5 um/px.
    "tcga-cr-7395-01a-01-ts1.svs": 1.0,
    # Kidney IHC TIFF: no mpp; by nuclear size about 0.5 um/px (it is another stain: OOD expected).
    "kidney-48-5.tif": 0.5,
    # DICOM without PixelSpacing: TCGA diagnostic frames, nuclei about 15-20 px: about 0.5 um/px.
    "tcga-xk-aaju-single-level.dcm": 0.5,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-slides")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    if not SLIDES.exists():
        raise SystemExit(f"{SLIDES} not found: this benchmark needs the shared data")
    suffixes = (".svs", ".tif", ".tiff", ".ndpi", ".qptiff", ".dcm")
    slides = sorted(
        p
        for p in SLIDES.rglob("*")
        if p.is_file() and p.suffix.lower() in suffixes and "dicom-boxes" not in p.parts
    )
    results: list[dict[str, Any]] = []
    for slide in slides:
        for name in args.models:
            mpp = MPP_ASSUMED.get(slide.name)
            opts = RunOptions(tile=replace(TileOptions(), mpp_override=mpp), workers=2)
            out = args.out / name / f"{slide.stem}.tif"
            out.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            row: dict[str, Any] = {"slide": str(slide.relative_to(SLIDES)), "model": name, "mpp_assumed": mpp}
            try:
                m = run_slide(slide, out, model=MODELS[name], options=opts, overwrite=True)
            except WsiError as exc:
                row["error"] = str(exc).splitlines()[0][:160]
            else:
                ev, ood = m["label"]["evidence"], m["label"].get("ood") or {}
                focus = m["label"].get("focus") or {}
                row.update(label=m["label"]["label"], tiles=m["n_tiles"], max_p=ev["max_p"],
                           tumour_area_mm2=ev["tumour_area_mm2"], tissue_area_mm2=ev["tissue_area_mm2"],
                           ood_score=ood.get("score"), ood_warning=bool(ood.get("warning")),
                           out_of_focus=focus.get("share_out_of_focus"),
                           focus_warning=bool(focus.get("warning")),
                           overlay=str(out.with_suffix("").with_name(out.stem + ".overlay.png")))  # fmt: skip
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| slide | model | mpp assumed | label | tiles | tumour mm^2 / tissue mm^2 | max P | OOD score "
          "| out of focus (warned) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(
                f"| {r['slide']} | {r['model']} | {r['mpp_assumed']} | refused: {r['error'][:70]} | | | | | |"
            )
        else:
            area = f"{r['tumour_area_mm2']} / {r['tissue_area_mm2']}"
            print(
                f"| {r['slide']} | {r['model']} | {r['mpp_assumed']} | {r['label']} | {r['tiles']} | "
                f"{area} | {r['max_p']} | {r['ood_score']} | {r['out_of_focus']} ({r['focus_warning']}) |"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
