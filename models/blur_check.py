"""How a model's tile scores degrade with defocus: GlaS validation tiles blurred, scored again.

Example (from the repository root)::

    python -m models.blur_check --model models/tumour-cnn.onnx [--sigmas 0 0.5 1 1.5 2 3] [--json out.json]

    python -m models.blur_check --focus [--json focus.json]

Defocus is modelled as a Gaussian blur of sigma micrometres (``sigma / 0.5`` pixels on the model's
0.5 um/px tiles, each RGB channel, edges mirrored), applied to the GlaS validation patients' tiles
(the card's label rule, as ``models.compare`` uses them). For each sigma it prints the AUC, the share
of tiles called tumour at the card's threshold, the mean P(tumour) of the tumour tiles and the share
of tiles the pipeline's focus check (:mod:`wsi_pipeline.tiling.focus`) counts as out of focus. This is
the measurement behind the README's "out-of-focus tissue loses tumour".

``--focus`` calibrates the focus check alone (no model): for every real scanned tile set of the
shared data, the focus scores of its sharp tiles (2nd percentile, median, share counted out of focus)
and the share counted out of focus at each blur sigma, as the tiles are and re-encoded as JPEG at
quality 80 (scanners store JPEG; its block edges must not pass for detail).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

from models.evaluate import build_sets, score_sets
from models.scanned import shared_tiles_dir
from models.stain_check import restain, scoring_reference
from wsi_pipeline.evaluation.metrics import roc_auc
from wsi_pipeline.inference.card import load_card
from wsi_pipeline.tiling.focus import SHARP_AT_LEAST, focus_scores

SIGMAS_UM = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
FOCUS_SIGMAS_UM = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
TILE_MPP = 0.5


def blur_tiles(tiles: npt.NDArray[np.uint8], sigma_px: float) -> npt.NDArray[np.uint8]:
    """uint8 NHWC tiles blurred by a Gaussian of ``sigma_px`` pixels per channel (mirrored edges)."""
    if sigma_px <= 0:
        return tiles
    out = gaussian_filter(tiles.astype(np.float32), sigma=(0, sigma_px, sigma_px, 0), mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def jpeg_tiles(tiles: npt.NDArray[np.uint8], quality: int = 80) -> npt.NDArray[np.uint8]:
    """uint8 NHWC tiles encoded as JPEG at ``quality`` (Pillow, 4:2:0) and decoded again."""
    from io import BytesIO

    from PIL import Image

    out = np.empty_like(tiles)
    for i, t in enumerate(tiles):
        buf = BytesIO()
        Image.fromarray(t).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out[i] = np.asarray(im.convert("RGB"))
    return out


def out_of_focus_share(tiles: npt.NDArray[np.uint8], mpp: float = TILE_MPP) -> float:
    """Share of ``tiles`` the pipeline's focus check counts as out of focus."""
    scores = focus_scores(tiles, mpp)
    if scores is None or not scores.size:
        raise ValueError(f"tiles of shape {tiles.shape} at {mpp} um/px cannot be focus-scored")
    return round(float((scores < SHARP_AT_LEAST).mean()), 4)


def scanned_tile_sets() -> dict[str, npt.NDArray[np.uint8]]:
    """Every real scanned tile set of the shared data at 0.5 um/px (sets whose data is absent are left
    out): GlaS patients of each split, CoNSeP train and test, MoNuSAC lung, Kather 2016, NCT-CRC-HE."""
    from models.scanned import (
        GLAS_SPLIT,
        LabelRule,
        glas_tiles,
        load_consep,
        load_glas,
        load_labelled_tiles,
        load_monusac,
    )

    root = shared_tiles_dir()
    sets: dict[str, npt.NDArray[np.uint8]] = {}
    if (root / "glas-colon").exists():
        for split, patients in GLAS_SPLIT.items():
            sets[f"GlaS {split} patients (Zeiss MIRAX)"] = glas_tiles(load_glas(None, patients), LabelRule())[
                0
            ]
    if (root / "consep-patches").exists():
        for split in ("train", "test"):
            sets[f"CoNSeP {split}"] = glas_tiles(load_consep(None, split), LabelRule())[0]
    if (root / "monusac-lung").exists():
        sets["MoNuSAC lung (TCGA)"] = glas_tiles(load_monusac(None), LabelRule())[0]
    for name, folder in (
        ("Kather 2016 (Aperio)", "kather2016-samples"),
        ("NCT-CRC-HE", "nct-crc-he-100k-samples"),
    ):
        if (root / folder).exists():
            sets[name] = load_labelled_tiles(root / folder)[0]
    return sets


def focus_table(sigmas_um: tuple[float, ...] = FOCUS_SIGMAS_UM) -> list[dict[str, Any]]:
    """One row per scanned tile set: its sharp tiles' focus scores (2nd percentile, median) and the
    share counted out of focus at each sigma (um), as the tiles are (``out_of_focus``) and after JPEG
    at quality 80 (``out_of_focus_jpeg80``)."""
    rows = []
    for name, tiles in scanned_tile_sets().items():
        scores = focus_scores(tiles, TILE_MPP)
        assert scores is not None
        row: dict[str, Any] = {
            "set": name,
            "tiles": len(tiles),
            "sharp_p2": round(float(np.percentile(scores, 2)), 3),
            "sharp_median": round(float(np.median(scores)), 3),
            "out_of_focus": {},
            "out_of_focus_jpeg80": {},
        }
        for sigma in sigmas_um:
            blurred = blur_tiles(tiles, sigma / TILE_MPP)
            row["out_of_focus"][str(sigma)] = out_of_focus_share(blurred)
            row["out_of_focus_jpeg80"][str(sigma)] = out_of_focus_share(jpeg_tiles(blurred))
        rows.append(row)
    return rows


def blur_table(model: Path, sigmas_um: tuple[float, ...] = SIGMAS_UM) -> list[dict[str, Any]]:
    """One row per sigma (um): AUC, share called tumour and tumour tiles' mean P on GlaS validation."""
    card = load_card(model.with_suffix(".json"))
    raw = card.raw
    reference = scoring_reference(raw)  # a Macenko card: blurred as scanned, then each patient normalized
    as_scanned = {**raw, "preprocessing": {**(raw.get("preprocessing") or {}), "stain_normalization": "none"}}
    sets = [s for s in build_sets(as_scanned, None, splits=("val",)) if s.name == "glas-val"]
    if not sets:
        raise SystemExit(
            f"{shared_tiles_dir() / 'glas-colon'}: GlaS tiles not found (or the card has no GlaS)"
        )
    (glas,) = sets
    mpp = float(raw.get("mpp", 0.5))
    rows = []
    for sigma in sigmas_um:
        blurred = dataclasses.replace(glas, images=blur_tiles(glas.images, sigma / mpp))
        (p,) = score_sets(model, [blurred if reference is None else restain(blurred, reference)])
        tumour = glas.tumour.astype(bool)
        rows.append(
            {
                "sigma_um": sigma,
                "tiles": len(p),
                "auc": round(float(roc_auc(glas.tumour, p)), 4),
                "called": round(float((p >= card.threshold).mean()), 4),
                "tumour_mean_p": round(float(p[tumour].mean()), 4),
                "out_of_focus": out_of_focus_share(blurred.images, mpp),
                "out_of_focus_jpeg80": out_of_focus_share(jpeg_tiles(blurred.images), mpp),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.blur_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tumour-cnn.onnx"))
    p.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        help="blur sigmas, um (default: 0 0.5 1 1.5 2 3; with --focus 0 0.5 0.75 1 1.5 2 3 5)",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--focus", action="store_true", help="calibrate the focus check on every scanned set")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]]
    if args.focus:
        sigmas = tuple(args.sigmas or FOCUS_SIGMAS_UM)
        rows = focus_table(sigmas)
        print(f"Share of tiles counted out of focus (score < {SHARP_AT_LEAST}) at each blur sigma (um); "
              "as scanned / after JPEG quality 80")  # fmt: skip
        print("| set | tiles | sharp p2 | sharp median | " + " | ".join(f"{s} um" for s in sigmas) + " |")
        print("| --- " * (4 + len(sigmas)) + "|")
        for r in rows:
            cells = [
                f"{r['out_of_focus'][str(s)]:.2f} / {r['out_of_focus_jpeg80'][str(s)]:.2f}" for s in sigmas
            ]
            print(
                f"| {r['set']} | {r['tiles']} | {r['sharp_p2']} | {r['sharp_median']} | "
                + " | ".join(cells)
                + " |"
            )
    else:
        rows = blur_table(args.model, tuple(args.sigmas or SIGMAS_UM))
        print(
            "| blur sigma (um) | tiles | AUC | called tumour | tumour tiles' mean P "
            "| out of focus (JPEG 80) |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['sigma_um']} | {r['tiles']} | {r['auc']} | {r['called']} | {r['tumour_mean_p']} | "
                  f"{r['out_of_focus']} ({r['out_of_focus_jpeg80']}) |")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
