"""Which existing files wsi-pipeline wrote: a run replaces its own results, never a user's file that
happens to have an output's name (a pathologist's ``case1.geojson`` beside ``case1.svs`` when the
results go into the slide folder, a ``report.html`` of the lab's own).

Every output carries a mark of this package where its format has room for one: TIFF descriptions,
a PNG text chunk, a ``generator`` member of JSON and GeoJSON, an HTML ``<meta name="generator">``, and
our own CSV headers. Files of older versions without the mark are recognised by the run manifest
that lists them (with their sha256 from this version on, so a file edited since is not replaced).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from wsi_pipeline.errors import OutputError

GENERATOR = "wsi-pipeline"
#: Marker in the first page's description of every TIFF this package writes. 2: probability map.
HEATMAP_MARKER = "wsi_pipeline_heatmap"
_HEAD_BYTES = 4096
_JSON_MAX_BYTES = 64 << 20  # run manifests and summaries are far smaller; larger is not ours
#: First columns of the CSVs this package writes (tile tables; folder summaries; evaluation tables)
_CSV_HEADERS = (b"x_l0,y_l0,width_l0,height_l0,", b"slide,status,", b"slide,truth,dice,")


def is_own_output(path: Path) -> bool:
    """True for a heatmap TIFF this package wrote (probability or colour map, also those of older
    versions, e.g. ``NAME.heatmap.tif``): its first page's description says so."""
    return HEATMAP_MARKER in _tiff_description(path)


def _tiff_description(path: Path) -> str:
    """The first page's description of a TIFF (``""`` for another file, or one tifffile cannot read:
    not ours; the slide reader reports it properly)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return ""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return (tif.pages.first.description if len(tif.pages) else "") or ""
    except Exception:
        return ""


def own_output_of(path: Path) -> str | None:
    """For a heatmap TIFF this package wrote (:func:`is_own_output`): what it is, naming its slide
    (``the probability map that wsi-pipeline wrote for case1.svs``); else None. One header read."""
    desc = _tiff_description(path)
    if HEATMAP_MARKER not in desc:
        return None
    try:
        meta = json.loads(desc)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):  # an older version's description: ours, but not a JSON object
        return "a heatmap that wsi-pipeline wrote"
    kind = {"probability": "probability map", "colour": "colour heatmap"}.get(
        str(meta.get("kind")), "heatmap"
    )
    slide = meta.get("slide")
    return f"the {kind} that wsi-pipeline wrote for {slide}" if slide else f"a {kind} that wsi-pipeline wrote"


def _head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_HEAD_BYTES)


def _json(path: Path) -> Any:
    if path.stat().st_size > _JSON_MAX_BYTES:
        return None
    try:
        return json.loads(path.read_bytes())
    except ValueError:
        return None


def _is_manifest(doc: Any) -> bool:
    return isinstance(doc, dict) and "package_version" in doc and isinstance(doc.get("outputs"), dict)


def has_mark(path: Path) -> bool:
    """True when ``path`` (an existing file) carries this package's mark (see the module's text)."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return is_own_output(path)
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return str(getattr(im, "text", {}).get("Software", "")).startswith(GENERATOR)
        if suffix == ".json":
            doc = _json(path)
            if not isinstance(doc, dict):
                return False
            # Before the mark: run manifests, folder summaries ({"slides": [...]} alone), tile reports
            # and cluster job records (argv + versions), evaluation results (summary + slides + errors)
            return (
                str(doc.get("generator", "")).startswith(GENERATOR)
                or _is_manifest(doc)
                or set(doc) == {"slides"}
                or {"argv", "versions"} <= set(doc)
                or {"summary", "slides", "errors"} <= set(doc)
            )
        head = _head(path)
        if suffix == ".geojson":
            return b'"generator":"' + GENERATOR.encode() in head
        if suffix == ".xml":  # the predicted regions as ASAP XML
            return b"<!-- generator: " + GENERATOR.encode() in head
        if suffix == ".csv":
            return head.startswith(_CSV_HEADERS)
        if suffix in (".html", ".htm"):
            return (
                b'<meta name="generator" content="' + GENERATOR.encode() in head
                or b"<title>wsi-pipeline results" in head  # folder reports of versions before the mark
            )
    except (OSError, ValueError):
        return False
    return False


def _recorded(manifest: Path | None) -> dict[Path, str | None]:
    """The outputs our run manifest lists, each with its recorded sha256 (None: an older manifest
    recorded none); empty when ``manifest`` is missing or not ours. An output with a checksum is
    looked for beside the manifest, where the run wrote it, also after the results folder was moved
    or copied (the checksum proves it); one without, only at the path recorded."""
    if manifest is None or not manifest.is_file():
        return {}
    doc = _json(manifest)
    if not _is_manifest(doc):
        return {}
    sums = doc.get("output_sha256") or {}
    return {
        (manifest.parent / Path(v).name if sums.get(k) else Path(v)).resolve(): sums.get(k)
        for k, v in doc["outputs"].items()
        if k != "manifest"
    }


def refuse_foreign_files(paths: Iterable[Path], *, manifest: Path | None = None) -> None:
    """Raise :class:`OutputError` naming the first of ``paths`` that exists as a file this package
    did not write, before anything is written. A file is ours when ``manifest`` (our run manifest)
    lists it with the sha256 it has now (or, from versions that recorded none, lists it), or when it
    carries our mark; the manifest is asked first, as hashing a few MB costs less than opening each
    format's reader."""
    from wsi_pipeline.provenance import file_sha256

    recorded = _recorded(manifest)
    for p in paths:
        if not p.is_file():
            continue
        key = p.resolve()
        if key in recorded and (recorded[key] is None or recorded[key] == file_sha256(p)):
            continue
        if not has_mark(p):
            raise OutputError(
                f"{p}: already exists and was not written by wsi-pipeline (or was changed since); it is left "
                "alone: move or rename it, or choose another --out"
            )
