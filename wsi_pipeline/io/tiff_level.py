"""A small pyramid level of a TIFF slide decoded whole by tifffile: the thumbnail's fast path.

OpenSlide composes every region through cairo as premultiplied ARGB, which costs 4x the JPEG decoding
itself: the bundled 6.6 MP sample's level 0 takes 87 ms through OpenSlide and 22 ms as one tifffile
``asarray`` (the same pixels). Thumbnails read a whole level anyway, so a level small enough to hold
(:data:`WHOLE_LEVEL_MAX_PX`) is decoded by tifffile, checked against the slide's own reader on a probe
region, and used only when the two agree; anything else (another format, a larger level, a page
tifffile cannot map or decode, different pixels) returns None and the caller reads through the reader.

These pixels only make the thumbnail (tissue mask, overlay picture). Tiles are scored from the reader's
own reads: tifffile's codecs decode a corrupt JPEG tile into noise where OpenSlide refuses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from wsi_pipeline.io.tiff_region import PROBE_PX, TIFF_SUFFIXES, level_page

if TYPE_CHECKING:
    from wsi_pipeline.io.slide import SlideReader

#: levels up to this many pixels are decoded whole (48 MB of RGB); larger ones are read in blocks
WHOLE_LEVEL_MAX_PX = 16 * 2**20


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
            page = level_page(tf, level, (w, h))
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


__all__ = ["WHOLE_LEVEL_MAX_PX", "decode_level"]
