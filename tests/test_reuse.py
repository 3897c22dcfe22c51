"""A run that changes only the slide label rule takes the scores from the finished run's tile table
(``wsi_pipeline.reuse``): no scoring pass, and outputs byte for byte those of a run that scores."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import Fixture
from wsi_pipeline import pipeline
from wsi_pipeline.aggregate import LabelRule
from wsi_pipeline.cli import main
from wsi_pipeline.io.outputs import write_tiles_csv
from wsi_pipeline.pipeline import RunOptions, output_paths, run_slide
from wsi_pipeline.provenance import file_sha256
from wsi_pipeline.tiling.plan import TileOptions

OPTS = RunOptions(chunk_tiles=32, workers=2)
COMPARED = ("heatmap", "colour", "overlay", "geojson", "asap_xml", "tiles_csv")


def _no_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the slide was scored again")

    monkeypatch.setattr(pipeline, "run_tasks", refuse)


def _threshold(t: float) -> RunOptions:
    return replace(OPTS, label=LabelRule(tile_threshold=t))


def test_tiles_csv_holds_float32_scores_exactly(tmp_path: Path) -> None:
    p = np.random.default_rng(0).random(2000).astype(np.float32)
    p[:4] = [0.0, 1.0, 1e-8, np.float32(0.79) - np.float32(6e-8)]  # the last lies just under 0.79
    write_tiles_csv(tmp_path / "t.csv", {"x_l0": np.arange(2000), "p": p, "f": p.astype(np.float64)})
    with (tmp_path / "t.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    back = np.array([r["p"] for r in rows], np.float32)
    assert (back == p).all()
    assert rows[5]["f"] == f"{float(p[5]):.6g}"  # float64 columns keep 6 significant digits


def test_label_rule_change_reuses_scores_and_equals_a_scoring_run(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "a" / "s.tif"
    first = run_slide(tumour_slide.path, out, model=test_model, options=OPTS)
    p = np.array([float(r["p_tumour"]) for r in csv.DictReader(output_paths(out)["tiles_csv"].open())])
    t = float(np.quantile(p[p > 0.05], 0.5))  # a threshold that changes which tiles are positive
    assert ((p >= t) != (p >= first["params"]["label"]["tile_threshold"])).any()

    scored_out = tmp_path / "b" / "s.tif"  # the same threshold, scored from scratch
    scored = run_slide(tumour_slide.path, scored_out, model=test_model, options=_threshold(t))
    assert "scores_reused" not in scored

    with monkeypatch.context() as m:
        _no_scoring(m)
        again = run_slide(tumour_slide.path, out, model=test_model, options=_threshold(t))
    reused = again["scores_reused"]
    assert reused["finished_at"] == first["finished_at"]
    assert reused["label"] == first["params"]["label"] and again["params"]["label"]["tile_threshold"] == t
    assert again["timings"]["scoring_s"] == 0.0 and again["provider"] == first["provider"]
    assert again["label"] == scored["label"] and again["params"] == scored["params"]
    a, b = output_paths(out), output_paths(scored_out)
    assert "reused from the run finished" in a["report"].read_text()  # the slide page says so
    for k in COMPARED:
        assert a[k].read_bytes() == b[k].read_bytes(), k
    # the same rule once more: finished, skipped
    with monkeypatch.context() as m:
        _no_scoring(m)
        assert run_slide(tumour_slide.path, out, model=test_model, options=_threshold(t))["skipped"]
        # a third rule: reused from the relabelled run, still naming the run that scored them
        third = run_slide(tumour_slide.path, out, model=test_model, options=_threshold(t / 2))
    assert third["scores_reused"]["finished_at"] == again["finished_at"]
    assert third["scores_reused"]["scored_at"] == first["finished_at"]
    assert third["scores_reused"]["scoring_s"] == first["timings"]["scoring_s"]


def _finished(tumour_slide: Fixture, test_model: Path, tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A finished run of the tumour slide at the card's threshold: its heatmap path and outputs."""
    out = tmp_path / "s.tif"
    run_slide(tumour_slide.path, out, model=test_model, options=OPTS)
    return out, output_paths(out)


def test_scores_are_not_reused_when_more_than_the_label_changed_or_the_table_did(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    out, paths = _finished(tumour_slide, test_model, tmp_path)
    # the tiling changed too (tissue threshold): scored again
    tissue = replace(OPTS.tile, tissue=replace(OPTS.tile.tissue, min_tissue_um2=20_000.0))
    m = run_slide(tumour_slide.path, out, model=test_model, options=replace(_threshold(0.6), tile=tissue))
    assert "scores_reused" not in m and m["timings"]["scoring_s"] > 0
    # --overwrite scores again
    m = run_slide(tumour_slide.path, out, model=test_model, options=replace(_threshold(0.7), tile=tissue),
                  overwrite=True)  # fmt: skip
    assert "scores_reused" not in m
    # a table changed since it was written (opened and saved in a spreadsheet): not trusted
    text = paths["tiles_csv"].read_text()
    paths["tiles_csv"].write_text(text.replace("\n", "\r\n"))
    m = run_slide(tumour_slide.path, out, model=test_model, options=replace(_threshold(0.65), tile=tissue))
    assert "scores_reused" not in m
    # a manifest of a version whose table rounded the scores: scored again
    manifest = json.loads(paths["manifest"].read_text())
    del manifest["scores_in_tiles_csv"]
    paths["manifest"].write_text(json.dumps(manifest))
    m = run_slide(tumour_slide.path, out, model=test_model, options=replace(_threshold(0.75), tile=tissue))
    assert "scores_reused" not in m


def test_a_table_that_does_not_hold_the_plans_tiles_is_scored_again(
    tumour_slide: Fixture, test_model: Path, tmp_path: Path
) -> None:
    out, paths = _finished(tumour_slide, test_model, tmp_path)
    rows = list(csv.reader(paths["tiles_csv"].open()))
    rows[1][0] = str(float(rows[1][0]) + 100)  # one tile moved: not this plan's table
    with paths["tiles_csv"].open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    manifest = json.loads(paths["manifest"].read_text())
    manifest["output_sha256"]["tiles_csv"] = file_sha256(paths["tiles_csv"])
    paths["manifest"].write_text(json.dumps(manifest))
    paths["tiles_csv"].chmod(0o644)
    m = run_slide(tumour_slide.path, out, model=test_model, options=_threshold(0.6))
    assert "scores_reused" not in m and m["timings"]["scoring_s"] > 0
    assert float(next(csv.DictReader(paths["tiles_csv"].open()))["x_l0"]) == float(rows[1][0]) - 100


def test_folder_rerun_with_a_new_threshold_relabels_every_slide_without_scoring(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    src = tmp_path / "slides"
    src.mkdir()
    for f in (tumour_slide.path, benign_slide.path):
        shutil.copy(f, src / f.name)
    out = tmp_path / "res"
    args = [str(src), "--out", f"{out}/", "--model", str(test_model), "--workers", "2", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    _no_scoring(monkeypatch)
    r = CliRunner().invoke(main, [*args, "--tile-threshold", "0.6"])
    assert r.exit_code == 0, r.output
    assert r.output.count("reused (only the label rule changed") == 2, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["status"] == "ok" for s in summary["slides"])
    for f in (tumour_slide.path, benign_slide.path):
        m = json.loads((out / f"{f.stem}.run.json").read_text())
        assert m["params"]["label"]["tile_threshold"] == 0.6 and m["scores_reused"]


def test_store_scoring_is_unchanged_by_reuse(tumour_slide: Fixture, test_model: Path, tmp_path: Path) -> None:
    """--tiles-out writes its store: a label change with it scores again rather than skip the store."""
    out, _ = _finished(tumour_slide, test_model, tmp_path)
    store = tmp_path / "s.zarr"
    opts = replace(_threshold(0.6), tiles_out=store, tile=TileOptions())
    m = run_slide(tumour_slide.path, out, model=test_model, options=opts)
    assert "scores_reused" not in m and store.exists()
