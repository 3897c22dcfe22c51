"""Peak memory against slide size: the whole ``wsi-infer`` command on synthetic slides from 10k to 100k
pixels a side (0.5 um/px, pyramid 1/4/16/64), tissue covering a fixed share of each slide.

Peak RSS should stay flat in the slide's size (bounded read-ahead, no whole-level arrays), under
2 GiB for 100k x 100k. The figures come from each run's manifest (``timings.peak_rss_mib``, the
process's VmHWM). Slides are written once into ``--work`` (the 100k one takes a few minutes and
about 2 GB of disk).

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_memory [--sizes 10000,30000,100000] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]


def slide(work: Path, size: int) -> Path:
    path = work / f"memory-{size}.svs"
    if not path.exists():
        # Two tissue ellipses, ~12% of the slide, spread over its whole extent.
        s = float(size)
        spec = SyntheticSpec(
            width=size, height=size, mpp=0.5,
            tissue=(Ellipse(s * 0.3, s * 0.3, s * 0.12, s * 0.1),
                    Ellipse(s * 0.7, s * 0.65, s * 0.12, s * 0.15)),
            downsamples=(1, 4, 16, 64), tile_px=512,
        )  # fmt: skip
        t = time.perf_counter()
        write_synthetic_slide(path, spec)
        print(
            f"  wrote {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s"
        )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-memory")
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for size in (int(s) for s in args.sizes.split(",")):
        path = slide(args.work, size)
        out = args.work / "out" / f"memory-{size}.tif"
        cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(path), "--out", str(out), "--overwrite", "-q"]
        if args.model:
            cmd += ["--model", str(args.model)]
        t = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        m = json.loads(out.with_suffix(".run.json").read_text())
        row = {"size_px": size, "tiles": m["n_tiles"], "wall_s": round(wall, 1),
               "tiles_per_s": round(m["n_tiles"] / wall, 1), "peak_rss_mib": m["timings"]["peak_rss_mib"],
               "grid": [m["grid"]["cols"], m["grid"]["rows"]]}  # fmt: skip
        rows.append(row)
        print(
            f"{size} x {size} px: {row['tiles']} tiles in {row['wall_s']} s ({row['tiles_per_s']} tiles/s), "
            f"peak RSS {row['peak_rss_mib']} MiB",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
