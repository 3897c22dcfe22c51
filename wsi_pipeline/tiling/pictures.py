"""Pictures of a tile source for people: the whole slide at a chosen size (under the overlay) and
tiles as they look (the report's top tiles).

A slide source is read through its slide reader. A store source is read from the slide it was made
from when that file is still at its recorded path with the same content fingerprint; otherwise the
whole-slide picture is the store's own thumbnail (the tissue-detection thumbnail, about 8 um/px)
upsampled, and tiles are the store's tiles (as the model saw them: stain-normalized when the store
was).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wsi_pipeline.errors import WsiError
from wsi_pipeline.io.slide import SlideReader, open_slide, read_thumbnail, slide_fingerprint
from wsi_pipeline.tiling.source import StoreSource, TileSource


@dataclass(frozen=True)
class SlidePicture:
    """RGB picture of the whole slide: pixel (row, col) covers level-0 x in
    [col * l0_per_px, (col + 1) * l0_per_px) (y alike). ``origin`` says where it came from."""

    image: np.ndarray  # (h, w, 3) uint8
    l0_per_px: float
    origin: str  # "slide" or "store thumbnail"


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
    """The whole slide with its long side ``long_side_px`` pixels (up- or downsampled): from the base
    the source's planning read with its thumbnail when it was opened for this size, else read now."""
    from PIL import Image

    layout = source.layout
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
