"""Score tiles with the ONNX classifier in parallel through Dask.

The client plans the source (a slide: thumbnail, mask, grid, stain fit; or a finished tile store);
each Dask task gets the source's small picklable part and a chunk of tile *coordinates* (a few
hundred), reads (and normalizes) its tiles through :func:`~wsi_pipeline.tiling.source.read_chunk`,
scores them and returns only the probabilities. Pixels never travel from the client.
Each worker process builds one onnxruntime session per (model, device) lazily and reuses it
(sessions cannot be pickled). By default Dask's local threaded scheduler runs the tasks; pass a
``distributed.Client`` (or ``--scheduler ADDRESS``) to run them on a cluster, with retries.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.inference.card import ModelCard, load_card
from wsi_pipeline.inference.session import create_session, predict_with_ood
from wsi_pipeline.tiling.source import TaskSource, TileSource, read_chunk

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class ChunkTask:
    """One Dask task: which tiles of which source, and how to score them (small, picklable)."""

    source: TaskSource
    colrow: np.ndarray  # (n, 2) grid positions of this chunk's tiles
    start: int  # index of the first tile in the source's tile order
    card_path: str
    onnx_path: str
    device: str
    batch_size: int
    threads: int | None


@functools.lru_cache(maxsize=4)
def cached_session(
    card_path: str, onnx_path: str, device: str, threads: int | None
) -> tuple[Any, str, ModelCard]:
    """One session per worker process and model (onnxruntime sessions are thread-safe to run)."""
    from dataclasses import replace

    card = replace(load_card(card_path), onnx_path=Path(onnx_path))
    session, provider = create_session(card, device, threads=threads)
    return session, provider, card


def probe_session(card_path: str, onnx_path: str, device: str, threads: int | None = None) -> str:
    """Build (and cache) this worker's session for a model; returns the provider really used.

    Submitted once to a cluster before a batch, so a model that does not load or a device a worker
    lacks is reported once, before any slide is planned (``workflows/batch_folder.py``).
    """
    return str(cached_session(card_path, onnx_path, device, threads)[1])


ChunkResult = tuple[np.ndarray, str, float, float, "np.ndarray | None"]


def score_chunk(task: ChunkTask) -> ChunkResult:
    """Run one task: (probabilities (n, classes) float32, provider, read s, infer s, OOD distances (n,))."""
    session, provider, card = cached_session(task.card_path, task.onnx_path, task.device, task.threads)
    t0 = time.perf_counter()
    tiles = read_chunk(task.source, task.colrow, task.start)
    t1 = time.perf_counter()
    probs, ood = predict_with_ood(session, card, tiles, batch_size=task.batch_size)
    return probs, provider, t1 - t0, time.perf_counter() - t1, ood


@dataclass
class ScoreResult:
    """Probabilities for every tile of a slide, in tile order, and how they were obtained."""

    probs: np.ndarray  # (N, n_classes) float32
    provider: str
    seconds: float
    read_seconds: float  # summed over tasks
    infer_seconds: float  # summed over tasks
    n_tasks: int
    scheduler: str
    ood: np.ndarray | None = None  # (N,) per-tile OOD distance, when the model has that output
    extra: dict[str, Any] = field(default_factory=dict)


def make_tasks(
    source: TileSource,
    card: ModelCard,
    *,
    device: str = "auto",
    batch_size: int = 64,
    chunk_tiles: int = 256,
    threads: int | None = None,
) -> list[ChunkTask]:
    """Split the source's tiles into tasks of ``chunk_tiles`` consecutive tiles (compact blocks)."""
    task_source, colrow = source.task_source(), source.layout.colrow
    return [
        ChunkTask(
            source=task_source,
            colrow=np.ascontiguousarray(colrow[i : i + chunk_tiles]),
            start=i,
            card_path=str(card.path),
            onnx_path=str(card.onnx_path),
            device=device,
            batch_size=batch_size,
            threads=threads,
        )
        for i in range(0, len(colrow), chunk_tiles)
    ]


def run_tasks(
    tasks: list[ChunkTask],
    n_classes: int,
    *,
    client: Any = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    retries: int = 2,
    resources: dict[str, float] | None = None,
) -> ScoreResult:
    """Run ``tasks`` locally (Dask threads) or on ``client`` (a ``distributed.Client``).

    ``resources`` (distributed only), e.g. ``{"GPU": 1}``: every task needs that much of the worker
    resources, so it runs only on workers started with ``--resources GPU=1``, one task per GPU.
    """
    total = sum(len(t.colrow) for t in tasks)
    t0 = time.perf_counter()
    results: list[ChunkResult | None] = [None] * len(tasks)
    done = 0
    if progress:
        progress(0, total)
    if client is not None:
        from distributed import as_completed

        futures = client.map(score_chunk, tasks, retries=retries, pure=False, resources=resources)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in as_completed(futures):
            i = index[fut.key]
            results[i] = fut.result()
            done += len(tasks[i].colrow)
            if progress:
                progress(done, total)
        scheduler = f"distributed {client.scheduler.address}"
    else:
        import dask
        from dask.callbacks import Callback

        n_workers = workers or min(4, os.cpu_count() or 1)
        lock = threading.Lock()
        counts = [0]

        class _Progress(Callback):
            def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                if isinstance(result, tuple) and len(result) == 5 and progress:
                    with lock:
                        counts[0] += len(result[0])
                        progress(counts[0], total)

        delayed = [dask.delayed(score_chunk, pure=False)(t) for t in tasks]
        with _Progress():
            computed = dask.compute(*delayed, scheduler="threads", num_workers=n_workers)
        results = list(computed)
        scheduler = f"dask threads x{n_workers}"
    parts = [r for r in results if r is not None]
    probs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, n_classes), np.float32)
    providers = sorted({p[1] for p in parts})
    has_ood = bool(parts) and all(p[4] is not None for p in parts)
    ood = np.concatenate([np.asarray(p[4]) for p in parts]) if has_ood else None
    return ScoreResult(
        ood=ood,
        probs=probs,
        provider=",".join(providers) if providers else "none",
        seconds=time.perf_counter() - t0,
        read_seconds=sum(p[2] for p in parts),
        infer_seconds=sum(p[3] for p in parts),
        n_tasks=len(tasks),
        scheduler=scheduler,
    )
