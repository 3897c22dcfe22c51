"""Writers for slide results: probability TIFF, colour TIFF, overlay PNG, QuPath GeoJSON, tile CSV.

Pure functions over numpy arrays; every file is rendered in memory and written atomically
(:func:`wsi_pipeline.provenance.atomic_write_bytes`), so a crash leaves the previous result or none,
never half a file.

Heatmap geometry (all writers): the heatmap is a (rows, cols) grid of cells, one cell per grid
position, ``cell_l0_px`` level-0 pixels wide, the first starting at level-0 (``origin_l0``,
``origin_l0``) (half the tile overlap; 0 without overlap). NaN marks a cell that was not scored.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.io.ownership import GENERATOR, HEATMAP_MARKER
from wsi_pipeline.provenance import atomic_write_bytes
from wsi_pipeline.tiling.focus import SHARP_AT_LEAST

#: Format of the heatmap TIFFs, recorded under ``HEATMAP_MARKER`` in their first page's description
#: (``ownership.is_own_output``: a folder run never takes its own outputs for slides). 2: probability map.
HEATMAP_FORMAT = 2

#: Colour ramp for probabilities 0 -> 1 (dark violet, blue, green, yellow, red); no tissue is white.
_RAMP = np.array([[48, 18, 59], [40, 130, 230], [60, 200, 100], [250, 210, 40], [200, 20, 20]], np.float32)


def ramp_colours(p: np.ndarray) -> np.ndarray:
    """Probabilities (any shape, values in [0, 1], no NaN) -> float32 RGB of the colour ramp."""
    g = np.clip(p, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(g).astype(np.int64).clip(0, len(_RAMP) - 2)
    frac = (g - lo)[..., None]
    return np.asarray(_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac, np.float32)


def colourize(grid: np.ndarray) -> np.ndarray:
    """(h, w) probabilities in [0, 1] (NaN = not scored) -> (h, w, 3) uint8 RGB (white = not scored)."""
    rgb = ramp_colours(np.nan_to_num(grid, nan=0.0))
    rgb[np.isnan(grid)] = 255.0
    return np.round(rgb).astype(np.uint8)


def heatmap_canvas(
    grid: np.ndarray, slide_wh: tuple[int, int], cell_l0_px: float, origin_l0: float = 0.0
) -> np.ndarray:
    """The (rows, cols) grid padded with NaN to the last cell that overlaps the slide.

    Cells are ``cell_l0_px`` level-0 pixels, the first starting at level-0 (``origin_l0``,
    ``origin_l0``); the canvas has ``ceil((width - origin_l0) / cell_l0_px)`` columns (rows alike):
    every cell that overlaps the slide and none beyond it, so the canvas passes the slide's right and
    bottom edges by less than one cell.
    """
    cols = max(math.ceil((slide_wh[0] - origin_l0) / cell_l0_px), grid.shape[1])
    rows = max(math.ceil((slide_wh[1] - origin_l0) / cell_l0_px), grid.shape[0])
    out = np.full((rows, cols), np.nan, np.float32)
    out[: grid.shape[0], : grid.shape[1]] = grid
    return out


def probability_u8(p: np.ndarray) -> np.ndarray:
    """P in [0, 1] (NaN = not scored) -> uint8 ``round(255 * P)`` (half up), 0 where not scored."""
    v = np.floor(np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0) * 255.0 + 0.5)
    return v.astype(np.uint8)


def _halve_max(a: np.ndarray) -> np.ndarray:
    """Half-size grid: each pixel the highest P of its 2 x 2 cells (NaN only where all are NaN)."""
    h, w = a.shape
    p = np.full((h + h % 2, w + w % 2), np.nan, np.float32)
    p[:h, :w] = a
    return np.asarray(np.fmax(np.fmax(p[0::2, 0::2], p[0::2, 1::2]), np.fmax(p[1::2, 0::2], p[1::2, 1::2])))


def probability_pyramid(canvas: np.ndarray, tile_px: int = 256) -> list[np.ndarray]:
    """Levels of the canvas, halving until one fits a ``tile_px`` tile. Lower levels keep the highest
    P of each 2 x 2 block, so a small hot spot stays visible when a viewer zooms out."""
    levels = [np.asarray(canvas, np.float32)]
    while max(levels[-1].shape) > tile_px:
        levels.append(_halve_max(levels[-1]))
    return levels


def _pyramid_tiff(
    levels: list[np.ndarray],
    *,
    photometric: str,
    mpp: float,
    description: dict[str, Any],
    tile_px: int,
    extra: list[tuple[np.ndarray, dict[str, Any]]] | None = None,
) -> bytes:
    """Bytes of a tiled pyramidal TIFF: level 0 then the reduced levels as main pages (what OpenSlide's
    generic-TIFF reader and tifffile/tiffslide take as a pyramid), then ``extra`` pages written in
    strips (OpenSlide ignores untiled pages; tifffile shows each as its own series)."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for i, lv in enumerate(levels):
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tw.write(
                lv,
                photometric=photometric,
                tile=(tile_px, tile_px),
                compression="zlib",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
                description=json.dumps(description) if i == 0 else None,
                metadata=None,
            )
        for page, desc in extra or []:
            tw.write(
                page,
                photometric="minisblack",
                rowsperstrip=64,
                compression="zlib",
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                description=json.dumps(desc),
                metadata=None,
            )
    return buf.getvalue()


def _geometry(
    canvas: np.ndarray, cell_l0_px: float, mpp_l0: float, origin_l0: float, slide_wh: tuple[int, int] | None
) -> dict[str, Any]:
    g: dict[str, Any] = {
        "downsample": cell_l0_px,
        "origin_l0": [origin_l0, origin_l0],
        "mpp": cell_l0_px * mpp_l0,
        "grid_shape": [int(canvas.shape[0]), int(canvas.shape[1])],  # rows, cols (not "shape": tifffile
        # would take a description with a "shape" key for one of its own)
    }
    if slide_wh is not None:
        g["slide_size_l0"] = [int(slide_wh[0]), int(slide_wh[1])]
    return g


def write_probability_tiff(
    path: str | os.PathLike[str],
    canvas: np.ndarray,
    *,
    cell_l0_px: float,
    mpp_l0: float,
    description: dict[str, Any],
    origin_l0: float = 0.0,
    slide_wh: tuple[int, int] | None = None,
    tile_px: int = 256,
) -> Path:
    """The probability map: tiled, pyramidal, single-channel uint8 TIFF, one pixel per cell.

    Level 0 holds ``round(255 * P)`` (0 where not scored); lower levels halve it (highest P of each
    2 x 2 block) until it fits one ``tile_px`` tile. Resolution tags give the um/px of each level
    (unit centimetre: ``1e4 / (cell_l0_px * mpp_l0 * 2**level)`` px/cm) and the first page's
    description (JSON) records ``downsample`` (level-0 slide pixels per heatmap pixel),
    ``origin_l0`` (level-0 position of the first cell) and the slide's size, so a viewer places it on
    the slide without guessing. A last page, in strips (so OpenSlide, which reads only tiled pages,
    ignores it; tifffile sees it as the second series), is the scored mask: 255 = scored, 0 = not.
    """
    levels = probability_pyramid(canvas, tile_px)
    geo = _geometry(canvas, cell_l0_px, mpp_l0, origin_l0, slide_wh)
    meta = {
        HEATMAP_MARKER: HEATMAP_FORMAT,
        "kind": "probability",
        **description,
        "encoding": "round(255 * P), 0 where not scored; lower levels: highest P of each 2x2 block",
        "scored_mask": "last page (tifffile series 1): 255 = cell scored, 0 = not scored",
        **geo,
    }
    mask = np.where(np.isnan(canvas), 0, 255).astype(np.uint8)
    mask_desc = {"wsi_pipeline_scored_mask": 1, "value": "255 = cell scored, 0 = not scored", **geo}
    data = _pyramid_tiff(
        [probability_u8(lv) for lv in levels], photometric="minisblack", mpp=geo["mpp"],
        description=meta, tile_px=tile_px, extra=[(mask, mask_desc)],
    )  # fmt: skip
    return atomic_write_bytes(path, data)


def write_colour_tiff(
    path: str | os.PathLike[str],
    canvas: np.ndarray,
    *,
    cell_l0_px: float,
    mpp_l0: float,
    description: dict[str, Any],
    origin_l0: float = 0.0,
    slide_wh: tuple[int, int] | None = None,
    tile_px: int = 256,
) -> Path:
    """The same map rendered in colour (RGB, the overlay's ramp, white = not scored), for viewers that
    need RGB; same geometry, tags and pyramid as :func:`write_probability_tiff`."""
    levels = probability_pyramid(canvas, tile_px)
    geo = _geometry(canvas, cell_l0_px, mpp_l0, origin_l0, slide_wh)
    meta = {
        HEATMAP_MARKER: HEATMAP_FORMAT,
        "kind": "colour",
        **description,
        "colours": "0 dark violet -> blue -> green -> yellow -> 1 red; white = not scored",
        **geo,
    }
    data = _pyramid_tiff(
        [colourize(lv) for lv in levels], photometric="rgb", mpp=geo["mpp"], description=meta, tile_px=tile_px
    )
    return atomic_write_bytes(path, data)


# --- overlay ----------------------------------------------------------------------------------------


def visible_floor(threshold: float) -> float:
    """Lowest P that gets colour on the overlay: 0.2, or the threshold when that is lower (every tile
    called positive is coloured)."""
    return float(min(0.2, threshold))


def overlay_alpha(p: np.ndarray, floor: float) -> np.ndarray:
    """Opacity of the colour over the slide: 0 below ``floor`` (and where not scored), then rising
    linearly from 0.25 at the floor to 0.7 at P = 1."""
    q = np.nan_to_num(p, nan=-1.0)
    a = 0.25 + 0.45 * (q - floor) / max(1.0 - floor, 1e-6)
    return np.where(q >= floor, a, 0.0).astype(np.float32)


def _cell_index(n_px: int, l0_per_px: float, origin_l0: float, cell_l0_px: float, n_cells: int) -> np.ndarray:
    """Cell index under the centre of each of ``n_px`` picture pixels; ``n_cells`` (a NaN cell) outside."""
    i = np.floor(((np.arange(n_px) + 0.5) * l0_per_px - origin_l0) / cell_l0_px).astype(np.int64)
    return np.where((i < 0) | (i >= n_cells), n_cells, i)


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def nice_length_um(max_um: float) -> float:
    """The longest 1, 2 or 5 x 10^k micrometres not above ``max_um`` (a scale bar's length)."""
    if not max_um > 0:
        return 0.0
    k = math.floor(math.log10(max_um))
    return max(m * 10.0**k for m in (1, 2, 5) if m * 10.0**k <= max_um)


def _um_text(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} um"


#: colour of the regions of interest on the overlay: magenta, which neither H&E's pink-purple at full
#: saturation nor the P ramp (blue-green-yellow-red) nor the black tumour outlines have
ROI_RGB = (230, 0, 230)
#: Stripes over the tiles out of focus (on slides warned about their focus)
HATCH_RGB = (90, 90, 90)


def render_overlay(
    background: np.ndarray,
    canvas: np.ndarray,
    *,
    l0_per_px: float,
    cell_l0_px: float,
    mpp_l0: float,
    threshold: float,
    origin_l0: float = 0.0,
    regions: Any = None,
    positive_name: str = "tumour",
    picture_origin_l0: tuple[float, float] = (0.0, 0.0),
    roi: Any = None,
    hatch: np.ndarray | None = None,
) -> np.ndarray:
    """The heatmap over a picture of the slide, with a colour bar, the threshold and a scale bar.

    ``background``: (h, w, 3) uint8 picture of the slide, or of the part of it whose top-left corner
    is level-0 ``picture_origin_l0``; ``l0_per_px`` level-0 pixels per picture pixel; ``origin_l0``
    the level-0 position of the canvas's first cell (x and y alike). Cells with P below
    :func:`visible_floor` (and unscored ones) leave the slide as it
    looks; above it the ramp colour is blended with an opacity rising with P (:func:`overlay_alpha`).
    ``regions`` (a shapely geometry in level-0 pixels) are outlined in black, ``roi`` (the regions
    of interest the run was limited to, ``--regions``) in :data:`ROI_RGB`. ``hatch``: a bool grid of
    ``canvas``'s shape whose true cells (tiles out of focus) get grey diagonal stripes. A legend panel
    is added on the right. Returns (H, w + panel, 3) uint8 RGB.
    """
    from PIL import Image, ImageDraw

    h, w = background.shape[:2]
    px0, py0 = picture_origin_l0
    rows = _cell_index(h, l0_per_px, origin_l0 - py0, cell_l0_px, canvas.shape[0])
    cols = _cell_index(w, l0_per_px, origin_l0 - px0, cell_l0_px, canvas.shape[1])
    padded = np.pad(np.asarray(canvas, np.float32), ((0, 1), (0, 1)), constant_values=np.nan)
    floor = visible_floor(threshold)
    # Opacity and colour per cell, then spread to the picture's pixels (the same values as computing
    # them per pixel, at the cost of the grid instead of the picture).
    alpha = overlay_alpha(padded, floor)[np.ix_(rows, cols)][..., None]
    colour = ramp_colours(np.nan_to_num(padded, nan=0.0))[np.ix_(rows, cols)]
    out = background.astype(np.float32) * (1 - alpha) + colour * alpha
    fs = max(12, round(max(h, w) / 70))
    line_w = max(2, round(max(h, w) / 500))
    hatched = hatch is not None and bool(np.any(hatch))
    if hatched:
        assert hatch is not None
        cells = np.pad(np.asarray(hatch, bool), ((0, 1), (0, 1)))[np.ix_(rows, cols)]
        period = 4 * line_w
        stripes = (np.arange(h)[:, None] + np.arange(w)[None, :]) % period < line_w
        out[cells & stripes] = HATCH_RGB
    img = Image.fromarray(np.round(out).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw_outlines(draw, roi, l0_per_px=l0_per_px, origin_l0=(px0, py0), fill=ROI_RGB, width=line_w)
    draw_outlines(draw, regions, l0_per_px=l0_per_px, origin_l0=(px0, py0), fill=(0, 0, 0), width=line_w)
    _scale_bar(draw, w, h, um_per_px=l0_per_px * mpp_l0, fs=fs)
    panel = _legend_panel(max(h, 22 * fs), fs, threshold=threshold, floor=floor, line_w=line_w,
                          positive_name=positive_name, roi=roi is not None, hatch=hatched)  # fmt: skip
    full = Image.new("RGB", (w + panel.width, max(h, panel.height)), (255, 255, 255))
    full.paste(img, (0, 0))
    full.paste(panel, (w, 0))
    return np.asarray(full)


def draw_outlines(
    draw: Any,
    geometry: Any,
    *,
    l0_per_px: float,
    origin_l0: tuple[float, float] = (0.0, 0.0),
    fill: tuple[int, int, int],
    width: int,
) -> None:
    """Outline every ring of a shapely (Multi)Polygon in level-0 pixels on a PIL ``ImageDraw`` of a
    picture whose pixel (0, 0) is level-0 ``origin_l0``, ``l0_per_px`` level-0 pixels per pixel."""
    if geometry is None or geometry.is_empty:
        return
    x0, y0 = origin_l0
    for g in getattr(geometry, "geoms", [geometry]):
        for ring in [g.exterior, *g.interiors]:
            xy = [((x - x0) / l0_per_px, (y - y0) / l0_per_px) for x, y in ring.coords]
            draw.line(xy, fill=fill, width=width, joint="curve")


def _scale_bar(draw: Any, w: int, h: int, *, um_per_px: float, fs: int) -> None:
    """A black bar of a round length (about a fifth of the picture) on a white box, bottom left."""
    um = nice_length_um(w * um_per_px / 5)
    if um <= 0:
        return
    bar_px = max(1, round(um / um_per_px))
    font = _font(fs)
    text = _um_text(um)
    tw = draw.textlength(text, font=font)
    pad = fs // 2
    box_w, box_h = max(bar_px, tw) + 2 * pad, fs * 2 + 2 * pad
    x0, y0 = pad, h - box_h - pad
    if y0 < 0 or box_w > w:
        return  # a picture too small for one
    draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill=(255, 255, 255), outline=(0, 0, 0))
    draw.text((x0 + pad, y0 + pad // 2), text, fill=(0, 0, 0), font=font)
    by = y0 + pad + fs + fs // 3
    draw.rectangle([x0 + pad, by, x0 + pad + bar_px, by + max(3, fs // 3)], fill=(0, 0, 0))


def _legend_panel(
    height: int,
    fs: int,
    *,
    threshold: float,
    floor: float,
    line_w: int,
    positive_name: str,
    roi: bool = False,
    hatch: bool = False,
) -> Any:
    """Colour bar (P 0..1 bottom to top, grey below the visible floor), ticks, threshold, legend."""
    from PIL import Image, ImageDraw

    font, small = _font(fs), _font(max(10, fs - 2))
    width = 13 * fs
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    draw.text((fs // 2, fs // 2), f"P({positive_name})", fill=(0, 0, 0), font=font)
    top, bar_h = 2 * fs + fs // 2, max(100, min(height - 11 * fs, 24 * fs))
    x0, x1 = 5 * fs, 5 * fs + 3 * fs // 2
    p = 1.0 - np.arange(bar_h) / max(bar_h - 1, 1)
    rgb = np.where((p >= floor)[:, None], ramp_colours(p), np.float32(225))
    strip = np.repeat(np.round(rgb).astype(np.uint8)[:, None, :], x1 - x0, axis=1)
    panel.paste(Image.fromarray(strip), (x0, top))
    draw.rectangle([x0 - 1, top - 1, x1, top + bar_h], outline=(0, 0, 0))

    def y_of(v: float) -> float:
        return top + (1.0 - v) * (bar_h - 1)

    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = y_of(v)
        draw.line([(x1, y), (x1 + fs // 2, y)], fill=(0, 0, 0), width=1)
        draw.text((x1 + fs // 2 + 3, y - fs / 2), f"{v:.1f}", fill=(0, 0, 0), font=font)
    yt = y_of(threshold)
    draw.line([(x0 - fs // 2, yt), (x1 + 2, yt)], fill=(0, 0, 0), width=max(2, line_w))
    draw.polygon([(x0 - fs // 2, yt), (x0 - fs, yt - fs / 2.5), (x0 - fs, yt + fs / 2.5)], fill=(0, 0, 0))
    tlabel = f"{threshold:.2f}"
    tx = x0 - fs - 4 - draw.textlength(tlabel, font=font)
    draw.text((tx, yt - fs / 2), tlabel, fill=(0, 0, 0), font=font)
    y = top + bar_h + fs
    lines = [
        ("text", "black mark: threshold"),
        ("text", f"grey: P < {floor:.2f}; these and"),
        ("text", "unscored cells get no"),
        ("text", "colour (slide as it looks)"),
        ("line", f"{positive_name} region"),
        ("text", f"(tiles with P >= {threshold:.2f})"),
        *([("roi", "regions scored"), ("text", "(--regions)")] if roi else []),
        *([("hatch", "out of focus"), ("text", f"(focus score < {SHARP_AT_LEAST:g})")] if hatch else []),
    ]
    for kind, text in lines:
        if kind == "hatch":
            for i in range(3):
                x = fs // 2 + i * 2 * line_w * 2
                draw.line([(x, y + fs), (x + fs, y)], fill=HATCH_RGB, width=line_w)
            draw.text((3 * fs, y), text, fill=(0, 0, 0), font=small)
        elif kind in ("line", "roi"):
            colour = ROI_RGB if kind == "roi" else (0, 0, 0)
            draw.line([(fs // 2, y + fs / 2), (fs // 2 + 2 * fs, y + fs / 2)], fill=colour, width=line_w)
            draw.text((3 * fs, y), text, fill=(0, 0, 0), font=small)
        else:
            draw.text((fs // 2, y), text, fill=(0, 0, 0), font=small)
        y += fs + fs // 3
    return panel


def write_overlay_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """``image`` ((h, w, 3) uint8, e.g. from :func:`render_overlay`) as a PNG (Software: wsi-pipeline)."""
    return atomic_write_bytes(path, encode_image(image, "PNG", software=f"{GENERATOR} {__version__}"))


def encode_image(
    image: np.ndarray, fmt: str = "PNG", *, quality: int = 85, software: str | None = None
) -> bytes:
    """(h, w, 3) uint8 -> PNG or JPEG bytes; ``software``: a PNG's Software text chunk."""
    from PIL import Image

    buf = io.BytesIO()
    # PNG at zlib level 3 with the run-length strategy (zlib's advice for PNG data): a 1000 px overlay
    # encodes in 0.032-0.059 s instead of 0.045-0.090 s (default strategy) and 2-9% smaller.
    kwargs: dict[str, Any] = (
        {"quality": quality} if fmt.upper() == "JPEG" else {"compress_level": 3, "compress_type": zlib.Z_RLE}
    )
    if software and fmt.upper() == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Software", software)
        kwargs["pnginfo"] = info
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


# --- JSON, CSV, GeoJSON -----------------------------------------------------------------------------


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def write_compact_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """JSON without indentation or spaces (GeoJSON of large slides)."""
    return atomic_write_bytes(path, (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode())


def write_tiles_csv(path: str | os.PathLike[str], columns: dict[str, np.ndarray]) -> Path:
    """One row per tile; ``columns`` maps header -> (N,) values.

    float32 columns (the model's probabilities and OOD distances) are written in the shortest form
    that reads back as the same float32, so a later run can take the scores from the table exactly;
    other floats to 6 significant digits."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = list(columns)
    w.writerow(names)
    cols: list[Any] = []
    for n in names:
        col = np.asarray(columns[n])
        if col.dtype == np.float32:
            cols.append(col.astype(str))  # numpy's shortest round-trip repr of each float32
        elif col.dtype.kind == "f":
            cols.append([f"{v:.6g}" for v in col.tolist()])
        else:
            cols.append(col.tolist())
    w.writerows(zip(*cols, strict=True))
    return atomic_write_bytes(path, buf.getvalue().encode())


def region_measurements(
    regions: Any,
    boxes_l0: np.ndarray,
    p_pos: np.ndarray,
    positive: np.ndarray,
    *,
    mpp_l0: float,
    name: str,
    stats: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """QuPath measurements of each region polygon (level-0 px): its area (um^2 and mm^2), longest
    dimension (um), and the number, mean and max P of the positive tiles whose centre lies in it;
    ``stats``: ``aggregate.region_stats`` of these regions when the caller has them already."""
    from wsi_pipeline.aggregate import region_stats

    out = []
    for r in stats if stats is not None else region_stats(regions, boxes_l0, p_pos, positive):
        um2 = r["area_px2"] * mpp_l0 * mpp_l0
        out.append({
            "Area um^2": round(um2, 1),
            "Area mm^2": round(um2 / 1e6, 6),
            "Length um": round(r["length_px"] * mpp_l0, 1),
            f"Mean P({name})": None if r["mean_p"] is None else round(r["mean_p"], 5),
            f"Max P({name})": None if r["max_p"] is None else round(r["max_p"], 5),
            "Tiles": r["tiles"],
        })  # fmt: skip
    return out


def geojson_features(
    boxes_l0: np.ndarray,
    probs: np.ndarray,
    classes: tuple[str, ...],
    positive_index: int,
    *,
    tile_threshold: float,
    regions: Any,
    mpp_l0: float | None = None,
    tiles: bool = True,
    pen_regions: Any = None,
    origin_l0: tuple[int, int] = (0, 0),
    region_stats: list[dict[str, Any]] | None = None,
    focus: np.ndarray | None = None,
    blurred_regions: Any = None,
) -> dict[str, Any]:
    """QuPath-compatible FeatureCollection: one detection per tile, tumour annotations, the
    marker-pen ink left out of the tissue (``pen_regions``, a shapely geometry) as locked
    annotations of class ``Pen ink`` and out-of-focus tissue (``blurred_regions``) as locked
    annotations of class ``Out of focus``. Inputs are level-0 px; the file's coordinates are level-0 px
    minus ``origin_l0``, the level-0 pixel QuPath shows as (0, 0) (``io.slide.qupath_origin_l0``:
    non-zero where QuPath crops a MIRAX or Leica slide to its scanned rectangle).

    Tiles (``tiles=False`` leaves them out, for huge slides: the tile table has them) carry their
    class (positive when P >= ``tile_threshold``) and every class probability (and ``focus``, the
    tile's focus score, :mod:`wsi_pipeline.tiling.focus`) as measurements;
    ``regions`` (a shapely geometry) becomes annotation objects of the positive class, each with
    its area (um^2, mm^2; needs ``mpp_l0``), tile count and mean and max P.
    """
    from shapely.geometry import mapping

    pos = classes[positive_index]
    neg = next((c for i, c in enumerate(classes) if i != positive_index), "other")
    colour = {pos: [220, 30, 30], neg: [60, 120, 220]}
    probs = np.asarray(probs)
    boxes = np.asarray(boxes_l0, float)
    positive = probs[:, positive_index] >= tile_threshold if len(probs) else np.zeros(0, bool)
    shift = (float(origin_l0[0]), float(origin_l0[1]))
    feats: list[dict[str, Any]] = []
    if tiles:
        shifted = boxes - np.array([shift[0], shift[1], shift[0], shift[1]]) if len(boxes) else boxes
        sharpness = [None] * len(probs) if focus is None else [round(float(v), 4) for v in focus]
        for b, p, is_pos, f in zip(shifted, probs, positive, sharpness, strict=True):
            x0, y0, x1, y1 = (round(float(v), 2) for v in b)
            name = pos if is_pos else neg
            meas = {f"P({c})": round(float(v), 5) for c, v in zip(classes, p, strict=True)}
            if f is not None:
                meas["Focus score"] = f
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
                        "measurements": meas,
                    },
                }
            )
    geoms = getattr(regions, "geoms", [regions]) if regions is not None and not regions.is_empty else []
    measures = (
        region_measurements(regions, boxes, probs[:, positive_index] if len(probs) else probs, positive,
                            mpp_l0=mpp_l0, name=pos, stats=region_stats)
        if mpp_l0 is not None else [None] * len(geoms)
    )  # fmt: skip
    for g, region_meas in zip(geoms, measures, strict=True):
        props: dict[str, Any] = {
            "objectType": "annotation",
            "name": f"{pos} region",
            "classification": {"name": pos, "color": colour[pos]},
            "isLocked": False,
        }
        if region_meas is not None:
            props["measurements"] = region_meas
        feats.append({"type": "Feature", "geometry": _rounded(mapping(g), shift=shift), "properties": props})
    for geometry, name, cls, rgb in (
        (pen_regions, "pen ink (left out of the tissue)", "Pen ink", [40, 80, 200]),
        (blurred_regions, "out of focus (scores there are unreliable)", "Out of focus", [150, 150, 150]),
    ):
        parts = [] if geometry is None or geometry.is_empty else getattr(geometry, "geoms", [geometry])
        for g in parts:  # locked: they record what the run left out or distrusts, not a finding to edit
            props = {"objectType": "annotation", "name": name, "isLocked": True,
                     "classification": {"name": cls, "color": rgb}}  # fmt: skip
            if mpp_l0 is not None:
                props["measurements"] = {"Area mm^2": round(g.area * mpp_l0 * mpp_l0 / 1e6, 4)}
            feats.append(
                {"type": "Feature", "geometry": _rounded(mapping(g), shift=shift), "properties": props}
            )
    # "generator" (a foreign member, which GeoJSON readers ignore) marks the file as ours: a run may
    # replace it, never a user's annotations of the same name (io.ownership)
    # "origin_l0" (another foreign member) says which level-0 pixel the coordinates count from
    doc: dict[str, Any] = {"type": "FeatureCollection", "generator": f"{GENERATOR} {__version__}"}
    if shift != (0.0, 0.0):
        doc["origin_l0"] = [int(origin_l0[0]), int(origin_l0[1])]
    return {**doc, "features": feats}


def _rounded(
    geom: dict[str, Any], ndigits: int = 2, shift: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any]:
    """A GeoJSON geometry mapping with coordinates less ``shift`` and rounded (0.01 px is plenty)."""

    def r(c: Any) -> Any:
        if isinstance(c, list | tuple) and c and isinstance(c[0], int | float):
            return [round(float(v) - s, ndigits) for v, s in zip(c, shift, strict=False)]
        return [r(x) for x in c]

    return {**geom, "coordinates": r(geom["coordinates"])}
