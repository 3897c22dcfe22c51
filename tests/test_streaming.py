"""The streaming scorer (issue 17): one session fed full batches across read units, tiles in order,
readers ahead of the session, a thread plan without oversubscription."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Fixture
from wsi_pipeline.inference.card import resolve_model
from wsi_pipeline.inference.scoring import (
    ChunkTask,
    cached_session,
    make_tasks,
    score_chunk,
    stream_score,
    thread_plan,
)
from wsi_pipeline.inference.session import predict_with_ood
from wsi_pipeline.tiling.plan import TileOptions
from wsi_pipeline.tiling.source import open_source, read_chunk


class RecordingSession:
    """Wraps a real onnxruntime session and records the batch sizes and the thread of every run."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []
        self.threads: set[int] = set()

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        self.batches.append(len(next(iter(feeds.values()))))
        self.threads.add(threading.get_ident())
        return self.session.run(names, feeds)


def _units(tumour_slide: Fixture, test_model: Path, sizes: list[int]) -> tuple[list[ChunkTask], Any]:
    card = resolve_model(test_model)
    source = open_source(tumour_slide.path, TileOptions())
    (task,) = make_tasks(source, card, chunk_tiles=10_000)
    units, at = [], 0
    for n in sizes:
        units.append(replace(task, colrow=task.colrow[at : at + n], start=at))
        at += n
    return units, card


def test_batches_are_full_across_read_units_and_tiles_stay_in_order(
    tumour_slide: Fixture, test_model: Path
) -> None:
    units, card = _units(tumour_slide, test_model, [5, 7, 3, 11, 2, 9, 6])
    session = RecordingSession(cached_session(str(card.path), str(card.onnx_path), "cpu", 1)[0])
    probs, ood, stats = stream_score(units, session, card, batch_size=8, readers=2)
    assert session.batches == [8, 8, 8, 8, 8, 3]  # 43 tiles: full batches, one remainder at the end
    assert session.threads == {threading.get_ident()}  # one session, run from one thread
    tiles = np.concatenate([read_chunk(u.source, u.colrow, u.start) for u in units])
    expected, expected_ood = predict_with_ood(session.session, card, tiles, batch_size=8)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert ood is None and expected_ood is None  # this test model has no OOD output
    assert stats.batches == 6 and stats.read_s > 0 and stats.infer_s > 0


def test_readers_work_ahead_of_the_session(tumour_slide: Fixture, test_model: Path) -> None:
    """While the session runs a batch, the next unit is being read (a slow model hides the reads)."""
    units, card = _units(tumour_slide, test_model, [8] * 6)
    real = cached_session(str(card.path), str(card.onnx_path), "cpu", 1)[0]

    class Slow(RecordingSession):
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
            time.sleep(0.15)
            return super().run(names, feeds)

    _, _, stats = stream_score(units, Slow(real), card, batch_size=8, readers=1)
    # Only the first unit is waited for; the others were read during the previous batch's 0.15 s.
    assert stats.wait_s < stats.read_s / 2 + 0.1
    assert stats.wait_s < 0.15 * 2


def test_chunk_task_on_a_worker_streams_within_the_task(tumour_slide: Fixture, test_model: Path) -> None:
    card = resolve_model(test_model)
    source = open_source(tumour_slide.path, TileOptions())
    tasks = make_tasks(source, card, batch_size=16, chunk_tiles=40, threads=1)
    parts = [score_chunk(t) for t in tasks]
    probs = np.concatenate([p[0] for p in parts])
    tiles = np.concatenate([read_chunk(t.source, t.colrow, t.start) for t in tasks])
    session = cached_session(str(card.path), str(card.onnx_path), "auto", 1)[0]
    np.testing.assert_allclose(probs, predict_with_ood(session, card, tiles)[0], atol=1e-6)


@pytest.mark.parametrize(
    ("cores", "device", "session_threads", "readers"),
    [(2, "cpu", 2, 1), (16, "cpu", 16, 2), (16, "cuda", 1, 15), (1, "cpu", 1, 1)],
)
def test_thread_plan_gives_one_session_the_cores(
    cores: int, device: str, session_threads: int, readers: int
) -> None:
    plan = thread_plan(cores, device=device)
    assert (plan.session_threads, plan.readers) == (session_threads, readers)
    assert thread_plan(cores, device=device, readers=3).readers == 3
