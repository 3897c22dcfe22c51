"""Tile grid at a target resolution. Pure functions; coordinates say their level and unit.

The grid is laid in pixels of the pyramid level that is read (``read_px`` level pixels per tile,
``stride_read_px`` between tile origins), so every tile starts on a whole level pixel. Origins are
reported in level-0 pixels (``x_l0``, ``y_l0``), chosen by the reader's ``origin_rule`` so that
``read_region`` at that level-0 location starts exactly on the tile's level pixel; where a reader
cannot do that (OpenSlide at a non-integer downsample resamples by the sub-pixel remainder),
``exact_blocks`` is False and tiles are read one by one, so a tile always equals ``read_region`` at
its recorded origin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wsi_pipeline.io.slide import LevelChoice


@dataclass(frozen=True)
class TileGrid:
    """A regular grid of square tiles over one pyramid level.

    ``tile_px``/``overlap_px`` are in output pixels (at the effective mpp); ``read_px`` and
    ``stride_read_px`` in pixels of ``level``; ``cols`` x ``rows`` positions cover only whole tiles
    inside the level.
    """

    level: int
    level_downsample: float
    tile_px: int
    overlap_px: int
    read_px: int
    stride_read_px: int
    cols: int
    rows: int
    origin_rule: str = "round"  # level px -> level-0 px: "round" (OpenSlide) or "trunc" (tiffslide)
    exact_blocks: bool = True  # tiles cut from one large read equal single reads at their origins

    @property
    def tile_l0_px(self) -> float:
        """Tile side in level-0 pixels."""
        return self.read_px * self.level_downsample

    @property
    def stride_l0_px(self) -> float:
        """Distance between neighbouring tile origins in level-0 pixels."""
        return self.stride_read_px * self.level_downsample

    def origins_level(self, colrow: np.ndarray) -> np.ndarray:
        """(N, 2) tile origins (x, y) in pixels of ``level`` for (N, 2) grid (col, row)."""
        return np.asarray(colrow, np.int64) * self.stride_read_px

    def origins_l0(self, colrow: np.ndarray) -> np.ndarray:
        """(N, 2) tile origins (x, y) in level-0 pixels (int64) for (N, 2) grid (col, row)."""
        return level_to_l0(self.origins_level(colrow), self.level_downsample, self.origin_rule)

    @property
    def cell_origin_l0(self) -> float:
        """Offset (level-0 px, x and y) of a tile's heatmap cell from the tile's origin: the cell is the
        ``stride`` square centred on the tile, so with overlap it is not the tile's top-left corner."""
        return (self.tile_l0_px - self.stride_l0_px) / 2

    def boxes_l0(self, colrow: np.ndarray) -> np.ndarray:
        """(N, 4) x0, y0, x1, y1 in level-0 pixels (float64) of the tiles at (col, row)."""
        o = self.origins_level(colrow).astype(np.float64) * self.level_downsample
        return np.concatenate([o, o + self.tile_l0_px], axis=1)

    def all_positions(self) -> np.ndarray:
        """Every (col, row) of the grid, row-major, shape (cols * rows, 2) int32."""
        rr, cc = np.mgrid[0 : self.rows, 0 : self.cols]
        return np.stack([cc.ravel(), rr.ravel()], axis=1).astype(np.int32)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tile_l0_px=self.tile_l0_px, stride_l0_px=self.stride_l0_px)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileGrid:
        """The grid recorded by :meth:`to_dict` (stores written before ``origin_rule`` get the defaults)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def level_to_l0(xy_level: np.ndarray, downsample: float, rule: str = "round") -> np.ndarray:
    """Level-0 locations (int64) that a reader maps back exactly to level pixels ``xy_level``.

    ``round``: round(x * downsample), for readers that divide by the downsample and resample by the
    remainder (OpenSlide; exact at integer downsamples). ``trunc``: the smallest integer ``l`` with
    ``int(l / downsample) == x``, for readers that truncate (tiffslide), so a read starts on ``x``.
    """
    v = np.asarray(xy_level, np.int64)
    if rule == "round":
        return np.round(v * downsample).astype(np.int64)
    if rule != "trunc":
        raise ValueError(f"unknown origin rule {rule!r}")
    l0 = np.ceil(v * downsample).astype(np.int64)
    back = (l0 / downsample).astype(np.int64)  # what the reader computes (float division, truncated)
    l0 = np.where(back < v, l0 + 1, l0)  # float error: ceil landed just below x's first location
    prev = ((l0 - 1) / downsample).astype(np.int64)
    return np.where((prev == v) & (l0 > 0), l0 - 1, l0)


def make_grid(
    level_dimensions: tuple[int, int],
    level_downsample: float,
    choice: LevelChoice,
    *,
    tile_px: int = 224,
    overlap_px: int = 0,
    origin_rule: str = "round",
    exact_blocks: bool = True,
) -> TileGrid:
    """Grid of ``tile_px`` tiles at ``choice.effective_mpp`` over a level of (width, height) pixels.

    ``overlap_px`` (output pixels) is shared by neighbouring tiles; 0 gives a tiling with no overlap.
    """
    if tile_px < 8:
        raise ValueError(f"tile size {tile_px} px is too small (at least 8)")
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap {overlap_px} px must be in [0, tile size {tile_px})")
    read_px = max(1, round(tile_px / choice.scale))
    stride_read_px = max(1, round((tile_px - overlap_px) / choice.scale))
    w, h = level_dimensions
    cols = (w - read_px) // stride_read_px + 1 if w >= read_px else 0
    rows = (h - read_px) // stride_read_px + 1 if h >= read_px else 0
    return TileGrid(
        choice.level, level_downsample, tile_px, overlap_px, read_px, stride_read_px, cols, rows,
        origin_rule, exact_blocks,
    )  # fmt: skip


def block_order(colrow: np.ndarray, block_tiles: int) -> np.ndarray:
    """Permutation that groups tiles by ``block_tiles`` x ``block_tiles`` blocks of the grid.

    Tiles of one block become contiguous (row-major inside a block, blocks row-major), so a reader
    reads one large region per block and a writer fills chunks of consecutive tiles.
    """
    c = np.asarray(colrow, np.int64)
    if len(c) == 0:
        return np.zeros(0, np.int64)
    b = max(1, int(block_tiles))
    return np.lexsort((c[:, 0], c[:, 1], c[:, 0] // b, c[:, 1] // b))
