"""The real bundled scan with part of it out of focus: a Gaussian blur of ``sigma_um`` micrometres over
level 0, written back as an Aperio SVS (JPEG tiles, as a scanner stores them). Synthetic defocus (no
out-of-focus scan with a licence that lets us keep it exists in ../shared/data) of real tissue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from testkit.ink import _Spec, _tiles, sample_rgb
from testkit.svs import write_pyramid


def defocus(rgb: np.ndarray, sigma_px: float, *, from_x: int = 0) -> np.ndarray:
    """``rgb`` (h, w, 3 uint8) blurred by a Gaussian of ``sigma_px`` level-0 pixels right of column
    ``from_x`` (0: everywhere); the pixels left of it are unchanged."""
    from scipy.ndimage import gaussian_filter

    out = rgb.copy()
    if sigma_px > 0:
        blurred = gaussian_filter(rgb.astype(np.float32), sigma=(sigma_px, sigma_px, 0), mode="mirror")
        out[:, from_x:] = np.clip(np.rint(blurred[:, from_x:]), 0, 255).astype(np.uint8)
    return out


def write_defocused_sample(
    path: Path, sigma_um: float, *, right_fraction: float = 1.0, mpp: float | None = None, quality: int = 85
) -> Path:
    """The bundled sample with its right ``right_fraction`` (of the width) blurred by ``sigma_um``, as an
    Aperio SVS at ``path`` (JPEG ``quality``); ``mpp`` overrides the resolution written in the file
    (the pixels stay the sample's). Returns ``path``."""
    rgb, sample_mpp = sample_rgb()
    from_x = round(rgb.shape[1] * (1.0 - right_fraction))
    rgb = defocus(rgb, sigma_um / sample_mpp, from_x=from_x)
    spec = _Spec(rgb.shape[1], rgb.shape[0], mpp or sample_mpp)
    write_pyramid(path, spec, lambda ds: _tiles(rgb, ds, spec.tile_px), kind="aperio", quality=quality)
    return path
