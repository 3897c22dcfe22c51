"""Tissue detection on a low-resolution thumbnail. Pure functions over numpy arrays.

Sizes are given in square micrometres (um^2) and converted with the thumbnail's resolution, so the
mask behaves the same whatever the scanner's magnification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`tissue_mask` (units in the names)."""

    min_saturation: float = 0.07  # HSV saturation in [0, 1] below which a pixel is never tissue
    black_value: int = 40  # pixels whose brightest channel is below this are scanner borders, not tissue
    closing_um: float = 16.0  # radius of the morphological closing
    min_tissue_um2: float = 10_000.0  # drop tissue specks smaller than this (0.01 mm^2)
    max_hole_um2: float = 5_000.0  # fill holes inside tissue smaller than this

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] (float32) of an RGB uint8 image (h, w, 3)."""
    mx = rgb.max(axis=-1)
    spread = (mx - rgb.min(axis=-1)).astype(np.float32)  # uint8 arithmetic cannot underflow here
    spread /= np.maximum(mx, 1)
    return spread


def tissue_mask(thumb: np.ndarray, *, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are ``mpp`` micrometres wide.

    Stained tissue is saturated; glass is bright and grey; scanner borders and out-of-slide areas are
    dark. Saturation above max(Otsu, ``min_saturation``) among non-dark pixels, then closing, small
    holes filled and small specks removed (sizes in um / um^2). An empty or all-background
    thumbnail gives an all-False mask.
    """
    p = params or TissueParams()
    if thumb.ndim != 3 or thumb.shape[2] != 3:
        raise ValueError(f"expected an RGB thumbnail (h, w, 3), got shape {thumb.shape}")
    sat = saturation(thumb)
    not_dark = thumb.max(axis=-1) >= p.black_value
    if not not_dark.any():
        return np.zeros(thumb.shape[:2], bool)
    # Otsu on a 256-bin histogram: same threshold, no copy of the candidate pixels.
    counts, edges = np.histogram(sat[not_dark], bins=256, range=(0.0, 1.0))
    thr = p.min_saturation
    if np.count_nonzero(counts) > 1:
        centres = (edges[:-1] + edges[1:]) / 2
        thr = max(thr, float(threshold_otsu(hist=(counts, centres))))
    mask = (sat > thr) & not_dark
    px_area_um2 = mpp * mpp
    radius = round(p.closing_um / mpp)
    if radius >= 1:
        padded = np.pad(mask, radius)  # so closing does not erode tissue touching the image edge
        mask = ndimage.binary_closing(padded, structure=disk(radius))[radius:-radius, radius:-radius]
    mask = _fill_small_holes(mask, max_px=int(p.max_hole_um2 / px_area_um2))
    return _remove_small_objects(mask, min_px=int(np.ceil(p.min_tissue_um2 / px_area_um2)))


def _remove_small_objects(mask: np.ndarray, *, min_px: int) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3)), output=np.int32)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return np.asarray(keep[labels])


def _fill_small_holes(mask: np.ndarray, *, max_px: int) -> np.ndarray:
    """Fill background components of at most ``max_px`` pixels that do not touch the border."""
    if max_px < 1:
        return mask
    labels, _ = ndimage.label(~mask, output=np.int32)  # 4-connected background
    sizes = np.bincount(labels.ravel())
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def tissue_fraction_in_boxes(mask: np.ndarray, boxes_l0: np.ndarray, downsample: float) -> np.ndarray:
    """Fraction of each box covered by tissue (float32, shape (N,)).

    ``boxes_l0`` is (N, 4) of x0, y0, x1, y1 in level-0 pixels; ``downsample`` is level-0 pixels per
    mask pixel. Each box covers at least one mask pixel.
    """
    if len(boxes_l0) == 0:
        return np.zeros(0, np.float32)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    b = np.asarray(boxes_l0, np.float64) / downsample
    x0 = np.clip(np.round(b[:, 0]).astype(np.int64), 0, mask.shape[1] - 1)
    y0 = np.clip(np.round(b[:, 1]).astype(np.int64), 0, mask.shape[0] - 1)
    x1 = np.clip(np.maximum(np.round(b[:, 2]).astype(np.int64), x0 + 1), 1, mask.shape[1])
    y1 = np.clip(np.maximum(np.round(b[:, 3]).astype(np.int64), y0 + 1), 1, mask.shape[0])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)
