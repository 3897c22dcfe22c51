"""Histology augmentations on uint8 RGB tiles in numpy: dihedral flips/rotations and HED stain jitter.

HED colour deconvolution follows Ruifrok & Johnston (2001), "Quantification of histochemical staining
by color deconvolution", Anal. Quant. Cytol. Histol. 23:291-299, with their haematoxylin, eosin and
DAB optical-density vectors (the same matrix as ``skimage.color.rgb2hed``), each scaled to unit length.

Optical density here is ``OD = -ln((I + 1) / 256)`` for ``I`` in 0..255, so the round trip
RGB -> HED -> RGB is exact up to float rounding (no clipping of negative stain amounts, unlike
``rgb2hed``) and ``hed_jitter`` with zero jitter is the identity.

The jitter is the one of Tellez et al. (2018, 2019): per tile and per stain channel,
``c' = c * alpha + beta`` with ``alpha ~ U(1 - sigma, 1 + sigma)`` and ``beta ~ U(-bias, bias)``
(``beta`` in natural-log optical-density units).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_RAW = np.array(
    [
        [0.65, 0.70, 0.29],  # haematoxylin
        [0.07, 0.99, 0.11],  # eosin
        [0.27, 0.57, 0.78],  # DAB
    ],
    dtype=np.float64,
)
RGB_FROM_HED: npt.NDArray[np.float64] = _RAW / np.linalg.norm(_RAW, axis=1, keepdims=True)
"""Rows: OD (R, G, B) of one unit of haematoxylin, eosin, DAB."""
HED_FROM_RGB: npt.NDArray[np.float64] = np.linalg.inv(RGB_FROM_HED).astype(np.float64)


def _as_tiles(tiles: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    if tiles.dtype != np.uint8 or tiles.ndim not in (3, 4) or tiles.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB tile(s) (..., H, W, 3), got {tiles.dtype} {tiles.shape}")
    return tiles


_OD_LUT: npt.NDArray[np.float32] = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(
    np.float32
)
"""Optical density of each uint8 intensity."""


def rgb_to_hed(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Stain amounts (H, E, DAB) per pixel of uint8 RGB, shape ``(..., 3)``, float32."""
    return _OD_LUT[rgb] @ HED_FROM_RGB.astype(np.float32)


def _od_to_rgb(od: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    rgb = np.exp(-od)
    rgb *= 256.0
    rgb -= 1.0
    np.clip(rgb, 0.0, 255.0, out=rgb)
    return np.rint(rgb).astype(np.uint8)


def hed_to_rgb(hed: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """Inverse of ``rgb_to_hed``: uint8 RGB (rounded, clipped to 0..255)."""
    return _od_to_rgb(np.asarray(hed, dtype=np.float32) @ RGB_FROM_HED.astype(np.float32))


def hed_jitter(
    tiles: npt.NDArray[np.uint8], rng: np.random.Generator, sigma: float = 0.1, bias: float = 0.05
) -> npt.NDArray[np.uint8]:
    """Random stain perturbation in HED space; one draw per tile and stain channel.

    ``tiles``: uint8 ``(H, W, 3)`` or ``(N, H, W, 3)`` RGB. Returns a new array of the same shape and
    dtype; geometry is unchanged. With ``sigma == bias == 0`` the result equals the input.

    Computed as one affine map per tile in optical-density space, which is the same as
    ``hed_to_rgb(rgb_to_hed(t) * alpha + beta)``: ``od' = od @ (HED_FROM_RGB diag(alpha) RGB_FROM_HED)
    + beta @ RGB_FROM_HED``.
    """
    tiles = _as_tiles(tiles)
    if sigma < 0 or bias < 0:
        raise ValueError(f"sigma and bias must be >= 0, got {sigma}, {bias}")
    if sigma == 0 and bias == 0:
        return tiles.copy()
    batch = tiles if tiles.ndim == 4 else tiles[None]
    n = batch.shape[0]
    alpha = rng.uniform(1.0 - sigma, 1.0 + sigma, size=(n, 3))
    beta = rng.uniform(-bias, bias, size=(n, 3))
    maps = np.einsum("ij,nj,jk->nik", HED_FROM_RGB, alpha, RGB_FROM_HED).astype(np.float32)
    offsets = (beta @ RGB_FROM_HED).astype(np.float32)[:, None, :]
    od = np.matmul(_OD_LUT[batch].reshape(n, -1, 3), maps) + offsets
    out = _od_to_rgb(od).reshape(batch.shape)
    return out if tiles.ndim == 4 else out[0]


def random_dihedral(tiles: npt.NDArray[np.uint8], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Each tile of ``(N, H, W, 3)`` (square) gets a random 90-degree rotation and a random flip."""
    tiles = _as_tiles(tiles)
    batch = tiles if tiles.ndim == 4 else tiles[None]
    if batch.shape[1] != batch.shape[2]:
        raise ValueError(f"dihedral augmentation needs square tiles, got {batch.shape[1:3]}")
    ks = rng.integers(0, 4, size=batch.shape[0])
    flips = rng.integers(0, 2, size=batch.shape[0]).astype(bool)
    out = np.empty_like(batch)
    for k in range(4):  # vectorised per (rotation, flip) combination: 8 strided copies at most
        for flip in (False, True):
            sel = np.flatnonzero((ks == k) & (flips == flip))
            if sel.size:
                t = np.rot90(batch[sel], k=k, axes=(1, 2))
                out[sel] = t[:, :, ::-1] if flip else t
    return out if tiles.ndim == 4 else out[0]


def augment_batch(
    tiles: npt.NDArray[np.uint8], rng: np.random.Generator, sigma: float = 0.1, bias: float = 0.05
) -> npt.NDArray[np.uint8]:
    """Training augmentation: random dihedral transform, then HED stain jitter."""
    return hed_jitter(random_dihedral(tiles, rng), rng, sigma=sigma, bias=bias)
