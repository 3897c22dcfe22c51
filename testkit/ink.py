"""Marker-pen rings drawn over a real slide: the ring a pathologist draws on the coverslip around a
focus, in blue or green ink. Synthetic ink (no pen-marked slide with a licence that lets us keep it
exists in ../shared/data), over the real bundled CMU-1-Small-Region scan.

Ink is a dye layer on the glass: it filters the light, so a pixel under it is the slide's colour
times the ink's transmission (alpha-blended at the stroke's faded edge).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from testkit.svs import write_pyramid

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"

#: transmission colours of common markers (RGB of the ink on white glass)
INKS = {"blue": (35, 55, 150), "green": (30, 120, 70)}


def pen_ring(
    rgb: np.ndarray, ink: tuple[int, int, int], *, width_px: float, alpha: float = 0.85
) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` (h, w, 3 uint8) with an elliptical ring of ``ink`` around its middle, the stroke
    ``width_px`` wide at level 0; and the ring's coverage (h, w) float32 in [0, 1]."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx, r = h * 0.5, w * 0.5, min(w, h) * 0.33
    dist = np.abs(np.hypot(yy - cy, (xx - cx) * 0.8) - r)
    cover = np.clip(1 - dist / (width_px / 2), 0, 1).astype(np.float32)
    a = cover[..., None] * alpha
    img = rgb.astype(np.float32)
    out = img * (1 - a) + img * (np.asarray(ink, np.float32) / 255.0) * a
    return out.clip(0, 255).astype(np.uint8), cover


@dataclass(frozen=True)
class _Spec:
    width: int
    height: int
    mpp: float
    downsamples: tuple[int, ...] = (1, 4)
    tile_px: int = 256


def _tiles(rgb: np.ndarray, ds: int, t: int) -> Iterator[np.ndarray]:
    level = rgb[::ds, ::ds]
    for y in range(0, level.shape[0], t):
        for x in range(0, level.shape[1], t):
            tile = np.full((t, t, 3), 255, np.uint8)
            part = level[y : y + t, x : x + t]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def sample_rgb() -> tuple[np.ndarray, float]:
    """The bundled sample's level 0 (RGB uint8) and its mpp."""
    import tifffile

    with tifffile.TiffFile(SAMPLE) as tf:
        rgb = tf.series[0].levels[0].asarray()
        desc = tf.pages[0].description
    mpp = float(desc.split("MPP = ")[1].split("|")[0])
    return rgb, mpp


def write_inked_sample(path: Path, colour: str | None, *, width_um: float = 75.0) -> tuple[Path, np.ndarray]:
    """The bundled sample with a ``colour`` pen ring (None: without), as an Aperio SVS at ``path``;
    returns the path and the ring's coverage at level 0."""
    rgb, mpp = sample_rgb()
    cover = np.zeros(rgb.shape[:2], np.float32)
    if colour is not None:
        rgb, cover = pen_ring(rgb, INKS[colour], width_px=width_um / mpp * 2)
    spec = _Spec(rgb.shape[1], rgb.shape[0], mpp)
    write_pyramid(path, spec, lambda ds: _tiles(rgb, ds, spec.tile_px), kind="aperio", quality=90)
    return path, cover
