"""Macenko H&E stain normalization in pure numpy.

Conventions used throughout this module:

- Pixels are RGB ``uint8`` arrays whose last axis holds the three channels in R, G, B order: a single
  image ``(H, W, 3)``, a batch of tiles ``(N, H, W, 3)`` or pooled pixels ``(P, 3)``.
- ``io`` is the transmitted (blank-slide) light intensity in 8-bit grey levels, default 240.
- Optical density (OD) is unitless, natural-log based: ``OD = max(0, -ln((I + 1) / io))``. The ``+ 1``
  avoids ``ln(0)``; the ``max(0, .)`` clips every pixel brighter than the blank slide (``I + 1 >= io``) to
  OD 0, so background never gets a negative OD. For tissue pixels this is the same OD as the original
  Macenko code and torchstain.
- A *tissue* pixel has ``OD >= beta`` in **every** channel (a pixel is background when **any** channel is
  below ``beta``), as in the reference implementation of Macenko et al. (ISBI 2009).
- A :class:`StainModel` holds the stain matrix with one unit OD vector per row, hematoxylin (H) first
  and eosin (E) second, components in R, G, B order, and the 99th-percentile concentration of each stain.

Typical slide-level use: ``model = fit_slide(batches_of_tiles)`` once per slide (pooled tissue pixels
sampled across the slide), then ``apply_macenko(batch, model)`` on every batch of tiles.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_pipeline.errors import StainError

__all__ = [
    "REFERENCE",
    "StainFitWarning",
    "StainModel",
    "apply_macenko",
    "fit_macenko",
    "fit_slide",
    "normalize_image",
    "optical_density",
    "reference_from_image",
    "sample_tissue_pixels",
]

#: Percentile of each stain's concentration used as its "maximum" (robust to outliers).
MAX_CONCENTRATION_PERCENTILE = 99.0
#: Smallest angle (degrees) allowed between the fitted H and E vectors; below it the fit is degenerate.
MIN_STAIN_ANGLE_DEG = 2.0

_CHUNK_PIXELS = 1 << 16  # pixels per chunk in apply_macenko: ~1.3 MiB of float32 scratch (fits L2)
_SAMPLE_CHUNK_PIXELS = 1 << 22  # pixels per chunk when scanning tiles for tissue in the samplers


class StainFitWarning(UserWarning):
    """A Macenko fit was not possible (too little tissue, degenerate data); the reference was used."""


@dataclass(frozen=True, eq=False)
class StainModel:
    """H&E stain model: stain OD vectors and robust maximum concentrations.

    Parameters
    ----------
    stain_matrix : ndarray of float64, shape (2, 3)
        One optical-density vector per row, hematoxylin first, eosin second; columns are the R, G, B
        channels. Rows fitted here have unit Euclidean norm and non-negative components.
    max_concentrations : ndarray of float64, shape (2,)
        The 99th-percentile concentration of H and E (OD units per unit stain vector), strictly positive.

    Notes
    -----
    Arrays are copied and made read-only. Equality compares values exactly. ``to_dict``/``from_dict``
    round-trip through JSON (or Zarr attributes) without loss.
    """

    stain_matrix: NDArray[np.float64]
    max_concentrations: NDArray[np.float64]

    def __post_init__(self) -> None:
        try:
            matrix = np.array(self.stain_matrix, dtype=np.float64)
            max_c = np.array(self.max_concentrations, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise StainError(f"stain model values are not numeric: {exc}") from exc
        if matrix.shape != (2, 3) or not np.all(np.isfinite(matrix)):
            raise StainError(
                f"stain_matrix must be a finite 2x3 array (rows H, E; columns R, G, B OD), got shape "
                f"{matrix.shape}"
            )
        if np.any(np.linalg.norm(matrix, axis=1) == 0.0):
            raise StainError("stain_matrix has an all-zero stain vector")
        if max_c.shape != (2,) or not np.all(np.isfinite(max_c)) or np.any(max_c <= 0.0):
            raise StainError(
                f"max_concentrations must be two finite positive numbers (H, E), got {max_c.tolist()}"
            )
        matrix.setflags(write=False)
        max_c.setflags(write=False)
        object.__setattr__(self, "stain_matrix", matrix)
        object.__setattr__(self, "max_concentrations", max_c)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StainModel):
            return NotImplemented
        return bool(
            np.array_equal(self.stain_matrix, other.stain_matrix)
            and np.array_equal(self.max_concentrations, other.max_concentrations)
        )

    def __hash__(self) -> int:
        return hash((self.stain_matrix.tobytes(), self.max_concentrations.tobytes()))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (plain lists of floats) describing this model."""
        return {
            "method": "macenko",
            "stains": ["hematoxylin", "eosin"],
            "channels": ["R", "G", "B"],
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StainModel:
        """Build a model from :meth:`to_dict` output; raise :class:`StainError` when it is malformed."""
        try:
            matrix = data["stain_matrix"]
            max_c = data["max_concentrations"]
        except (KeyError, TypeError) as exc:
            raise StainError(
                f"stain model dict needs 'stain_matrix' and 'max_concentrations' keys: missing {exc}"
            ) from exc
        for key, expected in (("stains", ["hematoxylin", "eosin"]), ("channels", ["R", "G", "B"])):
            if key in data and list(data[key]) != expected:
                raise StainError(f"stain model dict has {key}={data[key]!r}; only {expected!r} is supported")
        return cls(stain_matrix=np.asarray(matrix), max_concentrations=np.asarray(max_c))


#: The widely used default H&E reference of the original Macenko implementations (HERef / maxCRef),
#: stored with rows H, E.
REFERENCE = StainModel(
    stain_matrix=np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]]).T,
    max_concentrations=np.array([1.9705, 1.0308]),
)


# ----------------------------------------------------------------------------------------------------
# validation and optical density


def _check_io(io: float) -> float:
    io = float(io)
    if not (np.isfinite(io) and 1.0 < io <= 256.0):
        raise StainError(f"io (light intensity, 8-bit grey levels) must be in (1, 256], got {io}")
    return io


def _check_pixels(pixels: np.ndarray, name: str) -> NDArray[np.uint8]:
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise StainError(f"{name} must be RGB uint8, got dtype {arr.dtype}")
    if arr.ndim < 1 or arr.shape[-1] != 3:
        raise StainError(
            f"{name} must have shape (..., 3) with R, G, B last, got {arr.shape}"
            + ("; drop the alpha channel first" if arr.ndim >= 1 and arr.shape[-1] == 4 else "")
        )
    return arr


def _od_table(io: float) -> NDArray[np.float64]:
    """OD of every 8-bit value (index 0..255), float64, clipped at 0 (never negative)."""
    values = np.arange(256, dtype=np.float64)
    return np.maximum(0.0, -np.log((values + 1.0) / io))


def _channel_max(flat: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Brightest channel of each pixel of a (P, 3) array (much faster than ``max(axis=1)``)."""
    return np.maximum(np.maximum(flat[:, 0], flat[:, 1]), flat[:, 2])


def _tissue_max_value(io: float, beta: float) -> int:
    """Largest 8-bit value whose OD is >= beta; a pixel is tissue iff all its channels are <= it.

    Returns -1 when no value qualifies (no pixel can be tissue).
    """
    if not (np.isfinite(beta) and beta >= 0.0):
        raise StainError(f"beta (OD threshold) must be a finite number >= 0, got {beta}")
    qualifies = np.flatnonzero(_od_table(io) >= beta)
    return int(qualifies[-1]) if qualifies.size else -1


def optical_density(pixels_rgb: np.ndarray, *, io: float = 240.0) -> NDArray[np.float32]:
    """Convert RGB pixels to optical density.

    Parameters
    ----------
    pixels_rgb : ndarray of uint8, shape (..., 3)
        RGB intensities in grey levels 0..255.
    io : float
        Transmitted light intensity (grey levels); pixels with ``I + 1 >= io`` get OD 0.

    Returns
    -------
    ndarray of float32, shape (..., 3)
        ``max(0, -ln((I + 1) / io))``, unitless natural-log OD, never negative.
    """
    arr = _check_pixels(pixels_rgb, "pixels_rgb")
    return np.take(_od_table(_check_io(io)).astype(np.float32), arr)


# ----------------------------------------------------------------------------------------------------
# fitting


def _fit_or_reason(
    pixels: NDArray[np.uint8],
    *,
    io: float,
    beta: float,
    alpha: float,
    min_pixels: int,
    max_c_from: str,
) -> tuple[StainModel | None, str]:
    """Macenko fit; return ``(model, "")`` or ``(None, reason)`` when no usable fit exists."""
    io = _check_io(io)
    if not (np.isfinite(alpha) and 0.0 <= alpha < 50.0):
        raise StainError(f"alpha (angle percentile) must be in [0, 50), got {alpha}")
    if max_c_from not in ("tissue", "all"):
        raise StainError(f"max_c_from must be 'tissue' or 'all', got {max_c_from!r}")
    flat = pixels.reshape(-1, 3)
    table = _od_table(io)
    tissue = _channel_max(flat) <= _tissue_max_value(io, beta)
    n_tissue = int(np.count_nonzero(tissue))
    if n_tissue < max(int(min_pixels), 3):
        return None, (
            f"only {n_tissue} tissue pixels (OD >= {beta} in every channel) of {flat.shape[0]}; "
            f"need at least {max(int(min_pixels), 3)}"
        )
    od = np.take(table, flat[tissue].T)  # (3, n) float64, planar: channel rows are contiguous

    # Plane of the two largest principal directions of the tissue OD (eigenvectors of its covariance).
    mean_od = od.mean(axis=1)
    centred = od - mean_od[:, None]
    eigenvalues, eigenvectors = np.linalg.eigh(centred @ centred.T / (n_tissue - 1))
    if not (
        np.all(np.isfinite(eigenvalues)) and eigenvalues[2] > 1e-12 and eigenvalues[1] > 1e-9 * eigenvalues[2]
    ):
        return None, "tissue optical densities do not span a plane (one colour or a single stain)"
    basis = eigenvectors[:, [2, 1]]
    if mean_od @ basis[:, 0] < 0.0:
        basis[:, 0] = -basis[:, 0]

    # Angles in the plane, measured from the mean direction so the percentiles never straddle +-pi.
    projected = basis.T @ od  # (2, n)
    phi0 = float(np.arctan2(mean_od @ basis[:, 1], mean_od @ basis[:, 0]))
    dphi = np.mod(np.arctan2(projected[1], projected[0]) - phi0 + np.pi, 2.0 * np.pi) - np.pi
    lo, hi = np.percentile(dphi, [alpha, 100.0 - alpha]) + phi0
    vectors = []
    for angle in (lo, hi):
        v = basis @ np.array([np.cos(angle), np.sin(angle)])
        if v.sum() < 0.0:
            v = -v
        v = np.clip(v, 0.0, None)  # a stain cannot add light: no negative OD component
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0.0:
            return None, "a fitted stain vector is zero or not finite"
        vectors.append(v / norm)
    h_vec, e_vec = (vectors[0], vectors[1]) if vectors[0][0] >= vectors[1][0] else (vectors[1], vectors[0])
    angle_deg = float(np.degrees(np.arccos(np.clip(h_vec @ e_vec, -1.0, 1.0))))
    if not angle_deg >= MIN_STAIN_ANGLE_DEG:
        return None, f"fitted H and E vectors are only {angle_deg:.2f} degrees apart (one stain?)"
    stain_matrix = np.stack([h_vec, e_vec])

    # Concentrations: least-squares solution of OD = C @ stain_matrix for all chosen pixels at once.
    # ``od @ pinv(stain_matrix)`` is exactly np.linalg.lstsq's minimum-norm solution for a full-rank
    # 2x3 matrix, ~25x faster than lstsq with one right-hand side per pixel.
    od_for_c = od if max_c_from == "tissue" else np.take(table, flat.T)
    concentrations = np.linalg.pinv(stain_matrix).T @ od_for_c  # (2, n)
    max_c = np.percentile(concentrations, MAX_CONCENTRATION_PERCENTILE, axis=1)
    if not (np.all(np.isfinite(max_c)) and np.all(max_c > 1e-6)):
        return None, f"99th-percentile stain concentrations are not positive: {max_c.tolist()}"
    return StainModel(stain_matrix=stain_matrix, max_concentrations=max_c), ""


def fit_macenko(
    pixels_rgb: np.ndarray,
    *,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_pixels: int = 500,
    max_c_from: Literal["tissue", "all"] = "tissue",
) -> StainModel:
    """Fit H&E stain vectors and maximum concentrations with Macenko's method.

    Parameters
    ----------
    pixels_rgb : ndarray of uint8, shape (..., 3)
        An image ``(H, W, 3)``, a batch ``(N, H, W, 3)`` or pooled pixels ``(P, 3)``, e.g. from
        :func:`sample_tissue_pixels`.
    io : float
        Transmitted light intensity in grey levels.
    beta : float
        OD threshold: pixels with OD < ``beta`` in any channel are background and not used.
    alpha : float
        Percentile (0..50) of the in-plane angle taken as each extreme stain direction.
    min_pixels : int
        Fewest tissue pixels needed for a fit.
    max_c_from : {"tissue", "all"}
        Pixels whose concentrations give the 99th-percentile maxima. ``"tissue"`` (default) makes the
        model independent of how much background the input holds, so a per-tile fit and a fit on pooled
        tissue pixels agree; ``"all"`` uses every pixel, as the original code and torchstain do.

    Returns
    -------
    StainModel
        Rows H then E (H has the larger red OD component), unit norm, non-negative. When the input has
        fewer than ``min_pixels`` tissue pixels or the fit is degenerate, :data:`REFERENCE` is returned
        and a :class:`StainFitWarning` is emitted; the result is never NaN.

    Raises
    ------
    StainError
        When the input is not ``(..., 3)`` uint8 or a parameter is out of range.
    """
    arr = _check_pixels(pixels_rgb, "pixels_rgb")
    model, reason = _fit_or_reason(
        arr, io=io, beta=beta, alpha=alpha, min_pixels=min_pixels, max_c_from=max_c_from
    )
    if model is None:
        warnings.warn(
            f"Macenko fit failed ({reason}); using the reference stain", StainFitWarning, stacklevel=2
        )
        return REFERENCE
    return model


# ----------------------------------------------------------------------------------------------------
# sampling tissue pixels across a slide


class _TissueReservoir:
    """Uniform sample without replacement of tissue pixels from a stream of tile batches.

    Every tissue pixel gets a random key from one seeded generator in stream order; the ``n_pixels``
    smallest keys are kept (bottom-k sampling). The sample therefore depends only on the seed and the
    pixel stream, not on how the stream is cut into batches, and memory stays O(n_pixels + chunk).
    """

    def __init__(self, n_pixels: int, *, io: float, beta: float, seed: int) -> None:
        if int(n_pixels) < 1:
            raise StainError(f"n_pixels must be >= 1, got {n_pixels}")
        self._n = int(n_pixels)
        self._max_value = _tissue_max_value(_check_io(io), beta)
        self._rng = np.random.default_rng(seed)
        self._seen = 0
        self._keys = np.empty(0, dtype=np.float64)
        self._positions = np.empty(0, dtype=np.int64)
        self._pixels = np.empty((0, 3), dtype=np.uint8)
        self._pending: list[tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.uint8]]] = []
        self._pending_count = 0

    def add(self, tiles: np.ndarray) -> None:
        flat = _check_pixels(tiles, "tiles").reshape(-1, 3)
        for start in range(0, flat.shape[0], _SAMPLE_CHUNK_PIXELS):
            chunk = flat[start : start + _SAMPLE_CHUNK_PIXELS]
            index = np.flatnonzero(_channel_max(chunk) <= self._max_value)
            keys = self._rng.random(index.size)
            if self._keys.size == self._n:  # full: only keys below the current n-th smallest can enter
                keep = keys < self._keys.max()
                index, keys = index[keep], keys[keep]
            if index.size:
                self._pending.append((keys, self._seen + start + index, chunk[index]))
                self._pending_count += index.size
                if self._pending_count >= self._n:
                    self._merge()
        self._seen += flat.shape[0]

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys, *(p[0] for p in self._pending)])
        positions = np.concatenate([self._positions, *(p[1] for p in self._pending)])
        pixels = np.concatenate([self._pixels, *(p[2] for p in self._pending)])
        self._pending, self._pending_count = [], 0
        if keys.size > self._n:
            keep = np.argpartition(keys, self._n - 1)[: self._n]
            keys, positions, pixels = keys[keep], positions[keep], pixels[keep]
        self._keys, self._positions, self._pixels = keys, positions, pixels

    def result(self) -> NDArray[np.uint8]:
        self._merge()
        order = np.argsort(self._positions, kind="stable")
        return np.ascontiguousarray(self._pixels[order])


def sample_tissue_pixels(
    tiles: np.ndarray,
    *,
    n_pixels: int,
    io: float = 240.0,
    beta: float = 0.15,
    seed: int = 0,
) -> NDArray[np.uint8]:
    """Draw a deterministic uniform sample of tissue pixels from tiles spread across a slide.

    Parameters
    ----------
    tiles : ndarray of uint8, shape (..., 3)
        Tiles ``(N, H, W, 3)`` (or any RGB array). Scanned in chunks; only the sample is kept.
    n_pixels : int
        Sample size; fewer are returned when the tiles hold fewer tissue pixels.
    io, beta : float
        Light intensity (grey levels) and OD threshold defining tissue as in :func:`fit_macenko`.
    seed : int
        Seed of the sampler; the same tiles and seed always give the same pixels.

    Returns
    -------
    ndarray of uint8, shape (min(n_pixels, n_tissue), 3)
        RGB tissue pixels in their original scan order, ready for :func:`fit_macenko`.
    """
    reservoir = _TissueReservoir(n_pixels, io=io, beta=beta, seed=seed)
    reservoir.add(tiles)
    return reservoir.result()


def fit_slide(
    tile_batches: Iterable[np.ndarray],
    *,
    n_pixels: int = 250_000,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_pixels: int = 500,
    seed: int = 0,
) -> StainModel:
    """Fit one stain model for a slide from tissue pixels pooled over an iterable of tile batches.

    The batches are consumed once; a uniform sample of ``n_pixels`` tissue pixels is kept (reservoir,
    independent of how the tiles are split into batches), then :func:`fit_macenko` runs once on it.

    Parameters
    ----------
    tile_batches : iterable of ndarray of uint8, each shape (..., 3)
        Batches of RGB tiles spread across the slide (e.g. ``(N, H, W, 3)`` each).
    n_pixels : int
        Pooled sample size (memory ~19 bytes per pixel). 250,000 pixels give stain vectors within ~0.002
        of a fit on every pixel; scanning costs ~1 ms per 224 px tile, so for a large slide pass a
        subset of tiles spread across it.
    io, beta, alpha, min_pixels
        As in :func:`fit_macenko`.
    seed : int
        Sampler seed; results are deterministic for a given seed and tile stream.

    Returns
    -------
    StainModel
        The slide's model, or :data:`REFERENCE` with a :class:`StainFitWarning` when too little tissue.
    """
    reservoir = _TissueReservoir(n_pixels, io=io, beta=beta, seed=seed)
    for batch in tile_batches:
        reservoir.add(batch)
    pooled = reservoir.result()
    model, reason = _fit_or_reason(
        pooled, io=io, beta=beta, alpha=alpha, min_pixels=min_pixels, max_c_from="tissue"
    )
    if model is None:
        warnings.warn(
            f"slide-level Macenko fit failed ({reason}); using the reference stain",
            StainFitWarning,
            stacklevel=2,
        )
        return REFERENCE
    return model


# ----------------------------------------------------------------------------------------------------
# applying


def _transform_matrix(source: StainModel, reference: StainModel) -> NDArray[np.float64]:
    """3x3 matrix taking source OD row vectors to normalized OD row vectors.

    ``od @ pinv(S_src)`` gives the concentrations (one least-squares solve for every pixel), scaling
    by ``maxC_ref / maxC_src`` matches their ranges, and ``@ S_ref`` rebuilds OD with the reference
    stains; the three are fused into one matrix.
    """
    scale = reference.max_concentrations / source.max_concentrations
    return np.linalg.pinv(source.stain_matrix) @ (scale[:, None] * reference.stain_matrix)


def apply_macenko(
    tiles: np.ndarray,
    source: StainModel,
    reference: StainModel = REFERENCE,
    *,
    io: float = 240.0,
) -> NDArray[np.uint8]:
    """Normalize RGB tiles from the ``source`` stain to the ``reference`` stain.

    Parameters
    ----------
    tiles : ndarray of uint8, shape (..., 3)
        A batch ``(N, H, W, 3)``, an image ``(H, W, 3)`` or pixels ``(P, 3)``.
    source : StainModel
        Model fitted on the slide (or image) the tiles come from.
    reference : StainModel
        Target stain; defaults to :data:`REFERENCE`.
    io : float
        Light intensity (grey levels) used both to compute OD and to rebuild intensities.

    Returns
    -------
    ndarray of uint8, same shape as ``tiles``
        ``io * exp(-OD_normalized)`` rounded and clipped to [0, 255]. Background brighter than ``io``
        has OD 0 and comes out at ``io``.

    Notes
    -----
    The concentration solve (pseudo-inverse of the source stain matrix), the ``maxC`` scaling and the
    reconstruction with the reference stains are fused into one 3x3 matrix applied to the OD of every
    pixel. Each pixel is processed independently with float32 arithmetic, in chunks of 2**16 pixels
    (scratch memory ~1.3 MiB whatever the batch size), so a batch gives exactly the same bytes as its
    tiles one by one. There is no Python loop over tiles or pixels.
    """
    arr = _check_pixels(tiles, "tiles")
    io = _check_io(io)
    matrix = _transform_matrix(source, reference)
    if not (np.all(np.isfinite(matrix)) and np.abs(matrix).max() <= 1e6):
        raise StainError(
            "source and reference stain models give a non-finite or huge transform; "
            f"source max_concentrations={source.max_concentrations.tolist()}"
        )
    flat = arr.reshape(-1, 3)
    out = np.empty(arr.shape, dtype=np.uint8)
    _apply_pixels(flat, out.reshape(-1, 3), matrix, io)
    return out


def _apply_pixels(
    flat: NDArray[np.uint8], out: NDArray[np.uint8], matrix: NDArray[np.float64], io: float
) -> None:
    """Write ``io * exp(-(OD @ matrix))`` of ``flat`` (P, 3) into ``out`` (P, 3), chunk by chunk.

    Per output channel k: ``y = ln(io) - sum_j OD_j * matrix[j, k]``, clipped above at ``ln(255)``
    (brighter saturates), then ``exp(y) + 0.5`` truncated to uint8 (round half up). Planar float32
    scratch buffers are reused across chunks; every step is a whole-chunk numpy operation.
    """
    if flat.shape[0] == 0:
        return
    table = _od_table(io).astype(np.float32)
    neg = (-matrix).astype(np.float32)
    ln_io, ln_255, half = np.float32(np.log(io)), np.float32(np.log(255.0)), np.float32(0.5)
    size = min(_CHUNK_PIXELS, flat.shape[0])
    od = np.empty((3, size), dtype=np.float32)
    acc = np.empty(size, dtype=np.float32)
    tmp = np.empty(size, dtype=np.float32)
    with np.errstate(under="ignore"):  # exp of very negative y is 0 (black), as intended
        for start in range(0, flat.shape[0], size):
            chunk = flat[start : start + size]
            n = chunk.shape[0]
            for j in range(3):
                np.take(table, chunk[:, j], out=od[j, :n])
            y, t = acc[:n], tmp[:n]
            for k in range(3):
                np.multiply(od[0, :n], neg[0, k], out=y)
                np.multiply(od[1, :n], neg[1, k], out=t)
                y += t
                np.multiply(od[2, :n], neg[2, k], out=t)
                y += t
                y += ln_io
                np.clip(y, -np.inf, ln_255, out=y)
                np.exp(y, out=y)
                y += half
                out[start : start + n, k] = y


def normalize_image(
    img: np.ndarray,
    reference: StainModel = REFERENCE,
    *,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_pixels: int = 500,
) -> NDArray[np.uint8]:
    """Fit the image's own stain and normalize it to ``reference`` (per-image Macenko).

    Parameters
    ----------
    img : ndarray of uint8, shape (..., 3)
        RGB image (or pixels). For tiles of one slide prefer :func:`fit_slide` + :func:`apply_macenko`.
    reference : StainModel
        Target stain.
    io, beta, alpha, min_pixels
        As in :func:`fit_macenko`.

    Returns
    -------
    ndarray of uint8, same shape as ``img``
        Falls back to the reference as source (with a :class:`StainFitWarning`) when the image has too
        little tissue.
    """
    arr = _check_pixels(img, "img")
    source, reason = _fit_or_reason(
        arr, io=io, beta=beta, alpha=alpha, min_pixels=min_pixels, max_c_from="tissue"
    )
    if source is None:
        warnings.warn(
            f"Macenko fit failed ({reason}); using the reference stain", StainFitWarning, stacklevel=2
        )
        source = REFERENCE
    return apply_macenko(arr, source, reference, io=io)


_GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _read_rgb(path: str | os.PathLike[str]) -> NDArray[np.uint8]:
    """Read an image file as RGB uint8 (alpha dropped); raise StainError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            rgb = None if mode in _GREYSCALE_MODES else np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise StainError(
            f"cannot read stain reference image {os.fspath(path)}: {exc}; give a readable PNG, JPEG or TIFF"
        ) from exc
    if rgb is None:
        raise StainError(
            f"stain reference image {os.fspath(path)} is greyscale (mode {mode}); "
            "give an RGB image of H&E-stained tissue"
        )
    return rgb


def reference_from_image(
    path_or_array: str | os.PathLike[str] | np.ndarray,
    *,
    io: float = 240.0,
    beta: float = 0.15,
    alpha: float = 1.0,
    min_pixels: int = 500,
) -> StainModel:
    """Fit a reference stain model from a user's reference image.

    Parameters
    ----------
    path_or_array : path or ndarray of uint8, shape (H, W, 3) or (H, W, 4)
        Image file readable by Pillow (RGBA is fine: alpha is dropped) or an RGB(A) array.
    io, beta, alpha, min_pixels
        As in :func:`fit_macenko`.

    Returns
    -------
    StainModel

    Raises
    ------
    StainError
        Naming the file when it cannot be read, is greyscale, or has no usable stain (the fit would fall
        back to the default reference).
    """
    if isinstance(path_or_array, np.ndarray):
        name = f"array of shape {path_or_array.shape}"
        arr = path_or_array
        if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[-1] == 4:
            arr = arr[..., :3]
        arr = _check_pixels(arr, "reference image")
    else:
        name = os.fspath(path_or_array)
        arr = _read_rgb(path_or_array)
    model, reason = _fit_or_reason(
        arr, io=io, beta=beta, alpha=alpha, min_pixels=min_pixels, max_c_from="tissue"
    )
    if model is None:
        raise StainError(
            f"stain reference image {name} has no usable H&E stain ({reason}); "
            "choose an image with more stained tissue"
        )
    return model
