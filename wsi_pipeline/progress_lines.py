"""Progress as plain lines, for output that is not a terminal: a SLURM job's log, cron mail, ``docker
logs``, ``nohup``. A bar redrawn in place means nothing there (rich shows a non-terminal only its final
frame), so a long slide would print nothing between its start and its result line.

:class:`LineProgress` is a ``progress(done, total)`` callback that prints one line per slide at most
every :func:`interval_s` seconds (``$WSI_PIPELINE_PROGRESS_SECONDS``, default 30; 0 prints every
update): tiles done of total, percent, tiles/s since the first update, ETA. :class:`FolderClock` adds
the folder's elapsed time and ETA to a folder run's ``[i/n] NAME`` line.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

#: seconds between two progress lines of one slide, unless the environment variable says otherwise
DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "WSI_PIPELINE_PROGRESS_SECONDS"


def env_seconds(name: str, default: float) -> float:
    """Seconds from the environment variable ``name`` when it is a finite number >= 0, else ``default``."""
    try:
        value = float(os.environ.get(name, "").strip())
    except ValueError:
        return default
    return value if math.isfinite(value) and value >= 0 else default


def interval_s() -> float:
    """Seconds between progress lines: ``$WSI_PIPELINE_PROGRESS_SECONDS``, else :data:`DEFAULT_INTERVAL_S`."""
    return env_seconds(INTERVAL_ENV, DEFAULT_INTERVAL_S)


def clock_text(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds (rounded up, so a nearly finished slide shows 0:00:01)."""
    s = max(0, math.ceil(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """``progress(done, total)`` for one slide that prints ``NAME: 1,200/8,000 tiles (15%), 45 tiles/s,
    ETA 0:02:31`` through ``emit`` at most every ``every_s`` seconds, and nothing once all are done
    (the slide's result line follows). The rate counts from the first update, so tiles a resumed run
    found done already do not inflate it."""

    def __init__(
        self,
        name: str,
        emit: Callable[[str], None],
        *,
        unit: str = "tiles",
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.unit = unit
        self.every_s = interval_s() if every_s is None else every_s
        self._emit = emit
        self._clock = clock
        self._start: tuple[float, int] | None = None
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = self._clock()
        if self._start is None:  # the reference point of the rate: nothing to say yet
            self._start = (now, done)
            self._last = now
            return
        if done >= total or now - self._last < self.every_s:
            return
        self._last = now
        self._emit(self.line(done, total, now))

    def line(self, done: int, total: int, now: float) -> str:
        """The progress line at ``now`` (a time of ``clock``)."""
        t0, done0 = self._start or (now, done)
        elapsed = now - t0
        rate = (done - done0) / elapsed if elapsed > 0 else 0.0
        eta = clock_text((total - done) / rate) if rate > 0 else "unknown"
        pct = 100 * done // total if total else 0
        return f"{self.name}: {done:,}/{total:,} {self.unit} ({pct}%), {rate:,.1f} {self.unit}/s, ETA {eta}"


class FolderClock:
    """The ``[i/n] NAME`` line of a folder run; from the second slide on it adds the time so far and
    the ETA of the folder at the mean time per slide so far (slides differ in size: a rough guide)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0: float | None = None

    def line(self, i: int, n: int, name: str) -> str:
        """The line for starting slide ``i`` (1-based) of ``n``."""
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        done = i - 1
        if done < 1:
            return f"[{i}/{n}] {name}"
        elapsed = now - self._t0
        eta = clock_text(elapsed / done * (n - done))
        return f"[{i}/{n}] {name} (folder: {clock_text(elapsed)} so far, ETA {eta})"
