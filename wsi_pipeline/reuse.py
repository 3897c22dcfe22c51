"""Scores taken from a finished run when only the slide label rule changed.

A run's resume key (``pipeline._params``) holds the source, the model, the tiling, the backend and
the label rule. When a finished run of the same outputs differs only in the label rule (a new
``--tile-threshold``, ``--min-area``, ``--label-rule``), its tile table holds every score the new run
needs: the probabilities, OOD distances and focus scores, written exactly (float32 round-trip, see
``io.outputs.write_tiles_csv``). The new run plans the slide as before (tissue, grid: the tile
coordinates are checked against the table) and writes all outputs again from those scores, in
seconds instead of a scoring pass. ``--overwrite`` scores again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.inference.card import ModelCard
from wsi_pipeline.inference.scoring import ScoreResult
from wsi_pipeline.provenance import file_sha256
from wsi_pipeline.tiling.source import Layout

#: ``scores_in_tiles_csv`` of manifests whose tile table holds the scores exactly (older tables
#: rounded them to 6 significant digits: their slides are scored again)
EXACT = "exact float32"


def prior_scores(paths: dict[str, Path], params: dict[str, Any]) -> dict[str, Any] | None:
    """The finished manifest at ``paths["manifest"]`` whose scores this run (``params``) can take:
    same parameters but the label rule, a table that holds the scores exactly and is unchanged since
    that run wrote it (its sha256 in the manifest); else None."""
    try:
        prior = json.loads(paths["manifest"].read_text())
        old = dict(prior["params"])
        sha = prior["output_sha256"]["tiles_csv"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    new = dict(params)
    if prior.get("status") != "complete" or prior.get("scores_in_tiles_csv") != EXACT:
        return None
    if old.pop("label", None) == new.pop("label", None) or old != new:
        return None
    try:
        if file_sha256(paths["tiles_csv"]) != sha:
            return None
    except OSError:
        return None
    return dict(prior)


def scores_from_table(
    path: Path, layout: Layout, card: ModelCard, prior: dict[str, Any], sha256: str
) -> ScoreResult | None:
    """The scores of ``prior``'s tile table ``path`` as a :class:`ScoreResult` in ``layout``'s tile
    order, or None when the table does not hold ``layout``'s tiles (another plan) or the model's
    columns; ``sha256`` the table's, as checked by :func:`prior_scores`."""
    names = [f"p_{c}" for c in card.classes] + (["ood_distance"] if card.ood_output else [])
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        coords = np.array([(float(r["x_l0"]), float(r["y_l0"])) for r in rows], np.float64).reshape(-1, 2)
        values = np.array([[r[n] for n in names] for r in rows], np.float32).reshape(-1, len(names))
        # Tables of runs before the focus check have no focus column: their slides get no focus record
        focus = np.array([r["focus"] for r in rows], np.float32) if rows and "focus" in rows[0] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    expected = np.asarray(layout.coords_l0, np.float64)
    if coords.shape != expected.shape or not np.allclose(coords, expected, rtol=1e-6, atol=0.5):
        return None
    n_classes = len(card.classes)
    # Scores reused again (a second new rule) still come from the run that scored them
    origin = prior.get("scores_reused") or {}
    return ScoreResult(
        probs=np.ascontiguousarray(values[:, :n_classes]),
        provider=str(prior.get("provider", "")),
        seconds=0.0,
        read_seconds=0.0,
        infer_seconds=0.0,
        n_tasks=0,
        scheduler="none (scores reused)",
        ood=np.ascontiguousarray(values[:, n_classes]) if card.ood_output else None,
        focus=focus,
        extra={
            "run": prior.get("run"),
            "reused": {
                "tiles_csv": str(path),
                "sha256": sha256,
                "finished_at": prior.get("finished_at"),
                "label": (prior.get("params") or {}).get("label"),
                "provider": prior.get("provider"),
                "scored_at": origin.get("scored_at") or prior.get("finished_at"),
                "scoring_s": origin.get("scoring_s") or (prior.get("timings") or {}).get("scoring_s"),
            },
        },
    )
