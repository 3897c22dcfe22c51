"""Slide -> tissue tiles: read the planned tiles and stream them into a Zarr store.

``plan_slide`` (:mod:`wsi_pipeline.tiling.plan`) decides everything before a tile is read;
``iter_tiles`` reads one large region per block of the grid (at the chosen pyramid level) and cuts
tiles from it, with a few reader threads;
``tile_slide`` writes them chunk by chunk into a resumable store.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from wsi_pipeline import __version__
from wsi_pipeline.errors import SlideError
from wsi_pipeline.io.resample import box_mean
from wsi_pipeline.io.slide import (
    SlideReader,
    open_slide,
    slide_fingerprint,
)
from wsi_pipeline.io.tilestore import (
    TileStoreWriter,
    existing_state,
    open_tile_store,
    partial_path,
    store_lock,
)
from wsi_pipeline.provenance import refuse_overwriting_inputs, remove_created_folders_on_failure
from wsi_pipeline.stain.macenko import StainFitWarning, StainModel, apply_macenko, fit_slide
from wsi_pipeline.tiling.grid import TileGrid, level_to_l0
from wsi_pipeline.tiling.plan import SlidePlan, TileOptions, plan_slide, require_tissue

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


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, window: int) -> Iterator[R]:
    """``map`` over a thread pool, in order, with at most ``window`` items in flight."""
    if workers <= 1:
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
    local = threading.local()
    opened: list[SlideReader] = []
    lock = threading.Lock()

    def thread_reader() -> SlideReader:
        if workers <= 1 or reader.backend not in ("openslide", "tiffslide"):
            return reader
        r = getattr(local, "reader", None)
        if r is None:
            r = open_slide(reader.path, reader.backend, verify=False)  # checked by the first open
            local.reader = r
            with lock:
                opened.append(r)
        return r

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

    try:
        yield from _ordered_map(read_block, _blocks(colrow, idx, block_tiles), workers, 2 * workers)
    finally:
        for r in opened:
            r.close()


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


@dataclass(frozen=True)
class TileReport:
    """Outcome of :func:`tile_slide` (also written as JSON beside the store)."""

    slide: str
    out: str
    status: str  # "written", "resumed" or "already complete"
    n_tiles: int
    tiles_written: int
    seconds: float
    tiles_per_s: float
    slide_tissue_fraction: float
    mpp_source: str
    effective_mpp: float
    level: int
    meta: dict[str, Any]


ProgressFn = Callable[[int, int], None]


def _slide_meta(
    reader: SlideReader, plan: SlidePlan, options: TileOptions, fingerprint: str
) -> dict[str, Any]:
    return {
        "package_version": __version__,
        "slide": {
            "path": str(Path(reader.path).resolve()),
            "name": Path(reader.path).name,
            "fingerprint": fingerprint,
            "backend": reader.backend,
            "vendor": reader.vendor,
            "dimensions": list(reader.dimensions),
            "level_dimensions": [list(d) for d in reader.level_dimensions],
            "level_downsamples": list(reader.level_downsamples),
        },
        "resolution": {
            "mpp_x": plan.resolution.mpp_x,
            "mpp_y": plan.resolution.mpp_y,
            "mpp_source": plan.resolution.source,
            "target_mpp": options.target_mpp,
            "effective_mpp": plan.choice.effective_mpp,
            "level": plan.choice.level,
            "level_mpp": plan.choice.level_mpp,
            "resize_scale": plan.choice.scale,
        },
        "grid": plan.grid.to_dict(),
        "tissue": {
            "method": "hsv-saturation-otsu",
            "params": options.tissue.to_dict(),
            "min_tissue_fraction": options.min_tissue_fraction,
            "mask_mpp": plan.thumbnail.mpp,
            "mask_downsample": plan.thumbnail.downsample,
            "slide_tissue_fraction": plan.slide_tissue_fraction,
        },
        "tile_order": f"blocks of {options.block_tiles}x{options.block_tiles} grid positions, row-major",
        "coords": "level-0 pixels, tile origin (x, y)",
    }


def tile_slide(
    slide_path: str | Path,
    out: str | Path,
    options: TileOptions | None = None,
    *,
    backend: str = "auto",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> TileReport:
    """Tile one slide into the Zarr store ``out``: resumes a partial store, skips a complete one.

    Errors name the slide and the fix: :class:`SlideError` (cannot open/read; the partial store is
    removed), :class:`ResolutionError` (no mpp), :class:`TissueError` (no tissue tiles),
    :class:`StoreError` (other parameters, disk full; a partial store is kept for resuming).
    """
    with remove_created_folders_on_failure(Path(out).parent):  # no empty folders after a failure
        opts = options or TileOptions()
        out_p = Path(out)
        refuse_overwriting_inputs([out_p, partial_path(out_p)], [Path(slide_path)])
        t0 = time.perf_counter()
        reader = open_slide(slide_path, backend)
        try:
            with store_lock(out_p):  # one writer per store: a second process gets one clear error
                params = {
                    **opts.store_params(),
                    "fingerprint": slide_fingerprint(reader.path),
                    "backend": reader.backend,
                }
                state = existing_state(out_p, params, overwrite=overwrite)
                if state == "complete":
                    return _report_existing(slide_path, out_p, time.perf_counter() - t0)
                plan = plan_slide(reader, opts)
                require_tissue(plan, slide_path, opts)
                meta = _slide_meta(reader, plan, opts, params["fingerprint"])
                writer = TileStoreWriter.resume(out_p) if state == "partial" else None
                if writer is not None and not writer.matches_layout(plan.colrow, plan.coords_l0):
                    # Same parameters, other tiles (e.g. another scikit-image): the chunks already written
                    # belong to another layout, so they cannot be kept; start this (our own) store over.
                    warnings.warn(
                        f"{out_p}: the interrupted run planned other tiles than this one (the tissue "
                        "mask changed); its partial store is discarded and tiling starts over",
                        stacklevel=2,
                    )
                    shutil.rmtree(partial_path(out_p))
                    state, writer = "absent", None
                if writer is not None:
                    stain = writer.meta.get("stain")  # resume with the model the first run fitted
                    meta["stain"] = stain
                else:
                    stain = fit_slide_stain(reader, plan, opts) if opts.normalize == "macenko" else None
                    meta["stain"] = stain
                    writer = TileStoreWriter.create(
                        out_p,
                        tile_px=opts.tile_px,
                        chunk_tiles=opts.chunk_tiles,
                        coords_l0=plan.coords_l0,
                        grid_colrow=plan.colrow,
                        tissue_fraction=plan.tissue_fraction,
                        thumbnail=plan.thumbnail.image,
                        tissue_mask=plan.mask,
                        meta={**meta, "params": params, "store_id": uuid.uuid4().hex},
                    )
                transform = stain_transform(stain, opts.stain_reference) if stain else None
                written = _write_pending(reader, plan, writer, opts, progress, transform)
                seconds = time.perf_counter() - t0
                report = _report(
                    slide_path,
                    out_p,
                    "resumed" if state == "partial" else "written",
                    plan,
                    written,
                    seconds,
                    meta,
                )
                writer.finalize(
                    run={
                        "seconds": round(seconds, 3),
                        "tiles_written_this_run": written,
                        "tiles_per_s": report.tiles_per_s,
                        "resumed": state == "partial",
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
                return report
        finally:
            reader.close()


def _write_pending(
    reader: SlideReader,
    plan: SlidePlan,
    writer: TileStoreWriter,
    opts: TileOptions,
    progress: ProgressFn | None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> int:
    """Read and write every chunk not yet done; returns the number of tiles written."""
    c = writer.chunk_tiles
    pending = writer.pending_chunks()
    wanted = np.concatenate(
        [np.arange(k * c, min((k + 1) * c, plan.n_tiles)) for k in pending] or [np.zeros(0, np.int64)]
    )
    done_before = plan.n_tiles - len(wanted)
    if progress:
        progress(done_before, plan.n_tiles)
    buffers: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    written = read = 0
    try:
        for idx, tiles in iter_tiles(
            reader, plan, wanted, block_tiles=opts.block_tiles, workers=opts.workers, transform=transform
        ):
            for k in (int(k) for k in np.unique(idx // c)):
                sel = idx // c == k
                start = k * c
                size = min(c, plan.n_tiles - start)
                buf = buffers.setdefault(k, np.empty((size, opts.tile_px, opts.tile_px, 3), np.uint8))
                buf[idx[sel] - start] = tiles[sel]
                filled[k] = filled.get(k, 0) + int(sel.sum())
                if filled[k] == size:
                    writer.write_chunk(k, buffers.pop(k))
                    written += size
            read += len(idx)
            if progress:
                progress(done_before + read, plan.n_tiles)
    except SlideError:
        # The slide itself is bad: resuming cannot help, so leave nothing behind.
        shutil.rmtree(partial_path(writer.out), ignore_errors=True)
        raise
    return written


def _report(
    slide: str | Path,
    out: Path,
    status: str,
    plan: SlidePlan,
    written: int,
    seconds: float,
    meta: dict[str, Any],
) -> TileReport:
    return TileReport(
        slide=str(slide),
        out=str(out),
        status=status,
        n_tiles=plan.n_tiles,
        tiles_written=written,
        seconds=round(seconds, 3),
        tiles_per_s=round(written / seconds, 2) if seconds > 0 else 0.0,
        slide_tissue_fraction=plan.slide_tissue_fraction,
        mpp_source=plan.resolution.source,
        effective_mpp=plan.choice.effective_mpp,
        level=plan.choice.level,
        meta=meta,
    )


def _report_existing(slide: str | Path, out: Path, seconds: float) -> TileReport:
    """Report for a store that was already complete (nothing read, nothing written)."""
    meta = open_tile_store(out).meta
    return TileReport(
        slide=str(slide),
        out=str(out),
        status="already complete",
        n_tiles=int(meta["n_tiles"]),
        tiles_written=0,
        seconds=round(seconds, 3),
        tiles_per_s=0.0,
        slide_tissue_fraction=float(meta["tissue"]["slide_tissue_fraction"]),
        mpp_source=str(meta["resolution"]["mpp_source"]),
        effective_mpp=float(meta["resolution"]["effective_mpp"]),
        level=int(meta["resolution"]["level"]),
        meta=meta,
    )
