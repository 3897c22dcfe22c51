"""DICOM whole-slide images: which ``.dcm`` files make one slide.

A DICOM slide is a *series* (one SeriesInstanceUID) of several files: one per pyramid level, plus
label, overview and thumbnail images. OpenSlide opens the whole series from any one of its files and
finds the others in the same folder, so scoring every ``.dcm`` file of a folder would score the same
slide once per file. Files are grouped here by the SeriesInstanceUID of their headers (pydicom,
imported only when a folder holds ``.dcm`` files; pixels are never read here). A file whose header
cannot be read stays a slide of its own, so the reader reports it like any other bad slide.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from wsi_pipeline.errors import SlideError
from wsi_pipeline.io.formats import DICOM_SUFFIX, LISTED_SUFFIXES


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM slide: its files (sorted) and the one handed to the reader (a VOLUME image)."""

    uid: str  # SeriesInstanceUID, or the file name for a file whose header could not be read
    files: tuple[Path, ...]
    main: Path


def dicom_files(folder: Path) -> list[Path]:
    """The ``.dcm`` files directly inside ``folder`` (sorted, hidden files skipped)."""
    return sorted(p for p in list_folder(folder) if p.suffix.lower() == DICOM_SUFFIX and p.is_file())


def list_folder(folder: Path) -> list[Path]:
    """The entries of ``folder`` (hidden ones skipped); one error naming the folder when it cannot be
    listed (unreadable or vanished), so that its slides are never passed over in silence."""
    try:
        return [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise SlideError(
            f"{folder}: cannot list the folder ({exc.strerror or exc}); check its permissions"
        ) from exc


def _header(path: Path) -> tuple[str | None, int]:
    """(SeriesInstanceUID, size rank) of a DICOM file: the rank is the total pixel matrix area for a
    VOLUME image (the pyramid's levels), -1 for label, overview and thumbnail images; the UID is None
    when the header cannot be read. Read once per file version in a process (a folder run asks for a
    folder's series several times: is it one slide, which slides does it hold)."""
    try:
        st = path.stat()
    except OSError:
        return None, -1
    return _read_header(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4096)
def _read_header(path: str, mtime_ns: int, size: int) -> tuple[str | None, int]:
    import warnings

    import pydicom

    # Values are decoded (and validated) when read, so all of it is inside the block that silences
    # pydicom's warnings about scanners' quirks (over-long UIDs, ...): the reader copes or reports.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tags = ["SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"]
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            uid = str(ds.get("SeriesInstanceUID") or "") or None
            kind = [str(v).upper() for v in (ds.get("ImageType") or [])]
            area = int(ds.get("TotalPixelMatrixColumns") or 0) * int(ds.get("TotalPixelMatrixRows") or 0)
    except Exception:  # not DICOM, truncated, ...: the slide reader says what is wrong with it
        return None, -1
    return uid, (area if len(kind) < 3 or kind[2] == "VOLUME" else -1)


def group_series(files: list[Path]) -> list[DicomSeries]:
    """The DICOM slides among ``files`` (all in one folder, as OpenSlide needs), ordered by their
    first file; each names its largest VOLUME image as the file to open."""
    groups: dict[str, list[tuple[Path, int]]] = {}
    for f in sorted(files):
        uid, rank = _header(f)
        groups.setdefault(uid or f"unreadable:{f.name}", []).append((f, rank))
    out = []
    for uid, members in groups.items():
        main = max(members, key=lambda m: m[1])[0]  # ties: the first file (max keeps the first)
        out.append(DicomSeries(uid, tuple(f for f, _ in members), main))
    return sorted(out, key=lambda s: s.files[0])


def series_file(folder: Path) -> Path:
    """The file to open for the DICOM slide that ``folder`` holds (its ``.dcm`` files of one series).

    Raises :class:`SlideError` naming the folder when it holds no ``.dcm`` file or several series."""
    series = group_series(dicom_files(folder))
    if not series:
        raise SlideError(
            f"{folder}: a folder, not a slide file, and it holds no DICOM (.dcm) files; give a slide file "
            "(or a folder of slides as a batch)"
        )
    if len(series) > 1:
        raise SlideError(
            f"{folder}: holds {len(series)} DICOM series (slides), not one; score the folder as a batch or "
            f"give one of its files, e.g. {series[0].main.name}"
        )
    return series[0].main


def is_dicom_slide_folder(folder: Path) -> bool:
    """True when ``folder`` is one DICOM slide: ``.dcm`` files of a single series and no subfolder or
    other slide file that would make it a folder of slides."""
    if not folder.is_dir():
        return False
    entries = list_folder(folder)
    if any(p.is_dir() or (p.suffix.lower() in LISTED_SUFFIXES and p.suffix.lower() != DICOM_SUFFIX)
           for p in entries):  # fmt: skip
        return False
    files = [p for p in entries if p.suffix.lower() == DICOM_SUFFIX and p.is_file()]
    return bool(files) and len(group_series(files)) == 1
