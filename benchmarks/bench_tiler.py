"""Tiler throughput: ``tile_slide`` (block reads at the chosen level, reader threads) versus a naive
loop of one level-0 ``read_region`` per tile, on the same slide and backend, in the same run.

Both write the same tiles into a Zarr v3 store with the same chunking, so the ratio is what a user
sees. Slides: the real CMU-1-Small-Region.svs (if ../shared/data is present) and synthetic
pyramidal slides (synthetic texture; written once into --work):

* ``synthetic-40x-1-4-16.svs``: 0.25 um/px, levels 1/4/16 (no 20x level: both read level 0);
* ``synthetic-40x-1-2-8.svs``: 0.25 um/px, levels 1/2/8 (ours reads the 20x level, naive level 0);
* ``synthetic-40x-1-2-8-odd.svs``: the same, 3 px wider and taller, so the 20x level's downsample
  is not an integer (1.9998): tiffslide still reads blocks, OpenSlide reads tile by tile (a block
  read would resample every tile by the block's sub-pixel remainder).

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_tiler [--size 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide
from wsi_pipeline.io.slide import SlideReader, open_slide
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.read import resize_tiles
from wsi_pipeline.tiling.tiler import tile_slide

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def naive(reader: SlideReader, out: Path, opts: TileOptions) -> tuple[int, float]:
    """Plan the same tiles, then one read_region per tile at level 0 (resized), same store layout."""
    t0 = time.perf_counter()
    plan = plan_slide(reader, opts)
    tile_l0 = round(plan.grid.tile_l0_px)
    g = zarr.open_group(str(out), mode="w", zarr_format=3)
    arr = g.create_array(
        "tiles",
        shape=(plan.n_tiles, opts.tile_px, opts.tile_px, 3),
        chunks=(opts.chunk_tiles, opts.tile_px, opts.tile_px, 3),
        dtype="uint8",
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),
    )
    buf: list[np.ndarray] = []
    start = 0
    for x, y in plan.coords_l0:
        px = reader.read_region((int(x), int(y)), 0, (tile_l0, tile_l0))
        buf.append(resize_tiles(px[None], opts.tile_px)[0])
        if len(buf) == opts.chunk_tiles:
            arr[start : start + len(buf)] = np.stack(buf)
            start += len(buf)
            buf = []
    if buf:
        arr[start : start + len(buf)] = np.stack(buf)
    return plan.n_tiles, time.perf_counter() - t0


def ours(path: Path, backend: str, out: Path, opts: TileOptions) -> tuple[int, float]:
    t0 = time.perf_counter()
    rep = tile_slide(path, out, opts, backend=backend, overwrite=True)
    return rep.n_tiles, time.perf_counter() - t0


def slides(work: Path, size: int) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    cmu = SHARED / "slides" / "aperio" / "CMU-1-Small-Region.svs"
    if cmu.exists():
        out.append(("CMU-1-Small-Region.svs (real, 0.499 um/px, 1 level)", cmu))
    tissue = (Ellipse(size * 0.5, size * 0.5, size * 0.42, size * 0.36),)
    for ds, odd in (((1, 4, 16), 0), ((1, 2, 8), 0), ((1, 2, 8), 3)):
        name = f"synthetic-40x-{'-'.join(map(str, ds))}{'-odd' if odd else ''}.svs"
        p = work / f"{size}-{name}"
        if not p.exists():
            side = size + odd
            spec = SyntheticSpec(width=side, height=side, mpp=0.25, tissue=tissue, downsamples=ds)
            t = time.perf_counter()
            write_synthetic_slide(p, spec)
            print(f"  wrote {p.name} in {time.perf_counter() - t:.1f} s")
        out.append((f"{name} ({size + odd}x{size + odd}, synthetic texture)", p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384, help="synthetic slide side, level-0 px")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-tiler")
    ap.add_argument("--backends", default="openslide,tiffslide")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    opts = TileOptions(workers=args.workers)
    rows: list[dict[str, Any]] = []
    for label, path in slides(args.work, args.size):
        for backend in args.backends.split(","):
            store_a, store_b = args.work / "ours.zarr", args.work / "naive.zarr"
            for p in (store_a, store_b):
                shutil.rmtree(p, ignore_errors=True)
            n_b, t_b = naive(open_slide(path, backend), store_b, opts)
            n_a, t_a = ours(path, backend, store_a, opts)
            assert n_a == n_b, (n_a, n_b)
            row = {
                "slide": label,
                "backend": backend,
                "tiles": n_a,
                "naive_s": round(t_b, 2),
                "naive_tiles_per_s": round(n_b / t_b, 1),
                "ours_s": round(t_a, 2),
                "ours_tiles_per_s": round(n_a / t_a, 1),
                "speedup": round(t_b / t_a, 2),
            }
            rows.append(row)
            print(
                f"{label} [{backend}]: {n_a} tiles; naive {row['naive_tiles_per_s']} tiles/s, "
                f"ours {row['ours_tiles_per_s']} tiles/s ({args.workers} reader threads) -> x{row['speedup']}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
