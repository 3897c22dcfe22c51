"""Train the tumour-vs-non-tumour tile CNN.

Example (from the repository root)::

    python -m models.train --index ../shared/data/tiles/lc25000-lung/index.csv --out models/runs/X

Splits the index by ``group`` (stratified by ``label``) into train/val/test, trains on train with
flips, 90-degree rotations and HED stain jitter, early-stops on the validation loss and writes
``best.pt`` (weights plus everything the export and the model card need) and ``history.json`` to
``--out``. The test split is never loaded here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models import CLASSES, POSITIVE_CLASS, TILE_PX
from models.augment import augment_batch, fold_tiles, random_dihedral, scanner_shift, stain_rotation
from models.data import TileSet, channel_stats, iterate_batches, load_tiles, rows_from_folder
from models.mix import MixedSampler, sample_unlabelled
from models.net import Preprocess, build_net, count_flops, count_params
from models.scanned import (
    GLAS_SPLIT,
    MONUSAC_SPLIT,
    TARGET_MPP,
    LabelRule,
    Region,
    glas_tiles,
    load_consep,
    load_glas,
    load_immune,
    load_monusac,
    load_unlabelled_regions,
    macenko_groups,
)
from models.split import DEFAULT_FRACTIONS, DEFAULT_SEED, read_index, split_rows, split_summary
from wsi_pipeline.cores import usable_cores
from wsi_pipeline.evaluation.metrics import classification_metrics
from wsi_pipeline.provenance import file_sha256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[1])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--index", type=Path, help="CSV with path,label,tumour,group")
    src.add_argument("--folder", type=Path, help="folder of class subfolders (no groups: may leak)")
    p.add_argument("--tumour-classes", default="", help="with --folder: comma-separated tumour subfolders")
    p.add_argument("--out", type=Path, required=True, help="run folder (created)")
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs")
    p.add_argument("--patience", type=int, default=3, help="epochs without val-loss improvement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--hed-sigma", type=float, default=0.1, help="HED jitter: alpha ~ U(1-s, 1+s)")
    p.add_argument("--hed-bias", type=float, default=0.05, help="HED jitter: beta ~ U(-b, b), OD units")
    p.add_argument("--split-seed", type=int, default=DEFAULT_SEED)
    p.add_argument(
        "--split", type=float, nargs=3, default=list(DEFAULT_FRACTIONS), metavar=("TR", "VA", "TE")
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and augmentation")
    p.add_argument("--stem", type=int, nargs=2, default=[16, 32])
    p.add_argument("--stages", type=int, nargs="+", default=[48, 96, 160])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all usable cores)")
    p.add_argument("--max-train-tiles", type=int, default=0, help="use at most this many (quick runs)")
    p.add_argument(
        "--epoch-tiles", type=int, default=0, help="train tiles drawn (without replacement) per epoch; 0: all"
    )
    p.add_argument("--time-limit-min", type=float, default=0.0, help="stop after the epoch that passes it")
    p.add_argument(
        "--glas",
        type=Path,
        default=None,
        help="GlaS folder: also train on tiles cut from its scanned regions",
    )
    p.add_argument(
        "--consep", type=Path, default=None, help="CoNSeP folder: also train on its official train tiles"
    )
    p.add_argument(
        "--lung", type=Path, default=None,
        help="MoNuSAC lung folder: also train on epithelium-rich scanned lung windows (weak tumour labels)",
    )  # fmt: skip
    p.add_argument("--lung-fraction", type=float, default=0.15, help="share of lung windows in tumour draws")
    p.add_argument(
        "--crypt-fraction", type=float, default=0.0,
        help="share of GlaS non-tumour draws taken from normal crypts (gland-rich healthy windows)",
    )  # fmt: skip
    p.add_argument(
        "--stroma-fraction", type=float, default=0.25,
        help="share of the other GlaS non-tumour draws (not crypts) taken from tumour stroma",
    )  # fmt: skip
    p.add_argument(
        "--immune-fraction", type=float, default=0.0,
        help="share of scanned non-tumour draws taken from inflamed windows (MoNuSAC training patients of "
        "--lung, CoNSeP official train tiles beside it)",
    )  # fmt: skip
    p.add_argument("--adenoma", choices=["negative", "exclude"], default="negative", help="GlaS adenomas")
    p.add_argument("--lc-fraction", type=float, default=0.35, help="share of LC25000 tiles with --glas")
    p.add_argument(
        "--augment", choices=["basic", "scanner"], default="basic",
        help="basic: flips, rotations, HED jitter; scanner: also resolution, blur, JPEG, colour",
    )  # fmt: skip
    p.add_argument(
        "--blur-max-um", type=float, default=0.75,
        help="with --augment scanner: largest defocus (Gaussian sigma, um at the tiles' 0.5 um/px) of the "
        "20 %% of tiles blurred; the smallest is 0.15 um",
    )  # fmt: skip
    p.add_argument(
        "--fold-fraction", type=float, default=0.0,
        help="share of training tiles folded over a turned copy of themselves (simulated tissue folds: "
        "optical densities add), label kept; before the other augmentation (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--stain-rotate-deg", type=float, default=0.0,
        help="turn the H and E stain vectors of a share of training tiles by up to this many degrees in "
        "optical-density space (other labs' stain hues; models.augment.stain_rotation; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--stain-rotate-share", type=float, default=0.5, help="with --stain-rotate-deg: the share of tiles"
    )
    p.add_argument(
        "--stain-mix", type=float, default=0.0,
        help="with --glas: share of training tiles re-stained (Macenko) from their group's stain to that of "
        "a random training group: a source uniformly, then one of its groups (models.stain_mix; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--stain", choices=["none", "macenko"], default="none",
        help="macenko: normalize every source picture / region to the pipeline's reference stain first "
        "(the model card then makes wsi-infer normalize slides the same way)",
    )  # fmt: skip
    p.add_argument(
        "--ema", type=float, default=0.0,
        help="exponential moving average of the weights (and BatchNorm statistics) with this decay per "
        "step; validation, early stopping and the checkpoint use the average (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--swa-from", type=int, default=0,
        help="stochastic weight averaging: also write swa.pt, the uniform average of the weights at the "
        "end of this epoch and every later one, with BatchNorm statistics recomputed on --swa-bn-batches "
        "training batches; best.pt (early stopping) is written as without it (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--swa-bn-batches", type=int, default=100,
        help="with --swa-from: augmented training batches over which swa.pt's BatchNorm statistics are "
        "recomputed (a cumulative average, as torch.optim.swa_utils.update_bn does)",
    )  # fmt: skip
    p.add_argument(
        "--init", type=Path, default=None,
        help="fine-tune from this checkpoint (a best.pt of the same index split and stain): its weights, "
        "architecture and input normalisation; warm-up and cosine schedule restart at --lr",
    )  # fmt: skip
    p.add_argument("--ssl", choices=["none", "fixmatch"], default="none", help="semi-supervised loss")
    p.add_argument("--ssl-weight", type=float, default=1.0, help="FixMatch unlabelled-loss weight")
    p.add_argument("--ssl-threshold", type=float, default=0.95, help="FixMatch pseudo-label confidence")
    p.add_argument("--ssl-batch", type=int, default=32, help="unlabelled tiles per step")
    return p.parse_args(argv)


def load_init(path: Path, split_info: dict[str, Any], stain: str) -> dict[str, Any]:
    """The checkpoint to fine-tune from, refused when its training could have seen this run's held-out
    groups (another index, split seed or split fractions) or when it expects other input (stain)."""
    if not path.is_file():
        raise FileNotFoundError(f"--init {path}: no such checkpoint (give a best.pt written by models.train)")
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "split" not in ckpt:
        raise ValueError(f"--init {path}: not a models.train checkpoint (no state_dict/split)")
    theirs = ckpt["split"]
    for key in ("index_sha256", "seed", "fractions"):
        if theirs.get(key) != split_info.get(key):
            raise ValueError(
                f"--init {path}: trained on another split ({key} {theirs.get(key)!r}, this run "
                f"{split_info.get(key)!r}); its training set may hold this run's validation or test groups. "
                "Fine-tune with the same --index, --split-seed and --split."
            )
    their_stain = ckpt.get("recipe", {}).get("stain", "none")
    if their_stain != stain:
        raise ValueError(f"--init {path}: trained with --stain {their_stain}, this run has --stain {stain}")
    return ckpt


def _init_record(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tuned checkpoint started from, for its card (a chain of fine-tunes nests)."""
    tr = ckpt["training"]
    return {
        "checkpoint": path.as_posix(),
        "sha256": file_sha256(path),
        "command": tr["command"],
        "recipe": ckpt.get("recipe"),
        "best_epoch": tr["best_epoch"],
        "epochs_run": tr.get("epochs_run", tr["best_epoch"]),
        "train_time_s": tr.get("train_time_s", 0.0),
        "init": tr.get("init"),
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - for any library that uses the legacy global state
    torch.manual_seed(seed)


@torch.no_grad()
def predict_logits(
    net: nn.Module, pre: Preprocess, images: np.ndarray, device: torch.device, batch_size: int = 128
) -> torch.Tensor:
    """Logits ``[N, 2]`` (on CPU) of uint8 NHWC ``images``, in eval mode."""
    net.eval()
    out = [
        net(pre(torch.from_numpy(images[idx]).to(device))).float().cpu()
        for idx in iterate_batches(len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, 2)


@dataclass
class ValSet:
    """A validation set: tiles, 0/1 labels and a name for the logs."""

    name: str
    images: npt.NDArray[np.uint8]
    tumour: npt.NDArray[np.int64]


def evaluate_split(
    net: nn.Module, pre: Preprocess, tiles: ValSet | TileSet, device: torch.device
) -> dict[str, float]:
    """``classification_metrics`` plus the unweighted cross-entropy ``loss`` of one validation set."""
    logits = predict_logits(net, pre, tiles.images, device)
    metrics = classification_metrics(tiles.tumour, torch.softmax(logits, 1)[:, 1].numpy())
    metrics["loss"] = float(nn.functional.cross_entropy(logits, torch.from_numpy(tiles.tumour)))
    return metrics


class BatchSource:
    """Labelled training batches: fixed tiles of an index, or a ``MixedSampler`` (LC25000 + GlaS)."""

    def __init__(self, tiles: TileSet | None, sampler: MixedSampler | None, batch_size: int) -> None:
        self.tiles, self.sampler, self.batch_size = tiles, sampler, batch_size

    def __len__(self) -> int:
        return len(self.tiles) if self.tiles is not None else 0

    def batches(
        self, n_tiles: int, rng: np.random.Generator
    ) -> Iterator[tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]]:
        if self.sampler is not None:
            for _ in range(n_tiles // self.batch_size):
                yield self.sampler.sample(self.batch_size, rng)
            return
        assert self.tiles is not None
        order = rng.permutation(len(self.tiles))[:n_tiles]
        for pos in iterate_batches(n_tiles, self.batch_size, drop_last=True):
            idx = order[pos]
            yield self.tiles.images[idx], self.tiles.tumour[idx]


def augment(batch: npt.NDArray[np.uint8], rng: np.random.Generator, args: argparse.Namespace) -> np.ndarray:
    if args.stain_rotate_deg > 0:  # another lab's stain hues first, then the rest
        batch = stain_rotation(batch, rng, args.stain_rotate_deg, args.stain_rotate_share)
    if args.augment == "scanner":
        return scanner_shift(batch, rng, blur_radius=(0.3, args.blur_max_um / TARGET_MPP))
    return augment_batch(batch, rng, sigma=args.hed_sigma, bias=args.hed_bias)


def training_input(
    images: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    args: argparse.Namespace,
    pre: Preprocess,
    device: torch.device,
) -> torch.Tensor:
    """A training batch as the network takes it: folded (``--fold-fraction``), augmented, normalized."""
    return pre(torch.from_numpy(augment(fold_tiles(images, rng, args.fold_fraction), rng, args)).to(device))


def fixmatch_loss(
    net: nn.Module,
    pre: Preprocess,
    unlabelled: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[torch.Tensor, float]:
    """FixMatch (Sohn et al. 2020): pseudo-labels from a weak view where confident, learnt on a strong view.

    Weak view: flips and rotations; strong view: the scanner-shift augmentation at twice the default
    strength. Returns the masked cross-entropy and the fraction of tiles above ``--ssl-threshold``.
    """
    weak = random_dihedral(unlabelled, rng)
    strong = scanner_shift(weak, rng, strength=2.0)
    with torch.no_grad():
        probs = torch.softmax(net(pre(torch.from_numpy(weak).to(device))), 1)
    conf, pseudo = probs.max(1)
    mask = (conf >= args.ssl_threshold).float()
    logits = net(pre(torch.from_numpy(strong).to(device)))
    loss = (nn.functional.cross_entropy(logits, pseudo, reduction="none") * mask).mean()
    return loss, float(mask.mean())


def train_one_epoch(
    net: nn.Module,
    pre: Preprocess,
    source: BatchSource,
    unlabelled: list[list[Region]],
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    args: argparse.Namespace,
    device: torch.device,
    epoch: int,
    n_tiles: int,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
) -> float:
    net.train()
    total, seen, t0, kept = 0.0, 0, time.perf_counter(), 0.0
    n_batches = n_tiles // args.batch_size
    for b, (images, labels) in enumerate(source.batches(n_tiles, rng), start=1):
        x = training_input(images, rng, args, pre, device)
        y = torch.from_numpy(labels).to(device)
        loss = loss_fn(net(x), y)
        if args.ssl == "fixmatch":
            u_loss, frac = fixmatch_loss(
                net, pre, sample_unlabelled(unlabelled, args.ssl_batch, rng), rng, args, device
            )
            loss = loss + args.ssl_weight * u_loss
            kept += frac
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(net)
        total += loss.item() * len(labels)
        seen += len(labels)
        if b % 25 == 0 or b == n_batches:
            rate = seen / (time.perf_counter() - t0)
            ssl = f" pseudo-labelled {kept / b:.2f}" if args.ssl != "none" else ""
            print(
                f"  epoch {epoch} batch {b}/{n_batches} loss {total / seen:.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.0f} tiles/s{ssl}",
                flush=True,
            )
    return total / max(seen, 1)


def build_recipe(
    args: argparse.Namespace, train: TileSet, val: TileSet
) -> tuple[BatchSource, list[ValSet], list[list[Region]], dict[str, Any]]:
    """Training source, validation sets, unlabelled regions and a description for the checkpoint."""
    if args.stain == "macenko":
        train = replace(train, images=macenko_groups(train.images, [r.group for r in train.rows]))
        val = replace(val, images=macenko_groups(val.images, [r.group for r in val.rows]))
    val_sets = [ValSet("lc25000-val", val.images, val.tumour)] if len(val) else []
    if args.glas is None:
        if args.ssl != "none":
            raise ValueError(
                "--ssl needs --glas (its regions and the shared lung tiles are the unlabelled pool)"
            )
        if args.lung is not None or args.crypt_fraction or args.immune_fraction or args.stain_mix:
            raise ValueError(
                "--lung, --crypt-fraction, --immune-fraction and --stain-mix need --glas "
                "(they shape its scanned-tissue draws)"
            )
        return BatchSource(train, None, args.batch_size), val_sets, [], {"name": "index", "stain": args.stain}
    if args.stain_mix and args.stain != "none":
        raise ValueError("--stain-mix re-stains raw colours; it cannot be combined with --stain macenko")
    rule = LabelRule(adenoma=args.adenoma)
    glas_train = load_glas(args.glas, GLAS_SPLIT["train"], stain=args.stain)
    glas_val = load_glas(args.glas, GLAS_SPLIT["val"], stain=args.stain)
    consep = load_consep(args.consep, "train", stain=args.stain) if args.consep is not None else []
    lung = load_monusac(args.lung, MONUSAC_SPLIT["train"], stain=args.stain) if args.lung is not None else []
    if args.immune_fraction and args.lung is None:
        raise ValueError("--immune-fraction needs --lung (its folder's parent holds MoNuSAC and CoNSeP)")
    immune = (
        load_immune(args.lung.parent, MONUSAC_SPLIT["train"], "train", stain=args.stain)
        if args.immune_fraction
        else []
    )
    sampler = MixedSampler(
        train.images,
        train.tumour,
        glas_train + consep,
        rule,
        lc_fraction=args.lc_fraction,
        lung_regions=lung,
        lung_fraction=args.lung_fraction,
        crypt_fraction=args.crypt_fraction,
        stroma_fraction=args.stroma_fraction,
        immune_regions=immune,
        immune_fraction=args.immune_fraction,
        stain_mix=args.stain_mix,
        lc_groups=[r.group for r in train.rows],
    )
    v_images, v_labels, _, _ = glas_tiles(glas_val, rule)
    val_sets.append(ValSet("glas-val", v_images, v_labels))
    if args.consep is not None:  # CoNSeP's official test tiles validate; they are never trained on
        c_images, c_labels, _, _ = glas_tiles(load_consep(args.consep, "test", stain=args.stain), rule)
        val_sets.append(ValSet("consep-val", c_images, c_labels))
    unlabelled: list[list[Region]] = []
    if args.ssl != "none":
        unlabelled = [glas_train, load_unlabelled_regions(args.glas.parent, stain=args.stain)]
    recipe = {
        "name": "lc25000+glas",
        "glas": str(args.glas),
        "glas_split_patients": {k: list(v) for k, v in GLAS_SPLIT.items()},
        "consep": str(args.consep) if args.consep is not None else None,
        "lung": str(args.lung) if args.lung is not None else None,
        "lung_split_patients": {k: list(v) for k, v in MONUSAC_SPLIT.items()} if lung else None,
        "lung_fraction": args.lung_fraction if lung else None,
        "label_rule": asdict(rule),
        "lc_fraction": args.lc_fraction,
        "crypt_fraction": args.crypt_fraction,
        "stroma_fraction": args.stroma_fraction,
        **({"immune_fraction": args.immune_fraction} if immune else {}),
        "sampler": sampler.counts(),
        "glas_val_tiles": {"tiles": len(v_labels), "tumour": int(v_labels.sum())},
        "unlabelled_regions": [len(p) for p in unlabelled],
        "augment": args.augment,
        **({"blur_max_um": args.blur_max_um} if args.blur_max_um != 0.75 else {}),
        **({"fold_fraction": args.fold_fraction} if args.fold_fraction else {}),
        **({"stain_mix": args.stain_mix} if args.stain_mix else {}),
        "ssl": args.ssl,
        "stain": args.stain,
    }
    print(f"recipe: {json.dumps(recipe)}", flush=True)
    return BatchSource(None, sampler, args.batch_size), val_sets, unlabelled, recipe


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 <= args.fold_fraction <= 1:
        raise ValueError(f"--fold-fraction must be in [0, 1], got {args.fold_fraction}")
    command = "python -m models.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    seed_everything(args.seed)
    torch.set_num_threads(args.threads or usable_cores())
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.index is not None:
        rows = read_index(args.index)
    else:
        rows = rows_from_folder(args.folder, [c for c in args.tumour_classes.split(",") if c])
    split = split_rows(rows, args.split, args.split_seed)
    summary = split_summary(rows, split)
    split_info = {
        "method": "by group, stratified by label, sha256(seed:group) order",
        "seed": args.split_seed,
        "fractions": list(args.split),
        "index": str(args.index) if args.index is not None else str(args.folder),
        "index_sha256": file_sha256(args.index) if args.index is not None else None,
        "summary": summary,
    }
    init = load_init(args.init, split_info, args.stain) if args.init is not None else None
    if init is not None:  # the architecture is the checkpoint's
        args.stem, args.stages = list(init["net_config"]["stem"]), list(init["net_config"]["stages"])
    for name in ("train", "val", "test"):
        s = summary[name]
        print(f"{name}: {s['tiles']} tiles, {s['groups']} groups, {s['tumour_tiles']} tumour", flush=True)
    train_idx = split["train"]
    if args.max_train_tiles:
        train_idx = sorted(np.random.default_rng(args.seed).permutation(train_idx)[: args.max_train_tiles])
    t_load = time.perf_counter()
    train = load_tiles([rows[i] for i in train_idx], TILE_PX, threads=args.threads or usable_cores())
    val = load_tiles([rows[i] for i in split["val"]], TILE_PX, threads=args.threads or usable_cores())
    source, val_sets, unlabelled, recipe = build_recipe(args, train, val)
    print(f"decoded {len(train)} train + {len(val)} val tiles in {time.perf_counter() - t_load:.1f} s")

    if source.sampler is not None:
        mean, std = channel_stats(source.sampler.sample(512, np.random.default_rng(args.seed))[0])
        class_weights = [1.0, 1.0]  # the sampler draws both classes equally often
    else:
        assert source.tiles is not None
        mean, std = channel_stats(source.tiles.images)
        counts = np.bincount(train.tumour, minlength=2)
        if counts.min() == 0:
            raise ValueError(f"training split has only one class (counts {counts.tolist()})")
        class_weights = (counts.sum() / (2.0 * counts)).tolist()
    if init is not None:  # keep the input normalisation the weights were trained with
        mean, std = list(init["mean"]), list(init["std"])
    print(f"mean {mean} std {std}; loss weights {class_weights}")

    net = build_net(args.stem, args.stages).to(device)
    if init is not None:
        net.load_state_dict(init["state_dict"])
        print(f"fine-tuning from {args.init} (best epoch {init['training']['best_epoch']})", flush=True)
    pre = Preprocess(mean, std).to(device)
    params, flops = count_params(net), count_flops(net, (1, 3, TILE_PX, TILE_PX))
    print(f"TileNet: {params} parameters, {flops['flops'] / 1e9:.3f} GFLOPs per tile", flush=True)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32, device=device))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    epoch_tiles = args.epoch_tiles or len(source) or 4000
    if source.sampler is None:
        epoch_tiles = min(epoch_tiles, len(source))
    steps_per_epoch = epoch_tiles // args.batch_size
    total_steps = max(1, steps_per_epoch * args.epochs)
    warmup = min(100, total_steps // 10 + 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = None
    if args.ema:
        if not 0 < args.ema < 1:
            raise ValueError(f"--ema must be in (0, 1), got {args.ema}")
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True
        )
    scored = ema.module if ema is not None else net  # what validation, early stopping and export see
    if args.swa_from < 0 or (args.swa_from and (args.ema or args.swa_bn_batches < 1)):
        raise ValueError("--swa-from must be >= 0, needs --swa-bn-batches >= 1 and cannot go with --ema")
    swa = torch.optim.swa_utils.AveragedModel(net) if args.swa_from else None  # parameters only
    swa_epochs: list[int] = []
    rng = np.random.default_rng(args.seed)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    bad_epochs = 0
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        train_loss = train_one_epoch(
            net, pre, source, unlabelled, loss_fn, opt, sched, rng, args, device, epoch, epoch_tiles, ema
        )
        per_set = {v.name: evaluate_split(scored, pre, v, device) for v in val_sets}
        val_loss = float(np.mean([m["loss"] for m in per_set.values()]))
        record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss}
        for name, m in per_set.items():
            record.update(
                {f"{name}_loss": m["loss"], f"{name}_auc": m["auc"], f"{name}_accuracy": m["accuracy"]}
            )
        if swa is not None and epoch >= args.swa_from:  # after validation: nothing above changes
            swa.update_parameters(net)
            swa_epochs.append(epoch)
        record["seconds"] = time.perf_counter() - t_epoch
        history.append(record)
        improved = best is None or val_loss < best["val_loss"] - 1e-4
        shown = " | ".join(f"{n} loss {m['loss']:.4f} auc {m['auc']:.4f}" for n, m in per_set.items())
        print(
            f"epoch {epoch}: train loss {train_loss:.4f} | val loss {val_loss:.4f} | {shown} | "
            f"{record['seconds']:.0f} s{' *best' if improved else ''}",
            flush=True,
        )
        if improved:
            bad_epochs = 0
            best = {"epoch": epoch, "val_loss": val_loss, "val_metrics": per_set}
            checkpoint: dict[str, Any] = {
                "state_dict": {k: v.detach().cpu() for k, v in scored.state_dict().items()},
                "net_config": {"stem": list(args.stem), "stages": list(args.stages)},
                "mean": mean,
                "std": std,
                "classes": list(CLASSES),
                "positive_class": POSITIVE_CLASS,
                "tile_px": TILE_PX,
                "params": params,
                "macs": flops["macs"],
                "flops": flops["flops"],
                "split": split_info,
                "recipe": recipe,
                "training": {
                    "command": command,
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "class_weights": class_weights,
                    "best_epoch": epoch,
                    "val_metrics": per_set[val_sets[0].name] if len(per_set) == 1 else per_set,
                    "device": str(device),
                    "torch": torch.__version__,
                    "init": _init_record(args.init, init) if init is not None else None,
                },
            }
            torch.save(checkpoint, args.out / "best.pt")
        else:
            bad_epochs += 1
        elapsed_min = (time.perf_counter() - t_train) / 60.0
        if bad_epochs >= args.patience:
            print(f"early stop: no val-loss improvement for {args.patience} epochs")
            break
        if args.time_limit_min and elapsed_min > args.time_limit_min:
            print(f"time limit: {elapsed_min:.1f} min > {args.time_limit_min} min")
            break
    train_time_s = time.perf_counter() - t_train
    if best is None:
        raise RuntimeError("no epoch ran")
    ckpt = torch.load(args.out / "best.pt", weights_only=False)
    ckpt["training"]["history"] = history
    ckpt["training"]["epochs_run"] = len(history)
    ckpt["training"]["train_time_s"] = round(train_time_s, 1)
    torch.save(ckpt, args.out / "best.pt")
    summary_json: dict[str, Any] = {
        "history": history,
        "best_epoch": best["epoch"],
        "train_time_s": train_time_s,
    }
    print(f"best epoch {best['epoch']} (val loss {best['val_loss']:.4f}); {train_time_s:.0f} s")
    print(f"wrote {args.out / 'best.pt'}")
    if swa is not None:
        if not swa_epochs:
            raise RuntimeError(
                f"--swa-from {args.swa_from}: training stopped at epoch {len(history)}, before it"
            )
        summary_json["swa"] = write_swa(swa, ckpt, swa_epochs, source, pre, val_sets, args, device)
    (args.out / "history.json").write_text(json.dumps(summary_json, indent=2))
    return 0


def write_swa(
    swa: torch.optim.swa_utils.AveragedModel,
    best_ckpt: dict[str, Any],
    epochs: list[int],
    source: BatchSource,
    pre: Preprocess,
    val_sets: list[Any],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Recompute the averaged net's BatchNorm statistics on augmented training batches (their own
    random stream, so best.pt's run is untouched), validate it and write ``swa.pt``: best.pt's
    checkpoint with the averaged weights and a ``training.swa`` record."""
    rng = np.random.default_rng([args.seed, 1])

    def batches() -> Iterator[torch.Tensor]:
        # a fixed index holds len(source) // batch_size batches a pass; the sampler draws any number
        per_pass = len(source) // args.batch_size if source.tiles is not None else args.swa_bn_batches
        if per_pass < 1:
            raise ValueError(f"--swa-bn-batches: fewer training tiles than one batch of {args.batch_size}")
        left = args.swa_bn_batches
        while left > 0:
            for images, _ in source.batches(min(left, per_pass) * args.batch_size, rng):
                yield training_input(images, rng, args, pre, device)
                left -= 1

    with torch.no_grad():
        torch.optim.swa_utils.update_bn(batches(), swa.module, device)
    per_set = {v.name: evaluate_split(swa.module, pre, v, device) for v in val_sets}
    record = {
        "epochs": epochs,
        "bn_batches": args.swa_bn_batches,
        "val_loss": float(np.mean([m["loss"] for m in per_set.values()])),
        "val_metrics": per_set,
    }
    ckpt = dict(best_ckpt)
    ckpt["state_dict"] = {k: v.detach().cpu() for k, v in swa.module.state_dict().items()}
    ckpt["training"] = {**best_ckpt["training"], "best_epoch": epochs[-1], "swa": record}
    ckpt["training"]["val_metrics"] = per_set[val_sets[0].name] if len(per_set) == 1 else per_set
    torch.save(ckpt, args.out / "swa.pt")
    shown = " | ".join(f"{n} loss {m['loss']:.4f} auc {m['auc']:.4f}" for n, m in per_set.items())
    print(
        f"swa: epochs {epochs[0]}-{epochs[-1]} averaged, BatchNorm on {args.swa_bn_batches} batches | {shown}"
    )
    print(f"wrote {args.out / 'swa.pt'}")
    return record


if __name__ == "__main__":
    raise SystemExit(main())
