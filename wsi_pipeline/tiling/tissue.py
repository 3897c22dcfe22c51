"""Tissue detection on a low-resolution thumbnail. Pure functions over numpy arrays.

Sizes are given in square micrometres (um^2) and converted with the thumbnail's resolution, so the
mask behaves the same whatever the scanner's magnification.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# scipy.ndimage and scikit-image are imported where they are used (see preload_libraries).


def preload_libraries() -> None:
    """Import the libraries :func:`tissue_mask` uses (0.1-0.2 s, most of it scipy's array-API layer
    rewriting docstrings), e.g. on another thread while a large thumbnail decodes (``plan_slide``);
    ``tissue_mask`` then finds them loaded (or waits for the import to end)."""
    import scipy.ndimage  # noqa: F401
    import skimage.filters.thresholding  # noqa: F401


@dataclass(frozen=True)
class TissueParams:
    """Parameters of :func:`tissue_mask` (units in the names)."""

    min_saturation: float = 0.07  # HSV saturation in [0, 1] below which a pixel is never tissue
    black_value: int = 40  # pixels whose brightest channel is below this are scanner borders, not tissue
    closing_um: float = 16.0  # radius of the morphological closing
    min_tissue_um2: float = 10_000.0  # drop tissue specks smaller than this (0.01 mm^2)
    max_hole_um2: float = 5_000.0  # fill holes inside tissue smaller than this
    # Marker-pen ink (blue, green: see pen_mask) in one piece of at least this area is not tissue
    # (0.02 mm^2; 0 turns the pen filter off); the ink is grown by pen_margin_um (its faded edge).
    pen_min_area_um2: float = 20_000.0
    pen_margin_um: float = 24.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_BAND_ROWS = 512  # thumbnail rows per band in tissue_mask


def channel_max(rgb: np.ndarray) -> np.ndarray:
    """Brightest channel of each pixel of an RGB image (h, w, 3): ``rgb.max(axis=-1)``, 25x faster
    (numpy reduces a 3-wide last axis pixel by pixel; whole-plane maxima run vectorized)."""
    return np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def channel_min(rgb: np.ndarray) -> np.ndarray:
    """Darkest channel of each pixel of an RGB image (h, w, 3), as :func:`channel_max`."""
    return np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] (float32) of an RGB uint8 image (h, w, 3)."""
    mx = channel_max(rgb)
    spread = (mx - channel_min(rgb)).astype(np.float32)  # uint8 arithmetic cannot underflow here
    spread /= np.maximum(mx, 1)
    return spread


def tissue_mask(thumb: np.ndarray, *, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are ``mpp`` micrometres wide
    (:func:`tissue_and_pen_masks` without the pen marks it excluded)."""
    return tissue_and_pen_masks(thumb, mpp=mpp, params=params)[0]


def tissue_and_pen_masks(
    thumb: np.ndarray, *, mpp: float, params: TissueParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean tissue mask of an RGB uint8 thumbnail whose pixels are ``mpp`` micrometres wide, and
    the marker-pen ink (:func:`pen_mask`) left out of it.

    Stained tissue is saturated; glass is bright and grey; scanner borders and out-of-slide areas are
    dark. Saturation above max(Otsu, ``min_saturation``) among non-dark pixels, then closing, small
    holes filled, pen marks taken out and small specks removed (sizes in um / um^2). An empty or
    all-background thumbnail gives all-False masks.
    """
    from scipy import ndimage
    from skimage.filters.thresholding import threshold_otsu

    p = params or TissueParams()
    if thumb.ndim != 3 or thumb.shape[2] != 3:
        raise ValueError(f"expected an RGB thumbnail (h, w, 3), got shape {thumb.shape}")
    # Row bands of the thumbnail, so the float32 saturation never exists for the whole slide at once
    # (a 100k x 100k slide at 0.5 um/px has a 6250 x 6250 px thumbnail: 156 MB per float32 copy).
    bands = [slice(y, y + _BAND_ROWS) for y in range(0, thumb.shape[0], _BAND_ROWS)]
    # Otsu on a 256-bin histogram of the non-dark pixels' saturation, accumulated band by band.
    counts = np.zeros(256, np.int64)
    edges = np.histogram_bin_edges(np.zeros(0), bins=256, range=(0.0, 1.0))
    for band in bands:
        part = thumb[band]
        sat = saturation(part)[channel_max(part) >= p.black_value]
        counts += np.histogram(sat, bins=256, range=(0.0, 1.0))[0]
    if not counts.any():
        return np.zeros(thumb.shape[:2], bool), np.zeros(thumb.shape[:2], bool)
    thr = p.min_saturation
    if np.count_nonzero(counts) > 1:
        centres = (edges[:-1] + edges[1:]) / 2
        thr = max(thr, float(threshold_otsu(hist=(counts, centres))))
    mask = np.empty(thumb.shape[:2], bool)
    for band in bands:
        part = thumb[band]
        mask[band] = (saturation(part) > thr) & (channel_max(part) >= p.black_value)
    px_area_um2 = mpp * mpp
    radius = round(p.closing_um / mpp)
    if radius >= 1:
        padded = np.pad(mask, radius)  # so closing does not erode tissue touching the image edge
        mask = ndimage.binary_closing(padded, structure=disk(radius))[radius:-radius, radius:-radius]
    mask = _fill_small_holes(mask, max_px=int(p.max_hole_um2 / px_area_um2))
    pen = pen_mask(thumb, mpp=mpp, params=p)
    pen &= mask  # only what would have been tissue
    if pen.any() and np.count_nonzero(pen) * 2 > np.count_nonzero(mask):
        # Blue or green over most of the "tissue" is a blue stain (not H&E), not pen marks: kept, and
        # left to the stain and OOD checks.
        pen[:] = False
    mask &= ~pen
    return _remove_small_objects(mask, min_px=int(np.ceil(p.min_tissue_um2 / px_area_um2))), pen


#: Hues (degrees) of marker-pen ink that H&E does not reach, with the saturation each needs: green
#: and cyan markers, and blue ones (hematoxylin's blue-purple lies at 240-290 degrees on slides).
#: Measured on the real scanned H&E of ../shared/data at 8 um/px (GlaS, Kather, MoNuSAC, MoNuSeg,
#: NCT-CRC-HE): 1 of 366,373 tissue pixels falls inside, and no piece reaches the pen filter's area
#: on the CMU and TCGA slides either (tests/test_pen.py).
PEN_HUES: tuple[tuple[float, float, float], ...] = ((75.0, 200.0, 0.15), (200.0, 235.0, 0.25))


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees [0, 360) (float32) of an RGB uint8 image (h, w, 3); 0 for grey pixels."""
    a = rgb.astype(np.float32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    mx, mn = channel_max(a), channel_min(a)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return np.asarray(h * 60.0, np.float32)


def pen_mask(thumb: np.ndarray, *, mpp: float, params: TissueParams | None = None) -> np.ndarray:
    """Marker-pen ink on an RGB uint8 thumbnail of ``mpp`` um/px: pixels of a pen's hue and saturation
    (:data:`PEN_HUES`) in connected pieces of at least ``pen_min_area_um2``, grown by
    ``pen_margin_um``. Pathologists circle and dot slides with blue and green markers; the model has
    never seen ink, and scored the ink on glass as tumour. H&E pixels never form such pieces."""
    from scipy import ndimage

    p = params or TissueParams()
    ink = np.zeros(thumb.shape[:2], bool)
    if p.pen_min_area_um2 <= 0 or not thumb.size:
        return ink
    min_sat = min(s for _, _, s in PEN_HUES)
    for y in range(0, thumb.shape[0], _BAND_ROWS):
        part = thumb[y : y + _BAND_ROWS]
        mx = channel_max(part)
        spread = mx.astype(np.int16) - channel_min(part)
        # Candidates first, in integers: saturated enough, not dark, red not the brightest (hue 60-300;
        # H&E's pink and most of its purple have red brightest), so hues are computed for few pixels.
        cand = (spread * 100 >= round(min_sat * 100) * mx.astype(np.int16)) & (mx >= p.black_value)
        cand &= part[..., 0] < mx
        idx = np.nonzero(cand)
        px = part[idx][None]  # (1, n, 3)
        hue, sat = hue_degrees(px)[0], saturation(px)[0]
        hit = np.zeros(len(hue), bool)
        for lo, hi, need in PEN_HUES:
            hit |= (hue >= lo) & (hue < hi) & (sat >= need)
        ink[y + idx[0][hit], idx[1][hit]] = True
    # Labelling and growing only where there is ink (pen marks cover little of a slide)
    radius = max(0, round(p.pen_margin_um / mpp))
    around = _around(ink, radius)
    if around is None:
        return ink
    box = _remove_small_objects(ink[around], min_px=int(np.ceil(p.pen_min_area_um2 / (mpp * mpp))))
    if radius >= 1 and box.any():
        box = ndimage.binary_dilation(box, structure=disk(radius))
    ink[:] = False
    ink[around] = box
    return ink


def _around(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The bounding box of ``mask``'s True pixels widened by ``margin`` pixels (clipped to the mask),
    or None when it has none: where a grown copy of a sparse mask can differ from it."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    h, w = mask.shape[:2]
    return (
        slice(max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin)),
    )


def disk(radius: int) -> np.ndarray:
    """Disk footprint of ``radius`` pixels, (2r+1, 2r+1) bool: x^2 + y^2 <= r^2, as
    ``skimage.morphology.disk`` (whose package costs 0.08 s more to import for these 2 lines)."""
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return np.asarray(xx * xx + yy * yy <= radius * radius)


def _label_sizes(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixels per label 0..n, counted band by band (``np.bincount`` would copy the whole int32 label
    image to int64 first: 312 MB for a 100k x 100k slide's mask)."""
    sizes = np.zeros(n + 1, np.int64)
    for y in range(0, labels.shape[0], _BAND_ROWS):
        sizes += np.bincount(labels[y : y + _BAND_ROWS].ravel(), minlength=n + 1)
    return sizes


def _remove_small_objects(mask: np.ndarray, *, min_px: int) -> np.ndarray:
    from scipy import ndimage

    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)), output=np.int32)
    sizes = _label_sizes(labels, n)
    keep = sizes >= min_px
    keep[0] = False
    return np.asarray(keep[labels])


def _fill_small_holes(mask: np.ndarray, *, max_px: int) -> np.ndarray:
    """Fill background components of at most ``max_px`` pixels that do not touch the border."""
    from scipy import ndimage

    if max_px < 1:
        return mask
    labels, n = ndimage.label(~mask, output=np.int32)  # 4-connected background
    sizes = _label_sizes(labels, n)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes <= max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def boxes_near(mask: np.ndarray, boxes_l0: np.ndarray, downsample: float, *, reach_px: int) -> np.ndarray:
    """Whether each box (level-0 x0, y0, x1, y1) comes within ``reach_px`` pixels of ``mask`` (a
    thumbnail-sized bool mask, ``downsample`` level-0 pixels per pixel); bool (N,)."""
    from scipy import ndimage

    around = _around(mask, reach_px)
    if around is None or not len(boxes_l0):
        return np.zeros(len(boxes_l0), bool)
    grown = np.zeros(mask.shape, bool)  # grown only around the mask's bounding box
    part = mask[around]
    grown[around] = ndimage.binary_dilation(part, structure=disk(reach_px)) if reach_px >= 1 else part
    return tissue_fraction_in_boxes(grown, boxes_l0, downsample) > 0


def tissue_fraction_in_boxes(mask: np.ndarray, boxes_l0: np.ndarray, downsample: float) -> np.ndarray:
    """Fraction of each box covered by tissue (float32, shape (N,)).

    ``boxes_l0`` is (N, 4) of x0, y0, x1, y1 in level-0 pixels; ``downsample`` is level-0 pixels per
    mask pixel. Each box covers at least one mask pixel.
    """
    if len(boxes_l0) == 0:
        return np.zeros(0, np.float32)
    # Summed-area table, built in place in the narrowest integer that holds the mask's pixel count: for
    # a 100k x 100k slide's 6250 px mask this is 156 MB, where int64 copies peaked at over 1 GB.
    dtype = np.int32 if mask.size < 2**31 else np.int64
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    b = np.asarray(boxes_l0, np.float64) / downsample
    x0 = np.clip(np.round(b[:, 0]).astype(np.int64), 0, mask.shape[1] - 1)
    y0 = np.clip(np.round(b[:, 1]).astype(np.int64), 0, mask.shape[0] - 1)
    x1 = np.clip(np.maximum(np.round(b[:, 2]).astype(np.int64), x0 + 1), 1, mask.shape[1])
    y1 = np.clip(np.maximum(np.round(b[:, 3]).astype(np.int64), y0 + 1), 1, mask.shape[0])
    inside = integral[y1, x1].astype(np.int64) - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)
