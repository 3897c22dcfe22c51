"""The console a run prints to, which may not be what it was when the run started: file names whose
bytes the console cannot encode, a terminal that hung up (SSH closed: writes fail with EIO), a pipe
whose reader left (``| head``, a dead ``tee``: EPIPE). The results are files; the console is let go
of rather than allowed to stop the run.
"""

from __future__ import annotations

import os
import sys

from wsi_pipeline.provenance import valid_text


def _escaped(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = valid_text(exc.object[exc.start : exc.end])
    return text.encode("ascii", "backslashreplace").decode("ascii"), exc.end


#: the error handlers Python gives the console streams, replaced by :func:`printable_console`'s
_CONSOLE_ERRORS = ("strict", "surrogateescape", "backslashreplace")


def printable_console() -> None:
    """Let stdout and stderr print what their encoding cannot (a file name's bytes that are not UTF-8)
    as ``\\xe9``, as pages and tables show it, instead of raising ``UnicodeEncodeError`` in the middle
    of a run (stdout under ``en_US.UTF-8``), or writing the raw byte (the C locale) or ``\\udce9``
    (stderr) where Python would."""
    import codecs

    codecs.register_error("wsi-pipeline.escape", _escaped)
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) in _CONSOLE_ERRORS and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="wsi-pipeline.escape")


def detach_console(*, err: bool | None = None, only_terminals: bool = False) -> None:
    """Point stdout (``err=False``), stderr (``err=True``) or both (None; ``only_terminals``: those that
    are a terminal) at /dev/null: a console that is gone (a hung-up terminal fails writes with EIO, a
    closed pipe with EPIPE) must not stop a run whose results are files."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    streams = (sys.stdout, sys.stderr) if err is None else (sys.stderr if err else sys.stdout,)
    for stream in streams:
        try:
            fd = stream.fileno()
            if not only_terminals or os.isatty(fd):
                os.dup2(null, fd)
        except (OSError, ValueError, AttributeError):  # no real file behind it (a test's stream)
            pass
    os.close(null)
