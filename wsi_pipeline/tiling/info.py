"""What a slide holds: vendor, levels, mpp and its source, tissue fraction (for ``wsi-infer info``)."""

from __future__ import annotations

import os
from typing import Any

from wsi_pipeline.errors import ResolutionError, SlideError, WsiError
from wsi_pipeline.io.slide import MPP_OVERRIDE_HINT, open_slide, qupath_origin_l0, read_thumbnail, resolve_mpp
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.tissue import tissue_mask

#: Resolution assumed only to size the tissue thumbnail when a slide has no mpp (reported as such).
ASSUMED_MPP_FOR_MASK = 0.5


def slide_info(
    path: str | os.PathLike[str], *, backend: str = "auto", mpp_override: float | None = None
) -> dict[str, Any]:
    """A JSON-ready description of a slide. Missing mpp is reported, not raised."""
    reader = open_slide(path, backend)
    try:
        props = reader.properties
        try:
            res = resolve_mpp(reader, mpp_override)
            resolution: dict[str, Any] = {"mpp_x": res.mpp_x, "mpp_y": res.mpp_y, "source": res.source,
                                          **res.conflict_record()}  # fmt: skip
            mpp0: float | None = res.mpp
        except ResolutionError as exc:
            resolution = {"mpp_x": None, "mpp_y": None, "source": "missing", "hint": MPP_OVERRIDE_HINT,
                          "detail": str(exc)}  # fmt: skip
            mpp0 = None
        levels = [
            {"level": i, "width": w, "height": h, "downsample": d, "mpp": mpp0 * d if mpp0 else None}
            for i, ((w, h), d) in enumerate(
                zip(reader.level_dimensions, reader.level_downsamples, strict=True)
            )
        ]
        objective = props.get("openslide.objective-power") or props.get("tiffslide.objective-power")
        data: dict[str, Any] = {
            "path": str(path),
            "backend": reader.backend,
            "vendor": reader.vendor,
            "width": reader.dimensions[0],
            "height": reader.dimensions[1],
            "objective_power": objective,
            "qupath_origin_l0": list(qupath_origin_l0(reader)),
            "resolution": resolution,
            "levels": levels,
        }
        opts = TileOptions(mpp_override=mpp_override)
        if mpp0 is None:
            thumb = read_thumbnail(reader, ASSUMED_MPP_FOR_MASK, target_mpp=opts.mask_mpp)
            mask = tissue_mask(thumb.image, mpp=thumb.mpp)
            data["tissue"] = {
                "fraction": float(mask.mean()),
                "note": f"mask sized assuming {ASSUMED_MPP_FOR_MASK} um/px",
            }
            return data
        try:  # plan_slide reads the thumbnail once and refuses dark, grayscale or damaged slides
            plan = plan_slide(reader, opts)
        except SlideError as exc:  # readable, but not something the pipeline would score: say why
            data["tissue"] = {"fraction": None, "note": str(exc).split(": ", 1)[-1]}
            return data
        data["tissue"] = {
            "fraction": plan.slide_tissue_fraction,
            "mask_mpp": plan.thumbnail.mpp,
            "pen_marks_mm2": plan.pen_marks_mm2,
        }
        choice = plan.choice
        data["tiling"] = {
            "target_mpp": opts.target_mpp,
            "level": choice.level,
            "level_mpp": choice.level_mpp,
            "resize_scale": choice.scale,
            "effective_mpp": choice.effective_mpp,
            "tile_px": opts.tile_px,
            "tissue_tiles": plan.n_tiles,
        }
        return data
    finally:
        reader.close()


def store_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of a finished tile store (:mod:`wsi_pipeline.io.tilestore`): the slide
    it was cut from, its tiles (count, size in pixels, um/px), stain normalization and tissue."""
    from wsi_pipeline.io.tilestore import open_tile_store

    store = open_tile_store(path)
    m = store.meta
    res, grid, tissue, slide = (
        m.get("resolution", {}),
        m.get("grid", {}),
        m.get("tissue", {}),
        m.get("slide", {}),
    )
    return {
        "path": str(path),
        "kind": "tile store",
        "slide": slide.get("path"),
        "vendor": slide.get("vendor"),
        "slide_size_px": slide.get("dimensions"),
        "tiles": len(store),
        "tile_px": grid.get("tile_px"),
        "overlap_px": grid.get("overlap_px"),
        "effective_mpp": res.get("effective_mpp"),
        "mpp_source": res.get("mpp_source"),
        "normalize": (m.get("params") or {}).get("normalize"),
        "tissue_fraction": tissue.get("slide_tissue_fraction"),
        "pen_marks_mm2": tissue.get("pen_marks_mm2"),
        "finished_at": (m.get("run") or {}).get("finished_at"),
        "package_version": m.get("package_version"),
    }


def batch_info(
    paths: list[Any], *, backend: str = "auto", mpp_override: float | None = None
) -> list[dict[str, Any]]:
    """:func:`slide_info` of each slide of a batch (paths, or items with ``.slide`` and ``.mpp``: a
    CSV's per-slide mpp), a slide that cannot be read described by its error (``error``), not raised."""
    out = []
    for item in paths:
        path = getattr(item, "slide", item)
        mpp = getattr(item, "mpp", None) or mpp_override
        try:
            out.append(slide_info(path, backend=backend, mpp_override=mpp))
        except WsiError as exc:
            out.append({"path": str(path), "error": str(exc)})
    return out
