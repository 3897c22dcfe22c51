"""Slide reading: the same regions read by OpenSlide, by tiffslide (its zarr store) and by tiffslide
with its tiles decoded by tifffile (``io.tiff_region``, what ``auto`` uses for large .svs); and a whole
thumbnail level read through OpenSlide versus decoded whole by tifffile (``io.tiff_level``). One run,
one thread, best of ``--repeat``, ratios against OpenSlide measured in the same run; every read is
checked to give OpenSlide's pixels.

Slides: the 9,250 px real-tile mosaic of ``bench_pipeline`` (synthetic texture without ../shared/data)
and the bundled CMU-1-Small-Region.svs.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_read [--repeat 3] [--regions 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_pipeline import SAMPLE, mosaic
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.io.tiff_level import decode_level

REGION_PX = 448  # a block of 2 x 2 tiles of 224 px, as the tiler reads them


def _best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_slide(label: str, path: Path, n_regions: int, repeat: int) -> dict[str, Any]:
    ops = open_slide(path, "openslide")
    assert open_slide(path, "tiffslide")._tiles is not None, f"{path}: no tifffile tiles"  # type: ignore[attr-defined]
    w, h = ops.dimensions
    rng = np.random.default_rng(0)
    random_locs = [
        (int(x), int(y))
        for x, y in zip(
            rng.integers(0, w - REGION_PX, n_regions), rng.integers(0, h - REGION_PX, n_regions), strict=True
        )
    ]
    scan_locs = [
        (x, y) for y in range(0, h - REGION_PX, REGION_PX) for x in range(0, w - REGION_PX, REGION_PX)
    ]
    size = (REGION_PX, REGION_PX)
    # Each way opens a fresh reader for every repeat (empty tile caches: OpenSlide keeps one too).
    ways: dict[str, Callable[[], Callable[[tuple[int, int]], np.ndarray]]] = {
        "openslide": lambda: open_slide(path, "openslide").read_region,
        "tiffslide (zarr)": lambda: open_slide(path, "tiffslide")._library_read,  # type: ignore[attr-defined]
        "tiffslide + tifffile tiles": lambda: open_slide(path, "tiffslide").read_region,
    }
    for loc in random_locs[:20]:  # the same pixels every way
        ref = ops.read_region(loc, 0, size)
        for make in ways.values():
            np.testing.assert_array_equal(make()(loc, 0, size), ref)  # type: ignore[call-arg]
    row: dict[str, Any] = {"slide": label, "level0_px": [w, h], "region_px": REGION_PX}
    for order, locs in (("random", random_locs), ("scan", scan_locs)):
        for name, make in ways.items():
            times = []
            for _ in range(repeat):
                read: Any = make()
                t = time.perf_counter()
                for loc in locs:
                    read(loc, 0, size)
                times.append(time.perf_counter() - t)
            row[f"{order} {name} tiles/s"] = round(4 * len(locs) / min(times), 1)
        base = row[f"{order} openslide tiles/s"]
        for name in ways:
            row[f"{order} {name} vs openslide"] = round(row[f"{order} {name} tiles/s"] / base, 2)
    level = ops.level_count - 1 if max(ops.level_dimensions[-1]) >= 512 else 0
    lw, lh = ops.level_dimensions[level]
    whole_os = _best(lambda: open_slide(path, "openslide").read_region((0, 0), level, (lw, lh)), repeat)
    whole_tf = _best(lambda: decode_level(open_slide(path, "openslide"), level), repeat)
    assert np.array_equal(decode_level(ops, level), ops.read_region((0, 0), level, (lw, lh)))
    row["thumbnail level"], row["thumbnail level px"] = level, [lw, lh]
    row["thumbnail level openslide s (with open)"] = round(whole_os, 4)
    row["thumbnail level tifffile s (with open)"] = round(whole_tf, 4)
    row["thumbnail level speed-up"] = round(whole_os / whole_tf, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-pipeline")
    ap.add_argument("--size", type=int, default=9250)
    ap.add_argument("--regions", type=int, default=300, help="random regions per slide")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [bench_slide(*mosaic(args.work, args.size), args.regions, args.repeat),
            bench_slide("bundled CMU-1-Small-Region", SAMPLE, args.regions, args.repeat)]  # fmt: skip
    for row in rows:
        print(row["slide"])
        for key, value in row.items():
            if key != "slide":
                print(f"  {key}: {value}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
