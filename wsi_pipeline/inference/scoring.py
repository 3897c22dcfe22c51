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
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipeline.cores import cpu_limit, usable_cores
from wsi_pipeline.inference.binding import RunFn, describe_runner, make_runner
from wsi_pipeline.inference.card import ModelCard, load_card
from wsi_pipeline.inference.session import check_tiles, create_session, prepare_batch, run_prepared
from wsi_pipeline.tiling.focus import focus_measurable, focus_scores
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
    precision: str = "auto"  # fp32, fp16 or auto (fp16 on a GPU where the card allows it)


@functools.lru_cache(maxsize=4)
def cached_session(
    card_path: str, onnx_path: str, device: str, threads: int | None, precision: str = "auto"
) -> tuple[Any, str, ModelCard]:
    """One session per worker process and model (onnxruntime sessions are thread-safe to run).

    Its intra-op threads do not spin between batches: reader threads decode on the same cores (on 2
    cores spinning cost TileNet 13% of its throughput, 494 vs 569 tiles/s, and ResNet-18 3%).
    """
    card = replace(load_card(card_path), onnx_path=Path(onnx_path))
    session, provider = create_session(
        card, device, threads=threads, spinning=False, cache=True, precision=precision
    )
    return session, provider, card


_bound: weakref.WeakKeyDictionary[Any, RunFn] = weakref.WeakKeyDictionary()
_bound_lock = threading.Lock()


def session_runner(session: Any, card: ModelCard, provider: str) -> RunFn:
    """How batches run on ``session`` (:func:`~wsi_pipeline.inference.binding.make_runner`): I/O binding
    with pinned host buffers on a GPU, kept with the session so its buffers are made once per process."""
    if provider == "CPUExecutionProvider":
        return make_runner(session, card, provider)
    with _bound_lock:
        if session not in _bound:
            _bound[session] = make_runner(session, card, provider)
        return _bound[session]


def run_details(card: ModelCard, provider: str, precision: str, run: RunFn | None = None) -> dict[str, Any]:
    """For the run manifest: the precision really used and how batches reach the device."""
    from wsi_pipeline.inference.precision import resolve_precision, why_fp32

    out: dict[str, Any] = {"precision": resolve_precision(card, provider, precision)}
    if precision == "auto" and out["precision"] == "fp32" and provider != "CPUExecutionProvider":
        out["why_fp32"] = why_fp32(card, provider)
    return out | (describe_runner(run) if run is not None else {})


def probe_session(
    card_path: str, onnx_path: str, device: str, threads: int | None = None, precision: str = "auto"
) -> str:
    """Build (and cache) this worker's session for a model; returns the provider really used.

    Submitted once to a cluster before a batch, so a model that does not load or a device a worker
    lacks is reported once, before any slide is planned (``workflows/batch_folder.py``).
    """
    return str(cached_session(card_path, onnx_path, device, threads, precision)[1])


@dataclass(frozen=True)
class ThreadPlan:
    """How one process uses its cores: one onnxruntime session with ``session_threads`` intra-op
    threads, fed by ``readers`` reader/decoder threads, each keeping up to ``queue_batches`` read
    units (one batch each) ready ahead of the session; half as many, at least one, for a float input
    (4x the bytes of its uint8 tiles). Recorded in the run manifest."""

    cores: int
    session_threads: int
    readers: int
    queue_batches: int = 2
    cores_from: str = ""  # where ``cores`` comes from (affinity mask, container CPU quota)

    def to_dict(self) -> dict[str, int | str]:
        return {"cores": self.cores, "session_threads": self.session_threads, "readers": self.readers,
                "queue_batches": self.queue_batches, "cores_from": self.cores_from}  # fmt: skip


def thread_plan(cores: int | None = None, *, device: str = "cpu", readers: int | None = None) -> ThreadPlan:
    """The thread plan for ``cores`` CPU cores (default: all this process may use, a container's CPU
    quota included: :func:`wsi_pipeline.cores.cpu_limit`).

    On the CPU the model needs every core and reading a few percent of them: the session gets all
    cores and one reader thread decodes ahead (two from 8 cores), instead of several sessions that
    each spawn a thread per core. On a GPU the session needs one CPU thread and readers get the rest.
    """
    if cores:
        n, source = max(1, cores), "given"
    else:
        limit = cpu_limit()
        n, source = limit.cores, limit.describe()
    if device in ("cuda", "tensorrt"):
        return ThreadPlan(n, 1, readers or max(1, n - 1), 2, source)
    return ThreadPlan(n, n, readers or (1 if n < 8 else 2), cores_from=source)


@dataclass
class _Stream:
    """What :func:`stream_score` measured (seconds summed over reader threads for ``read_s``)."""

    read_s: float = 0.0
    infer_s: float = 0.0
    wait_s: float = 0.0  # the session waiting for tiles: reading is the bottleneck when this is large
    batches: int = 0


def stream_score(
    units: list[ChunkTask],
    session: Any,
    card: ModelCard,
    *,
    batch_size: int,
    readers: int,
    progress: ProgressFn | None = None,
    done_before: int = 0,
    total: int | None = None,
    runner: RunFn | None = None,
    ahead_per_reader: int = 2,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, _Stream]:
    """Score ``units`` (read units of one source, in tile order) with one session: (probabilities,
    OOD distances or None, focus scores or None, what was measured).

    ``readers`` threads read, decode and prepare units ahead (uint8 tiles to the model's input,
    :func:`prepare_batch`; each tile's focus score, :func:`~wsi_pipeline.tiling.focus.focus_scores`,
    where the model's um/px allows it) into a bounded window; this thread cuts the stream
    into full batches of ``batch_size`` across unit boundaries and runs them, so the session never
    waits on a partial batch and never competes with other sessions for the cores. The first unit
    is run as it comes (a short first unit starts the session early: :func:`first_batch_tiles`).
    ``runner`` runs each prepared batch (default: ``session.run``; on a GPU, I/O binding:
    :func:`session_runner`). Each reader keeps up to ``ahead_per_reader`` units ready (half as many,
    at least one, for a float input: :class:`ThreadPlan`).
    """
    from wsi_pipeline.tiling.read import ordered_map

    n = sum(len(u.colrow) for u in units)
    total = n if total is None else total
    probs = np.empty((n, len(card.classes)), np.float32)
    ood = np.empty(n, np.float32) if card.ood_output else None
    focus = np.empty(n, np.float32) if focus_measurable(card.input_size_px, card.mpp) else None
    first = units[0].start if units else 0
    stats = _Stream()
    lock = threading.Lock()

    def read(unit: ChunkTask) -> np.ndarray:
        t = time.perf_counter()
        tiles = read_chunk(unit.source, unit.colrow, unit.start)
        check_tiles(tiles, card)
        if focus is not None:  # each unit its own slice: readers never write the same elements
            at = unit.start - first
            focus[at : at + len(tiles)] = focus_scores(tiles, card.mpp)
        x = prepare_batch(tiles, card)  # the model's input, made here so the session never waits on it
        with lock:
            stats.read_s += time.perf_counter() - t
        return x

    batch: np.ndarray | None = None  # for batches cut across units; a unit of one batch runs as it is
    filled = out_at = 0

    def run(x: np.ndarray) -> None:
        nonlocal out_at
        t = time.perf_counter()
        p, d = runner(x) if runner is not None else run_prepared(session, card, x)
        stats.infer_s += time.perf_counter() - t
        stats.batches += 1
        k = len(x)
        probs[out_at : out_at + k] = p
        if ood is not None and d is not None:
            ood[out_at : out_at + k] = d
        out_at += k
        if progress:
            progress(done_before + out_at, total)

    # Each reader keeps up to two units in flight: about two batches of tiles ahead per reader; one for
    # a float input, 4x the bytes of its uint8 tiles (ResNet-18 at batch 64: 38 MB a unit, read and
    # prepared in 0.04 s while the session runs the previous one for 0.5 s).
    per_reader = ahead_per_reader if card.input_dtype == "uint8" else max(1, ahead_per_reader // 2)
    stream = ordered_map(read, units, readers, readers * per_reader, ahead=True)
    while True:
        t = time.perf_counter()
        x = next(stream, None)
        stats.wait_s += time.perf_counter() - t
        if x is None:
            break
        if stats.batches == 0 and filled == 0 and len(x) < batch_size:
            run(x)  # the first unit: run now, not once a full batch is read
            continue
        i = 0
        while i < len(x):
            take = min(batch_size - filled, len(x) - i)
            if filled == 0 and take == batch_size:
                run(x[i : i + take])  # a whole batch within the unit: no copy
            else:
                if batch is None:
                    batch = np.empty((batch_size, *x.shape[1:]), x.dtype)
                batch[filled : filled + take] = x[i : i + take]
                filled += take
                if filled == batch_size:
                    run(batch)
                    filled = 0
            i += take
    if filled:
        assert batch is not None
        run(batch[:filled])
    return probs, ood, focus, stats


def first_batch_tiles(batch_size: int) -> int:
    """Tiles in the first batch of a stream: a quarter batch, read in a quarter of the time, so the
    session starts while the reader fills the first full batch (on a small slide, waiting for a full
    first batch idled the session for 0.06 s of its 0.5 s)."""
    return max(1, batch_size // 4)


def read_units(tasks: list[ChunkTask], tiles: int, *, first: int | None = None) -> list[ChunkTask]:
    """``tasks`` cut into read units of ``tiles`` consecutive tiles (one batch each), in tile order;
    with ``first``, the very first unit has only that many tiles."""
    step = max(1, tiles)
    units: list[ChunkTask] = []
    for task in tasks:
        i = 0
        while i < len(task.colrow):
            n = first if first and not units else step
            units.append(replace(task, colrow=task.colrow[i : i + n], start=task.start + i))
            i += n
    return units


ChunkResult = tuple[np.ndarray, str, float, float, "np.ndarray | None", "np.ndarray | None"]


def _worker_threads() -> int | None:
    """Cores per task on a ``distributed`` worker (its cores over its task slots), None elsewhere."""
    try:
        from distributed import get_worker

        return max(1, usable_cores() // max(1, get_worker().state.nthreads))
    except (ImportError, ValueError):
        return None


def score_chunk(task: ChunkTask) -> ChunkResult:
    """Run one task: (probabilities (n, classes) float32, provider, read s, infer s, OOD distances (n,),
    focus scores (n,)); the last two None where the model has no OOD output or focus is not measured.

    On a cluster worker the session gets the worker's cores over its task slots (start workers with
    ``--nthreads 1`` to give one task all of them) and one reader decodes ahead within the task.
    """
    threads = task.threads or _worker_threads()
    session, provider, card = cached_session(
        task.card_path, task.onnx_path, task.device, threads, task.precision
    )
    units = read_units([task], task.batch_size, first=first_batch_tiles(task.batch_size))
    run = session_runner(session, card, provider)
    probs, ood, focus, st = stream_score(
        units, session, card, batch_size=task.batch_size, readers=1, runner=run
    )
    return probs, provider, st.read_s, st.infer_s, ood, focus


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
    focus: np.ndarray | None = None  # (N,) per-tile focus score (tiling.focus), where it is measured
    extra: dict[str, Any] = field(default_factory=dict)


def make_tasks(
    source: TileSource,
    card: ModelCard,
    *,
    device: str = "auto",
    batch_size: int = 64,
    chunk_tiles: int = 256,
    threads: int | None = None,
    precision: str = "auto",
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
            precision=precision,
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
    """Run ``tasks`` in this process (one session, readers ahead: :func:`stream_score`) or on ``client``
    (a ``distributed.Client``: one task per chunk, each scored the same way on its worker).

    ``workers`` (local): reader threads (default from :func:`thread_plan`).

    ``resources`` (distributed only), e.g. ``{"GPU": 1}``: every task needs that much of the worker
    resources, so it runs only on workers started with ``--resources GPU=1``, one task per GPU.
    """
    total = sum(len(t.colrow) for t in tasks)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
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
        # One process: one session with every core, readers decoding ahead (see ThreadPlan); Dask
        # threads would run one session.run per thread and multiply inference threads on the cores.
        plan = thread_plan(readers=workers, device=tasks[0].device if tasks else "cpu")
        if tasks:
            t = tasks[0]
            session, provider, card = cached_session(
                t.card_path, t.onnx_path, t.device, plan.session_threads, t.precision
            )
            units = read_units(tasks, t.batch_size, first=first_batch_tiles(t.batch_size))
            run = session_runner(session, card, provider)
            probs, ood, focus, st = stream_score(
                units, session, card, batch_size=t.batch_size, readers=plan.readers, progress=progress,
                total=total, runner=run, ahead_per_reader=plan.queue_batches,
            )  # fmt: skip
            results = [(probs, provider, st.read_s, st.infer_s, ood, focus)]
            extra = {"thread_plan": plan.to_dict(), "wait_s": round(st.wait_s, 3), "batches": st.batches,
                     "run": run_details(card, provider, t.precision, run)}  # fmt: skip
        scheduler = f"stream: 1 session x {plan.session_threads} threads, {plan.readers} reader(s)"
    parts = [r for r in results if r is not None]
    probs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, n_classes), np.float32)
    providers = sorted({p[1] for p in parts})
    has_ood = bool(parts) and all(p[4] is not None for p in parts)
    ood = np.concatenate([np.asarray(p[4]) for p in parts]) if has_ood else None
    has_focus = bool(parts) and all(p[5] is not None for p in parts)
    focus = np.concatenate([np.asarray(p[5]) for p in parts]) if has_focus else None
    return ScoreResult(
        ood=ood,
        focus=focus,
        probs=probs,
        provider=",".join(providers) if providers else "none",
        seconds=time.perf_counter() - t0,
        read_seconds=sum(p[2] for p in parts),
        infer_seconds=sum(p[3] for p in parts),
        n_tasks=len(tasks),
        scheduler=scheduler,
        extra=extra,
    )
