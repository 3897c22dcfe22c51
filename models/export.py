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
import json
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

from models import CLASSES, POSITIVE_CLASS, TILE_PX, ood
from models.card import write_markdown
from models.data import load_tiles
from models.evaluate import build_sets, choose_threshold, make_session, score_sets, set_metrics
from models.net import SeedEnsemble, TumourTileModel, build_net
from models.scanned import macenko_groups
from models.split import read_index, sample_rows, split_rows
from wsi_pipeline.inference.card import write_card
from wsi_pipeline.provenance import file_sha256

MPP_NOTE = (
    "LC25000 states no magnification or pixel size; its 224 px tiles (resized from 768 px by a third "
    "party) look like roughly 0.4-0.6 um/px by nuclear size (an eyeball estimate, not a measurement). "
    "0.5 um/px is an assumption: tile slides at 0.5 um/px to match it."
)
MPP_NOTE_GLAS = (
    "0.5 um/px: GlaS regions (0.62005 um/px, Zeiss MIRAX) were resampled to it; LC25000 states no scale "
    "(about 0.4-0.6 um/px by nuclear size, an estimate) and was used as is, with 1.0-1.3x zoom jitter. "
    "Tile slides at 0.5 um/px."
)
DATA_GLAS: dict[str, Any] = {
    "organs": ["lung (LC25000 photographs)", "colon (GlaS scanned regions)"],
    "tumour_mapping": "LC25000 lung_aca, lung_scc -> tumour, lung_n -> non-tumour; GlaS tiles by gland "
    "mask: tumour glands of malignant regions -> tumour, stroma of malignant regions and all of healthy "
    "(and, by the label rule, adenomatous) regions -> non-tumour",
    "scanned_lung": "none: no lung tiles from slide scanners were used for training (none with labels "
    "exist in the shared data); lung transfer is not measured here",
    "citation": "Borkowski AA et al. LC25000, arXiv:1912.12142, 2019; Sirinukunwattana K et al., GlaS, "
    "Medical Image Analysis 35:489-502, 2017.",
}
LIMITATIONS_GLAS = [
    "Trained on LC25000 lung photographs and GlaS colon regions from one scanner (Zeiss MIRAX, one centre, "
    "16 patients); no scanned lung tissue with tumour labels was available. Lung carcinoma on scanned "
    "slides is not measured by the figures here.",
    "GlaS patients: 8 train, 4 validation, 4 test; intervals resample patients, so with 4 test patients "
    "they are wide.",
    "Tiles are labelled from gland masks; stroma inside a tumour is non-tumour by the label rule, so a "
    "tumour heatmap marks tumour epithelium, not the whole tumour outline a pathologist draws.",
    "Organs, stains and scanners unlike the training data get arbitrary scores: the ood_distance output "
    "and the slide OOD score flag slides the model does not know.",
    "Research use only (GlaS data terms); not a medical device.",
]
DATA_LUNG: dict[str, Any] = {
    "organs": [
        "lung (LC25000 photographs)",
        "colon (GlaS scanned regions)",
        "lung (MoNuSAC scanned regions of TCGA lung adenocarcinoma slides, weak labels)",
    ],
    "tumour_mapping": DATA_GLAS["tumour_mapping"] + "; MoNuSAC scanned lung windows whose typed nuclei are "
    ">= 60 % epithelial (and nuclei >= 5 % of the window) -> tumour (weak label: MoNuSAC does not tell "
    "malignant from benign epithelium; these are crops of primary-tumour slides)",
    "scanned_lung": "weak positives only: epithelium-rich windows of MoNuSAC lung regions of 2 TCGA LUAD "
    "patients (TCGA-49-6743, TCGA-55-7573); 2 more (TCGA-50-6591, TCGA-73-4662) validate. No scanned "
    "benign lung was available, so specificity on scanned lung is not measured here",
    "citation": DATA_GLAS["citation"] + " Verma R et al., MoNuSAC2020, IEEE TMI 40(12):3413-3423, 2021.",
}
LIMITATIONS_LUNG = [
    "Trained on LC25000 lung photographs, GlaS colon regions from one scanner (Zeiss MIRAX, one centre, 16 "
    "patients) and epithelium-rich MoNuSAC lung regions of 2 TCGA lung adenocarcinoma patients (weak "
    "labels). No scanned benign lung was available: specificity on scanned lung is not measured here.",
    *LIMITATIONS_GLAS[1:-1],
    "Research use only (GlaS data terms), non-commercial (MoNuSAC: CC BY-NC-SA 4.0); not a medical device.",
]
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


# Training options that may differ between the members of a seed ensemble.
MEMBER_ARGS = ("seed", "out", "threads", "device", "time_limit_min")


def check_members(paths: Sequence[Path], ckpts: Sequence[dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless the checkpoints are one recipe with different seeds: the same split,
    network, recipe and training options (those both record; newer options default when absent)."""
    first, a0 = ckpts[0], ckpts[0]["training"]["args"]
    seeds = [c["training"]["args"]["seed"] for c in ckpts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"ensemble members share a seed ({seeds}): {', '.join(map(str, paths))}")
    for path, c in zip(paths[1:], ckpts[1:], strict=True):
        a = c["training"]["args"]
        for what, x, y in (
            ("split", c["split"], first["split"]),
            ("net_config", c["net_config"], first["net_config"]),
            *[(f"recipe {k}", v, first["recipe"][k]) for k, v in c["recipe"].items() if k in first["recipe"]],
            *[(f"option --{k}", a[k], a0[k]) for k in a if k in a0 and k not in MEMBER_ARGS],
        ):
            if x != y:
                raise ValueError(
                    f"{path}: its {what} ({x!r}) differs from {paths[0]}'s ({y!r}); the members of an "
                    "ensemble must be one recipe trained with different seeds"
                )


def model_from_checkpoints(ckpts: Sequence[dict[str, Any]]) -> TumourTileModel:
    """One checkpoint's model, or the seed ensemble of several (see ``SeedEnsemble``)."""
    if len(ckpts) == 1:
        return model_from_checkpoint(ckpts[0])
    nets = [model_from_checkpoint(c).net for c in ckpts]
    ensemble = SeedEnsemble(nets, [c["mean"] for c in ckpts], [c["std"] for c in ckpts])
    return TumourTileModel(ensemble, ckpts[0]["mean"], ckpts[0]["std"]).eval()


def export_onnx(
    model: TumourTileModel, out: str | Path, opset: int = 17, metadata: dict[str, str] | None = None
) -> None:
    """Export with input ``tiles`` uint8 ``[N, 224, 224, 3]`` and outputs ``probabilities``, ``logits``
    (and ``ood_distance`` when the model has an OOD reference).

    Uses the TorchScript-based exporter (``dynamo=False``): the torch.export-based one needs the
    ``onnxscript`` package, which is not a dependency. Its deprecation warning is silenced here.
    """
    out = Path(out)
    model = model.eval()
    outputs = ["probabilities", "logits"] + (["ood_distance"] if model.has_ood else [])
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
            output_names=outputs,
            dynamic_axes={"tiles": {0: "N"}, **{name: {0: "N"} for name in outputs}},
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
                t_out = model(torch.from_numpy(batch))
                names = ["probabilities", "logits", "ood_distance"][: len(t_out)]
                o_out = session.run(names, {"tiles": batch})
                for t, o in zip(t_out, o_out, strict=True):
                    scale = max(1.0, float(np.abs(t.numpy()).max()))  # distances are O(10): relative
                    worst = max(worst, float(np.abs(o - t.numpy()).max()) / scale)
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


@torch.no_grad()
def embeddings(model: TumourTileModel, tiles: npt.NDArray[np.uint8], batch_size: int = 64) -> np.ndarray:
    """Pooled CNN features ``[N, D]`` of uint8 NHWC tiles (eval mode)."""
    model.eval()
    out = [
        model.net.embed(model.preprocess(torch.from_numpy(np.ascontiguousarray(tiles[i : i + batch_size]))))
        for i in range(0, len(tiles), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float64)


def fit_ood(
    model: TumourTileModel,
    fit_tiles: npt.NDArray[np.uint8],
    ref_tiles: npt.NDArray[np.uint8],
    ref_groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit the Mahalanobis reference on ``fit_tiles`` (training sources, un-augmented), set it on the
    model, and calibrate on held-out ``ref_tiles``: ``d_ref`` = 99th percentile of tile distances;
    ``warn_above`` = 95th percentile over ``ref_groups`` (source pictures, patients) of the group's
    median distance / ``d_ref``, the slide score above which a slide is unlike held-out groups."""
    mean, whiten = ood.fit_gaussian(embeddings(model, fit_tiles))
    model.set_ood(torch.from_numpy(mean), torch.from_numpy(whiten))
    d_fit = ood.distances(embeddings(model, fit_tiles), mean, whiten)
    d_ref_tiles = ood.distances(embeddings(model, ref_tiles), mean, whiten)
    d_ref = float(np.percentile(d_ref_tiles, 99))
    groups = np.asarray(ref_groups if ref_groups is not None else ["all"] * len(ref_tiles))
    medians = [float(np.median(d_ref_tiles[groups == g])) / d_ref for g in np.unique(groups)]
    return {
        "output": "ood_distance",
        "method": "Mahalanobis distance of the pooled CNN features to a Gaussian (shrinkage 0.1) fitted "
        "on un-augmented training tiles; slide score = median tile distance / d_ref",
        "fit_tiles": len(fit_tiles),
        "calibration_tiles": len(ref_tiles),
        "calibration_groups": len(medians),
        "d_ref": round(d_ref, 4),
        "d_ref_note": "99th percentile of tile distances on held-out validation tiles of the training "
        "sources",
        "median_fit": round(float(np.median(d_fit)) / d_ref, 4),
        "median_calibration": round(float(np.median(d_ref_tiles)) / d_ref, 4),
        "warn_above": round(float(np.percentile(medians, 95)), 3),
        "warn_note": "95th percentile of the median score of each validation group (LC25000 source "
        "picture of ~10 tiles, GlaS patient); slides have far more tiles, so their medians vary less",
    }


def _round(metrics: Any) -> Any:
    if isinstance(metrics, dict):
        return {k: _round(v) for k, v in metrics.items()}
    if isinstance(metrics, list):
        return [_round(v) for v in metrics]
    if isinstance(metrics, float):
        return None if math.isnan(metrics) else round(metrics, 4)
    return metrics


def cpu_features() -> list[str]:
    """x86 SIMD features that change onnxruntime's kernels (and so int8 results), from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx_vnni")
    return [f for f in keep if f in flags]


def evaluated_on() -> dict[str, Any]:
    """The CPU the card's held-out figures were measured on (int8 results depend on its features)."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    return {
        "cpu": name or platform.machine(),
        "features": cpu_features(),
        "note": "held-out figures measured by models.evaluate with onnxruntime CPUExecutionProvider "
        "on this CPU",
    }


def architecture(ckpts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The card's ``architecture`` section for one checkpoint or the seed ensemble of several."""
    net = ckpts[0]["net_config"]
    arch: dict[str, Any] = {
        "name": "TileNet",
        "description": "compact ResNet-like CNN: two stride-2 3x3 conv stems, three stride-2 basic "
        "residual blocks, BatchNorm, global average pooling, linear head.",
        "stem": net["stem"],
        "stages": net["stages"],
        "params": sum(c["params"] for c in ckpts),
        "macs": sum(c["macs"] for c in ckpts),
        "flops": sum(c["flops"] for c in ckpts),
        "flops_note": "2 x multiply-accumulates of Conv2d and Linear layers per 224 px tile",
    }
    if len(ckpts) > 1:
        seeds = [c["training"]["args"]["seed"] for c in ckpts]
        arch["name"] = f"TileNet seed ensemble ({len(ckpts)})"
        arch["description"] = (
            f"{len(ckpts)} TileNets of one recipe trained with seeds {seeds}; P(tumour) is the mean of "
            "their softmaxes, logits are log(mean probability), the OOD features are theirs side by side. "
            "Each: " + arch["description"]
        )
        arch["members"] = len(ckpts)
        arch["flops_note"] += " (all members)"
    return arch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n")[1])
    p.add_argument(
        "--checkpoint",
        type=Path,
        nargs="+",
        required=True,
        help="best.pt of a models.train run; several (one recipe, different seeds): their seed ensemble",
    )
    p.add_argument("--out", type=Path, default=Path("models/tumour-cnn.onnx"))
    p.add_argument("--index", type=Path, help="index CSV (default: the one recorded in the checkpoint)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs torch/onnxruntime difference")
    p.add_argument("--parity-tiles", type=int, default=64)
    p.add_argument(
        "--baseline", type=Path, help="an earlier ONNX model scored on the same sets, for the card"
    )
    p.add_argument("--int8", action="store_true", help="also try static int8 quantization")
    p.add_argument("--int8-max-drop", type=float, default=0.005, help="ship int8 if acc and AUC drop <= this")
    p.add_argument("--calibration-tiles", type=int, default=256)
    p.add_argument("--name", default="tumour-cnn")
    p.add_argument("--version", default="0.2.0")
    p.add_argument("--no-card", action="store_true", help="export and check only")
    p.add_argument(
        "--show-test", action="store_true",
        help="print the test sets' figures (default: only written to the card, so that a candidate's "
        "log does not show what its decision must be blind to)",
    )  # fmt: skip
    p.add_argument("--choices", type=Path, help="models.compare --json output behind this model's recipe")
    p.add_argument("--choices-note", default="", help="the decision the --choices figures support")
    args = p.parse_args(argv)
    command = "python -m models.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.opset < 17:
        p.error("--opset must be >= 17")

    ckpts = [load_checkpoint(path) for path in args.checkpoint]
    try:
        check_members(args.checkpoint, ckpts)
    except ValueError as exc:
        p.error(str(exc))
    ckpt = ckpts[0]
    model = model_from_checkpoints(ckpts)
    split_info = ckpt["split"]
    recipe = ckpt.get("recipe") or {"name": "index"}
    index = args.index or Path(split_info["index"])
    rows = read_index(index)
    split = split_rows(rows, split_info["fractions"], split_info["seed"])
    if len(split["test"]) != split_info["summary"]["test"]["tiles"]:
        raise SystemExit(
            f"{index}: test split has {len(split['test'])} tiles, checkpoint says "
            f"{split_info['summary']['test']['tiles']}; is this the index it was trained on?"
        )
    data_info: dict[str, Any] = {"split": {"fractions": split_info["fractions"], "seed": split_info["seed"]}}
    if recipe["name"] == "lc25000+glas":
        data_info["glas"] = {"label_rule": recipe["label_rule"]}
    stain = recipe.get("stain", "none")
    set_card = {"data": data_info, "preprocessing": {"stain_normalization": stain}}
    val_sets = build_sets(set_card, index, splits=("val",))

    # OOD reference: fitted on the training sources (un-augmented), calibrated on their validation tiles
    fit_rows = sample_rows(split["train"], rows, 1000, seed=3)
    fit_lc = load_tiles([rows[i] for i in fit_rows])
    fit_tiles = [
        macenko_groups(fit_lc.images, [r.group for r in fit_lc.rows]) if stain == "macenko" else fit_lc.images
    ]
    if recipe["name"] == "lc25000+glas":
        from models.scanned import GLAS_SPLIT, LabelRule, glas_tiles, load_consep, load_glas

        glas_dir = Path(recipe["glas"])
        rule = LabelRule(**recipe["label_rule"])
        fit_tiles.append(glas_tiles(load_glas(glas_dir, GLAS_SPLIT["train"], stain=stain), rule)[0])
        if recipe.get("consep"):
            fit_tiles.append(glas_tiles(load_consep(Path(recipe["consep"]), "train", stain=stain), rule)[0])
    calibration = list(val_sets)
    if recipe.get("lung"):
        from models.evaluate import EvalSet
        from models.scanned import MONUSAC_SPLIT, load_monusac

        lung_dir = Path(recipe["lung"])
        fit_tiles.append(glas_tiles(load_monusac(lung_dir, MONUSAC_SPLIT["train"], stain=stain), rule)[0])
        if recipe.get("immune_fraction"):
            from models.scanned import immune_windows, load_immune

            immune = load_immune(lung_dir.parent, MONUSAC_SPLIT["train"], "train", stain=stain)
            windows = immune_windows(immune)
            fit_tiles.append(np.stack([immune[i].crop(x0, y0, side) for i, x0, y0, side in windows]))
        imgs, lab, _, groups = glas_tiles(load_monusac(lung_dir, MONUSAC_SPLIT["val"], stain=stain), rule)
        calibration.append(EvalSet("lung-val", imgs, lab, ("monusac",) * len(lab), tuple(groups)))
    ood_info = fit_ood(
        model,
        np.concatenate(fit_tiles),
        np.concatenate([v.images for v in calibration]),
        [f"{v.name}:{g}" for v in calibration for g in v.groups],
    )
    print(f"OOD reference: {ood_info['fit_tiles']} fit tiles, d_ref {ood_info['d_ref']}")

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

    # threshold from validation sets only, then every test set at that threshold
    threshold = choose_threshold(val_sets, score_sets(args.out, val_sets))
    test_sets = build_sets(set_card, index, splits=("test",))
    metrics = {
        s.name: _round(set_metrics(s, pr, threshold))
        for s, pr in zip(test_sets, score_sets(args.out, test_sets), strict=True)
    }
    if args.show_test:
        for name, m in metrics.items():
            print(
                f"{name}: auc {m['auc']} {m['ci95']['auc']} sens {m['recall']} spec {m['specificity']} "
                f"(n={m['n']})"
            )
    else:  # a candidate's log must not leak the figures its decision has to be blind to
        print(
            f"test sets scored: {', '.join(metrics)} (figures in the card's 'metrics', not printed: "
            "read them after choosing between candidates on validation, or pass --show-test)"
        )
    baseline = None
    if args.baseline is not None:
        base_probs = score_sets(args.baseline, test_sets)
        baseline = {
            "onnx_file": args.baseline.name,
            "sha256": file_sha256(args.baseline),
            "threshold": 0.5,
            "metrics": {
                s.name: _round(set_metrics(s, pr, 0.5)) for s, pr in zip(test_sets, base_probs, strict=True)
            },
        }

    int8: dict[str, Any] | None = None
    if args.int8:
        q_path = args.out.with_name(args.out.stem + "-int8.onnx")
        calib_rows = sample_rows(split["train"], rows, args.calibration_tiles, seed=2)
        quantize_int8(args.out, q_path, load_tiles([rows[i] for i in calib_rows]).images)
        q_metrics = {
            s.name: _round(set_metrics(s, pr, threshold))
            for s, pr in zip(test_sets, score_sets(q_path, test_sets), strict=True)
        }
        drops = {
            k: round(max(metrics[n][k] - q_metrics[n][k] for n in metrics if metrics[n][k] is not None), 4)
            for k in ("accuracy", "auc")
        }
        shipped = max(drops.values()) <= args.int8_max_drop
        print(f"int8: worst drop {drops} -> {'shipped' if shipped else 'not shipped'}")
        int8 = {
            "shipped": shipped,
            "method": "onnxruntime static quantization, QDQ, per-channel int8 weights, uint8 activations, "
            f"min/max calibration on {len(calib_rows)} train tiles; Conv/Gemm/Add/GlobalAveragePool",
            "metrics": q_metrics,
            "worst_drop": drops,
            "max_drop_allowed": args.int8_max_drop,
            "cpu_features": cpu_features(),
            "cpu_note": "int8 kernels differ by CPU (VNNI/AMX or not): figures are from a CPU with these "
            "features; `models.evaluate --check` compares int8 figures with --tolerance 0.02",
        }
        if shipped:
            int8["onnx_file"] = q_path.name
            int8["sha256"] = file_sha256(q_path)
        else:
            q_path.unlink()
    if args.no_card:
        return 0

    summary = split_info["summary"]
    tr = ckpt["training"]
    targs = tr["args"]
    glas = recipe["name"] == "lc25000+glas"
    lung = bool(recipe.get("lung"))
    card: dict[str, Any] = {
        "name": args.name,
        "version": args.version,
        "description": "Tumour vs non-tumour classifier for 224 px H&E tiles at 0.5 um/px "
        + (
            f"(seed ensemble of {len(ckpts)} compact CNNs, ONNX)."
            if len(ckpts) > 1
            else "(compact CNN, ONNX)."
        ),
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
            "kind": "probabilities",
            "logits": "logits",
            "ood_distance": "ood_distance",
        },
        "mpp": 0.5,
        "mpp_note": MPP_NOTE_GLAS if glas else MPP_NOTE,
        "preprocessing": {
            "in_graph": True,
            "scale": 1 / 255,
            "mean": ckpt["mean"],
            "std": ckpt["std"],
            "formula": "(tiles / 255 - mean) / std per RGB channel, then NHWC -> NCHW",
            "stain_normalization": stain,
            "stain_note": "macenko: the model was trained on tiles Macenko-normalized to the pipeline's "
            "default H&E reference (one fit per source picture / region); wsi-infer normalizes each slide "
            "the same way unless --normalize none is given"
            if stain == "macenko"
            else "none: trained on raw colours (with stain augmentation)",
        },
        "onnx_file": args.out.name,
        "sha256": file_sha256(args.out),
        "threshold": {
            "value": threshold,
            "note": "P(tumour) threshold maximising the mean balanced accuracy over the validation sets "
            f"({', '.join(v.name for v in val_sets)}); test sets never used",
        },
        "metrics": metrics,
        "evaluated_on": evaluated_on(),
        "ood": ood_info,
        "baseline": baseline,
        "evaluate_command": f"python -m models.evaluate --model {args.out.as_posix()} --check",
        "int8": int8,
        "architecture": architecture(ckpts),
        "data": {
            **(DATA_LUNG if lung else DATA_GLAS if glas else {}),
            "dataset": "LC25000 lung (Borkowski et al. 2019), shared copy tiles/lc25000-lung"
            + (" + GlaS colon regions from whole-slide scans (tiles/glas-colon)" if glas else "")
            + (" + MoNuSAC lung regions from TCGA whole-slide scans (tiles/monusac-lung)" if lung else ""),
            "licence": (
                "GlaS: research use only; MoNuSAC: CC BY-NC-SA 4.0 (so this model is for non-commercial "
                "research use only); LC25000: unknown"
                if lung
                else "GlaS: research use only (so is this model); LC25000: unknown"
                if glas
                else "unknown (no licence stated by the dataset authors)"
            ),
            "index": "shared/data/tiles/lc25000-lung/index.csv",
            "index_sha256": split_info["index_sha256"],
            "glas": (
                {
                    "patients": recipe["glas_split_patients"],
                    "label_rule": recipe["label_rule"],
                    "sampler": recipe["sampler"],
                    "lc_fraction": recipe["lc_fraction"],
                    "crypt_fraction": recipe.get("crypt_fraction", 0.0),
                    "stroma_fraction": recipe.get("stroma_fraction", 0.25),
                    "consep": "official train tiles (27), windows labelled by nucleus types (models.scanned."
                    "consep_label); official test tiles (14) validate"
                    if recipe.get("consep")
                    else None,
                    "lung": (
                        {
                            "patients": recipe["lung_split_patients"],
                            "fraction_of_scanned_tumour_draws": recipe["lung_fraction"],
                            "label_rule": "models.scanned.consep_label on MoNuSAC nucleus types",
                        }
                        if lung
                        else None
                    ),
                    "immune": (
                        {
                            "fraction_of_scanned_non_tumour_draws": recipe["immune_fraction"],
                            "windows": recipe["sampler"].get("immune_windows"),
                            "sources": "inflamed windows (models.scanned.immune_windows: immune nuclei "
                            ">= 80 % of the typed-nucleus pixels of MoNuSAC lung regions of the training "
                            "patients, >= 40 % in CoNSeP official train tiles; nuclei >= 5 % of the window) "
                            "as non-tumour",
                        }
                        if recipe.get("immune_fraction")
                        else None
                    ),
                }
                if glas
                else None
            ),
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
            "recipe": recipe,
            "summary": (
                f"AdamW lr {targs['lr']} (warm-up then cosine), weight decay {targs['weight_decay']}, batch "
                f"{targs['batch_size']}, up to {targs['epochs']} epochs of "
                f"{targs.get('epoch_tiles') or 'all'} train tiles each, early stopping on mean val loss "
                f"(patience {targs['patience']}); cross-entropy weights "
                f"{[round(w, 4) for w in tr['class_weights']]}; "
                f"augmentation {targs.get('augment', 'basic')}; semi-supervised {targs.get('ssl', 'none')}; "
                + (
                    f"seeds {[c['training']['args']['seed'] for c in ckpts]}, one network each, "
                    "probabilities averaged."
                    if len(ckpts) > 1
                    else f"seed {targs['seed']}."
                )
            ),
            "best_epoch": tr["best_epoch"],
            "epochs_run": tr.get("epochs_run", tr["best_epoch"]),
            "train_time_s": round(sum(c["training"].get("train_time_s", 0.0) for c in ckpts), 1),
            "init": tr.get("init"),
            **({"swa": {k: tr["swa"][k] for k in ("epochs", "bn_batches")}} if tr.get("swa") else {}),
            "members": (
                [
                    {
                        "checkpoint": path.as_posix(),
                        "command": c["training"]["command"],
                        "seed": c["training"]["args"]["seed"],
                        "best_epoch": c["training"]["best_epoch"],
                        "epochs_run": c["training"].get("epochs_run", c["training"]["best_epoch"]),
                        "train_time_s": c["training"].get("train_time_s", 0.0),
                        "val_metrics": _round(c["training"]["val_metrics"]),
                    }
                    for path, c in zip(args.checkpoint, ckpts, strict=True)
                ]
                if len(ckpts) > 1
                else None
            ),
            "device": tr["device"],
            "threads": targs.get("threads"),
            "torch": tr["torch"],
            "val_metrics": _round(tr["val_metrics"]),
            "history": [_round(h) for h in tr.get("history", [])],
            "choices": (
                {
                    "compared_on": "GlaS validation patients, LC25000 validation pictures (models.compare)",
                    "candidates": json.loads(args.choices.read_text()),
                    "decision": args.choices_note,
                }
                if args.choices is not None
                else None
            ),
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
        "limitations": list(LIMITATIONS_LUNG if lung else LIMITATIONS_GLAS if glas else LIMITATIONS),
    }
    write_card(card, args.out.with_suffix(".json"))
    write_markdown(card, args.out.parent / "MODEL_CARD.md")
    if int8 and int8.get("shipped"):
        # The int8 model gets a card of its own, so `--model X-int8.onnx` works like any model.
        quant = {k: v for k, v in int8.items() if k != "metrics"}
        q_card = {**card, "name": card["name"] + "-int8", "onnx_file": int8["onnx_file"],
                  "sha256": int8["sha256"], "metrics": int8["metrics"], "int8": None,
                  "quantization": quant}  # fmt: skip
        write_card(q_card, args.out.with_name(int8["onnx_file"]).with_suffix(".json"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, sha256 {card['sha256']})")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.parent / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
