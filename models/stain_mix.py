"""Training tiles shown in the stains of the other training sources (stain mixing).

Torch-free. In the mixed recipe each source has its own stain: LC25000's camera photographs, the GlaS
lab's colon scans, TCGA's lung scans (MoNuSAC). Stain and source are then confounded: a model can learn
"GlaS stain" together with "colon morphology", and its scores move when another lab's stain meets the
same tissue (``models.stain_check``). Here a share of the training tiles is re-stained (Macenko, as the
pipeline normalizes a slide) from its own group's stain to a stain drawn from the training groups: a
source (LC25000, GlaS, lung, ...) uniformly, then one of its groups uniformly. Each group (an LC25000
source picture, a patient of the scanned sources) gets one ``fit_slide`` on all its pixels. Only the
training groups' own stains are used, never a stain reference image.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from wsi_pipeline.stain.macenko import StainFitWarning, StainModel, apply_macenko, fit_slide

MIN_HE_ANGLE_DEG = 10.0
"""A fit whose H and E vectors are closer than this is left out: re-staining from it divides by a
near-singular matrix (about 5 % of LC25000's source pictures, whose photographs hardly separate the
two stains; GlaS patients' fits are 15-24 degrees apart, MoNuSAC's 21-25)."""


def he_angle_deg(model: StainModel) -> float:
    """Angle between a fit's H and E vectors, degrees."""
    h, e = model.stain_matrix / np.linalg.norm(model.stain_matrix, axis=1, keepdims=True)
    return float(np.degrees(np.arccos(np.clip(h @ e, -1.0, 1.0))))


def fit_groups(
    pixels: Mapping[str, Iterable[npt.NDArray[np.uint8]]], min_angle_deg: float = MIN_HE_ANGLE_DEG
) -> dict[str, StainModel]:
    """One Macenko fit per group of ``pixels`` (key: group; value: its images, any shape ``(..., 3)``).

    Groups whose fit fails (too little stained tissue) or whose H and E vectors lie closer than
    ``min_angle_deg`` are left out, rather than given the reference.
    """
    fits: dict[str, StainModel] = {}
    for key, images in pixels.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", StainFitWarning)
            model = fit_slide(np.asarray(im).reshape(1, -1, 3) for im in images)
        failed = any(issubclass(w.category, StainFitWarning) for w in caught)
        if not failed and he_angle_deg(model) >= min_angle_deg:
            fits[key] = model
    return fits


class StainMixer:
    """Re-stains a share of tiles from their group's stain to a random training group's stain.

    ``fits``: group key -> stain fit; ``kinds``: source name -> its group keys (those in ``fits``).
    ``share``: probability that a tile is re-stained (its target may be its own source, another
    group of it, or itself).
    """

    def __init__(
        self, fits: Mapping[str, StainModel], kinds: Mapping[str, Sequence[str]], share: float
    ) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"stain-mix share must be in [0, 1], got {share}")
        self.fits = dict(fits)
        self.kinds = {k: tuple(g for g in keys if g in self.fits) for k, keys in kinds.items()}
        self.kinds = {k: v for k, v in self.kinds.items() if v}
        if share and not self.kinds:
            raise ValueError("stain mixing needs at least one group with a stain fit")
        self.share = share

    def counts(self) -> dict[str, int]:
        """Stain fits per source."""
        return {k: len(v) for k, v in self.kinds.items()}

    def target(self, rng: np.random.Generator) -> str:
        """A group key: a source uniformly, then one of its groups uniformly."""
        names = sorted(self.kinds)
        keys = self.kinds[names[int(rng.integers(len(names)))]]
        return keys[int(rng.integers(len(keys)))]

    def __call__(
        self, tile: npt.NDArray[np.uint8], group: str, rng: np.random.Generator
    ) -> npt.NDArray[np.uint8]:
        """``tile`` (``(H, W, 3)`` uint8) of ``group``, re-stained with probability ``share``.

        Draws from ``rng`` only when ``share`` > 0, so a recipe without mixing keeps its random stream.
        A tile of a group without a fit is drawn for but kept as it is.
        """
        if not self.share or rng.random() >= self.share:
            return tile
        target = self.target(rng)
        own = self.fits.get(group)
        if own is None or target == group:
            return tile
        return apply_macenko(tile, own, self.fits[target])
