"""The one writer of the test slides: Aperio-style SVS files and plain pyramidal TIFFs, streamed with
tifffile one tile at a time (the slide never has to fit in memory).

Formats (``kind``): ``"aperio"`` (an SVS that OpenSlide and tiffslide detect as vendor aperio: JPEG
tiles, mpp and magnification in the ImageDescription, a stripped thumbnail as second directory),
``"generic"`` (zlib tiled TIFF with resolution tags, lower levels marked reduced-resolution) and
``"nompp"`` (the same without any resolution metadata).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

KINDS = ("aperio", "generic", "nompp")


class Pyramid(Protocol):
    """What :func:`write_pyramid` needs of a slide spec (both test-slide specs have it)."""

    @property
    def width(self) -> int: ...  # level 0, pixels
    @property
    def height(self) -> int: ...
    @property
    def mpp(self) -> float: ...  # micrometres per level-0 pixel
    @property
    def downsamples(self) -> Sequence[int]: ...  # integers starting at 1
    @property
    def tile_px(self) -> int: ...  # TIFF tile side


def write_pyramid(
    path: str | os.PathLike[str],
    spec: Pyramid,
    level_tiles: Callable[[int], Iterable[np.ndarray]],
    *,
    kind: str = "aperio",
    quality: int = 90,
    software: str = "synthetic",
    extra: Mapping[str, str] | None = None,
    thumbnail: Callable[[], np.ndarray] | None = None,
) -> Path:
    """Write ``spec``'s pyramid, levels of ``ceil(size / downsample)`` pixels, to ``path``; returns it.

    ``level_tiles(downsample)``: that level's RGB uint8 tiles of ``spec.tile_px`` square, row by row,
    edge tiles padded to full size (tifffile crops them). ``quality``: JPEG quality of aperio tiles;
    ``software`` and ``extra`` (more ``key = value`` fields) go into the aperio description.
    ``thumbnail()``: the aperio thumbnail, called once level 0 is written (so it may come from what
    writing level 0 accumulated); none is written without it.
    """
    import tifffile

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    width, height, mpp, t = spec.width, spec.height, spec.mpp, spec.tile_px
    if not spec.downsamples or spec.downsamples[0] != 1:
        raise ValueError("the first downsample must be 1")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(p, bigtiff=width * height > 2**31) as tw:
        for i, ds in enumerate(spec.downsamples):
            kw: dict[str, object] = {}
            if kind == "aperio":
                kw["compression"] = "jpeg"
                kw["compressionargs"] = {"level": quality}
                kw["subsampling"] = (1, 1)
                kw["description"] = (  # what readers parse mpp and magnification from
                    f"Aperio Image Library v12.0.15 {software}\r\n{width}x{height} [0,0 {width}x{height}] "
                    f"({t}x{t}) JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp}"
                    + "".join(f"|{k} = {v}" for k, v in (extra or {}).items())
                )
            else:
                kw["compression"] = "zlib"
                kw["subfiletype"] = 1 if i else 0
                if kind == "generic":
                    kw["resolution"] = (1e4 / (mpp * ds), 1e4 / (mpp * ds))
                    kw["resolutionunit"] = "CENTIMETER"
            tw.write(
                iter(level_tiles(ds)),
                shape=(-(-height // ds), -(-width // ds), 3),
                dtype=np.uint8,
                tile=(t, t),
                photometric="rgb",
                metadata=None,
                maxworkers=min(4, os.cpu_count() or 1),
                **kw,  # type: ignore[arg-type]
            )
            if kind == "aperio" and i == 0 and thumbnail is not None:
                # Aperio puts a stripped thumbnail second; readers treat it as an associated image.
                tw.write(
                    thumbnail(),
                    photometric="rgb",
                    description="Aperio Image Library thumbnail",
                    metadata=None,
                )
    return p


__all__ = ["KINDS", "Pyramid", "write_pyramid"]
