"""What gets scored: a slide at the model's resolution, or a finished tile store, as one object.

A :class:`TileSource` carries

* its **identity**: a digest of the slide's content fingerprint and every tiling and tissue parameter
  (for a store: the store's own parameters, tile layout and creation id), the key under which results
  are resumed and readers are cached;
* its **geometry** (:class:`Layout`, computed once on first use): grid, level, downsample, the kept
  tiles' grid positions and level-0 origins, um/px, thumbnail and the slide's stain fit;
* a **reader factory**: :meth:`TileSource.task_source` is the small picklable part that travels in
  Dask tasks; :func:`read_chunk` on a worker turns it into tiles, with handles cached per thread
  under the identity (never the path, so a slide replaced at the same path is never read through
  the old handle).

Everything downstream (scoring, outputs, the model-fits check, resume keys) takes a source and does
not ask whether it came from a slide or a store.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_pipeline.errors import ModelError
from wsi_pipeline.inference.card import ModelCard
from wsi_pipeline.io.slide import SlideReader, Thumbnail, open_slide, qupath_origin_l0, slide_fingerprint
from wsi_pipeline.stain.macenko import REFERENCE
from wsi_pipeline.tiling.grid import TileGrid
from wsi_pipeline.tiling.plan import TileOptions, plan_slide, require_tissue
from wsi_pipeline.tiling.read import fit_slide_stain, iter_tiles, stain_transform

if TYPE_CHECKING:  # zarr is imported only when a store is used (it costs ~0.1 s to import)
    from wsi_pipeline.io.tilestore import TileStore


@dataclass(frozen=True)
class Layout:
    """A source's geometry: where its tiles are and at what resolution.

    ``colrow`` (N, 2) grid positions in tile order, ``coords_l0`` (N, 2) tile origins in level-0
    pixels, ``tissue_fraction`` (N,); ``mpp_l0`` the slide's level-0 um/px; ``thumbnail`` RGB at
    ``thumbnail_downsample`` level-0 pixels per thumbnail pixel; ``stain`` the slide's Macenko fit
    (None without normalization); ``records`` the resolution and tissue records for the manifest;
    ``picture`` the base of the slide's picture for people, made from the thumbnail's read when the
    source was opened with ``picture_px`` (None otherwise: :func:`~wsi_pipeline.tiling.pictures.slide_picture`
    reads the slide for it).
    """

    grid: TileGrid
    colrow: np.ndarray
    coords_l0: np.ndarray
    tissue_fraction: np.ndarray
    mpp_l0: float
    slide_wh: tuple[int, int]
    thumbnail: np.ndarray
    thumbnail_downsample: float
    stain: dict[str, Any] | None
    records: dict[str, Any]
    picture: Thumbnail | None = None
    picture_px: int | None = None  # the long side (pixels) ``picture`` was read for
    regions_l0: Any = None  # the regions of interest (``--regions``) in level-0 px, shapely; None: none

    @property
    def n_tiles(self) -> int:
        return len(self.colrow)


@dataclass(frozen=True)
class TaskSource:
    """The picklable part of a source that a Dask task needs to read its tiles."""

    kind: str  # "slide" or "store"
    path: str
    backend: str
    cache_key: str  # identity + the file's inode and mtime: a replaced file never hits the cache
    grid: TileGrid
    stain: dict[str, Any] | None  # normalize with this fit after reading (slides only)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_key(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "missing"
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


class TileSource:
    """Base of :class:`SlideSource` and :class:`StoreSource` (use :func:`open_source`)."""

    kind: str
    path: Path

    @property
    def slide_path(self) -> Path:
        """The scanned slide (for outputs and annotation matching), also when reading a store made from it."""
        raise NotImplementedError

    @property
    def slide_name(self) -> str:
        return self.slide_path.name

    @property
    def backend(self) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Content fingerprint of the slide the tiles come from."""
        raise NotImplementedError

    @property
    def params(self) -> dict[str, Any]:
        """Tiling and tissue parameters that shaped the tiles (:meth:`TileOptions.store_params`)."""
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """Digest of everything that decides the tiles' pixels and order."""
        raise NotImplementedError

    @property
    def layout(self) -> Layout:
        raise NotImplementedError

    def check_model(self, card: ModelCard, *, normalize: str, asked_by: str) -> None:
        """Raise :class:`ModelError` when the tiles do not suit ``card`` (resolution, size, stain).

        ``normalize`` is the normalization the run needs; ``asked_by`` says who asked for it.
        """

    def task_source(self) -> TaskSource:
        layout = self.layout
        return TaskSource(
            self.kind,
            str(self.path),
            self.backend,
            f"{self.identity}:{_file_key(self.path)}",
            layout.grid,
            layout.stain if self.kind == "slide" else None,
        )


class SlideSource(TileSource):
    """A slide file, tiled at ``options.target_mpp`` on first use of :attr:`layout`; with
    ``picture_px``, planning also keeps the base of a ``picture_px`` picture of the slide (read with
    the tissue thumbnail, so the slide is not decoded twice for it)."""

    kind = "slide"

    def __init__(
        self, path: str | Path, options: TileOptions, backend: str = "auto", *, picture_px: int | None = None
    ) -> None:
        self.path = Path(path)
        self.options = options
        self.picture_px = picture_px
        self._backend_requested = backend
        self._fingerprint = slide_fingerprint(self.path) if self.path.exists() else ""

    @property
    def slide_path(self) -> Path:
        return self.path

    @property
    def backend(self) -> str:
        return self.layout.records["backend"] if "layout" in self.__dict__ else self._backend_requested

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def params(self) -> dict[str, Any]:
        return self.options.store_params()

    @property
    def identity(self) -> str:
        return _digest(
            {"kind": "slide", "fingerprint": self._fingerprint, "backend": self._backend_requested,
             "tile": self.params}
        )  # fmt: skip

    @cached_property
    def layout(self) -> Layout:
        """Open the slide, plan it (resolution, level, tissue, grid) and fit its stain if asked."""
        opts = self.options
        reader = open_slide(self.path, self._backend_requested)
        try:
            plan = plan_slide(reader, opts, picture_px=self.picture_px)
            require_tissue(plan, self.path, opts)
            stain = fit_slide_stain(reader, plan, opts) if opts.normalize == "macenko" else None
            backend, slide_wh, qupath_origin = reader.backend, reader.dimensions, qupath_origin_l0(reader)
        finally:
            reader.close()
        records = {
            "backend": backend,
            "qupath_origin_l0": list(qupath_origin),
            "resolution": {
                "mpp_x": plan.resolution.mpp_x,
                "mpp_y": plan.resolution.mpp_y,
                "mpp_source": plan.resolution.source,
                "effective_mpp": plan.choice.effective_mpp,
                "level": plan.choice.level,
                "resize_scale": plan.choice.scale,
                **plan.resolution.conflict_record(),
            },
            "tissue": {
                "slide_tissue_fraction": plan.slide_tissue_fraction,
                "pen_marks_mm2": plan.pen_marks_mm2,
                "regions": plan.regions,
            },
        }
        return Layout(
            plan.grid, plan.colrow, plan.coords_l0, plan.tissue_fraction, plan.resolution.mpp, slide_wh,
            plan.thumbnail.image, plan.thumbnail.downsample, stain, records,
            plan.picture, self.picture_px if plan.picture is not None else None, plan.regions_l0,
        )  # fmt: skip


class StoreSource(TileSource):
    """A finished tile store (``wsi-infer tile``): tiles are read as stored (already normalized when
    the store was made with ``--normalize macenko``)."""

    kind = "store"

    def __init__(self, path: str | Path) -> None:
        from wsi_pipeline.io.tilestore import open_tile_store

        self.path = Path(path)
        self.store: TileStore = open_tile_store(self.path)
        self.meta = self.store.meta

    @property
    def slide_path(self) -> Path:
        return Path(self.meta["slide"]["path"])

    @property
    def backend(self) -> str:
        return str(self.meta["slide"]["backend"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["slide"]["fingerprint"])

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.meta.get("params", {}))

    @cached_property
    def identity(self) -> str:
        # The tile layout itself is hashed too: stores written before stores had an id, or re-tiled
        # with other parameters at the same path, never share an identity.
        layout = hashlib.sha256(np.ascontiguousarray(self.store.grid_colrow).tobytes())
        layout.update(np.ascontiguousarray(self.store.coords_l0).tobytes())
        return _digest(
            {"kind": "store", "fingerprint": self.fingerprint, "params": self.params,
             "store_id": self.meta.get("store_id"), "n_tiles": len(self.store), "layout": layout.hexdigest(),
             "stain": self.meta.get("stain")}
        )  # fmt: skip

    @cached_property
    def layout(self) -> Layout:
        meta = self.meta
        res = meta["resolution"]
        records = {
            "backend": self.backend,
            "qupath_origin_l0": meta["slide"].get("qupath_origin_l0") or [0, 0],  # absent: an older store
            "resolution": {k: res.get(k) for k in
                           ("mpp_x", "mpp_y", "mpp_source", "effective_mpp", "level", "resize_scale")},
            "tissue": {"slide_tissue_fraction": meta["tissue"]["slide_tissue_fraction"],
                       "pen_marks_mm2": meta["tissue"].get("pen_marks_mm2"),  # None: an older store
                       "regions": meta["tissue"].get("regions")},
        }  # fmt: skip
        return Layout(
            TileGrid.from_dict(meta["grid"]), self.store.grid_colrow, self.store.coords_l0,
            self.store.tissue_fraction, float(res["mpp_x"] + res["mpp_y"]) / 2,
            (int(meta["slide"]["dimensions"][0]), int(meta["slide"]["dimensions"][1])),
            np.asarray(self.store.array("thumbnail")[...]), float(meta["tissue"]["mask_downsample"]),
            meta.get("stain"), records,
        )  # fmt: skip

    def check_model(self, card: ModelCard, *, normalize: str, asked_by: str) -> None:
        res = self.meta["resolution"]
        tolerance = float(self.params.get("level_tolerance", 0.1))
        mpp = float(res.get("target_mpp") or res["effective_mpp"])
        if abs(mpp - card.mpp) / card.mpp > tolerance:
            raise ModelError(
                f"{self.path}: the store holds tiles at {mpp:g} um/px but the model {card.path.name} was "
                f"trained at {card.mpp:g} um/px; re-tile the slide with `wsi-infer tile` (tiles are cut "
                f"at the model's resolution by default) or score the slide itself"
            )
        tile_px = int(self.store.tiles.shape[1])
        if tile_px != card.input_size_px:
            raise ModelError(
                f"{self.path}: the store holds {tile_px} px tiles, the model {card.path.name} takes "
                f"{card.input_size_px} px; re-tile with `wsi-infer tile --tile-size {card.input_size_px}`"
            )
        if normalize == "macenko" and not self.meta.get("stain"):
            raise ModelError(
                f"{self.path}: the store holds tiles without stain normalization but {asked_by} Macenko; "
                "re-tile with `wsi-infer tile --normalize macenko` or score the slide itself"
            )
        stored = (self.meta.get("stain") or {}).get("reference") or {}
        if card.stain_reference and stored and not _same_stain(stored, card.stain_reference):
            raise ModelError(
                f"{self.path}: the store's tiles were normalized to another stain than the one the model "
                f"{card.path.name} names (its card's preprocessing.stain_reference); score the slide itself"
            )


def _same_stain(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two stain-model dicts hold the same vectors and maximum concentrations."""
    keys = ("stain_matrix", "max_concentrations")
    return all(np.allclose(np.asarray(a[k], float), np.asarray(b[k], float), atol=1e-6) for k in keys)


def is_store_path(path: str | Path) -> bool:
    """True for a path that names a tile store (a ``.zarr`` folder)."""
    p = Path(path)
    return p.suffix == ".zarr" and p.is_dir()


def open_source(
    path: str | Path, options: TileOptions, backend: str = "auto", *, picture_px: int | None = None
) -> TileSource:
    """A :class:`StoreSource` for a ``.zarr`` tile store, else a :class:`SlideSource` tiled with
    ``options`` (nothing is read from the slide until its layout is used; ``picture_px``: see
    :class:`SlideSource`)."""
    if is_store_path(path):
        return StoreSource(path)
    return SlideSource(path, options, backend, picture_px=picture_px)


_local = threading.local()


def _cached(key: str, open_fn: Any) -> Any:
    """A handle per worker thread, kept for the next task with the same ``key`` (one at a time)."""
    cache: dict[str, Any] = getattr(_local, "handles", None) or {}
    _local.handles = cache
    if key not in cache:
        for old in cache.values():
            if hasattr(old, "close"):
                old.close()
        cache.clear()
        cache[key] = open_fn()
    return cache[key]


def read_chunk(source: TaskSource, colrow: np.ndarray, start: int) -> np.ndarray:
    """The tiles (n, tile_px, tile_px, 3) uint8 at ``colrow``, tiles ``start``.. of the source's order."""
    if source.kind == "store":
        from wsi_pipeline.io.tilestore import open_tile_store

        store: TileStore = _cached(source.cache_key, lambda: open_tile_store(source.path))
        return np.asarray(store.tiles[start : start + len(colrow)])
    reader: SlideReader = _cached(
        source.cache_key, lambda: open_slide(source.path, source.backend, verify=False)
    )  # the client opened and checked the slide
    # The stain record names its reference; REFERENCE is only the fallback of records without one.
    transform = stain_transform(source.stain, REFERENCE) if source.stain else None
    parts = [t for _, t in iter_tiles(reader, (source.grid, colrow), workers=1, transform=transform)]
    if not parts:
        return np.zeros((0, source.grid.tile_px, source.grid.tile_px, 3), np.uint8)
    return np.concatenate(parts)
