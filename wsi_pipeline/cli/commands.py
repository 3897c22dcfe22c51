"""``wsi-infer`` command line. Thin: parses options, calls one function per stage, maps errors.

Every :class:`~wsi_pipeline.errors.WsiError` becomes one line on stderr ("error: FILE: what; fix")
and the error's exit code; Ctrl-C exits 130 and leaves a resumable partial output.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import click

from wsi_pipeline import __version__
from wsi_pipeline.errors import UsageError, WsiError

F = TypeVar("F", bound=Callable[..., Any])
_POSITIVE = click.FloatRange(min=0.0, min_open=True)


def _err(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)


def _run_guarded(fn: Callable[[], int | None]) -> None:
    """Run a command body; map our errors to one line + exit code."""
    try:
        code = fn() or 0
    except WsiError as exc:
        _err(str(exc))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted; re-run the same command to resume where it stopped")
        sys.exit(130)
    sys.exit(code)


class _Bars:
    """Progress bars of one command: one per slide (tiles done/total, tiles/s, ETA) and, for folders,
    an overall bar (slides done/total, ETA). Disabled bars cost nothing."""

    def __init__(self, *, enabled: bool, n_slides: int | None = None) -> None:
        self.enabled = enabled
        self.n_slides = n_slides
        self._bar: Any = None
        self._overall: Any = None

    def __enter__(self) -> _Bars:
        if not self.enabled:
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        )  # fmt: skip
        self._bar.__enter__()
        if self.n_slides:
            self._overall = self._bar.add_task("all slides", total=self.n_slides, unit="slides", rate="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def echo(self, msg: str) -> None:
        """A line above the bars (plain echo when they are off)."""
        if self._bar is not None:
            self._bar.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(msg)

    @contextmanager
    def slide(self, name: str) -> Iterator[Callable[[int, int], None]]:
        """A bar for one slide, fed by ``update(done, total)``; advances the overall bar at the end."""
        if self._bar is None:
            yield lambda done, total: None
            return
        task = self._bar.add_task(name, total=None, unit="tiles", rate="")
        start = time.perf_counter()
        first: list[int] = []

        def update(done: int, total: int) -> None:
            if not first:
                first.append(done)
            elapsed = time.perf_counter() - start
            rate = (done - first[0]) / elapsed if elapsed > 0 else 0.0
            self._bar.update(task, completed=done, total=total, rate=f"{rate:,.0f} tiles/s")

        try:
            yield update
        finally:
            if self._overall is not None:
                self._bar.remove_task(task)
                self._bar.advance(self._overall)


def _slide_options(fn: F) -> F:
    """Options shared by every command that reads a slide."""
    decorators = [
        click.option(
            "--backend",
            type=click.Choice(["auto", "openslide", "tiffslide"]),
            default="auto",
            show_default=True,
            help="Slide reader; auto: tiffslide first for .svs/.tif/.tiff from 8 MB (same pixels, faster), "
            "else OpenSlide; the other when the first cannot open the file.",
        ),
        click.option(
            "--mpp",
            type=_POSITIVE,
            default=None,
            help="Level-0 microns per pixel, overriding the slide's metadata (needed when it has none).",
        ),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def _tile_options(fn: F) -> F:
    decorators = [
        click.option("--target-mpp", type=_POSITIVE, default=None,
                     help="Resolution of the tiles, microns per pixel [default: the model's when scoring, "
                          "else 0.5]."),
        click.option("--tile-size", type=click.IntRange(min=8), default=None,
                     help="Tile side in pixels [default: the model's when scoring, else 224]."),
        click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Pixels shared by neighbouring tiles (less than the tile size)."),
        click.option("--min-tissue", type=click.FloatRange(0.0, 1.0), default=0.25, show_default=True,
                     help="Keep tiles at least this fraction covered by tissue."),
        click.option("--level-tolerance", type=click.FloatRange(min=0.0), default=0.1, show_default=True,
                     help="Use a pyramid level as is when its mpp is within this relative distance."),
        click.option("--mask-mpp", type=_POSITIVE, default=8.0, show_default=True,
                     help="Resolution of the thumbnail used for tissue detection, microns per pixel."),
        click.option("--min-tissue-area", type=click.FloatRange(min=0.0), default=10_000.0, show_default=True,
                     help="Ignore tissue pieces smaller than this, um^2."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Reader threads [default: tiling: CPUs, at most 4; scoring: 1, 2 from 8 cores]."),
        click.option("--normalize", type=click.Choice(["none", "macenko"]), default=None,
                     help="Stain normalization: one Macenko model fitted per slide, applied to every tile "
                          "[default: what the model card asks for when scoring, else none]."),
        click.option("--stain-reference", type=click.Path(path_type=Path), default=None,
                     help="Reference H&E image (PNG/JPEG) to normalize to [default: standard reference]."),
    ]  # fmt: skip
    for d in reversed(decorators):
        fn = d(fn)
    return fn


class _DefaultGroup(click.Group):
    """A group whose first argument may be a slide path instead of a command name."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        first_is_path = bool(args) and args[0] not in self.commands and not args[0].startswith("-")
        if first_is_path and self.default_command in self.commands:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """As click's, but a malformed command line is one line (``error: ...``) and exit code 2."""
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)  # type: ignore[call-overload]
        except click.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else "wsi-infer"
            _err(f"{exc.format_message()} (see `{cmd} --help`)")
            sys.exit(2)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            _err("aborted")
            sys.exit(1)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsi-infer")
def main() -> None:
    """Find cancer in H&E whole-slide images.

    \b
    wsi-infer SLIDE --out heatmap.tif      score a slide: heatmap, GeoJSON, tile table, label
    wsi-infer SLIDES/ --out results/       every slide of a folder (or a CSV manifest)
    wsi-infer info SLIDE                  what a slide holds (levels, mpp, tissue)
    wsi-infer tile SLIDE --out SLIDE.zarr  tissue tiles into a Zarr store
    wsi-infer import-model DIR --out M.onnx  a WSInfer model-zoo model as ONNX + card
    wsi-infer check-model M.onnx          does the card match the model? runs one tile
    wsi-infer model-schema                the model card's JSON Schema
    """


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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def tile(slide: Path, out: Path, overwrite: bool, quiet: bool, **kw: Any) -> None:
    """Stream the tissue tiles of SLIDE into the Zarr store OUT (resumable).

    SLIDE may be a folder: every slide in it is tiled into OUT/<name>.zarr, bad slides are reported
    and skipped, and the exit code is non-zero if any failed.
    """

    def body() -> int:
        opts = _options_from(kw)
        backend = kw["backend"]
        if slide.is_dir():
            return _tile_folder(slide, out, opts, backend=backend, overwrite=overwrite, quiet=quiet)
        with _Bars(enabled=not quiet) as bars:
            _tile_one(slide, out, opts, backend=backend, overwrite=overwrite, bars=bars)
        return 0

    _run_guarded(body)


def _options_from(kw: dict[str, Any]) -> Any:
    from wsi_pipeline.tiling.plan import TileOptions
    from wsi_pipeline.tiling.tissue import TissueParams

    stain: dict[str, Any] = {}
    if kw["stain_reference"] is not None:
        from wsi_pipeline.provenance import file_sha256
        from wsi_pipeline.stain.macenko import reference_from_image

        ref_path = kw["stain_reference"]
        stain = {
            "stain_reference": reference_from_image(ref_path),
            "stain_reference_name": f"{ref_path.name} (sha256 {file_sha256(ref_path)[:16]})",
        }
    tile_px = kw["tile_size"] or 224
    if kw["overlap"] >= tile_px:
        raise UsageError(f"--overlap {kw['overlap']} must be smaller than the tile size ({tile_px} px)")
    return TileOptions(
        normalize=kw["normalize"] or "none",
        **stain,
        target_mpp=kw["target_mpp"] or 0.5,
        tile_px=tile_px,
        overlap_px=kw["overlap"],
        mpp_override=kw["mpp"],
        level_tolerance=kw["level_tolerance"],
        min_tissue_fraction=kw["min_tissue"],
        mask_mpp=kw["mask_mpp"],
        tissue=TissueParams(min_tissue_um2=kw["min_tissue_area"]),
        **({"workers": kw["workers"]} if kw["workers"] else {}),
    )


def report_path(out: Path) -> Path:
    """The JSON run report written beside a tile store: ``NAME.zarr`` -> ``NAME.tile-report.json``."""
    stem = out.name[: -len(".zarr")] if out.name.endswith(".zarr") else out.name
    return out.with_name(f"{stem}.tile-report.json")


def _tile_one(slide: Path, out: Path, opts: Any, *, backend: str, overwrite: bool, bars: _Bars) -> Any:
    from wsi_pipeline.provenance import atomic_write_json, environment_versions
    from wsi_pipeline.tiling.tiler import tile_slide

    with bars.slide(slide.name) as update:
        rep = tile_slide(slide, out, opts, backend=backend, overwrite=overwrite, progress=update)
    if rep.status == "already complete":
        bars.echo(f"{slide.name}: {out} is already complete ({rep.n_tiles} tiles); nothing to do")
        return rep
    rpath = report_path(out)
    atomic_write_json(
        rpath,
        {
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
        f"tissue {rep.slide_tissue_fraction:.1%}{_stain_note(rep.meta)} -> {out}, {rpath}"
    )
    return rep


def _stain_note(meta: dict[str, Any]) -> str:
    stain = meta.get("stain")
    if not stain:
        return ""
    return f", Macenko {'fitted' if stain['fit_status'] == 'fitted' else 'FELL BACK to the reference'}"


def _tile_folder(folder: Path, out: Path, opts: Any, *, backend: str, overwrite: bool, quiet: bool) -> int:
    from wsi_pipeline.batch import BatchItem, batch_items, output_stems, run_batch

    items = batch_items(folder)
    names = dict(zip(items, output_stems(items), strict=True))
    with _Bars(enabled=not quiet, n_slides=len(items)) as bars:

        def one(item: BatchItem) -> dict[str, Any]:
            o = opts if item.mpp is None else replace(opts, mpp_override=item.mpp)
            rep = _tile_one(item.slide, out / f"{names[item]}.zarr", o, backend=backend,
                            overwrite=overwrite, bars=bars)  # fmt: skip
            return {"status": rep.status, "n_tiles": rep.n_tiles}

        res = run_batch(items, one, out=out, summary_name="tile-summary", **_batch_callbacks(bars))
    return _batch_summary(res, out / "tile-summary.csv")


def _batch_callbacks(bars: _Bars) -> dict[str, Any]:
    return {
        "on_start": lambda i, n, item: bars.echo(f"[{i}/{n}] {item.slide.name}"),
        "on_error": lambda item, exc: _err(str(exc)),
    }


def _batch_summary(res: Any, summary: Path, report: Path | None = None) -> int:
    """The closing line of a folder run, failures listed on stderr; exit code 1 if any failed."""
    failed = res.failed
    tiles = sum(int(r.get("n_tiles") or 0) for r in res.rows)
    click.echo(
        f"{len(res.rows)} slides, {len(res.rows) - len(failed)} done, {len(failed)} failed, {tiles} tiles, "
        f"{res.seconds:.1f} s -> {summary}" + (f", {report}" if report is not None else "")
    )
    for r in failed:
        click.echo(f"  failed: {r['error']}", err=True)
    return 1 if failed else 0


@main.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="Probability map NAME.tif to write (NAME.overlay.png, NAME.report.html, ... beside it); "
    "a folder for folder/CSV input (NAME: each slide's file stem).",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="ONNX model with its .json card beside it [default: the shipped tumour model].",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
    help="onnxruntime provider; cuda/tensorrt fail when unavailable.",
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
    help="Also write the tile store here (single slide), then score from it.",
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
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(slide: Path, out: Path, quiet: bool, overwrite: bool, skip_errors: bool, **kw: Any) -> None:
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
            tile=_options_from(kw),
            label=label,
            device=kw["device"],
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
            if (slide.is_dir() and slide.suffix != ".zarr") or slide.suffix.lower() == ".csv":
                return _run_folder(slide, out, opts, kw["model"], client, overwrite, quiet, skip_errors)
            with _Bars(enabled=not quiet) as bars:
                target = _single_target(slide, out)
                _run_one(slide, target, opts, kw["model"], client, overwrite, bars)
            return 0
        finally:
            if client is not None:
                client.close()

    _run_guarded(body)


def _single_target(slide: Path, out: Path) -> Path:
    """``--out NAME.tif`` as given; ``--out FOLDER`` (an existing folder): the name a folder run would
    give the slide (``FOLDER/STEM.tif``, or ``FOLDER/NAME.tif`` where that would be the slide)."""
    if not out.is_dir():
        return out
    from wsi_pipeline.batch import BatchItem, heatmap_path, output_stems

    return heatmap_path(out, output_stems([BatchItem(slide)], out)[0])


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
    ev = m["label"]["evidence"]
    pos = m["model"]["positive_class"]
    if m.get("skipped"):
        bars.echo(
            f"{slide.name}: already done ({m['label']['label']}); outputs in {out.parent} (use --overwrite)"
        )
        return m
    bars.echo(
        f"{slide.name}: {m['label']['label'].upper()} ({pos} area {ev[f'{pos}_area_mm2']} mm^2, max p "
        f"{ev['max_p']}{_ood_text(m)}), {m['n_tiles']} tiles in {m['seconds']:.1f} s, "
        f"{m['tiles_per_s']:,.1f} tiles/s on "
        f"{m['provider']} -> {', '.join(Path(v).name for v in m['outputs'].values())}"
    )
    ood = m["label"].get("ood")
    if ood and ood.get("warning"):
        bars.echo(f"{slide.name}: WARNING {ood['warning']}")
    return m


def _run_folder(
    src: Path, out: Path, opts: Any, model: Path | None, client: Any, overwrite: bool, quiet: bool, skip: bool
) -> int:
    from wsi_pipeline.batch import (
        BatchItem,
        batch_items,
        heatmap_path,
        output_stems,
        result_row,
        run_batch,
        write_folder_report,
    )

    items = batch_items(src)
    names = dict(zip(items, output_stems(items, out), strict=True))
    with _Bars(enabled=not quiet, n_slides=len(items)) as bars:

        def one(item: BatchItem) -> dict[str, Any]:
            o = opts if item.mpp is None else replace(opts, tile=replace(opts.tile, mpp_override=item.mpp))
            m = _run_one(item.slide, heatmap_path(out, names[item]), o, model, client, overwrite, bars)
            return result_row(m, out)

        res = run_batch(items, one, out=out, summary_name="summary", stop_on_error=not skip,
                        **_batch_callbacks(bars))  # fmt: skip
    report = write_folder_report(out, res.rows)
    return _batch_summary(res, out / "summary.csv", report)


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--annotations",
    "-a",
    type=click.Path(path_type=Path),
    required=True,
    help="ASAP or ImageScope XML / QuPath GeoJSON file, or a folder of them named after the slides.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="metrics JSON to write (a CSV with one row per slide is written beside it).",
)
@click.option("--threshold", type=float, default=0.5, show_default=True, help="P(tumour) counted as tumour.")
@click.option(
    "--truth-fraction",
    type=float,
    default=0.5,
    show_default=True,
    help="For the cell Dice and tile metrics only: a cell/tile is tumour in truth when at least this "
    "fraction is annotated (the headline Dice is area-exact).",
)
@click.option(
    "--positive-group",
    multiple=True,
    help="Annotation groups that are tumour [default: all groups that are not exclusions].",
)
@click.option(
    "--exclusion-group",
    multiple=True,
    help="Groups cut out as non-tumour [default: _2, Exclusion, normal, ...].",
)
def evaluate(
    results: Path,
    annotations: Path,
    out: Path,
    threshold: float,
    truth_fraction: float,
    positive_group: tuple[str, ...],
    exclusion_group: tuple[str, ...],
) -> None:
    """Score finished runs (a .run.json, or a results folder searched recursively) against expert
    annotations.

    Area-exact Dice (the ACDC@LUNGHP metric), precision and recall of the predicted cells against the
    annotated polygons; the cell Dice beside it; tile AUC; slide-label accuracy. Means over slides with
    tumour; benign slides reported by their false-positive area.
    """  # fmt: skip

    def body() -> int:
        from wsi_pipeline.batch import rows_to_csv
        from wsi_pipeline.evaluation.annotations import DEFAULT_EXCLUSION_GROUPS, GroupMapping
        from wsi_pipeline.evaluation.evaluate import CSV_COLUMNS, csv_rows, evaluate_runs, format_summary
        from wsi_pipeline.provenance import atomic_write_bytes, atomic_write_json

        mapping = GroupMapping(
            positive=frozenset(positive_group) if positive_group else None,
            exclusion=frozenset(exclusion_group) if exclusion_group else DEFAULT_EXCLUSION_GROUPS,
        )
        res = evaluate_runs(results, annotations, threshold=threshold, truth_min_fraction=truth_fraction,
                            mapping=mapping)  # fmt: skip
        atomic_write_json(out, res)
        csv_path = out.with_suffix(".csv")
        atomic_write_bytes(csv_path, rows_to_csv(csv_rows(res["slides"]), CSV_COLUMNS))
        click.echo(f"{format_summary(res['summary'])} -> {out}, {csv_path}")
        for sl in res["unannotated"]:
            click.echo(f"  no annotation file for {sl} (not scored)", err=True)
        for ig in res["ignored"]:
            click.echo(f"  {ig['reason']} (ignored)", err=True)
        for row in res["slides"]:
            for w in row.get("warnings", []):
                click.echo(f"warning: {Path(row['slide']).name}: {w}", err=True)
        for e in res["errors"]:
            _err(e["error"])
        return 1 if res["errors"] else 0

    _run_guarded(body)


@main.command("import-model")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    required=True,
    help="ONNX file to write; its card NAME.json is written beside it.",
)
@click.option("--name", default=None, help="Model name on the card [default: the folder's name].")
@click.option(
    "--positive-class",
    default=None,
    help="Class the heatmap and label show [default: the one class named tumour/tumor].",
)
@click.option(
    "--output-kind",
    type=click.Choice(["logits", "probabilities"]),
    default="logits",
    show_default=True,
    help="What the model returns (WSInfer applies a softmax to it, so zoo models return logits).",
)
@click.option(
    "--parity-slide",
    type=click.Path(path_type=Path),
    default=None,
    help="Slide the parity tiles are cut from [default: the bundled sample slide].",
)
@click.option(
    "--parity-tiles",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tiles compared, TorchScript vs onnxruntime.",
)
@click.option(
    "--tolerance",
    type=_POSITIVE,
    default=1e-4,
    show_default=True,
    help="Largest accepted probability difference, TorchScript vs onnxruntime.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing NAME.onnx and NAME.json.")
def import_model(model_dir: Path, out: Path, **kw: Any) -> None:
    """Convert the WSInfer model in MODEL_DIR (config.json + torchscript_model.pt) to ONNX with a card.

    Needs torch (pip install 'wsi-pipeline[train]'); scoring with the result does not.
    """  # fmt: skip

    def body() -> int:
        import shlex

        from wsi_pipeline.inference.importer import import_wsinfer

        rep = import_wsinfer(model_dir, out, command=shlex.join(["wsi-infer", *sys.argv[1:]]), **kw)
        c = rep.card
        click.echo(
            f"{model_dir}: imported {c['architecture']['name']} ({len(c['classes'])} classes "
            f"{', '.join(c['classes'])}; positive {c['positive_class']}; output {c['output']['kind']}), "
            f"{c['input']['size_px']} px tiles at {c['mpp']:g} um/px; parity max |TorchScript - "
            f"onnxruntime| {rep.parity_max_abs_diff:.2g} (probabilities), "
            f"{rep.parity_output_max_abs_diff:.2g} (raw output) on {rep.parity_source} -> {rep.onnx_path}, "
            f"{rep.card_path}" + "".join(f" (note: {n})" for n in rep.notes)
        )
        return 0

    _run_guarded(body)


@main.command("check-model")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--slide",
    type=click.Path(path_type=Path),
    default=None,
    help="Slide the test tile is cut from [default: the bundled sample, else a synthetic tile].",
)
def check_model_cmd(model: Path, slide: Path | None) -> None:
    """Check MODEL's card against its ONNX graph and run one tile through it (one-line verdict)."""

    def body() -> int:
        from wsi_pipeline.inference.check import check_model

        click.echo(check_model(model, slide=slide).line())
        return 0

    _run_guarded(body)


@main.command("model-schema")
def model_schema() -> None:
    """Print the model card's published JSON Schema (draft 2020-12)."""

    def body() -> int:
        from importlib import resources

        from wsi_pipeline.inference import card

        text = resources.files(card.__package__).joinpath(card.SCHEMA_FILE).read_text(encoding="utf-8")
        click.echo(text, nl=not text.endswith("\n"))
        return 0

    _run_guarded(body)


if __name__ == "__main__":  # pragma: no cover
    main()
