"""``wsi-infer evaluate``: finished runs against expert annotations."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_pipeline.cli.group import (
    _err,
    _run_guarded,
    main,
)
from wsi_pipeline.errors import UsageError


@main.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option(
    "--annotations",
    "-a",
    type=click.Path(path_type=Path),
    required=True,
    help="ASAP or ImageScope XML / QuPath GeoJSON file, or a folder of them named after the slides.",
)
@click.option(
    "--out",
    "-o",
    type=str,
    required=True,
    help="metrics JSON to write (a CSV with one row per slide is written beside it), or a folder "
    "(existing, or written with a trailing /) to write metrics.json and metrics.csv into.",
)
@click.option(
    "--threshold",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="P(tumour) counted as tumour. Default: each run's own tile threshold (its model card's, or its "
    "--tile-threshold), the one its outlines, GeoJSON and slide label used.",
)
@click.option(
    "--truth-fraction",
    type=float,
    default=0.5,
    show_default=True,
    help="For the cell Dice and tile metrics only: a cell/tile is tumour in truth when at least this "
    "fraction is annotated (the headline Dice is area-exact).",
)
@click.option(
    "--positive-group",
    multiple=True,
    help="Annotation groups that are tumour [default: all groups that are not exclusions].",
)
@click.option(
    "--exclusion-group",
    multiple=True,
    help="Groups cut out as non-tumour [default: _2, Exclusion, normal, ...].",
)
@click.option(
    "--sweep",
    is_flag=True,
    help="Also score every run at thresholds 0.05-0.95 (and its own): operating points (mean Dice, foci "
    "found, false-positive regions, slide-level sensitivity/specificity) in NAME.sweep.csv and the page.",
)
def evaluate(
    results: Path,
    annotations: Path,
    out: str,
    threshold: float | None,
    truth_fraction: float,
    positive_group: tuple[str, ...],
    exclusion_group: tuple[str, ...],
    sweep: bool,
) -> None:
    """Score finished runs (a .run.json, or a results folder searched recursively) against expert
    annotations.

    Area-exact Dice (the ACDC@LUNGHP metric), precision and recall of the predicted cells against the
    annotated polygons; the cell Dice beside it; tile AUC; slide-label accuracy. Means over slides with
    tumour; benign slides reported by their false-positive area.
    """  # fmt: skip

    def body() -> int:
        import time

        from wsi_pipeline import __version__
        from wsi_pipeline.batch import rows_to_csv
        from wsi_pipeline.evaluation.annotations import DEFAULT_EXCLUSION_GROUPS, GroupMapping
        from wsi_pipeline.evaluation.evaluate import (
            SWEEP_THRESHOLDS,
            evaluate_runs,
            format_best,
            truth_picture,
        )
        from wsi_pipeline.evaluation.summary import (
            CSV_COLUMNS,
            csv_rows,
            format_summary,
            mixed_models_warning,
        )
        from wsi_pipeline.io.ownership import GENERATOR, refuse_foreign_files
        from wsi_pipeline.io.report import write_evaluation_report
        from wsi_pipeline.provenance import atomic_write_bytes, atomic_write_json, environment_versions

        from .group import command_line

        started = time.perf_counter()

        out_p = _metrics_path(out)
        csv_path, page_path = out_p.with_suffix(".csv"), out_p.with_suffix(".html")
        sweep_path = out_p.with_suffix(".sweep.csv")
        refuse_foreign_files([out_p, csv_path, page_path, *([sweep_path] if sweep else [])])
        mapping = GroupMapping(
            positive=frozenset(positive_group) if positive_group else None,
            exclusion=frozenset(exclusion_group) if exclusion_group else DEFAULT_EXCLUSION_GROUPS,
        )
        res = evaluate_runs(results, annotations, threshold=threshold, truth_min_fraction=truth_fraction,
                            mapping=mapping, sweep_thresholds=SWEEP_THRESHOLDS if sweep else ())  # fmt: skip
        mixed = mixed_models_warning(res["summary"]["models"])
        run = {  # what a lab's validation record needs to reproduce these figures
            "command": list(command_line() or ()),
            "results": str(results),
            "annotations": str(annotations),
            "parameters": {
                "threshold": threshold,
                "threshold_note": "each run's own (its model card's or --tile-threshold)"
                if threshold is None
                else "given with --threshold",
                "truth_fraction": truth_fraction,
                "positive_groups": sorted(mapping.positive) if mapping.positive else None,
                "exclusion_groups": sorted(mapping.exclusion),
                "sweep": sweep,
            },
            "models": res["summary"]["models"],
            "package_version": __version__,
            "versions": environment_versions(),
            "seconds": round(time.perf_counter() - started, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(out_p, {"generator": f"{GENERATOR} {__version__}", **res, "run": run})
        atomic_write_bytes(csv_path, rows_to_csv(csv_rows(res["slides"]), CSV_COLUMNS))
        if sweep:
            atomic_write_bytes(sweep_path, rows_to_csv(res["sweep"]))
        pictures = {
            row["manifest"]: truth_picture(row["manifest"], row["annotation"], mapping=mapping)
            for row in res["slides"]
        }
        best = format_best(res.get("sweep_best") or {})  # the sweep's thresholds to start from, if any
        notes = [f"warning: {mixed}"] if mixed else []
        notes += [f"{Path(s).name}: no annotation file (not scored)" for s in res["unannotated"]]
        notes += [e["error"] for e in res["errors"]]
        write_evaluation_report(page_path, csv_rows(res["slides"]), pictures,
                                summary=format_summary(res["summary"]), notes=notes,
                                sweep=res.get("sweep") or (), run=run, sweep_best=best)  # fmt: skip
        written = ", ".join(str(p) for p in (out_p, csv_path, *([sweep_path] if sweep else []), page_path))
        click.echo(f"{format_summary(res['summary'])} -> {written}")
        if best:
            click.echo(best)
        for sl in res["unannotated"]:
            click.echo(f"  no annotation file for {sl} (not scored)", err=True)
        for ig in res["ignored"]:
            where = f"{ig['annotation']}: " if "annotation" in ig else ""
            click.echo(f"  {where}{ig['reason']} (ignored)", err=True)
        for row in res["slides"]:
            for w in row.get("warnings", []):
                click.echo(f"warning: {Path(row['slide']).name}: {w}", err=True)
        if mixed:
            click.echo(f"warning: {mixed}", err=True)
        for e in res["errors"]:
            _err(e["error"])
        return 1 if res["errors"] else 0

    _run_guarded(body)


def _metrics_path(out: str) -> Path:
    """``--out NAME.json`` as given; a folder (existing, or written with a trailing ``/``): its
    ``metrics.json``. Any other name is refused: it would make a file called ``results`` and one
    called ``results.csv`` where a folder was meant."""
    import os

    p = Path(out)
    if out.endswith(("/", os.sep)) or p.is_dir():
        return p / "metrics.json"
    if p.suffix.lower() != ".json":
        raise UsageError(
            f"--out {out}: neither NAME.json nor an existing folder; give e.g. {p}.json, or {p}/ to "
            "write metrics.json and metrics.csv into that folder"
        )
    return p
