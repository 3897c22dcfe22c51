"""Synthetic pyramidal slides with known tissue (and "tumour") regions, written tile by tile.

For tests, benchmarks and demos where no real slide with ground truth exists. Texture is synthetic
(pink stroma with purple nuclei; denser, darker, larger nuclei inside tumour regions), not real
H&E: say so wherever a figure measured on these slides is reported.

Slides are streamed to disk with tifffile one tile at a time, so their size is not bounded by memory.
Formats: ``"aperio"`` (an SVS that OpenSlide and tiffslide detect as vendor aperio, JPEG tiles, mpp in
the description), ``"generic"`` (tiled TIFF with resolution tags) and ``"nompp"`` (tiled TIFF without
any resolution metadata).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def _downscale(img: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return img
    h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
    b = img[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).astype(np.float32)
    return np.round(b.mean(axis=(1, 3))).astype(np.uint8)


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
            self._cache[key] = _downscale(self._tumour if tumour else self._normal, ds)
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
    import tifffile

    if kind not in ("aperio", "generic", "nompp"):
        raise ValueError(f"unknown kind {kind!r}")
    if spec.downsamples[0] != 1:
        raise ValueError("the first downsample must be 1")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    r = _Renderer(spec)
    t = spec.tile_px
    compression = "jpeg" if kind == "aperio" else "zlib"
    with tifffile.TiffWriter(p, bigtiff=spec.width * spec.height > 2**31) as tw:
        for i, ds in enumerate(spec.downsamples):
            w, h = -(-spec.width // ds), -(-spec.height // ds)
            kw: dict[str, object] = {
                "shape": (h, w, 3),
                "dtype": np.uint8,
                "tile": (t, t),
                "photometric": "rgb",
                "compression": compression,
                "compressionargs": {"level": quality} if kind == "aperio" else {},
                "metadata": None,
            }
            if kind == "aperio":
                kw["description"] = (
                    f"Aperio Image Library v12.0.15 synthetic\r\n{spec.width}x{spec.height} "
                    f"[0,0 {spec.width}x{spec.height}] ({t}x{t}) JPEG/RGB Q={quality}"
                    f"|AppMag = {round(10 / spec.mpp)}|MPP = {spec.mpp}"
                    + "".join(f"|{k} = {v}" for k, v in spec.extra.items())
                )
                kw["subsampling"] = (1, 1)
            else:
                kw["subfiletype"] = 1 if i else 0
                if kind == "generic":
                    kw["resolution"] = (1e4 / (spec.mpp * ds), 1e4 / (spec.mpp * ds))
                    kw["resolutionunit"] = "CENTIMETER"
            tw.write(r.tiles(ds), **kw)  # type: ignore[arg-type]
            if kind == "aperio" and i == 0:
                # Aperio puts a stripped thumbnail second; readers treat it as an associated image.
                tds = max(1, max(spec.width, spec.height) // 512)
                thumb = r.region(0, 0, -(-spec.width // tds), -(-spec.height // tds), tds)
                tw.write(
                    thumb, photometric="rgb", description="Aperio Image Library thumbnail", metadata=None
                )
    return p


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
