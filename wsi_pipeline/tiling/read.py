"""Read planned tiles from a slide: block reads at the plan's level, cut, resized, optionally normalized.

``iter_tiles`` reads one large region per block of the grid (at the chosen pyramid level) and cuts
tiles from it, with a few reader threads, memory bounded; ``read_tile`` is the one-read reference
every tile equals. Also the slide's stain fit (tiles spread over the slide) and its transform.
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from wsi_pipeline.io.resample import box_mean
from wsi_pipeline.io.slide import SlideReader, thread_handles
from wsi_pipeline.stain.macenko import StainFitWarning, StainModel, apply_macenko, fit_slide
from wsi_pipeline.tiling.grid import TileGrid, level_to_l0
from wsi_pipeline.tiling.plan import SlidePlan, TileOptions

T = TypeVar("T")
R = TypeVar("R")


def resize_tiles(tiles: np.ndarray, tile_px: int) -> np.ndarray:
    """Resize (N, h, h, 3) uint8 tiles to (N, tile_px, tile_px, 3).

    An integer reduction (e.g. 40x to 20x) is a box average over the whole batch at once; other
    factors use Lanczos filtering tile by tile.
    """
    h = tiles.shape[1]
    if h == tile_px and tiles.shape[2] == tile_px:
        return tiles
    k = h // tile_px
    if k * tile_px == h and tiles.shape[2] == h and k <= 16:
        return box_mean(tiles, k)
    out = np.empty((len(tiles), tile_px, tile_px, 3), np.uint8)
    for i, t in enumerate(tiles):
        out[i] = np.asarray(Image.fromarray(t).resize((tile_px, tile_px), Image.Resampling.LANCZOS))
    return out


def read_tile(reader: SlideReader, grid: TileGrid, col: int, row: int) -> np.ndarray:
    """One tile by one ``read_region`` at the grid's level (the reference the block path equals)."""
    x, y = (int(v) for v in grid.origins_l0(np.array([[col, row]]))[0])
    pixels = reader.read_region((x, y), grid.level, (grid.read_px, grid.read_px))
    return resize_tiles(pixels[None], grid.tile_px)[0]


def _blocks(colrow: np.ndarray, indices: np.ndarray, block_tiles: int) -> list[np.ndarray]:
    """Split sorted tile ``indices`` into runs that share a read block (order preserved)."""
    if len(indices) == 0:
        return []
    key = colrow[indices] // max(1, block_tiles)
    change = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
    return np.split(indices, change)


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int, window: int, *, ahead: bool = False
) -> Iterator[R]:
    """``map`` over a thread pool, in order, with at most ``window`` items in flight.

    One worker runs inline in the caller unless ``ahead`` (then one thread works ahead of the caller).
    """
    if workers <= 1 and not ahead:
        yield from map(fn, items)
        return
    ex = ThreadPoolExecutor(workers, thread_name_prefix="wsi-read")
    pending: deque[Future[R]] = deque()
    it = iter(items)
    try:
        for item in itertools.islice(it, window):
            pending.append(ex.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            for item in itertools.islice(it, 1):
                pending.append(ex.submit(fn, item))
            yield result
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def iter_tiles(
    reader: SlideReader,
    plan: SlidePlan | tuple[TileGrid, np.ndarray],
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    block_tiles: int = 4,
    workers: int = 2,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tile indices, tiles (n, tile_px, tile_px, 3) uint8) for the plan's tiles, in order.

    ``plan`` is a :class:`SlidePlan` or just its (grid, colrow), which is what remote workers get.

    One region per block is read at the plan's level and the tiles are cut from it (one read per
    tile where the reader's block reads are not exact, see :class:`TileGrid`). With
    ``workers`` > 1, that many threads read ahead, each with its own slide handle (in-memory readers
    are shared). Memory is bounded by about ``2 * workers`` blocks. ``transform`` (e.g. stain
    normalization) is applied to each block's tiles in the reader thread.
    """
    grid, colrow = (plan.grid, plan.colrow) if isinstance(plan, SlidePlan) else plan
    block_tiles = block_tiles if grid.exact_blocks else 1
    idx = np.arange(len(colrow)) if indices is None else np.sort(np.asarray(indices, np.int64))
    origins = grid.origins_level(colrow)

    def read_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        o = origins[block]
        x0, y0 = o.min(axis=0)
        x1, y1 = o.max(axis=0) + grid.read_px
        lx, ly = level_to_l0(np.array([x0, y0]), grid.level_downsample, grid.origin_rule)
        loc = (int(lx), int(ly))
        region = thread_reader().read_region(loc, grid.level, (int(x1 - x0), int(y1 - y0)))
        rp = grid.read_px
        cut = np.stack([region[y - y0 : y - y0 + rp, x - x0 : x - x0 + rp] for x, y in o])
        tiles = resize_tiles(cut, grid.tile_px)
        return block, transform(tiles) if transform else tiles

    with thread_handles(reader, workers) as thread_reader:
        yield from ordered_map(read_block, _blocks(colrow, idx, block_tiles), workers, 2 * workers)


def stain_fit_indices(n_tiles: int, n_fit: int) -> np.ndarray:
    """``n_fit`` tile indices spread evenly over the store order (blocks cover the slide)."""
    if n_tiles <= n_fit:
        return np.arange(n_tiles)
    return np.unique(np.linspace(0, n_tiles - 1, n_fit).round().astype(np.int64))


def fit_slide_stain(reader: SlideReader, plan: SlidePlan, opts: TileOptions) -> dict[str, Any]:
    """Fit one Macenko stain model on tissue tiles spread across the slide.

    Returns the record kept in the store's attributes: the fitted (source) model, the reference, the
    tiles used and whether the fit fell back to the reference (too little stained tissue).
    """
    idx = stain_fit_indices(plan.n_tiles, opts.stain_fit_tiles)
    batches = (t for _, t in iter_tiles(reader, plan, idx, block_tiles=1, workers=opts.workers))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StainFitWarning)
        model = fit_slide(batches)
    fallback = [str(w.message) for w in caught if issubclass(w.category, StainFitWarning)]
    for msg in fallback:
        warnings.warn(f"{reader.path}: {msg}", StainFitWarning, stacklevel=2)
    return {
        "method": "macenko",
        "io": 240.0,
        "beta": 0.15,
        "alpha": 1.0,
        "source": model.to_dict(),
        "reference": opts.stain_reference.to_dict(),
        "reference_name": opts.stain_reference_name,
        "fit_tiles": len(idx),
        "fit_status": "fallback-to-reference" if fallback else "fitted",
        "fit_message": fallback[0] if fallback else None,
    }


def stain_transform(stain: dict[str, Any], reference: StainModel) -> Callable[[np.ndarray], np.ndarray]:
    """Batch normalizer for a stain record written by :func:`fit_slide_stain`."""
    source = StainModel.from_dict(stain["source"])
    ref = StainModel.from_dict(stain.get("reference") or reference.to_dict())
    io = float(stain.get("io", 240.0))
    return lambda tiles: apply_macenko(tiles, source, ref, io=io)
