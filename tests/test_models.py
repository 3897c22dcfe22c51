"""Tests of the tumour tile CNN (``models/``): split, augmentation, training, export, card.

Torch-dependent tests skip when torch is absent (install the ``train`` extra). Tests on the real
LC25000 tiles are marked ``realdata`` and skip when ../shared/data is absent.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]  # `models` is importable via pytest's pythonpath = ["."]

from models.augment import hed_jitter, hed_to_rgb, random_dihedral, rgb_to_hed  # noqa: E402
from models.split import IndexRow, read_index, sample_rows, split_groups, split_rows  # noqa: E402
from wsi_pipeline.inference.card import load_card  # noqa: E402
from wsi_pipeline.provenance import file_sha256  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LC25000_INDEX = SHARED_DATA / "tiles" / "lc25000-lung" / "index.csv"
SHIPPED_ONNX = ROOT / "models" / "tumour-cnn.onnx"
SHIPPED_CARD = ROOT / "models" / "tumour-cnn.json"
TORCH_REASON = "torch is not installed (install the `train` extra: pip install -e .[train])"


def _torch():  # type: ignore[no-untyped-def]
    return pytest.importorskip("torch", reason=TORCH_REASON)


def _synthetic_rows(n_groups: int = 60, seed: int = 0) -> list[IndexRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = ("aca", "scc", "n")[g % 3]
        for k in range(int(rng.integers(1, 12))):
            rows.append(
                IndexRow(Path(f"/x/{label}/{g}_{k}.jpeg"), label, int(label != "n"), f"{label}-g{g:03d}")
            )
    return rows


def _textured_tile(rng: np.random.Generator, tumour: int, px: int = 224) -> np.ndarray:
    """H&E-like colours: pale pink stroma with dark purple 'nuclei' (many and large when tumour)."""
    tile = np.empty((px, px, 3), np.uint8)
    tile[:] = (235, 190, 215)
    yy, xx = np.mgrid[0:px, 0:px]
    for _ in range(int(rng.integers(25, 35)) if tumour else int(rng.integers(4, 8))):
        cy, cx = rng.integers(0, px, 2)
        r = rng.uniform(9, 14) if tumour else rng.uniform(3, 5)
        tile[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (90, 50, 140)
    noise = rng.integers(-12, 13, size=tile.shape)
    return np.clip(tile.astype(int) + noise, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- split


def test_group_split_cannot_leak() -> None:
    rows = _synthetic_rows()
    split = split_rows(rows, (0.7, 0.15, 0.15), seed=7)
    groups = {name: {rows[i].group for i in idx} for name, idx in split.items()}
    for a, b in itertools.combinations(groups, 2):
        assert not groups[a] & groups[b], f"{a} and {b} share groups"
    assert sorted(i for idx in split.values() for i in idx) == list(range(len(rows)))
    # stratified: every label is in every split
    for name, idx in split.items():
        assert {rows[i].label for i in idx} == {"aca", "scc", "n"}, name
    # deterministic, independent of row order, and seed-dependent
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    g1 = split_groups([r.group for r in rows], [r.label for r in rows], seed=7)
    g2 = split_groups([r.group for r in shuffled], [r.label for r in shuffled], seed=7)
    g3 = split_groups([r.group for r in rows], [r.label for r in rows], seed=8)
    assert g1 == g2
    assert g1 != g3


def test_split_rejects_group_with_two_labels(tmp_path: Path) -> None:
    index = tmp_path / "index.csv"
    index.write_text("path,label,tumour,group\na.jpeg,aca,1,g1\nb.jpeg,n,0,g1\n")
    with pytest.raises(ValueError, match="g1"):
        read_index(index)
    with pytest.raises(ValueError, match="fractions"):
        split_groups(["a"], ["x"], fractions=(0.5, 0.5, 0.5))


def test_sample_rows_is_deterministic_subset() -> None:
    rows = _synthetic_rows()
    idx = split_rows(rows)["test"]
    a = sample_rows(idx, rows, 10, seed=3)
    assert a == sample_rows(list(reversed(idx)), rows, 10, seed=3)
    assert len(a) == 10
    assert set(a) <= set(idx)


# --------------------------------------------------------------------------- augmentation


def test_hed_zero_jitter_is_identity_and_round_trip_exact() -> None:
    rng = np.random.default_rng(0)
    tile = _textured_tile(rng, 1)
    assert np.array_equal(hed_jitter(tile, rng, sigma=0.0, bias=0.0), tile)
    assert np.abs(hed_to_rgb(rgb_to_hed(tile)).astype(int) - tile).max() <= 1
    every_colour = np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1)[None]
    assert np.abs(hed_to_rgb(rgb_to_hed(every_colour)).astype(int) - every_colour).max() <= 1
    # a pure haematoxylin pixel deconvolves to haematoxylin only
    hed = rgb_to_hed(hed_to_rgb(np.array([[[0.8, 0.0, 0.0]]], np.float32)))
    assert hed[0, 0, 0] == pytest.approx(0.8, abs=0.02)
    assert np.abs(hed[0, 0, 1:]).max() < 0.02


def test_stain_rotation_turns_the_stain_vectors_by_at_most_the_angle() -> None:
    """Tiles whose left half is pure haematoxylin and right half pure eosin (the standard vectors):
    in a rotated tile each half's optical-density direction is turned by at most ``max_deg``, by a
    different angle per tile; about ``share`` of the tiles change; 0 degrees gives the tiles back."""
    from models.augment import RGB_FROM_HED, stain_rotation

    tiles = np.empty((60, 16, 16, 3), np.uint8)
    for half, stain in ((slice(0, 8), 0), (slice(8, 16), 1)):
        tiles[:, :, half] = np.rint(255 * 10 ** (-0.8 * RGB_FROM_HED[stain])).astype(np.uint8)
    assert np.array_equal(stain_rotation(tiles, np.random.default_rng(0), 0.0), tiles)
    out = stain_rotation(tiles, np.random.default_rng(1), max_deg=15.0, share=0.5)
    changed = (out != tiles).any(axis=(1, 2, 3))
    assert 0.3 < changed.mean() < 0.7 and out.shape == tiles.shape and out.dtype == np.uint8

    def direction(px: np.ndarray) -> np.ndarray:
        od = -np.log10((px.reshape(-1, 3).astype(np.float64) + 0.5) / 255.5).mean(0)
        return od / np.linalg.norm(od)

    turned = np.array([
        [np.degrees(np.arccos(np.clip(direction(t[:, h]) @ direction(tiles[0][:, h]), -1, 1))) for h in
         (slice(0, 8), slice(8, 16))]
        for t in out[changed]
    ])  # fmt: skip
    assert turned.max() < 15.0 + 1.0, turned.max()  # 1 degree: rounding to uint8
    assert turned.mean() > 3.0 and len(np.unique(turned.round(1))) > 10
    assert np.array_equal(stain_rotation(tiles, np.random.default_rng(1), max_deg=15.0, share=0.5), out)


def test_hed_jitter_changes_colour_not_geometry() -> None:
    rng = np.random.default_rng(1)
    tile = _textured_tile(rng, 1)
    batch = np.stack([tile, tile[::-1]])
    out = hed_jitter(batch, np.random.default_rng(2), sigma=0.2, bias=0.1)
    assert out.dtype == np.uint8
    assert out.shape == batch.shape
    for before, after in zip(batch, out, strict=True):
        assert np.abs(after.astype(int) - before).mean() > 2.0, "colour did not change"
        # a per-tile colour map: pixels of one input colour share one output colour
        colours, inverse = np.unique(before.reshape(-1, 3), axis=0, return_inverse=True)
        flat = after.reshape(-1, 3)
        for c in range(0, len(colours), max(1, len(colours) // 50)):
            assert len(np.unique(flat[inverse.ravel() == c], axis=0)) == 1
        # and the structure stays where it was
        g0, g1 = before.mean(-1).ravel(), after.mean(-1).ravel()
        assert np.corrcoef(g0, g1)[0, 1] > 0.95
    single = hed_jitter(tile, np.random.default_rng(3))
    assert single.shape == tile.shape
    assert single.dtype == np.uint8
    with pytest.raises(ValueError):
        hed_jitter(tile.astype(np.float32), rng)  # type: ignore[arg-type]


def test_random_dihedral_gives_one_of_eight_transforms() -> None:
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    out = random_dihedral(batch, np.random.default_rng(5))
    for before, after in zip(batch, out, strict=True):
        options = [np.rot90(before, k) for k in range(4)]
        options += [o[:, ::-1] for o in options]
        assert any(np.array_equal(after, o) for o in options)


# --------------------------------------------------------------------------- metrics: tests/test_metrics.py


# --------------------------------------------------------------------------- torch: net, training, export


def test_net_size_and_flop_counter() -> None:
    torch = _torch()
    from models.net import build_net, count_flops, count_params

    net = build_net()
    assert count_params(net) < 1_000_000
    flops = count_flops(net)
    assert 0.05e9 < flops["flops"] < 0.5e9
    assert flops["flops"] == 2 * flops["macs"]
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, (1, 3, 10, 10))["macs"] == 10 * 10 * 8 * 3 * 3 * 3
    assert build_net()(torch.zeros(2, 3, 224, 224)).shape == (2, 2)


def test_a_few_training_steps_reduce_the_loss() -> None:
    torch = _torch()
    from models.net import Preprocess, build_net

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 8)
    x = torch.from_numpy(np.stack([_textured_tile(rng, int(t)) for t in y]))
    target = torch.from_numpy(y)
    net = build_net((8, 16), (16, 32, 32))
    pre = Preprocess([0.7, 0.6, 0.8], [0.2, 0.2, 0.15])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    net.train()
    for _ in range(20):
        loss = loss_fn(net(pre(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_export_round_trip_parity(tmp_path: Path) -> None:
    torch = _torch()
    import onnx

    from models.evaluate import make_session
    from models.export import export_onnx, parity
    from models.net import TumourTileModel, build_net

    torch.manual_seed(0)
    net = build_net((8, 16), (16, 32, 32))
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    model = TumourTileModel(net, [0.66, 0.53, 0.85], [0.17, 0.2, 0.11]).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=17, metadata={"name": "test"})
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = make_session(path)
    (inp,) = session.get_inputs()
    assert inp.name == "tiles"
    assert inp.type == "tensor(uint8)"
    assert inp.shape[1:] == [224, 224, 3]
    assert isinstance(inp.shape[0], str)  # dynamic batch axis
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]
    tiles = np.random.default_rng(0).integers(0, 256, size=(9, 224, 224, 3), dtype=np.uint8)
    assert parity(model, path, tiles, batch_sizes=(1, 4)) <= 1e-4
    prob = session.run(["probabilities"], {"tiles": tiles[:3]})[0]
    assert prob.shape == (3, 2)
    np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-5)


def test_seed_ensemble_averages_its_members_probabilities(tmp_path: Path) -> None:
    """The exported ensemble's P(tumour) is the mean of its members' own models' (each with its own
    mean/std), its logits give that mean back through a softmax, and its OOD features are theirs."""
    torch = _torch()
    from models.evaluate import make_session
    from models.export import export_onnx, parity
    from models.net import SeedEnsemble, TumourTileModel, build_net

    norms = [([0.66, 0.53, 0.85], [0.17, 0.2, 0.11]), ([0.70, 0.49, 0.80], [0.15, 0.22, 0.12])]
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_net((8, 16), (16, 32, 32))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.data.uniform_(0.5, 1.5)
        members.append(net.eval())
    singles = [TumourTileModel(n, *norm).eval() for n, norm in zip(members, norms, strict=True)]
    ensemble = TumourTileModel(SeedEnsemble(members, *zip(*norms, strict=True)), *norms[0]).eval()
    tiles = np.random.default_rng(1).integers(0, 256, size=(6, 224, 224, 3), dtype=np.uint8)
    with torch.no_grad():
        t = torch.from_numpy(tiles)
        own = torch.stack([m(t)[0] for m in singles]).mean(0)
        probs, logits = ensemble(t)
        feats = ensemble.net.embed(ensemble.preprocess(t))
        own_feats = torch.cat([m.net.embed(m.preprocess(t)) for m in singles], 1)
        first = singles[0](t)[0]
    assert float((own[:, 1] - first[:, 1]).abs().max()) > 1e-3  # the members differ
    torch.testing.assert_close(probs, own, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(logits, 1), own, atol=1e-6, rtol=0)
    torch.testing.assert_close(feats, own_feats, atol=1e-4, rtol=1e-4)
    path = tmp_path / "ens.onnx"
    export_onnx(ensemble, path)
    assert parity(ensemble, path, tiles, batch_sizes=(1, 4)) <= 1e-4
    onnx_probs = make_session(path).run(["probabilities"], {"tiles": tiles})[0]
    np.testing.assert_allclose(onnx_probs, own.numpy(), atol=1e-5)


def test_export_refuses_members_of_different_recipes(tmp_path: Path) -> None:
    """An ensemble is one recipe with different seeds: another option or a repeated seed is refused."""
    _torch()
    from models.export import check_members

    def ckpt(seed: int, **args: object) -> dict:
        return {
            "split": {"seed": 1}, "net_config": {"stem": [8, 8]}, "recipe": {"crypt_fraction": 0.3},
            "training": {"args": {"seed": seed, "out": f"r{seed}", "lr": 0.002, **args}},
        }  # fmt: skip

    paths = [Path("a/best.pt"), Path("b/best.pt")]
    check_members(paths, [ckpt(0), ckpt(1, threads=1)])
    with pytest.raises(ValueError, match="share a seed"):
        check_members(paths, [ckpt(0), ckpt(0)])
    with pytest.raises(ValueError, match=r"b/best.pt: its option --lr"):
        check_members(paths, [ckpt(0), ckpt(1, lr=0.001)])
    other = ckpt(1)
    other["recipe"]["crypt_fraction"] = 0.0
    with pytest.raises(ValueError, match="recipe crypt_fraction"):
        check_members(paths, [ckpt(0), other])


def _write_synthetic_index(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["path,label,tumour,group"]
    for label, tumour in (("aca", 1), ("scc", 1), ("n", 0)):
        (root / label).mkdir(parents=True)
        for g in range(4):
            for k in range(2):
                name = f"{label}/{g}_{k}.png"
                Image.fromarray(_textured_tile(rng, tumour)).save(root / name)
                lines.append(f"{name},{label},{tumour},{label}-g{g}")
    index = root / "index.csv"
    index.write_text("\n".join(lines) + "\n")
    return index


def test_train_export_evaluate_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _torch()
    from models import evaluate, export, train

    index = _write_synthetic_index(tmp_path / "data")
    run = tmp_path / "run"
    small = ["--stem", "8", "8", "--stages", "8", "16", "--batch-size", "4", "--threads", "2"]
    assert train.main(["--index", str(index), "--out", str(run), "--epochs", "2", *small]) == 0
    assert (run / "best.pt").exists()
    history = json.loads((run / "history.json").read_text())["history"]
    assert len(history) == 2
    out = tmp_path / "ship" / "tumour-cnn.onnx"
    capsys.readouterr()
    assert export.main(["--checkpoint", str(run / "best.pt"), "--out", str(out), "--parity-tiles", "8"]) == 0
    # the log of a candidate's export is blind to the test figures that are written to its card
    log = capsys.readouterr().out
    assert "test sets scored: test" in log and "test: auc" not in log and " sens " not in log
    card = load_card(out.with_suffix(".json")).raw
    assert card["sha256"] == file_sha256(out)
    assert card["metrics"]["test"]["n"] == 6  # 1 of 4 groups per label, 2 tiles each
    assert card["data"]["split"]["groups"] == {"train": 6, "val": 3, "test": 3}
    assert (out.parent / "MODEL_CARD.md").read_text().startswith("# Model card")
    assert evaluate.main(["--model", str(out), "--index", str(index), "--check", "--tolerance", "0"]) == 0

    # a second seed of the same recipe: the two export as one seed ensemble
    run1 = tmp_path / "run1"
    assert (
        train.main(["--index", str(index), "--out", str(run1), "--epochs", "2", "--seed", "1", *small]) == 0
    )
    ens = tmp_path / "ens" / "tumour-cnn.onnx"
    members = [str(run / "best.pt"), str(run1 / "best.pt")]
    capsys.readouterr()
    assert (
        export.main(["--checkpoint", *members, "--out", str(ens), "--parity-tiles", "8", "--show-test"]) == 0
    )
    assert "test: auc " in capsys.readouterr().out  # asked for: printed
    ens_card = load_card(ens.with_suffix(".json")).raw
    assert ens_card["architecture"]["members"] == 2
    assert ens_card["architecture"]["flops"] == 2 * card["architecture"]["flops"]
    assert [m["seed"] for m in ens_card["training"]["members"]] == [0, 1]
    assert "seed 1: best epoch" in (ens.parent / "MODEL_CARD.md").read_text()
    assert evaluate.main(["--model", str(ens), "--index", str(index), "--check", "--tolerance", "0"]) == 0


TINY_NET = ["--stem", "8", "8", "--stages", "8", "16", "--batch-size", "4", "--threads", "2"]
"""A network and batches small enough to train in a second on 2 cores."""


def test_train_with_ema_checkpoints_the_averaged_weights(tmp_path: Path) -> None:
    """With --ema the checkpoint holds the moving average: at a decay of almost 1 it stays at the
    weights of the first step (next to the seeded initial weights), while the raw weights move on."""
    torch = _torch()
    from models import train
    from models.net import build_net

    index = _write_synthetic_index(tmp_path / "data")
    small = [*TINY_NET, "--epochs", "2"]
    for name, extra in (("raw", []), ("ema", ["--ema", "0.9999999"])):
        assert train.main(["--index", str(index), "--out", str(tmp_path / name), *small, *extra]) == 0
    train.seed_everything(0)
    net = build_net([8, 8], [8, 16])
    initial = {k: v.detach().clone() for k, v in net.named_parameters()}  # BatchNorm statistics move at once

    def distance(run: str) -> float:
        state = torch.load(tmp_path / run / "best.pt", weights_only=False)["state_dict"]
        return sum(
            float((state[k] - initial[k]).abs().sum()) for k in initial if initial[k].is_floating_point()
        )

    assert distance("ema") < 0.2 * distance("raw")


def test_train_with_swa_averages_the_late_epochs_and_leaves_best_pt_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--swa-from 2 of 3 epochs: swa.pt's weights are the mean of the net's weights at the end of
    epochs 2 and 3 (captured here), its BatchNorm statistics recomputed (not any epoch's), and best.pt
    is bit for bit the run without it (the average draws from its own random stream). The export's
    card says what was averaged."""
    torch = _torch()
    from models import export, train

    index = _write_synthetic_index(tmp_path / "data")
    small = [*TINY_NET, "--epochs", "3"]
    assert train.main(["--index", str(index), "--out", str(tmp_path / "plain"), *small]) == 0

    ends: list[dict[str, object]] = []
    one_epoch = train.train_one_epoch

    def spy(net, *a, **k):  # type: ignore[no-untyped-def]
        loss = one_epoch(net, *a, **k)
        ends.append({n: v.detach().clone() for n, v in net.state_dict().items()})
        return loss

    monkeypatch.setattr(train, "train_one_epoch", spy)
    run = tmp_path / "swa"
    args = ["--index", str(index), "--out", str(run), *small, "--swa-from", "2", "--swa-bn-batches", "5"]
    assert train.main(args) == 0
    assert len(ends) == 3
    plain = torch.load(tmp_path / "plain" / "best.pt", weights_only=False)["state_dict"]
    best = torch.load(run / "best.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(plain[k], best[k]) for k in plain)
    ckpt = torch.load(run / "swa.pt", weights_only=False)
    swa = ckpt["state_dict"]
    params = [n for n, _ in train.build_net([8, 8], [8, 16]).named_parameters()]
    for n in params:
        assert torch.allclose(swa[n], (ends[1][n] + ends[2][n]) / 2, atol=1e-6), n  # type: ignore[operator]
        assert not torch.allclose(swa[n], ends[2][n]), n  # type: ignore[arg-type]
    stats = [n for n in swa if n.endswith("running_mean")]
    assert stats and all(not torch.equal(swa[n], e[n]) for n in stats for e in ends)  # type: ignore[arg-type]
    assert ckpt["training"]["swa"]["epochs"] == [2, 3] and ckpt["training"]["swa"]["bn_batches"] == 5
    history = json.loads((run / "history.json").read_text())
    assert history["swa"]["epochs"] == [2, 3] and history["swa"]["val_loss"] > 0

    out = tmp_path / "ship" / "tumour-cnn.onnx"
    assert export.main(["--checkpoint", str(run / "swa.pt"), "--out", str(out), "--parity-tiles", "4"]) == 0
    text = (out.parent / "MODEL_CARD.md").read_text()
    assert "Weights averaged (SWA) over epochs 2-3 of 3, BatchNorm statistics recomputed on 5" in text
    with pytest.raises(ValueError, match="cannot go with --ema"):
        train.main([*args, "--ema", "0.99"])


def test_fine_tune_starts_from_the_checkpoint_and_refuses_another_split(tmp_path: Path) -> None:
    """--init loads the checkpoint's weights, architecture and input normalisation (at --lr 0 AdamW
    leaves every weight where it was loaded), the card names the checkpoint, and a checkpoint trained
    on another split is refused: its training set may hold this run's held-out groups."""
    torch = _torch()
    from models import export, train

    index = _write_synthetic_index(tmp_path / "data")
    small = ["--batch-size", "4", "--threads", "2", "--epochs", "1"]
    base = tmp_path / "base"
    assert (
        train.main(
            ["--index", str(index), "--out", str(base), "--stem", "8", "8", "--stages", "8", "16", *small]
        )
        == 0
    )
    ft = tmp_path / "ft"
    args = ["--index", str(index), "--out", str(ft), "--init", str(base / "best.pt"), "--seed", "1", *small]
    assert train.main([*args, "--lr", "0"]) == 0  # no --stem/--stages: taken from the checkpoint
    b = torch.load(base / "best.pt", weights_only=False)
    f = torch.load(ft / "best.pt", weights_only=False)
    assert f["net_config"] == {"stem": [8, 8], "stages": [8, 16]}
    assert f["mean"] == b["mean"] and f["std"] == b["std"]
    weights = [k for k in b["state_dict"] if k.endswith(".weight")]
    assert weights and all(torch.equal(f["state_dict"][k], b["state_dict"][k]) for k in weights)
    init = f["training"]["init"]
    assert init["sha256"] == file_sha256(base / "best.pt") and init["command"] == b["training"]["command"]

    out = tmp_path / "ship" / "tumour-cnn.onnx"
    assert export.main(["--checkpoint", str(ft / "best.pt"), "--out", str(out), "--parity-tiles", "4"]) == 0
    assert f"Fine-tuned from `{(base / 'best.pt').as_posix()}`" in (out.parent / "MODEL_CARD.md").read_text()

    with pytest.raises(ValueError, match="another split"):
        train.main([*args, "--split-seed", "7"])
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train.main(["--index", str(index), "--out", str(ft), "--init", str(tmp_path / "nope.pt"), *small])


def test_train_refuses_scanned_options_without_glas(tmp_path: Path) -> None:
    """--lung and --crypt-fraction only shape the GlaS sampler: without --glas they would be ignored."""
    _torch()
    from models import train

    index = _write_synthetic_index(tmp_path / "data")
    base = ["--index", str(index), "--out", str(tmp_path / "run"), "--epochs", "1", "--threads", "1"]
    for extra in (["--lung", str(tmp_path)], ["--crypt-fraction", "0.3"], ["--stain-mix", "0.5"]):
        with pytest.raises(ValueError, match="need --glas"):
            train.main(base + extra)
    glas = ["--glas", str(tmp_path / "glas"), "--stain-mix", "0.5", "--stain", "macenko"]
    with pytest.raises(ValueError, match="cannot be combined with --stain macenko"):
        train.main(base + glas)


# --------------------------------------------------------------------------- the shipped model


def test_shipped_model_sha256_matches_card() -> None:
    assert SHIPPED_ONNX.exists(), f"{SHIPPED_ONNX} is missing: run python -m models.export"
    card = load_card(SHIPPED_CARD).raw
    assert card["onnx_file"] == SHIPPED_ONNX.name
    assert hashlib.sha256(SHIPPED_ONNX.read_bytes()).hexdigest() == card["sha256"]
    if (card.get("int8") or {}).get("shipped"):
        q = SHIPPED_ONNX.parent / card["int8"]["onnx_file"]
        assert file_sha256(q) == card["int8"]["sha256"]
    assert SHIPPED_ONNX.stat().st_size < 5e6


def test_shipped_card_describes_the_graph() -> None:
    import onnxruntime as ort

    card = json.loads(SHIPPED_CARD.read_text())
    assert card["classes"] == ["non-tumour", "tumour"]
    assert card["positive_class"] == "tumour"
    assert card["input"] == {
        **card["input"],
        "size_px": 224,
        "dtype": "uint8",
        "layout": "NHWC",
        "channels": "RGB",
    }
    assert card["preprocessing"]["in_graph"] is True
    assert card["mpp"] == 0.5
    test = card["metrics"]["test"]
    for key in ("accuracy", "precision", "recall", "f1", "auc"):
        assert 0.0 <= test[key] <= 1.0
    assert test["n"] == card["data"]["split"]["tiles"]["test"]
    session = ort.InferenceSession(str(SHIPPED_ONNX), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("tiles", "tensor(uint8)", [224, 224, 3])
    assert card["output"]["name"] in [o.name for o in session.get_outputs()]
    prob = session.run([card["output"]["name"]], {"tiles": np.zeros((2, 224, 224, 3), np.uint8)})[0]
    assert prob.shape == (2, 2)
    # the OOD distance is in the graph and the card says how to read it
    assert card["ood"]["output"] in [o.name for o in session.get_outputs()]
    assert card["ood"]["d_ref"] > 0
    assert 0 < card["threshold"]["value"] < 1
    # what the card says about its data and scale
    assert card["data"]["glas"]["patients"]["test"] and "research use only" in card["data"]["licence"].lower()
    # the scanned lung it saw (weak labels of MoNuSAC patients) and what that leaves unmeasured
    assert "MoNuSAC" in card["data"]["scanned_lung"]
    assert "specificity on scanned lung is not measured" in card["data"]["scanned_lung"]
    assert "non-commercial" in card["data"]["licence"]
    lung_patients = card["data"]["glas"]["lung"]["patients"]
    assert lung_patients["train"] and not set(lung_patients["train"]) & set(lung_patients["val"])


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from wsi_pipeline.pipeline import RunOptions, run_slide

    sample = ROOT / "samples" / "CMU-1-Small-Region.svs"
    out = tmp_path_factory.mktemp("cmu") / "cmu.tif"
    return run_slide(sample, out, model=SHIPPED_ONNX, options=RunOptions(workers=2))


def test_normalizing_slides_for_the_raw_colour_shipped_model_is_warned_and_its_negative_is_amber(
    cmu_run: dict, tmp_path: Path
) -> None:
    """The shipped model was trained on raw colours; --normalize macenko moves its calls (its card's
    "stain far from training": 60 % of GlaS validation tiles called as scanned, 12 % normalized). Asked
    for anyway, the run says so on the command line, in the manifest and on the page, where its 'no
    tumour' is amber (not a negative result); scored as the card says, no stain record at all."""
    from click.testing import CliRunner

    from wsi_pipeline.cli import main

    assert cmu_run["label"]["stain"] is None
    sample = ROOT / "samples" / "CMU-1-Small-Region.svs"
    r = CliRunner().invoke(main, [str(sample), "--out", str(tmp_path / "n.tif"), "--normalize", "macenko"])
    assert r.exit_code == 0, r.output
    assert (
        "WARNING tiles were stain-normalized (--normalize macenko) for a model trained on raw colours"
        in r.output
    )
    m = json.loads((tmp_path / "n.run.json").read_text())
    stain = m["label"]["stain"]
    assert (
        stain["normalized"]
        and not stain["model_expects_normalized"]
        and "without --normalize" in stain["warning"]
    )
    assert m["stain"] and not m["label"]["positive"]  # the slide was normalized; and called negative
    assert not m["label"]["ood"]["warning"]  # so the amber is the stain warning's alone
    page = (tmp_path / "n.report.html").read_text()
    assert 'class="label review"' in page and "trained on raw colours" in page


def test_shipped_model_warns_that_the_bundled_skin_sample_is_unlike_its_training_data(cmu_run: dict) -> None:
    """Whole-slide sanity on real input: the CC0 CMU sample (benign skin, 0.499 um/px) is an organ the
    model never saw; its slide OOD score is above the card's warning level, so the run says so."""
    m = cmu_run
    assert m["n_tiles"] > 40
    assert m["params"]["label"]["tile_threshold"] == load_card(SHIPPED_CARD).raw["threshold"]["value"]
    ood = m["label"]["ood"]
    assert ood is not None and ood["score"] > load_card(SHIPPED_CARD).raw["ood"]["warn_above"]
    assert ood["warning"] and "unlike the model's training data" in ood["warning"]


@pytest.mark.xfail(
    strict=True,
    reason="known defect (issue 12): benign squamous epithelium of the skin sample scores as tumour "
    "(the model learnt squamous morphology from LC25000 lung_scc and never saw benign squamous epithelium)",
)
def test_shipped_model_calls_the_bundled_benign_sample_no_tumour(cmu_run: dict) -> None:
    """Benign tissue: no tile called tumour. (0.4.0 labels the sample 'no tumour' by one tile, 8 tiles
    of 0.0933 mm^2 under the 0.1 mm^2 minimum area: a label that passes by a margin is not the fix.)"""
    evidence = cmu_run["label"]["evidence"]
    assert cmu_run["label"]["label"] == "no tumour" and evidence["tumour_tiles"] == 0, evidence


@pytest.mark.realdata
def test_shipped_model_reaches_card_accuracy_on_held_out_tiles() -> None:
    if not LC25000_INDEX.exists():
        pytest.skip(f"real data not available: {LC25000_INDEX} (the shared data folder is absent)")
    from models.evaluate import evaluate_model

    card = load_card(SHIPPED_CARD).raw
    split_info = card["data"]["split"]
    rows = read_index(LC25000_INDEX)
    split = split_rows(rows, split_info["fractions"], split_info["seed"])
    # the split rebuilt from index + seed is the one on the card
    assert {k: len({rows[i].group for i in v}) for k, v in split.items()} == split_info["groups"]
    assert {k: len(v) for k, v in split.items()} == split_info["tiles"]
    m = evaluate_model(
        SHIPPED_ONNX, LC25000_INDEX, split_info["seed"], split_info["fractions"], "test", max_tiles=200
    )
    assert m["n"] == 200
    assert m["accuracy"] >= card["metrics"]["test"]["accuracy"] - 0.05, m
    assert m["auc"] >= card["metrics"]["test"]["auc"] - 0.05, m


def test_index_csv_columns_are_the_ones_documented(tmp_path: Path) -> None:
    index = tmp_path / "i.csv"
    with index.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "tumour", "group", "mpp"])
        w.writerow(["a/x.jpeg", "lung_aca", "1", "g1", ""])
        w.writerow(["b/y.jpeg", "lung_n", "0", "g2", ""])
    rows = read_index(index)
    assert rows[0].path == (tmp_path / "a" / "x.jpeg").resolve()
    assert [r.tumour for r in rows] == [1, 0]
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,group\na,b,c\n")
    with pytest.raises(ValueError, match="tumour"):
        read_index(bad)


@pytest.mark.realdata
def test_shipped_model_warns_on_the_stain_shifted_tcga_section(tmp_path: Path) -> None:
    """The TCGA-CR head-and-neck squamous carcinoma section (no mpp in the file; 1.0 um/px assumed from
    nuclear size) is stained far pinker than anything in training: the slide OOD score says so, so its
    'no tumour' is flagged as not a negative result. That the heatmap misses its nests is a known
    defect (see the xfail below)."""
    slide = SHARED_DATA / "slides" / "aperio" / "tcga-cr-7395-01a-01-ts1.svs"
    if not slide.exists():
        pytest.skip(f"real data not available: {slide} (the shared data folder is absent)")
    from dataclasses import replace

    from wsi_pipeline.pipeline import RunOptions, run_slide
    from wsi_pipeline.tiling.plan import TileOptions

    opts = RunOptions(tile=replace(TileOptions(), mpp_override=1.0), workers=2)
    m = run_slide(slide, tmp_path / "tcga.tif", model=SHIPPED_ONNX, options=opts)
    assert m["label"]["ood"]["score"] > 1.5 * load_card(SHIPPED_CARD).raw["ood"]["warn_above"]
    assert m["label"]["ood"]["warning"]
    if m["label"]["label"] != "tumour":
        pytest.xfail("known defect (issue 12): the shipped model misses this section's carcinoma nests")


def test_shipped_model_card_is_its_markdown() -> None:
    """MODEL_CARD.md is generated from the JSON card: edited by hand, or left behind by a --write, it
    would tell a lab something the card does not."""
    from models.card import render_markdown

    card = json.loads(SHIPPED_CARD.read_text())
    assert (SHIPPED_ONNX.parent / "MODEL_CARD.md").read_text() == render_markdown(card)


def test_a_simulated_fold_adds_the_optical_densities_of_its_two_layers() -> None:
    """The fold simulation (the card's fold finding, ``--fold-fraction``) is Beer-Lambert: glass over
    tissue leaves the tissue at every grey level; two layers that each pass half the light pass a
    quarter; the order of the layers does not matter and a fold is never lighter than a layer."""
    from models.augment import overlay_tissue

    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    np.testing.assert_array_equal(overlay_tissue(np.full_like(levels, 255), levels), levels)
    half = np.full((1, 2, 2, 3), 127, np.uint8)  # (127 + 1) / 256: half the light
    np.testing.assert_array_equal(overlay_tissue(half, half), np.full_like(half, 63))  # 256 / 4 - 1
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    folded = overlay_tissue(a, b)
    np.testing.assert_array_equal(folded, overlay_tissue(b, a))
    assert (folded <= np.minimum(a, b)).all()


def test_fold_augmentation_folds_the_drawn_share_over_the_tile_itself() -> None:
    """``fold_tiles``: about ``fraction`` of a batch is folded, each tile over a turned copy of itself
    (so never lighter, and a uniform tile becomes exactly its two-layer self); 0 changes nothing and
    draws nothing; partners for the card's simulation come from the same group."""
    from models.augment import fold_partners, fold_tiles, overlay_tissue

    rng = np.random.default_rng(1)
    tiles = rng.integers(60, 256, (400, 16, 16, 3), dtype=np.uint8)
    tiles[0] = 127
    state = np.random.default_rng(2)
    assert fold_tiles(tiles, state, 0.0) is tiles and state.random() == np.random.default_rng(2).random()
    out = fold_tiles(tiles, np.random.default_rng(3), 0.25)
    changed = (out != tiles).any(axis=(1, 2, 3))
    assert 0.18 < changed.mean() < 0.32 and (out <= tiles).all()
    everything = fold_tiles(tiles, np.random.default_rng(3), 1.0)
    assert changed.sum() < (everything != tiles).any(axis=(1, 2, 3)).sum()
    np.testing.assert_array_equal(everything[0], overlay_tissue(tiles[0], tiles[0]))
    groups = np.array(["a", "a", "b", "b", "b", "c"])
    partners = fold_partners(groups, np.random.default_rng(0))
    assert (groups[partners] == groups).all() and (partners[:5] != np.arange(5)).all() and partners[5] == 5


@pytest.mark.realdata
def test_shipped_card_known_defects_are_what_the_model_does_now() -> None:
    """The card's known defects are measurements: measured again, the shipped model gives the same
    labels and figures (within onnxruntime's differences between CPUs), and each says what to do."""
    if not LC25000_INDEX.exists() or not (SHARED_DATA / "tiles" / "glas-colon").exists():
        pytest.skip(f"real data not available: {SHARED_DATA} (the shared data folder is absent)")
    from models.defects_check import measure

    card = load_card(SHIPPED_CARD).raw["known_defects"]
    now, missing = measure(SHIPPED_ONNX)
    assert not missing and [f["name"] for f in now["findings"]] == [f["name"] for f in card["findings"]]
    assert {f["name"] for f in card["findings"]} >= {"inflammation", "defocus", "benign squamous epithelium"}
    for then, f in zip(card["findings"], now["findings"], strict=True):
        assert f["advice"] and then["advice"] == f["advice"]
        for key, value in f["figures"].items():
            if key == "blur":
                for a, b in zip(then["figures"]["blur"], value, strict=True):
                    assert a["auc"] == pytest.approx(b["auc"], abs=0.002)
                    assert a["called"] == pytest.approx(b["called"], abs=0.01)
            elif key == "restained":  # models.stain_check's rows, summarised
                for a, b in zip(then["figures"][key]["rows"], value["rows"], strict=True):
                    assert a["stain"] == b["stain"] and a["ood_warned"] == b["ood_warned"]
                    for k in ("auc", "auc_normalized"):
                        assert a[k] == pytest.approx(b[k], abs=0.002), (a["stain"], k)
                    for k in ("called", "called_normalized"):
                        assert a[k] == pytest.approx(b[k], abs=0.01), (a["stain"], k)
            elif isinstance(value, float):
                assert then["figures"][key] == pytest.approx(value, abs=0.005), (f["name"], key)
            else:
                assert then["figures"][key] == value, (f["name"], key)


def test_every_run_of_the_shipped_model_carries_its_known_defects(cmu_run: dict) -> None:
    """A pathologist reads the slide page, not the model card: each run's manifest and page carry what
    the card says the model gets wrong and what to do about it; a model whose card records none gets
    no such section (the page of a test model, made with the same code)."""
    from wsi_pipeline.io.report import slide_report_html

    card = load_card(SHIPPED_CARD)
    assert cmu_run["model"]["known_defects"] == card.known_defects != []
    page = Path(cmu_run["outputs"]["report"]).read_text()
    assert 'id="known-defects"' in page
    for d in card.known_defects:
        assert d["advice"].replace("'", "&#x27;") in page
    plain = {**cmu_run, "model": {**cmu_run["model"], "known_defects": []}}
    html = slide_report_html(plain, overlay_href="x.png", thumbnail=np.zeros((4, 4, 3), np.uint8),
                             top_tiles=[], links={})  # fmt: skip
    assert "known-defects" not in html
