"""Shared fixtures: small pyramidal slides written with tifffile, whose tissue is known exactly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.synthetic import Ellipse, SyntheticSpec, write_synthetic_slide

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
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
