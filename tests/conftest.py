"""Shared fixtures: small pyramidal slides written with tifffile, whose tissue is known exactly."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from testkit.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """Runs in tests (and the commands they start) keep onnxruntime's optimized models in a fresh
    folder of their own, never in the user's cache."""
    os.environ["WSI_PIPELINE_CACHE"] = tempfile.mkdtemp(prefix="wsi-pipeline-test-cache-")


BACKENDS = ("openslide", "tiffslide")


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} (the shared data folder is absent on this machine)")
    return p


@dataclass(frozen=True)
class Fixture:
    path: Path
    spec: SyntheticSpec
    kind: str


# One tissue ellipse and a black scanner border on the left; sizes multiples of 64 so every
# pyramid downsample is an exact integer.
APERIO_SPEC = SyntheticSpec(
    width=3072,
    height=2048,
    mpp=0.25,
    tissue=(Ellipse(1700, 1000, 1000, 700),),
    tumour=(Ellipse(1900, 900, 300, 250),),
    black_border_px=96,
    downsamples=(1, 4, 16),
)
# Native 0.5 um/px: the tiler uses level 0 as is. A second level at exactly 2x.
GENERIC_SPEC = SyntheticSpec(
    width=2048,
    height=1536,
    mpp=0.5,
    tissue=(Ellipse(700, 700, 450, 400), Ellipse(1600, 1000, 300, 350)),
    downsamples=(1, 2, 8),
    seed=1,
)


@pytest.fixture
def unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``WSI_PIPELINE_CACHE`` pointing at a file: a cache folder that cannot be made."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("WSI_PIPELINE_CACHE", str(blocker))
    return blocker


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def aperio_slide(slide_dir: Path) -> Fixture:
    return Fixture(
        write_synthetic_slide(slide_dir / "aperio.svs", APERIO_SPEC, kind="aperio"), APERIO_SPEC, "aperio"
    )


@pytest.fixture(scope="session")
def generic_slide(slide_dir: Path) -> Fixture:
    p = write_synthetic_slide(slide_dir / "generic.tif", GENERIC_SPEC, kind="generic")
    return Fixture(p, GENERIC_SPEC, "generic")


@pytest.fixture(scope="session")
def nompp_slide(slide_dir: Path) -> Fixture:
    return Fixture(
        write_synthetic_slide(slide_dir / "nompp.tif", GENERIC_SPEC, kind="nompp"), GENERIC_SPEC, "nompp"
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["aperio", "generic"])
def any_slide(request: pytest.FixtureRequest, aperio_slide: Fixture, generic_slide: Fixture) -> Fixture:
    return aperio_slide if request.param == "aperio" else generic_slide


@pytest.fixture(scope="session")
def truncated_slide(slide_dir: Path, aperio_slide: Fixture) -> Path:
    """The aperio fixture cut to 60 % of its bytes: header fine, tile data missing."""
    data = aperio_slide.path.read_bytes()
    p = slide_dir / "truncated.svs"
    p.write_bytes(data[: int(len(data) * 0.6)])
    return p


@pytest.fixture(scope="session")
def not_a_slide(slide_dir: Path) -> Path:
    p = slide_dir / "notes.svs"
    p.write_text("this is a text file renamed to .svs\n" * 20)
    return p


def box_inside(spec: SyntheticSpec, box: np.ndarray) -> bool:
    """True when a level-0 box (x0, y0, x1, y1) lies in the tissue (checked on a dense grid)."""
    x0, y0, x1, y1 = box
    xs = np.linspace(x0, x1, 16)[None, :]
    ys = np.linspace(y0, y1, 16)[:, None]
    return bool(spec.tissue_at(xs, ys).all())


def box_distance_outside(spec: SyntheticSpec, box: np.ndarray, margin: float) -> bool:
    """True when the box grown by ``margin`` level-0 px touches no tissue (checked on a dense grid)."""
    x0, y0, x1, y1 = box
    xs = np.linspace(x0 - margin, x1 + margin, 24)[None, :]
    ys = np.linspace(y0 - margin, y1 + margin, 24)[:, None]
    return not spec.tissue_at(xs, ys).any()


# --- a tiny ONNX model with a known output, for scoring tests ------------------------------------

# Synthetic tumour texture is darker in red (mean R ~185) than normal tissue (~232) or glass (242):
# P(tumour) = sigmoid((210 - mean R) / 5).
TEST_MODEL_RED_THRESHOLD = 210.0


def write_test_model(
    folder: Path,
    *,
    size_px: int = 224,
    mpp: float = 0.5,
    name: str = "colour-model",
    ood_d_ref: float | None = None,
    threshold: float | None = None,
    stain_normalization: str | None = None,
) -> Path:
    """Write ``name.onnx`` + ``name.json`` (card) into ``folder``; returns the .onnx path.

    With ``ood_d_ref`` the model also has an ``ood_distance`` output (the tile's mean grey level,
    0-255) and the card an ``ood`` section with that reference distance; ``threshold`` goes on the card.
    """
    import json

    import onnx
    from onnx import TensorProto, helper

    from wsi_pipeline.provenance import file_sha256

    nodes = [
        helper.make_node("Cast", ["tiles"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Gather", ["mean", "zero"], ["red"], axis=1),
        helper.make_node("Sub", ["thr", "red"], ["d"]),
        helper.make_node("Div", ["d", "five"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Unsqueeze", ["p", "one_axis"], ["p1"]),
        helper.make_node("Sub", ["onef", "p1"], ["q1"]),
        helper.make_node("Concat", ["q1", "p1"], ["probabilities"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])]
    if ood_d_ref is not None:
        nodes.append(helper.make_node("ReduceMean", ["mean"], ["ood_distance"], axes=[1], keepdims=0))
        outputs.append(helper.make_tensor_value_info("ood_distance", TensorProto.FLOAT, ["N"]))
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("thr", TensorProto.FLOAT, [], [TEST_MODEL_RED_THRESHOLD]),
        helper.make_tensor("five", TensorProto.FLOAT, [], [5.0]),
        helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
        helper.make_tensor("onef", TensorProto.FLOAT, [], [1.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "colour",
        [helper.make_tensor_value_info("tiles", TensorProto.UINT8, ["N", size_px, size_px, 3])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / f"{name}.onnx"
    onnx.save(model, onnx_path)
    card = {
        "name": name,
        "version": "test",
        "classes": ["non-tumour", "tumour"],
        "positive_class": "tumour",
        "input": {"name": "tiles", "size_px": size_px, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
        "output": {"name": "probabilities"},
        "mpp": mpp,
        "preprocessing": {
            "in_graph": True,
            **({"stain_normalization": stain_normalization} if stain_normalization else {}),
        },
        "onnx_file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
    }
    if ood_d_ref is not None:
        card["ood"] = {"output": "ood_distance", "d_ref": ood_d_ref}
    if threshold is not None:
        card["threshold"] = {"value": threshold}
    (folder / f"{name}.json").write_text(json.dumps(card))
    return onnx_path


@pytest.fixture(scope="session")
def test_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_model(tmp_path_factory.mktemp("model"))


# A 0.5 um/px slide with a known tumour ellipse inside a tissue ellipse.
TUMOUR_SPEC = SyntheticSpec(
    width=4096,
    height=3072,
    mpp=0.5,
    tissue=(Ellipse(2000, 1500, 1700, 1300),),
    tumour=(Ellipse(2400, 1400, 700, 550),),
    downsamples=(1, 4, 16),
    seed=2,
)
BENIGN_SPEC = SyntheticSpec(
    width=2048, height=2048, mpp=0.5, tissue=(Ellipse(1000, 1000, 800, 700),), downsamples=(1, 4), seed=3
)


@pytest.fixture(scope="session")
def tumour_slide(slide_dir: Path) -> Fixture:
    return Fixture(write_synthetic_slide(slide_dir / "tumour.svs", TUMOUR_SPEC), TUMOUR_SPEC, "aperio")


@pytest.fixture(scope="session")
def benign_slide(slide_dir: Path) -> Fixture:
    return Fixture(write_synthetic_slide(slide_dir / "benign.svs", BENIGN_SPEC), BENIGN_SPEC, "aperio")
