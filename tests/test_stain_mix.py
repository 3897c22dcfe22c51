"""Tests of stain mixing (``models.stain_mix``): training tiles re-stained to other training groups'
stains. Synthetic H&E tiles are built from known stain vectors, so a fit on the output says which
stain it carries."""

from __future__ import annotations

import numpy as np
import pytest

from models.mix import MixedSampler
from models.scanned import LabelRule, Region
from models.stain_mix import StainMixer, fit_groups, he_angle_deg
from wsi_pipeline.stain.macenko import StainModel, fit_macenko


def _unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, np.float64)
    return a / np.linalg.norm(a)


# the standard reference stain, and a GlaS-like one
STAIN_A = np.stack([_unit([0.5626, 0.7201, 0.4062]), _unit([0.2159, 0.8012, 0.5581])])
STAIN_B = np.stack([_unit([0.50, 0.85, 0.16]), _unit([0.16, 0.97, 0.18])])


def _stained(stain: np.ndarray, shape: tuple[int, int], seed: int) -> np.ndarray:
    """An RGB image of H and E in patches (some pixels one stain only) with these OD vectors."""
    rng = np.random.default_rng(seed)
    h, w = shape
    blocks = rng.uniform(-0.5, 1.0, (2, h // 8 + 1, w // 8 + 1))
    conc = np.clip(blocks.repeat(8, 1).repeat(8, 2)[:, :h, :w], 0, None) * np.array([1.4, 1.0])[:, None, None]
    od = np.einsum("khw,kc->hwc", conc, stain)
    return np.clip(np.rint(240 * np.exp(-od)), 0, 255).astype(np.uint8)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(list(a)) @ _unit(list(b)), -1, 1))))


def _carries(tile: np.ndarray, stain: np.ndarray, tol: float = 4.0) -> bool:
    fit = fit_macenko(tile)
    return all(_angle(fit.stain_matrix[k], stain[k]) < tol for k in (0, 1))


def test_fit_groups_recovers_stains_and_leaves_out_blank_and_degenerate_groups() -> None:
    near = np.stack([STAIN_A[0], _unit(list(STAIN_A[0] + 0.08 * np.array([-1.0, 1.0, 0.0])))])  # ~6 deg
    fits = fit_groups(
        {
            "a": [_stained(STAIN_A, (224, 224), 0), _stained(STAIN_A, (224, 224), 1)],
            "b": [_stained(STAIN_B, (300, 200), 2)],
            "blank": [np.full((224, 224, 3), 245, np.uint8)],
            "degenerate": [_stained(near, (224, 224), 3)],
        }
    )
    assert set(fits) == {"a", "b"}
    for key, stain in (("a", STAIN_A), ("b", STAIN_B)):
        assert all(_angle(fits[key].stain_matrix[k], stain[k]) < 3 for k in (0, 1))
        assert he_angle_deg(fits[key]) > 10


def test_mixer_restains_a_share_of_tiles_to_each_source_uniformly() -> None:
    fits = fit_groups(
        {"lc:1": [_stained(STAIN_A, (224, 224), 0)], "glas:1": [_stained(STAIN_B, (224, 224), 1)]}
    )
    mixer = StainMixer(fits, {"lc": ["lc:1"], "glas": ["glas:1", "glas:missing"]}, share=1.0)
    assert mixer.counts() == {"lc": 1, "glas": 1}
    rng = np.random.default_rng(0)
    tile = _stained(STAIN_A, (224, 224), 5)
    outs = [mixer(tile, "lc:1", rng) for _ in range(40)]
    to_b = [not np.array_equal(o, tile) for o in outs]
    assert 10 < sum(to_b) < 30  # a source drawn uniformly: half go to the other source's stain
    assert all(_carries(o, STAIN_B) for o, moved in zip(outs, to_b, strict=True) if moved)
    assert _carries(tile, STAIN_A)
    # a tile of a group without a fit is kept; share 0 draws nothing and changes nothing
    assert np.array_equal(mixer(tile, "glas:missing", rng), tile)
    off, a, b = (
        StainMixer(fits, {"lc": ["lc:1"]}, share=0.0),
        np.random.default_rng(7),
        np.random.default_rng(7),
    )
    assert np.array_equal(off(tile, "lc:1", a), tile) and a.random() == b.random()
    with pytest.raises(ValueError, match="share"):
        StainMixer(fits, {}, share=1.5)
    with pytest.raises(ValueError, match="at least one group"):
        StainMixer({}, {"lc": ["x"]}, share=0.5)


def test_mixed_sampler_shows_each_source_in_the_others_stain() -> None:
    """LC25000 tiles in stain A, GlaS regions in stain B: without mixing every tile keeps its source's
    stain; with stain_mix 1 about half of each source's tiles carry the other's; labels are kept."""
    lc = np.stack([_stained(STAIN_A, (224, 224), s) for s in range(4)])
    regions = []
    for k, label in enumerate(("malignant/m", "benign/healthy")):
        img = _stained(STAIN_B, (400, 600), 10 + k)
        mask = np.zeros((400, 600), bool)
        mask[:, :300] = True
        regions.append(Region(f"r{k}", img, 0.62005, label, f"glas_patient_{k + 1}", mask))
    args = (lc, np.array([0, 1, 0, 1]), regions, LabelRule())
    plain = MixedSampler(*args, lc_fraction=0.2)
    mixed = MixedSampler(*args, lc_fraction=0.2, stain_mix=1.0, lc_groups=["g1", "g1", "g2", "g2"])
    assert mixed.counts()["stain_fits_lc25000"] == 2 and mixed.counts()["stain_fits_glas"] == 2
    assert "stain_fits_glas" not in plain.counts()
    tiles, labels = plain.sample(60, np.random.default_rng(0))
    in_a = [_carries(t, STAIN_A) for t in tiles]
    assert all(a or _carries(t, STAIN_B) for a, t in zip(in_a, tiles, strict=True))
    assert 4 < sum(in_a) < 20  # lc_fraction of the tiles keep LC25000's stain
    tiles, labels = mixed.sample(60, np.random.default_rng(0))
    assert set(labels.tolist()) == {0, 1}
    in_a = [_carries(t, STAIN_A) for t in tiles]
    in_b = [_carries(t, STAIN_B) for t in tiles]
    assert all(a or b for a, b in zip(in_a, in_b, strict=True))
    assert 20 < sum(in_a) < 40  # each tile's target source is drawn uniformly, whatever its own
    again, _ = mixed.sample(60, np.random.default_rng(0))
    assert np.array_equal(again, tiles)
    with pytest.raises(ValueError, match="group of every LC25000 tile"):
        MixedSampler(*args, stain_mix=0.5)
    assert isinstance(next(iter(mixed.mixer.fits.values())), StainModel)
