"""Export a trained checkpoint to ONNX with the preprocessing inside the graph, check it, write the card.

Example (from the repository root)::

    python -m models.export --checkpoint models/runs/X/best.pt --out models/tumour-cnn.onnx --int8

Steps: build ``TumourTileModel`` (uint8 NHWC ``tiles`` -> ``probabilities`` and ``logits``), export it
with a dynamic batch axis, check that onnxruntime (CPUExecutionProvider) matches torch within
``--tolerance`` on real tiles (exit 1 otherwise), measure the held-out test metrics with onnxruntime,
optionally quantize to int8 (static, QDQ) and keep it only when its accuracy and AUC drop on the test
split are within ``--int8-max-drop``, and write ``<out>.json`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch

from models import CLASSES, POSITIVE_CLASS, TILE_PX
from models.card import sha256_file, write_card
from models.data import load_tiles
from models.evaluate import evaluate_model, make_session
from models.net import TumourTileModel, build_net
from models.split import read_index, sample_rows, split_rows

MPP_NOTE = (
    "LC25000 states no magnification or pixel size; its 224 px tiles (resized from 768 px by a third "
    "party) look like roughly 0.4-0.6 um/px by nuclear size (an eyeball estimate, not a measurement). "
    "0.5 um/px is an assumption: tile slides at 0.5 um/px to match it."
)
LIMITATIONS = [
    "Trained and tested on LC25000 lung: microscope-camera photographs (one lab, clean centred fields, "
    "lossy 224 px JPEG re-saves), not whole-slide-image tiles. Transfer to WSI tiles (scanner colour, "
    "focus, tissue edges, background, artefacts) is not yet shown; expect a domain shift.",
    "Classes: lung adenocarcinoma and squamous cell carcinoma (tumour) against benign lung (non-tumour). "
    "Other tumours, other organs, necrosis, inflammation, blood, background or out-of-focus tiles were "
    "never seen and get arbitrary scores.",
    "Scale unknown: 0.5 um/px is assumed (see mpp_note).",
    "Held-out split is disjoint by source picture (group), not provably by patient: LC25000 gives no "
    "patient ids, so test metrics may be optimistic.",
    "Each LC25000 source picture appears as ~10 rotated/flipped copies, so test metrics count tiles "
    "that are clustered: the test split holds {test_groups} independent pictures, not {test_tiles}.",
    "Research use only; not a medical device.",
]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "net_config", "mean", "std"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a models.train checkpoint (no {key!r})")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> TumourTileModel:
    net = build_net(ckpt["net_config"]["stem"], ckpt["net_config"]["stages"])
    net.load_state_dict(ckpt["state_dict"])
    return TumourTileModel(net, ckpt["mean"], ckpt["std"]).eval()


def export_onnx(
    model: TumourTileModel, out: str | Path, opset: int = 17, metadata: dict[str, str] | None = None
) -> None:
    """Export with input ``tiles`` uint8 ``[N, 224, 224, 3]`` and outputs ``probabilities``, ``logits``.

    Uses the TorchScript-based exporter (``dynamo=False``): the torch.export-based one needs the
    ``onnxscript`` package, which is not a dependency. Its deprecation warning is silenced here.
    """
    out = Path(out)
    model = model.eval()
    dummy = torch.zeros(2, TILE_PX, TILE_PX, 3, dtype=torch.uint8)
    tmp = out.with_name(out.name + ".partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            dynamo=False,
            input_names=["tiles"],
            output_names=["probabilities", "logits"],
            dynamic_axes={"tiles": {0: "N"}, "probabilities": {0: "N"}, "logits": {0: "N"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(out)


def parity(
    model: TumourTileModel,
    onnx_path: str | Path,
    tiles: npt.NDArray[np.uint8],
    batch_sizes: Sequence[int] = (1, 7, 64),
) -> float:
    """Largest absolute difference of probabilities and logits, torch vs onnxruntime, over batch sizes."""
    session = make_session(onnx_path)
    worst = 0.0
    with torch.no_grad():
        for bs in batch_sizes:
            for start in range(0, len(tiles), bs):
                batch = np.ascontiguousarray(tiles[start : start + bs])
                t_prob, t_logits = model(torch.from_numpy(batch))
                o_prob, o_logits = session.run(["probabilities", "logits"], {"tiles": batch})
                worst = max(
                    worst,
                    float(np.abs(o_prob - t_prob.numpy()).max()),
                    float(np.abs(o_logits - t_logits.numpy()).max()),
                )
    return worst


class _CalibrationReader:
    """Feeds uint8 tile batches to onnxruntime's static quantization calibrator."""

    def __init__(self, images: npt.NDArray[np.uint8], batch_size: int = 32) -> None:
        self._batches: Iterator[npt.NDArray[np.uint8]] = iter(
            [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, npt.NDArray[np.uint8]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"tiles": np.ascontiguousarray(batch)}


def quantize_int8(fp32_path: str | Path, out: str | Path, calibration: npt.NDArray[np.uint8]) -> None:
    """Static int8 quantization (QDQ, per-channel int8 weights, uint8 activations, min/max calibration)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "Gemm", "Add", "GlobalAveragePool"],
        )


def _round(metrics: dict[str, Any]) -> dict[str, Any]:
    """Floats to 4 decimals, NaN to None (strict JSON has no NaN), nested dicts alike."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out[k] = _round(v)
        elif isinstance(v, float):
            out[k] = None if math.isnan(v) else round(v, 4)
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n")[1])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("models/tumour-cnn.onnx"))
    p.add_argument("--index", type=Path, help="index CSV (default: the one recorded in the checkpoint)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs torch/onnxruntime difference")
    p.add_argument("--parity-tiles", type=int, default=64)
    p.add_argument("--int8", action="store_true", help="also try static int8 quantization")
    p.add_argument("--int8-max-drop", type=float, default=0.005, help="ship int8 if acc and AUC drop <= this")
    p.add_argument("--calibration-tiles", type=int, default=256)
    p.add_argument("--name", default="tumour-cnn")
    p.add_argument("--version", default="0.1.0")
    p.add_argument("--no-card", action="store_true", help="export and check only")
    args = p.parse_args(argv)
    command = "python -m models.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.opset < 17:
        p.error("--opset must be >= 17")

    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt)
    split_info = ckpt["split"]
    index = args.index or Path(split_info["index"])
    rows = read_index(index)
    split = split_rows(rows, split_info["fractions"], split_info["seed"])
    if len(split["test"]) != split_info["summary"]["test"]["tiles"]:
        raise SystemExit(
            f"{index}: test split has {len(split['test'])} tiles, checkpoint says "
            f"{split_info['summary']['test']['tiles']}; is this the index it was trained on?"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": args.name,
        "version": args.version,
        "classes": ",".join(CLASSES),
        "positive_class": POSITIVE_CLASS,
    }
    export_onnx(model, args.out, args.opset, meta)
    all_idx = list(range(len(rows)))
    parity_tiles = load_tiles([rows[i] for i in sample_rows(all_idx, rows, args.parity_tiles, seed=1)]).images
    diff = parity(model, args.out, parity_tiles)
    print(f"parity torch vs onnxruntime: max abs diff {diff:.2e} on {len(parity_tiles)} real tiles")
    if not diff <= args.tolerance:
        print(
            f"error: parity {diff:.2e} exceeds {args.tolerance:.0e}; {args.out} is not usable",
            file=sys.stderr,
        )
        return 1

    test = _round(evaluate_model(args.out, index, split_info["seed"], split_info["fractions"], "test"))
    print(
        f"fp32 test: acc {test['accuracy']} prec {test['precision']} rec {test['recall']} "
        f"f1 {test['f1']} auc {test['auc']} (n={test['n']})"
    )

    int8: dict[str, Any] | None = None
    if args.int8:
        q_path = args.out.with_name(args.out.stem + "-int8.onnx")
        calib_rows = sample_rows(split["train"], rows, args.calibration_tiles, seed=2)
        quantize_int8(args.out, q_path, load_tiles([rows[i] for i in calib_rows]).images)
        q_test = _round(evaluate_model(q_path, index, split_info["seed"], split_info["fractions"], "test"))
        drop_acc = round(test["accuracy"] - q_test["accuracy"], 4)
        drop_auc = round(test["auc"] - q_test["auc"], 4) if test["auc"] is not None else 0.0
        shipped = drop_acc <= args.int8_max_drop and drop_auc <= args.int8_max_drop
        print(
            f"int8 test: acc {q_test['accuracy']} auc {q_test['auc']} (drop {drop_acc:+.4f}, {drop_auc:+.4f})"
            f" -> {'shipped' if shipped else 'not shipped'}"
        )
        int8 = {
            "shipped": shipped,
            "method": "onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 activations, "
            f"min/max calibration on {len(calib_rows)} train tiles; Conv/Gemm/Add/GlobalAveragePool",
            "metrics": {"test": q_test},
            "accuracy_drop": round(drop_acc, 4),
            "auc_drop": round(drop_auc, 4),
            "max_drop_allowed": args.int8_max_drop,
        }
        if shipped:
            int8["onnx_file"] = q_path.name
            int8["sha256"] = sha256_file(q_path)
            int8["note"] = (
                f"`{q_path.name}` (sha256 `{int8['sha256']}`): test accuracy {q_test['accuracy']}, "
                f"AUC {q_test['auc']} (drop {drop_acc:+.4f} / {drop_auc:+.4f} against fp32). "
                "Same input and outputs. Reproduce: "
                f"`python -m models.evaluate --model {q_path.as_posix()} --check`."
            )
        else:
            q_path.unlink()
            int8["note"] = (
                f"Static int8 quantization was tried and not shipped: test accuracy {q_test['accuracy']}, "
                f"AUC {q_test['auc']} (drop {drop_acc:+.4f} / {drop_auc:+.4f}, allowed {args.int8_max_drop})."
            )
    if args.no_card:
        return 0

    summary = split_info["summary"]
    tr = ckpt["training"]
    targs = tr["args"]
    card: dict[str, Any] = {
        "name": args.name,
        "version": args.version,
        "description": "Tumour vs non-tumour classifier for 224 px H&E tiles (compact CNN, ONNX).",
        "classes": list(CLASSES),
        "positive_class": POSITIVE_CLASS,
        "input": {
            "name": "tiles",
            "size_px": TILE_PX,
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
            "shape": ["N", TILE_PX, TILE_PX, 3],
        },
        "output": {
            "name": "probabilities",
            "shape": ["N", len(CLASSES)],
            "activation": "softmax",
            "logits": "logits",
        },
        "mpp": 0.5,
        "mpp_note": MPP_NOTE,
        "preprocessing": {
            "in_graph": True,
            "scale": 1 / 255,
            "mean": ckpt["mean"],
            "std": ckpt["std"],
            "formula": "(tiles / 255 - mean) / std per RGB channel, then NHWC -> NCHW",
        },
        "onnx_file": args.out.name,
        "sha256": sha256_file(args.out),
        "metrics": {"test": test},
        "evaluate_command": f"python -m models.evaluate --model {args.out.as_posix()} --check",
        "int8": int8,
        "architecture": {
            "name": "TileNet",
            "description": "compact ResNet-like CNN: two stride-2 3x3 conv stems, three stride-2 basic "
            "residual blocks, BatchNorm, global average pooling, linear head.",
            "stem": ckpt["net_config"]["stem"],
            "stages": ckpt["net_config"]["stages"],
            "params": ckpt["params"],
            "macs": ckpt["macs"],
            "flops": ckpt["flops"],
            "flops_note": "2 x multiply-accumulates of Conv2d and Linear layers per 224 px tile",
        },
        "data": {
            "dataset": "LC25000 lung (Borkowski et al. 2019), shared copy tiles/lc25000-lung",
            "subsets": ["lung_aca", "lung_scc", "lung_n"],
            "tumour_mapping": "lung_aca and lung_scc -> tumour; lung_n -> non-tumour",
            "source_note": "224 px JPEG re-saves of the 768 px originals; ~10 rotated/flipped copies per "
            "source picture (group).",
            "licence": "unknown (no licence stated by the dataset authors)",
            "citation": "Borkowski AA, Bui MM, Thomas LB, Wilson CP, DeLand LA, Mastorides SM. Lung and "
            "Colon Cancer Histopathological Image Dataset (LC25000). arXiv:1912.12142, 2019.",
            "index": "shared/data/tiles/lc25000-lung/index.csv",
            "index_sha256": split_info["index_sha256"],
            "split": {
                "method": split_info["method"],
                "seed": split_info["seed"],
                "fractions": split_info["fractions"],
                "stratify": "label",
                "groups": {k: summary[k]["groups"] for k in ("train", "val", "test")},
                "tiles": {k: summary[k]["tiles"] for k in ("train", "val", "test")},
                "per_label": {k: summary[k]["per_label"] for k in ("train", "val", "test")},
            },
        },
        "training": {
            "command": tr["command"],
            "summary": (
                f"AdamW lr {targs['lr']} (warm-up then cosine), weight decay {targs['weight_decay']}, batch "
                f"{targs['batch_size']}, up to {targs['epochs']} epochs of "
                f"{targs.get('epoch_tiles') or 'all'} random train tiles each, early stopping on val loss "
                f"(patience {targs['patience']}); class-weighted cross-entropy "
                f"{[round(w, 4) for w in tr['class_weights']]}; "
                f"augmentation: random 90-degree rotations and flips, HED stain jitter (sigma "
                f"{targs['hed_sigma']}, bias {targs['hed_bias']}); seed {targs['seed']}."
            ),
            "best_epoch": tr["best_epoch"],
            "epochs_run": tr["epochs_run"],
            "train_time_s": tr["train_time_s"],
            "device": tr["device"],
            "torch": tr["torch"],
            "val_metrics": _round(tr["val_metrics"]),
            "history": [_round(h) for h in tr["history"]],
        },
        "export": {
            "command": command,
            "opset": args.opset,
            "exporter": f"torch {torch.__version__} torch.onnx.export (TorchScript-based, dynamo=False)",
            "onnxruntime": ort.__version__,
            "parity_max_abs_diff": diff,
            "parity_tiles": len(parity_tiles),
            "parity_tolerance": args.tolerance,
        },
        "limitations": [
            item.format(test_groups=summary["test"]["groups"], test_tiles=summary["test"]["tiles"])
            for item in LIMITATIONS
        ],
    }
    write_card(card, args.out.with_suffix(".json"), args.out.parent / "MODEL_CARD.md")
    if int8 and int8.get("shipped"):
        # The int8 model gets a card of its own, so `--model X-int8.onnx` works like any model.
        quant = {k: v for k, v in int8.items() if k not in ("metrics", "note")}
        q_card = {**card, "name": card["name"] + "-int8", "onnx_file": int8["onnx_file"],
                  "sha256": int8["sha256"], "metrics": int8["metrics"], "int8": None,
                  "quantization": quant}  # fmt: skip
        write_card(q_card, args.out.with_name(int8["onnx_file"]).with_suffix(".json"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {card['sha256']})")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.parent / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
