"""``wsi-infer info`` and ``wsi-infer tile``: what a slide holds, and its tiles into a Zarr store."""

from __future__ import annotations

import json
import os
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
    command_line,
    folder_meta,
    is_batch,
    list_batch,
    main,
)
from wsi_pipeline.errors import BusyError
from wsi_pipeline.tiling.regions import check_batch_regions, with_regions


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@_slide_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--recursive", "-r", is_flag=True, help=RECURSIVE_HELP)
def info(slide: Path, backend: str, mpp: float | None, as_json: bool, recursive: bool) -> None:
    """Vendor, size, pyramid levels, mpp and its source, and tissue fraction of SLIDE.

    SLIDE may be a folder of slides (or a CSV manifest): one row per slide, to check a batch before
    running it (exit 1 if any slide cannot be read); or a tile store (.zarr): what it holds.
    """

    def body() -> int:
        from wsi_pipeline.tiling.info import batch_info, slide_info, store_info
        from wsi_pipeline.tiling.source import is_store_path

        if is_store_path(slide):
            data = store_info(slide)
            if as_json:
                click.echo(json.dumps(data, indent=2))
            else:
                _print_store_info(data)
            return 0
        if is_batch(slide):
            rows = batch_info(list_batch(slide, recursive=recursive), backend=backend, mpp_override=mpp)
            if as_json:
                click.echo(json.dumps(rows, indent=2))
            else:
                _print_batch_info(rows)
            return 1 if any("error" in r for r in rows) else 0
        data = slide_info(slide, backend=backend, mpp_override=mpp)
        if as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            _print_info(data)
        return 0

    _run_guarded(body)


def _print_store_info(d: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(soft_wrap=True)  # whole lines, for logs and grep
    console.print(f"[bold]{d['path']}[/bold]: tile store of {d['slide']} ({d['vendor']}, "
                  f"{' x '.join(map(str, d['slide_size_px'] or []))} px)")  # fmt: skip
    overlap = f", overlap {d['overlap_px']} px" if d.get("overlap_px") else ""
    console.print(f"  {d['tiles']} tiles of {d['tile_px']} px at {d['effective_mpp']:.4g} um/px "
                  f"(mpp from {d['mpp_source']}){overlap}; stain normalization {d['normalize']}")  # fmt: skip
    pen = f", marker-pen ink left out {d['pen_marks_mm2']:g} mm^2" if d.get("pen_marks_mm2") else ""
    tissue = d.get("tissue_fraction")
    console.print(
        f"  tissue {tissue:.1%} of the slide{pen}" if tissue is not None else "  tissue: not recorded"
    )
    console.print(f"  finished {d['finished_at']} (wsi-pipeline {d['package_version']})")


def _print_batch_info(rows: list[dict[str, Any]]) -> None:
    """One line per slide of a batch (what `info SLIDE` says, in brief), then one line per problem:
    a slide that cannot be read, is not scorable, has no mpp or no tissue, with what to do."""
    from rich.console import Console
    from rich.table import Table

    table = Table("slide", "um/px (source)", "tissue", "tiles", "state")
    for col in table.columns:  # one line per slide; the slide name gives way first
        col.no_wrap, col.overflow, col.min_width = True, "ellipsis", len(str(col.header))
    table.columns[0].max_width = 24
    problems = []
    for r in rows:
        name = Path(r["path"]).name
        if "error" in r:
            table.add_row(name, "", "", "", "[red]unreadable[/red]")
            problems.append(f"{name}: {r['error'].split(': ', 1)[-1]}")
            continue
        res, t, g = r["resolution"], r["tissue"], r.get("tiling") or {}
        state = "ok"
        if res["source"] == "missing":
            state = "[red]no mpp[/red]"
            problems.append(f"{name}: {str(res.get('detail') or res['hint']).split(': ', 1)[-1]}")
            mpp = "[red]missing[/red]"
        else:
            mpp = f"{res['mpp_x']:.4g} ({res['source']})"
        if res.get("override_warning"):
            state = "[yellow]--mpp differs[/yellow]"
            problems.append(f"{name}: {res['override_warning']}")
        if t["fraction"] is None:
            state = "[red]not scorable[/red]"
            problems.append(f"{name}: {t['note']}")
        elif g and not g.get("tissue_tiles"):
            state = "[red]no tissue[/red]"
            problems.append(f"{name}: no tissue tiles (tissue covers {t['fraction']:.1%} of the slide)")
        tissue = "" if t["fraction"] is None else f"{t['fraction']:.1%}"
        table.add_row(name, mpp, tissue, str(g.get("tissue_tiles", "")), state)
    console = Console(soft_wrap=True)  # whole lines, for logs and grep
    console.print(table)
    for line in problems:
        console.print(f"  {line}", markup=False, highlight=False)
    n_ok = sum(1 for r in rows if "error" not in r and (r.get("tiling") or {}).get("tissue_tiles"))
    n_warn = sum(1 for r in rows if (r.get("resolution") or {}).get("override_warning"))
    console.print(
        f"{len(rows)} slides, {n_ok} ready to score, {len(rows) - n_ok} with a problem"
        + (f", {n_warn} with an --mpp warning" if n_warn else "")
        + (" (listed above)" if problems else "")
    )


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
    if res.get("override_warning"):
        console.print(f"  [yellow]warning[/yellow]: {res['override_warning']}", soft_wrap=True)
    if data.get("objective_power"):
        console.print(f"  objective {data['objective_power']}x")
    if any(data.get("qupath_origin_l0") or ()):
        x, y = data["qupath_origin_l0"]
        console.print(f"  scanned rectangle from level-0 ({x}, {y}): QuPath and our GeoJSON count from there")
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

    SLIDE may be a folder, or a CSV with a 'slide' (and optional 'mpp') column: every slide is tiled
    into OUT/<name>.zarr, bad slides are reported and skipped, and the exit code is non-zero if any
    failed.
    """

    def body() -> int:
        opts = _options_from(kw)
        backend = kw["backend"]
        if is_batch(slide):  # a folder of slides or a CSV manifest
            check_batch_regions(kw["regions"])  # a folder of files, or refused
            return _tile_folder(
                slide, out, opts, backend=backend, overwrite=overwrite, quiet=quiet, recursive=recursive,
                leave_busy=busy == "leave", regions=kw["regions"],
            )  # fmt: skip
        with _Bars(enabled=not quiet) as bars:
            opts = with_regions(opts, slide, kw["regions"])
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
            "argv": list(command_line() or sys.argv),
            "cwd": os.getcwd(),
            **{k: v for k, v in asdict(rep).items() if k != "meta"},
            "options": {**opts.store_params(), "workers": opts.workers, "backend": backend},
            "store": rep.meta,
            "versions": environment_versions(),
        },
    )
    bars.echo(
        f"{slide.name}: {rep.n_tiles} tiles ({rep.tiles_written} written"
        f"{', resumed' if rep.status == 'resumed' else ''}) "
        f"in {rep.seconds:.1f} s, "
        f"{rep.tiles_per_s:,.1f} tiles/s, {rep.effective_mpp:.3g} um/px (mpp from {rep.mpp_source}), "
        f"tissue {rep.slide_tissue_fraction:.1%}{_pen_note(rep.meta)}{_stain_note(rep.meta)} "
        f"-> {out}, {rpath}"
    )
    if mpp_warning := (rep.meta.get("resolution") or {}).get("override_warning"):
        bars.echo(f"{slide.name}: WARNING {mpp_warning}")
    if focus_warning := (rep.focus or {}).get("warning"):
        bars.echo(f"{slide.name}: WARNING {focus_warning}")
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
    regions: Path | None = None,
) -> int:
    from wsi_pipeline.batch import BatchItem, output_stems, run_batch

    items = list_batch(folder, recursive=recursive)
    names = dict(zip(items, output_stems(items), strict=True))
    with _Bars(enabled=not quiet, n_slides=len(items)) as bars:

        def one(item: BatchItem, waiting_on: BusyError | None = None, wait: bool = True) -> dict[str, Any]:
            o = opts if item.mpp is None else replace(opts, mpp_override=item.mpp)
            o = with_regions(o, item.slide, regions, batch=True, own=item.regions)
            rep = _tile_one(item.slide, out / f"{names[item]}.zarr", o, backend=backend,
                            overwrite=overwrite, bars=bars, wait=waiting_on is not None and wait)  # fmt: skip
            return {"status": rep.status, "n_tiles": rep.n_tiles}

        res = run_batch(items, one, out=out, summary_name="tile-summary", meta=folder_meta(),
                        **_batch_callbacks(bars, one, leave_busy=leave_busy))  # fmt: skip
    return _batch_summary(res, out / "tile-summary.csv")
