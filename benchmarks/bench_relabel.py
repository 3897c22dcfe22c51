"""A new label rule on finished slides: scores reused from the tile table against scoring again.

For each model (the shipped TileNet; a random-weights ResNet-18, see ``bench_pipeline``) and slide (the
~800-tile real-tile mosaic, the bundled sample), it times the whole ``wsi-infer`` command in a fresh
interpreter, best of ``--repeat``:

* **score**: ``--overwrite --tile-threshold T``: the slide scored again (the baseline);
* **relabel**: the slide finished at threshold T, run at threshold T' (alternating between two
  thresholds, so each run is a change): the scores are taken from ``NAME.tiles.csv``;

and checks that every output but the page and manifest is byte for byte the same as a scoring run's at
the same threshold. Printed: seconds of each and relabel / score.

Usage (from the repository root; ResNet-18 needs torch, the ``train`` extra)::

    .venv/bin/python -m benchmarks.bench_relabel [--repeat 3] [--models tilenet,resnet18]
        [--slides mosaic,sample]
"""

from __future__ import annotations

import argparse
import compileall
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_pipeline import SAMPLE, bench_models, mosaic
from wsi_pipeline.pipeline import output_paths

ROOT = Path(__file__).resolve().parents[1]
SAME = ("heatmap", "colour", "overlay", "geojson", "asap_xml", "tiles_csv")


def run(slide: Path, out: Path, model: Path, threshold: float, *extra: str) -> float:
    """Wall seconds of the whole command in a fresh interpreter."""
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(slide), "--out", str(out), "--model", str(model),
           "--tile-threshold", str(threshold), "-q", *extra]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", default="tilenet,resnet18")
    ap.add_argument("--slides", default="mosaic,sample")
    args = ap.parse_args()
    compileall.compile_dir(ROOT / "wsi_pipeline", quiet=1)
    work = Path(tempfile.mkdtemp(prefix="wsi-bench-relabel-"))
    slides = {"mosaic": mosaic(work, 9250), "sample": ("bundled CMU-1-Small-Region", SAMPLE)}
    for model_name, model in bench_models(args.models, work).items():
        for key in args.slides.split(","):
            what, slide = slides[key]
            out, ref = work / model_name / key / "s.tif", work / model_name / key / "ref" / "s.tif"
            out.parent.mkdir(parents=True, exist_ok=True)
            ref.parent.mkdir(parents=True, exist_ok=True)
            thresholds = (0.6, 0.9)
            run(slide, out, model, thresholds[0])  # warm the caches and leave a finished run
            score, relabel = [], []
            for i in range(args.repeat):  # alternated, so both see the same machine
                t = thresholds[(i + 1) % 2]
                score.append(run(slide, ref, model, t, "--overwrite"))
                relabel.append(run(slide, out, model, t))
                m = json.loads(output_paths(out)["manifest"].read_text())
                assert m.get("scores_reused"), "the relabel run scored the slide"
                a, b = output_paths(out), output_paths(ref)
                same = all(a[k].read_bytes() == b[k].read_bytes() for k in SAME)
                assert same, "relabelled outputs differ from a scoring run's"
            n = json.loads(output_paths(ref)["manifest"].read_text())["n_tiles"]
            print(
                f"{model_name:9s} {what} ({n} tiles): score {min(score):.2f} s, relabel {min(relabel):.2f} s "
                f"= {min(relabel) / min(score):.2f}x; outputs identical",
                flush=True,
            )


if __name__ == "__main__":
    main()
