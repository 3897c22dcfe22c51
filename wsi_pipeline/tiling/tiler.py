"""Slide -> Zarr tile store: ``tile_slide`` plans the slide (:mod:`wsi_pipeline.tiling.plan`), reads
its tiles (:mod:`wsi_pipeline.tiling.read`) and writes them chunk by chunk into a resumable store.
"""

from __future__ import annotations

import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.errors import SlideError
from wsi_pipeline.io.slide import (
    SlideReader,
    open_slide,
    qupath_origin_l0,
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
from wsi_pipeline.tiling.focus import focus_measurable, focus_scores, focus_summary, upsampled_scan_mpp
from wsi_pipeline.tiling.plan import SlidePlan, TileOptions, plan_slide, require_tissue
from wsi_pipeline.tiling.read import fit_slide_stain, iter_tiles, stain_transform


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
    focus: dict[str, Any] | None = None  # the tiles' focus record (tiling.focus.focus_summary)


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
            "qupath_origin_l0": list(qupath_origin_l0(reader)),
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
            **plan.resolution.conflict_record(),
        },
        "grid": plan.grid.to_dict(),
        "tissue": {
            "method": "hsv-saturation-otsu",
            "params": options.tissue.to_dict(),
            "min_tissue_fraction": options.min_tissue_fraction,
            "mask_mpp": plan.thumbnail.mpp,
            "mask_downsample": plan.thumbnail.downsample,
            "slide_tissue_fraction": plan.slide_tissue_fraction,
            "pen_marks_mm2": plan.pen_marks_mm2,
            "regions": plan.regions,
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
    wait: bool = False,
) -> TileReport:
    """Tile one slide into the Zarr store ``out``: resumes a partial store, skips a complete one.

    Errors name the slide and the fix: :class:`SlideError` (cannot open/read; the partial store is
    removed), :class:`ResolutionError` (no mpp), :class:`TissueError` (no tissue tiles),
    :class:`StoreError` (other parameters, disk full; a partial store is kept for resuming),
    :class:`BusyError` (another run writes ``out``; with ``wait``, wait for it instead).
    """
    with remove_created_folders_on_failure(Path(out).parent):  # no empty folders after a failure
        opts = options or TileOptions()
        out_p = Path(out)
        refuse_overwriting_inputs([out_p, partial_path(out_p)], [Path(slide_path)])
        t0 = time.perf_counter()
        reader = open_slide(slide_path, backend)
        try:
            with store_lock(out_p, wait=wait):  # one writer per store: a second process gets one clear error
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
                        focus=focus_measurable(opts.tile_px, plan.choice.effective_mpp),
                    )
                transform = stain_transform(stain, opts.stain_reference) if stain else None
                focus = np.full(plan.n_tiles, np.nan, np.float32) if writer.has_focus else None
                written = _write_pending(reader, plan, writer, opts, progress, transform, focus)
                if focus is not None:
                    _measure_earlier_chunks(writer, focus, plan.choice.effective_mpp)
                    writer.write_focus(focus)
                seconds = time.perf_counter() - t0
                report = _report(
                    slide_path,
                    out_p,
                    "resumed" if state == "partial" else "written",
                    plan,
                    written,
                    seconds,
                    meta,
                    focus_summary(
                        focus,
                        coarse_scan_mpp=upsampled_scan_mpp(
                            plan.resolution.mpp, plan.choice.effective_mpp, opts.level_tolerance
                        ),
                    ),
                )
                writer.finalize(
                    focus=report.focus,
                    run={
                        "seconds": round(seconds, 3),
                        "tiles_written_this_run": written,
                        "tiles_per_s": report.tiles_per_s,
                        "resumed": state == "partial",
                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
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
    focus: np.ndarray | None = None,
) -> int:
    """Read and write every chunk not yet done; returns the number of tiles written. ``focus``: filled
    with the focus scores of the tiles written (float32 (N,), NaN elsewhere)."""
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
                    chunk = buffers.pop(k)
                    writer.write_chunk(k, chunk)
                    if focus is not None:
                        focus[start : start + size] = focus_scores(chunk, plan.choice.effective_mpp)
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
    focus: dict[str, Any] | None = None,
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
        focus=focus,
    )


def _measure_earlier_chunks(writer: TileStoreWriter, focus: np.ndarray, tile_mpp: float) -> None:
    """Fill in the focus scores of chunks an interrupted run wrote (read back from the store)."""
    c = writer.chunk_tiles
    for k in range(-(-len(focus) // c)):
        if np.isnan(focus[k * c]):
            focus[k * c : (k + 1) * c] = focus_scores(writer.chunk_tiles_written(k), tile_mpp)


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
        focus=meta.get("focus"),
    )
