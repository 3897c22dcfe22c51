"""Zarr v3 tile stores: layout, self-describing attributes, resumable chunk writes, atomic completion.

Layout of ``SLIDE.zarr`` (a Zarr v3 group):

=================== =============================== ================================================
array               shape, dtype                    meaning
=================== =============================== ================================================
``tiles``           (N, tile_px, tile_px, 3) uint8  RGB tiles at the effective mpp, chunks of
                                                    ``chunk_tiles`` tiles, Blosc/zstd compressed
``coords_l0``       (N, 2) int64                    tile origin (x, y) in level-0 pixels
``grid_colrow``     (N, 2) int32                    (col, row) of the tile in the grid
``tissue_fraction`` (N,) float32                    fraction of the tile covered by the tissue mask
``focus``           (N,) float32                    each tile's focus score (:mod:`wsi_pipeline.tiling.focus`;
                                                    below 0.3: out of focus), written once all tiles are;
                                                    absent where the tiles' mpp is coarser than 1 um/px
                                                    and in stores made before it
``chunk_done``      (n_chunks,) uint8               1 once chunk k of ``tiles`` is fully written
``thumbnail``       (h, w, 3) uint8                 the thumbnail the mask was computed on
``tissue_mask``     (h, w) bool                     the tissue mask (thumbnail pixels)
=================== =============================== ================================================

The group attribute ``wsi_pipeline`` holds the slide (path, fingerprint, backend, vendor), the
resolution (requested/effective mpp and its source), the grid, the tissue parameters, the run
parameters that must match to resume, and ``complete``.

A store is built under ``OUT.partial`` and renamed to ``OUT`` only once complete, so ``OUT`` never
names a half-written store; an interrupted run resumes from the chunks marked done.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from wsi_pipeline.errors import StoreError
from wsi_pipeline.provenance import pid_alive

STORE_FORMAT = "wsi-pipeline.tilestore"
FORMAT_VERSION = 1
ATTR_KEY = "wsi_pipeline"


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group`` (a group member of another kind is a corrupt store)."""
    arr = group[name]
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{group.store_path}: {name!r} is not an array; the tile store is corrupt")
    return arr


def partial_path(out: Path) -> Path:
    """Where a store is built before it is complete."""
    return out.with_name(out.name + ".partial")


def _read_attrs(path: Path) -> dict[str, Any] | None:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return None
    meta = dict(group.attrs).get(ATTR_KEY)
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
        return None
    return meta


def _param_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


@contextmanager
def store_lock(out: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold the claim on the store ``out`` (lock file ``OUT.lock`` beside it, :mod:`.locks`) while
    writing it: a second run writing the same store gets one :class:`BusyError` naming the holder (or,
    with ``wait``, waits for it), instead of reading half-made arrays."""
    from wsi_pipeline.io.locks import claim

    def busy(who: str) -> str:
        return (
            f"{out}: another run ({who}) is writing this tile store; wait for it to finish or choose "
            "another --out"
        )

    with claim(out.with_name(out.name + ".lock"), busy, wait=wait):
        yield


def _remove_stale_old_stores(out: Path) -> None:
    """Remove ``OUT.old-PID`` stores that a writer killed inside ``finalize`` left behind (the old
    store it was replacing); only our own stores, and only when that process is gone."""
    for old in out.parent.glob(f"{out.name}.old-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)) and _read_attrs(old) is not None:
            shutil.rmtree(old, ignore_errors=True)


def existing_state(out: Path, params: dict[str, Any], *, overwrite: bool) -> str:
    """State of ``out`` for a run with ``params``: 'absent', 'partial' (resume) or 'complete'.

    A finished store made with other parameters is refused unless ``overwrite`` (it is then replaced
    only when the new store completes); a partial one from other parameters is discarded when
    ``overwrite``, refused otherwise.
    """
    part = partial_path(out)
    _remove_stale_old_stores(out)
    if out.exists():
        meta = _read_attrs(out) if out.is_dir() else None
        if meta is None:  # --overwrite replaces only a store this project wrote, never a user's folder
            raise StoreError(
                f"{out}: exists and is not a wsi-pipeline tile store, so it is left alone (even with "
                "--overwrite); choose another --out, e.g. a new NAME.zarr"
            )
        elif meta.get("params") == params and meta.get("complete"):
            return "complete"
        elif not overwrite:
            diff = "; ".join(_param_diff(meta.get("params", {}), params)) or "incomplete store"
            raise StoreError(
                f"{out}: holds a tile store made with other parameters ({diff}); pass --overwrite to "
                f"replace it, or choose another --out"
            )
    if part.exists():
        meta = _read_attrs(part)
        if meta is not None and meta.get("params") == params:
            return "partial"
        if meta is None and not (part.is_dir() and (part / "zarr.json").exists()):
            raise StoreError(
                f"{part}: exists and is not a partial wsi-pipeline tile store, so it is left alone; "
                "move it away or choose another --out"
            )
        if not overwrite:
            why = "; ".join(_param_diff(meta.get("params", {}), params)) if meta else "unreadable"
            raise StoreError(
                f"{part}: an interrupted run with other parameters left this ({why}); pass --overwrite "
                f"to discard it, or re-run with the same options to resume"
            )
        shutil.rmtree(part)
    return "absent"


@dataclass
class TileStoreWriter:
    """Writes the chunks of one partial store; :meth:`finalize` makes it the finished store."""

    out: Path
    group: zarr.Group

    @property
    def path(self) -> Path:
        return partial_path(self.out)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs[ATTR_KEY])  # type: ignore[arg-type]

    @property
    def n_tiles(self) -> int:
        return int(_array(self.group, "tiles").shape[0])

    @property
    def chunk_tiles(self) -> int:
        return int(_array(self.group, "tiles").chunks[0])

    @classmethod
    def create(
        cls,
        out: Path,
        *,
        tile_px: int,
        chunk_tiles: int,
        coords_l0: np.ndarray,
        grid_colrow: np.ndarray,
        tissue_fraction: np.ndarray,
        thumbnail: np.ndarray,
        tissue_mask: np.ndarray,
        meta: dict[str, Any],
        focus: bool = False,
    ) -> TileStoreWriter:
        """Create ``OUT.partial`` with every array but the tile pixels (and, with ``focus``, their focus
        scores: :meth:`write_focus`) written."""
        path = partial_path(out)
        n = len(coords_l0)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(path), mode="w", zarr_format=3)
            group.create_array(
                "tiles",
                shape=(n, tile_px, tile_px, 3),
                chunks=(chunk_tiles, tile_px, tile_px, 3),
                dtype="uint8",
                compressors=BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle"),
                dimension_names=("tile", "y", "x", "channel"),
            )
            small = BloscCodec(cname="zstd", clevel=3)
            for name, data in (
                ("coords_l0", np.asarray(coords_l0, np.int64)),
                ("grid_colrow", np.asarray(grid_colrow, np.int32)),
                ("tissue_fraction", np.asarray(tissue_fraction, np.float32)),
                ("thumbnail", np.ascontiguousarray(thumbnail)),
                ("tissue_mask", np.asarray(tissue_mask, bool)),
            ):
                group.create_array(name, data=data, compressors=small)
            if focus:  # written whole before the store is finalized (one file, not one per chunk)
                group.create_array("focus", shape=(n,), dtype="float32", fill_value=float("nan"),
                                   compressors=small)  # fmt: skip
            n_chunks = max(1, -(-n // chunk_tiles))
            group.create_array("chunk_done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
            group.attrs[ATTR_KEY] = {
                **meta,
                "format": STORE_FORMAT,
                "format_version": FORMAT_VERSION,
                "n_tiles": n,
                "chunk_tiles": chunk_tiles,
                "complete": False,
            }
        except OSError as exc:
            raise _store_os_error(path, exc) from exc
        return cls(out, group)

    @classmethod
    def resume(cls, out: Path) -> TileStoreWriter:
        return cls(out, zarr.open_group(str(partial_path(out)), mode="r+"))

    def matches_layout(self, grid_colrow: np.ndarray, coords_l0: np.ndarray) -> bool:
        """True when this store was created for exactly these tiles, in this order."""
        old_cr = np.asarray(_array(self.group, "grid_colrow")[:])
        old_xy = np.asarray(_array(self.group, "coords_l0")[:])
        return bool(
            old_cr.shape == np.shape(grid_colrow)
            and np.array_equal(old_cr, grid_colrow)
            and np.array_equal(old_xy, coords_l0)
        )

    def pending_chunks(self) -> list[int]:
        """Indices of ``tiles`` chunks not yet fully written."""
        done = np.asarray(_array(self.group, "chunk_done")[:])
        n_chunks = -(-self.n_tiles // self.chunk_tiles)
        return [k for k in range(n_chunks) if not done[k]]

    @property
    def has_focus(self) -> bool:
        """Whether the store keeps focus scores (stores created before them do not)."""
        return "focus" in self.group

    def write_chunk(self, k: int, tiles: np.ndarray) -> None:
        """Write chunk ``k`` (tiles ``k*chunk_tiles`` onwards), then mark it done."""
        start = k * self.chunk_tiles
        try:
            _array(self.group, "tiles")[start : start + len(tiles)] = tiles
            _array(self.group, "chunk_done")[k] = 1
        except OSError as exc:
            raise _store_os_error(self.path, exc) from exc

    def chunk_tiles_written(self, k: int) -> np.ndarray:
        """The tiles of chunk ``k`` as written (to measure them again on resuming)."""
        start = k * self.chunk_tiles
        return np.asarray(_array(self.group, "tiles")[start : start + self.chunk_tiles])

    def write_focus(self, scores: np.ndarray) -> None:
        """Write every tile's focus score (a store that keeps them: :attr:`has_focus`)."""
        try:
            _array(self.group, "focus")[:] = np.asarray(scores, np.float32)
        except OSError as exc:
            raise _store_os_error(self.path, exc) from exc

    def update_meta(self, **extra: Any) -> None:
        self.group.attrs[ATTR_KEY] = {**self.meta, **extra}

    def finalize(self, **extra: Any) -> Path:
        """Mark complete and move ``OUT.partial`` to ``OUT`` (replacing an old ``OUT`` last)."""
        if self.pending_chunks():
            raise StoreError(f"{self.path}: cannot finalize, chunks {self.pending_chunks()[:5]} missing")
        part, out = self.path, self.out
        try:
            self.update_meta(**extra, complete=True)
            if out.exists():
                old = out.with_name(f"{out.name}.old-{os.getpid()}")
                out.rename(old)
                part.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                part.rename(out)
        except OSError as exc:  # e.g. disk full writing the attributes: the partial store resumes
            raise _store_os_error(part, exc) from exc
        return out


def _store_os_error(path: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(
            f"{path}: disk full while writing the tile store; free space and re-run the same command "
            f"to resume"
        )
    if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return StoreError(f"{path}: cannot write here ({exc.strerror}); choose a writable --out")
    return StoreError(f"{path}: cannot write the tile store ({exc}); check the output location")


@dataclass(frozen=True)
class TileStore:
    """A finished tile store opened for reading (arrays stay lazy)."""

    path: Path
    group: zarr.Group

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs[ATTR_KEY])  # type: ignore[arg-type]

    @property
    def tiles(self) -> zarr.Array:
        return _array(self.group, "tiles")

    @property
    def coords_l0(self) -> np.ndarray:
        return np.asarray(_array(self.group, "coords_l0")[:])

    @property
    def grid_colrow(self) -> np.ndarray:
        return np.asarray(_array(self.group, "grid_colrow")[:])

    @property
    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(_array(self.group, "tissue_fraction")[:])

    @property
    def focus(self) -> np.ndarray | None:
        """Each tile's focus score, or None in a store without them (made before them, or coarser than
        1 um/px)."""
        return np.asarray(_array(self.group, "focus")[:]) if "focus" in self.group else None

    def array(self, name: str) -> zarr.Array:
        """Any array of the store by name (e.g. ``thumbnail``, ``tissue_mask``)."""
        return _array(self.group, name)

    def __len__(self) -> int:
        return int(self.tiles.shape[0])


def open_tile_store(path: str | os.PathLike[str]) -> TileStore:
    """Open a finished store; an incomplete or foreign one raises :class:`StoreError`."""
    p = Path(path)
    if not p.exists():
        hint = (
            " (an interrupted run left .partial: re-run `wsi-infer tile` to finish it)"
            if (partial_path(p).exists())
            else ""
        )
        raise StoreError(f"{p}: no such tile store{hint}")
    meta = _read_attrs(p)
    if meta is None:
        raise StoreError(f"{p}: not a wsi-pipeline tile store; create one with `wsi-infer tile`")
    if not meta.get("complete"):
        raise StoreError(f"{p}: the tile store is incomplete; re-run `wsi-infer tile` to finish it")
    return TileStore(p, zarr.open_group(str(p), mode="r"))
