"""Slide readers (OpenSlide, tiffslide, in-memory), resolution and pyramid-level choice.

Every reader follows one OpenSlide-like interface, :class:`SlideReader`. ``read_region`` takes a
location in **level-0 pixels** and a size in **pixels of the requested level**, and returns RGB
``uint8`` (H, W, 3); transparent pixels (outside the scanned area) are composited onto white.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from wsi_pipeline.errors import ResolutionError, SlideError
from wsi_pipeline.io import tiff_level
from wsi_pipeline.io.formats import unsupported_message
from wsi_pipeline.io.resample import box_mean
from wsi_pipeline.io.tiff_region import TiffTiles, exact_level_xy, tiff_tiles_for

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS: tuple[str, ...] = ("auto", "openslide", "tiffslide")

#: Level-0 resolutions outside this range (micrometres per pixel) are treated as missing metadata:
#: a TIFF written with a default 72 dpi claims ~353 um/px, which no slide scanner produces.
PLAUSIBLE_MPP = (0.05, 20.0)

MPP_OVERRIDE_HINT = "pass --mpp <microns per pixel at level 0> (e.g. --mpp 0.25 for 40x, 0.5 for 20x)"


@runtime_checkable
class SlideReader(Protocol):
    """What the pipeline needs from a slide. Mirrors OpenSlide's API, with numpy output."""

    path: str
    backend: str

    @property
    def vendor(self) -> str: ...

    @property
    def properties(self) -> Mapping[str, str]: ...

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level, in pixels of that level."""
        ...

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to level 0."""
        ...

    @property
    def dimensions(self) -> tuple[int, int]: ...

    def metadata_mpp(self) -> tuple[float | None, float | None]:
        """Level-0 (mpp_x, mpp_y) in micrometres per pixel from the file's metadata, or None."""
        ...

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` = (w, h) level pixels whose top-left is ``location_l0``."""
        ...

    def close(self) -> None: ...


def _rgba_to_rgb(arr: np.ndarray) -> np.ndarray:
    """Composite RGBA uint8 onto white; RGB passes through; grayscale is refused by the caller."""
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 4:
        rgb = arr[..., :3]
        alpha = arr[..., 3]
        if alpha.min() == 255:
            return rgb
        a = alpha[..., None].astype(np.uint16)
        out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return out.astype(np.uint8)
    raise ValueError(f"expected RGB or RGBA pixels, got an array of shape {arr.shape}")


class _LibrarySlide:
    """Adapter over an OpenSlide-API object (``openslide.OpenSlide`` or ``tiffslide.TiffSlide``).

    Both libraries expose the same attributes; only the property prefix and the error types differ,
    so one adapter serves both instead of a copy of every method per backend.
    """

    def __init__(self, path: str, backend: str, handle: Any, prefix: str) -> None:
        self.path = path
        self.backend = backend
        self._h = handle
        self._prefix = prefix
        self._tiles: TiffTiles | None = None  # set by use_tiff_tiles
        self._ds: tuple[float, ...] = ()

    @property
    def vendor(self) -> str:
        return str(self._h.properties.get(f"{self._prefix}.vendor") or "generic-tiff")

    @property
    def properties(self) -> Mapping[str, str]:
        return {str(k): str(v) for k, v in self._h.properties.items()}

    @property
    def level_count(self) -> int:
        return int(self._h.level_count)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self._h.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._h.level_downsamples)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def metadata_mpp(self) -> tuple[float | None, float | None]:
        props = self._h.properties
        return (
            _as_float(props.get(f"{self._prefix}.mpp-x")),
            _as_float(props.get(f"{self._prefix}.mpp-y")),
        )

    def use_tiff_tiles(self) -> None:
        """Decode regions of a tiled TIFF's levels with tifffile where they are this library's pixels
        by construction and probes agree (:mod:`wsi_pipeline.io.tiff_region`: 1.7-2.5x faster than
        tiffslide). Only for tiffslide, which decodes with the same codecs: OpenSlide refuses a corrupt
        JPEG tile that those codecs decode into noise, and its reads stay the reference for scoring."""
        self._tiles = tiff_tiles_for(self, self._library_read)
        self._ds = self.level_downsamples

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = (int(v) for v in location_l0)
        w, h = (int(v) for v in size)
        tiles = self._tiles
        if tiles is not None and 0 <= level < len(self._ds):
            at = exact_level_xy((x, y), self._ds[level])
            if at is not None:
                try:
                    region = tiles.region(level, at[0], at[1], w, h)
                except Exception:  # a tile tifffile cannot decode: the library reads (or reports) it
                    region = None
                if region is not None:
                    return region
        return self._library_read((x, y), level, (w, h))

    def _library_read(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location_l0
        w, h = size
        try:
            arr = np.asarray(self._h.read_region((x, y), level, (w, h)))
        except Exception as exc:  # the libraries raise many types (OpenSlideError, codec errors, ...)
            fix = (
                "its tiles use a compression no reader here decodes (a vendor's own codec): convert the "
                "slide with the scanner's software to a standard pyramidal TIFF (JPEG) or DICOM"
                if _UNKNOWN_CODEC.search(str(exc))
                else "the file is corrupt or truncated - re-export or re-scan it"
            )
            raise SlideError(
                f"{self.path}: cannot read pixels at level {level}, x={x}, y={y}, size {w}x{h} "
                f"({type(exc).__name__}: {exc}); {fix}"
            ) from exc
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise SlideError(
                f"{self.path}: pixels have shape {arr.shape}, not RGB; only brightfield RGB slides "
                f"(H&E) are supported, not fluorescence or multiplex images"
            )
        return _rgba_to_rgb(arr)

    def close(self) -> None:
        tiles = self._tiles
        if tiles is not None:
            tiles.close()
            self._tiles = None
        self._h.close()


def read_rule(reader: SlideReader, level: int) -> tuple[str, bool]:
    """How ``reader`` maps level-0 locations to pixels of ``level``: (origin rule, exact block reads).

    tiffslide truncates ``location / downsample`` and slices whole level pixels ("trunc": exact at any
    downsample). OpenSlide divides and resamples by the sub-pixel remainder, so a region read at a
    non-integer downsample is not pixel-equal to reads of its parts; it is exact only at integer
    downsamples ("round"). In-memory slides have integer downsamples.
    """
    if reader.backend == "tiffslide":
        return "trunc", True
    ds = float(reader.level_downsamples[level])
    return "round", abs(ds - round(ds)) < 1e-9


#: what tifffile and OpenSlide say of a TIFF compression they have no decoder for
_UNKNOWN_CODEC = re.compile(
    r"is not a known COMPRESSION|Unsupported TIFF compression|requires the 'imagecodecs'"
)


def qupath_origin_l0(reader: SlideReader) -> tuple[int, int]:
    """The level-0 pixel that QuPath shows as (0, 0), so that GeoJSON for QuPath lands where it should.

    OpenSlide's level 0 covers a scanner's whole coordinate plane; for some formats (3DHISTECH
    MIRAX, Leica SCN, Ventana BIF) the tissue scan is a rectangle inside it, given by the
    ``openslide.bounds-x/-y/-width/-height`` properties. QuPath's OpenSlide image server crops to that
    rectangle when both its width and height differ from the slide's (its own rule), so its pixel
    (0, 0) is level-0 pixel (bounds-x, bounds-y); ASAP and our tile table keep OpenSlide's plane.
    (0, 0) for every other slide."""
    props = reader.properties
    for prefix in ("openslide", "tiffslide"):
        raw = [props.get(f"{prefix}.bounds-{k}") for k in ("x", "y", "width", "height")]
        if all(v is not None for v in raw):
            try:
                x, y, w, h = (int(float(str(v))) for v in raw)
            except ValueError:
                return (0, 0)
            width, height = reader.dimensions
            return (x, y) if w != width and h != height else (0, 0)
    return (0, 0)


def _as_float(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


class ArraySlide:
    """An in-memory slide over an RGB array, with a pyramid built by block-averaging.

    Used by tests (like OpenSlide's ``ImageSlide``) so every stage can run without a file.
    ``downsamples`` must be integers; ``mpp`` is the level-0 resolution in micrometres per pixel.
    """

    backend = "array"

    def __init__(
        self,
        image: np.ndarray,
        *,
        mpp: float | None = 0.5,
        downsamples: Sequence[int] = (1,),
        path: str = "<array>",
    ) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError("ArraySlide needs an RGB uint8 array of shape (H, W, 3)")
        self.path = path
        self._mpp = mpp
        self._levels = [box_mean(image, int(d), pad=255) for d in downsamples]  # edges white
        self._downsamples = tuple(float(d) for d in downsamples)

    @property
    def vendor(self) -> str:
        return "array"

    @property
    def properties(self) -> Mapping[str, str]:
        return {} if self._mpp is None else {"array.mpp-x": str(self._mpp), "array.mpp-y": str(self._mpp)}

    @property
    def level_count(self) -> int:
        return len(self._levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.shape[1], lv.shape[0]) for lv in self._levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def metadata_mpp(self) -> tuple[float | None, float | None]:
        return (self._mpp, self._mpp)

    def read_region(self, location_l0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        ds = self._downsamples[level]
        x, y = round(location_l0[0] / ds), round(location_l0[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)
        lv = self._levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.shape[1]), min(y + h, lv.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = lv[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        pass


#: Files that ``auto`` opens with tiffslide first (OpenSlide when tiffslide cannot open them): for
#: Aperio SVS both give the same pixels (checked on CMU-1-Small-Region, TCGA-CR and the benchmark
#: mosaics: identical tiles), and tiffslide decodes 2.15x faster on one thread (1861 vs 864 tiles/s on
#: the 9,250 px mosaic), because OpenSlide composes every region through cairo as ARGB. With its tiles
#: decoded by tifffile (io.tiff_region) it reads 448 px regions 2.1x faster than OpenSlide at random
#: places (2102 vs 997 tiles/s) and 2.9x in scan order (3721 vs 1263). Other TIFFs
#: (Philips, Ventana, generic) stay with OpenSlide first, whose vendor metadata (mpp) is the reference.
TIFFSLIDE_FIRST = (".svs",)
#: ... from this file size on: importing tiffslide (and zarr) takes ~0.2 s, which its faster decoding
#: (~0.6 ms a tile) repays after ~330 tiles, about 8 MB of JPEG tiles at 20x (the 907-tile benchmark
#: mosaic is 24 MB); smaller files open faster with OpenSlide.
TIFFSLIDE_MIN_BYTES = 8 << 20


#: A slide that cannot be opened and was modified less than this many seconds ago may still be being
#: copied or scanned: its error says so.
RECENT_S = 120.0


def open_slide(path: str | os.PathLike[str], backend: str = "auto", *, verify: bool = True) -> SlideReader:
    """:func:`_open_slide`; a slide that cannot be opened and changed in the last :data:`RECENT_S`
    seconds (a scanner or a copy may still be writing it) gets that said in its error."""
    try:
        return _open_slide(path, backend, verify=verify)
    except SlideError as exc:
        p = Path(path)
        if exc.whole_file:
            raise
        if p.is_dir() and not _holds_dicom(p):
            raise  # a folder that is no DICOM export: no copy in progress would make it a slide
        age = _seconds_since_written(p)
        if age is None or not 0 <= age < RECENT_S:
            raise
        raise SlideError(
            f"{exc} ({Path(path).name} changed {age:.0f} s ago: if it is still being copied or scanned, "
            "run again once it is complete)"
        ) from exc


def _holds_dicom(folder: Path) -> bool:
    from wsi_pipeline.io.dicom import dicom_files

    try:
        return bool(dicom_files(folder))
    except SlideError:  # cannot be listed: its error says so
        return False


def _seconds_since_written(path: Path) -> float | None:
    """Seconds since ``path`` (a folder: its newest file) was last modified; None when unknown."""
    import time

    try:
        if path.is_dir():
            mtimes = [p.stat().st_mtime for p in path.iterdir() if p.is_file()]
            return time.time() - max(mtimes) if mtimes else None
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def _open_slide(path: str | os.PathLike[str], backend: str = "auto", *, verify: bool = True) -> SlideReader:
    """Open a slide lazily with ``backend`` ('auto': tiffslide first for Aperio .svs of at least
    :data:`TIFFSLIDE_MIN_BYTES`, else OpenSlide first; the other one when the first cannot open it).
    A folder is a DICOM slide: the ``.dcm`` files of one series (:mod:`wsi_pipeline.io.dicom`).

    ``verify`` also checks a TIFF's structure against its size (truncation); handles opened again for
    reader threads or Dask workers of a slide the pipeline already opened skip that file scan.

    Raises :class:`SlideError` naming the file when it is missing, not a slide, or unsupported.
    """
    p = Path(path)
    if backend not in BACKENDS:
        raise SlideError(f"{p}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not p.exists():
        if p.is_symlink():  # a link left behind: the slide moved, or its share is not mounted
            raise SlideError(
                f"{p}: a link to {os.readlink(p)}, which does not exist (moved, or on a drive or share that "
                "is not mounted); mount it or point the link at the slide"
            )
        if os.name != "nt" and PureWindowsPath(p.name).drive:  # C:\slides\a.svs, \\server\share\a.svs
            raise SlideError(
                f"{p.name}: a Windows path, which this machine cannot open; give the slide's path here "
                "(where that drive or share is mounted, e.g. /mnt/slides/a.svs) or a path relative to the CSV"
            )
        raise SlideError(f"{p}: no such file; check the path")
    unsupported = unsupported_message(str(p))
    if unsupported:
        raise SlideError(unsupported)
    if p.is_dir():  # a DICOM slide: the folder of its series' .dcm files
        from wsi_pipeline.io.dicom import series_file

        p = series_file(p)
    if p.is_file() and p.stat().st_size == 0:
        raise SlideError(f"{p}: the file is empty (0 bytes); re-copy or re-export the slide")
    if verify and p.suffix.lower() in (".tif", ".tiff"):
        from wsi_pipeline.io.ownership import own_output_of

        if ours := own_output_of(p):  # scored as a slide, it asked for --mpp: advice that would mislead
            err = SlideError(f"{p}: {ours}, not a slide; score the scanned slide itself")
            err.whole_file = True  # no copy in progress explains it
            raise err
    big_tiff = p.suffix.lower() in TIFFSLIDE_FIRST and p.is_file() and p.stat().st_size >= TIFFSLIDE_MIN_BYTES
    first = ["tiffslide", "openslide"] if big_tiff else ["openslide", "tiffslide"]
    if p.suffix.lower() == ".dcm":  # tiffslide reads TIFF only
        first = ["openslide"]
    order = first if backend == "auto" else [backend]
    failures: list[str] = []
    for name in order:
        with _quiet_tifffile():
            try:
                reader = _open_with(name, str(p))
            except SlideError as exc:
                failures.append(f"{name}: {exc.args[0].split(': ', 1)[-1]}")
                continue
            try:
                _check_header(reader)  # opened but unusable: say why, do not try another reader
                if verify:
                    _check_tiff_extent(reader.path)
                    # Decode one pixel now: an unknown compression or corrupt first tile is "unreadable"
                    # (exit 3) before any question about its resolution is asked.
                    reader.read_region((0, 0), 0, (1, 1))
                if isinstance(reader, _LibrarySlide) and reader.backend == "tiffslide":
                    reader.use_tiff_tiles()  # the same codecs as tiffslide's, without its zarr store
            except SlideError:
                reader.close()
                raise
            except Exception as exc:  # a reader library's own exception on a corrupt file
                reader.close()
                raise SlideError(
                    f"{p}: cannot read the slide's structure ({type(exc).__name__}: {exc}); the file is "
                    "truncated or corrupt: re-copy or re-export it"
                ) from exc
        return reader
    detail = "; ".join(failures)
    if p.suffix.lower() == ".dcm":  # a DICOM file OpenSlide detects but cannot place in a slide's pyramid
        raise SlideError(
            f"{p}: cannot open as a DICOM whole-slide image ({detail}); OpenSlide reads a slide from a "
            "conforming VL Whole Slide Microscopy series (ImageType, TILED_FULL or per-frame positions, "
            "its levels beside it): export the slide again from the scanner or PACS as a complete series, or "
            "re-copy it if the copy was cut short"
        )
    other = " or try --backend tiffslide" if backend == "openslide" else ""
    raise SlideError(
        f"{p}: cannot open as a whole-slide image ({detail}); check it is a complete .svs/.tif/.ndpi/"
        f".mrxs/.dcm slide (not truncated){other}"
    )


def _open_with(name: str, path: str) -> SlideReader:
    try:
        if name == "openslide":
            import openslide

            return _LibrarySlide(path, "openslide", openslide.OpenSlide(path), "openslide")
        import tiffslide

        ts = tiffslide.TiffSlide(path)
        # tiffslide parses lazily: a truncated or corrupt file fails here (IndexError, KeyError, ...)
        # instead of on the first property access far from this error handling.
        _ = ts.properties, ts.level_dimensions
        return _LibrarySlide(path, "tiffslide", ts, "tiffslide")
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlideError(f"{path}: {type(exc).__name__}: {msg}") from exc


@contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """Hold back tifffile's log output while a slide is opened and checked.

    tifffile logs structural problems (e.g. a directory offset past the end of a truncated file) and
    carries on; :func:`_check_tiff_extent` turns the ones that matter into one :class:`SlideError`,
    so the user sees one line naming the file instead of library log lines.
    """
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


#: Suffixes whose files are plain TIFF containers checked by :func:`_check_tiff_extent`.
TIFF_SUFFIXES = (".svs", ".tif", ".tiff")


def _check_tiff_extent(path: str) -> None:
    """Refuse a TIFF whose directories or image data point past the end of the file (truncated).

    Readers may open such a file (tiffslide keeps the pages before the cut and drops the rest of the
    pyramid), so the slide would be scored from what survived. Other formats are not checked.
    """
    p = Path(path)
    if p.suffix.lower() not in TIFF_SUFFIXES or not p.is_file():
        return
    import tifffile

    size = p.stat().st_size
    try:
        with tifffile.TiffFile(p) as tf:
            chain = list(tf.pages)  # every directory tifffile could reach; it stops at a bad offset
            pages = {
                pg.offset: pg
                for pg in chain + [pg for s in tf.series for lv in s.levels for pg in lv.pages]
                if isinstance(pg, tifffile.TiffPage)
            }
            data_end = 0
            short = next((pg for pg in pages.values() if len(pg.dataoffsets) < _blocks_expected(pg)), None)
            for pg in pages.values():
                n = min(len(pg.dataoffsets), len(pg.databytecounts))
                if n:
                    ends = np.asarray(pg.dataoffsets[:n], np.int64)
                    ends += np.asarray(pg.databytecounts[:n], np.int64)
                    data_end = max(data_end, int(ends.max()))
            next_ifd = _next_ifd_offset(tf, chain[-1].offset) if chain else 0
    except Exception:  # unreadable structure: leave it to the reader that opened it
        return
    if short is not None:  # before anything allocates or loops over the claimed size
        raise SlideError(
            f"{path}: the TIFF header claims {short.imagewidth} x {short.imagelength} px but the file holds "
            f"{len(short.dataoffsets)} of the {_blocks_expected(short)} tiles or strips that needs; the "
            "file is corrupt or not a real slide: re-export it"
        )
    if data_end > size or next_ifd >= size:
        beyond = max(data_end, next_ifd)
        raise SlideError(
            f"{path}: the file is truncated ({size} bytes, but its TIFF structure refers to offset "
            f"{beyond}); re-copy or re-export the slide"
        )


def _blocks_expected(pg: Any) -> int:
    """Tiles (or strips) a TIFF page of its claimed size must list."""
    planes = int(pg.samplesperpixel) if int(pg.planarconfig) == 2 else 1
    if pg.is_tiled:
        tw, tl, td = int(pg.tilewidth), int(pg.tilelength), max(1, int(getattr(pg, "tiledepth", 1) or 1))
        per = (
            -(-int(pg.imagewidth) // tw)
            * -(-int(pg.imagelength) // tl)
            * -(-max(1, int(pg.imagedepth)) // td)
        )
        return per * planes
    rows = int(pg.rowsperstrip) or int(pg.imagelength)
    return -(-int(pg.imagelength) // max(1, rows)) * planes


def missing_tiles_l0(reader: SlideReader, level: int) -> np.ndarray:
    """Level-0 boxes (k, 4) x0, y0, x1, y1 of the TIFF tiles of ``level`` the file does not hold.

    A tile whose byte count (or offset) is 0 has no pixels: OpenSlide renders it transparent (white
    once composited), tiffslide black. Scanners leave out empty background tiles on purpose, so the
    caller decides whether the missing tiles matter (see ``tiler.check_missing_tiles``). Only TIFF
    files (.svs/.tif/.tiff) are inspected; anything else returns no boxes.
    """
    none = np.zeros((0, 4), np.float64)
    p = Path(reader.path)
    if p.suffix.lower() not in TIFF_SUFFIXES or not p.is_file():
        return none
    import tifffile

    w, h = reader.level_dimensions[level]
    ds = reader.level_downsamples[level]
    try:
        with _quiet_tifffile(), tifffile.TiffFile(p) as tf:
            pages = [pg for s in tf.series for lv in s.levels for pg in lv.pages] + list(tf.pages)
            page = next(
                (
                    pg
                    for pg in pages
                    if isinstance(pg, tifffile.TiffPage)
                    and pg.is_tiled
                    and (pg.imagewidth, pg.imagelength) == (w, h)
                ),
                None,
            )
            if page is None:
                return none
            tw, th = int(page.tilewidth), int(page.tilelength)
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
    except Exception:  # unreadable structure: nothing to say about missing tiles
        return none
    across, down = -(-w // tw), -(-h // th)
    n = across * down
    if len(counts) < n:
        return none  # planar or unusual layouts: not inspected
    missing = np.flatnonzero((counts[:n] == 0) | (offsets[:n] == 0))
    rows, cols = np.divmod(missing, across)
    x0, y0 = cols * tw, rows * th
    x1, y1 = np.minimum(x0 + tw, w), np.minimum(y0 + th, h)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float64) * ds


def _next_ifd_offset(tf: Any, ifd_offset: int) -> int:
    """The 'next directory' offset stored at the end of the TIFF directory at ``ifd_offset``."""
    count_fmt, entry_bytes, next_fmt = ("Q", 20, "Q") if tf.is_bigtiff else ("H", 12, "I")
    fh = tf.filehandle
    fh.seek(ifd_offset)
    (n_tags,) = struct.unpack(tf.byteorder + count_fmt, fh.read(struct.calcsize(count_fmt)))
    fh.seek(ifd_offset + struct.calcsize(count_fmt) + n_tags * entry_bytes)
    raw = fh.read(struct.calcsize(next_fmt))
    if len(raw) < struct.calcsize(next_fmt):  # the directory itself is cut off
        return int(fh.size) + 1
    return int(struct.unpack(tf.byteorder + next_fmt, raw)[0])


def _check_header(reader: SlideReader) -> None:
    """Refuse structures the pipeline cannot use before any tile is written."""
    dims = reader.level_dimensions
    if not dims or any(w <= 0 or h <= 0 for w, h in dims):
        raise SlideError(f"{reader.path}: the slide reports empty levels {dims}")
    axes = reader.properties.get("tiffslide.series-axes")
    if axes and not axes.endswith("S"):
        raise SlideError(
            f"{reader.path}: the image has axes {axes} ("
            f"{'grayscale' if axes == 'YX' else 'separate channels, e.g. multiplex fluorescence'}), "
            f"not RGB; only brightfield RGB slides (H&E) are supported"
        )
    w0, h0 = dims[0]
    if w0 * h0 > 10**12:
        raise SlideError(f"{reader.path}: implausible dimensions {w0}x{h0}; the header is corrupt")


@dataclass(frozen=True)
class Resolution:
    """Level-0 resolution in micrometres per pixel, and where it came from."""

    mpp_x: float
    mpp_y: float
    source: str  # "override" | "metadata"
    metadata_mpp: float | None = None  # with an override: the slide's own (plausible) mpp, if it has one

    @property
    def mpp(self) -> float:
        """Mean of x and y (what level choice and tile sizes use)."""
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def override_conflict(self) -> str | None:
        """A warning when an override differs from the slide's own metadata by more than 10 %: a
        ``--mpp`` meant for the slides without metadata of a folder scales the others' tiles wrongly."""
        if self.source != "override" or self.metadata_mpp is None:
            return None
        ratio = self.mpp / self.metadata_mpp
        if abs(ratio - 1.0) <= OVERRIDE_CONFLICT:
            return None
        return (
            f"--mpp {self.mpp:g} overrides the slide's own {self.metadata_mpp:.4g} um/px ({ratio:.2g}x): if "
            "the metadata is right, its tiles are cut at the wrong scale (a folder's slides without mpp: "
            "give theirs in a CSV manifest's mpp column instead)"
        )

    def conflict_record(self) -> dict[str, Any]:
        """For a manifest's ``resolution``: the slide's own mpp and the warning, where
        :attr:`override_conflict` has one; else nothing."""
        warning = self.override_conflict
        return {"metadata_mpp": self.metadata_mpp, "override_warning": warning} if warning else {}


#: relative difference between ``--mpp`` and a slide's metadata above which the run warns
OVERRIDE_CONFLICT = 0.1


def resolve_mpp(reader: SlideReader, override: float | None = None) -> Resolution:
    """Effective level-0 mpp: explicit ``override`` > slide metadata > :class:`ResolutionError`."""
    lo, hi = PLAUSIBLE_MPP
    given = [v for v in reader.metadata_mpp() if v is not None]
    if override is not None:
        if not (math.isfinite(override) and lo <= override <= hi):
            raise ResolutionError(
                f"{reader.path}: --mpp {override} is outside the plausible range {lo}-{hi} um/px"
            )
        own = sum(given) / len(given) if given else None  # kept to warn where the override contradicts it
        return Resolution(
            float(override), float(override), "override", own if own and lo <= own <= hi else None
        )
    if not given:
        raise ResolutionError(f"{reader.path}: the slide has no resolution metadata; {MPP_OVERRIDE_HINT}")
    mx, my = (given[0], given[-1])  # one axis given: use it for both
    if not (lo <= mx <= hi and lo <= my <= hi):
        raise ResolutionError(
            f"{reader.path}: metadata claims {mx:.4g} x {my:.4g} um/px, which no scanner produces "
            f"(likely a default DPI tag); {MPP_OVERRIDE_HINT}"
        )
    return Resolution(mx, my, "metadata")


@dataclass(frozen=True)
class LevelChoice:
    """How to obtain pixels at a target resolution.

    Read ``level`` (whose resolution is ``level_mpp`` um/px) and scale by ``scale`` (output pixels per
    level pixel; 1.0 means no resize). ``effective_mpp`` is the resolution of the delivered pixels.
    """

    level: int
    level_mpp: float
    scale: float
    effective_mpp: float


def choose_level(
    level_downsamples: Sequence[float], mpp_l0: float, target_mpp: float, *, tolerance: float = 0.1
) -> LevelChoice:
    """Pick the coarsest level not coarser than ``target_mpp`` (within ``tolerance``, relative).

    A level within ``tolerance`` of the target is used as is (no resize; the effective mpp is the
    level's). Otherwise the finest-enough level is read and downscaled; a target finer than level 0
    beyond tolerance is upscaled from level 0.
    """
    if target_mpp <= 0 or mpp_l0 <= 0:
        raise ValueError("mpp values must be positive")
    level_mpps = [mpp_l0 * d for d in level_downsamples]
    # Levels close enough to use as they are: the closest one wins.
    close = [(abs(m - target_mpp) / target_mpp, i) for i, m in enumerate(level_mpps)]
    err, best = min(close)
    if err <= tolerance:
        return LevelChoice(best, level_mpps[best], 1.0, level_mpps[best])
    finer = [i for i, m in enumerate(level_mpps) if m <= target_mpp]
    level = max(finer, key=lambda i: level_mpps[i]) if finer else int(np.argmin(level_mpps))
    m = level_mpps[level]
    return LevelChoice(level, m, m / target_mpp, target_mpp)


def slide_fingerprint(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 20) -> str:
    """Cheap content fingerprint: sha256 over the size, the first and the last ``chunk_bytes``.

    Gigapixel slides are many GB, so hashing all of it on every run is too slow; this still changes
    when a file is replaced, truncated or re-exported. A folder (a DICOM slide) hashes the names and
    fingerprints of its ``.dcm`` files, so results written into the folder do not change it.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        from wsi_pipeline.io.dicom import dicom_files

        for f in dicom_files(p):
            h.update(os.fsencode(f"{f.name}:{slide_fingerprint(f, chunk_bytes=chunk_bytes)}\n"))
        return "dir-sha256:" + h.hexdigest()
    size = p.stat().st_size
    h.update(str(size).encode())
    with p.open("rb") as fh:
        h.update(fh.read(chunk_bytes))
        if size > chunk_bytes:
            fh.seek(max(size - chunk_bytes, chunk_bytes))
            h.update(fh.read(chunk_bytes))
    return "quick-sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Thumbnail:
    """A low-resolution RGB image of the whole slide.

    ``downsample`` is level-0 pixels per thumbnail pixel (the same in x and y), so thumbnail pixel
    (row, col) covers level-0 x in [col * downsample, (col + 1) * downsample).
    """

    image: np.ndarray  # (h, w, 3) uint8
    downsample: float
    mpp: float  # micrometres per thumbnail pixel


def read_thumbnail(
    reader: SlideReader, mpp_l0: float, *, target_mpp: float = 8.0, block_px: int = 2048
) -> Thumbnail:
    """Thumbnail at about ``target_mpp`` um/px, built in blocks so memory stays bounded.

    Reads the coarsest level not coarser than the target, ``block_px`` level pixels at a time, and
    box-averages each block by an integer factor; a slide with no small levels never has its full
    level 0 in memory.
    """
    first = read_thumbnails(reader, mpp_l0, [target_mpp], block_px=block_px)[0]
    assert first is not None  # the first target always sets the level
    return first


@contextmanager
def thread_handles(reader: SlideReader, workers: int) -> Iterator[Callable[[], SlideReader]]:
    """A function that gives the calling thread its handle of ``reader``'s slide: ``reader`` itself
    for one worker or an in-memory reader, else one handle per thread (opened without the file scan
    the first open made), closed when the block ends."""
    local = threading.local()
    lock = threading.Lock()
    opened: list[SlideReader] = []

    def handle() -> SlideReader:
        if workers <= 1 or reader.backend not in ("openslide", "tiffslide"):
            return reader
        r: SlideReader | None = getattr(local, "reader", None)
        if r is None:
            r = open_slide(reader.path, reader.backend, verify=False)
            local.reader = r
            with lock:
                opened.append(r)
        return r

    try:
        yield handle
    finally:
        for r in opened:
            r.close()


def thumbnail_level(reader: SlideReader, mpp_l0: float, target_mpp: float) -> int:
    """The level a thumbnail at ``target_mpp`` um/px is read from: the coarsest not coarser than it."""
    downs = reader.level_downsamples
    want = max(target_mpp / mpp_l0, 1.0)
    return max((i for i, d in enumerate(downs) if d <= want * 1.01), key=lambda i: downs[i], default=0)


def read_thumbnails(
    reader: SlideReader,
    mpp_l0: float,
    targets_mpp: Sequence[float],
    *,
    block_px: int = 2048,
    workers: int = 1,
) -> list[Thumbnail | None]:
    """Several thumbnails from one read of the slide: the first exactly as :func:`read_thumbnail`
    gives it at ``targets_mpp[0]`` um/px (its level and factor), each further one box-averaged from
    the same level pixels by its own integer factor, or None where that level is coarser than the
    target or the factors' common multiple exceeds ``block_px`` (read it on its own: blocks stay
    within ``block_px``). Each level pixel is decoded once for all of them.

    ``workers`` > 1 decode blocks of half that size on as many threads (:func:`thread_handles`; the
    decoders release the GIL): the same pixels, sooner, on a large single level. A TIFF level small
    enough to hold is decoded whole by tifffile instead when its pixels are the reader's
    (:func:`~wsi_pipeline.io.tiff_level.decode_level`).
    """
    downs = reader.level_downsamples
    wants = [max(t / mpp_l0, 1.0) for t in targets_mpp]
    level = thumbnail_level(reader, mpp_l0, targets_mpp[0])
    ds = downs[level]
    factors = [max(1, int(want / ds)) if i == 0 or ds <= want * 1.01 else 0 for i, want in enumerate(wants)]
    step = factors[0]  # blocks hold whole cells of every thumbnail: a multiple of every factor
    for i, f in enumerate(factors[1:], 1):
        if f and math.lcm(step, f) > max(block_px, factors[0]):
            factors[i] = 0  # its cells and the first's align only in blocks too large to read at once
        elif f:
            step = math.lcm(step, f)
    w, h = reader.level_dimensions[level]
    size = block_px // 2 if workers > 1 else block_px
    block = max(step, size // step * step)
    outs = [np.empty((-(-h // f), -(-w // f), 3), np.uint8) if f else None for f in factors]
    corners = [(x, y) for y in range(0, h, block) for x in range(0, w, block)]

    from wsi_pipeline.tiling.grid import level_to_l0  # tiling.grid imports this module

    # A small TIFF level decoded at once, 4x faster (through the module: tests switch it off there).
    whole = tiff_level.decode_level(reader, level, workers=workers)
    rule = read_rule(reader, level)[0]  # a level-0 location the reader maps back to level pixel (x, y)

    def read_block(r: SlideReader, x: int, y: int, bw: int = block) -> None:
        bw, bh = min(bw, w - x), min(block, h - y)
        if whole is not None:
            pixels = whole[y : y + bh, x : x + bw]
        else:
            lx, ly = (int(v) for v in level_to_l0(np.array([x, y]), ds, rule))
            pixels = r.read_region((lx, ly), level, (bw, bh))
        for f, out in zip(factors, outs, strict=True):
            if out is not None:  # each block fills its own cells of every thumbnail
                small = box_mean(pixels, f, pad=255)  # the slide's last partial block padded white
                out[y // f : y // f + small.shape[0], x // f : x // f + small.shape[1]] = small

    if whole is not None:  # rows of blocks across the whole width: a few large numpy calls, not many
        for y in range(0, h, block):  # small ones (each waits for the GIL while scipy imports)
            read_block(reader, 0, y, w)
    elif workers <= 1 or len(corners) < 2:
        for x, y in corners:
            read_block(reader, x, y)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with (
            thread_handles(reader, workers) as handle,
            ThreadPoolExecutor(min(workers, len(corners)), thread_name_prefix="wsi-thumb") as ex,
        ):
            for _ in ex.map(lambda c: read_block(handle(), *c), corners):
                pass
    return [
        Thumbnail(out, ds * f, mpp_l0 * ds * f) if out is not None else None
        for f, out in zip(factors, outs, strict=True)
    ]
