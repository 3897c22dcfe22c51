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
    first_batch_tiles,
    make_tasks,
    read_units,
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
    probs, ood, _, stats = stream_score(units, session, card, batch_size=8, readers=2)
    # 43 tiles: the first unit as it comes (the session starts early), then full batches across unit
    # boundaries, one remainder at the end.
    assert session.batches == [5, 8, 8, 8, 8, 6]
    assert session.threads == {threading.get_ident()}  # one session, run from one thread
    tiles = np.concatenate([read_chunk(u.source, u.colrow, u.start) for u in units])
    expected, expected_ood = predict_with_ood(session.session, card, tiles, batch_size=8)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    assert ood is None and expected_ood is None  # this test model has no OOD output
    assert stats.batches == 6 and stats.read_s > 0 and stats.infer_s > 0


def test_the_model_input_is_prepared_on_the_reader_threads(
    tumour_slide: Fixture, test_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's thread only runs the session: tiles become the model's input (prepare_batch) on
    the readers, while the previous batch runs; the probabilities are the same."""
    import wsi_pipeline.inference.scoring as scoring

    prepared_on: list[int] = []
    real = scoring.prepare_batch

    def recording(tiles: np.ndarray, card: Any) -> np.ndarray:
        prepared_on.append(threading.get_ident())
        return real(tiles, card)

    monkeypatch.setattr(scoring, "prepare_batch", recording)
    units, card = _units(tumour_slide, test_model, [4, 8, 8, 8])
    session = RecordingSession(cached_session(str(card.path), str(card.onnx_path), "cpu", 1)[0])
    probs, _, _, _ = stream_score(units, session, card, batch_size=8, readers=2)
    assert session.batches == [4, 8, 8, 8]
    assert len(prepared_on) == 4 and threading.get_ident() not in prepared_on
    tiles = np.concatenate([read_chunk(u.source, u.colrow, u.start) for u in units])
    np.testing.assert_allclose(probs, predict_with_ood(session.session, card, tiles)[0], atol=1e-6)


@pytest.mark.parametrize(("batch", "expected"), [(16, [4, 16, 16, 4]), (64, [16, 24]), (1, [1] * 40)])
def test_read_units_start_with_a_short_unit_then_one_batch_each(
    tumour_slide: Fixture, test_model: Path, batch: int, expected: list[int]
) -> None:
    card = resolve_model(test_model)
    source = open_source(tumour_slide.path, TileOptions())
    tasks = make_tasks(source, card, batch_size=batch, chunk_tiles=10_000)
    (task,) = tasks
    task = replace(task, colrow=task.colrow[:40])
    units = read_units([task], batch, first=first_batch_tiles(batch))
    assert [len(u.colrow) for u in units] == expected
    assert [u.start for u in units] == list(np.cumsum([0, *expected[:-1]]))  # every tile once, in order
    np.testing.assert_array_equal(np.concatenate([u.colrow for u in units]), task.colrow)


def test_a_run_starts_the_session_on_a_quarter_batch(
    tumour_slide: Fixture, test_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_tasks: the first batch is a quarter batch, then full batches; the same probabilities."""
    import wsi_pipeline.inference.scoring as scoring

    card = resolve_model(test_model)
    source = open_source(tumour_slide.path, TileOptions())
    tasks = make_tasks(source, card, batch_size=16, chunk_tiles=10_000)
    real = cached_session(str(card.path), str(card.onnx_path), "cpu", thread_plan().session_threads)
    recording = RecordingSession(real[0])
    monkeypatch.setattr(scoring, "cached_session", lambda *a: (recording, real[1], real[2]))
    result = scoring.run_tasks(tasks, len(card.classes))
    n = source.layout.n_tiles
    assert n > 20 and recording.batches[0] == 4 and set(recording.batches[1:-1]) == {16}
    assert sum(recording.batches) == n
    tiles = read_chunk(tasks[0].source, tasks[0].colrow, 0)
    np.testing.assert_allclose(
        result.probs, predict_with_ood(real[0], card, tiles, batch_size=16)[0], atol=1e-6
    )


def test_readers_work_ahead_of_the_session(tumour_slide: Fixture, test_model: Path) -> None:
    """While the session runs a batch, the next unit is being read (a slow model hides the reads)."""
    units, card = _units(tumour_slide, test_model, [8] * 6)
    real = cached_session(str(card.path), str(card.onnx_path), "cpu", 1)[0]

    class Slow(RecordingSession):
        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
            time.sleep(0.15)
            return super().run(names, feeds)

    _, _, _, stats = stream_score(units, Slow(real), card, batch_size=8, readers=1)
    # Only the first unit is waited for; the others were read during the previous batch's 0.15 s.
    assert stats.wait_s < stats.read_s / 2 + 0.1
    assert stats.wait_s < 0.15 * 2


@pytest.mark.parametrize(
    ("dtype", "ahead", "window"), [("uint8", 2, 2), ("float32", 2, 1), ("uint8", 3, 3), ("float32", 4, 2)]
)
def test_the_read_ahead_is_two_units_a_reader_or_one_for_a_float_input(
    tumour_slide: Fixture,
    test_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    dtype: str,
    ahead: int,
    window: int,
) -> None:
    """Readers prepare the model's input; a float unit is 4x its uint8 tiles, so it is read one unit
    ahead instead of two (ResNet-18 at batch 64: 38 MB a unit)."""
    import wsi_pipeline.inference.scoring as scoring

    units, card = _units(tumour_slide, test_model, [4] * 8)
    card = replace(
        card, input_dtype=dtype, input_layout="NCHW", in_graph=False, mean=(0.5,) * 3, std=(0.2,) * 3
    )
    read: list[int] = []
    real_read = scoring.read_chunk

    def counting(*args: Any) -> np.ndarray:
        tiles = real_read(*args)
        read.append(1)
        return tiles

    monkeypatch.setattr(scoring, "read_chunk", counting)

    class Slow:
        def __init__(self) -> None:
            self.ahead: list[int] = []

        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> Any:
            x = next(iter(feeds.values()))
            assert x.dtype == np.dtype(dtype) and x.shape[1] == 3  # prepared on the readers: NCHW
            time.sleep(0.1)  # the reader fills its window meanwhile
            self.ahead.append(len(read) - len(self.ahead) - 1)  # units read beyond the one running
            return [np.tile(np.float32([[0.3, 0.7]]), (len(x), 1))]

    session = Slow()
    stream_score(units, session, card, batch_size=4, readers=1, ahead_per_reader=ahead)
    assert max(session.ahead) == window


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
    assert (plan.session_threads, plan.readers, plan.queue_batches) == (session_threads, readers, 2)
    assert thread_plan(cores, device=device, readers=3).readers == 3


def test_the_recorded_read_ahead_is_the_one_used(
    tumour_slide: Fixture, test_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_pipeline.inference.scoring as scoring

    seen: dict[str, Any] = {}
    real = scoring.stream_score

    def spy(*args: Any, **kw: Any) -> Any:
        seen.update(kw)
        return real(*args, **kw)

    monkeypatch.setattr(scoring, "stream_score", spy)
    monkeypatch.setattr(scoring, "thread_plan", lambda **kw: scoring.ThreadPlan(2, 2, 1, 3))
    card = resolve_model(test_model)
    tasks = make_tasks(open_source(tumour_slide.path, TileOptions()), card, device="cpu")
    result = scoring.run_tasks(tasks, 2)
    assert seen["ahead_per_reader"] == 3 and result.extra["thread_plan"]["queue_batches"] == 3


@pytest.mark.parametrize(
    ("dtype", "layout", "in_graph"),
    [("float32", "NCHW", False), ("float32", "NHWC", False), ("float32", "NCHW", True), ("uint8", "NCHW", True),
     ("uint8", "NHWC", True)],
)  # fmt: skip
def test_batch_preparation_is_the_card_formula_bit_for_bit(
    test_model: Path, dtype: str, layout: str, in_graph: bool
) -> None:
    """prepare_batch (one buffer, in place) gives exactly (x / 255 - mean) / std in the model's layout."""
    from wsi_pipeline.inference.session import prepare_batch

    card = replace(resolve_model(test_model), input_dtype=dtype, input_layout=layout, in_graph=in_graph,
                   mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))  # fmt: skip
    tiles = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    if dtype == "uint8":
        expected = tiles
    else:
        expected = tiles.astype(np.float32) / np.float32(255.0)
        if not in_graph:
            expected = (expected - np.asarray(card.mean, np.float32)) / np.asarray(card.std, np.float32)
    if layout == "NCHW":
        expected = expected.transpose(0, 3, 1, 2)
    got = prepare_batch(tiles, card)
    assert got.dtype == expected.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)
