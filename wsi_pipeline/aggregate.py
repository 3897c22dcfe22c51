"""Tile scores -> slide-level results: heatmap grid, tumour regions, slide label with evidence.

Pure functions over numpy arrays. Areas in mm^2, coordinates in level-0 pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from wsi_pipeline.errors import UsageError


@dataclass(frozen=True)
class LabelRule:
    """How a slide is called positive.

    ``rule="area"``: positive when the tissue area of tiles with P(positive) >= ``tile_threshold``
    reaches ``min_area_mm2``. ``rule="topk"``: positive when the mean of the ``top_k`` highest tile
    probabilities reaches ``topk_threshold``.
    """

    rule: str = "area"
    tile_threshold: float | None = None  # None: the model card's threshold (``with_threshold``)
    min_area_mm2: float = 0.1
    top_k: int = 5
    topk_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in ("area", "topk"):
            raise UsageError(f"label rule must be 'area' or 'topk', not {self.rule!r}")
        for name, p in (("tile threshold", self.tile_threshold), ("top-k threshold", self.topk_threshold)):
            if p is not None and not 0.0 <= p <= 1.0:
                raise UsageError(f"{name} must be a probability within 0-1, not {p}")
        if self.min_area_mm2 < 0 or self.top_k < 1:
            raise UsageError(
                f"min area must be >= 0 mm^2 and top-k >= 1, not {self.min_area_mm2}, {self.top_k}"
            )

    def with_threshold(self, threshold: float) -> LabelRule:
        """This rule with unset thresholds taken from ``threshold`` (the model card's)."""
        return replace(
            self,
            tile_threshold=threshold if self.tile_threshold is None else self.tile_threshold,
            topk_threshold=threshold if self.topk_threshold is None else self.topk_threshold,
        )

    @property
    def tile_p(self) -> float:
        return 0.5 if self.tile_threshold is None else self.tile_threshold

    @property
    def topk_p(self) -> float:
        return 0.5 if self.topk_threshold is None else self.topk_threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heatmap_grid(colrow: np.ndarray, values: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """(rows, cols) float32 grid with ``values`` at (col, row); NaN where no tile was scored."""
    grid = np.full((rows, cols), np.nan, np.float32)
    if len(colrow):
        grid[colrow[:, 1], colrow[:, 0]] = values
    return grid


def tile_area_mm2(stride_l0_px: float, mpp_l0: float) -> float:
    """Area one grid cell represents, mm^2 (cells do not overlap even when tiles do)."""
    return float((stride_l0_px * mpp_l0 / 1000.0) ** 2)


def area_share(positive_mm2: float, tissue_mm2: float) -> float:
    """The positive tiles' tissue area as a share (0-1) of all the tissue scored; 0 without tissue.
    An area share, not a count of tumour cells (tumour cellularity)."""
    return positive_mm2 / tissue_mm2 if tissue_mm2 > 0 else 0.0


def slide_label(
    probs_pos: np.ndarray,
    coords_l0: np.ndarray,
    tissue_fraction: np.ndarray,
    *,
    cell_area_mm2: float,
    rule: LabelRule,
    positive_name: str = "tumour",
    n_top: int = 10,
) -> dict[str, Any]:
    """The slide's label and the evidence behind it (JSON-ready)."""
    p = np.asarray(probs_pos, np.float64)
    positive = p >= rule.tile_p
    area = float((tissue_fraction[positive] * cell_area_mm2).sum()) if len(p) else 0.0
    order = np.argsort(-p, kind="stable")
    k = min(rule.top_k, len(p))
    topk_mean = float(p[order[:k]].mean()) if k else 0.0
    is_pos = area >= rule.min_area_mm2 if rule.rule == "area" else topk_mean >= rule.topk_p
    tissue = float(tissue_fraction.sum() * cell_area_mm2)
    top = [
        {
            "rank": i + 1,
            "x_l0": int(coords_l0[j, 0]),
            "y_l0": int(coords_l0[j, 1]),
            "p": round(float(p[j]), 4),
        }
        for i, j in enumerate(order[:n_top])
    ]
    return {
        "label": positive_name if is_pos else f"no {positive_name}",
        "positive": bool(is_pos),
        "rule": rule.to_dict(),
        "evidence": {
            f"{positive_name}_area_mm2": round(area, 4),
            f"{positive_name}_tiles": int(positive.sum()),
            "tiles": len(p),
            "tissue_area_mm2": round(tissue, 4),
            f"{positive_name}_share_of_tissue": round(area_share(area, tissue), 4),
            "max_p": round(float(p.max()), 4) if len(p) else 0.0,
            "topk_mean_p": round(topk_mean, 4),
            "top_tiles": top,
        },
    }


def region_stats(
    regions: Any, boxes_l0: np.ndarray, p_pos: np.ndarray, positive: np.ndarray
) -> list[dict[str, Any]]:
    """Per polygon of ``regions`` (level-0 px, in its order): ``area_px2``, the positive tiles whose
    centre lies in it (``tiles``, ``mean_p``, ``max_p``; None without any), ``centre_l0`` (centroid),
    ``bbox_l0`` (x0, y0, x1, y1) and ``length_px``, its longest dimension (the largest distance between
    two points of its outline: the maximum Feret diameter)."""
    import shapely

    geoms = list(getattr(regions, "geoms", [regions])) if regions is not None and not regions.is_empty else []
    if not geoms:
        return []
    b = np.asarray(boxes_l0, float)[np.asarray(positive, bool)]
    p = np.asarray(p_pos, float)[np.asarray(positive, bool)]
    owner = np.full(len(b), -1, np.int64)
    if len(b):
        pts = shapely.points((b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2)
        pt_idx, geom_idx = shapely.STRtree(geoms).query(pts, predicate="within")
        owner[pt_idx] = geom_idx
    out = []
    for i, g in enumerate(geoms):
        sel = p[owner == i]
        hull = np.asarray(shapely.get_coordinates(g.convex_hull), float)
        d2 = ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1) if len(hull) else np.zeros(1)
        length = float(np.sqrt(d2.max()))
        c = g.centroid
        out.append({
            "area_px2": float(g.area),
            "tiles": len(sel),
            "mean_p": float(sel.mean()) if len(sel) else None,
            "max_p": float(sel.max()) if len(sel) else None,
            "centre_l0": [float(c.x), float(c.y)],
            "bbox_l0": [float(v) for v in g.bounds],
            "length_px": length,
        })  # fmt: skip
    return out


def region_evidence(stats: list[dict[str, Any]], mpp_l0: float, n_max: int = 20) -> dict[str, Any]:
    """The tumour regions for the label's evidence (JSON-ready): their count, the largest one's area
    (mm^2, the outline of its tiles), the greatest dimension of any (mm), and the ``n_max`` largest,
    biggest first, with level-0 centre and bounding box to find them in a viewer."""
    mm = mpp_l0 / 1000.0
    ranked = sorted(stats, key=lambda r: (-r["area_px2"], -r["length_px"]))
    rows = [
        {
            "rank": i + 1,
            "area_mm2": round(r["area_px2"] * mm * mm, 4),
            "length_mm": round(r["length_px"] * mm, 3),
            "tiles": r["tiles"],
            "mean_p": None if r["mean_p"] is None else round(r["mean_p"], 4),
            "max_p": None if r["max_p"] is None else round(r["max_p"], 4),
            "centre_l0": [round(v) for v in r["centre_l0"]],
            "bbox_l0": [round(v) for v in r["bbox_l0"]],
        }
        for i, r in enumerate(ranked[:n_max])
    ]
    return {
        "count": len(stats),
        "largest_area_mm2": rows[0]["area_mm2"] if rows else 0.0,
        "greatest_dimension_mm": round(max((r["length_px"] for r in stats), default=0.0) * mm, 3),
        "largest": rows,
    }


def stain_summary(normalized: bool, model_normalizes: bool) -> dict[str, Any] | None:
    """Whether the tiles were stain-normalized as the model expects (``None`` when neither the run nor
    the model normalizes). A model trained on raw colours (``model_normalizes`` False) scoring
    normalized tiles gets a warning: normalization moves its scores away from those its threshold was
    chosen on (the shipped model's card measures by how much: "stain far from training")."""
    if not normalized and not model_normalizes:
        return None
    warn = normalized and not model_normalizes
    return {
        "normalized": normalized,
        "model_expects_normalized": model_normalizes,
        "warning": (
            "tiles were stain-normalized (--normalize macenko) for a model trained on raw colours: its "
            "scores move away from those its threshold was chosen on (see its card's known defects), so "
            "its label is unreliable either way (a 'no tumour' is not a negative result); score the slide "
            "again without --normalize"
        )
        if warn
        else None,
    }


def ood_summary(distances: np.ndarray | None, d_ref: float, warn_above: float = 1.0) -> dict[str, Any] | None:
    """Slide out-of-distribution score: median tile distance / ``d_ref`` (see ``models/ood.py``).

    ``d_ref`` is the 99th percentile of held-out in-distribution tile distances and ``warn_above``
    (from the model card) the 95th percentile of this score over held-out groups of tiles, so a slide
    above it looks less like the training data than 95 % of held-out groups: the model may not know
    this kind of tissue, stain or scanner.
    """
    if distances is None or not d_ref > 0:
        return None
    d = np.asarray(distances, np.float64)
    score = float(np.median(d) / d_ref) if d.size else float("nan")
    warn = bool(d.size) and score > warn_above
    return {
        "score": round(score, 3),
        "warn_above": warn_above,
        "tiles_beyond_ref": round(float((d > d_ref).mean()), 4) if d.size else 0.0,
        "d_ref": d_ref,
        "warning": (
            f"slide looks unlike the model's training data (OOD score {score:.2f} > {warn_above:g}): "
            "its label is unreliable either way (a 'no tumour' is not a negative result); review by eye"
        )
        if warn
        else None,
    }


def pen_evidence(
    near: np.ndarray, positive: np.ndarray, *, positive_name: str, reach_um: float
) -> dict[str, Any]:
    """The label's evidence about marker-pen ink: scored tiles within ``reach_um`` of it (``near``, bool
    (N,)), how many of them are positive, and a warning when every positive tile is among them (the
    call may then be the ink's: ink over tissue is scored as it looks)."""
    near, positive = np.asarray(near, bool), np.asarray(positive, bool)
    n_pos, n_pos_near = int(positive.sum()), int((near & positive).sum())
    warning = (
        f"every {positive_name} tile lies beside pen ink: the {positive_name} call may be the ink's, not "
        "the tissue's; review those tiles by eye"
    )
    return {
        "reach_um": reach_um,
        "tiles_near_ink": int(near.sum()),
        "positive_tiles_near_ink": n_pos_near,
        "positive_tiles": n_pos,
        "warning": warning if n_pos and n_pos_near == n_pos else None,
    }


def mask_regions(mask: np.ndarray, downsample: float) -> Any:
    """A bool mask (pixels of ``downsample`` level-0 px) as a shapely (Multi)Polygon in level-0 px:
    the union of its row runs, so its outline follows the pixel edges and holes are kept."""
    from shapely import MultiPolygon, box, union_all

    m = np.asarray(mask, bool)
    if not m.any():
        return MultiPolygon()
    padded = np.zeros((m.shape[0], m.shape[1] + 2), np.int8)
    padded[:, 1:-1] = m
    edges = np.diff(padded, axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # same row order as the starts: one end per start
    return union_all(box(starts * downsample, rows * downsample, ends * downsample, (rows + 1) * downsample))


def tumour_regions(boxes_l0: np.ndarray, positive: np.ndarray) -> Any:
    """Union of the positive tiles' boxes (level-0 px) as a shapely (Multi)Polygon (holes kept)."""
    from shapely import box, union_all

    sel = np.asarray(boxes_l0)[np.asarray(positive, bool)]
    if len(sel) == 0:
        from shapely import MultiPolygon

        return MultiPolygon()
    return union_all(box(sel[:, 0], sel[:, 1], sel[:, 2], sel[:, 3]))
