"""Pictures of a tile source for people: the whole slide at a chosen size (under the overlay) and
tiles as they look (the report's top tiles).

A slide source is read through its slide reader. A store source is read from the slide it was made
from when that file is still at its recorded path with the same content fingerprint; otherwise the
whole-slide picture is the store's own thumbnail (the tissue-detection thumbnail, about 8 um/px)
upsampled, and tiles are the store's tiles (as the model saw them: stain-normalized when the store
was).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_pipeline.errors import WsiError
from wsi_pipeline.io.slide import SlideReader, open_slide, read_thumbnail, slide_fingerprint
from wsi_pipeline.tiling.source import StoreSource, TileSource


@dataclass(frozen=True)
class SlidePicture:
    """RGB picture of the slide, or of its tissue: pixel (row, col) covers level-0 x in
    [x0 + col * l0_per_px, x0 + (col + 1) * l0_per_px) (y alike), where (x0, y0) = ``origin_l0``.
    ``origin`` says where it came from."""

    image: np.ndarray  # (h, w, 3) uint8
    l0_per_px: float
    origin: str  # "slide", "slide (tissue)" or "store thumbnail"
    origin_l0: tuple[float, float] = (0.0, 0.0)


#: crop the picture to the tissue when that shows it at least this many times larger (a biopsy on a
#: large slide: 1000 px for the whole glass leave a needle core a few dozen pixels wide)
CROP_GAIN = 1.5
#: longest side (level pixels) of the region read for a tissue crop; a slide without a level that fine
#: is pictured whole
CROP_READ_MAX_PX = 4096


def tissue_box_l0(source: TileSource) -> tuple[float, float, float, float] | None:
    """Level-0 box (x0, y0, x1, y1) around the scored tiles with a margin of a tenth of its long side
    (at least two tiles), within the slide; None when cropping to it would not enlarge the tissue
    :data:`CROP_GAIN` times."""
    layout = source.layout
    if not len(layout.coords_l0):
        return None
    w0, h0 = layout.slide_wh
    tile = float(layout.grid.tile_l0_px)
    x0, y0 = (float(v) for v in layout.coords_l0.min(axis=0))
    x1, y1 = (float(v) + tile for v in layout.coords_l0.max(axis=0))
    margin = max(0.1 * max(x1 - x0, y1 - y0), 2 * tile)
    x0, y0, x1, y1 = max(0.0, x0 - margin), max(0.0, y0 - margin), min(w0, x1 + margin), min(h0, y1 + margin)
    if max(w0, h0) >= CROP_GAIN * max(x1 - x0, y1 - y0):
        return (x0, y0, x1, y1)
    return None


def _tissue_picture(
    reader: SlideReader, box: tuple[float, float, float, float], long_side_px: int
) -> SlidePicture | None:
    """``box`` (level 0) at ``long_side_px`` on its long side, read in one region from the coarsest level
    still at least as fine as the picture (a coarser one where that region would pass
    :data:`CROP_READ_MAX_PX`); None when no level allows it."""
    from PIL import Image

    x0, y0, x1, y1 = box
    l0_per_px = max(x1 - x0, y1 - y0) / long_side_px
    size = (max(1, round((x1 - x0) / l0_per_px)), max(1, round((y1 - y0) / l0_per_px)))
    levels = sorted(range(reader.level_count), key=lambda i: reader.level_downsamples[i])
    fine = [i for i in levels if reader.level_downsamples[i] <= l0_per_px] or levels[:1]
    for level in [fine[-1], *[i for i in levels if reader.level_downsamples[i] > l0_per_px]]:
        ds = reader.level_downsamples[level]
        w, h = math.ceil((x1 - x0) / ds), math.ceil((y1 - y0) / ds)
        if max(w, h) <= CROP_READ_MAX_PX:
            region = reader.read_region((int(x0), int(y0)), level, (w, h))
            box_px = (0.0, 0.0, min(w, (x1 - x0) / ds), min(h, (y1 - y0) / ds))
            pic = Image.fromarray(region).resize(size, Image.Resampling.LANCZOS, box=box_px)
            return SlidePicture(
                np.asarray(pic), l0_per_px, "slide (tissue)", (float(int(x0)), float(int(y0)))
            )
    return None


def _open_reader(source: TileSource) -> SlideReader | None:
    """The slide behind ``source`` when it can be read as it was tiled, else None."""
    path = source.slide_path
    try:
        if isinstance(source, StoreSource) and (
            not path.exists() or slide_fingerprint(path) != source.fingerprint
        ):
            return None  # the slide moved or changed since the store was made
        return open_slide(path, source.backend, verify=False)
    except (WsiError, OSError, ValueError):
        return None


def slide_picture(source: TileSource, long_side_px: int) -> SlidePicture:
    """The slide with its long side ``long_side_px`` pixels (up- or downsampled): from the base the
    source's planning read with its thumbnail when it was opened for this size, else read now. Where
    the tissue is small on the glass (:func:`tissue_box_l0`), only the tissue and a margin, read from
    the slide at that size."""
    from PIL import Image

    layout = source.layout
    box = tissue_box_l0(source)
    if box is not None:
        reader = _open_reader(source)
        if reader is not None:
            try:
                cropped = _tissue_picture(reader, box, long_side_px)
            except WsiError:  # e.g. a damaged tile in the region: the whole slide's picture, as before
                cropped = None
            finally:
                reader.close()
            if cropped is not None:
                return cropped
    w0, h0 = layout.slide_wh
    l0_per_px = max(w0, h0) / long_side_px
    size = (max(1, round(w0 / l0_per_px)), max(1, round(h0 / l0_per_px)))
    origin = "slide"
    if layout.picture is not None and layout.picture_px == long_side_px:  # read with the thumbnail
        image, ds = layout.picture.image, layout.picture.downsample
    else:
        reader = _open_reader(source)
        try:
            if reader is not None:
                thumb = read_thumbnail(reader, layout.mpp_l0, target_mpp=l0_per_px * layout.mpp_l0)
                image, ds = thumb.image, thumb.downsample
            else:
                image, ds, origin = layout.thumbnail, layout.thumbnail_downsample, "store thumbnail"
        finally:
            if reader is not None:
                reader.close()
    # Map exactly the slide's extent (the thumbnail's last pixels may pass it) onto the picture; the
    # picture's rounded size may pass the slide by under half a pixel, which the thumbnail may lack.
    ih, iw = image.shape[:2]
    box = (0.0, 0.0, min(size[0] * l0_per_px / ds, iw), min(size[1] * l0_per_px / ds, ih))
    pic = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, box=box)
    return SlidePicture(np.asarray(pic), l0_per_px, origin)


def tile_pictures(source: TileSource, indices: Sequence[int], size_px: int = 150) -> list[np.ndarray]:
    """Tiles ``indices`` (positions in the source's tile order) as (size_px, size_px, 3) uint8 pictures:
    each tile's field of view read from the slide as it looks (one ``read_region`` at the grid's
    level and the tile's recorded origin, before any stain normalization), or the store's tiles when
    scoring a store."""
    from PIL import Image

    idx = [int(i) for i in indices]
    if not idx:
        return []

    def small(pixels: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(pixels).resize((size_px, size_px), Image.Resampling.LANCZOS))

    if isinstance(source, StoreSource):
        tiles = source.store.tiles
        return [small(np.asarray(tiles[i])) for i in idx]
    layout = source.layout
    grid = layout.grid
    origins = grid.origins_l0(layout.colrow[idx])
    reader = open_slide(source.slide_path, source.backend, verify=False)
    try:
        return [
            small(reader.read_region((int(x), int(y)), grid.level, (grid.read_px, grid.read_px)))
            for x, y in origins
        ]
    finally:
        reader.close()
