"""onnxruntime's optimized copy of a model, kept between runs (issue 17, start-up): the same outputs,
rebuilt when damaged, never in the way when it cannot be written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from wsi_pipeline.errors import ModelError
from wsi_pipeline.inference.card import resolve_model
from wsi_pipeline.inference.model_cache import optimized_model_path
from wsi_pipeline.inference.session import create_session, predict
from wsi_pipeline.provenance import file_sha256

TILES = np.random.default_rng(11).integers(0, 256, (6, 224, 224, 3), dtype=np.uint8)


def _cached_files(folder: Path) -> list[Path]:
    return sorted((folder / "onnxruntime").glob("*")) if (folder / "onnxruntime").exists() else []


def test_a_second_session_loads_the_optimized_copy_with_the_same_outputs(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path))
    card = resolve_model(test_model)
    plain, _ = create_session(card, "cpu")
    expected = predict(plain, card, TILES)
    first, _ = create_session(card, "cpu", cache=True)  # builds and saves
    (saved,) = _cached_files(tmp_path)
    assert saved == optimized_model_path(card, "CPUExecutionProvider", ort.__version__)
    second, _ = create_session(card, "cpu", cache=True)  # loads the saved graph
    assert Path(second._model_path) == saved and Path(first._model_path) == card.onnx_path
    np.testing.assert_array_equal(predict(first, card, TILES), expected)
    np.testing.assert_array_equal(predict(second, card, TILES), expected)
    assert not [p for p in tmp_path.rglob("*.partial")]  # written under a temporary name, then renamed


def test_a_damaged_copy_is_rebuilt(test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path))
    card = resolve_model(test_model)
    create_session(card, "cpu", cache=True)
    (saved,) = _cached_files(tmp_path)
    good = saved.read_bytes()
    saved.write_bytes(good[: len(good) // 3])  # a copy cut short
    session, _ = create_session(card, "cpu", cache=True)
    np.testing.assert_array_equal(
        predict(session, card, TILES), predict(create_session(card, "cpu")[0], card, TILES)
    )
    assert saved.read_bytes() == good  # rebuilt in full


def test_a_cache_that_cannot_be_written_only_means_no_cache(test_model: Path, unwritable_cache: Path) -> None:
    card = resolve_model(test_model)
    session, provider = create_session(card, "cpu", cache=True)
    assert provider == "CPUExecutionProvider" and predict(session, card, TILES).shape == (6, 2)


@pytest.mark.parametrize("value", ["off", "", "0"])
def test_the_cache_can_be_turned_off(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    card = resolve_model(test_model)
    assert optimized_model_path(card, "CPUExecutionProvider", ort.__version__) is None
    create_session(card, "cpu", cache=True)
    assert not list(tmp_path.rglob("*.onnx"))


def test_the_copy_is_keyed_on_model_runtime_and_provider(
    test_model: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path))
    card = resolve_model(test_model)
    base = optimized_model_path(card, "CPUExecutionProvider", "1.32.0")
    assert base is not None and base.parent == tmp_path / "onnxruntime"
    assert optimized_model_path(card, "CPUExecutionProvider", "1.33.0") != base
    assert optimized_model_path(replace(card, sha256="0" * 64), "CPUExecutionProvider", "1.32.0") != base
    assert optimized_model_path(card, "CUDAExecutionProvider", "1.32.0") is None  # CPU sessions only
    assert optimized_model_path(replace(card, sha256=""), "CPUExecutionProvider", "1.32.0") is None


def test_a_broken_model_is_reported_as_such_with_the_cache_on(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "cache"))
    card = resolve_model(test_model)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model at all" * 10)
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        create_session(replace(card, onnx_path=broken, sha256=file_sha256(broken)), "cpu", cache=True)
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_a_card_that_passed_the_schema_is_not_validated_again_but_a_changed_one_is(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schema check (jsonschema's import and validation: 0.04 s of every command) runs once per
    card content; any change to the card, or a schema that changed, checks it again."""
    import json

    import wsi_pipeline.inference.card as card_mod

    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(tmp_path / "cache"))
    card_json = test_model.with_suffix(".json")
    card_mod.load_card(card_json)  # validated, remembered
    calls = []
    real = card_mod._validator

    def counting() -> object:
        calls.append(1)
        return real()

    monkeypatch.setattr(card_mod, "_validator", counting)
    card_mod.load_card(card_json)
    assert calls == []  # the same card: no schema run
    raw = json.loads(card_json.read_text())
    raw["input"]["size_px"] = "big"  # changed, and now wrong
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"input\.size_px"):
        card_mod.load_card(bad)
    assert calls == [1]
    monkeypatch.setattr(card_mod, "_schema_bytes", lambda: b"another schema")
    card_mod.load_card(card_json)
    assert calls == [1, 1]  # a new schema checks the old card again
    monkeypatch.setenv("WSI_PIPELINE_CACHE", "off")
    card_mod.load_card(card_json)
    card_mod.load_card(card_json)
    assert calls == [1, 1, 1, 1]  # without a cache every load is checked
