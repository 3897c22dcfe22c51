"""Tests of training for transfer to scanned tissue: GlaS tile labels, the mixed sampler, scanner-shift
augmentation, the OOD reference, threshold choice and bootstrap, and the backward pass on any CPU.

Real-data tests are marked ``realdata`` and skip when ../shared/data is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.augment import colour_jitter, degrade, scanner_shift
from models.evaluate import EvalSet, bootstrap_ci, choose_threshold
from models.mix import MixedSampler, sample_unlabelled
from models.ood import distances, fit_gaussian, slide_score
from models.scanned import GLAS_SPLIT, LabelRule, Region, crop_label, pad_reflect

SHARED_TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiles"
TORCH_REASON = "torch is not installed (install the `train` extra: pip install -e .[train])"


def _region(label: str, mpp: float = 0.62005) -> Region:
    """A 600 x 400 px region whose left half is 'gland' (mask True, purple) and right half stroma (pink)."""
    img = np.empty((400, 600, 3), np.uint8)
    img[:, :300] = (120, 60, 150)
    img[:, 300:] = (230, 170, 200)
    mask = np.zeros((400, 600), bool)
    mask[:, :300] = True
    return Region("r", img, mpp, label, "glas_patient_1", mask)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("grade", "fraction", "adenoma", "expected"),
    [
        ("malignant/moderately differentiated", 0.6, "negative", 1),
        ("malignant/poorly differentiated", 0.20, "negative", 1),
        ("malignant/poorly differentiated", 0.12, "negative", None),  # a little tumour: unused
        ("malignant/moderately differentiated", 0.05, "negative", 0),  # tumour stroma: non-tumour
        ("benign/healthy", 0.9, "negative", 0),  # normal crypts
        ("benign/healthy", 0.0, "exclude", 0),
        ("benign/adenomatous", 0.7, "negative", 0),
        ("benign/adenomatous", 0.7, "exclude", None),
    ],
)
def test_crop_label_rule(grade: str, fraction: float, adenoma: str, expected: int | None) -> None:
    assert crop_label(grade, fraction, LabelRule(adenoma=adenoma)) == expected


def test_label_rule_refuses_overlapping_bands() -> None:
    with pytest.raises(ValueError):
        LabelRule(tumour_min_gland=0.05, stroma_max_gland=0.2)
    with pytest.raises(ValueError):
        LabelRule(adenoma="tumour")


def test_glas_split_is_by_patient_and_disjoint() -> None:
    parts = [set(v) for v in GLAS_SPLIT.values()]
    assert set().union(*parts) == set(range(1, 17))
    assert sum(len(p) for p in parts) == 16


def test_mask_fraction_matches_brute_force() -> None:
    reg = _region("malignant/x")
    rng = np.random.default_rng(0)
    for _ in range(20):
        x0, y0 = rng.uniform(0, 400), rng.uniform(0, 200)
        side = rng.uniform(20, 190)
        a, b, c, d = round(x0), round(x0 + side), round(y0), round(y0 + side)
        assert reg.mask_fraction(x0, y0, side) == pytest.approx(reg.mask[c:d, a:b].mean())


def test_crop_resamples_to_the_target_resolution() -> None:
    reg = _region("benign/healthy")
    side = reg.window_px(0.5, 224)
    assert side == pytest.approx(224 * 0.5 / 0.62005)
    tile = reg.crop(0, 0, side)
    assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8
    assert (tile == (120, 60, 150)).all()  # fully inside the 'gland' half


def test_mixed_sampler_labels_follow_the_masks() -> None:
    """Tumour tiles come from the gland half of malignant regions, stroma from its other half, benign
    tiles from anywhere in benign regions; LC25000 tiles keep their labels."""
    lc = np.stack([np.full((224, 224, 3), v, np.uint8) for v in (10, 250)])
    sampler = MixedSampler(
        lc, np.array([0, 1]), [_region("malignant/m"), _region("benign/healthy")], LabelRule()
    )
    rng = np.random.default_rng(0)
    tiles, labels = sampler.sample(200, rng)
    assert set(labels.tolist()) == {0, 1}
    for t, y in zip(tiles, labels, strict=True):
        purple = (np.abs(t.astype(int) - (120, 60, 150)).sum(-1) < 30).mean()
        if (t == 10).all() or (t == 250).all():  # LC25000 tile
            assert y == int((t == 250).all())
        elif y == 1:
            assert purple >= 0.15  # >= 20 % gland in the window before resampling
    counts = sampler.counts()
    assert counts["glas_tumour_windows"] > 0 and counts["glas_stroma_windows"] > 0


def _lung_region(side_px: int) -> Region:
    """A square scanned-lung region at 0.25 um/px (the window of one tile is 448 px) whose every pixel
    is an epithelial nucleus: every window is a weak tumour label."""
    img = np.full((side_px, side_px, 3), (90, 40, 140), np.uint8)
    full = np.ones((side_px, side_px), bool)
    return Region("lung", img, 0.25, "monusac/lung", "TCGA-XX-0000", full, full)


def test_mixed_sampler_draws_lung_windows_from_regions_barely_larger_than_a_tile() -> None:
    """A lung region 475 px wide holds one 448 px window; scale jitter up to 1.25x must shrink to the
    region, never ask for a window outside it (that raised 'box offset can't be negative')."""
    lc = np.stack([np.full((224, 224, 3), v, np.uint8) for v in (10, 250)])
    lung = _lung_region(475)
    sampler = MixedSampler(
        lc, np.array([0, 1]), [_region("malignant/m"), _region("benign/healthy")], LabelRule(),
        lc_fraction=0.0, lung_regions=[lung], lung_fraction=0.5,
    )  # fmt: skip
    assert sampler.counts()["lung_tumour_windows"] > 0
    assert sampler.counts()["glas_regions"] == 2
    tiles, labels = sampler.sample(400, np.random.default_rng(0))
    lung_like = (np.abs(tiles.astype(int) - (90, 40, 140)).sum(-1) < 10).all(axis=(1, 2))
    assert not lung_like[labels == 0].any()  # lung windows are only ever tumour draws
    share = lung_like[labels == 1].mean()
    assert 0.35 < share < 0.65  # lung_fraction of the tumour draws


def test_mixed_sampler_crypt_fraction_draws_normal_crypts_as_negatives() -> None:
    """crypt_fraction 1: every GlaS non-tumour tile is a gland-rich window of a healthy region (normal
    crypts), never the stroma half of a malignant region or the bare half of a healthy one."""
    lc = np.stack([np.full((224, 224, 3), v, np.uint8) for v in (10, 250)])
    regions = [_region("malignant/m"), _region("benign/healthy")]
    sampler = MixedSampler(lc, np.array([0, 1]), regions, LabelRule(), lc_fraction=0.0, crypt_fraction=1.0)
    assert 0 < sampler.counts()["glas_crypt_windows"] < sampler.counts()["glas_benign_windows"]
    tiles, labels = sampler.sample(200, np.random.default_rng(0))
    purple = (np.abs(tiles.astype(int) - (120, 60, 150)).sum(-1) < 30).mean(axis=(1, 2))
    assert (labels == 0).sum() > 50
    assert (purple[labels == 0] >= 0.15).all()
    plain = MixedSampler(lc, np.array([0, 1]), regions, LabelRule(), lc_fraction=0.0)
    tiles, labels = plain.sample(200, np.random.default_rng(0))
    purple = (np.abs(tiles.astype(int) - (120, 60, 150)).sum(-1) < 30).mean(axis=(1, 2))
    assert (purple[labels == 0] < 0.15).any()  # without it, stroma and bare windows are negatives too


def _immune_region(width_px: int, height_px: int = 1000, immune_part: float = 0.6) -> Region:
    """A MoNuSAC-like lymphocyte strip at 0.25 um/px: its left ``immune_part`` (dark blue) is crowded
    with immune nuclei, the rest (pale pink) holds epithelial ones, half as crowded."""
    img = np.empty((height_px, width_px, 3), np.uint8)
    cut = int(width_px * immune_part)
    img[:, :cut] = (40, 30, 120)
    img[:, cut:] = (240, 200, 220)
    immune = np.zeros((height_px, width_px), bool)
    immune[:, :cut:2] = True  # half the pixels of the left part
    typed = immune.copy()
    typed[::2, cut::2] = True  # epithelial nuclei on the right (a quarter of its pixels)
    return Region("lym", img, 0.25, "monusac/immune", "TCGA-XX-0001", immune, typed)


def test_immune_windows_need_crowded_immune_nuclei_and_fit_narrow_regions() -> None:
    """A window counts when immune nuclei hold >= 80 % of its nuclear pixels; a strip 400 px wide
    (narrower than the 448 px of a tile) gives windows as wide as it is, one 300 px wide none."""
    from models.scanned import immune_tiles, immune_windows, is_inflamed

    windows = immune_windows([_immune_region(400, immune_part=1.0)])
    assert windows and all(side == 400 for _, _, _, side in windows)
    assert not immune_windows([_immune_region(300, immune_part=1.0)])  # 448 / 300 > 1.25: too much zoom
    wide = _immune_region(2000, 448)
    xs = [x0 for _, x0, _, _ in immune_windows([wide])]
    # windows reach into the epithelial part only while immune nuclei keep 80 % of the nuclear pixels
    assert xs and max(xs) + 448 <= 0.6 * 2000 + 0.35 * 448
    assert not is_inflamed(wide, 1500.0, 0.0, 448.0)
    tiles, groups = immune_tiles([_immune_region(300, immune_part=1.0)])  # validation pads, not zooms
    assert tiles.shape[1:] == (224, 224, 3) and groups == ["TCGA-XX-0001"] * len(tiles) and len(tiles) > 0


def test_mixed_sampler_immune_fraction_draws_inflamed_windows_as_negatives() -> None:
    lc = np.stack([np.full((224, 224, 3), v, np.uint8) for v in (10, 250)])
    regions = [_region("malignant/m"), _region("benign/healthy")]
    sampler = MixedSampler(
        lc, np.array([0, 1]), regions, LabelRule(), lc_fraction=0.0,
        immune_regions=[_immune_region(2000, 448)], immune_fraction=0.5,
    )  # fmt: skip
    assert sampler.counts()["immune_windows"] > 0
    tiles, labels = sampler.sample(400, np.random.default_rng(0))
    blue = (np.abs(tiles.astype(int) - (40, 30, 120)).sum(-1) < 30).mean(axis=(1, 2))
    assert not (blue[labels == 1] > 0.5).any()  # inflamed windows are never tumour draws
    assert 0.35 < (blue[labels == 0] > 0.5).mean() < 0.65  # immune_fraction of the negatives
    plain = MixedSampler(lc, np.array([0, 1]), regions, LabelRule(), lc_fraction=0.0)
    assert "immune_windows" not in plain.counts()
    again = MixedSampler(
        lc, np.array([0, 1]), regions, LabelRule(), lc_fraction=0.0, immune_regions=[], immune_fraction=0.5
    )
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert (plain.sample(50, rng_a)[0] == again.sample(50, rng_b)[0]).all()  # no pool: the same stream


def test_sample_unlabelled_draws_from_every_pool() -> None:
    a, b = _region("benign/healthy"), _region("", mpp=0.25)
    b.image[:] = 0
    tiles = sample_unlabelled([[a], [b]], 40, np.random.default_rng(1))
    black = [(t == 0).all() for t in tiles]
    assert 0 < sum(black) < 40


def test_pad_reflect_keeps_scale() -> None:
    tile = np.arange(148 * 148 * 3, dtype=np.uint32).reshape(148, 148, 3).astype(np.uint8)
    out = pad_reflect(tile)
    assert out.shape == (224, 224, 3)
    np.testing.assert_array_equal(out[38 : 38 + 148, 38 : 38 + 148], tile)


# --------------------------------------------------------------------------- augmentation


def test_degrade_with_zero_probabilities_is_identity() -> None:
    t = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = degrade(t, np.random.default_rng(0), p_resolution=0, p_blur=0, p_jpeg=0)
    np.testing.assert_array_equal(out, t)


def test_degrade_blurs_when_forced() -> None:
    rng = np.random.default_rng(0)
    t = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = degrade(t, rng, p_resolution=1.0, p_blur=0, p_jpeg=0)
    assert out.shape == t.shape
    assert (
        np.abs(np.diff(out.astype(int), axis=1)).mean() < 0.7 * np.abs(np.diff(t.astype(int), axis=1)).mean()
    )


def test_colour_jitter_zero_is_identity_and_nonzero_changes_colour() -> None:
    t = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    same = colour_jitter(t, rng, brightness=0, contrast=0, saturation=0, gamma=0)
    assert np.abs(same.astype(int) - t).max() <= 1
    moved = colour_jitter(t, rng, brightness=0.1, contrast=0.2, saturation=0.2, gamma=0.2)
    assert np.abs(moved.astype(int) - t).mean() > 2


def test_scanner_shift_keeps_shape_and_dtype() -> None:
    t = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    out = scanner_shift(t, np.random.default_rng(0))
    assert out.shape == t.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - t).mean() > 1


# --------------------------------------------------------------------------- OOD, threshold, bootstrap


def test_mahalanobis_reference_separates_a_shifted_distribution() -> None:
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.1, 3.0, 16))
    fit = rng.multivariate_normal(np.zeros(16), cov, 2000)
    held = rng.multivariate_normal(np.zeros(16), cov, 500)
    foreign = rng.multivariate_normal(np.full(16, 2.0), cov, 500)
    mean, whiten = fit_gaussian(fit, shrinkage=0.0)
    # the whitened distance is the Mahalanobis distance with the inverse sample covariance
    direct = np.sqrt(
        np.einsum("ni,ij,nj->n", held - mean, np.linalg.inv(np.cov(fit, rowvar=False)), held - mean)
    )
    np.testing.assert_allclose(distances(held, mean, whiten), direct, rtol=1e-6)
    d_ref = float(np.percentile(distances(held, mean, whiten), 99))
    assert slide_score(distances(held, mean, whiten), d_ref) < 1.0
    assert slide_score(distances(foreign, mean, whiten), d_ref) > 1.0


def test_choose_threshold_uses_the_separating_value() -> None:
    y = np.array([0] * 50 + [1] * 50)
    p = np.concatenate([np.linspace(0.0, 0.29, 50), np.linspace(0.31, 1.0, 50)])
    s = EvalSet("v", np.zeros((100, 1, 1, 3), np.uint8), y, ("x",) * 100, tuple(str(i) for i in range(100)))
    t = choose_threshold([s], [p])
    assert 0.29 < t <= 0.31


def test_bootstrap_interval_contains_the_estimate_and_resamples_groups() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    p = np.clip(y * 0.4 + rng.uniform(0, 0.6, 200), 0, 1)
    groups = [f"g{i // 10}" for i in range(200)]
    ci = bootstrap_ci(y, p, groups, 0.5, n_boot=200)
    lo, hi = ci["auc"]
    assert lo is not None and hi is not None and lo <= hi <= 1.0
    one_group = bootstrap_ci(y, p, ["same"] * 200, 0.5, n_boot=20)
    assert one_group["auc"][0] == one_group["auc"][1]  # a single group cannot vary


# --------------------------------------------------------------------------- torch


def test_backward_through_the_real_input_path() -> None:
    """uint8 NHWC tiles -> Preprocess -> TileNet -> loss.backward(): the path that aborted in oneDNN on
    AVX-512/AMX CPUs when Preprocess handed Conv2d a permuted (channels-last strided) tensor."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from models.net import Preprocess, build_net

    pre = Preprocess([0.7, 0.5, 0.8], [0.17, 0.2, 0.12])
    x = pre(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)))
    assert x.is_contiguous() and x.shape == (4, 3, 224, 224)
    net = build_net()
    loss = torch.nn.functional.cross_entropy(net(x), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_export_with_ood_output_matches_torch(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    from models.evaluate import make_session
    from models.export import export_onnx, fit_ood, parity
    from models.net import TumourTileModel, build_net

    torch.manual_seed(0)
    model = TumourTileModel(build_net((8, 16), (16, 32, 32)), [0.66, 0.53, 0.85], [0.17, 0.2, 0.11]).eval()
    rng = np.random.default_rng(0)
    fit = rng.integers(100, 256, (96, 224, 224, 3), dtype=np.uint8)
    info = fit_ood(model, fit, fit[:32])
    assert info["d_ref"] > 0 and model.has_ood
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    session = make_session(path)
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits", "ood_distance"]
    assert parity(model, path, fit[:9], batch_sizes=(1, 4)) <= 1e-4
    near = session.run(["ood_distance"], {"tiles": fit[:16]})[0]
    far = session.run(["ood_distance"], {"tiles": np.zeros((16, 224, 224, 3), np.uint8)})[0]
    assert np.median(far) > np.median(near)


# --------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_glas_regions_cut_into_labelled_tiles() -> None:
    if not (SHARED_TILES / "glas-colon" / "index.csv").exists():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'glas-colon'} (the shared data folder is absent)"
        )
    from models.scanned import glas_tiles, load_glas

    regions = load_glas(SHARED_TILES / "glas-colon", GLAS_SPLIT["val"])
    assert {r.group for r in regions} == {f"glas_patient_{p}" for p in GLAS_SPLIT["val"]}
    images, labels, grades, groups = glas_tiles(regions, LabelRule())
    assert images.shape[1:] == (224, 224, 3) and len(images) == len(labels) == len(grades) == len(groups)
    assert labels.sum() > 0 and (labels == 0).sum() > 0
    assert all(g.startswith("malignant") for g, y in zip(grades, labels, strict=True) if y == 1)
    excluded = glas_tiles(regions, LabelRule(adenoma="exclude"))[2]
    assert not any(g.endswith("adenomatous") for g in excluded)


@pytest.mark.realdata
def test_monusac_lung_regions_give_epithelium_rich_tumour_windows() -> None:
    if not (SHARED_TILES / "monusac-lung" / "index.csv").exists():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'monusac-lung'} (the shared data folder is absent)"
        )
    from models.scanned import MONUSAC_SPLIT, glas_tiles, load_monusac

    assert not set(MONUSAC_SPLIT["train"]) & set(MONUSAC_SPLIT["val"])
    regions = load_monusac(SHARED_TILES / "monusac-lung", MONUSAC_SPLIT["val"])
    assert {r.group for r in regions} == set(MONUSAC_SPLIT["val"])
    for r in regions:
        assert r.mask is not None and r.nuclei is not None
        assert r.mask.shape == r.image.shape[:2]
        assert not (r.mask & ~r.nuclei).any()  # epithelial nuclei are a part of the typed ones
        assert r.nuclei.mean() < 0.6  # the colour threshold does not take the black background
    assert all(any(r.mask.any() for r in regions if r.group == g) for g in MONUSAC_SPLIT["val"])
    images, labels, _, groups = glas_tiles(regions, LabelRule())
    assert len(images) >= 20 and set(groups) == set(MONUSAC_SPLIT["val"])
    assert labels.all()  # these primary-tumour crops are epithelium-rich: weak tumour labels only


@pytest.mark.realdata
def test_immune_regions_split_by_patient_and_are_non_tumour_crowds() -> None:
    """Training inflamed windows come from the MoNuSAC training patients and CoNSeP's train tiles,
    validation ones from every other MoNuSAC patient and CoNSeP's test tiles; none is shared."""
    for name in ("monusac-lung", "consep-patches"):
        if not (SHARED_TILES / name / "index.csv").exists():
            pytest.skip(f"real data not available: {SHARED_TILES / name} (the shared data folder is absent)")
    from models.scanned import IMMUNE_VAL_MONUSAC, MONUSAC_SPLIT, immune_tiles, immune_windows, load_immune

    assert not set(IMMUNE_VAL_MONUSAC) & set(MONUSAC_SPLIT["train"])
    assert set(MONUSAC_SPLIT["val"]) <= set(IMMUNE_VAL_MONUSAC)
    train = load_immune(SHARED_TILES, MONUSAC_SPLIT["train"], "train")
    windows = immune_windows(train)
    groups = {train[i].group for i, *_ in windows}
    assert len(windows) >= 20 and set(MONUSAC_SPLIT["train"]) <= groups
    assert any(g.startswith("consep-train") for g in groups)
    for i, x0, y0, side in windows:  # crowded with immune nuclei, hardly any epithelium
        reg = train[i]
        assert reg.nuclei_fraction(x0, y0, side) >= 0.05
        assert reg.mask_fraction(x0, y0, side) >= 0.4 * reg.nuclei_fraction(x0, y0, side)
    val = load_immune(SHARED_TILES, IMMUNE_VAL_MONUSAC, "test")
    tiles, val_groups = immune_tiles(val)
    assert len(tiles) >= 10 and not set(val_groups) & groups
    assert any(g.startswith("consep-test") for g in val_groups)
    assert any(g in MONUSAC_SPLIT["val"] for g in val_groups)


def test_blur_tiles_is_a_gaussian_of_the_given_sigma() -> None:
    """Sigma 0 gives the tiles back; a blur keeps the mean colour and flattens a checkerboard."""
    from models.blur_check import blur_tiles

    tiles = np.zeros((2, 32, 32, 3), np.uint8)
    tiles[:, ::2, ::2] = 200
    tiles[:, 1::2, 1::2] = 200
    assert blur_tiles(tiles, 0.0) is tiles
    soft = blur_tiles(tiles, 2.0)
    assert soft.dtype == np.uint8 and soft.shape == tiles.shape
    assert abs(float(soft.mean()) - float(tiles.mean())) < 1.0
    assert soft.std() < 0.05 * tiles.std()


@pytest.mark.realdata
def test_blur_check_starts_at_the_validation_auc_and_loses_tumour_with_defocus() -> None:
    """Unblurred, the table's AUC is models.compare's GlaS validation AUC (adenomas as negatives, the
    card's rule); 1.5 um of defocus costs the shipped model AUC and tumour calls (the README's figures)."""
    if not (SHARED_TILES / "glas-colon" / "index.csv").exists():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'glas-colon'} (the shared data folder is absent)"
        )
    from models.blur_check import blur_table
    from models.evaluate import build_sets, score_sets
    from wsi_pipeline.evaluation.metrics import roc_auc
    from wsi_pipeline.inference.card import load_card

    model = Path(__file__).resolve().parents[1] / "models" / "tumour-cnn.onnx"
    sharp, blurred = blur_table(model, (0.0, 1.5))
    (glas,) = [s for s in build_sets(load_card(model.with_suffix(".json")).raw, None, ("val",))]
    (p,) = score_sets(model, [glas])
    assert sharp["tiles"] == blurred["tiles"] == len(glas.tumour)
    assert sharp["auc"] == round(float(roc_auc(glas.tumour, p)), 4)
    assert blurred["auc"] < sharp["auc"] - 0.05
    assert blurred["called"] < sharp["called"]
    # the focus check counts none of the sharp validation tiles and nearly all of the blurred ones
    assert sharp["out_of_focus"] == sharp["out_of_focus_jpeg80"] == 0.0
    assert blurred["out_of_focus"] >= 0.95 and blurred["out_of_focus_jpeg80"] >= 0.95


def test_restain_gives_each_patient_the_reference_stain_and_a_round_trip_keeps_the_tiles() -> None:
    """Tiles made of two known stains (optical densities, Beer-Lambert) re-stained to another stain
    model: a Macenko fit on the result finds the reference's stain vectors; to the tiles' own fit
    (``None``) they come back nearly unchanged."""
    from models.evaluate import EvalSet
    from models.stain_check import restain
    from wsi_pipeline.stain.macenko import REFERENCE, StainModel, fit_macenko

    rng = np.random.default_rng(0)
    conc = rng.gamma(2.0, 0.3, size=(6, 64, 64, 2)) * (rng.random((6, 64, 64, 1)) < 0.8)
    od = conc @ REFERENCE.stain_matrix  # (.., 2) @ (2, 3): rows H and E
    tiles = np.clip(np.rint(240 * np.exp(-od)), 0, 255).astype(np.uint8)
    glas = EvalSet("glas-val", tiles, np.zeros(6, np.int64), ("x",) * 6, ("p1",) * 3 + ("p2",) * 3)
    h, e = np.array([0.72, 0.66, 0.2]), np.array([0.35, 0.91, 0.22])  # a pinker lab's H&E
    target = StainModel(np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)]), np.array([1.5, 0.8]))

    back = restain(glas, None)
    assert np.abs(back.images.astype(int) - tiles).mean() < 2.0
    moved = restain(glas, target)
    assert moved.groups == glas.groups and moved.images.shape == tiles.shape
    for idx in (slice(0, 3), slice(3, 6)):
        fit = fit_macenko(moved.images[idx])
        to_target = (fit.stain_matrix * target.stain_matrix).sum(1)  # cosine per stain (row)
        to_source = (fit.stain_matrix * REFERENCE.stain_matrix).sum(1)
        assert to_target.min() > 0.98 and (to_target > to_source).all(), (to_target, to_source)
        # the concentration range near the reference's (its 99th percentile moves with rounding to uint8)
        assert np.abs(fit.max_concentrations / target.max_concentrations - 1).max() < 0.25
    # hue only: the target's vectors at the group's own amounts; amounts only: the reverse
    hue, amounts = restain(glas, target, "hue"), restain(glas, target, "amounts")
    for idx in (slice(0, 3), slice(3, 6)):
        own = fit_macenko(tiles[idx])
        fit_h, fit_a = fit_macenko(hue.images[idx]), fit_macenko(amounts.images[idx])
        assert (fit_h.stain_matrix * target.stain_matrix).sum(1).min() > 0.98
        assert np.abs(fit_h.max_concentrations / own.max_concentrations - 1).max() < 0.1
        assert (fit_a.stain_matrix * own.stain_matrix).sum(1).min() > 0.999
        assert np.abs(fit_a.max_concentrations / target.max_concentrations - 1).max() < 0.25
        assert np.abs(fit_a.max_concentrations / own.max_concentrations - 1).max() > 0.3  # it moved
    with pytest.raises(ValueError, match="part"):
        restain(glas, target, "saturation")


@pytest.mark.realdata
def test_stain_check_moves_the_shipped_models_calls_with_another_labs_stain() -> None:
    """As scanned, the table's AUC is the GlaS validation AUC; re-stained to the shared data's real
    H&E references, the shipped model keeps some AUC but its calls move by far more than the round
    trip moves them (the card's "stain far from training" figures)."""
    stains = SHARED_TILES.parent / "stain"
    if not (SHARED_TILES / "glas-colon" / "index.csv").exists() or not stains.is_dir():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'glas-colon'} or {stains} (the shared data is absent)"
        )
    from models.evaluate import build_sets, score_sets
    from models.stain_check import stain_table
    from wsi_pipeline.evaluation.metrics import roc_auc
    from wsi_pipeline.inference.card import load_card

    model = Path(__file__).resolve().parents[1] / "models" / "tumour-cnn.onnx"
    rows = {r["stain"]: r for r in stain_table(model, stains)}
    card = load_card(model.with_suffix(".json"))
    (glas,) = [s for s in build_sets(card.raw, None, ("val",)) if s.name == "glas-val"]
    (p,) = score_sets(model, [glas])
    scanned, trip = rows.pop("as scanned"), rows.pop("round trip")
    assert scanned["auc"] == round(float(roc_auc(glas.tumour, p)), 4)
    assert scanned["called"] == round(float((p >= card.threshold).mean()), 4)
    assert abs(trip["auc"] - scanned["auc"]) < 0.02 and abs(trip["called"] - scanned["called"]) < 0.1
    assert len(rows) == len(list(stains.glob("*.png"))) >= 6
    assert all(r["tiles"] == scanned["tiles"] and r["auc"] > 0.85 for r in rows.values())
    assert max(abs(r["called"] - scanned["called"]) for r in rows.values()) > 0.3


def test_stain_summary_is_the_worst_reference_against_a_baseline() -> None:
    from models.stain_check import summary

    rows = [
        {"stain": "as scanned", "auc": 0.98, "called": 0.6},
        {"stain": "round trip", "auc": 0.90, "called": 0.1},  # not a reference: left out
        {"stain": "a.png", "auc": 0.95, "called": 0.5},
        {"stain": "b.png", "auc": 0.93, "called": 0.9},
        {"stain": "b.png: hue only", "auc": 0.5, "called": 0.0, "part": "hue"},  # a decomposition: left out
    ]
    assert summary(rows) == {
        "references": 2,
        "baseline_called": 0.6,
        "auc_min": 0.93,
        "called_max_shift": 0.3,
    }
    assert summary(rows, 0.45)["called_max_shift"] == 0.45


@pytest.mark.realdata
def test_a_training_stain_candidate_is_scored_normalized_and_paired_with_the_raw_model(
    tmp_path: Path,
) -> None:
    """``stain_check --make-candidate``: the shipped ONNX with a card asking for every slide to be
    normalized to the GlaS training patients' stain; ``models.compare`` scores it on the same tiles
    normalized per group, so its row pairs with the raw model's (rule norm-train-0.4.0's evidence)."""
    if not (SHARED_TILES / "glas-colon" / "index.csv").exists():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'glas-colon'} (the shared data folder is absent)"
        )
    import json
    import shutil

    from models.compare import compare
    from models.evaluate import default_index
    from models.stain_check import make_candidate, training_stain
    from wsi_pipeline.inference.card import load_card

    shipped = Path(__file__).resolve().parents[1] / "models" / "tumour-cnn.onnx"
    cand = make_candidate(shipped, tmp_path / "cand")
    card = load_card(cand.with_suffix(".json"))
    assert (
        card.sha256 == load_card(shipped.with_suffix(".json")).sha256
        and card.stain_normalization == "macenko"
    )
    assert card.stain_reference == training_stain().to_dict()
    # a card asking for Macenko without a reference (models.train --stain macenko): the standard one
    std = tmp_path / "std" / "tumour-cnn.onnx"
    std.parent.mkdir()
    shutil.copyfile(shipped, std)
    raw_card = json.loads(shipped.with_suffix(".json").read_text())
    raw_card["preprocessing"]["stain_normalization"] = "macenko"
    std.with_suffix(".json").write_text(json.dumps(raw_card))
    raw, norm, std_row = compare([shipped, cand, std], "val", default_index(), paired=True, n_boot=50)
    assert raw["stain"] == "none" and norm["stain"].startswith("macenko to the card's reference")
    assert std_row["stain"].startswith("macenko to the standard reference")
    for row in (norm, std_row):
        assert row["paired"] and set(row["paired"]) >= {"glas_auc_adenoma_negative", "lung_val_called"}
        assert row["glas_auc_adenoma_negative"] != raw["glas_auc_adenoma_negative"]
        diff = row["glas_auc_adenoma_negative"] - raw["glas_auc_adenoma_negative"]
        assert row["paired"]["glas_auc_adenoma_negative"]["diff"] == pytest.approx(diff, abs=1e-3)
    assert std_row["glas_auc_adenoma_negative"] != norm["glas_auc_adenoma_negative"]


@pytest.mark.realdata
def test_stain_check_normalizes_for_a_card_trained_on_normalized_tiles(tmp_path: Path) -> None:
    """A card asking for Macenko without a reference of its own (``models.train --stain macenko``) is
    scored on tiles normalized per patient to the standard reference, as the pipeline scores its slides,
    not on raw colours."""
    stains = SHARED_TILES.parent / "stain"
    if not (SHARED_TILES / "glas-colon" / "index.csv").exists() or not stains.is_dir():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'glas-colon'} or {stains} (the shared data is absent)"
        )
    import json
    import shutil

    from models.blur_check import blur_table
    from models.evaluate import build_sets, score_sets
    from models.stain_check import restain, scoring_reference, stain_table
    from wsi_pipeline.evaluation.metrics import roc_auc
    from wsi_pipeline.stain.macenko import REFERENCE

    shipped = Path(__file__).resolve().parents[1] / "models" / "tumour-cnn.onnx"
    model = tmp_path / "m.onnx"
    shutil.copyfile(shipped, model)
    card = json.loads(shipped.with_suffix(".json").read_text())
    card["preprocessing"]["stain_normalization"] = "macenko"
    model.with_suffix(".json").write_text(json.dumps(card))
    assert scoring_reference(card) == REFERENCE
    assert scoring_reference({"preprocessing": {"stain_normalization": "none"}}) is None
    one = tmp_path / "stains"
    one.mkdir()
    shutil.copyfile(stains / "histoqc-template1.png", one / "histoqc-template1.png")
    rows = {r["stain"]: r for r in stain_table(model, one)}
    raw = {**card, "preprocessing": {**card["preprocessing"], "stain_normalization": "none"}}
    (glas,) = [s for s in build_sets(raw, None, ("val",)) if s.name == "glas-val"]
    (p,) = score_sets(model, [restain(glas, REFERENCE)])
    assert rows["as scanned"]["auc"] == round(float(roc_auc(glas.tumour, p)), 4)
    (q,) = score_sets(model, [glas])
    assert rows["as scanned"]["auc"] != round(float(roc_auc(glas.tumour, q)), 4)  # not raw colours
    # the blur check too: blurred as scanned (none here), then each patient normalized
    (sharp,) = blur_table(model, (0.0,))
    assert sharp["auc"] == rows["as scanned"]["auc"] and sharp["called"] == rows["as scanned"]["called"]


# --------------------------------------------------------------------------- paired comparison


def _paired_set(n_groups: int = 8, per_group: int = 10) -> EvalSet:
    rng = np.random.default_rng(0)
    tumour = np.tile(np.r_[np.ones(per_group // 2), np.zeros(per_group - per_group // 2)], n_groups)
    groups = tuple(f"p{g}" for g in range(n_groups) for _ in range(per_group))
    images = rng.integers(0, 255, (len(tumour), 4, 4, 3), dtype=np.uint8)
    return EvalSet("s", images, tumour.astype(np.int64), ("x",) * len(tumour), groups)


def test_paired_difference_is_zero_against_itself_and_signed_by_the_better_model() -> None:
    """A model against itself differs by exactly 0 on every draw; a model that separates the classes
    in every group while the reference only half does gets a positive difference whose whole interval
    is above 0; the interval's unit is the group."""
    from models.compare import PAIRED, paired_difference

    s = _paired_set()
    rng = np.random.default_rng(1)
    noisy = np.clip(0.5 + 0.3 * (s.tumour - 0.5) + rng.normal(0, 0.25, len(s.tumour)), 0, 1)
    auc = PAIRED["consep_val_auc"][1]
    same = paired_difference(s, (noisy, 0.5), (noisy, 0.5), auc, n_boot=200)
    assert same["diff"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert same["groups"] == 8 and same["tiles"] == 80
    clean = np.where(s.tumour == 1, 0.9, 0.1)
    better = paired_difference(s, (noisy, 0.5), (clean, 0.5), auc, n_boot=200)
    assert better["diff"] > 0 and better["ci95"][0] > 0
    worse = paired_difference(s, (clean, 0.5), (noisy, 0.5), auc, n_boot=200)
    assert worse["diff"] == -better["diff"] and worse["ci95"][1] < 0
    # each model at its own threshold: the same scores called at 0.95 instead of 0.5 call fewer
    called = PAIRED["lung_val_called"][1]
    assert paired_difference(s, (clean, 0.5), (clean, 0.95), called, n_boot=50)["diff"] == -0.5


@pytest.mark.realdata
def test_compare_paired_gives_the_shipped_model_zero_difference_from_itself(tmp_path: Path) -> None:
    """--paired on the real validation sets: every figure of the shipped model against itself is 0
    with a [0, 0] interval, and the rows carry the group counts that the intervals resample."""
    if not (SHARED_TILES / "glas-colon" / "index.csv").exists():
        pytest.skip(
            f"real data not available: {SHARED_TILES / 'glas-colon'} (the shared data folder is absent)"
        )
    from models.compare import main

    model = Path(__file__).resolve().parents[1] / "models" / "tumour-cnn.onnx"
    out = tmp_path / "paired.json"
    assert main(["--split", "val", "--paired", "--json", str(out), str(model), str(model)]) == 0
    ref, again = json.loads(out.read_text())
    assert "paired" not in ref and again["paired_against"] == str(model)
    assert set(again["paired"]) >= {"glas_auc_adenoma_negative", "glas_auc_without_adenoma", "lc25000_auc"}
    for name, d in again["paired"].items():
        assert d["diff"] == 0.0 and d["ci95"] == [0.0, 0.0], name
    assert again["paired"]["glas_auc_adenoma_negative"]["groups"] == len(GLAS_SPLIT["val"])
    # all of CoNSeP (never trained on by the shipped recipe): about 3x the source tiles of its test split
    assert ref["consep_all_auc"] is not None and ref["consep_all_note"] is None
    assert again["paired"]["consep_all_auc"]["groups"] >= 2 * again["paired"]["consep_val_auc"]["groups"]
    assert ref["consep_all_tiles"] >= 2 * again["paired"]["consep_val_auc"]["tiles"]
    # the folded healthy tiles (the card's fold finding, on the validation patients only)
    healthy = ref["glas_mean_p"]["benign/healthy"]
    assert ref["fold_val_tiles"] > 0 and ref["fold_val_mean_p"] > healthy + 0.1  # 0.4.0: 0.639 vs 0.314


def test_the_whole_of_consep_validates_only_models_that_never_drew_from_it() -> None:
    """consep_all_auc scores CoNSeP's train tiles too, so a recipe that trained on them (its CoNSeP
    windows, or its inflamed windows, which include CoNSeP's train tiles) must not be judged on it."""
    from models.compare import drew_from_consep

    shipped = json.loads((Path(__file__).resolve().parents[1] / "models" / "tumour-cnn.json").read_text())
    assert not drew_from_consep(shipped)
    recipe = shipped["training"]["recipe"]
    assert drew_from_consep({"training": {"recipe": {**recipe, "immune_fraction": 0.1}}})
    assert drew_from_consep(
        {"training": {"recipe": {**recipe, "consep": "../shared/data/tiles/consep-patches"}}}
    )
    assert not drew_from_consep({"training": {}}) and not drew_from_consep({})


def test_compare_names_a_model_without_its_card_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run whose export has written the .onnx but not yet its card (or lost it): exit 2 and one
    line naming the card, before any set is read (so it needs no shared data)."""
    from models.compare import main

    onnx = tmp_path / "run" / "tumour-cnn.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"not yet")
    assert main(["--split", "val", str(onnx)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'run' / 'tumour-cnn.json'}: model card not found" in err
