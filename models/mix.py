"""Training batches that mix LC25000 tiles with tiles cut on the fly from scanned GlaS regions.

Torch-free. Every tile is drawn afresh: a source (LC25000 with probability ``lc_fraction``, else
GlaS), a class (50/50), then a tile of that class. GlaS tiles are windows of a region at a jittered
scale (``scale_jitter``: the tile's content at 0.5 x logU(0.8, 1.25) um/px) and position, labelled by
``crop_label`` on the window actually cut; LC25000 tiles get a random zoom-in of up to 1.3x (their
scale is unknown, about 0.4-0.6 um/px). Malignant stroma windows make up ``stroma_fraction`` of the
GlaS non-tumour draws when a region has any. With ``lung_regions`` (MoNuSAC scanned lung), epithelium-
rich lung windows make up ``lung_fraction`` of the scanned tumour draws, and ``crypt_fraction`` of
the GlaS non-tumour draws are gland-rich windows of healthy regions (normal crypts). With
``immune_regions`` (``models.scanned.load_immune``), inflamed windows make up ``immune_fraction`` of the
scanned non-tumour draws. With ``stain_mix`` > 0 that share of the tiles is re-stained to the stain
of a random training group (``models.stain_mix``; LC25000 tiles need ``lc_groups`` for their fits).
Augmentation happens afterwards (``models.augment``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image

from models import TILE_PX
from models.scanned import LabelRule, Region, immune_windows, is_inflamed
from models.stain_mix import StainMixer, fit_groups


@dataclass(frozen=True)
class Candidate:
    region: int
    x0: float
    y0: float


def _candidates(regions: Sequence[Region], rule: LabelRule) -> dict[int, list[Candidate]]:
    """Grid windows (stride a quarter tile) of every region, by label; unusable windows dropped."""
    out: dict[int, list[Candidate]] = {0: [], 1: []}
    for i, reg in enumerate(regions):
        side = reg.window_px()
        for x0, y0 in reg.grid(side, side / 4):
            lab = reg.window_label(x0, y0, side, rule)
            if lab is not None:
                out[lab].append(Candidate(i, x0, y0))
    return out


class MixedSampler:
    """Draws labelled uint8 tiles ``(N, 224, 224, 3)`` from LC25000 tiles and GlaS regions."""

    def __init__(
        self,
        lc_images: npt.NDArray[np.uint8],
        lc_labels: npt.NDArray[np.int64],
        regions: Sequence[Region],
        rule: LabelRule,
        lc_fraction: float = 0.35,
        scale_jitter: tuple[float, float] = (0.8, 1.25),
        stroma_fraction: float = 0.25,
        lung_regions: Sequence[Region] = (),
        lung_fraction: float = 0.0,
        crypt_fraction: float = 0.0,
        immune_regions: Sequence[Region] = (),
        immune_fraction: float = 0.0,
        stain_mix: float = 0.0,
        lc_groups: Sequence[str] = (),
    ) -> None:
        self.lc_images, self.lc_labels = lc_images, lc_labels
        self.lc_by_label = {k: np.flatnonzero(lc_labels == k) for k in (0, 1)}
        self.regions = list(regions)
        self.rule = rule
        self.lc_fraction = lc_fraction if len(lc_images) else 0.0
        self.scale_jitter = scale_jitter
        cands = _candidates(self.regions, rule)
        malignant = {i for i, r in enumerate(self.regions) if r.label.startswith(("malignant", "consep"))}
        self.pos = cands[1]
        self.neg_stroma = [c for c in cands[0] if c.region in malignant]
        self.neg_benign = [c for c in cands[0] if c.region not in malignant]
        self.stroma_fraction = stroma_fraction if self.neg_stroma else 0.0
        # Normal crypts: gland-rich windows of healthy regions, the benign epithelium that weak
        # "epithelium-rich = tumour" labels (lung) would otherwise pull towards tumour
        self.neg_crypt = [
            c
            for c in self.neg_benign
            if self.regions[c.region].label == "benign/healthy"
            and self.regions[c.region].mask_fraction(c.x0, c.y0, self.regions[c.region].window_px())
            >= rule.tumour_min_gland
        ]
        self.crypt_fraction = crypt_fraction if self.neg_crypt else 0.0
        # Scanned lung (MoNuSAC): only its epithelium-rich windows are used, as weak tumour labels
        lung = _candidates(lung_regions, rule)[1]
        self.n_glas = offset = len(self.regions)
        self.regions += list(lung_regions)
        self.lung_pos = [Candidate(c.region + offset, c.x0, c.y0) for c in lung]
        self.lung_fraction = lung_fraction if self.lung_pos else 0.0
        # Inflammation (lymphocytes, macrophages, neutrophils): non-tumour however crowded its nuclei
        offset = len(self.regions)
        self.regions += list(immune_regions)
        self.immune = [(i + offset, x0, y0, side) for i, x0, y0, side in immune_windows(immune_regions)]
        self.immune_fraction = immune_fraction if self.immune else 0.0
        if self.regions and (not self.pos or not self.neg_benign):
            raise ValueError(
                f"GlaS regions give {len(self.pos)} tumour and {len(self.neg_benign)} benign windows"
            )
        # Stain keys: "lc25000:<group>" per LC25000 tile, "<source>:<group>" per region
        if stain_mix and len(lc_groups) != len(lc_images):
            raise ValueError(f"stain mixing needs the group of every LC25000 tile ({len(lc_groups)} given)")
        self.lc_keys = [f"lc25000:{g}" for g in lc_groups] if stain_mix else []
        kind_of = [("consep" if r.label.startswith("consep") else "glas") for r in regions]
        kind_of += ["lung"] * len(lung_regions) + ["immune"] * len(immune_regions)
        self.region_keys = [f"{kind}:{r.group}" for kind, r in zip(kind_of, self.regions, strict=True)]
        self.mixer = StainMixer({}, {}, 0.0)
        if stain_mix:
            pixels: dict[str, list[npt.NDArray[np.uint8]]] = {}
            for key, image in zip(self.lc_keys, lc_images, strict=True):
                pixels.setdefault(key, []).append(image)
            for key, reg in zip(self.region_keys, self.regions, strict=True):
                pixels.setdefault(key, []).append(reg.image)
            kinds: dict[str, list[str]] = {}
            for key in pixels:
                kinds.setdefault(key.split(":", 1)[0], []).append(key)
            self.mixer = StainMixer(fit_groups(pixels), kinds, stain_mix)

    def counts(self) -> dict[str, int]:
        return {
            "lc25000_tiles": len(self.lc_images),
            "glas_regions": self.n_glas,
            "glas_tumour_windows": len(self.pos),
            "glas_stroma_windows": len(self.neg_stroma),
            "glas_benign_windows": len(self.neg_benign),
            "lung_tumour_windows": len(self.lung_pos),
            "glas_crypt_windows": len(self.neg_crypt),
            **({"immune_windows": len(self.immune)} if self.immune else {}),
            **({f"stain_fits_{k}": n for k, n in self.mixer.counts().items()} if self.mixer.share else {}),
        }

    def _lc(self, label: int, rng: np.random.Generator) -> tuple[npt.NDArray[np.uint8], str]:
        j = int(rng.choice(self.lc_by_label[label]))
        tile = self.lc_images[j]
        zoom = rng.uniform(1.0, 1.3)
        side = TILE_PX / zoom
        x0, y0 = rng.uniform(0, TILE_PX - side, 2)
        box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        out = Image.fromarray(tile).resize((TILE_PX, TILE_PX), Image.Resampling.BILINEAR, box=box)
        return np.asarray(out), self.lc_keys[j] if self.lc_keys else ""

    def _glas(self, label: int, rng: np.random.Generator) -> tuple[npt.NDArray[np.uint8], str]:
        if label == 1:
            # (no draw without lung windows: the recipes before --lung keep their random stream)
            pool = self.lung_pos if self.lung_fraction and rng.random() < self.lung_fraction else self.pos
        else:
            # (no draw without immune windows: the recipes before them keep their random stream)
            if self.immune_fraction and rng.random() < self.immune_fraction:
                return self._immune(rng)
            u = rng.random()
            if u < self.crypt_fraction:
                pool = self.neg_crypt
            elif u < self.crypt_fraction + (1 - self.crypt_fraction) * self.stroma_fraction:
                pool = self.neg_stroma
            else:
                pool = self.neg_benign
        for _ in range(8):
            c = pool[int(rng.integers(len(pool)))]
            reg = self.regions[c.region]
            nominal = reg.window_px()
            h, w = reg.image.shape[:2]
            side = min(nominal * float(np.exp(rng.uniform(*np.log(self.scale_jitter)))), h, w)
            x0 = float(
                np.clip(c.x0 + (nominal - side) / 2 + rng.uniform(-0.125, 0.125) * nominal, 0, w - side)
            )
            y0 = float(
                np.clip(c.y0 + (nominal - side) / 2 + rng.uniform(-0.125, 0.125) * nominal, 0, h - side)
            )
            if reg.window_label(x0, y0, side, self.rule) == label:
                return reg.crop(x0, y0, side), self.region_keys[c.region]
        return reg.crop(c.x0, c.y0, nominal), self.region_keys[c.region]  # the grid window has this label

    def _immune(self, rng: np.random.Generator) -> tuple[npt.NDArray[np.uint8], str]:
        """An inflamed window, jittered in scale and position as the GlaS windows are."""
        for _ in range(8):
            i, x0, y0, nominal = self.immune[int(rng.integers(len(self.immune)))]
            reg = self.regions[i]
            h, w = reg.image.shape[:2]
            side = min(nominal * float(np.exp(rng.uniform(*np.log(self.scale_jitter)))), h, w)
            x = float(np.clip(x0 + (nominal - side) / 2 + rng.uniform(-0.125, 0.125) * nominal, 0, w - side))
            y = float(np.clip(y0 + (nominal - side) / 2 + rng.uniform(-0.125, 0.125) * nominal, 0, h - side))
            if is_inflamed(reg, x, y, side):
                return reg.crop(x, y, side), self.region_keys[i]
        return reg.crop(x0, y0, nominal), self.region_keys[i]  # the grid window itself is inflamed

    def sample(self, n: int, rng: np.random.Generator) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
        """``n`` tiles and their labels (0/1)."""
        labels = rng.integers(0, 2, n).astype(np.int64)
        tiles = np.empty((n, TILE_PX, TILE_PX, 3), dtype=np.uint8)
        for i, lab in enumerate(labels):
            use_lc = not self.regions or rng.random() < self.lc_fraction
            tile, key = self._lc(int(lab), rng) if use_lc else self._glas(int(lab), rng)
            tiles[i] = self.mixer(tile, key, rng)
        return tiles, labels


def sample_unlabelled(
    pools: Sequence[Sequence[Region]],
    n: int,
    rng: np.random.Generator,
    scale_jitter: tuple[float, float] = (0.8, 1.25),
) -> npt.NDArray[np.uint8]:
    """``n`` random windows (any content) at 0.5 um/px as 224 px tiles: each from a pool drawn
    uniformly, then a region with probability proportional to its area."""
    pools = [p for p in pools if p]
    out = np.empty((n, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    for i in range(n):
        regions = pools[int(rng.integers(len(pools)))]
        sizes = np.array([r.image.shape[0] * r.image.shape[1] for r in regions], dtype=np.float64)
        reg = regions[int(rng.choice(len(regions), p=sizes / sizes.sum()))]
        h, w = reg.image.shape[:2]
        side = min(reg.window_px() * float(np.exp(rng.uniform(*np.log(scale_jitter)))), h, w)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        out[i] = reg.crop(float(x0), float(y0), side)
    return out
