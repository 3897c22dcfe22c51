"""Bring your own model (issue 16): WSInfer model-zoo import, output kinds, check-model, model-schema.

A small TorchScript CNN with random weights and a WSInfer-format ``config.json`` stands in for a
model-zoo model (nothing is downloaded). It is imported with ``wsi-infer import-model``, scores the
bundled sample slide, and its tile table must equal the TorchScript model's softmax on the very tiles
the run scored (read back from the run's tile store). Tests that need torch skip without it.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_test_model
from wsi_pipeline.cli import main
from wsi_pipeline.errors import ModelError
from wsi_pipeline.inference.card import SCHEMA_FILE, card_from_dict, card_schema, load_card, validate_card
from wsi_pipeline.inference.importer import (
    card_from_wsinfer,
    choose_positive_class,
    read_wsinfer_config,
)
from wsi_pipeline.inference.session import to_probabilities

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "CMU-1-Small-Region.svs"
CLASSES = ["Normal", "Stroma", "Tumor"]
MEAN, STD = [0.70, 0.55, 0.70], [0.15, 0.20, 0.15]


def _run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "spec_version": "1.0",
        "architecture": "tiny-cnn",
        "num_classes": len(CLASSES),
        "class_names": CLASSES,
        "patch_size_pixels": 224,
        "spacing_um_px": 0.5,
        "transform": [
            {"name": "Resize", "arguments": {"size": 224}},
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}},
        ],
    }
    cfg.update(over)
    return cfg


def _write_config(folder: Path, cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def _write_wsinfer_model(folder: Path, **over: Any) -> Any:
    """A WSInfer-format model folder: a tiny CNN (random weights, logits offset by +3 so that they can
    never pass as probabilities), scripted, and its config. Returns the scripted model."""
    pytest.importorskip("torch")
    import torch

    class TinyCNN(torch.nn.Module):
        def __init__(self, n_classes: int) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 5, stride=4, padding=2)
            self.bn = torch.nn.BatchNorm2d(8)
            self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.fc = torch.nn.Linear(16, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(self.conv1(x)))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean(dim=(2, 3))) * 4.0 + 3.0

    torch.manual_seed(16)
    net = TinyCNN(len(CLASSES)).eval()
    with torch.no_grad():  # a BatchNorm with non-trivial statistics, as a trained model has
        mean, var = net.bn.running_mean, net.bn.running_var
        assert mean is not None and var is not None
        mean.copy_(torch.linspace(-0.5, 0.5, 8))
        var.copy_(torch.linspace(0.5, 2.0, 8))
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, the format WSInfer ships
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    _write_config(folder, _config(**over))
    scripted.save(str(folder / "torchscript_model.pt"))
    return scripted


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model imported with the CLI: its folder, the .onnx, the card and the CLI's output."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("import")
    model_dir = root / "tiny-wsinfer"
    scripted = _write_wsinfer_model(model_dir)
    onnx = root / "out" / "imported.onnx"
    code, stdout, stderr = _run("import-model", str(model_dir), "--out", str(onnx))
    assert code == 0, stderr
    return {"dir": model_dir, "onnx": onnx, "card": onnx.with_suffix(".json"), "stdout": stdout,
            "scripted": scripted}  # fmt: skip


# --- import-model ------------------------------------------------------------------------------------


def test_import_writes_onnx_and_a_card_from_the_config(imported: dict[str, Any]) -> None:
    raw = json.loads(imported["card"].read_text())
    card = load_card(imported["card"])
    assert card.classes == tuple(CLASSES) and card.positive_class == "Tumor"
    assert (card.input_size_px, card.mpp, card.input_dtype, card.input_layout) == (
        224,
        0.5,
        "float32",
        "NCHW",
    )
    assert card.output_kind == "logits" and not card.in_graph
    assert card.mean == pytest.approx(MEAN) and card.std == pytest.approx(STD)
    exp = raw["export"]
    assert exp["parity_max_abs_diff"] <= exp["parity_tolerance"] == 1e-4
    assert exp["parity_tiles"] == 32 and "CMU-1-Small-Region.svs" in exp["parity_source"]
    assert raw["imported"]["config"] == _config()
    assert f"{exp['parity_max_abs_diff']:.2g}" in imported["stdout"]
    # the card pins the file it was written with
    code, stdout, stderr = _run("check-model", str(imported["onnx"]))
    assert code == 0, stderr
    assert stdout.startswith(f"{imported['onnx']}: OK") and "logits of 3 classes" in stdout
    assert len(stdout.strip().splitlines()) == 1


def test_imported_model_scores_the_sample_as_torchscript_softmax(
    imported: dict[str, Any], tmp_path: Path
) -> None:
    """The issue's acceptance test: one probability column per class, rows in [0, 1] summing to 1,
    equal to the TorchScript model's softmax on the same tiles within 1e-4."""
    torch = pytest.importorskip("torch")
    from wsi_pipeline.io.tilestore import open_tile_store

    out, store = tmp_path / "sample.tif", tmp_path / "sample.zarr"
    code, _, stderr = _run(
        str(SAMPLE), "--out", str(out), "--model", str(imported["onnx"]), "--tiles-out", str(store), "-q"
    )
    assert code == 0, stderr
    with (tmp_path / "sample.tiles.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [c for c in rows[0] if c.startswith("p_")] == [f"p_{c}" for c in CLASSES]
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert len(probs) > 20
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # the table rounds to 6 digits

    tiles_store = open_tile_store(store)
    tiles = np.asarray(tiles_store.tiles[:])
    xy = np.array([[int(r["x_l0"]), int(r["y_l0"])] for r in rows])
    np.testing.assert_array_equal(np.asarray(tiles_store.coords_l0[:]), xy)  # the same tiles, same order
    with torch.no_grad():
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(MEAN)[None, :, None, None]) / torch.tensor(STD)[None, :, None, None]
        want = torch.softmax(imported["scripted"](x), dim=1).numpy()
    assert np.abs(probs - want).max() < 1e-4
    assert want.std(axis=0).max() > 1e-3  # the tiles really differ: the comparison is not vacuous
    manifest = json.loads((tmp_path / "sample.run.json").read_text())
    assert manifest["model"]["positive_class"] == "Tumor"
    assert manifest["label"]["evidence"]["max_p"] == pytest.approx(probs[:, 2].max(), abs=1e-4)


def test_a_logits_model_whose_card_says_probabilities_is_refused(
    imported: dict[str, Any], tmp_path: Path
) -> None:
    onnx = tmp_path / "liar.onnx"
    shutil.copy(imported["onnx"], onnx)
    raw = json.loads(imported["card"].read_text())
    raw["output"]["kind"] = "probabilities"
    onnx.with_suffix(".json").write_text(json.dumps(raw))
    out = tmp_path / "res" / "s.tif"
    code, _, stderr = _run(str(SAMPLE), "--out", str(out), "--model", str(onnx), "-q")
    line = _one_error_line(stderr)
    assert code == ModelError.exit_code == 8
    assert str(onnx) in line and "'tiny-wsinfer'" in line and "probabilities" in line and '"logits"' in line
    assert not (tmp_path / "res").exists()  # nothing written, not even the folder
    code, _, stderr = _run("check-model", str(onnx))
    assert code == 8 and "declares as probabilities" in _one_error_line(stderr)


def test_resize_to_another_size_cuts_tiles_of_that_size_over_the_same_field(tmp_path: Path) -> None:
    """WSInfer's zoo reads 350 px at 0.25 um/px and resizes to 224: the card tiles 224 px at the
    um/px the network sees (0.25 * 350 / 224), the same field of view."""
    pytest.importorskip("torch")
    model_dir = tmp_path / "m"
    _write_wsinfer_model(
        model_dir,
        patch_size_pixels=350,
        spacing_um_px=0.25,
        transform=[{"name": "Resize", "arguments": {"size": [224, 224]}}, {"name": "ToTensor"}],
    )
    onnx = tmp_path / "resized.onnx"
    code, _, stderr = _run("import-model", str(model_dir), "--out", str(onnx), "--parity-tiles", "4")
    assert code == 0, stderr
    card = load_card(onnx.with_suffix(".json"))
    assert card.input_size_px == 224 and card.mpp == pytest.approx(0.25 * 350 / 224)
    assert card.mean == (0.0, 0.0, 0.0) and card.std == (1.0, 1.0, 1.0)  # no Normalize
    assert "field of view" in card.raw["imported"]["resize"]
    # an existing output is not replaced without --overwrite
    code, _, stderr = _run("import-model", str(model_dir), "--out", str(onnx))
    assert code == 6 and "--overwrite" in _one_error_line(stderr)


def test_import_without_torch_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tmp_path / "m"
    _write_config(model_dir, _config())
    (model_dir / "torchscript_model.pt").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    code, _, stderr = _run("import-model", str(model_dir), "--out", str(tmp_path / "m.onnx"))
    assert code == 8 and "pip install 'wsi-pipeline[train]'" in _one_error_line(stderr)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("transform", "named"),
    [
        ([{"name": "CenterCrop", "arguments": {"size": 200}}, {"name": "ToTensor"},
          {"name": "ColorJitter", "arguments": {"brightness": 0.1}}], ["'CenterCrop'", "'ColorJitter'"]),
        ([{"name": "Resize", "arguments": {"size": [224, 160]}}, {"name": "ToTensor"}], ["Resize", "square"]),
        ([{"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}}], ["no ToTensor"]),
        ([{"name": "Normalize", "arguments": {"mean": MEAN, "std": STD}}, {"name": "ToTensor"}],
         ["Normalize comes before ToTensor"]),
    ],
)  # fmt: skip
def test_transforms_the_pipeline_cannot_reproduce_are_refused_by_name(
    tmp_path: Path, transform: list[dict[str, Any]], named: list[str]
) -> None:
    model_dir = tmp_path / "m"
    _write_config(model_dir, _config(transform=transform))
    (model_dir / "torchscript_model.pt").write_bytes(b"not read: the config is refused first")
    code, _, stderr = _run("import-model", str(model_dir), "--out", str(tmp_path / "m.onnx"))
    line = _one_error_line(stderr)
    assert code == 8 and "config.json" in line
    for word in named:
        assert word in line, line
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.json").exists()


def test_config_to_card_without_torch(tmp_path: Path) -> None:
    cfg = read_wsinfer_config(
        _write_config(tmp_path / "m", _config(patch_size_pixels=448, spacing_um_px=0.25))
    )
    assert (cfg.tile_px, cfg.mpp) == (224, 0.5)
    raw = card_from_wsinfer(cfg, name="m", onnx_file="m.onnx", sha256="0" * 64, positive_class="Tumor")
    card = card_from_dict(raw, tmp_path / "m.json")  # the card validates against the schema
    assert card.output_kind == "logits" and card.mpp == 0.5 and card.input_size_px == 224
    assert raw["input"]["shape"] == ["N", 3, 224, 224] and raw["output"]["name"] == "logits"
    with pytest.raises(ModelError, match="num_classes"):
        read_wsinfer_config(_write_config(tmp_path / "n", _config(num_classes=2)))
    with pytest.raises(ModelError, match="single-output"):
        read_wsinfer_config(_write_config(tmp_path / "o", _config(num_classes=1, class_names=["tumor"])))
    with pytest.raises(ModelError, match="spec_version"):
        read_wsinfer_config(_write_config(tmp_path / "p", _config(spec_version="9.0")))


@pytest.mark.parametrize(
    ("classes", "wanted", "chosen"),
    [
        (("notumor", "tumor"), None, "tumor"),  # WSInfer's breast model: "notumor" is not tumour
        (("non-tumour", "tumour"), None, "tumour"),
        (("Other", "Tumor"), None, "Tumor"),
        (("Tumor", "Other"), "Other", "Other"),
    ],
)
def test_positive_class_defaults_to_the_one_named_tumour(
    classes: tuple[str, ...], wanted: str | None, chosen: str
) -> None:
    assert choose_positive_class(classes, wanted, where=Path("config.json")) == chosen


def test_positive_class_must_be_chosen_when_no_single_tumour_class(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="--positive-class"):
        choose_positive_class(("lymphocytes", "other"), None, where=Path("config.json"))
    with pytest.raises(ModelError, match="not one of the classes"):
        choose_positive_class(("Other", "Tumor"), "tumour", where=Path("config.json"))
    model_dir = tmp_path / "m"
    _write_config(model_dir, _config(class_names=["til", "other", "necrosis"]))
    (model_dir / "torchscript_model.pt").write_bytes(b"x")
    code, _, stderr = _run("import-model", str(model_dir), "--out", str(tmp_path / "m.onnx"))
    assert code == 8 and "--positive-class" in _one_error_line(stderr)


# --- output kinds --------------------------------------------------------------------------------------


def _card(tmp_path: Path, kind: str | None) -> Any:
    onnx = write_test_model(tmp_path / (kind or "none"))
    raw = json.loads(onnx.with_suffix(".json").read_text())
    if kind is not None:
        raw["output"]["kind"] = kind
    return card_from_dict(raw, onnx.with_suffix(".json"))


def test_a_card_without_output_kind_means_probabilities(tmp_path: Path) -> None:
    assert _card(tmp_path, None).output_kind == "probabilities"
    validate_card({**json.loads((tmp_path / "none" / "colour-model.json").read_text())}, tmp_path / "c.json")


def test_logits_become_probabilities_by_a_stable_softmax(tmp_path: Path) -> None:
    card = _card(tmp_path, "logits")
    logits = np.array([[1000.0, -1000.0], [0.0, 0.0], [2.0, 1.0]], np.float32)
    p = to_probabilities(logits, card)
    assert np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1.0, atol=1e-6)
    assert p[0] == pytest.approx([1.0, 0.0]) and p[1] == pytest.approx([0.5, 0.5])
    assert p[2, 0] == pytest.approx(np.e / (np.e + 1), rel=1e-6)


@pytest.mark.parametrize(
    ("rows", "words"),
    [
        ([[2.69, -1.3]], ["values from -1.3 to 2.69"]),  # the "max p 2.69"
        ([[0.6, 0.6]], ["rows summing to 1.2"]),
        ([[np.nan, 0.5]], ["NaN"]),
    ],
)
def test_an_output_declared_as_probabilities_must_be_probabilities(
    tmp_path: Path, rows: list[list[float]], words: list[str]
) -> None:
    card = _card(tmp_path, "probabilities")
    with pytest.raises(ModelError) as info:
        to_probabilities(np.array(rows, np.float32), card)
    msg = str(info.value)
    assert str(card.onnx_path) in msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    ok = to_probabilities(np.array([[0.25, 0.75], [1.0000001, 0.0]], np.float32), card)
    assert ok.max() <= 1.0  # float rounding is clipped, not refused


def test_the_schema_accepts_the_two_output_kinds_only(tmp_path: Path) -> None:
    raw = json.loads(write_test_model(tmp_path).with_suffix(".json").read_text())
    for kind in ("probabilities", "logits"):
        validate_card({**raw, "output": {"name": "probabilities", "kind": kind}}, tmp_path / "c.json")
    with pytest.raises(ModelError, match=r"output\.kind"):
        validate_card({**raw, "output": {"name": "probabilities", "kind": "scores"}}, tmp_path / "c.json")


# --- check-model and model-schema --------------------------------------------------------------------


def test_check_model_on_a_good_card(tmp_path: Path) -> None:
    onnx = write_test_model(tmp_path)
    code, stdout, stderr = _run("check-model", str(onnx))
    assert code == 0, stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{onnx}: OK")
    assert "'tiles' uint8 NHWC [N, 224, 224, 3]" in lines[0] and "P(tumour) = " in lines[0]
    assert "CMU-1-Small-Region.svs" in lines[0]  # a real tile from the bundled sample


@pytest.mark.parametrize(
    ("change", "field", "fix"),
    [
        ({"input": {"name": "x"}}, "input.name", 'set input.name to "tiles"'),
        ({"input": {"layout": "NCHW"}}, "input.layout", 'set input.layout to "NHWC"'),
        ({"input": {"size_px": 256}}, "input.size_px", "set input.size_px to 224"),
        ({"input": {"dtype": "float32"}}, "input.dtype", 'set input.dtype to "uint8"'),
        ({"output": {"name": "probs"}}, "output.name", 'set output.name to "probabilities"'),
        ({"classes": ["a", "b", "tumour"]}, "classes", "list 2 class names"),
    ],
)
def test_check_model_names_the_mismatched_field_and_the_fix(
    tmp_path: Path, change: dict[str, Any], field: str, fix: str
) -> None:
    onnx = write_test_model(tmp_path)
    card_path = onnx.with_suffix(".json")
    raw = json.loads(card_path.read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    card_path.write_text(json.dumps(raw))
    code, stdout, stderr = _run("check-model", str(onnx))
    line = _one_error_line(stderr)
    assert code == 8 and not stdout
    assert line.startswith(f"error: {card_path}: {field}: ") and fix in line, line


def test_check_model_refuses_a_card_that_breaks_the_schema(tmp_path: Path) -> None:
    onnx = write_test_model(tmp_path)
    raw = json.loads(onnx.with_suffix(".json").read_text())
    raw["output"]["kind"] = "scores"
    onnx.with_suffix(".json").write_text(json.dumps(raw))
    code, _, stderr = _run("check-model", str(onnx))
    assert code == 8 and "output.kind" in _one_error_line(stderr)


def test_model_schema_prints_the_published_schema_file() -> None:
    code, stdout, stderr = _run("model-schema")
    assert code == 0, stderr
    assert json.loads(stdout) == card_schema()
    text = resources.files("wsi_pipeline.inference").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    assert stdout == text if text.endswith("\n") else stdout == text + "\n"


def test_the_runtime_and_the_new_commands_never_import_torch(tmp_path: Path) -> None:
    """check-model, the importer module and the pipeline load without torch (import-model alone needs it)."""
    import subprocess

    onnx = write_test_model(tmp_path)
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import wsi_pipeline.inference.importer, wsi_pipeline.pipeline\n"
        "from wsi_pipeline.cli import main\n"
        f"r = CliRunner().invoke(main, ['check-model', {str(onnx)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
