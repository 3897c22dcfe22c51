"""How sharp each tile is: a focus score per tile and the slide's out-of-focus summary.

Pure functions over uint8 RGB tiles. A scanner that lost focus over part of a slide blurs nuclei and
gland edges, and a tumour classifier then scores tumour lower (``python -m models.blur_check``: the
shipped model's GlaS validation AUC falls from 0.98 sharp to 0.93 at 1 um of defocus and 0.86 at
1.5 um), so a "no tumour" over blurred tissue is not a negative result.

**Score.** On the green channel (the one where haematoxylin-stained nuclei have most contrast):

    focus = q99(|Laplacian| at 1 um/px) / (q99 - q1 of the tile at 4 um/px + 10)

The numerator is the strength of the finest edges (nuclear membranes, chromatin) at 1 um/px; the
denominator the tile's contrast at 4 um/px, which defocus of a micrometre or two barely changes, so
the ratio does not depend on how dark the stain is (a tile at half the contrast scores the same) and
falls with defocus. Measuring at 1 um/px (2x2 pixel means at the model's 0.5 um/px), not pixel by
pixel, and on the 99th percentile, not the variance, keeps JPEG's 8 px block edges, which grow where
a scanner compresses blurred tissue, from passing for detail; the 10 grey levels keep a nearly empty
tile from dividing by its noise.

**Calibration** (``python -m models.blur_check --focus``: 4,511 real scanned tiles of eight sets,
several scanners, blurred by a Gaussian of sigma micrometres, as they are and re-encoded as JPEG at
quality 80): sharp tiles score 0.33-0.92 at their 2nd percentile (median 0.54-1.17), and 0-2 % of
them fall below :data:`SHARP_AT_LEAST` (1 of NCT-CRC-HE's 9: its background tile); at 1 um of
defocus 58-98 % do, at 1.5 um 89-100 %, from 2 um all, JPEG or not. The score keeps falling with
more blur, so the worst focus is never the one missed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Edges are measured at this resolution, um/px (the score's scale; tiles finer are binned to it).
FINE_UM = 1.0
#: Tiles coarser than this um/px are not scored (their finest detail is already defocus-sized).
MAX_TILE_MPP = 1.0
#: A tile scoring below this is out of focus (sharp real tiles: 0-2 % below it; 1.5 um of defocus:
#: 89-100 %; see the module docstring).
SHARP_AT_LEAST = 0.3
#: The slide is warned about when at least this share of its tissue tiles is out of focus (at most
#: 2 % of sharp tiles are: see the module docstring).
WARN_SHARE = 0.1
#: ... and at least this many tiles (one blurred tile of a tiny region is no finding).
WARN_MIN_TILES = 4
_CONTRAST_FLOOR = 10.0  # grey levels added to the denominator


def _block_sums(g: np.ndarray, k: int) -> np.ndarray:
    """Sums of k x k pixel blocks of an integer array (n, h, w) (h, w multiples of k), same dtype:
    k * k strided slices added (5x faster than a reshape and sum over two axes)."""
    if k == 1:
        return g
    out = g[:, 0::k, 0::k].copy()
    for dy in range(k):
        for dx in range(k):
            if dy or dx:
                out += g[:, dy::k, dx::k]
    return out


def _quantile_rows(a: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile (0-1, nearest rank) of each row of a 2-D array."""
    k = min(a.shape[1] - 1, max(0, round(q * (a.shape[1] - 1))))
    return np.partition(a, k, axis=1)[:, k]


def focus_measurable(tile_px: int, mpp: float) -> bool:
    """Whether :func:`focus_scores` measures tiles of ``tile_px`` pixels at ``mpp`` um/px."""
    return 0 < mpp <= MAX_TILE_MPP and tile_px >= 16 * max(1, round(FINE_UM / mpp))


def focus_scores(tiles: np.ndarray, mpp: float) -> np.ndarray | None:
    """Focus score (see the module docstring) of each uint8 RGB tile ``(n, h, w, 3)`` at ``mpp`` um/px,
    float32 ``(n,)``; None where ``mpp`` is coarser than :data:`MAX_TILE_MPP` or the tiles are too small
    to measure (under 4 px at 4 um/px). About 0.06 ms a 224 px tile on one core, in integers."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or not focus_measurable(min(tiles.shape[1:3]), mpp):
        return None
    k = max(1, round(FINE_UM / mpp))  # pixels per 1 um/px pixel (2 at 0.5 um/px)
    kc = 4 * k
    h, w = (tiles.shape[1] // kc) * kc, (tiles.shape[2] // kc) * kc
    n = len(tiles)
    if n == 0:
        return np.zeros(0, np.float32)
    # Block sums, not means: integers all the way (int16 holds 8 x 255 k^2 up to k = 4, 0.25 um/px)
    dtype = np.int16 if k <= 4 else np.int32
    fine = _block_sums(tiles[:, :h, :w, 1].astype(dtype), k)  # k^2 x the 1 um/px grey level
    lap = (
        4 * fine[:, 1:-1, 1:-1]
        - fine[:, :-2, 1:-1]
        - fine[:, 2:, 1:-1]
        - fine[:, 1:-1, :-2]
        - fine[:, 1:-1, 2:]
    )
    np.abs(lap, out=lap)
    edges = _quantile_rows(lap.reshape(n, -1), 0.99).astype(np.float32)
    coarse = _block_sums(fine.astype(np.int32), 4).reshape(n, -1)  # 16 k^2 x the 4 um/px grey level
    contrast = (_quantile_rows(coarse, 0.99) - _quantile_rows(coarse, 0.01)).astype(np.float32) / 16
    return edges / (contrast + _CONTRAST_FLOOR * k * k)


def upsampled_scan_mpp(mpp_l0: float, tile_mpp: float, tolerance: float) -> float | None:
    """The slide's level-0 um/px when it is coarser than its tiles beyond the level ``tolerance``
    (relative), so the tiles are upsampled and lack detail whatever the focus; else None."""
    return mpp_l0 if mpp_l0 > tile_mpp * (1 + tolerance) else None


def focus_summary(
    scores: np.ndarray | None,
    *,
    sharp_at_least: float = SHARP_AT_LEAST,
    warn_share: float = WARN_SHARE,
    coarse_scan_mpp: float | None = None,
    called: str | None = None,
    positive_name: str = "tumour",
) -> dict[str, Any] | None:
    """The slide's focus record: how many tissue tiles score below ``sharp_at_least`` and a warning
    when they are at least ``warn_share`` of the tiles (and :data:`WARN_MIN_TILES`). ``coarse_scan_mpp``:
    the slide's level-0 um/px when it is coarser than the tiles (upsampled tiles look blurred: the
    warning then names the scan, not the focus). ``called``: the slide's positive class when it was
    called positive (the warning then says its area may be larger), None otherwise or before a label.
    ``positive_name``: the model's positive class, as the label names it. None without scores."""
    if scores is None:
        return None
    s = np.asarray(scores, np.float64)
    blurred = int((s < sharp_at_least).sum())
    share = blurred / s.size if s.size else 0.0
    warn = s.size > 0 and share >= warn_share and blurred >= WARN_MIN_TILES
    meaning = (
        f"its {called} area may be larger than measured"
        if called
        else f"a 'no {positive_name}' is not a negative result"
    )
    if not warn:
        warning = None
    elif coarse_scan_mpp:
        warning = (
            f"{share:.0%} of the tissue tiles lack fine detail: the slide was scanned at "
            f"{coarse_scan_mpp:g} um/px, coarser than the model's tiles, which are upsampled; {meaning}: "
            "scan at the model's resolution or review by eye"
        )
    else:
        warning = (
            f"{share:.0%} of the tissue tiles look out of focus ({blurred} of {s.size}, focus score "
            f"< {sharp_at_least:g}): tumour there scores low, so {meaning}; re-scan the slide or review "
            "the blurred tiles by eye"
        )
    return {
        "measure": "q99 |Laplacian| at 1 um/px / (contrast at 4 um/px + 10), green channel",
        "sharp_at_least": sharp_at_least,
        "tiles_out_of_focus": blurred,
        "share_out_of_focus": round(share, 4),
        "median_score": round(float(np.median(s)), 3) if s.size else None,
        "warn_share": warn_share,
        "warning": warning,
    }
