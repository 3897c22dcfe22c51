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
import hashlib
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import CLASSES, POSITIVE_CLASS, TILE_PX
from models.augment import augment_batch
from models.data import TileSet, channel_stats, iterate_batches, load_tiles, rows_from_folder
from models.metrics import binary_metrics
from models.net import Preprocess, build_net, count_flops, count_params
from models.split import DEFAULT_FRACTIONS, DEFAULT_SEED, read_index, split_rows, split_summary


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
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--max-train-tiles", type=int, default=0, help="use at most this many (quick runs)")
    p.add_argument(
        "--epoch-tiles", type=int, default=0, help="train tiles drawn (without replacement) per epoch; 0: all"
    )
    p.add_argument("--time-limit-min", type=float, default=0.0, help="stop after the epoch that passes it")
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - for any library that uses the legacy global state
    torch.manual_seed(seed)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def evaluate_split(
    net: nn.Module, pre: Preprocess, tiles: TileSet, loss_fn: nn.Module, device: torch.device
) -> dict[str, float]:
    logits = predict_logits(net, pre, tiles.images, device)
    target = torch.from_numpy(tiles.tumour)
    metrics = binary_metrics(tiles.tumour, torch.softmax(logits, 1)[:, 1].numpy())
    metrics["loss"] = float(loss_fn(logits, target))
    return metrics


def train_one_epoch(
    net: nn.Module,
    pre: Preprocess,
    tiles: TileSet,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    args: argparse.Namespace,
    device: torch.device,
    epoch: int,
) -> float:
    net.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    n_tiles = min(args.epoch_tiles or len(tiles), len(tiles))
    n_batches = n_tiles // args.batch_size
    order = rng.permutation(len(tiles))[:n_tiles]
    for b, pos in enumerate(iterate_batches(n_tiles, args.batch_size, drop_last=True), start=1):
        idx = order[pos]
        batch = augment_batch(tiles.images[idx], rng, sigma=args.hed_sigma, bias=args.hed_bias)
        x = pre(torch.from_numpy(batch).to(device))
        y = torch.from_numpy(tiles.tumour[idx]).to(device)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        seen += len(idx)
        if b % 25 == 0 or b == n_batches:
            rate = seen / (time.perf_counter() - t0)
            print(
                f"  epoch {epoch} batch {b}/{n_batches} loss {total / seen:.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {rate:.0f} tiles/s",
                flush=True,
            )
    return total / max(seen, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m models.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    seed_everything(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
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
    for name in ("train", "val", "test"):
        s = summary[name]
        print(f"{name}: {s['tiles']} tiles, {s['groups']} groups, {s['tumour_tiles']} tumour", flush=True)
    train_idx = split["train"]
    if args.max_train_tiles:
        train_idx = sorted(np.random.default_rng(args.seed).permutation(train_idx)[: args.max_train_tiles])
    t_load = time.perf_counter()
    train = load_tiles([rows[i] for i in train_idx], TILE_PX, threads=args.threads or os.cpu_count() or 1)
    val = load_tiles([rows[i] for i in split["val"]], TILE_PX, threads=args.threads or os.cpu_count() or 1)
    print(f"decoded {len(train)} train + {len(val)} val tiles in {time.perf_counter() - t_load:.1f} s")

    mean, std = channel_stats(train.images)
    counts = np.bincount(train.tumour, minlength=2)
    if counts.min() == 0:
        raise ValueError(f"training split has only one class (counts {counts.tolist()})")
    class_weights = (counts.sum() / (2.0 * counts)).tolist()
    print(f"mean {mean} std {std}; class counts {counts.tolist()} -> loss weights {class_weights}")

    net = build_net(args.stem, args.stages).to(device)
    pre = Preprocess(mean, std).to(device)
    params, flops = count_params(net), count_flops(net, (1, 3, TILE_PX, TILE_PX))
    print(f"TileNet: {params} parameters, {flops['flops'] / 1e9:.3f} GFLOPs per tile", flush=True)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32, device=device))
    val_loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(class_weights, dtype=torch.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = min(args.epoch_tiles or len(train), len(train)) // args.batch_size
    total_steps = max(1, steps_per_epoch * args.epochs)
    warmup = min(100, total_steps // 10 + 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rng = np.random.default_rng(args.seed)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    bad_epochs = 0
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        train_loss = train_one_epoch(net, pre, train, loss_fn, opt, sched, rng, args, device, epoch)
        val_m = evaluate_split(net, pre, val, val_loss_fn, device)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_m["loss"],
            "val_accuracy": val_m["accuracy"],
            "val_auc": val_m["auc"],
            "val_f1": val_m["f1"],
            "seconds": time.perf_counter() - t_epoch,
        }
        history.append(record)
        improved = best is None or val_m["loss"] < best["val_metrics"]["loss"] - 1e-4
        print(
            f"epoch {epoch}: train loss {train_loss:.4f} | val loss {val_m['loss']:.4f} "
            f"acc {val_m['accuracy']:.4f} auc {val_m['auc']:.4f} f1 {val_m['f1']:.4f} | "
            f"{record['seconds']:.0f} s{' *best' if improved else ''}",
            flush=True,
        )
        if improved:
            bad_epochs = 0
            best = {"epoch": epoch, "val_metrics": val_m}
            checkpoint = {
                "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "net_config": {"stem": list(args.stem), "stages": list(args.stages)},
                "mean": mean,
                "std": std,
                "classes": list(CLASSES),
                "positive_class": POSITIVE_CLASS,
                "tile_px": TILE_PX,
                "params": params,
                "macs": flops["macs"],
                "flops": flops["flops"],
                "split": {
                    "method": "by group, stratified by label, sha256(seed:group) order",
                    "seed": args.split_seed,
                    "fractions": list(args.split),
                    "index": str(args.index) if args.index is not None else str(args.folder),
                    "index_sha256": sha256_file(args.index) if args.index is not None else None,
                    "summary": summary,
                },
                "training": {
                    "command": command,
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "class_weights": class_weights,
                    "best_epoch": epoch,
                    "val_metrics": val_m,
                    "device": str(device),
                    "torch": torch.__version__,
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
    assert best is not None  # at least one epoch ran
    ckpt = torch.load(args.out / "best.pt", weights_only=False)
    ckpt["training"]["history"] = history
    ckpt["training"]["epochs_run"] = len(history)
    ckpt["training"]["train_time_s"] = round(train_time_s, 1)
    torch.save(ckpt, args.out / "best.pt")
    (args.out / "history.json").write_text(
        json.dumps({"history": history, "best_epoch": best["epoch"], "train_time_s": train_time_s}, indent=2)
    )
    print(f"best epoch {best['epoch']} (val loss {best['val_metrics']['loss']:.4f}); {train_time_s:.0f} s")
    print(f"wrote {args.out / 'best.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
