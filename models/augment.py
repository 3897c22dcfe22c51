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


def overlay_tissue(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Two layers of stained tissue (uint8 RGB, same shape) seen through each other, as in a fold:
    light passes both, so their optical densities add (Beer-Lambert). Glass (white) over tissue leaves
    the tissue as it was; a tile over itself is the same tile stained twice as dark."""
    return _od_to_rgb(_OD_LUT[_as_tiles(a)] + _OD_LUT[_as_tiles(b)])


def fold_partners(groups: npt.ArrayLike, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """For each tile, the index of another tile of its group (patient, slide) to fold over it, drawn
    with ``rng``; a tile alone in its group is its own partner."""
    g = np.asarray(groups)
    out = np.empty(len(g), np.int64)
    for i in range(len(g)):
        others = np.flatnonzero((g == g[i]) & (np.arange(len(g)) != i))
        out[i] = rng.choice(others) if others.size else i
    return out


def fold_over_partners(
    tiles: npt.NDArray[np.uint8], groups: npt.ArrayLike, seed: int = 0
) -> npt.NDArray[np.uint8]:
    """Each tile with another tile of its group (:func:`fold_partners`, drawn from ``seed``) turned
    by 90 degrees folded over it: the measurement's fold (``models.compare``, the card's finding)."""
    partner = tiles[fold_partners(groups, np.random.default_rng(seed))]
    return overlay_tissue(tiles, np.ascontiguousarray(np.rot90(partner, axes=(1, 2))))


def fold_tiles(
    tiles: npt.NDArray[np.uint8], rng: np.random.Generator, fraction: float
) -> npt.NDArray[np.uint8]:
    """Training augmentation: each tile of a batch ``(N, H, W, 3)`` is, with probability ``fraction``,
    folded over itself (:func:`overlay_tissue` with the tile turned by 90, 180 or 270 degrees and
    maybe mirrored), as a fold lays a section over its neighbouring tissue. The label stays: folded
    benign tissue is benign. 0 returns the batch unchanged (and draws nothing from ``rng``)."""
    if fraction <= 0:
        return tiles
    hit = np.flatnonzero(rng.random(len(tiles)) < fraction)
    if not hit.size:
        return tiles
    out = tiles.copy()
    for i in hit:
        layer = np.rot90(tiles[i], k=int(rng.integers(1, 4)))
        if rng.random() < 0.5:
            layer = layer[:, ::-1]
        out[i] = overlay_tissue(tiles[i], np.ascontiguousarray(layer))
    return out


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


def _rotate_towards_random(
    v: npt.NDArray[np.float64], angle: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Unit vector ``v`` turned by ``angle`` radians in a random direction (kept unit length)."""
    w = rng.normal(size=3)
    w -= (w @ v) * v
    w /= np.linalg.norm(w)
    return np.cos(angle) * v + np.sin(angle) * w


def stain_rotation(
    tiles: npt.NDArray[np.uint8], rng: np.random.Generator, max_deg: float = 15.0, share: float = 0.5
) -> npt.NDArray[np.uint8]:
    """Another lab's stain colours: for a share of the tiles, the tile is unmixed with the standard H,
    E and DAB vectors (``HED_FROM_RGB``) and mixed again with H and E each turned by an angle drawn
    from 0 to ``max_deg`` degrees in a random direction (optical-density space; unit vectors; DAB kept),
    one draw per tile. ``hed_jitter`` scales the stain amounts along fixed vectors; this changes the
    vectors' hue, as labs' haematoxylin and eosin differ. ``max_deg == 0`` or ``share == 0``: a copy."""
    tiles = _as_tiles(tiles)
    if max_deg < 0 or not 0 <= share <= 1:
        raise ValueError(f"max_deg must be >= 0 and share in [0, 1], got {max_deg}, {share}")
    batch = (tiles if tiles.ndim == 4 else tiles[None]).copy()
    n = batch.shape[0]
    chosen = np.flatnonzero(rng.random(n) < share) if max_deg > 0 else np.empty(0, np.intp)
    for i in chosen:
        mix = RGB_FROM_HED.copy()
        for row in (0, 1):  # H, E
            mix[row] = _rotate_towards_random(RGB_FROM_HED[row], np.deg2rad(rng.uniform(0, max_deg)), rng)
        m = (HED_FROM_RGB @ mix).astype(np.float32)
        od = _OD_LUT[batch[i]].reshape(-1, 3) @ m
        batch[i] = _od_to_rgb(od).reshape(batch[i].shape)
    return batch if tiles.ndim == 4 else batch[0]


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


def colour_jitter(
    tiles: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    brightness: float = 0.1,
    contrast: float = 0.15,
    saturation: float = 0.15,
    gamma: float = 0.15,
) -> npt.NDArray[np.uint8]:
    """Per tile: gamma ``g ~ exp(U(-gamma, gamma))``, contrast and saturation factors ``U(1 - c, 1 + c)``
    around the tile's mean and grey level, brightness shift ``U(-b, b)`` (fraction of full scale)."""
    batch = _as_tiles(tiles)
    batch = batch if batch.ndim == 4 else batch[None]
    n = batch.shape[0]
    x = batch.astype(np.float32) / 255.0
    g = np.exp(rng.uniform(-gamma, gamma, n)).astype(np.float32)[:, None, None, None]
    x = np.power(x, g)
    grey = x.mean(axis=3, keepdims=True)
    s = rng.uniform(1 - saturation, 1 + saturation, n).astype(np.float32)[:, None, None, None]
    x = grey + (x - grey) * s
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    c = rng.uniform(1 - contrast, 1 + contrast, n).astype(np.float32)[:, None, None, None]
    b = rng.uniform(-brightness, brightness, n).astype(np.float32)[:, None, None, None]
    x = (x - mean) * c + mean + b
    out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return out if tiles.ndim == 4 else out[0]


def degrade(
    tile: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    p_resolution: float = 0.3,
    coarse_mpp: tuple[float, float] = (0.55, 1.0),
    tile_mpp: float = 0.5,
    p_blur: float = 0.2,
    blur_radius: tuple[float, float] = (0.3, 1.5),
    p_jpeg: float = 0.3,
    jpeg_quality: tuple[int, int] = (40, 95),
) -> npt.NDArray[np.uint8]:
    """Scanner-shift degradations of one uint8 RGB tile, each applied with its probability.

    Resolution: as if scanned at ``m ~ U(coarse_mpp)`` um/px and upsampled back to ``tile_mpp``
    (bilinear down, bicubic up); defocus: Gaussian blur of radius ``U(blur_radius)`` px; JPEG
    re-encoding at quality ``U(jpeg_quality)``.
    """
    from io import BytesIO

    from PIL import Image, ImageFilter

    im = Image.fromarray(_as_tiles(tile))
    size = im.size
    if rng.random() < p_resolution:
        factor = tile_mpp / rng.uniform(*coarse_mpp)
        small = (max(8, round(size[0] * factor)), max(8, round(size[1] * factor)))
        im = im.resize(small, Image.Resampling.BILINEAR).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < p_blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*blur_radius))))
    if rng.random() < p_jpeg:
        buf = BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(jpeg_quality[0], jpeg_quality[1] + 1)))
        buf.seek(0)
        with Image.open(buf) as dec:
            im = dec.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def scanner_shift(
    tiles: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    strength: float = 1.0,
    blur_radius: tuple[float, float] = (0.3, 1.5),
) -> npt.NDArray[np.uint8]:
    """Training augmentation that models scanner shift, for a batch ``(N, H, W, 3)``.

    Dihedral transform, per-tile degradations (``degrade``), HED stain jitter (sigma 0.2, bias 0.07),
    colour jitter, and 10 % of tiles turned grey (so that morphology, not one centre's stain, decides).
    ``strength`` scales every probability and magnitude (0 = geometry only; 1 = the default;
    FixMatch's strong view uses more); ``blur_radius``: the defocus's Gaussian sigma range, pixels.
    """
    out = random_dihedral(tiles, rng)
    if strength <= 0:
        return out
    k = float(strength)
    out = np.stack(
        [
            degrade(
                t,
                rng,
                p_resolution=min(1.0, 0.3 * k),
                p_blur=min(1.0, 0.2 * k),
                p_jpeg=min(1.0, 0.3 * k),
                blur_radius=blur_radius,
            )
            for t in out
        ]
    )
    out = hed_jitter(out, rng, sigma=0.2 * k, bias=0.07 * k)
    out = colour_jitter(out, rng, brightness=0.08 * k, contrast=0.15 * k, saturation=0.2 * k, gamma=0.15 * k)
    grey = np.flatnonzero(rng.random(len(out)) < min(1.0, 0.1 * k))  # morphology without colour
    if grey.size:
        g = out[grey].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        out[grey] = np.rint(g)[..., None].astype(np.uint8)
    return out
