"""The model card: one published JSON Schema, one loader and one writer (wsi_pipeline.inference.card).

Every card in the repository conforms; a card with a wrong type, a missing field or an unknown
(misspelt) field is refused in one line naming the file and the field; the schema itself is valid
JSON Schema and ships with the package.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from conftest import write_test_model
from wsi_pipeline.errors import ModelError
from wsi_pipeline.inference.card import (
    SCHEMA_FILE,
    card_schema,
    default_model_dir,
    load_card,
    validate_card,
    write_card,
)

REPO = Path(__file__).resolve().parents[1]
CARDS = sorted([REPO / "models" / "tumour-cnn.json", *(REPO / "models" / "baselines").glob("*.json")])
SHIPPED = REPO / "models" / "tumour-cnn.json"


def test_the_schema_is_valid_json_schema_2020_12_and_package_data() -> None:
    schema = card_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    # read from the package (an installed wheel carries it), listed as package data in pyproject.toml
    assert resources.files("wsi_pipeline.inference").joinpath(SCHEMA_FILE).is_file()
    assert f'"wsi_pipeline.inference" = ["{SCHEMA_FILE}"]' in (REPO / "pyproject.toml").read_text()


def test_the_shipped_card_lives_in_the_checkouts_models_folder() -> None:
    assert default_model_dir() == REPO / "models"


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.name)
def test_every_card_in_the_repository_validates(path: Path) -> None:
    raw = json.loads(path.read_text())
    validate_card(raw, path)
    card = load_card(path)
    assert card.raw == raw and card.onnx_path.exists()
    assert card.positive_class in card.classes and 0 < card.threshold < 1


def test_the_test_models_card_validates(tmp_path: Path) -> None:
    onnx = write_test_model(tmp_path, ood_d_ref=3.0, threshold=0.6, stain_normalization="macenko")
    card = load_card(onnx.with_suffix(".json"))
    assert (card.ood_d_ref, card.threshold, card.stain_normalization) == (3.0, 0.6, "macenko")


def _refused(tmp_path: Path, raw: Any, *words: str) -> str:
    """Write ``raw`` as a card, load it, expect one ModelError line naming the file and ``words``."""
    path = tmp_path / "bad-card.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError) as info:
        load_card(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _shipped() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(SHIPPED.read_text())
    return raw


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda c: c["input"].update(size_px="224"), ["input.size_px", "integer"]),
        (lambda c: c.update(mpp="0.5"), ["mpp", "number"]),
        (lambda c: c.update(classes="tumour"), ["classes", "array"]),
        (lambda c: c["preprocessing"].update(in_graph="yes"), ["preprocessing.in_graph", "boolean"]),
        (lambda c: c["threshold"].update(value=1.5), ["threshold.value", "< 1"]),
        (lambda c: c["input"].update(layout="HWC"), ["input.layout", '"NHWC"']),
        (lambda c: c["output"].update(kind="scores"), ["output.kind", '"probabilities", "logits"']),
        (lambda c: c.update(sha256="not-a-checksum"), ["sha256", "64 lower-case hex"]),
        (lambda c: c["metrics"]["test"].update(auc="high"), ["metrics.test.auc", "number or null"]),
        (lambda c: c["ood"].update(d_ref=0), ["ood.d_ref", "> 0"]),
    ],
    ids=["size-str", "mpp-str", "classes-str", "in-graph-str", "threshold-1.5", "layout", "output-kind",
         "sha256", "metric-str", "d-ref-0"],
)  # fmt: skip
def test_a_mistyped_field_is_named(tmp_path: Path, change: Any, words: list[str]) -> None:
    raw = _shipped()
    change(raw)
    _refused(tmp_path, raw, "lacks or mistypes", *words)


@pytest.mark.parametrize(
    ("path", "field"),
    [(("name",), "name"), (("input", "size_px"), "input.size_px"), (("output", "name"), "output.name"),
     (("ood", "d_ref"), "ood.d_ref"), (("metrics", "test", "auc"), "metrics.test.auc")],
)  # fmt: skip
def test_a_missing_required_field_is_named(tmp_path: Path, path: tuple[str, ...], field: str) -> None:
    raw = _shipped()
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    _refused(tmp_path, raw, "lacks or mistypes", field, "required")


@pytest.mark.parametrize(
    ("where", "typo", "field", "meant"),
    [((), "treshold", "treshold", "threshold"), (("input",), "size", "input.size", "input.size_px"),
     (("threshold",), "valeu", "threshold.valeu", "threshold.value"),
     (("preprocessing",), "stain_normalisation", "preprocessing.stain_normalisation",
      "preprocessing.stain_normalization")],
)  # fmt: skip
def test_an_unknown_field_is_refused_with_a_suggestion(
    tmp_path: Path, where: tuple[str, ...], typo: str, field: str, meant: str
) -> None:
    """A misspelt field would silently fall back to a default (threshold 0.5, no stain normalization),
    so objects the pipeline reads are closed."""
    raw = _shipped()
    obj = raw
    for key in where:
        obj = obj[key]
    obj[typo] = copy.deepcopy(obj.get(meant.rsplit(".", 1)[-1], 1))
    _refused(tmp_path, raw, f"unknown field {field}", f"did you mean {meant}?")


def test_records_of_training_may_carry_more_fields(tmp_path: Path) -> None:
    raw = _shipped()
    raw["training"]["new_note"] = "recorded by a later models.train"
    raw["data"]["extra"] = {"anything": [1, 2]}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(raw))
    assert load_card(path).raw["training"]["new_note"]


def test_not_json_nan_and_non_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(SHIPPED.read_text().replace('"auc": 0.9996', '"auc": NaN', 1))
    with pytest.raises(ModelError, match=r"not a readable JSON model card.*NaN"):
        load_card(path)
    _refused(tmp_path, [1, 2], "not a JSON object")


def test_checks_the_schema_cannot_express_still_hold(tmp_path: Path) -> None:
    raw = _shipped()
    raw["positive_class"] = "cancer"
    _refused(tmp_path, raw, "positive_class 'cancer' is not one of the classes")
    raw = _shipped()
    raw["input"]["shape"] = ["N", 3, 224, 224]  # NCHW shape on an NHWC card
    _refused(tmp_path, raw, "contradicts size_px 224 and layout NHWC")
    raw = _shipped()
    raw["preprocessing"] = {"in_graph": False}
    _refused(tmp_path, raw, "needs 3 mean and 3 std")


def test_write_card_validates_before_writing(tmp_path: Path) -> None:
    raw = _shipped()
    out = tmp_path / "tumour-cnn.json"
    card = write_card(raw, out)
    assert out.read_text() == SHIPPED.read_text()  # the writer's format is the shipped card's
    assert card.name == "tumour-cnn" and load_card(out).raw == raw
    bad = copy.deepcopy(raw)
    bad["treshold"] = bad.pop("threshold")
    with pytest.raises(ModelError, match=r"new\.json: the card has an unknown field treshold"):
        write_card(bad, tmp_path / "new.json")
    unpinned = {k: v for k, v in raw.items() if k != "sha256"}
    with pytest.raises(ModelError, match="lacks or mistypes sha256"):
        write_card(unpinned, tmp_path / "new.json")
    nan = copy.deepcopy(raw)
    nan["metrics"]["test"]["auc"] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        write_card(nan, tmp_path / "new.json")
    assert not (tmp_path / "new.json").exists() and not list(tmp_path.glob(".new.json*"))


@pytest.mark.parametrize("size", [0, 3, 3 * 2**20 + 7])
def test_file_sha256_is_the_sha256_of_the_files_bytes(tmp_path: Path, size: int) -> None:
    """The model hash (one mapped read) is sha256sum's, empty files included."""
    import hashlib

    from wsi_pipeline.provenance import file_sha256

    data = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    p = tmp_path / "m.onnx"
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", ["best.pt", "model.pth", "weights.safetensors", "net.h5"])
def test_a_training_checkpoint_given_as_the_model_is_named_as_such(tmp_path: Path, name: str) -> None:
    """The file a lab has after training is a checkpoint; it used to get "model card not found"."""
    from wsi_pipeline.inference.card import resolve_model

    (tmp_path / name).write_bytes(b"\x80\x02weights")
    with pytest.raises(ModelError, match=rf"{name}: a .*, not an ONNX model; export it to ONNX") as info:
        resolve_model(tmp_path / name)
    assert "import-model" in str(info.value) and "\n" not in str(info.value)


def _train_flags(command: str) -> dict[str, str]:
    """The flags of a `models.train` command line, without those that only say where and how fast."""
    words = command.replace("\\\n", " ").split()
    words = words[words.index("models.train") + 1 :]
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
            flags[word] = value
    for where in ("--threads", "--out"):
        flags.pop(where, None)
    return flags


def test_the_readmes_recipe_is_the_shipped_models_training_command() -> None:
    """A user who runs the README's "shipped model's recipe" trains what the card says was trained.

    The README had lost `--blur-max-um 1.5` when 0.4.0 shipped: the command then made 0.3.0's defocus.
    """
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Training your own model") :]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 3)]
    command = next(line for line in block.split("\n.venv") if "models.train" in line)
    card = json.loads(SHIPPED.read_text())
    assert _train_flags(command) == _train_flags(card["training"]["command"])
