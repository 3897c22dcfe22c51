"""The ``wsi-infer`` command line."""

from __future__ import annotations

import contextlib
import os
import sys

from wsi_pipeline.cli import evaluate, models, score, tile  # noqa: F401 - each registers its commands
from wsi_pipeline.cli.group import main
from wsi_pipeline.errors import stop_on_sigterm

__all__ = ["main", "run"]


def run() -> None:
    """The ``wsi-infer`` program: :func:`main`, then exit without tearing the interpreter down.

    Every output is written (atomically) and closed before ``main`` returns, so the only work left at
    exit is freeing memory: the onnxruntime session, thread pools, modules. That took 0.12 s of a
    1.5 s run on the bundled sample; ``os._exit`` skips it. ``main`` itself stays an ordinary
    function for tests and for calling from Python.

    SIGTERM (a SLURM time limit, ``docker stop``, a Kubernetes eviction) and SIGHUP (the terminal or
    SSH session closed) stop the program as Ctrl-C does (:class:`~wsi_pipeline.errors.Terminated`)
    instead of killing it where it stands.
    """
    stop_on_sigterm()
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") prints the message, exit status 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):  # a console that is gone (hung-up terminal, closed pipe)
            stream.flush()
    os._exit(code)
