"""Folder runs: slides one after another (``run_slide`` in a loop) against ``wsi-infer DIR``, which
writes each slide's outputs on a thread of their own while the next slide is planned and scored.

Both sides are fresh interpreters on the same folder of ``--copies`` copies of one slide (the bundled
CMU-1-Small-Region, 56 tiles; the 3,000 px real-tile mosaic, 95 tiles), with the same model and the
package's bytecode compiled; runs alternate between the two sides and the best of ``--repeat`` is kept.
The baseline writes no folder summary or report (the folder run does): the ratio is if anything
conservative.

``--concurrent``: instead, one folder run alone against two folder runs started together on the same
folder and results folder (a fresh one each time), which divide the slides between them
(``wsi_pipeline.io.locks``): the wall time until both have ended, and how many slides each scored.

Usage (from the repository root; ResNet-18 needs torch, the ``train`` extra)::

    .venv/bin/python -m benchmarks.bench_folder [--copies 8] [--repeat 3] [--models tilenet,resnet18]
        [--slides sample,mosaic3000] [--concurrent] [--json out.json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import ROOT, SAMPLE, bench_models, mosaic

SEQUENTIAL = """
import sys
from pathlib import Path
from wsi_pipeline.pipeline import run_slide
src, out, model = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
for slide in sorted(src.iterdir()):
    run_slide(slide, out / (slide.stem + ".tif"), model=model, overwrite=True)
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()}")
    return wall


def together(cmds: list[list[str]]) -> tuple[float, list[int]]:
    """Start ``cmds`` at once; the wall time until all have ended, and the slides each scored."""
    t = time.perf_counter()
    pipe = subprocess.PIPE
    procs = [subprocess.Popen(c, cwd=ROOT, stdout=pipe, stderr=pipe, text=True) for c in cmds]
    logs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t
    for p, (_, err) in zip(procs, logs, strict=True):
        if p.returncode:
            raise SystemExit(f"a folder run failed: {err}")
    return wall, [sum(" tiles in " in ln for ln in out.splitlines()) for out, _ in logs]


def concurrent_row(label: str, src: Path, name: str, model: Path, work: Path, repeat: int) -> dict[str, Any]:
    """One folder run alone against two started together (fresh results folders, alternated)."""
    out = work / f"out-{src.name}-{name}-concurrent"

    def cmd() -> list[str]:
        return [sys.executable, "-m", "wsi_pipeline.cli", str(src), "--out", f"{out}/", "--model", str(model)]

    best = {"one": float("inf"), "two": float("inf")}
    split: list[int] = []
    for _ in range(repeat):
        for k, n in (("one", 1), ("two", 2)):
            shutil.rmtree(out, ignore_errors=True)
            wall, scored = together([cmd() for _ in range(n)])
            best[k] = min(best[k], wall)
            split = scored if n == 2 else split
    return {
        "slides": label, "model": name, "one_run_s": round(best["one"], 3),
        "two_runs_s": round(best["two"], 3), "ratio_two_to_one": round(best["two"] / best["one"], 3),
        "slides_scored_by_each": split,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-folder")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--models", default="tilenet,resnet18")
    ap.add_argument("--slides", default="sample,mosaic3000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrent", action="store_true", help="one folder run alone vs two at once")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    compileall.compile_dir(str(ROOT / "wsi_pipeline"), quiet=1)
    models = bench_models(args.models, args.work)
    slides: list[tuple[str, Path]] = []
    for which in args.slides.split(","):
        if which == "sample":
            slides.append(("bundled CMU-1-Small-Region", SAMPLE))
        elif which == "mosaic3000":
            slides.append(mosaic(args.work, 3000))
    rows: list[dict[str, Any]] = []
    for label, slide in slides:
        src = args.work / f"in-{slide.stem}"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        for i in range(args.copies):
            shutil.copy(slide, src / f"s{i}{slide.suffix}")
        for name, model in models.items():
            if args.concurrent:
                rows.append(concurrent_row(label, src, name, model, args.work, args.repeat))
                r = rows[-1]
                print(
                    f"{label} x{args.copies} | {name}: one folder run {r['one_run_s']:.2f} s, two runs at "
                    f"once {r['two_runs_s']:.2f} s until both ended = {r['ratio_two_to_one']:.3f}x; "
                    f"slides scored by each: {r['slides_scored_by_each']}"
                )
                continue
            outs = {k: args.work / f"out-{slide.stem}-{name}-{k}" for k in ("sequential", "folder")}
            for folder in outs.values():  # results of another --copies would be counted
                shutil.rmtree(folder, ignore_errors=True)
            cmds = {
                "sequential": [sys.executable, "-c", SEQUENTIAL, str(src), str(outs["sequential"]),
                               str(model)],
                "folder": [sys.executable, "-m", "wsi_pipeline.cli", str(src), "--out", str(outs["folder"]),
                           "--model", str(model), "--overwrite", "-q"],
            }  # fmt: skip
            best = {k: float("inf") for k in cmds}
            for _ in range(args.repeat):
                for k, cmd in cmds.items():
                    best[k] = min(best[k], timed(cmd))
            tiles = sum(json.loads(p.read_text())["n_tiles"] for p in outs["folder"].glob("*.run.json"))
            row = {
                "slides": label, "copies": args.copies, "model": name, "tiles": tiles,
                "sequential_s": round(best["sequential"], 3), "folder_s": round(best["folder"], 3),
                "folder_tiles_per_s": round(tiles / best["folder"], 1),
                "ratio_folder_to_sequential": round(best["folder"] / best["sequential"], 3),
            }  # fmt: skip
            rows.append(row)
            print(
                f"{label} x{args.copies} | {name}: {tiles} tiles; "
                f"one after another {best['sequential']:.2f} s, folder run {best['folder']:.2f} s "
                f"({row['folder_tiles_per_s']} tiles/s) = {row['ratio_folder_to_sequential']:.3f}x the time"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
