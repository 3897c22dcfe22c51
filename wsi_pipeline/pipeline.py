"""One slide end to end: plan, (normalize,) score with Dask + onnxruntime, aggregate, write outputs.

Outputs for ``--out NAME.tif``: ``NAME.tif`` (probability map: pyramidal uint8 TIFF, 255 x P),
``NAME.colour.tif`` (the same in colour), ``NAME.overlay.png``, ``NAME.geojson`` (QuPath),
``NAME.tiles.csv``, ``NAME.report.html`` and, written last, ``NAME.run.json`` (the run manifest,
which also marks the slide as finished for resumed folder runs). See :func:`output_paths`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.aggregate import (
    LabelRule,
    heatmap_grid,
    ood_summary,
    pen_evidence,
    region_evidence,
    region_stats,
    slide_label,
    stain_summary,
    tile_area_mm2,
    tumour_regions,
)
from wsi_pipeline.errors import BusyError, ModelError, OutputError, UsageError
from wsi_pipeline.inference.card import ModelCard, resolve_model_deferred
from wsi_pipeline.inference.scoring import (
    ProgressFn,
    ScoreResult,
    cached_session,
    make_tasks,
    run_tasks,
    thread_plan,
)
from wsi_pipeline.io.locks import Claim, claim
from wsi_pipeline.io.outputs import (
    HEATMAP_FORMAT,
    geojson_features,
    heatmap_canvas,
    render_overlay,
    write_colour_tiff,
    write_compact_json,
    write_json,
    write_overlay_png,
    write_probability_tiff,
    write_tiles_csv,
)
from wsi_pipeline.io.ownership import GENERATOR, refuse_foreign_files
from wsi_pipeline.provenance import (
    check_name_lengths,
    check_writable,
    environment_versions,
    file_sha256,
    peak_rss_mib,
    process_age_s,
    refuse_overwriting_inputs,
    remove_created_folders_on_failure,
)
from wsi_pipeline.reuse import EXACT, prior_scores, scores_from_table
from wsi_pipeline.stain.macenko import REFERENCE, StainModel
from wsi_pipeline.tiling.focus import focus_summary, upsampled_scan_mpp
from wsi_pipeline.tiling.plan import TileOptions
from wsi_pipeline.tiling.source import Layout, TileSource, open_source
from wsi_pipeline.tiling.tissue import TissueParams


@dataclass(frozen=True)
class RunOptions:
    """Everything that shapes one slide's results (besides the slide and the model)."""

    tile: TileOptions = field(default_factory=TileOptions)
    label: LabelRule = field(default_factory=LabelRule)
    device: str = "auto"
    precision: str = "auto"  # fp32, fp16 or auto: fp16 on a GPU where the card allows it
    batch_size: int = 64
    chunk_tiles: int = 256  # tiles per Dask task
    workers: int | None = None  # reader threads (local runs; default from inference.scoring.thread_plan)
    backend: str = "auto"
    tiles_out: Path | None = None  # also write the (normalized) tile store here, then score from it
    resources: dict[str, float] | None = None  # distributed worker resources per task, e.g. {"GPU": 1}
    normalize_from_card: bool = True  # normalize stain as the model card asks when tile.normalize is "none"
    # What the user asked for explicitly (CLI --target-mpp / --tile-size): checked against the model
    # card. tile.target_mpp and tile.tile_px themselves are always set from the card.
    requested_target_mpp: float | None = None
    requested_tile_px: int | None = None
    geojson_tiles: bool = True  # one GeoJSON detection per tile (off for huge slides: regions only)
    overlay_px: int = 1000  # long side of the slide picture in NAME.overlay.png
    # The command line that asked for the run, recorded in the manifest as it was typed (with the folder
    # it was typed in) so that any result can be made again; not part of the resume key.
    command: tuple[str, ...] | None = None
    # When the run began (wall clock, s since the epoch): with --overwrite, a finished result that
    # another run wrote since then is that run's fresh result, taken as it is, not an earlier one to
    # replace (two folder runs with --overwrite score each slide once). Not part of the resume key.
    started_at: float = field(default_factory=time.time, compare=False)
    # This run's identity, recorded in each manifest it writes: its own results are never "another run's".
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex, compare=False)

    def __post_init__(self) -> None:
        # Checked here too (the CLI checks its options): a batch of 0 tiles would never finish
        for name, count in (("batch_size", self.batch_size), ("chunk_tiles", self.chunk_tiles),
                            ("workers", 1 if self.workers is None else self.workers)):  # fmt: skip
            if count < 1:
                raise UsageError(f"{name} must be at least 1, not {count}")


def output_paths(heatmap: Path) -> dict[str, Path]:
    """All outputs of one slide: ``NAME.tif`` (the probability map, the path given) and, beside it,
    ``NAME.colour.tif``, ``NAME.overlay.png``, ``NAME.geojson``, ``NAME.asap.xml``, ``NAME.tiles.csv``,
    ``NAME.report.html`` and, written last, ``NAME.run.json``. ``NAME`` is the heatmap path without
    its ``.tif``/``.tiff`` suffix."""
    base = heatmap.with_suffix("") if heatmap.suffix.lower() in (".tif", ".tiff") else heatmap

    def beside(suffix: str) -> Path:
        return base.with_name(base.name + suffix)

    return {
        "heatmap": heatmap,
        "colour": beside(".colour.tif"),
        "overlay": beside(".overlay.png"),
        "geojson": beside(".geojson"),
        "asap_xml": beside(".asap.xml"),
        "tiles_csv": beside(".tiles.csv"),
        "report": beside(".report.html"),
        "manifest": beside(".run.json"),
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
        "outputs_format": HEATMAP_FORMAT,  # runs whose outputs an older version wrote are redone
    }


#: slide formats whose scanned rectangle QuPath crops to (``io.slide.qupath_origin_l0``): their runs
#: from before the GeoJSON counted from it are done again
CROPPED_BY_QUPATH = (".mrxs", ".scn", ".bif")


def finished(manifest: Path, params: dict[str, Any], slide: Path | None = None) -> bool:
    """True when ``manifest`` records a finished run with the same parameters (and, for a slide of a
    format QuPath crops, GeoJSON in QuPath's frame: ``qupath_origin_l0`` recorded)."""
    import json

    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if slide is not None and slide.suffix.lower() in CROPPED_BY_QUPATH and "qupath_origin_l0" not in data:
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
        return score_slide(
            slide,
            heatmap,
            model=model,
            options=options,
            client=client,
            progress=progress,
            overwrite=overwrite,
        )()


def score_slide(
    slide: str | os.PathLike[str],
    heatmap: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    options: RunOptions | None = None,
    client: Any = None,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    waiting_on: BusyError | None = None,
    wait: bool = True,
) -> Callable[[], dict[str, Any]]:
    """:func:`run_slide` up to its outputs: checks, plan and scoring; returns the function that writes
    the outputs and returns the manifest (for a skipped slide, the finished run's manifest). A folder
    run calls it on a writer thread, so one slide's outputs are written while the next slide is planned
    and scored. Call that function once: it also releases the outputs' claim.

    The outputs are claimed (``NAME.run.lock``, :mod:`wsi_pipeline.io.locks`) from before the slide
    is opened until they are written: while another run holds them this raises :class:`BusyError`.
    ``waiting_on``: that error, from an earlier call: wait for that run to end, then take the slide as
    it left it: its finished result (even with ``overwrite``: it is not an earlier run's), or, if it
    died first, score the slide here. ``wait`` False: do not wait; raise :class:`BusyError` again if
    that run still holds the outputs."""
    t0 = time.perf_counter()
    opts = options or RunOptions()
    # The model file is hashed while the slide is opened and planned; a file that does not match
    # its card is reported before the slide's errors, and the session never loads it.
    card, verify_model = resolve_model_deferred(model)
    try:
        if (
            opts.normalize_from_card
            and card.stain_normalization == "macenko"
            and opts.tile.normalize == "none"
        ):
            opts = replace(opts, tile=replace(opts.tile, normalize="macenko"))
        if (
            card.stain_reference
            and opts.tile.normalize == "macenko"
            and opts.tile.stain_reference is REFERENCE
        ):
            # the card's own target stain, unless --stain-reference named another
            own = StainModel.from_dict(card.stain_reference)
            name = f"the model card's reference stain ({card.name} {card.version})"
            opts = replace(opts, tile=replace(opts.tile, stain_reference=own, stain_reference_name=name))
        tile_opts = check_model_fits(
            card, opts.tile, target_mpp=opts.requested_target_mpp, tile_px=opts.requested_tile_px
        )
        opts = replace(opts, tile=tile_opts, label=opts.label.with_threshold(card.threshold))
        slide_p, paths = Path(slide), output_paths(Path(heatmap))
        outputs = list(paths.values()) + ([Path(opts.tiles_out)] if opts.tiles_out is not None else [])
        check_name_lengths(outputs, fix="choose an --out name at least {over} bytes shorter")
        for out_p in paths.values():  # checked now: otherwise the write would fail after all the scoring
            if out_p.is_dir():
                raise OutputError(
                    f"{out_p}: is a folder, not a file name for the output; give e.g. {out_p}/NAME.tif"
                )
        refuse_overwriting_inputs(outputs, [slide_p, card.onnx_path, card.path])
        try:
            claimed = claim_outputs(paths, wait=waiting_on is not None and wait)
        except BusyError as exc:
            exc.seen = _written(paths["manifest"])
            raise
    except Exception:
        verify_model()
        raise
    try:
        # A manifest that the run we waited on wrote is that run's result, not one to overwrite; so is
        # one another run finished since this run began (it held the slide before this run got to it).
        by_other = (waiting_on is not None and _written(paths["manifest"]) != waiting_on.seen) or (
            overwrite and _by_other_run_since(paths["manifest"], opts)
        )
        take = not overwrite or by_other
        write = _score_claimed(slide_p, paths, card, verify_model, opts, client, progress, take, by_other, t0)
    except BaseException:
        claimed.release()
        raise

    def write_and_release() -> dict[str, Any]:
        try:
            return write()
        finally:
            claimed.release()

    return write_and_release


def claim_outputs(paths: dict[str, Path], *, wait: bool = False) -> Claim:
    """Claim the outputs :func:`output_paths` names (lock file ``NAME.run.lock`` beside them)."""

    def busy(who: str) -> str:
        return (
            f"{paths['heatmap']}: another run ({who}) is scoring a slide into these outputs; wait for it "
            "to finish (a re-run then finds the slide done), or choose another --out"
        )

    return claim(paths["manifest"].with_suffix(".lock"), busy, wait=wait)


def _written(path: Path) -> tuple[int, int, int] | None:
    """Which version of ``path`` is there (inode, mtime, size; atomic writes make a new inode), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _by_other_run_since(manifest: Path, opts: RunOptions) -> bool:
    """True when ``manifest`` was written since ``opts.started_at`` by a run other than this one."""
    import json

    try:
        if manifest.stat().st_mtime < opts.started_at:
            return False
        return bool(json.loads(manifest.read_text()).get("run_id") != opts.run_id)
    except (OSError, ValueError, AttributeError):
        return False


def _score_claimed(
    slide_p: Path,
    paths: dict[str, Path],
    card: ModelCard,
    verify_model: Callable[[], None],
    opts: RunOptions,
    client: Any,
    progress: ProgressFn | None,
    take_finished: bool,
    by_other: bool,
    t0: float,
) -> Callable[[], dict[str, Any]]:
    """:func:`score_slide` once its outputs are claimed; ``take_finished``: skip the slide when its
    manifest shows a finished run with the same parameters (``by_other``: one that another run wrote
    while this one waited: ``done_by_other_run`` in the manifest returned)."""
    tile_opts = opts.tile
    try:
        if take_finished:
            refuse_other_models_results(paths["manifest"], card)
        source = open_source(slide_p, tile_opts, opts.backend, picture_px=opts.overlay_px)
        asked_by = "the model card asks for" if opts.normalize_from_card else "you asked for"
        source.check_model(card, normalize=opts.tile.normalize, asked_by=asked_by)
        params = _params(card, opts, source)
        if take_finished and finished(paths["manifest"], params, slide_p):
            import json

            manifest: dict[str, Any] = json.loads(paths["manifest"].read_text())
            manifest["skipped"] = True
            if by_other:
                manifest["done_by_other_run"] = True
            verify_model()
            return lambda: manifest
        refuse_foreign_files(paths.values(), manifest=paths["manifest"])  # a user's case1.geojson, ...
        # Only the label rule changed since the finished run: its tile table holds every score
        prior = prior_scores(paths, params) if take_finished and opts.tiles_out is None else None
        local = client is None
        plan = thread_plan(readers=opts.workers, device=opts.device) if local else None
        threads = plan.session_threads if plan else None
        check_writable(paths["heatmap"].parent)  # fail now, not after all the scoring
    except Exception:
        verify_model()
        raise
    phases: dict[str, float] = {**_startup_phases(t0), "setup_s": time.perf_counter() - t0}
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-session") as ex:
        # The model is verified and loads (on the device) while the slide is planned; a model that
        # does not match its card or does not load is reported before any error of the slide's,
        # and before a tile store is written.
        # On a cluster this process only checks the model (the workers run it, on their GPUs if
        # asked): checked on the CPU, so a head node without a GPU can send work to GPU workers.
        device, precision = (opts.device, opts.precision) if local else ("cpu", "fp32")
        if prior is None:
            job = ex.submit(_verified_session, verify_model, card, device, threads, precision)
        else:  # no session unless the table turns out not to fit the plan (then scoring makes one)
            job = ex.submit(verify_model)
        t = time.perf_counter()
        try:
            if opts.tiles_out is not None and source.kind == "slide":
                from wsi_pipeline.tiling.tiler import tile_slide

                job.result()
                tile_slide(slide_p, opts.tiles_out, tile_opts, backend=opts.backend)
                source = open_source(opts.tiles_out, tile_opts, opts.backend)
            source.layout  # noqa: B018 - open, plan (thumbnail, tissue, grid), fit the stain
        except Exception:
            job.result()  # raises the model's error if it has one
            raise
        phases["plan_s"] = time.perf_counter() - t
        t = time.perf_counter()
        job.result()
        phases["session_wait_s"] = time.perf_counter() - t
    if not local:  # the workers build their own sessions; this one only checked the model
        cached_session.cache_clear()

    # The overlay's slide picture does not depend on the scores: made meanwhile by a low-priority
    # thread from the cycles the scorer leaves idle.
    from wsi_pipeline.tiling.pictures import slide_picture

    picture = _low_priority(slide_picture, source, opts.overlay_px)
    versions = _low_priority(environment_versions)  # looked up (once a process) while scoring
    reused = None
    if prior is not None:
        sha = prior["output_sha256"]["tiles_csv"]
        reused = scores_from_table(paths["tiles_csv"], source.layout, card, prior, sha)
    if reused is not None:
        result = reused
        if progress is not None:
            progress(len(result.probs), len(result.probs))
    else:
        tasks = make_tasks(
            source, card, device=opts.device, batch_size=opts.batch_size, chunk_tiles=opts.chunk_tiles,
            threads=threads, precision=opts.precision,
        )  # fmt: skip
        result = run_tasks(
            tasks, len(card.classes), client=client, workers=opts.workers, progress=progress,
            resources=opts.resources,
        )  # fmt: skip
    phases["scoring_s"] = result.seconds
    result.extra["phases"] = phases
    return functools.partial(
        _write_outputs, paths, card, opts, params, result, source, t0, picture=picture, versions=versions
    )


def refuse_other_models_results(manifest: Path, card: ModelCard) -> None:
    """Raise :class:`OutputError` when ``manifest`` records a finished run of another model than
    ``card``'s: another model's results are another experiment (a pathologist may have reviewed them),
    so they are replaced only on ``--overwrite``."""
    import json

    try:
        data = json.loads(manifest.read_text())
        sha = data["params"]["model_sha256"]
        model = data.get("model") or {}
    except (OSError, ValueError, KeyError, TypeError):
        return
    if data.get("status") != "complete" or sha == card.sha256:
        return
    raise OutputError(
        f"{manifest}: holds the results of model {model.get('name')} {model.get('version')} (sha256 "
        f"{str(sha)[:12]}), not of {card.name} {card.version} ({card.sha256[:12]}) that this run uses; "
        "they are kept: give another --out to keep both, or --overwrite to replace them"
    )


def _verified_session(
    verify: Callable[[], None], card: ModelCard, device: str, threads: int | None, precision: str
) -> Any:
    """The model's session once its file matches the card (``verify`` raises otherwise)."""
    verify()
    return cached_session(str(card.path), str(card.onnx_path), device, threads, precision)


_started = threading.Event()  # set by the first run_slide of this process


def _startup_phases(t0: float) -> dict[str, float]:
    """For the first slide of a process: seconds from the process's start to this package's import
    (interpreter, the caller's own imports) and from there to ``run_slide`` (imports, the command
    line); later slides of the process get none."""
    if _started.is_set():
        return {}
    _started.set()
    import wsi_pipeline

    out = {"imports_to_run_s": t0 - wsi_pipeline.IMPORTED_AT}
    age = process_age_s()
    if age is not None:  # measured now, at 10 ms resolution
        out["process_start_to_imports_s"] = max(0.0, age - (time.perf_counter() - wsi_pipeline.IMPORTED_AT))
    return out


def _low_priority(fn: Any, *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` in a thread at the lowest CPU priority (Linux: nice 19 for that thread)."""

    def run() -> Any:
        with contextlib.suppress(AttributeError, OSError):  # not Linux: an ordinary thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        return fn(*args)

    ex = ThreadPoolExecutor(1, thread_name_prefix="wsi-background")
    try:
        return ex.submit(run)
    finally:
        ex.shutdown(wait=False)


def _write_outputs(
    paths: dict[str, Path],
    card: ModelCard,
    opts: RunOptions,
    params: dict[str, Any],
    result: ScoreResult,
    source: TileSource,
    t0: float,
    *,
    picture: Future[Any],
    versions: Future[dict[str, str]],
) -> dict[str, Any]:
    t_outputs = time.perf_counter()
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
    label["stain"] = stain_summary(bool(layout.stain), card.stain_normalization == "macenko")
    label["focus"] = focus_summary(
        result.focus,
        coarse_scan_mpp=upsampled_scan_mpp(mpp0, card.mpp, opts.tile.level_tolerance),
        called=card.positive_class if label["positive"] else None,
        positive_name=card.positive_class,
    )
    boxes = grid.boxes_l0(colrow)
    regions = tumour_regions(boxes, p_pos >= opts.label.tile_p)
    stats = region_stats(regions, boxes, p_pos, p_pos >= opts.label.tile_p)
    label["evidence"]["regions"] = region_evidence(stats, mpp0)
    pen = None
    if (layout.records.get("tissue") or {}).get("pen_marks_mm2"):
        pen = _pen_ink(layout, opts.tile.tissue, boxes)
        label["evidence"]["pen"] = pen_evidence(
            pen.near, p_pos >= opts.label.tile_p, positive_name=card.positive_class, reach_um=PEN_REACH_UM
        )
    # The overlay (its PNG is the largest encode) is made on another core while this thread writes
    # the TIFFs and the tables and reads the report's top tiles. The manifest comes last.
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-outputs") as ex:
        blurred = _out_of_focus(label, result)
        overlay = ex.submit(_write_overlay, paths, card, opts, source, canvas, regions, picture, blurred)
        _write_tiffs(paths, card, opts, source, canvas)
        _write_tables(paths, card, opts, result, layout, boxes, regions, pen, stats, blurred)
        top_tiles = _top_tile_pictures(source, p_pos, len(label["evidence"]["top_tiles"]))
        pictures = overlay.result()
    seconds = time.perf_counter() - t0
    n = len(p_pos)
    manifest = {
        "status": "complete",
        "slide": str(source.slide_path),
        "source": {"kind": source.kind, "path": str(source.path), "identity": source.identity},
        "store": str(source.path) if source.kind == "store" else None,  # --tiles-out, or a store scored
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
            "session_waited_for_tiles_s": result.extra.get("wait_s"),
            **{k: round(v, 3) for k, v in result.extra.get("phases", {}).items()},
            "outputs_s": round(time.perf_counter() - t_outputs, 3),
            "peak_rss_mib": peak_rss_mib(),
        },
        "provider": result.provider,
        **({"scores_reused": result.extra["reused"]} if "reused" in result.extra else {}),
        "scores_in_tiles_csv": EXACT,  # the table holds them exactly: a label-rule change can take them
        "thread_plan": result.extra.get("thread_plan"),
        "scheduler": result.scheduler,
        "device_requested": opts.device,
        "precision_requested": opts.precision,
        "run": result.extra.get("run") or _run_details(card, result.provider, opts.precision),
        "batch_size": opts.batch_size,
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256, "card": str(card.path),
                  "classes": list(card.classes), "positive_class": card.positive_class, "mpp": card.mpp,
                  "optimized_copy": _optimized_copy(card, result.provider),
                  "known_defects": card.known_defects},
        "resolution": layout.records.get("resolution"),
        "qupath_origin_l0": list(_qupath_origin(layout)),  # the GeoJSON's (0, 0), in level-0 px
        "tissue": layout.records.get("tissue"),
        "grid": grid.to_dict(),
        "stain": layout.stain,
        "heatmap": {"cell_l0_px": cell, "origin_l0": origin, "mpp": cell * mpp0, "shape": list(canvas.shape),
                    "slide_size_l0": list(slide_wh), "encoding": "round(255 * P), 0 where not scored",
                    "overlay": pictures["overlay"], "geojson_tiles": opts.geojson_tiles},
        "outputs": {k: str(v) for k, v in paths.items()}
        | ({"store": str(opts.tiles_out)} if opts.tiles_out is not None and source.kind == "store" else {}),
        "command": {"argv": list(opts.command), "cwd": os.getcwd()} if opts.command else None,
        "run_id": opts.run_id,
        "package_version": __version__,
        "versions": versions.result(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    _write_report(paths, manifest, top_tiles, pictures)
    # What was written, so a later run replaces these files only while they are unchanged (io.ownership)
    manifest["output_sha256"] = {k: file_sha256(p) for k, p in paths.items() if k != "manifest"}
    write_json(paths["manifest"], manifest)  # last: its presence marks the slide finished
    return manifest


#: Tiles within this distance of marker-pen ink (um) are counted as beside it in the label's evidence.
PEN_REACH_UM = 50.0


@dataclass(frozen=True)
class PenInk:
    """The marker-pen ink left out of a slide's tissue: ``near`` (N,) the scored tiles within
    :data:`PEN_REACH_UM` of it (ink over tissue looks like hematoxylin and is scored: the tiles to
    check by eye); ``regions`` its outline, a shapely geometry in level-0 px."""

    near: np.ndarray
    regions: Any


def _pen_ink(layout: Layout, params: TissueParams, boxes: np.ndarray) -> PenInk:
    """:class:`PenInk` of ``layout``'s slide (from its thumbnail, as the plan found it)."""
    from wsi_pipeline.aggregate import mask_regions
    from wsi_pipeline.tiling.tissue import boxes_near, pen_mask

    ds = layout.thumbnail_downsample
    thumb_mpp = layout.mpp_l0 * ds
    pen = pen_mask(layout.thumbnail, mpp=thumb_mpp, params=params)
    near = boxes_near(pen, boxes, ds, reach_px=round(PEN_REACH_UM / thumb_mpp))
    return PenInk(near, mask_regions(pen, ds))


def _run_details(card: ModelCard, provider: str, precision: str) -> dict[str, Any]:
    """The precision of a run scored elsewhere (cluster workers), from the provider they used."""
    from wsi_pipeline.inference.scoring import run_details

    try:
        return run_details(card, provider.split(",")[0], precision)
    except Exception:  # the workers ran it; this only describes it
        return {"precision": precision}


def _optimized_copy(card: ModelCard, provider: str) -> str | None:
    """onnxruntime's optimized copy of the model this process's session came from, if cached."""
    try:
        import onnxruntime
    except ImportError:
        return None
    from wsi_pipeline.inference.model_cache import optimized_model_path

    path = optimized_model_path(card, provider, onnxruntime.__version__)
    return str(path) if path is not None and path.is_file() else None


def _write_tiffs(
    paths: dict[str, Path], card: ModelCard, opts: RunOptions, source: TileSource, canvas: np.ndarray
) -> None:
    """The probability and colour TIFFs (pyramids in the slide's level-0 geometry)."""
    layout = source.layout
    grid = layout.grid
    desc = {"slide": source.slide_name, "value": f"P({card.positive_class})", "threshold": opts.label.tile_p,
            "model": card.name, "model_version": card.version, "model_sha256": card.sha256}  # fmt: skip
    geo: dict[str, Any] = {
        "cell_l0_px": float(grid.stride_l0_px),
        "mpp_l0": layout.mpp_l0,
        "origin_l0": float(grid.cell_origin_l0),
        "slide_wh": layout.slide_wh,
    }
    write_probability_tiff(paths["heatmap"], canvas, description=desc, **geo)
    write_colour_tiff(paths["colour"], canvas, description=desc, **geo)


def _write_overlay(
    paths: dict[str, Path],
    card: ModelCard,
    opts: RunOptions,
    source: TileSource,
    canvas: np.ndarray,
    regions: Any,
    picture: Future[Any],
    out_of_focus: np.ndarray | None = None,
) -> dict[str, Any]:
    """The overlay PNG; returns the slide picture (for the report) and how the overlay was made.
    ``out_of_focus``: bool per tile, hatched on the overlay (slides warned about their focus)."""
    layout = source.layout
    grid = layout.grid
    pic = picture.result()  # the slide picture, made while the tiles were scored
    hatch = None
    if out_of_focus is not None:
        cells = heatmap_grid(layout.colrow, out_of_focus.astype(np.float32), grid.cols, grid.rows)
        hatch = (
            heatmap_canvas(cells, layout.slide_wh, float(grid.stride_l0_px), float(grid.cell_origin_l0)) > 0.5
        )
    overlay = render_overlay(
        pic.image, canvas, l0_per_px=pic.l0_per_px, cell_l0_px=float(grid.stride_l0_px), mpp_l0=layout.mpp_l0,
        threshold=opts.label.tile_p, origin_l0=float(grid.cell_origin_l0), regions=regions,
        positive_name=card.positive_class, picture_origin_l0=pic.origin_l0, roi=layout.regions_l0,
        hatch=hatch,
    )  # fmt: skip
    write_overlay_png(paths["overlay"], overlay)
    return {
        "picture": pic,
        "overlay": {"background": pic.origin, "size_px": [int(overlay.shape[1]), int(overlay.shape[0])],
                    "slide_px": [int(pic.image.shape[1]), int(pic.image.shape[0])],
                    "l0_per_px": round(pic.l0_per_px, 4),
                    "origin_l0": [round(v, 3) for v in pic.origin_l0]},
    }  # fmt: skip


def _out_of_focus(label: dict[str, Any], result: ScoreResult) -> np.ndarray | None:
    """Tiles out of focus (bool per tile) where the slide is warned about its focus, else None."""
    focus = label.get("focus") or {}
    if not focus.get("warning") or result.focus is None:
        return None
    return np.asarray(result.focus < focus["sharp_at_least"])


def _write_tables(
    paths: dict[str, Path],
    card: ModelCard,
    opts: RunOptions,
    result: ScoreResult,
    layout: Layout,
    boxes: np.ndarray,
    regions: Any,
    pen: PenInk | None = None,
    stats: list[dict[str, Any]] | None = None,
    out_of_focus: np.ndarray | None = None,
) -> None:
    """``NAME.geojson`` (tiles, tumour regions, pen ink left out and, on a slide warned about its
    focus, the out-of-focus tissue, for QuPath) and ``NAME.tiles.csv`` (one row a tile; ``focus``
    where it was measured, ``near_pen_ink`` where ink was found)."""
    grid, colrow, coords = layout.grid, layout.colrow, layout.coords_l0
    blurred = None if out_of_focus is None else tumour_regions(boxes, out_of_focus)
    write_compact_json(
        paths["geojson"],
        geojson_features(boxes, result.probs, card.classes, card.positive_index,
                         tile_threshold=opts.label.tile_p, regions=regions, mpp_l0=layout.mpp_l0,
                         tiles=opts.geojson_tiles, pen_regions=pen.regions if pen else None,
                         origin_l0=_qupath_origin(layout), region_stats=stats, focus=result.focus,
                         blurred_regions=blurred),
    )  # fmt: skip
    columns: dict[str, np.ndarray] = {
        "x_l0": coords[:, 0], "y_l0": coords[:, 1],
        "width_l0": np.full(len(coords), round(grid.tile_l0_px, 3)),
        "height_l0": np.full(len(coords), round(grid.tile_l0_px, 3)),
        "col": colrow[:, 0], "row": colrow[:, 1], "tissue_fraction": layout.tissue_fraction,
    }  # fmt: skip
    for i, c in enumerate(card.classes):
        columns[f"p_{c}"] = result.probs[:, i]
    if result.ood is not None:
        columns["ood_distance"] = result.ood
    if result.focus is not None:
        columns["focus"] = result.focus
    if pen is not None:
        columns["near_pen_ink"] = pen.near.astype(np.uint8)
    write_tiles_csv(paths["tiles_csv"], columns)
    _write_asap(paths["asap_xml"], regions, card.positive_class)


def _write_asap(path: Path, regions: Any, positive_name: str) -> None:
    """``NAME.asap.xml``: the tumour regions as ASAP XML (level-0 px, OpenSlide's plane, as ASAP and the
    ACDC@LUNGHP annotations count), to open beside a pathologist's annotations in ASAP and to score with
    ``evaluate``: each region's outline in the group named after the positive class, its holes (stroma
    inside a tumour ring) in ``Exclusion``, which the annotation readers cut out again."""
    from wsi_pipeline.evaluation.annotations import write_asap_xml

    polygons: list[tuple[str, list[tuple[float, float]]]] = []
    for g in [] if regions is None or regions.is_empty else getattr(regions, "geoms", [regions]):
        polygons.append((positive_name, [(float(x), float(y)) for x, y in g.exterior.coords[:-1]]))
        polygons += [("Exclusion", [(float(x), float(y)) for x, y in r.coords[:-1]]) for r in g.interiors]
    write_asap_xml(path, polygons, generator=f"{GENERATOR} {__version__}")


def _qupath_origin(layout: Layout) -> tuple[int, int]:
    """The level-0 pixel QuPath shows as (0, 0) for the layout's slide (``io.slide.qupath_origin_l0``;
    (0, 0) for a store made before it was recorded)."""
    x, y = layout.records.get("qupath_origin_l0") or (0, 0)
    return int(x), int(y)


def _top_tile_pictures(source: TileSource, p_pos: np.ndarray, n: int) -> list[np.ndarray]:
    """The ``n`` highest-P tiles as 150 px pictures, in the order :func:`slide_label` ranks them."""
    from wsi_pipeline.tiling.pictures import tile_pictures

    order = np.argsort(-np.asarray(p_pos, np.float64), kind="stable")[:n]
    return tile_pictures(source, order.tolist(), size_px=150)


def _write_report(
    paths: dict[str, Path],
    manifest: dict[str, Any],
    top_tiles: list[np.ndarray],
    pictures: dict[str, Any],
) -> None:
    """``NAME.report.html``: label, evidence, thumbnail, overlay, top tiles, timings, model."""
    from PIL import Image

    from wsi_pipeline.io.report import write_slide_report

    top = manifest["label"]["evidence"]["top_tiles"]
    pic = pictures["picture"].image
    thumb = Image.fromarray(pic)
    thumb.thumbnail((480, 480), Image.Resampling.LANCZOS)
    links = {"probability map (TIFF)": paths["heatmap"], "colour heatmap (TIFF)": paths["colour"],
             "overlay (PNG)": paths["overlay"], "QuPath GeoJSON": paths["geojson"],
             "ASAP XML (tumour regions)": paths["asap_xml"],
             "tile table (CSV)": paths["tiles_csv"], "run manifest (JSON)": paths["manifest"]}  # fmt: skip
    write_slide_report(
        paths["report"], manifest, overlay_href=paths["overlay"].name, thumbnail=np.asarray(thumb),
        top_tiles=list(zip(top_tiles, top, strict=True)), links={k: v.name for k, v in links.items()},
    )  # fmt: skip
