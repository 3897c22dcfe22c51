"""``wsi-infer info`` and ``wsi-infer tile``: what a slide holds, and its tiles into a Zarr store."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click

from wsi_pipeline.cli.group import (
    RECURSIVE_HELP,
    _Bars,
    _batch_callbacks,
    _batch_summary,
    _options_from,
    _run_guarded,
    _slide_options,
    _tile_options,
    busy_option,
    main,
)
from wsi_pipeline.errors import BusyError


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@_slide_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def info(slide: Path, backend: str, mpp: float | None, as_json: bool) -> None:
    """Vendor, size, pyramid levels, mpp and its source, and tissue fraction of SLIDE."""

    def body() -> int:
        from wsi_pipeline.tiling.info import slide_info

        data = slide_info(slide, backend=backend, mpp_override=mpp)
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            _print_info(data)
        return 0

    _run_guarded(body)


def _print_info(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    res = data["resolution"]
    mpp = (
        f"{res['mpp_x']:.4g} x {res['mpp_y']:.4g} um/px (from {res['source']})"
        if res["source"] != "missing"
        else f"[red]missing[/red] - {res['hint']}"
    )
    console.print(f"[bold]{data['path']}[/bold]")
    console.print(
        f"  backend {data['backend']}, vendor {data['vendor']}, {data['width']} x {data['height']} px"
    )
    console.print(f"  mpp {mpp}")
    if data.get("objective_power"):
        console.print(f"  objective {data['objective_power']}x")
    table = Table("level", "width", "height", "downsample", "mpp")
    for lv in data["levels"]:
        table.add_row(
            str(lv["level"]), str(lv["width"]), str(lv["height"]), f"{lv['downsample']:.4g}",
            f"{lv['mpp']:.4g}" if lv["mpp"] else "-",
        )  # fmt: skip
    console.print(table)
    t = data["tissue"]
    note = f" ({t['note']})" if t.get("note") else ""
    if t["fraction"] is None:
        console.print(f"  [bold red]not scorable[/bold red]: {t['note']}")
    else:
        warn = " [bold red]NO TISSUE FOUND[/bold red]" if t["fraction"] == 0 else ""
        console.print(f"  tissue {t['fraction']:.1%} of the slide{warn}{note}")
        if t.get("pen_marks_mm2"):
            console.print(f"  marker-pen ink: {t['pen_marks_mm2']:g} mm^2 left out of the tissue")
    if data.get("tiling"):
        g = data["tiling"]
        console.print(
            f"  at {g['target_mpp']} um/px: level {g['level']} (mpp {g['level_mpp']:.4g}, "
            f"{'no resize' if g['resize_scale'] == 1 else 'resize x' + format(g['resize_scale'], '.3g')}), "
            f"{g['tissue_tiles']} tissue tiles of {g['tile_px']} px"
        )


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True,
              help="Zarr store to write (a folder of stores when SLIDE is a folder).")  # fmt: skip
@_slide_options
@_tile_options
@click.option("--overwrite", is_flag=True, help="Replace a store made with other parameters.")
@busy_option
@click.option(
    "--recursive",
    "-r",
    is_flag=True,
    help=RECURSIVE_HELP,
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def tile(slide: Path, out: Path, overwrite: bool, quiet: bool, recursive: bool, busy: str, **kw: Any) -> None:
    """Stream the tissue tiles of SLIDE into the Zarr store OUT (resumable).

    SLIDE may be a folder: every slide in it is tiled into OUT/<name>.zarr, bad slides are reported
    and skipped, and the exit code is non-zero if any failed.
    """

    def body() -> int:
        opts = _options_from(kw)
        backend = kw["backend"]
        from wsi_pipeline.io.dicom import is_dicom_slide_folder

        if slide.is_dir() and not is_dicom_slide_folder(slide):
            return _tile_folder(
                slide, out, opts, backend=backend, overwrite=overwrite, quiet=quiet, recursive=recursive,
                leave_busy=busy == "leave",
            )  # fmt: skip
        with _Bars(enabled=not quiet) as bars:
            _tile_one(slide, out, opts, backend=backend, overwrite=overwrite, bars=bars)
        return 0

    _run_guarded(body)


def report_path(out: Path) -> Path:
    """The JSON run report written beside a tile store: ``NAME.zarr`` -> ``NAME.tile-report.json``."""
    stem = out.name[: -len(".zarr")] if out.name.endswith(".zarr") else out.name
    return out.with_name(f"{stem}.tile-report.json")


def _tile_one(
    slide: Path, out: Path, opts: Any, *, backend: str, overwrite: bool, bars: _Bars, wait: bool = False
) -> Any:
    from wsi_pipeline import __version__
    from wsi_pipeline.io.ownership import GENERATOR, refuse_foreign_files
    from wsi_pipeline.provenance import atomic_write_json, check_name_lengths, environment_versions
    from wsi_pipeline.tiling.tiler import tile_slide

    check_name_lengths([out, report_path(out)], fix="choose an --out name at least {over} bytes shorter")
    refuse_foreign_files([report_path(out)])
    with bars.slide(slide.name) as update:
        rep = tile_slide(slide, out, opts, backend=backend, overwrite=overwrite, progress=update, wait=wait)
    if rep.status == "already complete":
        bars.echo(f"{slide.name}: {out} is already complete ({rep.n_tiles} tiles); nothing to do")
        return rep
    rpath = report_path(out)
    atomic_write_json(
        rpath,
        {
            "generator": f"{GENERATOR} {__version__}",
            "command": "tile",
            "argv": sys.argv,
            **{k: v for k, v in asdict(rep).items() if k != "meta"},
            "options": {**opts.store_params(), "workers": opts.workers, "backend": backend},
            "store": rep.meta,
            "versions": environment_versions(),
        },
    )
    bars.echo(
        f"{slide.name}: {rep.n_tiles} tiles ({rep.tiles_written} written, {rep.status}) "
        f"in {rep.seconds:.1f} s, "
        f"{rep.tiles_per_s:,.1f} tiles/s, {rep.effective_mpp:.3g} um/px (mpp from {rep.mpp_source}), "
        f"tissue {rep.slide_tissue_fraction:.1%}{_pen_note(rep.meta)}{_stain_note(rep.meta)} "
        f"-> {out}, {rpath}"
    )
    return rep


def _pen_note(meta: dict[str, Any]) -> str:
    pen = (meta.get("tissue") or {}).get("pen_marks_mm2")
    return f" (marker-pen ink left out: {pen:g} mm^2)" if pen else ""


def _stain_note(meta: dict[str, Any]) -> str:
    stain = meta.get("stain")
    if not stain:
        return ""
    return f", Macenko {'fitted' if stain['fit_status'] == 'fitted' else 'FELL BACK to the reference'}"


def _tile_folder(
    folder: Path,
    out: Path,
    opts: Any,
    *,
    backend: str,
    overwrite: bool,
    quiet: bool,
    recursive: bool = False,
    leave_busy: bool = False,
) -> int:
    from wsi_pipeline.batch import BatchItem, batch_items, output_stems, run_batch

    items = batch_items(folder, recursive=recursive)
    names = dict(zip(items, output_stems(items), strict=True))
    with _Bars(enabled=not quiet, n_slides=len(items)) as bars:

        def one(item: BatchItem, waiting_on: BusyError | None = None, wait: bool = True) -> dict[str, Any]:
            o = opts if item.mpp is None else replace(opts, mpp_override=item.mpp)
            rep = _tile_one(item.slide, out / f"{names[item]}.zarr", o, backend=backend,
                            overwrite=overwrite, bars=bars, wait=waiting_on is not None and wait)  # fmt: skip
            return {"status": rep.status, "n_tiles": rep.n_tiles}

        res = run_batch(items, one, out=out, summary_name="tile-summary",
                        **_batch_callbacks(bars, one, leave_busy=leave_busy))  # fmt: skip
    return _batch_summary(res, out / "tile-summary.csv")
