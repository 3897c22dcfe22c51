"""``wsi-infer run`` (the default command): score a slide, a tile store, a folder or a CSV manifest."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from wsi_pipeline.cli.group import (
    RECURSIVE_HELP,
    _Bars,
    _batch_callbacks,
    _batch_summary,
    _device_options,
    _options_from,
    _run_guarded,
    _slide_options,
    _tile_options,
    busy_option,
    command_line,
    folder_meta,
    is_batch,
    list_batch,
    main,
)
from wsi_pipeline.errors import BusyError, UsageError, WsiError
from wsi_pipeline.tiling.regions import check_batch_regions, with_regions

if TYPE_CHECKING:
    from concurrent.futures import Future


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(),  # a str: a trailing "/" (a folder to make) must survive
    required=True,
    help="Probability map NAME.tif to write (NAME.overlay.png, NAME.report.html, ... beside it), or a "
    "folder (existing, or written with a trailing /) to write the slide's NAME.tif into; a folder for "
    "folder/CSV input (NAME: each slide's file stem).",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="ONNX model with its .json card beside it [default: the shipped tumour model].",
)
@_device_options(
    "auto",
    "onnxruntime provider; cuda/tensorrt fail when unavailable.",
    "auto: fp16 on cuda/tensorrt where the model card allows it, else fp32; fp16 elsewhere fails.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--scheduler", default=None, help="Address of a Dask distributed scheduler (default: local).")
@click.option(
    "--chunk-tiles", type=click.IntRange(min=1), default=256, show_default=True, help="Tiles per Dask task."
)
@click.option(
    "--tiles-out",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the tile store here, then score from it (a folder run: a folder of NAME.zarr stores).",
)
@click.option("--label-rule", type=click.Choice(["area", "topk"]), default="area", show_default=True)
@click.option(
    "--tile-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Tile probability counted as positive (default: the threshold on the model card).",
)
@click.option(
    "--min-area",
    type=click.FloatRange(min=0.0),
    default=0.1,
    show_default=True,
    help="Positive tissue area (mm^2) that makes the slide positive (area rule).",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Tiles averaged by the topk rule.",
)
@click.option(
    "--geojson-tiles/--no-geojson-tiles",
    default=True,
    show_default=True,
    help="One GeoJSON detection per tile; --no-geojson-tiles keeps only the tumour regions (huge slides).",
)
@click.option(
    "--overlay-size",
    type=click.IntRange(min=64),
    default=1000,
    show_default=True,
    help="Long side of the slide picture in NAME.overlay.png, pixels.",
)
@click.option(
    "--skip-errors/--stop-on-error",
    default=True,
    show_default=True,
    help="Folder runs: report a bad slide and go on, or stop at the first.",
)
@_slide_options
@_tile_options
@click.option("--overwrite", is_flag=True, help="Recompute slides whose outputs already exist.")
@busy_option
@click.option(
    "--recursive",
    "-r",
    is_flag=True,
    help=RECURSIVE_HELP,
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(
    slide: Path,
    out: str,
    quiet: bool,
    overwrite: bool,
    skip_errors: bool,
    recursive: bool,
    busy: str,
    **kw: Any,
) -> None:
    """Score SLIDE (a slide, a finished .zarr tile store, a folder, or a CSV manifest).

    The CSV manifest has a `slide` column and an optional `mpp` column (per-slide override).
    """  # fmt: skip

    def body() -> int:
        from wsi_pipeline.aggregate import LabelRule
        from wsi_pipeline.pipeline import RunOptions

        label = LabelRule(
            rule=kw["label_rule"],
            tile_threshold=kw["tile_threshold"],
            min_area_mm2=kw["min_area"],
            top_k=kw["top_k"],
            topk_threshold=kw["tile_threshold"],
        )
        opts = RunOptions(
            command=command_line(),
            tile=_options_from(kw),
            label=label,
            device=kw["device"],
            precision=kw["precision"],
            batch_size=kw["batch_size"],
            chunk_tiles=kw["chunk_tiles"],
            workers=kw["workers"],
            backend=kw["backend"],
            tiles_out=kw["tiles_out"],
            normalize_from_card=kw["normalize"] is None,
            requested_target_mpp=kw["target_mpp"],
            requested_tile_px=kw["tile_size"],
            geojson_tiles=kw["geojson_tiles"],
            overlay_px=kw["overlay_size"],
        )
        client = _client(kw["scheduler"])
        try:
            if is_batch(slide):
                check_batch_regions(kw["regions"])  # a folder of files, or refused
                return _run_folder(
                    slide, Path(out), opts, kw["model"], client, overwrite, quiet, skip_errors, recursive,
                    leave_busy=busy == "leave", regions=kw["regions"],
                )  # fmt: skip
            with _Bars(enabled=not quiet) as bars:
                target = _single_target(slide, out)
                opts = replace(opts, tile=with_regions(opts.tile, slide, kw["regions"]))
                _run_one(slide, target, opts, kw["model"], client, overwrite, bars)
            return 0
        finally:
            if client is not None:
                client.close()

    _run_guarded(body)


def _single_target(slide: Path, out: str) -> Path:
    """``--out NAME.tif`` as given; ``--out FOLDER`` (an existing folder, or any path written with a
    trailing ``/``): the name a folder run would give the slide (``FOLDER/STEM.tif``, or
    ``FOLDER/NAME.tif`` where that would be the slide). Any other name without a .tif/.tiff suffix is
    refused: it would make files named ``results``, ``results.overlay.png``, ... where a folder was
    meant."""
    folder = Path(out)
    if not (out.endswith(("/", os.sep)) or folder.is_dir()):
        if folder.suffix.lower() not in (".tif", ".tiff"):
            raise UsageError(
                f"--out {out}: neither NAME.tif nor an existing folder; give e.g. {folder}.tif, or "
                f"{folder}/ to write the results into that folder"
            )
        return folder
    from wsi_pipeline.batch import BatchItem, heatmap_path, output_stems

    return heatmap_path(folder, output_stems([BatchItem(slide)], folder)[0])


def _client(address: str | None) -> Any:
    if not address:
        return None
    from distributed import Client

    try:
        return Client(address, timeout="20s")
    except OSError as exc:
        raise WsiError(f"cannot reach the Dask scheduler at {address} ({exc}); check --scheduler") from exc


def _ood_text(m: dict[str, Any]) -> str:
    ood = m["label"].get("ood")
    return f", OOD score {ood['score']}" if ood else ""


def _run_one(
    slide: Path, out: Path, opts: Any, model: Path | None, client: Any, overwrite: bool, bars: _Bars
) -> Any:
    from wsi_pipeline.pipeline import run_slide

    with bars.slide(slide.name) as update:
        m = run_slide(
            slide, out, model=model, options=opts, client=client, progress=update, overwrite=overwrite
        )
    return _result_line(slide, out, m, bars)


def _score_one(
    slide: Path,
    out: Path,
    opts: Any,
    model: Path | None,
    client: Any,
    overwrite: bool,
    bars: _Bars,
    waiting_on: BusyError | None = None,
    wait: bool = True,
) -> Callable[[], dict[str, Any]]:
    """Plan and score ``slide`` under its progress bar; the function that writes its outputs."""
    from wsi_pipeline.pipeline import score_slide

    with bars.slide(slide.name) as update:
        return score_slide(
            slide, out, model=model, options=opts, client=client, progress=update, overwrite=overwrite,
            waiting_on=waiting_on, wait=wait,
        )  # fmt: skip


def _result_line(slide: Path, out: Path, m: dict[str, Any], bars: _Bars) -> dict[str, Any]:
    """Print a finished (or skipped) slide's result line; the manifest."""
    ev = m["label"]["evidence"]
    pos = m["model"]["positive_class"]
    if m.get("done_by_other_run"):
        bars.echo(f"{slide.name}: done by the other run ({m['label']['label']}); outputs in {out.parent}")
        return m
    if m.get("skipped"):
        bars.echo(
            f"{slide.name}: already done ({m['label']['label']}); outputs in {out.parent} (use --overwrite)"
        )
        return m
    reused = m.get("scores_reused")
    how = (
        f"scores of the run finished {reused.get('scored_at') or reused.get('finished_at')} reused "
        "(only the label rule changed; --overwrite scores again)"
        if reused
        else f"{m['tiles_per_s']:,.1f} tiles/s on {m['provider']}"
    )
    roi = (m.get("tissue") or {}).get("regions")
    inside = f" inside the {roi['polygons']} region(s) of {Path(roi['file']).name}" if roi else ""
    share = ev.get(f"{pos}_share_of_tissue")  # absent from runs finished by earlier versions
    of_tissue = f", {share:.1%} of the tissue" if share is not None else ""
    bars.echo(
        f"{slide.name}: {m['label']['label'].upper()} ({pos} area {ev[f'{pos}_area_mm2']} mm^2{of_tissue}, "
        f"max p {ev['max_p']}{_ood_text(m)}), {m['n_tiles']} tiles{inside} in {m['seconds']:.1f} s, {how} -> "
        f"{', '.join(Path(v).name for v in m['outputs'].values())}"
    )
    for check in ("ood", "focus", "stain"):
        if warning := (m["label"].get(check) or {}).get("warning"):
            bars.echo(f"{slide.name}: WARNING {warning}")
    if mpp_warning := (m.get("resolution") or {}).get("override_warning"):
        bars.echo(f"{slide.name}: WARNING {mpp_warning}")
    pen = (m.get("tissue") or {}).get("pen_marks_mm2")
    if pen:
        near = ev.get("pen") or {}
        beside = (
            f"; {near['tiles_near_ink']} scored tiles lie within {near['reach_um']:g} um of it, "
            f"{near['positive_tiles_near_ink']} of them {pos}"
            if near
            else ""
        )
        bars.echo(
            f"{slide.name}: note: {pen:g} mm^2 of marker-pen ink was left out of the tissue{beside}; tissue "
            "under ink is scored as it looks (check those tiles by eye)"
        )
        if near.get("warning"):
            bars.echo(f"{slide.name}: WARNING {near['warning']}")
    return m


def _run_folder(
    src: Path,
    out: Path,
    opts: Any,
    model: Path | None,
    client: Any,
    overwrite: bool,
    quiet: bool,
    skip: bool,
    recursive: bool = False,
    *,
    leave_busy: bool = False,
    regions: Path | None = None,
) -> int:
    from wsi_pipeline.batch import (
        BatchItem,
        OutputWriter,
        heatmap_path,
        output_stems,
        result_row,
        run_batch,
        write_folder_report,
    )

    items = list_batch(src, recursive=recursive)
    names = dict(zip(items, output_stems(items, out), strict=True))
    # One writer thread: a slide's outputs are written while the next slide is planned and scored
    # (run_batch settles each in order, after the next slide's scoring).
    with _Bars(enabled=not quiet, n_slides=len(items)) as bars, OutputWriter() as writer:

        def one(
            item: BatchItem, waiting_on: BusyError | None = None, wait: bool = True
        ) -> Future[dict[str, Any]]:
            o = opts if item.mpp is None else replace(opts, tile=replace(opts.tile, mpp_override=item.mpp))
            o = replace(o, tile=with_regions(o.tile, item.slide, regions, batch=True, own=item.regions))
            if opts.tiles_out is not None:  # a store per slide, named as its outputs
                o = replace(o, tiles_out=Path(opts.tiles_out) / f"{names[item]}.zarr")
            heatmap = heatmap_path(out, names[item])
            finish = _score_one(item.slide, heatmap, o, model, client, overwrite, bars, waiting_on, wait)
            return writer.submit(
                item, lambda: result_row(_result_line(item.slide, heatmap, finish(), bars), out, heatmap)
            )

        try:
            res = run_batch(items, one, out=out, summary_name="summary", stop_on_error=not skip,
                            also_writes=[out / "report.html"],
                            on_summary=lambda rows: write_folder_report(out, rows),  # a page to follow it by
                            meta=folder_meta(), drain=writer.drain,
                            **_batch_callbacks(bars, one, leave_busy=leave_busy))  # fmt: skip
        except KeyboardInterrupt as exc:  # the summary lists what was done: so does the page
            if rows := getattr(exc, "batch_rows", None):
                write_folder_report(out, rows)
            raise
    report = write_folder_report(out, res.rows)
    return _batch_summary(res, out / "summary.csv", report)
