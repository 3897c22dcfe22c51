"""Score predictions against expert annotations: Dice (the ACDC@LUNGHP metric) and friends.

Two levels, both on the run's tile grid (level-0 pixel coordinates):

* pixel level at the heatmap's resolution (one pixel per grid cell): the annotation is rasterized onto
  the heatmap grid (exact area fraction of every cell), a cell is tumour in truth when at least half of
  it is, and predicted tumour when its probability reaches ``threshold``. Dice, precision, recall
  (sensitivity), specificity, accuracy and F1 are computed over every cell of the slide;
* tile level over the scored tiles: truth = tile at least half covered by tumour, AUC threshold-free.

The metrics themselves are :mod:`wsi_pipeline.evaluation.metrics`; a ratio with nothing to divide by
(Dice, precision, recall of a slide with no tumour in truth and none predicted) is undefined: ``null``
in the results and left out of the means across slides, whose ``n`` says how many slides they cover.

Pure functions over arrays, plus readers for run manifests and tile tables at the edges.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import AnnotationError, WsiError
from wsi_pipeline.evaluation.annotations import Annotations, GroupMapping, read_annotations
from wsi_pipeline.evaluation.metrics import binary_metrics, is_undefined, roc_auc
from wsi_pipeline.provenance import strict_json

ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


def box_coverage(geom: Any, boxes: np.ndarray) -> np.ndarray:
    """Fraction of each (x0, y0, x1, y1) box covered by ``geom`` (same units), float64 (N,)."""
    import shapely

    b = np.asarray(boxes, np.float64)
    if len(b) == 0 or geom is None or geom.is_empty:
        return np.zeros(len(b))
    polys = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    shapely.prepare(geom)  # in place: speeds up the many intersections below
    inter = shapely.area(shapely.intersection(polys, geom))
    return np.clip(inter / shapely.area(polys), 0.0, 1.0)


def rasterize_fraction(
    geom: Any, shape: tuple[int, int], cell_l0: float, origin_l0: float = 0.0
) -> np.ndarray:
    """Exact area fraction of each cell of a (rows, cols) grid covered by ``geom`` (level-0 px).

    Cell (r, c) covers level-0 x in [origin + c * cell_l0, origin + (c + 1) * cell_l0), same for y.
    Only cells whose box touches the geometry's bounding box are intersected, so sparse annotations
    are cheap.
    """
    rows, cols = shape
    out = np.zeros((rows, cols), np.float64)
    if geom is None or geom.is_empty:
        return out
    x0, y0, x1, y1 = (v - origin_l0 for v in geom.bounds)
    c0, c1 = max(0, int(x0 // cell_l0)), min(cols, math.ceil(x1 / cell_l0))
    r0, r1 = max(0, int(y0 // cell_l0)), min(rows, math.ceil(y1 / cell_l0))
    if c1 <= c0 or r1 <= r0:
        return out
    rr, cc = np.mgrid[r0:r1, c0:c1]
    boxes = np.stack([cc.ravel(), rr.ravel(), cc.ravel() + 1, rr.ravel() + 1], axis=1) * cell_l0 + origin_l0
    out[r0:r1, c0:c1] = box_coverage(geom, boxes).reshape(r1 - r0, c1 - c0)
    return out


def evaluate_grid(
    prob_canvas: np.ndarray,
    truth_fraction: np.ndarray,
    *,
    threshold: float = 0.5,
    truth_min_fraction: float = 0.5,
) -> dict[str, Any]:
    """Pixel-level metrics on the heatmap grid. Unscored cells (NaN) are predicted non-tumour."""
    pred = np.nan_to_num(prob_canvas, nan=0.0) >= threshold
    truth = truth_fraction >= truth_min_fraction
    return binary_metrics(pred, truth)


def _read_tiles(csv_path: Path) -> dict[str, np.ndarray]:
    try:
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise WsiError(f"{csv_path}: cannot read the tile table ({exc}); re-run the slide") from exc
    if not rows:
        return {}
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


def load_run(manifest_path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(manifest_path)
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise WsiError(f"{p}: not a readable run manifest ({exc}); re-run the slide") from exc
    if m.get("status") != "complete":
        raise WsiError(f"{p}: the run did not finish; re-run the slide")
    return dict(m)


def evaluate_slide(
    manifest_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str] | None,
    *,
    threshold: float = 0.5,
    truth_min_fraction: float = 0.5,
    mapping: GroupMapping | None = None,
) -> dict[str, Any]:
    """Metrics of one finished run against its annotation file (None = annotated as no tumour)."""
    m = load_run(manifest_path)
    pos = m["model"]["positive_class"]
    # Outputs lie beside the manifest that names them: resolve there, not where the run was made, so a
    # moved or copied results folder reads its own tile table.
    tiles = _read_tiles(Path(manifest_path).parent / Path(m["outputs"]["tiles_csv"]).name)
    ann: Annotations | None = read_annotations(annotation_path, mapping) if annotation_path else None
    from shapely import MultiPolygon
    from shapely.geometry import box as _box

    cell = float(m["heatmap"]["cell_l0_px"])
    origin = float(m["heatmap"].get("origin_l0", 0.0))  # the cell is centred on its tile (overlap)
    rows, cols = (int(v) for v in m["heatmap"]["shape"])
    annotated = ann.tumour if ann is not None else MultiPolygon()
    # Truth is what lies on the slide (the heatmap canvas): the same clipped geometry decides the pixel
    # metrics and the slide-level truth, and what was cut off is reported.
    on_slide = _box(0, 0, origin + cols * cell, origin + rows * cell)
    tumour = annotated.intersection(on_slide) if not annotated.is_empty else annotated
    outside = float(annotated.area - tumour.area) / annotated.area if annotated.area > 0 else 0.0
    grid_cols, grid_rows = int(m["grid"]["cols"]), int(m["grid"]["rows"])
    canvas = np.full((rows, cols), np.nan)
    p = tiles.get(f"p_{pos}", np.zeros(0))
    if len(p):
        cr = np.stack([tiles["col"], tiles["row"]], axis=1).astype(np.int64)
        canvas[cr[:, 1], cr[:, 0]] = p
    truth_frac = rasterize_fraction(tumour, (rows, cols), cell, origin)
    pixel = evaluate_grid(canvas, truth_frac, threshold=threshold, truth_min_fraction=truth_min_fraction)
    # Tile level: the scored tiles only.
    if len(p):
        w = tiles["width_l0"]
        boxes = np.stack([tiles["x_l0"], tiles["y_l0"], tiles["x_l0"] + w, tiles["y_l0"] + w], axis=1)
        tile_truth = box_coverage(tumour, boxes) >= truth_min_fraction
        tile = binary_metrics(p >= threshold, tile_truth)
        tile_auc = roc_auc(tile_truth, p)
    else:
        tile, tile_auc, tile_truth = binary_metrics(np.zeros(0), np.zeros(0)), math.nan, np.zeros(0, bool)
    truth_positive = bool(tumour.area > 0)
    predicted_positive = bool(m["label"]["positive"])
    area_mpp = float(m["resolution"]["mpp_x"]) if m.get("resolution") else None
    return strict_json({  # undefined metrics (nan) are null, as they are written
        "slide": m["slide"],
        "manifest": str(manifest_path),
        "annotation": str(annotation_path) if annotation_path else None,
        "threshold": threshold,
        "truth_min_fraction": truth_min_fraction,
        **{k: pixel[k] for k in ("dice", "precision", "recall", "specificity", "accuracy", "f1")},
        "pixel_counts": {k: pixel[k] for k in ("tp", "fp", "fn", "tn")},
        "grid": {"rows": rows, "cols": cols, "scored_rows": grid_rows, "scored_cols": grid_cols,
                 "cell_l0_px": cell},
        "tile": {**tile, "auc": tile_auc, "n": len(p), "n_truth_positive": int(tile_truth.sum())},
        "auc": tile_auc,
        "truth_area_mm2": round(tumour.area * (area_mpp or 0) ** 2 / 1e6, 5) if area_mpp else None,
        "annotation_groups": ann.groups if ann else {},
        "annotation_repaired": ann.repaired if ann else 0,
        "annotation_outside_slide_fraction": round(outside, 4),
        "warnings": (
            [f"{round(100 * outside, 1)} % of the annotated tumour lies outside the slide and is not counted"]
            if outside > 1e-6
            else []
        ),
        "slide_truth_positive": truth_positive,
        "slide_predicted_positive": predicted_positive,
        "slide_label_correct": truth_positive == predicted_positive,
    })  # fmt: skip


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd across slides of every metric, and slide-level label accuracy.

    A metric undefined for a slide (null) is left out of its mean; ``n`` counts the slides averaged.
    """
    keys = ("dice", "precision", "recall", "specificity", "accuracy", "f1", "auc")
    out: dict[str, Any] = {"n_slides": len(results)}
    for k in keys:
        vals = np.array([r[k] for r in results if not is_undefined(r.get(k))], np.float64)
        out[k] = {
            "mean": round(float(vals.mean()), 4) if len(vals) else None,
            "sd": round(float(vals.std(ddof=1)), 4) if len(vals) > 1 else None,
            "n": len(vals),
        }
    correct = [bool(r["slide_label_correct"]) for r in results]
    out["slide_label_accuracy"] = round(sum(correct) / len(correct), 4) if correct else None
    return out


def find_runs(results: Path) -> list[Path]:
    """Run manifests: the file itself, or every ``*.run.json`` in a folder."""
    if results.is_file():
        return [results]
    if results.is_dir():
        return sorted(results.glob("*.run.json"))
    raise WsiError(f"{results}: no such run manifest or results folder")


def _slide_stem(manifest: dict[str, Any]) -> str:
    stem = Path(manifest["slide"]).stem
    return stem[: -len(".zarr")] if stem.endswith(".zarr") else stem


def match_annotation(
    manifest: dict[str, Any], annotations: Path, *, explicit_pair: bool = False
) -> Path | None:
    """The annotation file for a run, matched by name: ``<slide stem>.<ext>`` in the ``annotations``
    folder, or ``annotations`` itself when it is a file of that stem. ``explicit_pair``: the user named
    one run manifest and one annotation file, so the file is that run's whatever its name."""
    stem = _slide_stem(manifest)
    if annotations.is_file():
        ann_stem = annotations.name[: -len(annotations.suffix)] if annotations.suffix else annotations.name
        return annotations if explicit_pair or ann_stem == stem else None
    for suffix in ANNOTATION_SUFFIXES:
        cand = annotations / f"{stem}{suffix}"
        if cand.exists():
            return cand
    return None


def evaluate_runs(
    results: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    truth_min_fraction: float = 0.5,
    mapping: GroupMapping | None = None,
) -> dict[str, Any]:
    """Evaluate every run in ``results`` against the matching file in ``annotations``.

    Runs without an annotation file are listed under ``unannotated`` (not scored, not dropped
    silently); unreadable annotation files under ``errors``.
    """
    ann_p = Path(annotations)
    if not ann_p.exists():
        raise AnnotationError(f"{ann_p}: no such annotation file or folder")
    per: list[dict[str, Any]] = []
    unannotated: list[str] = []
    errors: list[dict[str, str]] = []
    runs = find_runs(Path(results))
    if not runs:
        raise WsiError(
            f"{results}: no run manifests (*.run.json) found; point it at a results folder or manifest"
        )
    explicit_pair = Path(results).is_file() and ann_p.is_file()
    for run in runs:
        m = load_run(run)
        a = match_annotation(m, ann_p, explicit_pair=explicit_pair)
        if a is None:
            unannotated.append(m["slide"])
            continue
        try:
            per.append(evaluate_slide(run, a, threshold=threshold, truth_min_fraction=truth_min_fraction,
                                      mapping=mapping))  # fmt: skip
        except AnnotationError as exc:
            errors.append({"slide": m["slide"], "error": str(exc)})
    if not per and not errors:
        where = (
            f"the file {ann_p.name} matches none of them by name"
            if ann_p.is_file()
            else f"no <slide stem>{'/'.join(ANNOTATION_SUFFIXES)} file for any of them in {ann_p}"
        )
        raise AnnotationError(
            f"{ann_p}: no annotation for the {len(runs)} run(s) in {results} ({where}; slides: "
            f"{', '.join(sorted(Path(s).name for s in unannotated)[:5])}); name each file after its slide"
        )
    return {"summary": summarize(per), "slides": per, "unannotated": unannotated, "errors": errors}
