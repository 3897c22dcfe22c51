#!/usr/bin/env python
"""Run the batch job on SLURM: start Dask workers as SLURM jobs (dask-jobqueue), score, clean up.

    pip install dask-jobqueue
    python workflows/slurm/run_slurm.py SLIDES/ --out RESULTS/ --pool gpu --jobs 4
    python workflows/slurm/run_slurm.py SLIDES/ --out RESULTS/ --pool cpu --jobs 8 --queue short
    python workflows/slurm/run_slurm.py SLIDES/ --out RESULTS/ --pool gpu --dry-run   # print the job script

Run it on a login or head node that shares the slide, model and result paths with the compute
nodes. It reads the pool (``slurm-cpu`` or ``slurm-gpu``) from ``jobqueue.yaml`` beside this file
(or ``--config``), starts a Dask scheduler here, submits ``--jobs`` worker jobs with ``sbatch``,
waits for ``--wait-workers`` of them (default 1: scoring starts with the first worker), then runs
``workflows/batch_folder.py`` against that scheduler and cancels the jobs when it ends. Every option
this script does not know is passed to batch_folder.py (``--model``, ``--chunk-tiles``,
``--stop-on-error``...). The GPU pool defaults to ``--device cuda``: its tasks need the ``GPU``
resource its workers advertise, so they never run on a CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "jobqueue.yaml"


def load_batch_folder() -> Any:
    """``workflows/batch_folder.py`` as a module (the workflows folder is not a package)."""
    path = HERE.parent / "batch_folder.py"
    spec = importlib.util.spec_from_file_location("wsi_batch_folder", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_slurm.py",
        description="Score a slide folder on Dask workers started as SLURM jobs. Options not listed "
        "here go to workflows/batch_folder.py.",
    )
    p.add_argument("slides", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True)
    p.add_argument("--pool", choices=["cpu", "gpu"], default="gpu", help="worker pool of jobqueue.yaml")
    p.add_argument("--jobs", type=int, default=2, help="SLURM jobs (= Dask workers) to start")
    p.add_argument("--adapt", action="store_true", help="scale between 1 and --jobs jobs with the load")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="dask-jobqueue YAML")
    p.add_argument("--queue", default=None, help="SLURM partition (overrides the config)")
    p.add_argument("--account", default=None, help="SLURM account (overrides the config)")
    p.add_argument("--walltime", default=None, help="job walltime, e.g. 02:00:00 (overrides the config)")
    p.add_argument("--wait-workers", type=int, default=1, help="workers to wait for before scoring")
    p.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds to wait for them (queue)")
    p.add_argument("--dry-run", action="store_true", help="print the SLURM job script, submit nothing")
    return p


def load_config(path: Path) -> None:
    """Merge the jobqueue YAML into Dask's configuration (over ~/.config/dask)."""
    import dask.config
    import yaml

    with path.open() as fh:
        data = yaml.safe_load(fh) or {}
    dask.config.update(dask.config.config, data, priority="new")


def make_cluster(args: argparse.Namespace) -> Any:
    """A ``SLURMCluster`` for the chosen pool (starts the scheduler here; submits nothing yet)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SystemExit("error: dask-jobqueue is not installed; pip install dask-jobqueue") from exc
    load_config(args.config)
    overrides = {k: getattr(args, k) for k in ("queue", "account", "walltime") if getattr(args, k)}
    return SLURMCluster(config_name=f"slurm-{args.pool}", **overrides)


def batch_argv(args: argparse.Namespace, rest: Sequence[str], scheduler: str) -> list[str]:
    """Arguments for batch_folder.py: ours, then the passed-through ones."""
    argv = [str(args.slides), "--out", str(args.out), "--scheduler", scheduler]
    argv += ["--wait-workers", str(args.wait_workers), "--wait-timeout", str(args.wait_timeout)]
    if args.pool == "gpu" and not any(a == "--device" or a.startswith("--device=") for a in rest):
        argv += ["--device", "cuda"]
    return argv + list(rest)


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    batch_folder = load_batch_folder()
    cluster = make_cluster(args)
    try:
        if args.dry_run:
            print(cluster.job_script())
            print("# batch_folder.py " + " ".join(batch_argv(args, rest, cluster.scheduler_address)))
            return 0
        print(f"scheduler {cluster.scheduler_address}, dashboard {cluster.dashboard_link}", flush=True)
        if args.adapt:
            cluster.adapt(minimum_jobs=1, maximum_jobs=args.jobs)
        else:
            cluster.scale(jobs=args.jobs)
        return int(batch_folder.main(batch_argv(args, rest, cluster.scheduler_address)))
    finally:
        cluster.close()  # cancels the worker jobs


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.exit(main())
