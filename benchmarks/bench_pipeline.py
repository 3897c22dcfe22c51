"""End-to-end throughput (slide -> heatmap and all outputs) versus the raw onnxruntime throughput of
the same model at the same batch size, measured in the same run.

Raw: ``session.run`` on tiles already in memory (the model alone). End to end: ``run_slide`` (plan,
read + cut tiles, score through Dask, aggregate, write every output). Overhead = 1 - e2e / raw.
The slide is synthetic (texture does not change the model's speed); it is written once into --work.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_pipeline [--size 12288] [--batch-size 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide
from wsi_pipeline.inference.card import resolve_model
from wsi_pipeline.inference.session import create_session, predict
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.pipeline import RunOptions, run_slide
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.tiler import iter_tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=12288, help="slide side in level-0 px (0.5 um/px)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-pipeline")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--normalize", default="none", choices=["none", "macenko"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    s = args.size
    slide = args.work / f"bench-{s}.svs"
    if not slide.exists():
        spec = SyntheticSpec(
            width=s, height=s, mpp=0.5, tissue=(Ellipse(s / 2, s / 2, s * 0.42, s * 0.38),),
            tumour=(Ellipse(s * 0.6, s * 0.45, s * 0.12, s * 0.1),), downsamples=(1, 4, 16),
        )  # fmt: skip
        write_synthetic_slide(slide, spec)
    card = resolve_model(args.model)
    cpus = os.cpu_count() or 1

    # Raw model throughput: the same tiles, in memory, same batch size, all cores to one session.
    reader = open_slide(slide)
    plan = plan_slide(reader, TileOptions())
    t = time.perf_counter()
    tiles = np.concatenate([t for _, t in iter_tiles(reader, plan, workers=min(4, cpus))])
    decode = len(tiles) / (time.perf_counter() - t)  # read + decode + cut alone, all cores
    session, provider = create_session(card, args.device)
    predict(session, card, tiles[: args.batch_size], batch_size=args.batch_size)  # warm-up
    t = time.perf_counter()
    predict(session, card, tiles, batch_size=args.batch_size)
    raw_s = time.perf_counter() - t
    raw = len(tiles) / raw_s

    # End to end, outputs included.
    out = args.work / "out" / "bench.tif"
    opts = RunOptions(
        device=args.device, batch_size=args.batch_size, tile=TileOptions(normalize=args.normalize)
    )
    t = time.perf_counter()
    m = run_slide(slide, out, model=args.model, options=opts, overwrite=True)
    e2e_s = time.perf_counter() - t
    e2e = m["n_tiles"] / e2e_s
    row = {
        "slide": f"{slide.name} ({s}x{s} px, 0.5 um/px, synthetic texture)",
        "model": card.name,
        "provider": provider,
        "cpus": cpus,
        "batch_size": args.batch_size,
        "normalize": args.normalize,
        "tiles": int(m["n_tiles"]),
        "raw_model_tiles_per_s": round(raw, 1),
        "end_to_end_tiles_per_s": round(e2e, 1),
        "end_to_end_s": round(e2e_s, 2),
        "decode_only_tiles_per_s": round(decode, 1),
        # Reading and the model share the CPUs here: this is the best a pipeline could do on them.
        "cpu_bound_tiles_per_s": round(1 / (1 / raw + 1 / decode), 1),
        "ratio_e2e_to_raw": round(e2e / raw, 3),
        "ratio_e2e_to_cpu_bound": round(e2e * (1 / raw + 1 / decode), 3),
        "overhead_pct": round(100 * (1 - e2e / raw), 1),
        "stage_seconds_summed_over_tasks": m["timings"],
        "scheduler": m["scheduler"],
    }
    print(json.dumps(row, indent=2))
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
