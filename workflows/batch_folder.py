#!/usr/bin/env python
"""Batch job: score every slide of a folder (or CSV manifest) on a Dask cluster.

    python workflows/batch_folder.py SLIDES/ --out RESULTS/ --scheduler tcp://head:8786
    python workflows/batch_folder.py SLIDES/ --out RESULTS/ --local 3          # LocalCluster, 3 processes
    python workflows/batch_folder.py SLIDES/ --out RESULTS/ --scheduler ... --device cuda   # GPU workers

The job connects a ``distributed.Client`` and runs :func:`wsi_pipeline.pipeline.run_slide` for one
slide after another: this machine plans each slide (thumbnail, tissue mask, grid) and the workers
read and score its tiles in tasks of ``--chunk-tiles`` tile coordinates (with retries, so a lost
worker costs only its tasks). Outputs are those of ``wsi-infer SLIDES/ --out RESULTS/``:
``<stem>.tif`` (probability map) with its ``.colour.tif``, ``.overlay.png``, ``.geojson``, ``.asap.xml``,
``.tiles.csv``, ``.report.html`` and, last, the ``.run.json`` manifest, plus ``summary.csv`` /
``summary.json``, ``report.html`` and ``batch-job.json`` (cluster, workers, provider). Finished
slides are skipped on a re-run, so an interrupted job resumes.

GPU workers are declared as Dask resources: start them with ``dask worker ADDRESS --resources GPU=1``
(``workflows/slurm/`` does this on SLURM). ``--device cuda``/``tensorrt`` makes every scoring task
require one ``GPU`` (one task per GPU at a time, never on a CPU-only worker); if no worker of the
cluster advertises that resource within ``--wait-timeout`` seconds the job stops with exit code 10
instead of waiting forever or running on CPUs. Before the first slide one probe task builds the
model's onnxruntime session on a worker, so a bad model or a worker without CUDA is reported once.

Exit codes: 0 all slides done, 1 some slide failed (listed on stderr and in summary.csv), otherwise
the code of the error that stopped the job (8 model, 10 device, 6 output location; see README.md).
Slides, the model and --out must be at the same paths on this machine and on every worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from wsi_pipeline import __version__
from wsi_pipeline.console import detach_console
from wsi_pipeline.errors import BusyError, DeviceError, Terminated, WsiError, stop_on_sigterm

GPU_DEVICES = ("cuda", "tensorrt")


def echo(*parts: Any, file: Any = None) -> None:
    """``print``, but a console that is gone (a hung-up terminal, a closed pipe, a dead ``tee``) is let
    go of instead of stopping the job whose results are files."""
    try:
        print(*parts, file=file)
    except OSError:
        detach_console(err=file is sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="batch_folder.py",
        description="Score every slide of a folder (or CSV manifest) on a Dask cluster.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("slides", type=Path, help="folder of slides, or CSV with a 'slide' (and 'mpp') column")
    p.add_argument("--out", "-o", type=Path, required=True, help="results folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler", metavar="ADDRESS", help="Dask scheduler, e.g. tcp://head:8786")
    where.add_argument(
        "--local", type=ranged(int, 1), metavar="N", help="start a LocalCluster of N worker processes"
    )
    p.add_argument("--local-threads", type=ranged(int, 1), default=1, help="threads per LocalCluster worker")
    p.add_argument("--model", type=Path, default=None, help="ONNX model (card beside it); default: shipped")
    p.add_argument("--device", choices=["auto", "cpu", *GPU_DEVICES], default="auto")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "fp16"], default="auto",
        help="auto: fp16 on GPU workers where the model card allows it, else fp32",
    )  # fmt: skip
    p.add_argument(
        "--resources",
        nargs="*",
        default=None,
        metavar="NAME=AMOUNT",
        help="worker resources every scoring task needs (default: GPU=1 for --device cuda/tensorrt, "
        "none otherwise)",
    )
    p.add_argument("--gpu-resource", default="GPU", help="resource name GPU workers advertise")
    p.add_argument(
        "--wait-workers", type=ranged(int, 1), default=1, help="workers to wait for before starting"
    )
    p.add_argument(
        "--wait-timeout",
        type=ranged(float, 0.0, open_low=True),
        default=120.0,
        help="seconds to wait for workers (and for a worker with the required resources)",
    )
    p.add_argument("--batch-size", type=ranged(int, 1), default=64)
    p.add_argument("--chunk-tiles", type=ranged(int, 1), default=256, help="tiles per Dask task")
    p.add_argument("--backend", choices=["auto", "openslide", "tiffslide"], default="auto")
    p.add_argument("--mpp", type=ranged(float, 0.0, open_low=True), default=None,
                   help="level-0 um/px override for every slide")  # fmt: skip
    p.add_argument("--target-mpp", type=ranged(float, 0.0, open_low=True), default=None,
                   help="tile resolution (default: the model's)")  # fmt: skip
    p.add_argument("--min-tissue", type=ranged(float, 0.0, 1.0), default=0.25)
    p.add_argument(
        "--regions",
        type=Path,
        default=None,
        help="folder of region files named after the slides (STEM.geojson, .json or .xml): only "
        "the tissue inside their polygons is scored (see wsi-infer --regions)",
    )
    p.add_argument("--normalize", choices=["none", "macenko"], default=None, help="default: the model card's")
    p.add_argument("--label-rule", choices=["area", "topk"], default="area")
    p.add_argument("--tile-threshold", type=ranged(float, 0.0, 1.0), default=None,
                   help="default: the model card's threshold")  # fmt: skip
    p.add_argument(
        "--min-area", type=ranged(float, 0.0), default=0.1, help="mm^2 of positive tissue (area rule)"
    )
    p.add_argument("--top-k", type=ranged(int, 1), default=5)
    p.add_argument("--overwrite", action="store_true", help="recompute slides that are already finished")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first bad slide")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="also the slides in the folder's subfolders, at any depth")  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="only the closing line and errors")
    return p


def ranged(
    kind: type[int] | type[float],
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` within [low, high] (``open_low``: above ``low``). A value outside
    is a usage error (exit 2) before any cluster starts, as ``wsi-infer``'s ranges are."""
    bounds = [f"> {low:g}" if open_low else f">= {low:g}"] if low is not None else []
    bounds += [f"<= {high:g}"] if high is not None else []

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {' and '.join(bounds)})")
        return value

    return parse


def parse_resources(items: Sequence[str] | None) -> dict[str, float]:
    """``["GPU=1", "MEM=2e9"]`` -> ``{"GPU": 1.0, "MEM": 2e9}``."""
    out: dict[str, float] = {}
    for item in items or ():
        name, sep, amount = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(amount)
        except ValueError:
            raise WsiError(f"--resources {item!r}: expected NAME=AMOUNT, e.g. GPU=1") from None
    return out


def task_resources(device: str, explicit: Sequence[str] | None, gpu_resource: str = "GPU") -> dict | None:
    """Resources each scoring task requires: explicit ones, else one GPU for GPU devices, else none."""
    if explicit is not None:
        return parse_resources(explicit) or None
    return {gpu_resource: 1.0} if device in GPU_DEVICES else None


def workers_with(client: Any, resources: dict[str, float]) -> list[str]:
    """Addresses of the cluster's workers that advertise at least ``resources``."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return sorted(
        addr
        for addr, w in workers.items()
        if all(float((w.get("resources") or {}).get(k, 0)) >= v for k, v in resources.items())
    )


def require_resources(client: Any, resources: dict[str, float], *, timeout_s: float) -> list[str]:
    """Wait up to ``timeout_s`` for a worker with ``resources``; :class:`DeviceError` if none comes.

    Tasks that need a resource no worker has would wait forever; never run them elsewhere instead.
    """
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        ok = workers_with(client, resources)
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if not ok:
        info = client.scheduler_info(n_workers=-1).get("workers", {})
        seen = sorted({f"{k}={v:g}" for w in info.values() for k, v in (w.get("resources") or {}).items()})
        want = ", ".join(f"{k}={v:g}" for k, v in resources.items())
        raise DeviceError(
            f"{client.scheduler.address}: no worker of the Dask cluster advertises {want} "
            f"({len(info)} workers, resources seen: {', '.join(seen) or 'none'}) after {timeout_s:g} s; "
            f"start GPU workers with `dask worker {client.scheduler.address} --resources GPU=1` "
            f"(see workflows/README.md) or use --device cpu"
        )
    return ok


def probe_model(
    client: Any, model: Path | None, device: str, resources: dict | None, precision: str = "auto"
) -> str:
    """Load the model on one worker (one that may run the tasks); returns the provider it uses."""
    from wsi_pipeline.inference.card import resolve_model
    from wsi_pipeline.inference.scoring import probe_session

    card = resolve_model(model)
    fut = client.submit(
        probe_session, str(card.path), str(card.onnx_path), device, None, precision, resources=resources,
        pure=False,
    )  # fmt: skip
    return str(fut.result())


def make_options(args: argparse.Namespace, resources: dict | None) -> Any:
    from wsi_pipeline.aggregate import LabelRule
    from wsi_pipeline.pipeline import RunOptions
    from wsi_pipeline.tiling.plan import TileOptions

    tile = TileOptions(
        mpp_override=args.mpp,
        min_tissue_fraction=args.min_tissue,
        normalize=args.normalize or "none",
        **({"target_mpp": args.target_mpp} if args.target_mpp else {}),
    )
    label = LabelRule(
        rule=args.label_rule,
        tile_threshold=args.tile_threshold,
        min_area_mm2=args.min_area,
        top_k=args.top_k,
        topk_threshold=args.tile_threshold,
    )
    return RunOptions(
        command=("workflows/batch_folder.py", *getattr(args, "argv", [])),
        tile=tile,
        label=label,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        chunk_tiles=args.chunk_tiles,
        backend=args.backend,
        resources=resources,
        normalize_from_card=args.normalize is None,
    )


def list_items(src: Path, *, recursive: bool = False) -> list[Any]:
    """The batch's slides with absolute paths (workers may run in another directory)."""
    from wsi_pipeline.batch import batch_items, batch_notes

    if not src.exists():
        raise WsiError(f"{src}: no such folder or manifest; pass a folder of slides or a CSV")
    if not (src.is_dir() or src.suffix.lower() == ".csv"):
        raise WsiError(f"{src}: not a folder or a .csv manifest; for one slide use `wsi-infer SLIDE`")
    items = batch_items(src.resolve(), recursive=recursive)
    for line in batch_notes(src, items, recursive=recursive):
        echo(f"note: {line}", file=sys.stderr)
    return [
        replace(i, slide=i.slide.resolve(), regions=i.regions.resolve() if i.regions else None) for i in items
    ]


def run_job(args: argparse.Namespace, client: Any, items: list[Any]) -> int:
    """Score ``items`` on ``client``; returns the exit code (0 ok, 1 some slide failed)."""
    from wsi_pipeline.batch import (
        BatchItem,
        OutputWriter,
        heatmap_path,
        labels_text,
        output_stems,
        result_row,
        run_batch,
        write_folder_report,
    )
    from wsi_pipeline.pipeline import score_slide
    from wsi_pipeline.progress_lines import FolderClock, LineProgress
    from wsi_pipeline.provenance import atomic_write_json, environment_versions
    from wsi_pipeline.tiling.regions import with_regions

    say = (lambda *a: None) if args.quiet else echo
    model = args.model.resolve() if args.model else None
    out = args.out.resolve()

    client.wait_for_workers(max(1, args.wait_workers), timeout=args.wait_timeout)
    resources = task_resources(args.device, args.resources, args.gpu_resource)
    eligible = require_resources(client, resources, timeout_s=args.wait_timeout) if resources else []
    provider = probe_model(client, model, args.device, resources, args.precision)
    opts = make_options(args, resources)
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    say(
        f"{client.scheduler.address}: {len(workers)} workers"
        + (f" ({len(eligible)} with {resources})" if resources else "")
        + f", model on {provider}; {len(items)} slides -> {out}"
    )

    names = dict(zip(items, output_stems(items, out), strict=True))
    folder_clock = FolderClock()

    def finish(item: BatchItem, write: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        m = write()
        row = result_row(m, out, heatmap_path(out, names[item]))
        reused = " (scores reused: only the label rule changed)" if m.get("scores_reused") else ""
        tiles = f"{m['n_tiles']} tiles on {m['provider']}{reused}"
        say(f"{item.slide.name}: {row['status']}, {row['label']}, {tiles}")
        for check in ("ood", "focus"):  # as wsi-infer prints them: the slide's label is not to be trusted
            if warning := (m["label"].get(check) or {}).get("warning"):
                echo(f"{item.slide.name}: WARNING {warning}")
        return {**row, "provider": m["provider"]}

    def on_error(item: BatchItem, exc: WsiError) -> None:
        echo(f"error: {exc}", file=sys.stderr)

    # One writer thread: this process writes a slide's outputs while the workers score the next one.
    with OutputWriter() as writer:

        def one(item: BatchItem, waiting_on: BusyError | None = None) -> Future[dict[str, Any]]:
            o = opts if item.mpp is None else replace(opts, tile=replace(opts.tile, mpp_override=item.mpp))
            o = replace(o, tile=with_regions(o.tile, item.slide, args.regions, batch=True, own=item.regions))
            write = score_slide(
                item.slide, heatmap_path(out, names[item]), model=model, options=o, client=client,
                overwrite=args.overwrite, waiting_on=waiting_on,
                progress=None if args.quiet else LineProgress(item.slide.name, say),
            )  # fmt: skip
            return writer.submit(item, lambda: finish(item, write))

        def again(item: BatchItem, busy: BusyError) -> Future[dict[str, Any]]:
            say(f"{item.slide.name}: waiting for the other run ({busy.holder}) to finish it")
            return one(item, waiting_on=busy)

        res = run_batch(
            items, one, out=out, summary_name="summary", stop_on_error=args.stop_on_error, on_error=on_error,
            on_start=lambda i, n, item: say(folder_clock.line(i, n, item.slide.name)),
            on_busy=lambda item, exc: say(
                f"{item.slide.name}: another run ({exc.holder}) is working on it; back to it at the end"
            ),
            retry_busy=again,
            also_writes=[out / "report.html", out / "batch-job.json"],
            on_summary=lambda rows: write_folder_report(out, rows),
            meta={"command": {"argv": sys.argv, "cwd": os.getcwd()}, "package_version": __version__},
            drain=writer.drain,
        )  # fmt: skip
    failed = res.failed
    write_folder_report(out, res.rows)
    atomic_write_json(
        out / "batch-job.json",
        {
            "generator": f"wsi-pipeline {__version__}",
            "argv": sys.argv,
            "scheduler": client.scheduler.address,
            "workers": {
                a: {"resources": w.get("resources"), "nthreads": w.get("nthreads")}
                for a, w in workers.items()
            },
            "device": args.device,
            "precision": args.precision,
            "task_resources": resources,
            "probe_provider": provider,
            "slides": len(res.rows),
            "failed": len(failed),
            "seconds": round(res.seconds, 3),
            "versions": environment_versions(),
        },
    )
    echo(
        f"{len(res.rows)} slides, {len(res.rows) - len(failed)} done, {len(failed)} failed, "
        f"{sum(int(r.get('n_tiles') or 0) for r in res.rows)} tiles, {res.seconds:.1f} s"
        f"{labels_text(res.rows)} -> {out / 'summary.csv'}"
    )
    for r in failed:
        echo(f"  failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def connect(args: argparse.Namespace) -> tuple[Any, Any]:
    """(client, cluster or None) for ``--scheduler`` or ``--local``."""
    from distributed import Client, LocalCluster

    if args.local is not None:
        cluster = LocalCluster(
            n_workers=args.local,
            threads_per_worker=args.local_threads,
            processes=True,
            dashboard_address=":0",  # a free port: 8787 may be taken by another cluster
        )
        return Client(cluster), cluster
    try:
        return Client(args.scheduler, timeout="30s"), None
    except (OSError, TimeoutError) as exc:
        raise WsiError(
            f"cannot reach the Dask scheduler at {args.scheduler} ({exc}); check --scheduler"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, connect (or start a LocalCluster), run the batch; the exit code."""
    from wsi_pipeline.console import printable_console

    printable_console()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in each slide's manifest
    client = cluster = None
    try:
        items = list_items(args.slides, recursive=args.recursive)
        from wsi_pipeline.tiling.regions import check_batch_regions

        check_batch_regions(args.regions)  # before any cluster starts
        client, cluster = connect(args)
        return run_job(args, client, items)
    except WsiError as exc:
        echo(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except TimeoutError as exc:  # wait_for_workers
        echo(
            f"error: {args.scheduler or 'local cluster'}: fewer than {args.wait_workers} workers after "
            f"{args.wait_timeout:g} s ({exc}); start workers or raise --wait-timeout",
            file=sys.stderr,
        )
        return 1
    except Terminated as exc:  # SIGTERM (a time limit, docker stop), SIGHUP: the summary lists what was done
        echo(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        echo("error: interrupted; re-run the same command to resume where it stopped", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    stop_on_sigterm()
    sys.exit(main())
