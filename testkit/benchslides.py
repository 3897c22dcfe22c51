"""Benchmark slides with exact ground truth, composed from real labelled H&E tiles.

No real whole slide with tumour polygons can be shipped with the project, so Dice and friends are
measured on slides composed here: a mosaic of real 224 px tiles (LC25000 lung by default; the path
is given at run time, the tiles are never copied into the repository) laid out inside known
polygons, written as a pyramidal Aperio-like SVS with the matching ASAP XML.

How the truth is exact: every level-0 pixel whose centre ``(x + 0.5, y + 0.5)`` lies inside a
tumour polygon and outside every exclusion polygon takes its value from a *tumour* source tile;
every other pixel inside tissue takes it from a *benign* source tile; everything else is glass. The
polygons written to the XML are the very vertex lists used to render (rounded to 1e-4 px first, the
XML's precision), so the annotation *is* the ground truth at pixel level. Source tiles sit on a
grid of ``source_px`` cells starting at ``source_origin`` (default (97, 61)), offset from any
tiler grid that starts at (0, 0), so pipeline tiles never coincide with source tiles; each cell gets
a tile (benign and tumour, chosen from the seed) and one of the 8 right-angle rotations/flips.

Slides are streamed: level 0 is rendered and written one TIFF tile at a time; lower levels are
exact block averages of the level-0 tiles, accumulated on the fly into temporary memory-mapped files
beside the output (never a full level in RAM), then written from them by
:func:`testkit.svs.write_pyramid`.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testkit.svs import write_pyramid
from wsi_pipeline import __version__
from wsi_pipeline.io.resample import box_mean

#: Glass colour outside tissue (RGB); pixels get a little noise around it.
GLASS_RGB = (242, 241, 244)
#: Group names written to the ASAP XML.
TUMOUR_GROUP = "Tumor"
EXCLUSION_GROUP = "_2"

Vertices = tuple[tuple[float, float], ...]


def _norm_polygon(poly: Iterable[Sequence[float]]) -> Vertices:
    pts = tuple((round(float(x), 4), round(float(y), 4)) for x, y in poly)
    if len(pts) >= 2 and pts[0] == pts[-1]:
        pts = pts[:-1]  # an explicitly closed ring: drop the repeated vertex
    if len(pts) < 3:
        raise ValueError(f"a polygon needs at least 3 vertices, got {len(pts)}")
    return pts


@dataclass(frozen=True)
class BenchSlideSpec:
    """What to compose. Sizes and vertices in level-0 pixels; ``mpp`` micrometres per level-0 pixel.

    ``tissue``: polygons of tissue (benign texture); ``tumour``: polygons of tumour (tumour texture,
    tissue too even if drawn outside ``tissue``); ``exclusion``: non-tumour holes cut out of the
    tumour (benign texture, XML group ``_2``). Vertices are rounded to 1e-4 px (the XML precision).
    ``downsamples``: pyramid levels, integers starting at 1, each dividing ``tile_px`` (the TIFF
    tile side). ``source_origin``/``source_px``: the grid of source tiles (level-0 px).
    """

    width: int
    height: int
    tissue: tuple[Vertices, ...] = ()
    tumour: tuple[Vertices, ...] = ()
    exclusion: tuple[Vertices, ...] = ()
    mpp: float = 0.5
    downsamples: tuple[int, ...] = (1, 4, 16)
    tile_px: int = 256
    seed: int = 0
    source_origin: tuple[int, int] = (97, 61)
    source_px: int = 224
    quality: int = 90  # JPEG quality of the SVS tiles

    def __post_init__(self) -> None:
        for name in ("tissue", "tumour", "exclusion"):
            object.__setattr__(self, name, tuple(_norm_polygon(p) for p in getattr(self, name)))
        object.__setattr__(self, "downsamples", tuple(int(d) for d in self.downsamples))
        object.__setattr__(self, "source_origin", tuple(int(v) for v in self.source_origin))
        if self.width < 1 or self.height < 1:
            raise ValueError(f"width and height must be positive, got {self.width} x {self.height}")
        if not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if self.tile_px < 16 or self.tile_px % 16:
            raise ValueError(f"tile_px must be a multiple of 16 (TIFF tiles), got {self.tile_px}")
        ds = self.downsamples
        if not ds or ds[0] != 1 or list(ds) != sorted(set(ds)):
            raise ValueError(f"downsamples must be increasing integers starting at 1, got {ds}")
        if any(self.tile_px % d for d in ds):
            raise ValueError(f"every downsample must divide tile_px {self.tile_px}, got {ds}")
        if self.source_px < 1:
            raise ValueError(f"source_px must be positive, got {self.source_px}")

    # --- exact truth ------------------------------------------------------------------------------
    def masks(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
        """(tissue, tumour) boolean (h, w) masks of level-0 pixels [y0, y0+h) x [x0, x0+w).

        A pixel belongs to a polygon when its centre does (even-odd rule). ``tumour`` is inside a
        tumour polygon and outside every exclusion; ``tissue`` is inside a tissue or a tumour polygon.
        """
        tumour_raw = _polygons_mask(self.tumour, x0, y0, w, h)
        tissue = _polygons_mask(self.tissue, x0, y0, w, h) | tumour_raw
        tumour = tumour_raw & ~_polygons_mask(self.exclusion, x0, y0, w, h) if self.exclusion else tumour_raw
        return tissue, tumour

    def tumour_geometry(self) -> Any:
        """The truth as shapely geometry: union of tumour polygons minus union of exclusions."""
        from shapely import Polygon, union_all

        pos = union_all([Polygon(p) for p in self.tumour])
        return pos.difference(union_all([Polygon(p) for p in self.exclusion])) if self.exclusion else pos

    def tissue_geometry(self) -> Any:
        """Union of tissue and tumour polygons (shapely)."""
        from shapely import Polygon, union_all

        return union_all([Polygon(p) for p in (*self.tissue, *self.tumour)])

    def annotation_polygons(self) -> list[tuple[str, Vertices]]:
        """``(group, vertices)`` as written to the ASAP XML: tumours in ``Tumor``, exclusions in ``_2``."""
        return [(TUMOUR_GROUP, p) for p in self.tumour] + [(EXCLUSION_GROUP, p) for p in self.exclusion]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("tissue", "tumour", "exclusion"):
            d[k] = [[list(v) for v in p] for p in d[k]]
        d["source_origin"] = list(self.source_origin)
        d["downsamples"] = list(self.downsamples)
        return d


def _polygon_mask(poly: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Even-odd scanline fill of one polygon (V, 2) at the pixel centres of a level-0 window."""
    xs, ys = poly[:, 0], poly[:, 1]
    xe, ye = np.roll(xs, -1), np.roll(ys, -1)
    yc = (y0 + 0.5 + np.arange(h))[:, None]
    crosses = (ys <= yc) != (ye <= yc)  # (h, E): edges that straddle the row centre (half-open)
    if not crosses.any():
        return np.zeros((h, w), bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        xcross = xs + (yc - ys) * (xe - xs) / (ye - ys)
    xcross = np.sort(np.where(crosses, xcross, np.inf), axis=1)
    k_max = int(crosses.sum(axis=1).max())
    xc = (x0 + 0.5 + np.arange(w))[None, :]
    odd = np.zeros((h, w), bool)
    for k in range(k_max):
        odd ^= xcross[:, k : k + 1] < xc  # parity of the crossings left of each centre
    return odd


def _polygons_mask(polys: Sequence[Vertices], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    out = np.zeros((h, w), bool)
    for p in polys:
        a = np.asarray(p, np.float64)
        if a[:, 0].max() < x0 or a[:, 0].min() > x0 + w or a[:, 1].max() < y0 or a[:, 1].min() > y0 + h:
            continue
        out |= _polygon_mask(a, x0, y0, w, h)
    return out


# --- random layouts -------------------------------------------------------------------------------


def _blob(
    rng: np.random.Generator,
    cx: float,
    cy: float,
    r: float,
    *,
    aspect: float | None = None,
    rotation: float | None = None,
    n: int = 180,
    rough: float = 0.22,
) -> np.ndarray:
    """A smooth star-shaped blob (V, 2): radius ``r`` times (1 + a few low harmonics), stretched to
    ``aspect`` (x/y; random 0.8-1.25 when None) and rotated (random when None)."""
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in (2, 3, 4, 5):
        rad += rng.uniform(0.0, rough / (k - 1)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.4, None) * r
    aspect = rng.uniform(0.8, 1.25) if aspect is None else aspect
    rot = rng.uniform(0, 2 * np.pi) if rotation is None else rotation
    px, py = rad * np.cos(theta) * np.sqrt(aspect), rad * np.sin(theta) / np.sqrt(aspect)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([cx + c * px - s * py, cy + s * px + c * py], axis=1)


def _fit_in(pts: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Scale ``pts`` about their centroid so they fit in the box (x0, y0, x1, y1)."""
    cx, cy = pts.mean(axis=0)
    x0, y0, x1, y1 = box
    f = 1.0
    for lo, hi, c, col in ((x0, x1, cx, 0), (y0, y1, cy, 1)):
        vmin, vmax = pts[:, col].min(), pts[:, col].max()
        if vmin < lo:
            f = min(f, (c - lo) / (c - vmin))
        if vmax > hi:
            f = min(f, (hi - c) / (vmax - c))
    return np.asarray([cx, cy]) + (pts - [cx, cy]) * max(f, 0.05)


def _point_in(rng: np.random.Generator, geom: Any) -> tuple[float, float] | None:
    from shapely import Point

    if geom.is_empty:
        return None
    x0, y0, x1, y1 = geom.bounds
    for _ in range(200):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if geom.contains(Point(x, y)):
            return float(x), float(y)
    return None


def random_spec(
    width: int,
    height: int,
    *,
    seed: int,
    n_tumour: int | None = None,
    with_exclusion: bool = False,
    n_tissue: int | None = None,
    mpp: float = 0.5,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
) -> BenchSlideSpec:
    """A random layout: 1-2 smooth tissue blobs covering much of the slide, ``n_tumour`` tumour blobs
    inside tissue (random 1-3 when None; 0 gives a benign slide) and, with ``with_exclusion``, one
    exclusion blob inside the first tumour. Deterministic for ``seed``.
    """
    from shapely import Polygon, union_all

    if n_tumour is not None and not 0 <= n_tumour <= 8:
        raise ValueError(f"n_tumour must be in 0..8, got {n_tumour}")
    rng = np.random.default_rng([seed, 0xB1E55])
    n_tumour = int(rng.integers(1, 4)) if n_tumour is None else n_tumour
    if with_exclusion and n_tumour == 0:
        raise ValueError("with_exclusion needs at least one tumour region")
    n_tissue = int(rng.integers(1, 3)) if n_tissue is None else n_tissue
    if n_tissue not in (1, 2):
        raise ValueError(f"n_tissue must be 1 or 2, got {n_tissue}")
    side = min(width, height)
    margin = 0.03 * side
    # Tissue: one blob in the middle, or one in each half along the longer side.
    boxes: list[tuple[float, float, float, float]]
    if n_tissue == 1:
        boxes = [(margin, margin, width - margin, height - margin)]
    elif width >= height:
        boxes = [(margin, margin, width / 2 - margin / 2, height - margin)]
        boxes.append((width / 2 + margin / 2, margin, width - margin, height - margin))
    else:
        boxes = [(margin, margin, width - margin, height / 2 - margin / 2)]
        boxes.append((margin, height / 2 + margin / 2, width - margin, height - margin))
    tissue: list[np.ndarray] = []
    for bx0, by0, bx1, by1 in boxes:
        bw, bh = bx1 - bx0, by1 - by0
        cx = (bx0 + bx1) / 2 + rng.uniform(-0.05, 0.05) * bw
        cy = (by0 + by1) / 2 + rng.uniform(-0.05, 0.05) * bh
        r = 0.5 * np.sqrt(bw * bh) * rng.uniform(0.9, 1.0)
        blob = _blob(rng, cx, cy, r, aspect=bw / bh * rng.uniform(0.9, 1.1), rotation=rng.uniform(-0.2, 0.2))
        tissue.append(_fit_in(blob, (bx0, by0, bx1, by1)))
    tissue_geom = union_all([Polygon(t) for t in tissue])
    # Tumours: inside tissue with a margin, apart from each other.
    tumours: list[np.ndarray] = []
    taken = Polygon()
    for i in range(n_tumour):
        for attempt in range(400):
            r = side * rng.uniform(0.06, 0.16) * (0.97 ** (attempt // 20))
            inner = tissue_geom.buffer(-(r * 0.5 + margin))
            centre = _point_in(rng, inner.difference(taken.buffer(r * 1.6)))
            if centre is None:
                continue
            cand = _blob(rng, *centre, r)
            poly = Polygon(cand)
            if poly.is_valid and tissue_geom.buffer(-margin).contains(poly) and not poly.intersects(taken):
                tumours.append(cand)
                taken = taken.union(poly.buffer(margin))
                break
        else:
            raise ValueError(f"could not place tumour {i + 1} of {n_tumour} in a {width}x{height} slide")
    exclusion: list[np.ndarray] = []
    if with_exclusion:
        host = Polygon(tumours[0])
        hx0, hy0, hx1, hy1 = host.bounds
        for attempt in range(400):
            r = 0.22 * min(hx1 - hx0, hy1 - hy0) * (0.97 ** (attempt // 20))
            inner = host.buffer(-(r * 1.3 + margin * 0.2))
            centre = _point_in(rng, inner)
            if centre is None:
                continue
            cand = _blob(rng, *centre, r, rough=0.15)
            if host.buffer(-margin * 0.2).contains(Polygon(cand)):
                exclusion.append(cand)
                break
        else:
            raise ValueError("could not place the exclusion inside the tumour")

    def verts(a: np.ndarray) -> Vertices:
        return tuple((round(float(x), 2), round(float(y), 2)) for x, y in a)

    return BenchSlideSpec(
        width=width,
        height=height,
        tissue=tuple(verts(t) for t in tissue),
        tumour=tuple(verts(t) for t in tumours),
        exclusion=tuple(verts(e) for e in exclusion),
        mpp=mpp,
        downsamples=tuple(downsamples),
        tile_px=tile_px,
        seed=seed,
    )


# --- texture source -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTile:
    """One labelled source image: absolute ``path``, its class ``label`` and source ``group``."""

    path: Path
    label: str
    group: str


@dataclass
class PhotoPool:
    """Benign and tumour tile images from a labelled index, loaded lazily through a small LRU cache.

    ``benign``/``tumour`` are sorted by path (so choices from a seed do not depend on CSV order).
    """

    benign: tuple[SourceTile, ...]
    tumour: tuple[SourceTile, ...]
    tile_px: int = 224
    cache_tiles: int = 256
    index_csv: Path | None = None
    groups: tuple[str, ...] | None = None  # the restriction asked for (None: every group)
    _cache: OrderedDict[Path, np.ndarray] = field(default_factory=OrderedDict, repr=False)
    loads: int = 0  # decodes done (cache misses)

    @classmethod
    def from_index(
        cls,
        index_csv: str | os.PathLike[str],
        *,
        groups: Iterable[str] | None = None,
        tile_px: int = 224,
        cache_tiles: int = 256,
    ) -> PhotoPool:
        """Read an index CSV with ``path,label,tumour,group`` (paths relative to the CSV's folder).

        ``groups``: use only tiles of these groups (e.g. the classifier's held-out test groups);
        an unknown group is an error. Raises ``FileNotFoundError`` naming the index when it is missing.
        """
        p = Path(index_csv)
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: tile index not found; benchmark slides are composed from real labelled tiles: "
                f"pass the index.csv of the LC25000 lung tiles (shared data tiles/lc25000-lung/index.csv)"
            )
        root = p.resolve().parent
        want = None if groups is None else frozenset(groups)
        benign: list[SourceTile] = []
        tumour: list[SourceTile] = []
        seen: set[str] = set()
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "label", "tumour", "group"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{p}: missing column(s) {sorted(missing)}; need path,label,tumour,group")
            for line, rec in enumerate(reader, start=2):
                group = rec["group"].strip()
                seen.add(group)
                if want is not None and group not in want:
                    continue
                flag = rec["tumour"].strip()
                if flag not in ("0", "1"):
                    raise ValueError(f"{p}:{line}: tumour must be 0 or 1, got {flag!r}")
                path = Path(rec["path"])
                tile = SourceTile(path if path.is_absolute() else root / path, rec["label"].strip(), group)
                (tumour if flag == "1" else benign).append(tile)
        if want is not None and want - seen:
            unknown = sorted(want - seen)
            raise ValueError(f"{p}: {len(unknown)} requested group(s) not in the index, e.g. {unknown[:3]}")
        return cls(
            benign=tuple(sorted(benign, key=lambda t: str(t.path))),
            tumour=tuple(sorted(tumour, key=lambda t: str(t.path))),
            tile_px=tile_px,
            cache_tiles=cache_tiles,
            index_csv=p,
            groups=None if want is None else tuple(sorted(want)),
        )

    def load(self, tile: SourceTile) -> np.ndarray:
        """The tile's RGB pixels (tile_px, tile_px, 3) uint8, read-only, cached (LRU)."""
        arr = self._cache.get(tile.path)
        if arr is not None:
            self._cache.move_to_end(tile.path)
            return arr
        from PIL import Image

        try:
            with Image.open(tile.path) as im:
                arr = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise OSError(f"{tile.path}: cannot read source tile ({exc})") from exc
        if arr.shape != (self.tile_px, self.tile_px, 3):
            raise ValueError(
                f"{tile.path}: source tile is {arr.shape[1]}x{arr.shape[0]}, expected "
                f"{self.tile_px}x{self.tile_px}"
            )
        arr.flags.writeable = False
        self.loads += 1
        self._cache[tile.path] = arr
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return arr


def orient(tile: np.ndarray, code: int) -> np.ndarray:
    """One of the 8 right-angle rotations/flips of a (h, w, 3) tile (a view): ``code`` in 0..7."""
    out = np.rot90(tile, code % 4)
    return out[:, ::-1] if code >= 4 else out


# --- rendering ------------------------------------------------------------------------------------


class BenchRenderer:
    """Renders level-0 pixels of ``spec`` from ``source``; also says which source pixel went where."""

    def __init__(self, spec: BenchSlideSpec, source: PhotoPool) -> None:
        if source.tile_px != spec.source_px:
            raise ValueError(f"source tiles are {source.tile_px} px but the spec asks {spec.source_px} px")
        if spec.tumour and not source.tumour:
            raise ValueError(f"{source.index_csv}: no tumour tiles (tumour=1) in the chosen groups")
        if (spec.tissue or spec.exclusion) and not source.benign:
            raise ValueError(f"{source.index_csv}: no benign tiles (tumour=0) in the chosen groups")
        self.spec, self.source = spec, source
        t, p = spec.tile_px, spec.source_px
        ox, oy = spec.source_origin
        full_w, full_h = -(-spec.width // t) * t, -(-spec.height // t) * t  # edge tiles are whole
        self._c0, self._r0 = (0 - ox) // p, (0 - oy) // p
        ncols, nrows = (full_w - 1 - ox) // p - self._c0 + 1, (full_h - 1 - oy) // p - self._r0 + 1
        rng = np.random.default_rng([spec.seed, 0x7E17])
        self._benign_idx = rng.integers(0, max(1, len(source.benign)), (nrows, ncols))
        self._tumour_idx = rng.integers(0, max(1, len(source.tumour)), (nrows, ncols))
        self._orient = rng.integers(0, 8, (nrows, ncols))
        n = self._glass_period = 509  # a prime period, so the glass noise never lines up with tiles
        noise = rng.normal(0.0, 1.2, (n, n, 3))
        glass = np.clip(np.round(np.asarray(GLASS_RGB, np.float64) + noise), 0, 255).astype(np.uint8)
        self._glass = np.pad(glass, ((0, spec.tile_px), (0, spec.tile_px), (0, 0)), mode="wrap")

    def cell(self, x: int, y: int) -> tuple[int, int, int, int]:
        """(col, row, x_l0, y_l0) of the source cell holding level-0 pixel (x, y)."""
        p = self.spec.source_px
        ox, oy = self.spec.source_origin
        c, r = (x - ox) // p, (y - oy) // p
        return c, r, ox + c * p, oy + r * p

    def source_at(self, x: int, y: int) -> tuple[str, SourceTile | None, int, int, int]:
        """What level-0 pixel (x, y) shows: ``(kind, tile, code, u, v)`` with kind 'tumour', 'benign'
        or 'glass'; the pixel is ``orient(load(tile), code)[v, u]`` (tile None for glass)."""
        tissue, tumour = self.spec.masks(x, y, 1, 1)
        if not tissue[0, 0]:
            return "glass", None, 0, 0, 0
        kind = "tumour" if tumour[0, 0] else "benign"
        c, r, cx, cy = self.cell(x, y)
        tile, code = self._choice(kind, c, r)
        return kind, tile, code, x - cx, y - cy

    def _choice(self, kind: str, c: int, r: int) -> tuple[SourceTile, int]:
        i, j = r - self._r0, c - self._c0
        if kind == "tumour":
            return self.source.tumour[self._tumour_idx[i, j]], int(self._orient[i, j])
        return self.source.benign[self._benign_idx[i, j]], int(self._orient[i, j])

    def _mosaic(
        self, kind: str, x0: int, y0: int, w: int, h: int, where: np.ndarray, out: np.ndarray
    ) -> None:
        """Paste the ``kind`` texture into ``out`` where ``where`` (window at x0, y0)."""
        p = self.spec.source_px
        c_first, r_first, _, _ = self.cell(x0, y0)
        c_last, r_last, _, _ = self.cell(x0 + w - 1, y0 + h - 1)
        for r in range(r_first, r_last + 1):
            for c in range(c_first, c_last + 1):
                cx = self.spec.source_origin[0] + c * p
                cy = self.spec.source_origin[1] + r * p
                ax0, ay0 = max(cx, x0), max(cy, y0)
                ax1, ay1 = min(cx + p, x0 + w), min(cy + p, y0 + h)
                m = where[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
                if not m.any():
                    continue
                tile, code = self._choice(kind, c, r)
                src = orient(self.source.load(tile), code)[ay0 - cy : ay1 - cy, ax0 - cx : ax1 - cx]
                dst = out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0]
                if m.all():
                    dst[:] = src
                else:
                    np.copyto(dst, src, where=m[..., None])

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of level-0 pixels [y0, y0+h) x [x0, x0+w)."""
        n = self._glass_period
        if w <= self.spec.tile_px and h <= self.spec.tile_px:  # a slice of the padded atlas
            out = self._glass[y0 % n : y0 % n + h, x0 % n : x0 % n + w].copy()
        else:
            rows, cols = (y0 + np.arange(h)) % n, (x0 + np.arange(w)) % n
            out = self._glass[rows[:, None], cols[None, :]]
        tissue, tumour = self.spec.masks(x0, y0, w, h)
        benign = tissue & ~tumour
        if benign.any():
            self._mosaic("benign", x0, y0, w, h, benign, out)
        if tumour.any():
            self._mosaic("tumour", x0, y0, w, h, tumour, out)
        return out


# --- writing --------------------------------------------------------------------------------------


def _thumb_downsample(spec: BenchSlideSpec) -> int:
    """A power of two (>= 2) dividing tile_px that leaves the thumbnail >= ~512 px on its long side."""
    d = 2
    while spec.tile_px % (d * 2) == 0 and max(spec.width, spec.height) // (d * 2) >= 512:
        d *= 2
    return d


def _write_svs(target: Path, spec: BenchSlideSpec, renderer: BenchRenderer) -> None:
    """Stream the pyramid into ``target``: level 0 rendered tile by tile, lower levels (and the
    thumbnail) from block means accumulated in temporary memory maps beside ``target``."""
    t = spec.tile_px
    nx, ny = -(-spec.width // t), -(-spec.height // t)
    thumb_ds = _thumb_downsample(spec)
    acc_ds = sorted({*spec.downsamples[1:], thumb_ds})
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=target.parent) as tmp:
        # Lower levels (and the thumbnail source) accumulate here, padded to whole TIFF tiles.
        acc: dict[int, np.ndarray] = {}
        for d in acc_ds:
            lw, lh = -(-spec.width // d), -(-spec.height // d)
            shape = (-(-lh // t) * t, -(-lw // t) * t, 3)
            acc[d] = np.lib.format.open_memmap(Path(tmp) / f"level-{d}.npy", "w+", np.uint8, shape)
            acc[d][:] = GLASS_RGB

        def level0() -> Iterator[np.ndarray]:
            for ty in range(ny):
                for tx in range(nx):
                    tile = renderer.render(tx * t, ty * t, t, t)
                    for d in acc_ds:  # every downsample divides tile_px: whole blocks
                        s = t // d
                        acc[d][ty * s : (ty + 1) * s, tx * s : (tx + 1) * s] = box_mean(tile, d)
                    yield tile

        def level_tiles(d: int) -> Iterator[np.ndarray]:
            if d == 1:
                yield from level0()
                return
            a = acc[d]
            for y in range(0, a.shape[0], t):
                for x in range(0, a.shape[1], t):
                    yield np.ascontiguousarray(a[y : y + t, x : x + t])

        def thumbnail() -> np.ndarray:  # Aperio's second directory (an associated image)
            a = acc[thumb_ds]
            thumb = np.ascontiguousarray(a[: -(-spec.height // thumb_ds), : -(-spec.width // thumb_ds)])
            step = max(1, -(-max(thumb.shape[:2]) // 1024))
            return thumb[::step, ::step]

        software = "wsi-pipeline benchmark slide"
        write_pyramid(target, spec, level_tiles, quality=spec.quality, software=software, thumbnail=thumbnail)
        acc.clear()  # drop the memory maps before their folder is removed


def write_bench_slide(
    path: str | os.PathLike[str],
    spec: BenchSlideSpec,
    index_csv: str | os.PathLike[str] | PhotoPool,
    *,
    groups: Iterable[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``spec`` as a pyramidal Aperio-like SVS at ``path`` and its truth as ``<stem>.xml``.

    ``index_csv``: the LC25000 ``index.csv`` (or a ready :class:`PhotoPool`); ``groups`` restricts
    the source tiles to those groups (e.g. held out from the model's training). Also writes
    ``<stem>.bench.json`` (the spec, source restriction and timings). Returns (slide, xml).
    Raises ``FileNotFoundError`` naming the index when it is missing and ``ValueError`` for a spec
    with invalid (self-intersecting) polygons.
    """
    from shapely import Polygon

    from wsi_pipeline.evaluation.annotations import write_asap_xml
    from wsi_pipeline.provenance import atomic_write_bytes

    t_start = time.perf_counter()
    for name in ("tissue", "tumour", "exclusion"):
        for i, poly in enumerate(getattr(spec, name)):
            if not Polygon(poly).is_valid:
                raise ValueError(f"{name} polygon {i} is not valid (self-intersecting?); fix the spec")
    if isinstance(index_csv, PhotoPool):
        if groups is not None:
            raise ValueError("pass groups to PhotoPool.from_index, not with a ready PhotoPool")
        source = index_csv
    else:
        source = PhotoPool.from_index(index_csv, groups=groups, tile_px=spec.source_px)
    renderer = BenchRenderer(spec, source)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        _write_svs(partial, spec, renderer)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)
    xml = write_asap_xml(out.with_suffix(".xml"), spec.annotation_polygons())
    info = {
        "wsi_pipeline_benchslide": 1,
        "slide": out.name,
        "annotations": xml.name,
        "spec": spec.to_dict(),
        "truth": {
            "tumour_area_l0_px2": float(spec.tumour_geometry().area) if spec.tumour else 0.0,
            "tissue_area_l0_px2": float(spec.tissue_geometry().area),
            "slide_area_l0_px2": float(spec.width * spec.height),
        },
        "source": {
            "index_csv": str(source.index_csv) if source.index_csv else None,
            "groups": list(source.groups) if source.groups is not None else None,
            "benign_tiles": len(source.benign),
            "tumour_tiles": len(source.tumour),
            "tiles_decoded_by_source_so_far": source.loads,
        },
        "seconds": round(time.perf_counter() - t_start, 3),
        "package_version": __version__,
    }
    atomic_write_bytes(out.with_name(out.stem + ".bench.json"), json.dumps(info, indent=1).encode())
    return out, xml


__all__ = [
    "EXCLUSION_GROUP",
    "GLASS_RGB",
    "TUMOUR_GROUP",
    "BenchRenderer",
    "BenchSlideSpec",
    "PhotoPool",
    "SourceTile",
    "orient",
    "random_spec",
    "write_bench_slide",
]
