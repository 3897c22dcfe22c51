"""Throughput of Macenko stain normalization on 224 px tiles (tiles per second, single process).

Modes, all measured in the same run on the same tiles:

- ``slide-fit apply``: :func:`wsi_pipeline.stain.fit_slide` once on all tiles, then
  :func:`~wsi_pipeline.stain.apply_macenko` on batches (the pipeline's path). Reported for the apply
  alone and with the one-off slide fit amortised over the tiles.
- ``per-tile fit+apply (ours)``: :func:`~wsi_pipeline.stain.normalize_image` tile by tile (the baseline).
- ``torchstain numpy per-tile``: ``torchstain.normalizers.MacenkoNormalizer(backend="numpy").normalize``
  tile by tile with ``stains=False``, when torchstain is importable.

Tiles are real LC25000 lung JPEGs from ``<repo>/../shared/data/tiles/lc25000-lung/images`` when present,
otherwise synthetic Beer-Lambert H&E tiles; the table says which.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.bench_stain --n-tiles 512 --batch 64 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.stain.macenko import REFERENCE, StainFitWarning, apply_macenko, fit_slide, normalize_image

TILE_PX = 224
DEFAULT_TILE_DIR = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles" / "lc25000-lung" / "images"
)


def load_real_tiles(tile_dir: Path, n_tiles: int) -> np.ndarray | None:
    """Up to ``n_tiles`` 224x224 RGB tiles spread evenly over the sorted JPEGs, or None if absent."""
    from PIL import Image

    paths = sorted(tile_dir.rglob("*.jpeg")) + sorted(tile_dir.rglob("*.jpg")) if tile_dir.is_dir() else []
    if not paths:
        return None
    picks = np.linspace(0, len(paths) - 1, num=min(n_tiles, len(paths))).round().astype(int)
    tiles = []
    for i in picks:
        with Image.open(paths[i]) as image:
            rgb = np.asarray(image.convert("RGB"))
        if rgb.shape == (TILE_PX, TILE_PX, 3):
            tiles.append(rgb)
    return np.stack(tiles) if tiles else None


def synthetic_tiles(n_tiles: int, seed: int = 0) -> np.ndarray:
    """Beer-Lambert H&E tiles: smooth random H and E concentration maps with some background."""
    rng = np.random.default_rng(seed)
    stains = np.array([[0.65, 0.70, 0.29], [0.27, 0.85, 0.45]])
    stains /= np.linalg.norm(stains, axis=1, keepdims=True)
    coarse = rng.gamma(2.0, 0.45, size=(n_tiles, TILE_PX // 8, TILE_PX // 8, 2))
    conc = coarse.repeat(8, axis=1).repeat(8, axis=2) * rng.uniform(0.7, 1.3, (n_tiles, TILE_PX, TILE_PX, 2))
    conc[rng.random((n_tiles, TILE_PX, TILE_PX)) < 0.15] = 0.0
    rgb = 240.0 * np.exp(-(conc @ stains)) - 1.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-tiles", type=int, default=512, help="tiles to normalize (default 512)")
    parser.add_argument("--batch", type=int, default=64, help="tiles per apply_macenko batch (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats; the best is kept (default 3)")
    parser.add_argument("--tile-dir", type=Path, default=DEFAULT_TILE_DIR, help="folder of 224 px JPEG tiles")
    parser.add_argument(
        "--synthetic", action="store_true", help="use synthetic tiles even if real ones exist"
    )
    parser.add_argument("--no-torchstain", action="store_true", help="skip the torchstain comparison")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    tiles = None if args.synthetic else load_real_tiles(args.tile_dir, args.n_tiles)
    source = f"real LC25000 lung JPEGs ({args.tile_dir})"
    if tiles is None:
        tiles = synthetic_tiles(args.n_tiles)
        source = "synthetic Beer-Lambert tiles"
    n = len(tiles)
    batches = [tiles[i : i + args.batch] for i in range(0, n, args.batch)]

    # Each mode is a callable over all n tiles; repeats are interleaved (mode A, B, C, A, B, C, ...) so
    # that load changes on a shared machine hit every mode alike; the best time of each is kept.
    slide_model = fit_slide(batches)
    fallbacks = 0

    def per_tile_ours() -> None:
        nonlocal fallbacks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StainFitWarning)
            for tile in tiles:
                normalize_image(tile)
        fallbacks = sum(issubclass(w.category, StainFitWarning) for w in caught)

    modes: dict[str, Callable[[], object]] = {
        "slide fit (fit_slide, once)": lambda: fit_slide(batches),
        "slide-fit apply (apply only)": lambda: [apply_macenko(b, slide_model, REFERENCE) for b in batches],
        "per-tile fit+apply (ours)": per_tile_ours,
    }

    torchstain_note = "not run (--no-torchstain)"
    peer_failures = 0
    if not args.no_torchstain:
        try:
            import torchstain  # type: ignore[import-untyped]
        except ImportError:
            torchstain_note = "not installed"
        else:
            from importlib.metadata import version

            peer = torchstain.normalizers.MacenkoNormalizer(backend="numpy")  # default HERef/maxCRef

            def per_tile_torchstain() -> None:
                nonlocal peer_failures
                peer_failures = 0
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    for tile in tiles:
                        try:
                            peer.normalize(tile, Io=240, alpha=1, beta=0.15, stains=False)
                        except (np.linalg.LinAlgError, ValueError, IndexError):
                            peer_failures += 1

            modes["torchstain numpy per-tile"] = per_tile_torchstain
            torchstain_note = f"torchstain {version('torchstain')} numpy backend, stains=False"

    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    fit_s = min(times.pop("slide fit (fit_slide, once)"))
    results: dict[str, dict[str, Any]] = {name: {"seconds": min(t)} for name, t in times.items()}
    apply_row = results.pop("slide-fit apply (apply only)")
    results = {
        "slide-fit apply (apply only)": apply_row,
        "slide-fit apply (incl. slide fit)": {"seconds": apply_row["seconds"] + fit_s},
        **results,
    }
    if "torchstain numpy per-tile" in results:
        torchstain_note += f", {peer_failures} tiles raised"

    baseline = results["per-tile fit+apply (ours)"]["seconds"]
    for row in results.values():
        row["tiles_per_s"] = n / row["seconds"]
        row["speedup_vs_per_tile_ours"] = baseline / row["seconds"]

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"tiles: {n} x {TILE_PX}x{TILE_PX} px, {source}; batch {args.batch}; best of {args.repeats}")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} (timings are noisy on a loaded machine)"
    )
    print(
        f"slide fit: {fit_s * 1000:.1f} ms once; per-tile fits that fell back to the reference: {fallbacks}"
    )
    print(f"torchstain: {torchstain_note}")
    print(f"{'mode':<36} {'seconds':>9} {'tiles/s':>10} {'x per-tile ours':>16}")
    for name, row in results.items():
        speedup = row["speedup_vs_per_tile_ours"]
        print(f"{name:<36} {row['seconds']:>9.3f} {row['tiles_per_s']:>10.1f} {speedup:>16.2f}")

    if args.json:
        payload = {
            "tiles": n,
            "tile_px": TILE_PX,
            "tile_source": source,
            "batch": args.batch,
            "repeats": args.repeats,
            "slide_fit_seconds": fit_s,
            "per_tile_fallbacks": fallbacks,
            "torchstain": torchstain_note,
            "results": results,
            "wsi_pipeline": __version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
            "machine": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_end": load[0],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
