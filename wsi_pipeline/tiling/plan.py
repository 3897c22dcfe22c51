"""Plan a slide before any tile is read: resolution, pyramid level, tissue mask, grid, kept tiles.

``plan_slide`` resolves the level-0 um/px (metadata or ``--mpp``), chooses the level to read, computes
the tissue mask on a thumbnail, lays the grid and keeps the tiles the mask covers, in store order;
slides that cannot be planned (dark-field, grayscale, image data missing under tissue) are refused.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.cores import usable_cores
from wsi_pipeline.errors import SlideError, TissueError, UsageError
from wsi_pipeline.io.slide import (
    LevelChoice,
    Resolution,
    SlideReader,
    Thumbnail,
    choose_level,
    missing_tiles_l0,
    qupath_origin_l0,
    read_rule,
    read_thumbnails,
    resolve_mpp,
    thumbnail_level,
)
from wsi_pipeline.stain.macenko import REFERENCE, StainModel
from wsi_pipeline.tiling.grid import TileGrid, block_order, make_grid
from wsi_pipeline.tiling.regions import RegionLimit, region_mask, require_tissue_in_regions, slide_geometry
from wsi_pipeline.tiling.tissue import (
    TissueParams,
    channel_max,
    channel_min,
    preload_libraries,
    tissue_and_pen_masks,
    tissue_fraction_in_boxes,
)

#: level pixels of a thumbnail read from which the tissue mask's libraries (scipy.ndimage: 0.13 s of
#: import) are imported on another thread during the decode: 4 MP take ~0.09 s to decode here (the
#: bundled sample's 6.6 MP level 0: 0.15 s). Below, the import would only compete with the planning's
#: Python for the GIL (a 9250 px slide whose thumbnail level has 0.3 MP lost 0.15 s to it).
PRELOAD_MIN_PIXELS = 4_000_000


@dataclass(frozen=True)
class TileOptions:
    """What to tile and how. Resolutions in micrometres per pixel, sizes in output pixels."""

    target_mpp: float = 0.5
    tile_px: int = 224
    overlap_px: int = 0
    mpp_override: float | None = None
    level_tolerance: float = 0.1  # relative mpp difference accepted without resizing
    min_tissue_fraction: float = 0.25  # keep tiles at least this much covered by the mask
    mask_mpp: float = 8.0  # resolution of the thumbnail the tissue mask is computed on
    tissue: TissueParams = field(default_factory=TissueParams)
    chunk_tiles: int = 64  # tiles per Zarr chunk (and per write)
    block_tiles: int = 4  # a read covers up to block_tiles x block_tiles grid positions
    workers: int = field(default_factory=lambda: min(4, usable_cores()))  # reader threads
    normalize: str = "none"  # "none" or "macenko" (one stain model fitted per slide)
    stain_reference: StainModel = REFERENCE  # target stain when normalizing
    stain_reference_name: str = "default H&E reference (HERef/maxCRef)"
    stain_fit_tiles: int = 64  # tiles spread across the slide pooled for the slide's stain fit
    regions: RegionLimit | None = None  # score only inside these polygons (``--regions``)

    def __post_init__(self) -> None:
        if self.normalize not in ("none", "macenko"):
            raise UsageError(f"normalize must be 'none' or 'macenko', not {self.normalize!r}")
        # Checked here too (the CLI checks its options): a zero tile or chunk would never finish
        for name, value in (("target_mpp", self.target_mpp), ("mask_mpp", self.mask_mpp)):
            if not value > 0:
                raise UsageError(f"{name} must be above 0 um/px, not {value}")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise UsageError(f"min tissue fraction must be within 0-1, not {self.min_tissue_fraction}")
        for name, count in (("tile_px", self.tile_px), ("chunk_tiles", self.chunk_tiles),
                            ("block_tiles", self.block_tiles), ("workers", self.workers)):  # fmt: skip
            if count < 1:
                raise UsageError(f"{name} must be at least 1, not {count}")

    def store_params(self) -> dict[str, Any]:
        """The options a resumed or re-run store must share (reader threads do not matter)."""
        stain = (
            {"stain_reference": self.stain_reference.to_dict(), "stain_fit_tiles": self.stain_fit_tiles}
            if self.normalize == "macenko"
            else {}
        )
        return {
            "normalize": self.normalize,
            **stain,
            "target_mpp": self.target_mpp,
            "tile_px": self.tile_px,
            "overlap_px": self.overlap_px,
            "mpp_override": self.mpp_override,
            "level_tolerance": self.level_tolerance,
            "min_tissue_fraction": self.min_tissue_fraction,
            "mask_mpp": self.mask_mpp,
            "tissue": self.tissue.to_dict(),
            "chunk_tiles": self.chunk_tiles,
            "block_tiles": self.block_tiles,
            **(self.regions.params() if self.regions is not None else {}),
        }


@dataclass(frozen=True)
class SlidePlan:
    """Everything decided about a slide before any tile is read.

    ``colrow`` (N, 2) are the kept grid positions in store order (grouped by read block);
    ``coords_l0`` their origins in level-0 pixels; ``tissue_fraction`` their mask coverage.
    """

    resolution: Resolution
    choice: LevelChoice
    grid: TileGrid
    thumbnail: Thumbnail
    mask: np.ndarray
    colrow: np.ndarray
    coords_l0: np.ndarray
    tissue_fraction: np.ndarray
    picture: Thumbnail | None = None  # the slide for people (``picture_px``), from the thumbnail's read
    pen_px: int = 0  # thumbnail pixels of marker-pen ink left out of the mask (tissue.pen_mask)
    regions: dict[str, Any] | None = None  # the regions the mask was limited to (``--regions``)
    regions_l0: Any = None  # those regions in OpenSlide's level-0 px, cut to the slide (shapely)

    @property
    def slide_tissue_fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def pen_marks_mm2(self) -> float:
        """Area of the marker-pen ink left out of the tissue mask, mm^2."""
        return round(self.pen_px * self.thumbnail.mpp**2 / 1e6, 4)

    @property
    def n_tiles(self) -> int:
        return len(self.colrow)


def is_brightfield(thumb: np.ndarray) -> bool:
    """True when the brightest decile is bright: brightfield glass, not a dark fluorescence field."""
    return bool(np.percentile(channel_max(thumb), 90) >= 100) if thumb.size else False


def is_grayscale(thumb: np.ndarray) -> bool:
    """True when every pixel has R == G == B and the image shows something: a grayscale image (stored
    or rendered as RGB), not H&E. A uniform image (blank glass, all white) is not "grayscale": it has no
    tissue, which the tissue check reports."""
    if not thumb.size or int(np.ptp(thumb)) <= 10:
        return False
    return not np.any(channel_max(thumb) != channel_min(thumb))


#: A kept tile may lie on missing image tiles only where the mask says there is no tissue; this much
#: slack absorbs the coarseness of the mask.
MISSING_TILE_SLACK = 0.25


def check_missing_tiles(
    reader: SlideReader, level: int, thumb: Thumbnail, boxes_l0: np.ndarray, fractions: np.ndarray
) -> None:
    """Refuse a slide whose read level lacks image tiles where the thumbnail shows tissue.

    Scanners leave empty background tiles out of a level (OpenSlide shows them transparent), which
    is fine; a missing tile under tissue means a damaged or incompletely written file, whose blank
    (white or black) pixels would otherwise be scored as if they were tissue.
    """
    missing = missing_tiles_l0(reader, level)
    if len(missing) == 0 or len(boxes_l0) == 0:
        return
    holes = np.zeros(thumb.image.shape[:2], bool)
    ds = thumb.downsample
    for x0, y0, x1, y1 in np.round(missing / ds).astype(np.int64):
        holes[max(y0, 0) : max(y1, y0 + 1), max(x0, 0) : max(x1, x0 + 1)] = True
    covered = tissue_fraction_in_boxes(holes, boxes_l0, ds)
    bad = np.flatnonzero(covered > (1.0 - fractions) + MISSING_TILE_SLACK)
    if len(bad):
        x, y = (int(v) for v in boxes_l0[bad[0], :2])
        raise SlideError(
            f"{reader.path}: level {level} lacks image data under tissue ({len(missing)} missing TIFF "
            f"tiles; {len(bad)} tissue tiles affected, first at level-0 x={x}, y={y}); the file is "
            f"damaged or incompletely written - re-export or re-scan it"
        )


def plan_slide(reader: SlideReader, options: TileOptions, *, picture_px: int | None = None) -> SlidePlan:
    """Resolve mpp, choose the level, compute the tissue mask and the kept tiles (in store order).

    With ``picture_px``, the same read of the slide also gives :attr:`SlidePlan.picture`, the base
    of a picture of the slide with that long side (pixels): box-averaged to at most twice that size,
    or None when the thumbnail's level is too coarse for it (:func:`read_thumbnails`).

    Raises :class:`ResolutionError` without usable mpp, :class:`SlideError` on dark-field or grayscale
    images and on a read level that lacks image tiles under tissue.
    """
    res = resolve_mpp(reader, options.mpp_override)
    choice = choose_level(
        reader.level_downsamples, res.mpp, options.target_mpp, tolerance=options.level_tolerance
    )
    origin_rule, exact_blocks = read_rule(reader, choice.level)
    grid = make_grid(
        reader.level_dimensions[choice.level],
        reader.level_downsamples[choice.level],
        choice,
        tile_px=options.tile_px,
        overlap_px=options.overlap_px,
        origin_rule=origin_rule,
        exact_blocks=exact_blocks,
    )
    w, h = reader.level_dimensions[thumbnail_level(reader, res.mpp, options.mask_mpp)]
    if w * h >= PRELOAD_MIN_PIXELS:  # the decode releases the GIL: import the mask's libraries meanwhile
        threading.Thread(target=preload_libraries, name="wsi-preload", daemon=True).start()
    targets = [options.mask_mpp]
    if picture_px:
        targets.append(max(reader.dimensions) / picture_px * res.mpp)
    thumb, *rest = read_thumbnails(reader, res.mpp, targets, workers=options.workers)
    assert thumb is not None  # the first target always sets the level
    if not is_brightfield(thumb.image):
        raise SlideError(
            f"{reader.path}: the image is dark (fluorescence or dark-field?); only brightfield H&E "
            f"slides are supported"
        )
    if is_grayscale(thumb.image):
        raise SlideError(
            f"{reader.path}: the image is grayscale (R = G = B everywhere), not RGB; only brightfield "
            f"RGB slides (H&E) are supported"
        )
    mask, pen = tissue_and_pen_masks(thumb.image, mpp=thumb.mpp, params=options.tissue)
    regions, geom = None, None
    if options.regions is not None:  # the tissue inside the pathologist's regions only
        geom = slide_geometry(options.regions, qupath_origin_l0(reader), reader.dimensions)
        mask = mask & region_mask(geom, mask.shape[:2], thumb.downsample)
        lim = options.regions
        regions = {"file": str(lim.path), "sha256": lim.sha256, "format": lim.format,
                   "polygons": lim.polygons, "area_mm2": round(geom.area * res.mpp**2 / 1e6, 4)}  # fmt: skip
    positions = grid.all_positions()
    fractions = tissue_fraction_in_boxes(mask, grid.boxes_l0(positions), thumb.downsample)
    keep = fractions >= options.min_tissue_fraction
    colrow, fractions = positions[keep], fractions[keep]
    check_missing_tiles(reader, choice.level, thumb, grid.boxes_l0(colrow), fractions)
    order = block_order(colrow, options.block_tiles)
    colrow, fractions = colrow[order], fractions[order]
    picture = rest[0] if rest else None
    return SlidePlan(
        res, choice, grid, thumb, mask, colrow, grid.origins_l0(colrow), fractions, picture, int(pen.sum()),
        regions, geom,
    )  # fmt: skip


def require_tissue(plan: SlidePlan, slide_path: str | Path, opts: TileOptions) -> None:
    """Raise :class:`TissueError` (naming the slide and the fix) when the plan has no tile."""
    if opts.regions is not None:
        require_tissue_in_regions(plan.n_tiles, opts.regions, slide_path)
    if plan.n_tiles == 0:
        raise TissueError(
            f"{slide_path}: no tissue tiles (tissue covers {plan.slide_tissue_fraction:.1%} of the "
            f"slide, no tile reaches --min-tissue {opts.min_tissue_fraction}); check the slide is an "
            f"H&E brightfield scan with tissue, or lower --min-tissue"
        )
