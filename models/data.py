"""Tiles in memory: an index (CSV or class folders) decoded once into one uint8 array.

Torch-free: training (``models.train``), evaluation (``models.evaluate``) and the tests share it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from models import TILE_PX
from models.split import IndexRow, check_groups

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".tif", ".tiff")


@dataclass(frozen=True)
class TileSet:
    """Decoded tiles and their labels.

    ``images``: uint8 ``(N, tile_px, tile_px, 3)`` RGB; ``tumour``: int64 ``(N,)`` 0/1;
    ``rows``: the index rows, in the same order.
    """

    images: npt.NDArray[np.uint8]
    tumour: npt.NDArray[np.int64]
    rows: tuple[IndexRow, ...]

    def __len__(self) -> int:
        return len(self.rows)


def rows_from_folder(root: str | Path, tumour_classes: Sequence[str]) -> list[IndexRow]:
    """Index a folder of class subfolders (``root/<class>/*.jpeg``).

    Subfolders named in ``tumour_classes`` are tumour (1), the others not (0). A folder carries no
    source-picture groups, so each file is its own group: with augmented copies of one picture (as in
    LC25000) such a split leaks, so prefer a CSV index with a ``group`` column.
    """
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class subfolders found")
    unknown = sorted(set(tumour_classes) - set(classes))
    if unknown:
        raise ValueError(f"{root}: tumour classes {unknown} are not subfolders (have {classes})")
    rows = [
        IndexRow(path, cls, int(cls in tumour_classes), f"{cls}/{path.stem}")
        for cls in classes
        for path in sorted((root / cls).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise ValueError(f"{root}: no images with suffix {IMAGE_SUFFIXES}")
    log.warning("%s: no group column; every file is its own group, so near-duplicates may leak", root)
    check_groups(rows, source=str(root))
    return rows


def read_tile(path: Path, tile_px: int = TILE_PX) -> npt.NDArray[np.uint8]:
    """Decode one image to uint8 RGB ``(tile_px, tile_px, 3)``; raise ``ValueError`` on another size."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (tile_px, tile_px, 3):
        raise ValueError(f"{path}: tile is {arr.shape[1]}x{arr.shape[0]} px, expected {tile_px}x{tile_px}")
    return arr


def load_tiles(rows: Sequence[IndexRow], tile_px: int = TILE_PX, threads: int = 2) -> TileSet:
    """Decode every row's image into one ``(N, tile_px, tile_px, 3)`` uint8 array (in row order)."""
    images = np.empty((len(rows), tile_px, tile_px, 3), dtype=np.uint8)

    def work(i: int) -> None:
        images[i] = read_tile(rows[i].path, tile_px)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(work, range(len(rows))))
    tumour = np.array([r.tumour for r in rows], dtype=np.int64)
    return TileSet(images=images, tumour=tumour, rows=tuple(rows))


def iterate_batches(
    n: int, batch_size: int, rng: np.random.Generator | None = None, drop_last: bool = False
) -> Iterator[npt.NDArray[np.intp]]:
    """Index batches over ``range(n)``; shuffled when ``rng`` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def channel_stats(images: npt.NDArray[np.uint8], max_tiles: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of RGB in [0, 1] over (an evenly spaced subset of) ``images``."""
    step = max(1, len(images) // max_tiles)
    px = images[::step].reshape(-1, 3).astype(np.float64) / 255.0
    return [round(float(v), 4) for v in px.mean(0)], [round(float(v), 4) for v in px.std(0)]
