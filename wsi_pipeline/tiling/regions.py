"""Regions of interest: score only inside polygons a pathologist drew (``--regions``).

A region file is an annotation file of the formats ``evaluate`` reads (ASAP XML, Aperio ImageScope
XML, QuPath GeoJSON). Every polygon is in the region except those of an exclusion group
(:data:`ROI_EXCLUSION_GROUPS`, and ImageScope negative regions), which are cut out of it. Polygons are
in level-0 pixels: ASAP and ImageScope in OpenSlide's frame, QuPath's GeoJSON in QuPath's, which
starts at the slide's scanned rectangle on MIRAX and Leica slides (moved back here, as ``evaluate``
does). The tissue mask is limited to the regions, so a tile is kept when enough of it is tissue
inside them (``--min-tissue``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import AnnotationError, TissueError, UsageError

#: groups cut out of a region (case-insensitive): ASAP's ``_2``, QuPath's ``Ignore*``, and the plain words
ROI_EXCLUSION_GROUPS: frozenset[str] = frozenset(
    {"_2", "exclusion", "exclude", "excluded", "ignore", "ignore*"}
)

#: suffixes of a region file looked up by a slide's stem in a folder, in this order
REGION_SUFFIXES = (".geojson", ".json", ".xml")


@dataclass(frozen=True)
class RegionLimit:
    """The regions of one slide, read from ``path`` (level-0 px, in the frame of its ``format``)."""

    path: Path
    sha256: str
    format: str  # "asap", "imagescope" or "geojson"
    polygons: int
    geometry: Any = field(compare=False, repr=False)  # shapely (Multi)Polygon

    def params(self) -> dict[str, Any]:
        """What a resumed or re-run slide must share: the same file content."""
        return {"regions_sha256": self.sha256}


def read_regions(path: str | os.PathLike[str]) -> RegionLimit:
    """The regions of ``path``. Raises :class:`AnnotationError` (exit 9) for an unreadable file and for
    one with no area in it (points and lines only, or everything excluded)."""
    from wsi_pipeline.evaluation.annotations import GroupMapping, read_annotations
    from wsi_pipeline.provenance import file_sha256

    p = Path(path)
    if not p.is_file():
        raise AnnotationError(f"{p}: no such region file; give an ASAP/ImageScope XML or QuPath GeoJSON file")
    ann = read_annotations(p, GroupMapping(positive=None, exclusion=ROI_EXCLUSION_GROUPS))
    geometry = ann.tumour  # every group but the exclusions, minus the exclusions
    if geometry.is_empty or geometry.area <= 0:
        raise AnnotationError(
            f"{p}: holds no region to score (no polygon outside the exclusion groups "
            f"{', '.join(sorted(ROI_EXCLUSION_GROUPS))}); draw the regions as areas (polygons, "
            "rectangles), or leave out --regions to score all the tissue"
        )
    polygons = sum(n for g, n in ann.groups.items() if g.strip().lower() not in ROI_EXCLUSION_GROUPS)
    return RegionLimit(p, file_sha256(p), ann.format, polygons, geometry)


def regions_for(slide: Path, where: Path) -> RegionLimit:
    """The region file of ``slide``: ``where`` itself when it is a file, else the file in the folder
    ``where`` named after the slide's stem (``STEM.geojson``, ``.json`` or ``.xml``)."""
    if not where.is_dir():
        return read_regions(where)
    stem = slide.stem if slide.suffix else slide.name
    for suffix in REGION_SUFFIXES:
        candidate = where / f"{stem}{suffix}"
        if candidate.is_file():
            return read_regions(candidate)
    raise AnnotationError(
        f"{slide}: no region file for it in {where} (looked for {stem}{'|'.join(REGION_SUFFIXES)}); "
        "add one, or run this slide without --regions"
    )


def slide_geometry(limit: RegionLimit, qupath_origin_l0: tuple[int, int], size_l0: tuple[int, int]) -> Any:
    """The regions in OpenSlide's level-0 frame, cut to the slide. Raises :class:`AnnotationError`
    when none of them lies on the slide (a file meant for another slide, or in another frame)."""
    from shapely import affinity, box

    geom = limit.geometry
    if limit.format == "geojson" and any(qupath_origin_l0):
        geom = affinity.translate(geom, xoff=qupath_origin_l0[0], yoff=qupath_origin_l0[1])
    on_slide = geom.intersection(box(0, 0, *size_l0))
    if on_slide.is_empty or on_slide.area <= 0:
        x0, y0, x1, y1 = (round(v) for v in geom.bounds)
        raise AnnotationError(
            f"{limit.path}: its regions (level-0 x {x0}-{x1}, y {y0}-{y1}) lie outside the slide "
            f"({size_l0[0]} x {size_l0[1]} px); is it this slide's file?"
        )
    return on_slide


def region_mask(geometry: Any, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Boolean mask ``shape`` (rows, cols) of a thumbnail ``downsample`` level-0 px per pixel: True
    where the pixel's centre lies inside ``geometry`` (level-0 px; holes cut out)."""
    from skimage.draw import polygon

    mask = np.zeros(shape, bool)

    def fill(coords: Any, value: bool) -> None:
        xy = (
            np.asarray(coords, np.float64) / downsample - 0.5
        )  # pixel (r, c) has its centre at (c + .5, r + .5)
        rr, cc = polygon(xy[:, 1], xy[:, 0], shape)
        mask[rr, cc] = value

    for poly in getattr(geometry, "geoms", [geometry]):
        if poly.is_empty or not hasattr(poly, "exterior"):
            continue
        fill(poly.exterior.coords, True)
        for hole in poly.interiors:
            fill(hole.coords, False)
    return mask


def require_tissue_in_regions(n_tiles: int, limit: RegionLimit, slide: str | Path) -> None:
    """Raise :class:`TissueError` (exit 5) when no tile is left inside the regions."""
    if n_tiles == 0:
        raise TissueError(
            f"{slide}: no tissue tiles inside the regions of {limit.path} ({limit.polygons} polygon(s)); "
            "check the file is this slide's, or lower --min-tissue"
        )


def check_batch_regions(where: Path | None) -> None:
    """Raise :class:`UsageError` unless ``--regions`` of a folder run is absent or a folder (each slide
    needs its own file)."""
    if where is not None and not where.is_dir():
        raise UsageError(
            f"--regions {where}: a folder run needs a folder of region files named after its slides "
            "(STEM.geojson, .json or .xml), not one file"
        )


def with_regions(
    tile: Any, slide: Path, where: Path | None, *, batch: bool = False, own: Path | None = None
) -> Any:
    """``tile`` (TileOptions) limited to ``slide``'s regions: its ``own`` file (a CSV manifest's
    ``regions`` cell) if given, else from ``--regions where`` (unchanged without either). Raises
    :class:`UsageError` for a region file given to a folder run (whose slides each need their own)
    or to a finished tile store (tiled already), and :class:`AnnotationError` for a missing or
    unreadable file (that slide fails; a folder run goes on)."""
    if own is not None:  # the slide's own file, from a CSV manifest's regions column
        where, batch = own, False
    if where is None:
        return tile
    if batch:
        check_batch_regions(where)
    if slide.suffix == ".zarr":
        raise UsageError(
            f"--regions: {slide} is a finished tile store, its tiles chosen when it was made; give the "
            "slide itself, or make the store with `wsi-infer tile --regions`"
        )
    return replace(tile, regions=regions_for(slide, where))
