"""Throughput of the shipped tumour CNN (ONNX, onnxruntime CPUExecutionProvider), in tiles per second.

Runs ``models/tumour-cnn.onnx`` and, as the baseline measured in the same run, the LC25000-only
TileNet 0.1.0 it replaced (``models/baselines/``, fp32 and its static int8 variant) at batch sizes
1, 8, 32 and 64 on the same tiles, after a warm-up, and prints each model's throughput relative to
its batch 1 and to the baseline fp32 at the same batch, then the card's held-out metrics.
Tiles are real LC25000 test-split tiles from ``<repo>/../shared/data`` when present, otherwise random
uint8 tiles (the header says which). Preprocessing (uint8 -> normalised float) is inside the graph,
so the timing covers it; JPEG decoding is not timed.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_model [--seconds 2] [--threads 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.data import load_tiles
from models.split import read_index, sample_rows, split_rows
from wsi_pipeline.inference.card import load_card
from wsi_pipeline.provenance import file_sha256

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT.parent / "shared" / "data" / "tiles" / "lc25000-lung" / "index.csv"
BATCH_SIZES = (1, 8, 32, 64)
BASELINE = ROOT / "models" / "baselines" / "tumour-cnn-lc25000-0.1.0.onnx"
BASELINE_INT8 = ROOT / "models" / "baselines" / "tumour-cnn-lc25000-0.1.0-int8.onnx"


def bench_tiles(card: dict[str, Any], n: int) -> tuple[np.ndarray, str]:
    if INDEX.exists():
        rows = read_index(INDEX)
        sp = card["data"]["split"]
        idx = sample_rows(split_rows(rows, sp["fractions"], sp["seed"])["test"], rows, n, seed=4)
        return load_tiles([rows[i] for i in idx]).images, f"{n} real LC25000 test-split tiles"
    rng = np.random.default_rng(0)
    return rng.integers(
        0, 256, size=(n, 224, 224, 3), dtype=np.uint8
    ), f"{n} random uint8 tiles (no shared data)"


def measure(session: ort.InferenceSession, tiles: np.ndarray, batch: int, seconds: float) -> dict[str, float]:
    """Tiles/s of one batch size after 3 warm-up runs: from the median run time, and from the fastest
    run (less sensitive to other processes on a shared machine)."""
    x = np.ascontiguousarray(tiles[:batch])
    for _ in range(3):
        session.run(["probabilities"], {"tiles": x})
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        session.run(["probabilities"], {"tiles": x})
        times.append(time.perf_counter() - t0)
    med, best = float(np.median(times)), float(np.min(times))
    return {
        "batch": batch,
        "runs": len(times),
        "ms_per_batch": med * 1e3,
        "tiles_per_s": batch / med,
        "best_tiles_per_s": batch / best,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "tumour-cnn.onnx")
    p.add_argument(
        "--seconds", type=float, default=2.0, help="timed seconds per batch size (at least 5 runs)"
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    card = load_card(args.model.with_suffix(".json")).raw
    models = {"shipped": args.model}
    for name, file in (("base", BASELINE), ("base-i8", BASELINE_INT8)):
        if file.exists():
            models[name] = file
    tiles, what = bench_tiles(card, max(BATCH_SIZES))
    print(
        f"{card['name']} {card['version']}  onnxruntime {ort.__version__} CPUExecutionProvider  "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, "
        f"threads={args.threads or 'default'}"
    )
    print(f"tiles: {what}; {args.seconds:.1f} s per batch size after 3 warm-up runs\n")
    results: list[dict[str, Any]] = []
    print(
        f"{'model':<8} {'batch':>5} {'ms/batch':>10} {'tiles/s':>9} {'vs batch 1':>10} {'best tiles/s':>12}"
    )
    for name, path in models.items():
        opts = ort.SessionOptions()
        if args.threads:
            opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        if session.get_providers() != ["CPUExecutionProvider"]:
            raise RuntimeError(f"unexpected providers {session.get_providers()}")
        base = None
        for batch in BATCH_SIZES:
            r = measure(session, tiles, batch, args.seconds)
            base = base or r["tiles_per_s"]
            r.update(
                model=name, file=path.name, sha256=file_sha256(path), ratio_vs_batch1=r["tiles_per_s"] / base
            )
            results.append(r)
            print(
                f"{name:<8} {batch:>5} {r['ms_per_batch']:>10.2f} {r['tiles_per_s']:>9.1f} "
                f"{r['ratio_vs_batch1']:>9.2f}x {r['best_tiles_per_s']:>12.1f}"
            )
    if "base" in models:
        for name in [m for m in models if m != "base"]:
            for batch in BATCH_SIZES:
                f, q = (
                    next(r for r in results if r["model"] == m and r["batch"] == batch)
                    for m in ("base", name)
                )
                print(
                    f"{name} / base (fp32 TileNet 0.1.0) at batch {batch}: "
                    f"{q['tiles_per_s'] / f['tiles_per_s']:.2f}x"
                )
    for name, m in card["metrics"].items():
        print(
            f"card {name}: n {m['n']}, "
            + ", ".join(
                f"{k} {m[k]:.4f}"
                for k in ("accuracy", "recall", "specificity", "f1", "auc")
                if m[k] is not None
            )
        )
    if args.json:
        args.json.write_text(json.dumps({"tiles": what, "results": results, "metrics": m}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
