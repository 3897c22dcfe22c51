"""How a model's tile scores degrade with defocus: GlaS validation tiles blurred, scored again.

Example (from the repository root)::

    python -m models.blur_check --model models/tumour-cnn.onnx [--sigmas 0 0.5 1 1.5 2 3] [--json out.json]

Defocus is modelled as a Gaussian blur of sigma micrometres (``sigma / 0.5`` pixels on the model's
0.5 um/px tiles, each RGB channel, edges mirrored), applied to the GlaS validation patients' tiles
(the card's label rule, as ``models.compare`` uses them). For each sigma it prints the AUC, the share
of tiles called tumour at the card's threshold and the mean P(tumour) of the tumour tiles. This is the
measurement behind the README's "out-of-focus tissue loses tumour": the pipeline does not detect blur.
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
from wsi_pipeline.evaluation.metrics import roc_auc
from wsi_pipeline.inference.card import load_card

SIGMAS_UM = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def blur_tiles(tiles: npt.NDArray[np.uint8], sigma_px: float) -> npt.NDArray[np.uint8]:
    """uint8 NHWC tiles blurred by a Gaussian of ``sigma_px`` pixels per channel (mirrored edges)."""
    if sigma_px <= 0:
        return tiles
    out = gaussian_filter(tiles.astype(np.float32), sigma=(0, sigma_px, sigma_px, 0), mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur_table(model: Path, sigmas_um: tuple[float, ...] = SIGMAS_UM) -> list[dict[str, Any]]:
    """One row per sigma (um): AUC, share called tumour and tumour tiles' mean P on GlaS validation."""
    card = load_card(model.with_suffix(".json"))
    raw = card.raw
    sets = [s for s in build_sets(raw, None, splits=("val",)) if s.name == "glas-val"]
    if not sets:
        raise SystemExit(
            f"{shared_tiles_dir() / 'glas-colon'}: GlaS tiles not found (or the card has no GlaS)"
        )
    (glas,) = sets
    mpp = float(raw.get("mpp", 0.5))
    rows = []
    for sigma in sigmas_um:
        blurred = dataclasses.replace(glas, images=blur_tiles(glas.images, sigma / mpp))
        (p,) = score_sets(model, [blurred])
        tumour = glas.tumour.astype(bool)
        rows.append(
            {
                "sigma_um": sigma,
                "tiles": len(p),
                "auc": round(float(roc_auc(glas.tumour, p)), 4),
                "called": round(float((p >= card.threshold).mean()), 4),
                "tumour_mean_p": round(float(p[tumour].mean()), 4),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.blur_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tumour-cnn.onnx"))
    p.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS_UM), help="blur sigmas, um")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    rows = blur_table(args.model, tuple(args.sigmas))
    print("| blur sigma (um) | tiles | AUC | called tumour | tumour tiles' mean P |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sigma_um']} | {r['tiles']} | {r['auc']} | {r['called']} | {r['tumour_mean_p']} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
