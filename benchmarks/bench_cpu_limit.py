"""The whole command under a container's CPU limit: the quota-sized thread plan against a plan sized
from the host's cores (what onnxruntime and this package did before ``wsi_pipeline.cores``).

It makes a child cgroup (v1 ``cpu`` controller or v2 ``cpu.max``) with ``--quota`` CPUs, as
``docker run --cpus`` does, and runs ``python -m wsi_pipeline.cli SLIDE --out ...`` inside it, in
fresh interpreters, alternating:

* **quota plan**: the package as shipped (session threads = whole CPUs of the quota);
* **host plan**: the same command with the core count patched to ``--host-cores`` (default: the
  affinity mask), a session thread per host core. ``--host-cores 16`` on a small machine shows what a
  16-core host does under the same quota.

Best of ``--repeat``; ratio = quota plan / host plan. Needs root and a writable cgroup file system
(it says so and stops otherwise).

Usage (from the repository root; ResNet-18 needs torch, the ``train`` extra)::

    sudo .venv/bin/python -m benchmarks.bench_cpu_limit [--quota 1] [--host-cores 16] [--repeat 3]
        [--models tilenet,resnet18] [--slides mosaic,sample] [--json out.json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.bench_pipeline import ROOT, SAMPLE, bench_models, mosaic

# Run in the child: join the cgroup, optionally pretend the host has N cores, then the CLI.
BOOT = """
import os, sys
open(sys.argv[1], "w").write(str(os.getpid()))
host = int(sys.argv[2])
if host:
    import wsi_pipeline.cores as cores
    cores.cpu_limit = lambda: cores.CpuLimit(host, host, None)
from wsi_pipeline.cli import main
sys.argv = ["wsi-infer", *sys.argv[3:]]
main()
"""


def make_cgroup(quota_cpus: float) -> tuple[Path, Path]:
    """A fresh child cgroup limited to ``quota_cpus``: (its folder, its procs file)."""
    name = f"wsi-bench-{uuid.uuid4().hex[:8]}"
    v1 = Path("/sys/fs/cgroup/cpu")
    period = 100_000
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            cg = v1 / name
            cg.mkdir()
            (cg / "cpu.cfs_quota_us").write_text(str(int(quota_cpus * period)))
            return cg, cg / "cgroup.procs"
        v2 = Path("/sys/fs/cgroup")
        cg = v2 / name
        cg.mkdir()
        (cg / "cpu.max").write_text(f"{int(quota_cpus * period)} {period}")
        return cg, cg / "cgroup.procs"
    except OSError as exc:
        raise SystemExit(f"cannot make a CPU-limited cgroup here ({exc}); run as root on Linux") from exc


def timed(procs: Path, host_cores: int, slide: Path, model: Path, out: Path) -> tuple[float, dict[str, Any]]:
    shutil.rmtree(out.parent, ignore_errors=True)
    cmd = [sys.executable, "-c", BOOT, str(procs), str(host_cores), str(slide), "--out", str(out),
           "--model", str(model), "-q"]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"the run failed: {proc.stderr}")
    return wall, json.loads(out.with_suffix(".run.json").read_text())["thread_plan"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-pipeline")
    ap.add_argument("--quota", type=float, default=1.0, help="CPUs of the cgroup's quota")
    ap.add_argument("--host-cores", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--models", default="tilenet,resnet18")
    ap.add_argument("--slides", default="mosaic,sample")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    compileall.compile_dir(str(ROOT / "wsi_pipeline"), quiet=1)
    models = bench_models(args.models, args.work)
    slides = [mosaic(args.work, 9250) if s == "mosaic" else ("bundled CMU-1-Small-Region", SAMPLE)
              for s in args.slides.split(",")]  # fmt: skip
    cg, procs = make_cgroup(args.quota)
    rows: list[dict[str, Any]] = []
    try:
        for label, slide in slides:
            for name, model in models.items():
                best = {"quota": float("inf"), "host": float("inf")}
                plans: dict[str, Any] = {}
                for _ in range(args.repeat):
                    for k, host in (("quota", 0), ("host", args.host_cores)):
                        out = args.work / f"cpu-limit-{k}" / "m.tif"
                        wall, plans[k] = timed(procs, host, slide, model, out)
                        best[k] = min(best[k], wall)
                row = {
                    "slide": label, "model": name, "quota_cpus": args.quota, "host_cores": args.host_cores,
                    "quota_plan_s": round(best["quota"], 3), "host_plan_s": round(best["host"], 3),
                    "ratio": round(best["quota"] / best["host"], 3),
                    "quota_plan_threads": plans["quota"]["session_threads"],
                    "host_plan_threads": plans["host"]["session_threads"],
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{label} | {name} | quota {args.quota:g} CPU: quota plan ({row['quota_plan_threads']} "
                    f"threads) {best['quota']:.2f} s, host plan ({row['host_plan_threads']} threads) "
                    f"{best['host']:.2f} s = {row['ratio']:.3f}x the time"
                )
    finally:
        cg.rmdir()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
