"""Claims on an output (a slide's results, a tile store) while one run writes it.

Two runs into the same folder (a cron job that starts while last night's is still going, or two
workstations pointed at one slide folder on a shared disk) then divide the slides between them instead
of scoring each twice and writing over each other. A claim is an exclusive ``flock`` on a lock file
beside the output: the kernel drops it when its process dies (kill -9 included), so a killed run never
leaves a claim behind, and the lock file is removed when the claim is released. On Linux NFS clients
``flock`` is a whole-file POSIX lock, which the server arbitrates between machines.

Where no claim can be taken (a read-only results folder, a file system without locks), the run goes
on unclaimed, as before this module: nothing then stops a second run, and the write itself reports
a read-only folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from wsi_pipeline.errors import BusyError

POLL_S = 0.5  # how often a waiting claim asks again (Ctrl-C stays prompt)


class Claim:
    """An exclusive claim on ``lock`` (a path beside the output it guards); :meth:`release` once done."""

    def __init__(self, lock: Path, fd: int | None) -> None:
        self.lock, self._fd = lock, fd

    @property
    def held(self) -> bool:
        """True while this process holds the claim (False: it went on unclaimed, see the module)."""
        return self._fd is not None

    def release(self) -> None:
        """Remove the lock file, then drop the kernel lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.lock.unlink(missing_ok=True)
        os.close(fd)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(lock: Path) -> str:
    """Who holds ``lock``, as its holder wrote it (``pid 123 on host, since ...``), or ``?``."""
    try:
        return lock.read_text(errors="replace").strip() or "?"
    except OSError:
        return "?"


def claim(
    lock: Path,
    busy: Callable[[str], str],
    *,
    wait: bool = False,
    on_wait: Callable[[str], None] | None = None,
) -> Claim:
    """Claim ``lock`` for this process. Held by another run: :class:`BusyError` with the message
    ``busy(holder)``, or with ``wait`` poll until it is free (``on_wait(holder)`` is called once).

    The lock file is created if needed (its folder too); when it cannot be (read-only, no
    permission), the file system has no locks or the platform no ``flock`` (Windows), the claim is
    not held and the run goes on."""
    try:
        import fcntl
    except ImportError:  # Windows
        return Claim(lock, None)

    waited = False
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return Claim(lock, None)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = holder(lock)
            if not wait:
                err = BusyError(busy(who))
                err.holder = who
                raise err from None
            if not waited and on_wait is not None:
                on_wait(who)
            waited = True
            time.sleep(POLL_S)
            continue
        except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP, ...)
            os.close(fd)
            return Claim(lock, None)
        try:  # the file we locked must still be the one at that path (not unlinked by a finishing run)
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode(), 0)
    except OSError:  # a full disk: the claim holds all the same, only its holder is not named
        pass
    return Claim(lock, fd)
