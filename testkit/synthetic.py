"""Synthetic pyramidal slides with known tissue (and "tumour") regions, written tile by tile.

For tests, benchmarks and demos where no real slide with ground truth exists. Texture is synthetic
(pink stroma with purple nuclei; denser, darker, larger nuclei inside tumour regions), not real
H&E: say so wherever a figure measured on these slides is reported.

Slides are streamed to disk one tile at a time by :func:`testkit.svs.write_pyramid`, so their size is
not bounded by memory; its module docstring describes the formats (``"aperio"``, ``"generic"``,
``"nompp"``). Lower levels average the texture with :func:`wsi_pipeline.io.resample.box_mean`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from testkit.svs import write_pyramid
from wsi_pipeline.io.resample import box_mean

BACKGROUND_RGB = (242, 241, 244)
_ATLAS_PX = 512


@dataclass(frozen=True)
class Ellipse:
    """An axis-aligned ellipse in level-0 pixels."""

    cx: float
    cy: float
    rx: float
    ry: float

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Boolean mask of level-0 points inside the ellipse: ``x`` a row (1, w), ``y`` a column (h, 1)."""
        t = 1.0 - ((y - self.cy) / self.ry) ** 2  # per row: half-width of the ellipse, squared
        half = self.rx * np.sqrt(np.clip(t, 0.0, None))
        return (t >= 0) & (np.abs(x - self.cx) <= half)

    def bbox(self) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 in level-0 pixels."""
        return (self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry)

    def polygon(self, n: int = 64) -> list[tuple[float, float]]:
        """The outline as ``n`` level-0 vertices (for annotation files)."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return [(float(self.cx + self.rx * np.cos(a)), float(self.cy + self.ry * np.sin(a))) for a in t]


@dataclass(frozen=True)
class SyntheticSpec:
    """What to draw. Sizes and shapes in level-0 pixels; ``mpp`` micrometres per level-0 pixel."""

    width: int
    height: int
    mpp: float = 0.25
    tissue: Sequence[Ellipse] = ()
    tumour: Sequence[Ellipse] = ()  # drawn with tumour texture, on top of tissue
    black_border_px: int = 0  # a black scanner border along the left edge
    downsamples: Sequence[int] = (1, 4, 16)
    tile_px: int = 256
    seed: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def tissue_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """True where level-0 points are tissue (tumour included); x, y broadcast."""
        return _any_inside((*self.tissue, *self.tumour), x, y)

    def tumour_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return _any_inside(self.tumour, x, y)


def _any_inside(shapes: Sequence[Ellipse], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    m = np.zeros(np.broadcast(x, y).shape, bool)
    for e in shapes:
        x0, y0, x1, y1 = e.bbox()
        if x.max() >= x0 and x.min() <= x1 and y.max() >= y0 and y.min() <= y1:
            m |= e.contains(x, y)
    return m


def _atlas(rng: np.random.Generator, *, tumour: bool) -> np.ndarray:
    """A seamless-enough (wrapping) RGB texture tile of tissue at level-0 scale."""
    n = _ATLAS_PX
    yy, xx = np.mgrid[0:n, 0:n]
    stroma = np.array([236, 170, 200] if not tumour else [214, 150, 196], np.float32)
    img = np.broadcast_to(stroma, (n, n, 3)).copy()
    img += rng.normal(0, 6, (n, n, 1)).astype(np.float32)
    # Fibres: low-frequency stripes.
    # Fibres: wavy stripes, periodic over the atlas so it tiles without seams.
    img[..., 1] += 10 * np.sin(2 * np.pi * (56 * xx / n + 3 * np.sin(2 * np.pi * 16 * yy / n) / 6))
    count, radius, colour = (380, 7.0, (92, 52, 140)) if tumour else (150, 4.5, (120, 80, 165))
    cy = rng.uniform(0, n, count)
    cx = rng.uniform(0, n, count)
    r = rng.uniform(0.7, 1.3, count) * radius
    nuclei = np.zeros((n, n), bool)
    for y0, x0, r0 in zip(cy, cx, r, strict=True):
        k = int(np.ceil(r0))
        oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
        disk = (oy + (y0 % 1)) ** 2 + (ox + (x0 % 1)) ** 2 <= r0 * r0
        rows = (int(y0) + np.arange(-k, k + 1)) % n  # wrap, so the atlas tiles seamlessly
        cols = (int(x0) + np.arange(-k, k + 1)) % n
        nuclei[np.ix_(rows, cols)] |= disk
    img[nuclei] = np.array(colour, np.float32) + rng.normal(0, 8, (int(nuclei.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _wrap_crop(atlas: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Pixels [y, y+h) x [x, x+w) of the plane tiled with ``atlas``."""
    n = atlas.shape[0]
    rolled = np.roll(atlas, (-(y % n), -(x % n)), axis=(0, 1))
    reps = (-(-h // n), -(-w // n), 1)
    return np.tile(rolled, reps)[:h, :w]


class _Renderer:
    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self._normal = _atlas(rng, tumour=False)
        self._tumour = _atlas(rng, tumour=True)
        self._cache: dict[tuple[int, bool], np.ndarray] = {}

    def atlas(self, ds: int, tumour: bool) -> np.ndarray:
        key = (ds, tumour)
        if key not in self._cache:
            self._cache[key] = box_mean(self._tumour if tumour else self._normal, ds)
        return self._cache[key]

    def region(self, x: int, y: int, w: int, h: int, ds: int) -> np.ndarray:
        """RGB pixels of level ``ds`` (level pixels x, y, w, h)."""
        s = self.spec
        gy = ((np.arange(y, y + h) + 0.5) * ds)[:, None]  # level-0 centres of the pixels
        gx = ((np.arange(x, x + w) + 0.5) * ds)[None, :]
        out = np.empty((h, w, 3), np.uint8)
        out[:] = BACKGROUND_RGB
        tissue = s.tissue_at(gx, gy)
        if tissue.any():
            tumour = s.tumour_at(gx, gy) & tissue
            for is_tumour, m in ((False, tissue & ~tumour), (True, tumour)):
                if m.all():
                    out[:] = _wrap_crop(self.atlas(ds, is_tumour), x, y, w, h)
                elif m.any():
                    tex = _wrap_crop(self.atlas(ds, is_tumour), x, y, w, h)
                    np.copyto(out, tex, where=m[..., None])
        if s.black_border_px:
            out[:, gx[0] < s.black_border_px] = (8, 8, 8)
        return out

    def tiles(self, ds: int) -> Iterator[np.ndarray]:
        s, t = self.spec, self.spec.tile_px
        w, h = -(-s.width // ds), -(-s.height // ds)
        for y in range(0, h, t):
            for x in range(0, w, t):
                yield self.region(x, y, t, t, ds)


def write_synthetic_slide(
    path: str | os.PathLike[str], spec: SyntheticSpec, *, kind: str = "aperio", quality: int = 90
) -> Path:
    """Write ``spec`` as a pyramidal TIFF of ``kind`` ('aperio', 'generic', 'nompp'); returns the path.

    Level sizes are ``ceil(size / downsample)``; downsamples must be integers starting at 1.
    """
    r = _Renderer(spec)

    def thumbnail() -> np.ndarray:
        tds = max(1, max(spec.width, spec.height) // 512)
        return r.region(0, 0, -(-spec.width // tds), -(-spec.height // tds), tds)

    return write_pyramid(
        path, spec, r.tiles, kind=kind, quality=quality, extra=spec.extra, thumbnail=thumbnail
    )


class SyntheticSlide:
    """A :class:`~wsi_pipeline.slide.SlideReader` that renders ``spec`` on demand, with no file.

    Lets tests run the tiler on slides of any size (e.g. 100k x 100k) to check memory stays bounded.
    """

    backend = "synthetic"

    def __init__(self, spec: SyntheticSpec, path: str = "<synthetic>") -> None:
        self.spec = spec
        self.path = path
        self._r = _Renderer(spec)

    @property
    def vendor(self) -> str:
        return "synthetic"

    @property
    def properties(self) -> dict[str, str]:
        return {"synthetic.mpp": str(self.spec.mpp)}

    @property
    def level_count(self) -> int:
        return len(self.spec.downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        s = self.spec
        return tuple((-(-s.width // d), -(-s.height // d)) for d in s.downsamples)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self.spec.downsamples)

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.spec.width, self.spec.height)

    def metadata_mpp(self) -> tuple[float | None, float | None]:
        return (self.spec.mpp, self.spec.mpp)

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self.spec.downsamples[level]
        return self._r.region(location_l0[0] // ds, location_l0[1] // ds, size[0], size[1], ds)

    def close(self) -> None:
        pass
