"""Where onnxruntime's optimized copy of a model is kept between runs (CPU sessions).

Building a CPU session optimizes the graph (layout transforms, fusions, weight packing): 0.085 s of
every run for a 45 MB ResNet-18, a third of a second on a small slide's critical path, and again in
every Dask worker. onnxruntime can save the optimized graph and load it with optimization off
(0.011 s, the same outputs bit for bit). The optimized graph may hold optimizations for this CPU, so
its file name is a digest of everything it depends on: the model's sha256 (checked against its card
before any session), the onnxruntime version, the provider and this CPU's model and instruction sets.

The folder is :func:`wsi_pipeline.cache.cache_dir`'s ``onnxruntime/``. A file is written under a
temporary name and renamed, so a crash or a concurrent run never leaves half a model; one that does
not load is rebuilt; a folder that cannot be written only means no cache.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

from wsi_pipeline.cache import cache_dir
from wsi_pipeline.inference.card import ModelCard

#: models larger than this keep their weights outside the ONNX file when saved: not cached
MAX_CACHED_BYTES = 1 << 30


@functools.lru_cache(maxsize=1)
def cpu_identity() -> str:
    """This CPU's model name and instruction-set flags (Linux ``/proc/cpuinfo``), else the platform's
    processor and machine strings."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            fields = {}
            for line in fh:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        return f"{fields.get('model name', '')}|{fields.get('flags', '')}"
    except OSError:
        return f"{platform.processor()}|{platform.machine()}"


def optimized_model_path(card: ModelCard, provider: str, ort_version: str) -> Path | None:
    """The cache file for ``card``'s model optimized for ``provider`` on this CPU, or None when this
    model is not cached (caching off, no sha256, not a CPU session, or a model over 1 GiB)."""
    folder = cache_dir()
    if folder is None or not card.sha256 or provider != "CPUExecutionProvider":
        return None
    try:
        if card.onnx_path.stat().st_size > MAX_CACHED_BYTES:
            return None
    except OSError:
        return None
    key = hashlib.sha256(f"{card.sha256}|{ort_version}|{provider}|{cpu_identity()}".encode()).hexdigest()
    return folder / "onnxruntime" / f"{file_stem(card.onnx_path)}-{key[:24]}.onnx"


def file_stem(path: Path) -> str:
    """The start of a cache file's name for the model at ``path``: its stem, safe in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)[:40]
