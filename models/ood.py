"""Out-of-distribution reference: how far a tile's embedding lies from the training tiles'.

Torch-free. The reference is a Gaussian fitted to the pooled CNN features (``TileNet.embed``) of
un-augmented training tiles (Lee et al. 2018, "A simple unified framework for detecting
out-of-distribution samples"), with Ledoit-Wolf-style shrinkage so that the 160 x 160 covariance is
well conditioned. The distance of one tile is Mahalanobis: ``||(f - mean) @ whiten||`` with
``whiten @ whiten.T = inverse(covariance)``; it is computed inside the exported ONNX graph.

A slide's score is the median tile distance divided by the reference distance ``d_ref``, the 99th
percentile of tile distances on held-out tiles of the training sources (validation split). The
warning threshold ``warn_above`` is the 95th percentile of that score over validation groups (source
pictures, patients): a slide above it is less like the training data than 95 % of held-out groups.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def fit_gaussian(
    features: npt.NDArray[np.floating], shrinkage: float = 0.1
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Mean ``(D,)`` and whitening matrix ``(D, D)`` of ``features`` ``(N, D)``.

    Covariance shrunk towards ``mean(diag) * I`` by ``shrinkage`` (0..1).
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {f.shape}")
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    mean = f.mean(0)
    cov = np.cov(f - mean, rowvar=False)
    target = np.eye(cov.shape[0]) * np.trace(cov) / cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * target
    precision = np.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    whiten = np.linalg.cholesky(precision)  # precision = L L^T, so ||x L||^2 = x P x^T
    return mean, whiten


def distances(
    features: npt.NDArray[np.floating], mean: npt.NDArray[np.floating], whiten: npt.NDArray[np.floating]
) -> npt.NDArray[np.float64]:
    """Mahalanobis distance of each row of ``features`` (same as the ONNX ``ood_distance`` output)."""
    z = (np.asarray(features, dtype=np.float64) - mean) @ whiten
    return np.sqrt((z * z).sum(1))


def slide_score(tile_distances: npt.NDArray[np.floating], d_ref: float) -> float:
    """Median tile distance over ``d_ref``; NaN without tiles."""
    d = np.asarray(tile_distances, dtype=np.float64)
    return float(np.median(d) / d_ref) if d.size else float("nan")
