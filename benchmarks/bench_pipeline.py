"""End to end (the whole ``wsi-infer`` command) against the model's own ceiling, in one run.

For each model (the shipped TileNet; a random-weights ResNet-18 exported to ONNX at benchmark time,
float32 NCHW with mean/std on the card, the size of model labs run) and each slide (a real-tile mosaic
of ~800 tissue tiles at 0.5 um/px built from LC25000 tiles; the bundled 56-tile CMU-1-Small-Region),
it measures, on the same tiles with the same threads, best of ``--repeat``:

* **raw**: onnxruntime alone, tiles already in memory, one session with every core, the best batch
  size of 16/32/64 (the ceiling);
* **decode**: reading, decoding and cutting the slide's tiles alone (every core);
* **end to end**: wall clock of ``python -m wsi_pipeline.cli SLIDE --out ... --model ...`` as a user
  runs it (interpreter start, imports, planning, session, scoring, every output), and the peak RSS
  of that process; the package's bytecode is compiled first, as an installed wheel has it;
* **in process**: ``run_slide`` called in this (warm) process: the same work without interpreter
  start-up and imports, as a batch or a service sees each slide after the first;
* **scoring phase**: the tiles over the scoring phase of the best end-to-end run (its manifest's
  ``timings.scoring_s``): the streaming scorer alone, without planning and outputs;
* the ratios end-to-end / raw and, for TileNet (where reading and the model share the CPUs),
  end-to-end, in process and scoring phase / the shared-CPU bound 1 / (1/raw + 1/decode).

Usage (from the repository root; ResNet-18 needs torch, the ``train`` extra)::

    .venv/bin/python -m benchmarks.bench_pipeline [--repeat 3] [--models tilenet,resnet18]
        [--slides mosaic,sample] [--json out.json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.inference.card import resolve_model
from wsi_pipeline.inference.scoring import thread_plan
from wsi_pipeline.inference.session import create_session, predict
from wsi_pipeline.io.slide import open_slide
from wsi_pipeline.tiling.plan import TileOptions, plan_slide
from wsi_pipeline.tiling.read import iter_tiles

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "samples" / "CMU-1-Small-Region.svs"
LC25000_INDEX = SHARED / "tiles" / "lc25000-lung" / "index.csv"


def mosaic(work: Path, size: int) -> tuple[str, Path]:
    """The real-tile mosaic (LC25000 tiles in random tissue blobs); synthetic texture without the data."""
    path = work / f"mosaic-{size}.svs"
    if LC25000_INDEX.exists():
        from testkit.benchslides import random_spec, write_bench_slide

        if not path.exists():
            write_bench_slide(path, random_spec(size, size, seed=7, n_tumour=2), LC25000_INDEX)
        return f"real-tile mosaic {size} px", path
    from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide

    path = work / f"synthetic-{size}.svs"
    if not path.exists():
        s = size
        spec = SyntheticSpec(width=s, height=s, mpp=0.5, tissue=(Ellipse(s / 2, s / 2, s * 0.4, s * 0.3),),
                             downsamples=(1, 4, 16))  # fmt: skip
        write_synthetic_slide(path, spec)
    return f"synthetic {size} px (no ../shared/data: synthetic texture)", path


def bench_models(names: str, work: Path) -> dict[str, Path]:
    """The ONNX files of the comma-separated ``names``: ``tilenet`` (the shipped model) and
    ``resnet18`` (random weights, exported into ``work/models`` now; needs torch)."""
    models: dict[str, Path] = {}
    for name in names.split(","):
        if name == "tilenet":
            models[name] = resolve_model(None).onnx_path
        elif name == "resnet18":
            from testkit.resnet import export_resnet18

            models[name] = export_resnet18(work / "models")
    return models


def slide_tiles(slide: Path, cores: int) -> tuple[np.ndarray, float]:
    """The slide's tissue tiles (as the pipeline cuts them) and the read+decode+cut rate, tiles/s."""
    reader = open_slide(slide)
    plan = plan_slide(reader, TileOptions())
    t = time.perf_counter()
    tiles = np.concatenate([t for _, t in iter_tiles(reader, plan, workers=cores)])
    rate = len(tiles) / (time.perf_counter() - t)
    reader.close()
    return tiles, rate


def raw_ceiling(model: Path, tiles: np.ndarray, cores: int, repeat: int) -> tuple[float, int]:
    """Best tiles/s of one session with every core over batch sizes 16/32/64 (best of ``repeat``)."""
    card = resolve_model(model)
    session, _ = create_session(card, "cpu", threads=cores)
    best, best_batch = 0.0, 0
    for batch in (16, 32, 64):
        predict(session, card, tiles[:batch], batch_size=batch)  # warm-up
        for _ in range(repeat):
            t = time.perf_counter()
            predict(session, card, tiles, batch_size=batch)
            rate = len(tiles) / (time.perf_counter() - t)
            if rate > best:
                best, best_batch = rate, batch
    return best, best_batch


def end_to_end(slide: Path, model: Path, out: Path, batch: int) -> tuple[float, float, dict[str, Any]]:
    """(wall seconds, peak RSS MiB, manifest) of the whole command in a fresh interpreter (the peak RSS
    is the one the run records: getrusage of a child carries this process's peak across fork+exec)."""
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(slide), "--out", str(out), "--model", str(model),
           "--batch-size", str(batch), "--overwrite", "-q"]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, _ = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    manifest = json.loads(out.with_suffix(".run.json").read_text())
    return wall, float(manifest["timings"]["peak_rss_mib"]), manifest


def in_process(slide: Path, model: Path, out: Path, batch: int) -> float:
    """Wall seconds of ``run_slide`` in this process (imports done, session cache cleared)."""
    from wsi_pipeline.inference.scoring import cached_session
    from wsi_pipeline.pipeline import RunOptions, run_slide

    cached_session.cache_clear()
    t = time.perf_counter()
    run_slide(slide, out, model=model, options=RunOptions(batch_size=batch), overwrite=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-pipeline")
    ap.add_argument("--size", type=int, default=9250, help="mosaic side in level-0 px (0.5 um/px)")
    ap.add_argument("--models", default="tilenet,resnet18")
    ap.add_argument("--slides", default="mosaic,sample", help="mosaic, sample or both")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for every column")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    # The command is timed as an installed wheel runs it: with its bytecode compiled (pip compiles
    # at install; an editable checkout under PYTHONDONTWRITEBYTECODE=1 would recompile every run).
    compileall.compile_dir(str(ROOT / "wsi_pipeline"), quiet=1)
    cores = thread_plan().cores
    models = bench_models(args.models, args.work)
    wanted = args.slides.split(",")
    slides = ([mosaic(args.work, args.size)] if "mosaic" in wanted else []) + (
        [("bundled CMU-1-Small-Region", SAMPLE)] if "sample" in wanted else []
    )
    rows: list[dict[str, Any]] = []
    for slide_label, slide in slides:
        tiles, decode = slide_tiles(slide, cores)
        decode = max([decode] + [slide_tiles(slide, cores)[1] for _ in range(args.repeat - 1)])
        for name, model in models.items():
            raw, batch = raw_ceiling(model, tiles, cores, args.repeat)
            runs = [end_to_end(slide, model, args.work / "out" / f"{name}-{slide.stem}.tif", batch)
                    for _ in range(args.repeat)]  # fmt: skip
            wall, _, manifest = min(runs, key=lambda r: r[0])
            e2e = len(tiles) / wall
            warm = min(in_process(slide, model, args.work / "out" / f"warm-{name}-{slide.stem}.tif", batch)
                       for _ in range(args.repeat))  # fmt: skip
            warm_rate = len(tiles) / warm
            bound = 1 / (1 / raw + 1 / decode)
            scoring = len(tiles) / float(manifest["timings"]["scoring_s"])  # the best run's scoring phase
            row = {
                "slide": slide_label, "model": name, "tiles": len(tiles), "cores": cores,
                "raw_tiles_per_s": round(raw, 1), "raw_best_batch": batch,
                "decode_tiles_per_s": round(decode, 1), "shared_cpu_bound_tiles_per_s": round(bound, 1),
                "e2e_wall_s": round(wall, 2), "e2e_tiles_per_s": round(e2e, 1),
                "ratio_e2e_to_raw": round(e2e / raw, 3), "ratio_e2e_to_shared_bound": round(e2e / bound, 3),
                "in_process_s": round(warm, 2), "in_process_tiles_per_s": round(warm_rate, 1),
                "ratio_in_process_to_raw": round(warm_rate / raw, 3),
                "ratio_in_process_to_shared_bound": round(warm_rate / bound, 3),
                "scoring_tiles_per_s": round(scoring, 1),
                "ratio_scoring_to_shared_bound": round(scoring / bound, 3),
                "peak_rss_mib": round(max(r[1] for r in runs)),
                "timings": manifest["timings"], "thread_plan": manifest.get("thread_plan"),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{slide_label} | {name}: {len(tiles)} tiles; raw {raw:.1f}/s (batch {batch}), decode "
                f"{decode:.0f}/s, end to end {e2e:.1f}/s ({wall:.2f} s wall) = {e2e / raw:.2f}x raw, "
                f"{e2e / bound:.2f}x shared bound; in process {warm_rate:.1f}/s = "
                f"{warm_rate / raw:.2f}x raw, {warm_rate / bound:.2f}x shared bound; scoring phase "
                f"{scoring:.1f}/s = {scoring / bound:.2f}x shared bound; peak RSS {row['peak_rss_mib']} MiB",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
