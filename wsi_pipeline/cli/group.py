"""The ``wsi-infer`` group and what its commands share: error mapping, progress bars, option sets.

The commands live in one module each (``tile`` with ``info``, ``score``, ``evaluate``, ``models``);
importing :mod:`wsi_pipeline.cli` registers them. The CLI is thin: it parses options, calls one
function per stage, maps errors.

Every :class:`~wsi_pipeline.errors.WsiError` becomes one line on stderr ("error: FILE: what; fix")
and the error's exit code; Ctrl-C exits 130 and leaves a resumable partial output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from wsi_pipeline import __version__
from wsi_pipeline.console import detach_console, printable_console
from wsi_pipeline.errors import BusyError, Terminated, UsageError, WsiError, folder_mpp_hint
from wsi_pipeline.progress_lines import FolderClock, LineProgress

F = TypeVar("F", bound=Callable[..., Any])
_POSITIVE = click.FloatRange(min=0.0, min_open=True)


def _err(msg: str) -> None:
    _say(f"error: {msg}", err=True)


def _say(msg: str, *, err: bool = False) -> None:
    """``click.echo``, but a console that is gone (a hung-up terminal, a closed pipe) is let go of
    (:func:`~wsi_pipeline.console.detach_console`) instead of failing the run that writes the results."""
    try:
        click.echo(msg, err=err)
    except OSError:
        detach_console(err=err)


def _run_guarded(fn: Callable[[], int | None]) -> None:
    """Run a command body; map our errors to one line + exit code."""
    try:
        code = fn() or 0
    except WsiError as exc:
        _err(str(exc))
        sys.exit(exc.exit_code)
    except Terminated as exc:
        _err(exc.message)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted; re-run the same command to resume where it stopped")
        sys.exit(130)
    sys.exit(code)


class _Bars:
    """Progress bars of one command: one per slide (tiles done/total, tiles/s, ETA) and, for folders,
    an overall bar (slides done/total, ETA). Disabled bars cost nothing."""

    def __init__(self, *, enabled: bool, n_slides: int | None = None, terminal: bool | None = None) -> None:
        self.enabled = enabled
        self.n_slides = n_slides
        #: bars redrawn in place on a terminal; plain progress lines otherwise (a log file, a pipe)
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self._bar: Any = None
        self._overall: Any = None
        self._folder = FolderClock()

    def __enter__(self) -> _Bars:
        if not (self.enabled and self.terminal):
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
            try:
                self._bar.__exit__(*exc)
            except OSError:  # the terminal went away (see _say)
                detach_console(err=False)

    def echo(self, msg: str) -> None:
        """A line above the bars (plain echo when they are off)."""
        if self._bar is None:
            _say(msg)
            return
        try:
            self._bar.console.print(msg, markup=False, highlight=False, soft_wrap=True)
        except OSError:
            detach_console(err=False)

    def start(self, i: int, n: int, name: str) -> None:
        """The line that starts slide ``i`` of ``n`` of a folder run (in a log, with the folder's ETA)."""
        in_log = self.enabled and self._bar is None
        self.echo(self._folder.line(i, n, name) if in_log else f"[{i}/{n}] {name}")

    @contextmanager
    def slide(self, name: str) -> Iterator[Callable[[int, int], None]]:
        """A bar for one slide, fed by ``update(done, total)``; advances the overall bar at the end. Not
        on a terminal: a progress line every ``$WSI_PIPELINE_PROGRESS_SECONDS`` (30 s)."""
        if self._bar is None:
            yield LineProgress(name, self.echo) if self.enabled else (lambda done, total: None)
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

        done = True
        try:
            yield update
        except BusyError:  # another run's slide: counted when the run comes back to it
            done = False
            raise
        finally:
            if self._overall is not None:
                self._bar.remove_task(task)
                if done:
                    self._bar.advance(self._overall)


#: ``--recursive`` of the commands that take a folder of slides
RECURSIVE_HELP = (
    "Folder input: also the slides in its subfolders, at any depth (hidden folders, tile stores and "
    "MIRAX data folders are not entered)."
)


def command_line() -> tuple[str, ...] | None:
    """The command line of this ``wsi-infer`` invocation as typed (None outside one)."""
    ctx = click.get_current_context(silent=True)
    argv = ctx.meta.get("argv") if ctx is not None else None
    return tuple(argv) if argv else None


def folder_meta() -> dict[str, Any]:
    """What a folder run's ``summary.json`` records of the run itself: the command line as typed and
    its folder, and the package version (each slide's manifest has the rest)."""
    import os
    import sys

    from wsi_pipeline import __version__

    return {"command": {"argv": list(command_line() or sys.argv), "cwd": os.getcwd()},
            "package_version": __version__}  # fmt: skip


def is_batch(slide: Path) -> bool:
    """A folder of slides or a CSV manifest; not a tile store or a DICOM slide's folder."""
    from wsi_pipeline.io.dicom import is_dicom_slide_folder

    if slide.suffix.lower() == ".csv":
        return True
    return slide.is_dir() and slide.suffix != ".zarr" and not is_dicom_slide_folder(slide)


def list_batch(src: Path, *, recursive: bool = False) -> list[Any]:
    """The slides of a folder or CSV (:func:`~wsi_pipeline.batch.batch_items`), with a note on stderr
    for each slide a manifest lists more than once (scored once) and for slides in subfolders that a
    run without ``recursive`` leaves alone (:func:`~wsi_pipeline.batch.batch_notes`)."""
    from wsi_pipeline.batch import batch_items, batch_notes

    items = batch_items(src, recursive=recursive)
    for line in batch_notes(src, items, recursive=recursive):
        _say(f"note: {line}", err=True)
    return items


def busy_option(fn: F) -> F:
    """``--busy wait|leave``: what a folder run does with a slide another run is scoring into the same
    results folder (a job array's other task, a second workstation)."""
    return click.option(
        "--busy",
        type=click.Choice(["wait", "leave"]),
        default="wait",
        show_default=True,
        help="Folder runs: a slide that another run is scoring into the same --out is passed over, then "
        "at the end waited for (every run ends with the whole folder in its summary) or left to that "
        "run (a job-array task ends as soon as no slide is left to take).",
    )(fn)


def _slide_options(fn: F) -> F:
    """Options shared by every command that reads a slide."""
    decorators = [
        click.option(
            "--backend",
            type=click.Choice(["auto", "openslide", "tiffslide"]),
            default="auto",
            show_default=True,
            help="Slide reader; auto: tiffslide first for Aperio .svs from 8 MB (same pixels, faster), "
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


def _device_options(default: str, help_device: str, help_precision: str) -> Callable[[F], F]:
    """``--device`` (default ``default``) and ``--precision``, for scoring and for ``check-model``."""

    def add(fn: F) -> F:
        devices = ["cpu", "auto"] if default == "cpu" else ["auto", "cpu"]
        fn = click.option("--precision", type=click.Choice(["auto", "fp32", "fp16"]), default="auto",
                          show_default=True, help=help_precision)(fn)  # fmt: skip
        return click.option("--device", type=click.Choice([*devices, "cuda", "tensorrt"]), default=default,
                            show_default=True, help=help_device)(fn)  # fmt: skip

    return add


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
        click.option("--pen-min-area", type=click.FloatRange(min=0.0), default=20_000.0, show_default=True,
                     help="Leave out blue or green marker-pen ink in pieces of at least this area, um^2 "
                          "(0: keep it as tissue)."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Reader threads [default: tiling: CPUs, at most 4; scoring: 1, 2 from 8 cores]."),
        click.option("--normalize", type=click.Choice(["none", "macenko"]), default=None,
                     help="Stain normalization: one Macenko model fitted per slide, applied to every tile "
                          "[default: what the model card asks for when scoring, else none]."),
        click.option("--stain-reference", type=click.Path(path_type=Path), default=None,
                     help="Reference H&E image (PNG/JPEG) to normalize to [default: standard reference]."),
        click.option("--regions", type=click.Path(path_type=Path), default=None,
                     help="Only the tissue inside these polygons: an ASAP/ImageScope XML or QuPath GeoJSON "
                          "file; for a folder or CSV of slides, a folder of files named after the slides "
                          "(STEM.geojson, .json or .xml). Exclusion groups (_2, Exclusion, Ignore*) are cut "
                          "out."),
    ]  # fmt: skip
    for d in reversed(decorators):
        fn = d(fn)
    return fn


class _DefaultGroup(click.Group):
    """A group whose first argument may be a slide path instead of a command name."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = ("wsi-infer", *args)  # as typed: recorded in each run's manifest (command_line)
        first_is_path = bool(args) and args[0] not in self.commands and not args[0].startswith("-")
        if first_is_path and self.default_command in self.commands:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """As click's, but a malformed command line is one line (``error: ...``) and exit code 2."""
        kwargs.pop("standalone_mode", None)
        printable_console()
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
    wsi-infer evaluate RESULTS/ -a ANN/ -o metrics.json  Dice & co. against expert annotations
    wsi-infer import-model DIR --out M.onnx  a WSInfer model-zoo model as ONNX + card
    wsi-infer check-model M.onnx          does the card match the model? runs one tile
    wsi-infer model-schema                the model card's JSON Schema
    """


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
        tissue=TissueParams(min_tissue_um2=kw["min_tissue_area"], pen_min_area_um2=kw["pen_min_area"]),
        **({"workers": kw["workers"]} if kw["workers"] else {}),
    )


def _batch_callbacks(bars: _Bars, one: Callable[..., Any], *, leave_busy: bool = False) -> dict[str, Any]:
    """``run_batch``'s callbacks for a folder run whose items ``one(item, waiting_on=None, wait=True)``
    runs: progress lines, errors, and slides that another run is working on: at the end waited for, or
    (``leave_busy``) taken only if that run has let go of them by then, else left to it."""

    def again(item: Any, busy: BusyError) -> Any:
        if not leave_busy:
            bars.echo(f"{item.slide.name}: waiting for the other run ({busy.holder}) to finish it")
            return one(item, waiting_on=busy)
        try:
            return one(item, waiting_on=busy, wait=False)
        except BusyError as exc:
            bars.echo(f"{item.slide.name}: left to the other run ({exc.holder})")
            return {"status": LEFT_TO_OTHER_RUN, "n_tiles": 0}

    return {
        "on_start": lambda i, n, item: bars.start(i, n, item.slide.name),
        "on_error": lambda item, exc: _err(str(exc)),
        "on_busy": lambda item, exc: bars.echo(
            f"{item.slide.name}: another run ({exc.holder}) is working on it; coming back to it at the end"
        ),
        "retry_busy": again,
    }


#: summary status of a slide that ``--busy leave`` left to the run scoring it
LEFT_TO_OTHER_RUN = "left to another run"


def _batch_summary(res: Any, summary: Path, report: Path | None = None) -> int:
    """The closing line of a folder run, failures listed on stderr; exit code 1 if any failed."""
    from wsi_pipeline.batch import labels_text, totals

    failed = res.failed
    left = sum(1 for r in res.rows if r.get("status") == LEFT_TO_OTHER_RUN)
    t = totals(res.rows, res.seconds)  # the same figures summary.json records
    rate = f", {t['tiles_per_s']:,.1f} tiles/s" if t.get("tiles_per_s") else ""  # of the slides done now
    _say(
        f"{t['slides']} slides, {t['done']} done, {t['failed']} failed, "
        + (f"{left} left to other runs, " if left else "")
        + f"{t['tiles']} tiles, {res.seconds:.1f} s{rate}{labels_text(res.rows)} -> {summary}"
        + (f", {report}" if report is not None else "")
    )
    for r in failed:
        _say(f"  failed: {r['error']}", err=True)
    hint = folder_mpp_hint(res.rows)
    if hint:
        _say(f"  hint: {hint}", err=True)
    return 1 if failed else 0
