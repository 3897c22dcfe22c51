"""Does the OOD score tell the training sources from foreign input? Measured on real files.

Example (from the repository root)::

    python -m models.ood_check --model models/tumour-cnn.onnx

In-distribution: held-out tiles of the training sources (LC25000 test split, GlaS test patients)
and a source never trained on (Kather 2016 colon tiles). Foreign: tiles of the real fluorescence
NDPI and multiplex QPTIFF, of the real IHC kidney TIFF (another stain), blank tiles (white, black,
uniform grey), and held-out GlaS tiles with red and blue swapped (a synthetic "other stain": no real
slide of another histochemical stain is in the shared data). For each set: the median tile distance
over ``d_ref`` (the slide score the pipeline would give a slide made of these tiles), whether that
score is above the card's ``warn_above`` (the pipeline's warning), the fraction of tiles beyond
``d_ref`` and the AUROC of the distance against the in-distribution held-out tiles.
Torch-free (numpy, onnxruntime, the package's slide readers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models import TILE_PX
from models.card import write_markdown
from models.evaluate import build_sets, default_index, make_session
from models.scanned import shared_tiles_dir
from wsi_pipeline.evaluation.metrics import roc_auc
from wsi_pipeline.inference.card import load_card, write_card


def _grid(w: int, h: int, n: int) -> list[tuple[int, int]]:
    side = int(np.sqrt(n)) + 1
    xs = np.linspace(0, max(0, w - TILE_PX), side).astype(int)
    ys = np.linspace(0, max(0, h - TILE_PX), side).astype(int)
    return [(int(x), int(y)) for y in ys for x in xs][:n]


def _slide_tiles(path: Path, n: int, backend: str = "auto") -> npt.NDArray[np.uint8]:
    """Up to ``n`` level-0 tiles on a regular grid over a real slide (whatever it shows).

    Files the pipeline refuses as not RGB (multiplex channels) are read with tifffile: the first
    channel, scaled to 0-255 and repeated as grey RGB, i.e. what a reader that ignored the check saw.
    """
    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.io.slide import open_slide

    try:
        reader = open_slide(path, backend, verify=False)
    except SlideError:
        import tifffile

        img = np.asarray(tifffile.imread(path, key=0), dtype=np.float64)
        img = img.reshape(img.shape[-2:]) if img.ndim > 2 else img
        grey = np.clip(255 * (img - img.min()) / max(float(np.ptp(img)), 1e-9), 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        return np.stack(
            [rgb[y : y + TILE_PX, x : x + TILE_PX] for x, y in _grid(rgb.shape[1], rgb.shape[0], n)]
        )
    try:
        w, h = reader.dimensions
        tiles = [reader.read_region(xy, 0, (TILE_PX, TILE_PX)) for xy in _grid(w, h, n)]
    finally:
        reader.close()
    return np.stack(tiles).astype(np.uint8)


def foreign_sets(slides_dir: Path, glas_test: npt.NDArray[np.uint8]) -> dict[str, npt.NDArray[np.uint8]]:
    """Named sets of clearly foreign tiles (see the module docstring)."""
    rng = np.random.default_rng(0)
    out: dict[str, npt.NDArray[np.uint8]] = {
        "blank white": rng.integers(235, 256, (16, TILE_PX, TILE_PX, 3)).astype(np.uint8),
        "blank black": rng.integers(0, 20, (16, TILE_PX, TILE_PX, 3)).astype(np.uint8),
        "uniform grey": np.full((8, TILE_PX, TILE_PX, 3), 128, np.uint8),
    }
    for name, rel, backend in (
        ("fluorescence NDPI", "hamamatsu/test3-TRITC-2-560.ndpi", "openslide"),
        ("multiplex QPTIFF", "qptiff/small_vectra.qptiff", "tiffslide"),
        ("IHC kidney TIFF", "plain-tiff/kidney-48-5.tif", "tiffslide"),
    ):
        if (slides_dir / rel).exists():
            out[name] = _slide_tiles(slides_dir / rel, 36, backend)
    if len(glas_test):
        idx = rng.choice(len(glas_test), min(64, len(glas_test)), replace=False)
        out["GlaS red/blue swapped (synthetic)"] = glas_test[idx][..., ::-1].copy()
    return out


def session_distances(
    session: Any, name: str, tiles: npt.NDArray[np.uint8], batch: int = 64
) -> npt.NDArray[np.float64]:
    parts = [
        session.run([name], {"tiles": np.ascontiguousarray(tiles[i : i + batch])})[0]
        for i in range(0, len(tiles), batch)
    ]
    return np.concatenate(parts).astype(np.float64).reshape(-1)


def ood_report(model: Path, card: dict[str, Any], index: Path, slides_dir: Path) -> dict[str, Any]:
    """Per set: tiles, slide score (median / d_ref), fraction beyond d_ref, AUROC against held-out."""
    ood = card.get("ood")
    if not ood:
        raise ValueError(f"{model}: the card has no ood section (export with models.export)")
    session = make_session(model)
    d_ref = float(ood["d_ref"])
    warn_above = float(ood.get("warn_above", 1.0))
    sets = {s.name: s.images for s in build_sets(card, index)}
    held = {k: v for k, v in sets.items() if k in ("test", "glas-test")}
    d_held = np.concatenate([session_distances(session, ood["output"], v) for v in held.values()])
    report: dict[str, Any] = {
        "d_ref": d_ref,
        "warn_above": warn_above,
        "in_distribution": {},
        "unseen_source": {},
        "foreign": {},
    }

    def row(d: npt.NDArray[np.float64], versus: bool) -> dict[str, Any]:
        r = {"tiles": int(d.size), "slide_score": round(float(np.median(d) / d_ref), 3),
             "beyond_d_ref": round(float((d > d_ref).mean()), 3),
             "warned": bool(np.median(d) / d_ref > warn_above)}  # fmt: skip
        if versus:
            r["auroc_vs_held_out"] = round(
                roc_auc(np.r_[np.zeros(d_held.size), np.ones(d.size)], np.r_[d_held, d]), 4
            )
        return r

    for k, v in held.items():
        report["in_distribution"]["LC25000 test" if k == "test" else "GlaS test patients"] = row(
            session_distances(session, ood["output"], v), False
        )
    for k in ("kather2016", "nct-crc-he"):
        if k in sets:
            report["unseen_source"][k] = row(session_distances(session, ood["output"], sets[k]), True)
    for k, tiles in foreign_sets(
        slides_dir, sets.get("glas-test", np.zeros((0, TILE_PX, TILE_PX, 3), np.uint8))
    ).items():
        report["foreign"][k] = row(session_distances(session, ood["output"], tiles), True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.ood_check", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path(__file__).resolve().parent / "tumour-cnn.onnx")
    p.add_argument("--index", type=Path, default=None)
    p.add_argument("--slides", type=Path, default=shared_tiles_dir().parent / "slides")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--write-card", action="store_true", help="store the report in the card (ood.validation)")
    args = p.parse_args(argv)
    card = load_card(args.model.with_suffix(".json")).raw
    index = args.index or default_index()
    if not index.exists():
        print(f"error: index {index} not found; pass --index", file=sys.stderr)
        return 2
    report = ood_report(args.model, card, index, args.slides)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.write_card:
        card["ood"]["validation"] = {
            "command": "python -m models.ood_check --model " + args.model.as_posix(),
            **report,
        }
        write_card(card, args.model.with_suffix(".json"))
        write_markdown(card, args.model.parent / "MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
