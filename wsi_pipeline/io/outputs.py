"""Writers for slide results: heatmap TIFF, overlay PNG, QuPath GeoJSON, per-tile CSV. All atomic.

Each writer renders to a temporary file beside the target and renames it when complete, so a crash
leaves the previous result or none, never half a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.provenance import atomic_write_bytes

#: Colour ramp for probabilities 0 -> 1 (dark blue, blue, green, yellow, red); no tissue is white.
_RAMP = np.array([[48, 18, 59], [40, 130, 230], [60, 200, 100], [250, 210, 40], [200, 20, 20]], np.float32)


def colourize(grid: np.ndarray) -> np.ndarray:
    """(h, w) probabilities in [0, 1] (NaN = not scored) -> (h, w, 3) uint8 RGB."""
    g = np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(g).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (g - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    rgb[np.isnan(grid)] = 255.0
    return np.round(rgb).astype(np.uint8)


def heatmap_canvas(
    grid: np.ndarray, slide_wh: tuple[int, int], cell_l0_px: float, origin_l0: float = 0.0
) -> np.ndarray:
    """Pad the (rows, cols) grid with NaN so it spans the whole slide (cells of ``cell_l0_px`` level-0
    pixels, the first starting at level-0 (``origin_l0``, ``origin_l0``))."""
    cols = int(np.ceil((slide_wh[0] - origin_l0) / cell_l0_px))
    rows = int(np.ceil((slide_wh[1] - origin_l0) / cell_l0_px))
    out = np.full((max(rows, grid.shape[0]), max(cols, grid.shape[1])), np.nan, np.float32)
    out[: grid.shape[0], : grid.shape[1]] = grid
    return out


def write_heatmap_tiff(
    path: str | os.PathLike[str],
    canvas: np.ndarray,
    *,
    cell_l0_px: float,
    mpp_l0: float,
    description: dict[str, Any],
    origin_l0: float = 0.0,
    tile_px: int = 256,
) -> Path:
    """Tiled, pyramidal RGB TIFF of the probability canvas; one pixel = one grid cell.

    Resolution tags give the heatmap's um/px (``cell_l0_px * mpp_l0``), and the description (JSON)
    records ``downsample`` (level-0 pixels per heatmap pixel) and ``origin_l0`` (level-0 position of
    the first cell: half the tile overlap, 0 without overlap), so a viewer places it on the slide
    without guessing. Levels halve until the image fits one tile.
    """
    import tifffile

    rgb = colourize(canvas)
    mpp = cell_l0_px * mpp_l0
    meta = {**description, "downsample": cell_l0_px, "origin_l0": [origin_l0, origin_l0], "mpp": mpp}
    levels = [rgb]
    while max(levels[-1].shape[:2]) > tile_px:
        prev = levels[-1]
        levels.append(prev[::2, ::2].copy())  # nearest: keeps the colours of real probabilities
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for i, lv in enumerate(levels):
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tw.write(
                lv,
                photometric="rgb",
                tile=(tile_px, tile_px),
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                description=json.dumps(meta) if i == 0 else None,
                metadata=None,
            )
    return atomic_write_bytes(path, buf.getvalue())


def write_overlay_png(
    path: str | os.PathLike[str],
    thumbnail: np.ndarray,
    canvas: np.ndarray,
    *,
    thumb_downsample: float,
    cell_l0_px: float,
    origin_l0: float = 0.0,
    alpha: float = 0.5,
) -> Path:
    """The heatmap blended over the slide thumbnail (cells scaled to thumbnail pixels; cells start at
    level-0 ``origin_l0``, and thumbnail pixels before the first cell are left unscored)."""
    from PIL import Image

    h, w = thumbnail.shape[:2]

    def index(n: int, limit: int) -> np.ndarray:
        i = np.floor(((np.arange(n) + 0.5) * thumb_downsample - origin_l0) / cell_l0_px).astype(np.int64)
        return np.where(i < 0, limit, np.minimum(i, limit - 1))  # ``limit``: the NaN row/column added below

    padded = np.pad(canvas, ((0, 1), (0, 1)), constant_values=np.nan)
    up = padded[np.ix_(index(h, canvas.shape[0]), index(w, canvas.shape[1]))]
    colour = colourize(up).astype(np.float32)
    out = thumbnail.astype(np.float32)
    scored = ~np.isnan(up)
    out[scored] = (1 - alpha) * out[scored] + alpha * colour[scored]
    buf = io.BytesIO()
    Image.fromarray(np.round(out).astype(np.uint8)).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_tiles_csv(path: str | os.PathLike[str], columns: dict[str, np.ndarray]) -> Path:
    """One row per tile; ``columns`` maps header -> (N,) values."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(columns)
    w.writerow(names)
    cols = [np.asarray(columns[n]) for n in names]
    for row in zip(*cols, strict=True):
        w.writerow([f"{v:.6g}" if isinstance(v, np.floating | float) else v for v in row])
    return atomic_write_bytes(path, buf.getvalue().encode())


def geojson_features(
    boxes_l0: np.ndarray,
    probs: np.ndarray,
    classes: tuple[str, ...],
    positive_index: int,
    *,
    tile_threshold: float,
    regions: Any,
) -> dict[str, Any]:
    """QuPath-compatible FeatureCollection (level-0 px): one detection per tile, tumour annotations.

    Tiles carry their class (positive when P >= ``tile_threshold``) and every class probability as
    measurements; ``regions`` (a shapely geometry) becomes annotation objects of the positive class.
    """
    from shapely.geometry import mapping

    pos = classes[positive_index]
    neg = next((c for i, c in enumerate(classes) if i != positive_index), "other")
    colour = {pos: [220, 30, 30], neg: [60, 120, 220]}
    feats: list[dict[str, Any]] = []
    for b, p in zip(np.asarray(boxes_l0, float), probs, strict=True):
        x0, y0, x1, y1 = (round(float(v), 2) for v in b)
        name = pos if p[positive_index] >= tile_threshold else neg
        feats.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]],
                },
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": name, "color": colour[name]},
                    "measurements": {f"P({c})": round(float(v), 5) for c, v in zip(classes, p, strict=True)},
                },
            }
        )
    geoms = getattr(regions, "geoms", [regions]) if regions is not None and not regions.is_empty else []
    for g in geoms:
        feats.append(
            {
                "type": "Feature",
                "geometry": mapping(g),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{pos} region",
                    "classification": {"name": pos, "color": colour[pos]},
                    "isLocked": False,
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}
