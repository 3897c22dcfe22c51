"""One slide end to end: plan, (normalize,) score with Dask + onnxruntime, aggregate, write outputs.

Outputs for ``--out NAME.tif``: ``NAME.tif`` (pyramidal heatmap), ``NAME.overlay.png``,
``NAME.geojson`` (QuPath), ``NAME.tiles.csv`` and, written last, ``NAME.run.json`` (the run
manifest, which also marks the slide as finished for resumed folder runs).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.aggregate import (
    LabelRule,
    heatmap_grid,
    ood_summary,
    slide_label,
    tile_area_mm2,
    tumour_regions,
)
from wsi_pipeline.errors import ModelError, OutputError
from wsi_pipeline.inference.card import ModelCard, resolve_model
from wsi_pipeline.inference.scoring import ProgressFn, ScoreResult, make_tasks, run_tasks
from wsi_pipeline.io.outputs import (
    geojson_features,
    heatmap_canvas,
    write_heatmap_tiff,
    write_json,
    write_overlay_png,
    write_tiles_csv,
)
from wsi_pipeline.provenance import (
    check_writable,
    environment_versions,
    refuse_overwriting_inputs,
    remove_created_folders_on_failure,
)
from wsi_pipeline.tiling.plan import TileOptions
from wsi_pipeline.tiling.source import TileSource, open_source
from wsi_pipeline.tiling.tiler import tile_slide


@dataclass(frozen=True)
class RunOptions:
    """Everything that shapes one slide's results (besides the slide and the model)."""

    tile: TileOptions = field(default_factory=TileOptions)
    label: LabelRule = field(default_factory=LabelRule)
    device: str = "auto"
    batch_size: int = 64
    chunk_tiles: int = 256  # tiles per Dask task
    workers: int | None = None  # local Dask threads
    backend: str = "auto"
    tiles_out: Path | None = None  # also write the (normalized) tile store here, then score from it
    resources: dict[str, float] | None = None  # distributed worker resources per task, e.g. {"GPU": 1}
    normalize_from_card: bool = True  # normalize stain as the model card asks when tile.normalize is "none"
    # What the user asked for explicitly (CLI --target-mpp / --tile-size): checked against the model
    # card. tile.target_mpp and tile.tile_px themselves are always set from the card.
    requested_target_mpp: float | None = None
    requested_tile_px: int | None = None


def output_paths(heatmap: Path) -> dict[str, Path]:
    """All outputs of one slide, named after the heatmap path."""
    base = heatmap.with_suffix("") if heatmap.suffix.lower() in (".tif", ".tiff") else heatmap
    return {
        "heatmap": heatmap,
        "overlay": base.with_name(base.name + ".overlay.png"),
        "geojson": base.with_name(base.name + ".geojson"),
        "tiles_csv": base.with_name(base.name + ".tiles.csv"),
        "manifest": base.with_name(base.name + ".run.json"),
    }


def check_model_fits(
    card: ModelCard, tile: TileOptions, *, target_mpp: float | None = None, tile_px: int | None = None
) -> TileOptions:
    """Tile at the model's resolution and size. ``target_mpp`` / ``tile_px``: what the user asked for
    explicitly (``--target-mpp``, ``--tile-size``); a request that contradicts the card is refused,
    never silently replaced."""
    if target_mpp is not None and abs(target_mpp - card.mpp) / card.mpp > tile.level_tolerance:
        raise ModelError(
            f"{card.path}: the model was trained at {card.mpp} um/px but tiles were requested at "
            f"{target_mpp} um/px; drop --target-mpp (tiles are cut at the model's resolution) or use a "
            "model trained at that resolution"
        )
    if tile_px is not None and tile_px != card.input_size_px:
        raise ModelError(
            f"{card.path}: the model takes {card.input_size_px} px tiles but --tile-size {tile_px} was "
            "given; drop --tile-size (tiles are cut at the model's size)"
        )
    return replace(tile, target_mpp=card.mpp, tile_px=card.input_size_px)


def _params(card: ModelCard, opts: RunOptions, source: TileSource) -> dict[str, Any]:
    """The resume key of a run: the source's identity (content + tiling), the model and the label rule."""
    return {
        "source": source.identity,
        "fingerprint": source.fingerprint,
        "model_sha256": card.sha256,
        "tile": source.params,
        "label": opts.label.to_dict(),
        "backend": opts.backend,
    }


def finished(manifest: Path, params: dict[str, Any]) -> bool:
    """True when ``manifest`` records a finished run with the same parameters."""
    import json

    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return bool(data.get("status") == "complete" and data.get("params") == params)


def run_slide(
    slide: str | os.PathLike[str],
    heatmap: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    options: RunOptions | None = None,
    client: Any = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Score one slide (or a finished tile store) and write its outputs; returns the manifest.

    Skips the slide when its manifest shows a finished run with the same parameters (unless
    ``overwrite``).
    """
    with remove_created_folders_on_failure(Path(heatmap).parent):  # no empty folders after a failure
        t0 = time.perf_counter()
        opts = options or RunOptions()
        card = resolve_model(model)
        if (
            opts.normalize_from_card
            and card.stain_normalization == "macenko"
            and opts.tile.normalize == "none"
        ):
            opts = replace(opts, tile=replace(opts.tile, normalize="macenko"))
        tile_opts = check_model_fits(
            card, opts.tile, target_mpp=opts.requested_target_mpp, tile_px=opts.requested_tile_px
        )
        opts = replace(opts, tile=tile_opts, label=opts.label.with_threshold(card.threshold))
        slide_p, paths = Path(slide), output_paths(Path(heatmap))
        outputs = list(paths.values()) + ([Path(opts.tiles_out)] if opts.tiles_out is not None else [])
        for out_p in paths.values():  # checked now: otherwise the write would fail after all the scoring
            if out_p.is_dir():
                raise OutputError(
                    f"{out_p}: is a folder, not a file name for the output; give e.g. {out_p}/NAME.tif"
                )
        refuse_overwriting_inputs(outputs, [slide_p, card.onnx_path, card.path])
        source = open_source(slide_p, tile_opts, opts.backend)
        asked_by = "the model card asks for" if opts.normalize_from_card else "you asked for"
        source.check_model(card, normalize=opts.tile.normalize, asked_by=asked_by)
        params = _params(card, opts, source)
        if not overwrite and finished(paths["manifest"], params):
            import json

            manifest: dict[str, Any] = json.loads(paths["manifest"].read_text())
            manifest["skipped"] = True
            return manifest
        n_workers = opts.workers or min(4, os.cpu_count() or 1)
        threads = max(1, (os.cpu_count() or 1) // n_workers) if client is None else None
        # Fail now, not after reading the slide: the output folder must be writable and, for local runs,
        # the model must load on the device (the session is cached and reused by the local tasks).
        check_writable(paths["heatmap"].parent)
        if client is None:
            from wsi_pipeline.inference.scoring import cached_session

            cached_session(str(card.path), str(card.onnx_path), opts.device, threads)

        if opts.tiles_out is not None and source.kind == "slide":
            tile_slide(slide_p, opts.tiles_out, tile_opts, backend=opts.backend)
            source = open_source(opts.tiles_out, tile_opts, opts.backend)

        tasks = make_tasks(
            source, card, device=opts.device, batch_size=opts.batch_size, chunk_tiles=opts.chunk_tiles,
            threads=threads,
        )  # fmt: skip
        result = run_tasks(
            tasks, len(card.classes), client=client, workers=n_workers, progress=progress,
            resources=opts.resources,
        )  # fmt: skip
        return _write_outputs(paths, card, opts, params, result, source, t0)


def _write_outputs(
    paths: dict[str, Path],
    card: ModelCard,
    opts: RunOptions,
    params: dict[str, Any],
    result: ScoreResult,
    source: TileSource,
    t0: float,
) -> dict[str, Any]:
    layout = source.layout
    grid, colrow, coords, fractions = layout.grid, layout.colrow, layout.coords_l0, layout.tissue_fraction
    mpp0, slide_wh = layout.mpp_l0, layout.slide_wh
    pos = card.positive_index
    p_pos = result.probs[:, pos]
    cell, origin = float(grid.stride_l0_px), float(grid.cell_origin_l0)  # cells centred on their tiles
    canvas = heatmap_canvas(heatmap_grid(colrow, p_pos, grid.cols, grid.rows), slide_wh, cell, origin)
    label = slide_label(
        p_pos, coords, fractions, cell_area_mm2=tile_area_mm2(cell, mpp0), rule=opts.label,
        positive_name=card.positive_class,
    )  # fmt: skip
    label["ood"] = ood_summary(result.ood, card.ood_d_ref, card.ood_warn_above)
    boxes = grid.boxes_l0(colrow)
    write_heatmap_tiff(
        paths["heatmap"], canvas, cell_l0_px=cell, mpp_l0=mpp0, origin_l0=origin,
        description={"wsi_pipeline_heatmap": 1, "slide": source.slide_name,
                     "value": f"P({card.positive_class})",
                     "colours": "0 dark blue -> 1 red; white = not scored", "model_sha256": card.sha256},
    )  # fmt: skip
    write_overlay_png(
        paths["overlay"], layout.thumbnail, canvas, thumb_downsample=layout.thumbnail_downsample,
        cell_l0_px=cell, origin_l0=origin,
    )  # fmt: skip
    regions = tumour_regions(boxes, p_pos >= opts.label.tile_p)
    write_json(
        paths["geojson"],
        geojson_features(boxes, result.probs, card.classes, pos, tile_threshold=opts.label.tile_p,
                         regions=regions),
    )  # fmt: skip
    columns: dict[str, np.ndarray] = {
        "x_l0": coords[:, 0], "y_l0": coords[:, 1],
        "width_l0": np.full(len(coords), round(grid.tile_l0_px, 3)),
        "height_l0": np.full(len(coords), round(grid.tile_l0_px, 3)),
        "col": colrow[:, 0], "row": colrow[:, 1], "tissue_fraction": fractions,
    }  # fmt: skip
    for i, c in enumerate(card.classes):
        columns[f"p_{c}"] = result.probs[:, i]
    if result.ood is not None:
        columns["ood_distance"] = result.ood
    write_tiles_csv(paths["tiles_csv"], columns)
    seconds = time.perf_counter() - t0
    n = len(p_pos)
    manifest = {
        "status": "complete",
        "slide": str(source.slide_path),
        "source": {"kind": source.kind, "path": str(source.path), "identity": source.identity},
        "params": params,
        "label": label,
        "n_tiles": n,
        "seconds": round(seconds, 3),
        "tiles_per_s": round(n / seconds, 2) if seconds else 0.0,
        "timings": {
            "scoring_s": round(result.seconds, 3),
            "read_normalize_s_summed": round(result.read_seconds, 3),
            "inference_s_summed": round(result.infer_seconds, 3),
            "tasks": result.n_tasks,
        },
        "provider": result.provider,
        "scheduler": result.scheduler,
        "device_requested": opts.device,
        "batch_size": opts.batch_size,
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256, "card": str(card.path),
                  "classes": list(card.classes), "positive_class": card.positive_class, "mpp": card.mpp},
        "resolution": layout.records.get("resolution"),
        "tissue": layout.records.get("tissue"),
        "grid": grid.to_dict(),
        "stain": layout.stain,
        "heatmap": {"cell_l0_px": cell, "origin_l0": origin, "mpp": cell * mpp0, "shape": list(canvas.shape)},
        "outputs": {k: str(v) for k, v in paths.items()},
        "package_version": __version__,
        "versions": environment_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    write_json(paths["manifest"], manifest)  # last: its presence marks the slide finished
    return manifest
