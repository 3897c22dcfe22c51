"""The GPU path measured for real: one short script to run on a GPU machine (issue 17).

For each model (the shipped TileNet; a random-weights ResNet-18 from ``testkit.resnet`` when torch is
there, else an ONNX file given with ``--resnet``) on ``--device`` (``cuda`` or ``tensorrt``; ``cpu``
only checks the script itself), on real tiles (the bundled sample's tissue tiles, repeated to
``--tiles``), best of ``--repeat``:

* **model alone, as the pipeline runs it**: prepared batches through ``session.run`` (plain) and
  through the pipeline's :class:`~wsi_pipeline.inference.binding.BoundRunner` (I/O binding, pinned
  input when onnxruntime offers it), in fp32 and fp16, at batch 64 and 256: tiles/s;
* **agreement**: the largest |P - P(CPU fp32)| of every variant on the same tiles;
* **end to end**: the whole ``wsi-infer`` command on ``--slide`` (default: the bundled sample, or the
  real-tile mosaic of ``bench_pipeline`` with ``--mosaic``) with ``--device``, precision auto and
  fp32: wall seconds, tiles/s, the manifest's ``run`` section (precision, pinned input), and the GPU
  utilisation that ``nvidia-smi`` samples every 100 ms during the run (mean, max).

A device that onnxruntime cannot use stops the script at once with the reason (never a CPU run
reported as the GPU's). The model-alone part needs only numpy, onnxruntime(-gpu), onnx and the
model card's jsonschema: on a machine without the slide libraries, save the tiles where they are
(``--save-tiles tiles.npy``) and measure there with ``--tiles-from tiles.npy --no-e2e``.
Usage (from the repository root)::

    python -m benchmarks.bench_gpu --device cuda [--mosaic] [--tiles 2048] [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.errors import WsiError
from wsi_pipeline.inference.binding import BoundRunner
from wsi_pipeline.inference.card import ModelCard, resolve_model
from wsi_pipeline.inference.precision import convert_fp16
from wsi_pipeline.inference.session import PROVIDERS, create_session, prepare_batch, run_prepared

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "CMU-1-Small-Region.svs"


def sample_tiles(card: ModelCard) -> np.ndarray:
    """Every tissue tile of the bundled sample at the model's size and um/px (needs the slide
    libraries), as ``check-model`` cuts them."""
    from wsi_pipeline.inference.check import sample_tiles as cut

    got = cut(card.input_size_px, card.mpp, 100_000, slide=SAMPLE)
    return got.tiles


def real_tiles(card: ModelCard, n: int, tiles_from: Path | None = None) -> np.ndarray:
    """Real tiles repeated to ``n``: the bundled sample's, or those saved in ``tiles_from``
    (``--save-tiles``: for a machine without the slide libraries)."""
    tiles = np.load(tiles_from) if tiles_from is not None else sample_tiles(card)
    want = (card.input_size_px, card.input_size_px, 3)
    if tiles.dtype != np.uint8 or tiles.shape[1:] != want:
        raise SystemExit(f"{tiles_from}: tiles {tiles.dtype} {tiles.shape[1:]}, the model takes uint8 {want}")
    return np.resize(tiles, (n, *tiles.shape[1:]))


def sessions(card: ModelCard, device: str, work: Path) -> dict[str, Any]:
    """fp32 and fp16 sessions of ``card`` on ``device`` (fp16 from the pipeline's own converter; on
    TensorRT its fp16 engine), whatever the card allows: this measures the model, not the rule."""
    import onnxruntime as ort

    out = {"fp32": create_session(card, device, precision="fp32")[0]}
    provider = PROVIDERS[device]
    if device == "tensorrt":
        from wsi_pipeline.inference.session import _tensorrt_options

        first: Any = (provider, _tensorrt_options(True))
        out["fp16"] = ort.InferenceSession(str(card.onnx_path), providers=[first, PROVIDERS["cpu"]])
    else:
        half = convert_fp16(card.onnx_path, work / f"{card.onnx_path.stem}-fp16.onnx")
        extra = [] if device == "cpu" else [PROVIDERS["cpu"]]
        out["fp16"] = ort.InferenceSession(str(half), providers=[provider, *extra])
    for name, s in out.items():
        if s.get_providers()[0] != provider:
            used = s.get_providers()[0]
            raise SystemExit(f"{card.name} {name}: onnxruntime runs on {used}, not {provider}")
    return out


def model_rates(
    card: ModelCard, device: str, tiles: np.ndarray, repeat: int, work: Path
) -> list[dict[str, Any]]:
    """tiles/s and |dP| against CPU fp32 for every (precision, plain/bound, batch)."""
    reference = run_prepared(create_session(card, "cpu")[0], card, prepare_batch(tiles[:256], card))[0]
    rows = []
    for precision, session in sessions(card, device, work).items():
        for batch in (64, 256):
            batches = [prepare_batch(tiles[i : i + batch], card) for i in range(0, len(tiles), batch)]
            bound = BoundRunner(session, card, PROVIDERS[device])

            def plain(x: np.ndarray, session: Any = session) -> Any:
                return run_prepared(session, card, x)

            ways: dict[str, Any] = {"plain": plain, "bound": bound}
            best = dict.fromkeys(ways, 0.0)
            for run in ways.values():
                run(batches[0])  # warm-up (cuDNN algorithm search, TensorRT engine)
            for r in range(repeat):  # the two ways alternate, each first in every other round
                for how in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                    t = time.perf_counter()
                    for x in batches:
                        ways[how](x)
                    best[how] = max(best[how], len(tiles) / (time.perf_counter() - t))
            for how, run in ways.items():
                p = np.concatenate([run(x)[0] for x in batches])[: len(reference)]
                dp = float(np.abs(p - reference).max())
                rows.append({
                    "model": card.name, "precision": precision, "batch": batch, "io": how,
                    "tiles_per_s": round(best[how], 1), "max_abs_dp_vs_cpu_fp32": dp,
                    "pinned_input": bound.pinned if how == "bound" else None,
                })  # fmt: skip
    return rows


class GpuSampler:
    """``nvidia-smi`` utilisation (%) every 100 ms while in use; no samples where there is none."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                continue

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def summary(self) -> dict[str, Any]:
        s = self.samples
        return {"gpu_util_mean": round(float(np.mean(s)), 1) if s else None,
                "gpu_util_max": max(s) if s else None, "gpu_util_samples": len(s)}  # fmt: skip


def end_to_end(
    slide: Path, model: Path, device: str, precision: str, batch: int, out: Path
) -> dict[str, Any]:
    """The whole command with ``--device``: wall, tiles/s, the manifest's run section, GPU utilisation."""
    cmd = [sys.executable, "-m", "wsi_pipeline.cli", str(slide), "--out", str(out), "--model", str(model),
           "--device", device, "--precision", precision, "--batch-size", str(batch),
           "--overwrite", "-q"]  # fmt: skip
    with GpuSampler() as gpu:
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if r.returncode:
        return {"precision_requested": precision, "error": r.stderr.strip()[-500:]}
    m = json.loads(out.with_suffix(".run.json").read_text())
    return {"slide": slide.name, "precision_requested": precision, "batch": batch, "tiles": m["n_tiles"],
            "wall_s": round(wall, 3), "tiles_per_s": round(m["n_tiles"] / wall, 1),
            "scoring_s": m["timings"]["scoring_s"], "provider": m["provider"], "run": m["run"],
            "thread_plan": m["thread_plan"], **gpu.summary()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "tensorrt", "cpu"], default="cuda")
    ap.add_argument("--tiles", type=int, default=2048, help="tiles per model-alone pass")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--resnet", type=Path, help="a ResNet-18 ONNX with its card (default: built with torch)")
    ap.add_argument("--no-resnet", action="store_true")
    ap.add_argument("--slide", type=Path, default=SAMPLE)
    ap.add_argument("--mosaic", action="store_true", help="end to end on bench_pipeline's 9,250 px mosaic")
    ap.add_argument("--batch", type=int, default=256, help="batch size of the end-to-end runs")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wsi-bench-gpu")
    ap.add_argument(
        "--tiles-from", type=Path, help="real tiles saved by --save-tiles (.npy), instead of the sample"
    )
    ap.add_argument(
        "--save-tiles", type=Path, help="save the sample's tiles for the shipped model here and stop"
    )
    ap.add_argument("--no-e2e", action="store_true", help="model alone only (no slide libraries needed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.save_tiles is not None:
        np.save(args.save_tiles, sample_tiles(resolve_model(None)))
        print(f"saved {args.save_tiles}")
        return 0
    import onnxruntime as ort

    provider = PROVIDERS[args.device]
    available = ort.get_available_providers()
    report: dict[str, Any] = {"device": args.device, "onnxruntime": ort.__version__,
                              "available": available, "models": [], "end_to_end": []}  # fmt: skip
    if provider not in available:
        print(f"error: onnxruntime {ort.__version__} here has no {provider} (it has {', '.join(available)}): "
              "install onnxruntime-gpu for this CUDA", file=sys.stderr)  # fmt: skip
        return 10
    if shutil.which("nvidia-smi"):
        report["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    cards = [resolve_model(None)]
    if not args.no_resnet:
        if args.resnet is not None:
            cards.append(resolve_model(args.resnet))
        else:
            try:
                from testkit.resnet import export_resnet18

                cards.append(resolve_model(export_resnet18(args.work / "models")))
            except ImportError as exc:
                print(f"note: no ResNet-18 ({exc}); pass --resnet MODEL.onnx", file=sys.stderr)
    slide = args.slide
    if args.mosaic:
        from benchmarks.bench_pipeline import mosaic

        slide = mosaic(args.work, 9250)[1]
    try:
        for card in cards:
            tiles = real_tiles(card, args.tiles, args.tiles_from)
            for row in model_rates(card, args.device, tiles, args.repeat, args.work):
                report["models"].append(row)
                pinned = "" if row["pinned_input"] is None else f", pinned {row['pinned_input']}"
                print(f"{row['model']:12s} {row['precision']} batch {row['batch']:4d} {row['io']:5s}: "
                      f"{row['tiles_per_s']:9.1f} tiles/s, "
                      f"|dP| vs CPU fp32 {row['max_abs_dp_vs_cpu_fp32']:.2e}{pinned}")  # fmt: skip
            for precision in () if args.no_e2e else ("auto", "fp32"):
                row = end_to_end(slide, card.onnx_path, args.device, precision, args.batch,
                                 args.work / f"{card.name}-{precision}.tif")  # fmt: skip
                report["end_to_end"].append({"model": card.name, **row})
                print(f"{card.name:12s} end to end ({precision}): {json.dumps(row)}")
    except WsiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
