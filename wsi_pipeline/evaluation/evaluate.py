"""Score predictions against expert annotations: Dice (the ACDC@LUNGHP metric) and friends.

The prediction of a run is the union of its heatmap cells called tumour (P >= ``threshold``), each
cell the stride square centred on its tile (level-0 px: cell (r, c) covers x in
[origin + c * cell, origin + (c + 1) * cell), from the manifest's ``heatmap`` record; see
``TileGrid.cell_origin_l0``); unscored area is predicted non-tumour. Three levels:

* **area-exact** (the headline ``dice``, ``precision``, ``recall``): true positive, false positive
  and false negative are areas of the annotation polygons against the predicted cells, computed
  exactly with shapely; the truth is not rounded to cells;
* **cell** (``cell_dice`` and the ``cell`` record): the annotation rasterized onto the heatmap grid
  (exact area fraction of every cell), a cell tumour in truth when at least ``truth_min_fraction`` of
  it is; Dice, precision, recall, specificity, accuracy and F1 over every cell of the canvas. It
  rounds the truth to cells, so it flatters a prediction made of cells: kept as a second figure;
* **tile** over the scored tiles: truth = tile at least ``truth_min_fraction`` covered, AUC.

A slide with no tumour in truth (none annotated, or only outside the slide) is *benign*: it is
reported by its false-positive area and slide label, and left out of the means of Dice, precision
and recall across slides (:func:`summarize`). The metrics are :mod:`wsi_pipeline.evaluation.metrics`;
a ratio with nothing to divide by is undefined: ``null`` in the results and left out of the means,
whose ``n`` says how many slides they cover.

Pure functions over arrays, plus readers for run manifests and tile tables at the edges.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import AnnotationError, WsiError
from wsi_pipeline.evaluation.annotations import Annotations, GroupMapping, read_annotations
from wsi_pipeline.evaluation.metrics import (
    binary_metrics,
    lesion_detection,
    overlap_ratios,
    roc_auc,
)
from wsi_pipeline.evaluation.summary import summarize
from wsi_pipeline.provenance import model_name, strict_json

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
    """Cell-level metrics on the heatmap grid. Unscored cells (NaN) are predicted non-tumour."""
    pred = np.nan_to_num(prob_canvas, nan=0.0) >= threshold
    truth = truth_fraction >= truth_min_fraction
    return binary_metrics(pred, truth)


def area_overlap(
    pred: np.ndarray, truth_fraction: np.ndarray, truth_area: float, cell_l0_px: float
) -> dict[str, float]:
    """Exact areas (level-0 px^2) of the predicted cells against the annotated tumour.

    ``pred``: (rows, cols) bool, the cells called tumour; ``truth_fraction``: the exact fraction of
    each cell covered by the tumour (:func:`rasterize_fraction`); ``truth_area``: the tumour's whole
    area (level-0 px^2, also what lies in no cell). The cells are disjoint squares of ``cell_l0_px``,
    so the tumour inside the predicted union is the sum of their covered areas. Returns ``truth``,
    ``predicted``, ``tp``, ``fp``, ``fn``.
    """
    cell_area = float(cell_l0_px) ** 2
    p = np.asarray(pred, bool)
    tp = float(np.asarray(truth_fraction, np.float64)[p].sum()) * cell_area
    predicted = float(np.count_nonzero(p)) * cell_area
    tp = min(tp, predicted, float(truth_area))  # float sums may overshoot by ulps
    return {"truth": float(truth_area), "predicted": predicted, "tp": tp,
            "fp": max(predicted - tp, 0.0), "fn": max(float(truth_area) - tp, 0.0)}  # fmt: skip


def _read_tiles(csv_path: Path) -> dict[str, np.ndarray]:
    try:
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise WsiError(f"{csv_path}: cannot read the tile table ({exc}); re-run the slide") from exc
    if not rows:
        return {}
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


class NotARunManifest(WsiError, ValueError):
    """A ``*.run.json`` file that this package did not write (no ``slide`` and ``status``)."""


def load_run(manifest_path: str | os.PathLike[str]) -> dict[str, Any]:
    """A finished run's manifest. Raises :class:`NotARunManifest` for a JSON file this package did not
    write, :class:`WsiError` for an unreadable or unfinished one."""
    p = Path(manifest_path)
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise WsiError(f"{p}: not a readable run manifest ({exc}); re-run the slide") from exc
    if not isinstance(m, dict) or "slide" not in m or "status" not in m:
        raise NotARunManifest(f"{p}: not a wsi-pipeline run manifest (it has no slide and status)")
    if m.get("status") != "complete":
        raise WsiError(f"{p}: the run did not finish; re-run the slide")
    return dict(m)


def _mm2(area_l0_px2: float, mpp: tuple[float, float] | None) -> float | None:
    return round(area_l0_px2 * mpp[0] * mpp[1] / 1e6, 6) if mpp else None


def _annotated_l0(m: dict[str, Any], ann: Annotations | None) -> tuple[Any, list[int]]:
    """The annotated tumour in OpenSlide's level-0 pixels, and the offset that took it there: QuPath
    counts from the slide's scanned rectangle where it crops one (MIRAX, Leica), so its GeoJSON is moved
    back by the run's ``qupath_origin_l0``; ASAP and ImageScope XML are level 0 already."""
    from shapely import MultiPolygon

    if ann is None:
        return MultiPolygon(), [0, 0]
    origin = [int(v) for v in m.get("qupath_origin_l0") or (0, 0)] if ann.format == "geojson" else [0, 0]
    if not any(origin):
        return ann.tumour, origin
    from shapely import affinity

    return affinity.translate(ann.tumour, xoff=origin[0], yoff=origin[1]), origin


#: colour of the expert's outlines on the evaluation pictures: cyan, which neither H&E nor the P(tumour)
#: ramp has (the model's regions are black)
TRUTH_RGB = (0, 230, 255)


def truth_picture(
    manifest_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str] | None,
    *,
    mapping: GroupMapping | None = None,
    long_side_px: int = 800,
) -> np.ndarray | None:
    """The run's overlay (P(tumour) over the slide, the model's regions outlined in black, its legend)
    with the annotated tumour outlined in cyan (:data:`TRUTH_RGB`), at most ``long_side_px`` on its
    long side; None when the overlay or its geometry is missing (a run of an older version) or the
    overlay cannot be read."""
    from PIL import Image, ImageDraw

    from wsi_pipeline.io.outputs import draw_outlines

    m = load_run(manifest_path)
    geometry = (m.get("heatmap") or {}).get("overlay") or {}
    png = Path(manifest_path).parent / Path(m["outputs"].get("overlay", "")).name
    if not geometry.get("l0_per_px") or not png.is_file():
        return None
    ann = read_annotations(annotation_path, mapping) if annotation_path else None
    annotated, _ = _annotated_l0(m, ann)
    try:
        with Image.open(png) as im:
            img = im.convert("RGB")
    except (OSError, ValueError):  # a damaged overlay: the page shows the metrics without it
        return None
    l0_per_px = float(geometry["l0_per_px"])
    x0, y0 = (float(v) for v in geometry.get("origin_l0") or (0.0, 0.0))  # a picture of the tissue only
    w, h = (int(v) for v in geometry.get("slide_px") or img.size)
    draw = ImageDraw.Draw(img)
    line_w = max(3, round(max(w, h) / 250))  # still visible once the picture is shrunk for the page
    draw_outlines(draw, annotated, l0_per_px=l0_per_px, origin_l0=(x0, y0), fill=TRUTH_RGB, width=line_w)
    img.thumbnail((long_side_px, long_side_px), Image.Resampling.LANCZOS)
    return np.asarray(img)


@dataclass
class SlideCase:
    """One finished run and its annotation, read once: what every threshold is scored on."""

    manifest_path: Path
    annotation_path: Path | None
    m: dict[str, Any]
    ann: Annotations | None
    ann_origin: list[int]
    tiles: dict[str, np.ndarray]
    canvas: np.ndarray  # (rows, cols) P(positive) per heatmap cell, NaN where no tile was scored
    tumour: Any  # the annotated tumour on the slide, level-0 px
    outside: float  # share of the annotated tumour off the slide
    truth_frac: np.ndarray  # (rows, cols) exact share of each cell annotated
    lesion_cells: list[np.ndarray]  # per annotated focus, the cells it overlaps (positive area)
    tile_cover: np.ndarray  # (N,) share of each scored tile annotated
    cell: float
    origin: float


def load_case(
    manifest_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str] | None,
    *,
    mapping: GroupMapping | None = None,
) -> SlideCase:
    """Read a finished run (manifest and tile table) and its annotation file (None: no tumour)."""
    m = load_run(manifest_path)
    pos = m["model"]["positive_class"]
    # Outputs lie beside the manifest that names them: resolve there, not where the run was made, so a
    # moved or copied results folder reads its own tile table.
    tiles = _read_tiles(Path(manifest_path).parent / Path(m["outputs"]["tiles_csv"]).name)
    ann: Annotations | None = read_annotations(annotation_path, mapping) if annotation_path else None
    from shapely.geometry import box as _box

    cell = float(m["heatmap"]["cell_l0_px"])
    origin = float(m["heatmap"].get("origin_l0", 0.0))  # the cell is centred on its tile (overlap)
    rows, cols = (int(v) for v in m["heatmap"]["shape"])
    annotated, ann_origin = _annotated_l0(m, ann)
    # Truth is what lies on the slide (the heatmap canvas): the same clipped geometry decides every
    # metric and the slide-level truth, and what was cut off is reported.
    on_slide = _box(0, 0, origin + cols * cell, origin + rows * cell)
    tumour = annotated.intersection(on_slide) if not annotated.is_empty else annotated
    outside = float(annotated.area - tumour.area) / annotated.area if annotated.area > 0 else 0.0
    canvas = np.full((rows, cols), np.nan)
    p = tiles.get(f"p_{pos}", np.zeros(0))
    if len(p):
        cr = np.stack([tiles["col"], tiles["row"]], axis=1).astype(np.int64)
        canvas[cr[:, 1], cr[:, 0]] = p
    truth_frac = rasterize_fraction(tumour, (rows, cols), cell, origin)
    foci = [g for g in getattr(tumour, "geoms", [tumour]) if not g.is_empty and g.area > 0]
    lesion_cells = [rasterize_fraction(g, (rows, cols), cell, origin) > 0 for g in foci]
    tile_cover = np.zeros(len(p))
    if len(p):
        w = tiles["width_l0"]
        boxes = np.stack([tiles["x_l0"], tiles["y_l0"], tiles["x_l0"] + w, tiles["y_l0"] + w], axis=1)
        tile_cover = box_coverage(tumour, boxes)
    return SlideCase(Path(manifest_path), Path(annotation_path) if annotation_path else None, m, ann,
                     ann_origin, tiles, canvas, tumour, outside, truth_frac, lesion_cells, tile_cover,
                     cell, origin)  # fmt: skip


def label_at(case: SlideCase, threshold: float) -> bool:
    """The slide label the run's own rule (area or top-k) gives at tile threshold ``threshold``,
    recomputed from its tile table (at the run's own threshold: the label it recorded)."""
    from wsi_pipeline.aggregate import LabelRule, slide_label, tile_area_mm2

    m, tiles = case.m, case.tiles
    rule = dict((m.get("label") or {}).get("rule") or {})
    rule.update(tile_threshold=threshold, topk_threshold=threshold)
    p = tiles.get(f"p_{m['model']['positive_class']}", np.zeros(0))
    if not len(p):
        return False
    coords = np.stack([tiles["x_l0"], tiles["y_l0"]], axis=1)
    mpp0 = float((m.get("resolution") or {}).get("mpp_x") or 0.0)
    res = slide_label(p, coords, tiles["tissue_fraction"], cell_area_mm2=tile_area_mm2(case.cell, mpp0),
                      rule=LabelRule(**rule))  # fmt: skip
    return bool(res["positive"])


def evaluate_slide(
    manifest_path: str | os.PathLike[str],
    annotation_path: str | os.PathLike[str] | None,
    *,
    threshold: float | None = None,
    truth_min_fraction: float = 0.5,
    mapping: GroupMapping | None = None,
) -> dict[str, Any]:
    """Metrics of one finished run against its annotation file (None = annotated as no tumour).

    ``threshold``: P counted as tumour; None: the run's own tile threshold (its card's, or its
    ``--tile-threshold``), the one its outlines, GeoJSON regions and slide label used.

    ``dice``, ``precision``, ``recall``: area-exact (see the module docstring); ``cell_dice`` and
    ``cell``: on the heatmap grid with the truth rounded to cells; ``tile``/``auc``: over the scored
    tiles; areas in ``area_l0_px2`` and ``area_mm2``; ``truth`` is "tumour" or "benign"; the slide
    label is the run's own, or at a given threshold the one its rule gives there.
    """
    case = load_case(manifest_path, annotation_path, mapping=mapping)
    return case_metrics(case, threshold, truth_min_fraction=truth_min_fraction)


def case_metrics(
    case: SlideCase, threshold: float | None, *, truth_min_fraction: float = 0.5
) -> dict[str, Any]:
    """:func:`evaluate_slide`'s record of a loaded case at ``threshold`` (None: the run's own)."""
    m, tiles, tumour, ann, cell, origin = case.m, case.tiles, case.tumour, case.ann, case.cell, case.origin
    pos = m["model"]["positive_class"]
    if threshold is None:
        threshold, threshold_source = float(run_threshold(m)), "run"
    else:
        threshold, threshold_source = float(threshold), "given"
    rows, cols = case.canvas.shape
    grid_cols, grid_rows = int(m["grid"]["cols"]), int(m["grid"]["rows"])
    canvas, truth_frac, outside = case.canvas, case.truth_frac, case.outside
    p = tiles.get(f"p_{pos}", np.zeros(0))
    pred = np.nan_to_num(canvas, nan=0.0) >= threshold
    area = area_overlap(pred, truth_frac, float(tumour.area), cell)
    exact = overlap_ratios(area["tp"], area["fp"], area["fn"])
    cells = evaluate_grid(canvas, truth_frac, threshold=threshold, truth_min_fraction=truth_min_fraction)
    lesions = lesion_detection(pred, case.lesion_cells)
    # Tile level: the scored tiles only.
    if len(p):
        tile_truth = case.tile_cover >= truth_min_fraction
        tile = binary_metrics(p >= threshold, tile_truth)
        tile_auc = roc_auc(tile_truth, p)
    else:
        tile, tile_auc, tile_truth = binary_metrics(np.zeros(0), np.zeros(0)), math.nan, np.zeros(0, bool)
    truth_positive = bool(tumour.area > 0)
    own = threshold == float(run_threshold(m))
    predicted_positive = bool(m["label"]["positive"]) if own else label_at(case, threshold)
    focus = m["label"].get("focus") or {}  # the run's focus check (runs before it have none)
    res = m.get("resolution") or {}
    mpp = (float(res["mpp_x"]), float(res.get("mpp_y") or res["mpp_x"])) if res.get("mpp_x") else None
    area_mm2 = {k: _mm2(v, mpp) for k, v in area.items()}
    return strict_json({  # undefined metrics (nan) are null, as they are written
        "slide": m["slide"],
        "model": model_name(m),
        "model_sha256": (m.get("model") or {}).get("sha256"),
        "manifest": str(case.manifest_path),
        "annotation": str(case.annotation_path) if case.annotation_path else None,
        "annotation_format": ann.format if ann else None,
        "annotation_origin_l0": case.ann_origin,
        "truth": "tumour" if truth_positive else "benign",
        "threshold": threshold,
        "threshold_source": threshold_source,
        "truth_min_fraction": truth_min_fraction,
        **exact,  # the headline: area-exact dice, precision, recall
        "cell_dice": cells["dice"],
        "lesions": lesions,
        "area_mm2": area_mm2,
        "area_l0_px2": {k: round(v, 3) for k, v in area.items()},
        "false_positive_mm2": area_mm2["fp"],
        "truth_area_mm2": area_mm2["truth"],
        "cell": {k: cells[k] for k in ("dice", "precision", "recall", "specificity", "accuracy", "f1",
                                       "tp", "fp", "fn", "tn")},
        "grid": {"rows": rows, "cols": cols, "scored_rows": grid_rows, "scored_cols": grid_cols,
                 "cell_l0_px": cell, "origin_l0": origin},
        "tile": {**tile, "auc": tile_auc, "n": len(p), "n_truth_positive": int(tile_truth.sum())},
        "auc": tile_auc,
        "annotation_groups": ann.groups if ann else {},
        "annotation_repaired": ann.repaired if ann else 0,
        "annotation_negative_regions": ann.negative if ann else 0,
        "annotation_outside_slide_fraction": round(outside, 4),
        "warnings": [
            *([f"{round(100 * outside, 1)} % of the annotated tumour lies outside the slide and is not "
               "counted"] if outside > 1e-6 else []),
            *([f"the run warned: {focus['warning']} (misses there may be the blur's)"]
              if focus.get("warning") else []),
        ],
        "out_of_focus": focus.get("share_out_of_focus"),
        "focus_warning": bool(focus.get("warning")),
        "slide_truth_positive": truth_positive,
        "slide_predicted_positive": predicted_positive,
        "slide_label": m["label"].get("label") if own else (f"{pos}" if predicted_positive else f"no {pos}"),
        "slide_label_correct": truth_positive == predicted_positive,
    })  # fmt: skip


#: Thresholds of ``evaluate --sweep`` (each run's own is added)
SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def sweep(cases: Sequence[SlideCase], thresholds: Sequence[float], *, truth_min_fraction: float = 0.5
          ) -> list[dict[str, Any]]:  # fmt: skip
    """Operating points: for each threshold, every case scored at it and summarized (mean Dice,
    recall, precision; foci found; false-positive regions per slide; slide-level sensitivity and
    specificity by the runs' own label rules at that threshold)."""
    out = []
    for t in sorted(set(thresholds)):
        s = summarize([case_metrics(c, t, truth_min_fraction=truth_min_fraction) for c in cases])
        sl, les = s["slide_level"], s["lesions"]
        out.append({
            "threshold": t,
            "dice": s["dice"]["mean"], "recall": s["recall"]["mean"], "precision": s["precision"]["mean"],
            "foci_found": les["found"], "foci": les["n"],
            "false_positive_regions_per_slide": les["false_positive_regions_per_slide"],
            "slide_sensitivity": sl["sensitivity"]["value"], "slide_specificity": sl["specificity"]["value"],
            "slide_accuracy": sl["accuracy"]["value"],
            "benign_false_positive_mm2_mean": s["benign"]["false_positive_mm2"]["mean"],
        })  # fmt: skip
    return out


def best_operating_points(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Two thresholds of a sweep a lab can start from (each ``None`` when the slides cannot tell):

    * ``dice``: the highest mean Dice over the tumour slides (ties: the lowest threshold, which misses
      less tumour);
    * ``screening``: the highest threshold at which the slide-level sensitivity is still the best of
      the sweep, i.e. the most specific one that calls every tumour slide any threshold calls (none
      when no threshold calls any).

    Both are chosen on the slides evaluated: report figures on other slides.
    """
    pts = sorted(points, key=lambda p: p["threshold"])
    with_dice = [p for p in pts if p.get("dice") is not None]
    dice = None
    if with_dice and (top := max(p["dice"] for p in with_dice)) > 0:  # 0: no tumour found anywhere
        p = next(p for p in with_dice if p["dice"] == top)
        dice = {"threshold": p["threshold"], "dice": p["dice"]}
    with_sens = [p for p in pts if p.get("slide_sensitivity") is not None]
    screening = None
    if with_sens and (top := max(p["slide_sensitivity"] for p in with_sens)) > 0:  # 0: nothing to keep
        p = [p for p in with_sens if p["slide_sensitivity"] == top][-1]
        screening = {
            "threshold": p["threshold"],
            "slide_sensitivity": p["slide_sensitivity"],
            "slide_specificity": p.get("slide_specificity"),
        }
    return {"dice": dice, "screening": screening}


def format_best(best: Mapping[str, Any]) -> str:
    """One line naming :func:`best_operating_points` (empty when neither exists)."""
    parts = []
    if best.get("dice"):
        d = best["dice"]
        parts.append(f"best mean Dice {d['dice']:.3f} at tile threshold {d['threshold']:g}")
    if best.get("screening"):
        sc = best["screening"]
        spec = sc["slide_specificity"]
        there = "no benign slides" if spec is None else f"benign slides called no tumour {spec:.2f} there"
        parts.append(
            f"tumour slides called tumour stay at their best ({sc['slide_sensitivity']:.2f}) up to tile "
            f"threshold {sc['threshold']:g} ({there})"
        )
    if not parts:
        return ""
    return "operating points on these slides: " + "; ".join(parts) + " (choose here, report on other slides)"


@dataclass(frozen=True)
class RunSearch:
    """What :func:`find_runs` looked at: the run manifests found and how many folders it searched."""

    root: Path
    manifests: list[Path]
    folders: int
    stores_skipped: int = 0

    def describe(self) -> str:
        if self.root.is_file():
            return f"the manifest {self.root}"
        stores = f", {self.stores_skipped} tile store(s) not entered" if self.stores_skipped else ""
        return (
            f"{self.root} and its subfolders for {RUN_PATTERN}: {self.folders} folder(s){stores}, "
            f"{len(self.manifests)} manifest(s) found"
        )


RUN_PATTERN = "*.run.json"


def find_runs(results: Path) -> RunSearch:
    """Run manifests: the file itself, or every ``*.run.json`` in a folder and its subfolders (hidden
    folders and Zarr tile stores are not entered; symbolic links to folders are not followed)."""
    if results.is_file():
        return RunSearch(results, [results], 0)
    if not results.is_dir():
        raise WsiError(f"{results}: no such run manifest or results folder")
    found: list[Path] = []
    folders = stores = 0
    for here, dirs, files in os.walk(results):
        if "zarr.json" in files or ".zgroup" in files:  # a tile store: thousands of chunks, no runs
            dirs[:] = []
            stores += 1
            continue
        folders += 1
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(here) / f for f in files if f.endswith(".run.json") and not f.startswith(".")]
    return RunSearch(results, sorted(found), folders, stores)


def _slide_stem(manifest: dict[str, Any]) -> str:
    stem = Path(manifest["slide"]).stem
    return stem[: -len(".zarr")] if stem.endswith(".zarr") else stem


def match_annotation(
    manifest: dict[str, Any],
    annotations: Path,
    *,
    explicit_pair: bool = False,
    passed_over: list[Path] | None = None,
) -> Path | None:
    """The annotation file for a run, matched by name: ``<slide stem>.<ext>`` in the ``annotations``
    folder, or ``annotations`` itself when it is a file of that stem. ``explicit_pair``: the user named
    one run manifest and one annotation file, so the file is that run's whatever its name.

    A file of that name that this package wrote (``NAME.geojson``, a run's own predictions, when the
    annotations folder is the results folder) is not an expert annotation: passed over (and added to
    ``passed_over``); a pathologist's edit of it, saved from QuPath, has lost the mark and counts."""
    from wsi_pipeline.io.ownership import has_mark

    stem = _slide_stem(manifest)
    if annotations.is_file():
        ann_stem = annotations.name[: -len(annotations.suffix)] if annotations.suffix else annotations.name
        return annotations if explicit_pair or ann_stem == stem else None
    for suffix in ANNOTATION_SUFFIXES:
        cand = annotations / f"{stem}{suffix}"
        if cand.is_file():
            if not has_mark(cand):
                return cand
            if passed_over is not None:
                passed_over.append(cand)
    return None


def _names(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def run_threshold(manifest: dict[str, Any]) -> float:
    """The tile threshold a finished run called tumour with (0.5 for runs that did not record it)."""
    rule = (manifest.get("label") or {}).get("rule") or {}
    value = rule.get("tile_threshold")
    return float(value) if value is not None else 0.5


def evaluate_runs(
    results: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    threshold: float | None = None,
    truth_min_fraction: float = 0.5,
    mapping: GroupMapping | None = None,
    sweep_thresholds: Sequence[float] = (),
) -> dict[str, Any]:
    """Evaluate every run found in ``results`` (searched recursively) against the matching file in
    ``annotations``; with ``sweep_thresholds`` also the operating points there (:func:`sweep`; each
    run's own threshold is added), under ``sweep``.

    Runs without an annotation file are listed under ``unannotated`` (not scored, not dropped
    silently); unreadable annotation files and unfinished or unreadable manifests under ``errors``;
    ``*.run.json`` files this package did not write under ``ignored``. Raises :class:`WsiError` when
    no finished run is found and :class:`AnnotationError` when no run has an annotation file, each
    saying what was searched.
    """
    ann_p = Path(annotations)
    if not ann_p.exists():
        raise AnnotationError(f"{ann_p}: no such annotation file or folder")
    from wsi_pipeline.io.ownership import has_mark

    if ann_p.is_file() and has_mark(ann_p):
        raise AnnotationError(
            f"{ann_p}: written by wsi-pipeline (a run's own predictions), not an expert annotation; give "
            "the pathologist's file (ASAP XML, QuPath GeoJSON, ...)"
        )
    res_p = Path(results)
    search = find_runs(res_p)
    if not search.manifests:
        raise WsiError(
            f"{res_p}: no run manifests found (searched {search.describe()}); point it at a results "
            f"folder or a NAME.run.json written by wsi-infer"
        )
    runs: list[tuple[Path, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    ignored: list[dict[str, str]] = []
    for run in search.manifests:
        try:
            runs.append((run, load_run(run)))
        except NotARunManifest as exc:
            if res_p.is_file():
                raise
            ignored.append({"manifest": str(run), "reason": str(exc)})
        except WsiError as exc:
            if res_p.is_file():
                raise
            errors.append({"slide": None, "manifest": str(run), "error": str(exc)})
    if not runs:
        raise WsiError(
            f"{res_p}: no finished run manifests (searched {search.describe()}: {len(errors)} unfinished or "
            f"unreadable, {len(ignored)} not written by wsi-infer); re-run the slides"
        )
    explicit_pair = res_p.is_file() and ann_p.is_file()
    per: list[dict[str, Any]] = []
    cases: list[SlideCase] = []
    unannotated: list[str] = []
    own: list[Path] = []  # our own outputs passed over as annotations
    matched = 0
    for run, m in runs:
        a = match_annotation(m, ann_p, explicit_pair=explicit_pair, passed_over=own)
        if a is None:
            unannotated.append(m["slide"])
            continue
        matched += 1
        try:
            case = load_case(run, a, mapping=mapping)
            per.append(case_metrics(case, threshold, truth_min_fraction=truth_min_fraction))
            if sweep_thresholds:
                cases.append(case)
        except AnnotationError as exc:
            errors.append({"slide": m["slide"], "manifest": str(run), "error": str(exc)})
    if not matched:
        if ann_p.is_file():
            where = f"the file {ann_p.name} matches none of them by name"
        else:
            files = sorted(f.name for f in ann_p.iterdir() if f.suffix.lower() in ANNOTATION_SUFFIXES)
            listed = f": {_names(files)}" if files else ""
            where = (
                f"no annotation named <slide stem>{'|'.join(ANNOTATION_SUFFIXES)} for any of them in "
                f"{ann_p}, which holds {len(files)} annotation file(s){listed}"
                + (f", of which {len(own)} are wsi-pipeline's own predictions, passed over" if own else "")
            )
        raise AnnotationError(
            f"{ann_p}: no annotation for any of the {len(runs)} finished run(s) (searched "
            f"{search.describe()}; {where}; slides: {_names(sorted(Path(s).name for s in unannotated))}); "
            f"name each file after its slide"
        )
    ignored += [{"annotation": str(p), "reason": "written by wsi-pipeline (a run's own predictions), not an "
                 "expert annotation"} for p in own]  # fmt: skip
    points = None
    if sweep_thresholds:
        runs_own = [run_threshold(c.m) for c in cases]
        points = sweep(cases, [*sweep_thresholds, *runs_own], truth_min_fraction=truth_min_fraction)
    return {"summary": summarize(per), "slides": per, "unannotated": unannotated, "errors": errors,
            "ignored": ignored,
            **({"sweep": points, "sweep_best": best_operating_points(points)} if points is not None else {}),
            "searched": {"results": str(res_p), "pattern": RUN_PATTERN, "recursive": True,
                         "folders": search.folders, "manifests": len(search.manifests),
                         "annotations": str(ann_p)}}  # fmt: skip
