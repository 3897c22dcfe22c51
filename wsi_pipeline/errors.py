"""Error hierarchy. Each error inherits a builtin so callers may catch either.

Messages name the file and say how to fix the problem; the CLI prints them on one line and exits with
``exit_code``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class WsiError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class UsageError(WsiError, ValueError):
    """Options that cannot work together (exit 2, like a malformed command line)."""

    exit_code = 2


class SlideError(WsiError, OSError):
    """A slide cannot be opened or read (missing, not a slide, truncated, corrupt, unsupported)."""

    exit_code = 3
    whole_file = False  # True where a file still being copied cannot be the cause (e.g. our own heatmap)


class ResolutionError(WsiError, ValueError):
    """The slide's microns-per-pixel is missing or implausible and no override was given."""

    exit_code = 4


class TissueError(WsiError, ValueError):
    """No tissue was found where some was required."""

    exit_code = 5


class StoreError(WsiError, RuntimeError):
    """A tile store is unusable: written with other parameters, incomplete, or unwritable."""

    exit_code = 6


class OutputError(WsiError, OSError):
    """A result file cannot be written: disk full, read-only or unwritable output location.

    Exit code 6 like the tile store's disk problems; ``errno`` is that of the underlying OSError.
    """

    exit_code = 6


class StainError(WsiError, ValueError):
    """Stain normalization cannot proceed (e.g. an unusable reference image)."""

    exit_code = 7


class ModelError(WsiError, ValueError):
    """A model file or its card is missing, corrupt, or does not fit the pipeline."""

    exit_code = 8


class AnnotationError(WsiError, ValueError):
    """An annotation file is malformed, hostile, or does not match its slide."""

    exit_code = 9


class DeviceError(WsiError, RuntimeError):
    """A requested execution provider (cuda, tensorrt) is not available."""

    exit_code = 10


class BusyError(WsiError, RuntimeError):
    """Another run is writing the same output (a slide's results, a tile store) now (exit 11): wait
    for it, or choose another ``--out``. Folder runs come back to such a slide at their end."""

    exit_code = 11
    holder = "?"  # who holds the output, as its lock file says ("pid 123 on host, since ...")
    seen: object = None  # what the holder had written when this was raised (see pipeline.score_slide)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``docker stop``, a shutdown) or SIGHUP (the terminal or SSH
    session closed) raised in the main thread by the ``wsi-infer`` program, so that it unwinds as
    Ctrl-C does: the outputs being written finish, a folder run's summary records what was done, and
    the exit status is 128 + the signal (143, 129). ``message`` is the line that says so."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def message(self) -> str:
        if self.signum == 1:
            return (
                "hung up (SIGHUP: the terminal or SSH session closed; start long runs under nohup, tmux or "
                "screen); re-run the same command to resume"
            )
        return (
            "terminated (SIGTERM: a time limit, docker stop, a shutdown); re-run the same command to resume"
        )


def stop_on_sigterm() -> None:
    """Make SIGTERM, and SIGHUP unless it is ignored (``nohup``), raise :class:`Terminated` in the main
    thread (a program's entry point calls this; from another thread it does nothing: only the main
    thread may set signal handlers). On SIGHUP the standard streams that were the closed terminal are
    pointed at /dev/null first: writing to a hung-up terminal fails (EIO), which would break the
    orderly stop; streams redirected to a file keep their log."""
    import signal
    import threading

    def _raise(signum: int, frame: object) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            from wsi_pipeline.console import detach_console

            detach_console(only_terminals=True)
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _raise)
    hup = getattr(signal, "SIGHUP", None)  # not on Windows
    if hup is not None and signal.getsignal(hup) is not signal.SIG_IGN:
        signal.signal(hup, _raise)


def folder_mpp_hint(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """For a folder run's rows: what to do when some slides failed for want of a resolution (mpp).
    ``--mpp`` would apply one value to every slide, so the fix is a CSV manifest with a value per slide."""
    n = sum(
        1 for r in rows if r.get("status") == "failed" and r.get("error_code") == ResolutionError.exit_code
    )
    if not n:
        return None
    return (
        f"{n} slide{'s have' if n > 1 else ' has'} no usable resolution (mpp); list each with its own in a "
        "CSV (columns slide,mpp) and run on the CSV: --mpp would apply to every slide of the folder"
    )
