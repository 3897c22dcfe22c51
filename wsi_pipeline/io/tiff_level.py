"""A small pyramid level of a TIFF slide decoded whole by tifffile: the thumbnail's fast path.

OpenSlide composes every region through cairo as premultiplied ARGB, which costs 4x the JPEG decoding
itself: the bundled 6.6 MP sample's level 0 takes 87 ms through OpenSlide and 22 ms as one tifffile
``asarray`` (the same pixels). Thumbnails read a whole level anyway, so a level small enough to hold
(:data:`WHOLE_LEVEL_MAX_PX`) is decoded by tifffile, checked against the slide's own reader on a probe
region, and used only when the two agree; anything else (another format, a larger level, a page
tifffile cannot map or decode, different pixels) returns None and the caller reads through the reader.

When the tiles are read from that same level (a small single-level slide such as the sample), planning
keeps the decoded level (:func:`keep_level`, one per process, at most 48 MB) and the tile readers of
this process cut tiles from it (:func:`with_kept_level`) instead of decoding the JPEG tiles again;
``run_slide`` forgets it at the end.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from wsi_pipeline.io.slide import SlideReader

#: levels up to this many pixels are decoded whole (48 MB of RGB); larger ones are read in blocks
WHOLE_LEVEL_MAX_PX = 16 * 2**20
#: TIFF containers whose pyramid tifffile and the slide readers lay out the same way
TIFF_SUFFIXES = (".svs", ".tif", ".tiff")
#: side of the region compared with the slide's reader (level pixels)
PROBE_PX = 256


def decode_level(reader: SlideReader, level: int, *, workers: int = 1) -> np.ndarray | None:
    """Level ``level`` of ``reader``'s slide as (h, w, 3) uint8 (level pixels), decoded by tifffile on
    ``workers`` threads; None where the fast path does not apply or its pixels differ from the reader's
    on :data:`PROBE_PX` regions at the level's origin and centre."""
    path = Path(reader.path)
    if reader.backend not in ("openslide", "tiffslide") or path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    w, h = reader.level_dimensions[level]
    if w * h > WHOLE_LEVEL_MAX_PX:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = _level_page(tf, level, (w, h))
            pixels = page.asarray(maxworkers=max(1, workers)) if page is not None else None
    except Exception:  # a file tifffile cannot parse or decode: the reader reports it, or reads it
        return None
    if pixels is None or pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
        return None
    pw, ph = min(PROBE_PX, w), min(PROBE_PX, h)
    ds = reader.level_downsamples[level]
    # Probed where level-0 coordinates name level pixels exactly: the origin, and the centre when the
    # downsample is whole (OpenSlide resamples a region whose level position is fractional).
    probes = [(0, 0)] + ([((w - pw) // 2, (h - ph) // 2)] if float(ds).is_integer() else [])
    for x, y in probes:
        probe = reader.read_region((round(x * ds), round(y * ds)), level, (pw, ph))
        if not np.array_equal(probe, pixels[y : y + ph, x : x + pw]):
            return None
    return pixels


def _level_page(tf: Any, level: int, size: tuple[int, int]) -> Any:
    """The single page of the first series' ``level`` when its shape is the reader's (h, w, 3)."""
    series = tf.series[0]
    levels = list(getattr(series, "levels", None) or [series])
    if level >= len(levels):
        return None
    lv = levels[level]
    w, h = size
    if tuple(lv.shape) != (h, w, 3) or len(lv.pages) != 1:
        return None
    return lv.pages[0]


_kept: dict[str, tuple[int, np.ndarray]] = {}  # file identity -> (level, its pixels); one entry
_kept_lock = threading.Lock()


def _identity(path: str | os.PathLike[str]) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}:{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def keep_level(path: str | os.PathLike[str], level: int, pixels: np.ndarray) -> None:
    """Keep ``pixels`` (a whole level from :func:`decode_level`) for this process's tile readers of the
    same file (same inode, mtime and size), replacing whatever was kept."""
    key = _identity(path)
    with _kept_lock:
        _kept.clear()
        if key is not None:
            _kept[key] = (level, pixels)


def forget_levels() -> None:
    """Drop the kept level (end of a slide's run)."""
    with _kept_lock:
        _kept.clear()


def with_kept_level(reader: SlideReader, level: int) -> SlideReader:
    """``reader``, serving ``level`` from the kept pixels when they are this file's and the level's
    downsample is whole (its regions are then exactly the reader's level pixels); else ``reader``."""
    key = _identity(reader.path)
    with _kept_lock:
        kept = _kept.get(key) if key is not None else None
    if kept is None or kept[0] != level or not float(reader.level_downsamples[level]).is_integer():
        return reader
    return LevelInMemory(reader, level, kept[1])


class LevelInMemory:
    """A slide reader with one level's pixels in memory: regions of that level inside its bounds are cut
    from them; anything else (other levels, regions over the edge, whose fill is the backend's: white
    from OpenSlide, black from tiffslide) is read by the wrapped reader."""

    def __init__(self, reader: SlideReader, level: int, pixels: np.ndarray) -> None:
        self._r = reader
        self._level = level
        self._pixels = pixels
        self.path = reader.path
        self.backend = reader.backend

    @property
    def vendor(self) -> str:
        return self._r.vendor

    @property
    def properties(self) -> Mapping[str, str]:
        return self._r.properties

    @property
    def level_count(self) -> int:
        return self._r.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._r.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._r.level_downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._r.dimensions

    def metadata_mpp(self) -> tuple[float | None, float | None]:
        return self._r.metadata_mpp()

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        if level == self._level:
            ds = int(self._r.level_downsamples[level])
            x, y = location_l0[0] // ds, location_l0[1] // ds
            w, h = size
            exact = location_l0[0] % ds == 0 and location_l0[1] % ds == 0
            inside = x >= 0 and y >= 0 and y + h <= self._pixels.shape[0] and x + w <= self._pixels.shape[1]
            if exact and inside:
                return self._pixels[y : y + h, x : x + w].copy()
        return self._r.read_region(location_l0, level, size)

    def close(self) -> None:
        self._r.close()


__all__ = [
    "PROBE_PX",
    "WHOLE_LEVEL_MAX_PX",
    "LevelInMemory",
    "decode_level",
    "forget_levels",
    "keep_level",
    "with_kept_level",
]
