"""Batches of slides: find them (folder or CSV manifest), run a function on each, carry on past bad
ones, and write a summary (CSV + JSON) that says what happened to every slide."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from wsi_pipeline import __version__
from wsi_pipeline.aggregate import area_share
from wsi_pipeline.errors import BusyError, SlideError, WsiError
from wsi_pipeline.io.dicom import dicom_files, group_series, is_dicom_slide_folder, list_folder
from wsi_pipeline.io.formats import DICOM_SUFFIX, LISTED_SUFFIXES, SLIDE_SUFFIXES
from wsi_pipeline.io.ownership import GENERATOR, is_own_output, refuse_foreign_files
from wsi_pipeline.provenance import (
    MAX_NAME_BYTES,
    atomic_write_bytes,
    atomic_write_json,
    input_files,
    model_name,
    name_bytes,
    output_error,
    valid_text,
)


@dataclass(frozen=True)
class BatchItem:
    """One slide of a batch, with its per-slide level-0 mpp override (micrometres per pixel) and its
    region file (a CSV manifest's ``regions`` column: only the tissue inside it is scored) if any."""

    slide: Path
    mpp: float | None = None
    #: the lines of a CSV manifest that list this slide (more than one: listed again, scored once)
    lines: tuple[int, ...] = field(default=(), compare=False)
    regions: Path | None = None


def find_slides(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The slides inside ``folder`` (sorted; hidden files and this package's own heatmap TIFFs
    skipped, so a folder run whose --out is the input folder does not score its own outputs). Files of
    whole-slide formats that no reader here opens are listed too, so that the run reports each of them
    (``io.formats``) instead of passing over it.

    DICOM slides are series of several ``.dcm`` files (:mod:`wsi_pipeline.io.dicom`): each series in
    ``folder`` is one slide, given as its main file, and so is each series in a subfolder, given as the
    subfolder when it holds that one series (the usual export: a folder per slide) and as its main file
    when it holds several.

    ``recursive``: every subfolder at any depth, as ``folder`` itself, except hidden ones, tile stores
    (``*.zarr``), MIRAX data folders (``X/`` beside ``X.mrxs``) and folders that are one DICOM slide."""
    slides, subfolders = _slides_in(folder)
    seen = {folder.resolve()}
    while subfolders:
        sub = subfolders.pop(0)
        try:
            if not recursive:
                series = group_series(dicom_files(sub))
                slides += [sub] if len(series) == 1 else [s.main for s in series]
            elif is_dicom_slide_folder(sub):
                slides.append(sub)
            elif sub.resolve() not in seen:  # a link back up the tree is walked once
                seen.add(sub.resolve())
                found, deeper = _slides_in(sub)
                slides += found
                subfolders += deeper
        except SlideError:  # cannot be listed: an item of its own, whose run fails naming it
            slides.append(sub)
    return sorted(slides)


def _slides_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """The slide files (DICOM: each series' main file) directly in ``folder``, and its subfolders that
    may hold slides (not hidden, not tile stores or MIRAX data folders)."""
    entries = sorted(list_folder(folder))
    slides = _slide_files(entries)
    slides += [
        s.main for s in group_series([p for p in entries if p.suffix.lower() == DICOM_SUFFIX and p.is_file()])
    ]
    mirax = {p.with_suffix("") for p in entries if p.suffix.lower() == ".mrxs"}
    subfolders = [p for p in entries if p.is_dir() and p.suffix.lower() != ".zarr" and p not in mirax]
    return slides, subfolders


def _slide_files(entries: Sequence[Path]) -> list[Path]:
    """The slide files of a folder's ``entries`` other than DICOM (whose files group into series),
    with links to slides that are gone: each fails, named, instead of vanishing from the run."""
    return [
        p for p in entries
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and p.suffix.lower() in LISTED_SUFFIXES and p.suffix.lower() != DICOM_SUFFIX and not is_own_output(p)
    ]  # fmt: skip


def output_stems(items: Sequence[BatchItem], out: Path | None = None) -> list[str]:
    """A distinct output name per slide: the file stem (``case1``) where it is unique in the batch,
    else the file name (``case1.svs``, ``case1.tif``), else the path from the slides' common folder
    with ``/`` written as ``__`` (``sub1__s.svs``, ``sub2__s.svs``), so no slide overwrites another's
    results and each resumes on its own.

    With ``out`` (the results folder of a scoring run) a name whose outputs (:func:`heatmap_path`
    and the files beside it) would be one of the batch's slides is passed over for the next one:
    ``case1.tif`` scored into its own folder is named ``case1.tif`` (``case1.tif.tif``, ...), never
    ``case1`` (whose ``case1.tif`` is the slide)."""
    # Names near the file systems' limit shortened first (distinct names stay distinct, equal ones equal)
    stems = [fit_name(it.slide.stem) for it in items]
    names = [fit_name(it.slide.name) for it in items]
    resolved = [it.slide.resolve() for it in items]
    common = Path(os.path.commonpath([str(r.parent) for r in resolved])) if resolved else Path()
    inputs = {f.resolve() for it in items for f in input_files(it.slide)} if out is not None else set()
    out_r = out.resolve() if out is not None else None

    def collides(name: str) -> bool:
        if out is None or out_r is None:
            return False
        from wsi_pipeline.pipeline import output_paths

        for p in output_paths(heatmap_path(out_r, name)).values():
            if (p.resolve() if p.is_symlink() else p) in inputs:
                return True
        return False

    by_path = [fit_name("__".join(r.relative_to(common).parts)) for r in resolved]

    def count(names: list[str]) -> Counter[str]:  # once, not per slide: 20,000 slides took 12 s before
        return Counter(n.casefold() for n in names)

    # Unique ignoring case: results folders on Windows and macOS shares are case-insensitive, where
    # Case1.* and case1.* would be one set of files.
    n_stems, n_names = count(stems), count(names)
    chosen = []
    for stem, name, path_name in zip(stems, names, by_path, strict=True):
        unique = [
            c for c, n in ((stem, n_stems[stem.casefold()]), (name, n_names[name.casefold()])) if n == 1
        ]
        chosen.append(next((c for c in unique if not collides(c)), path_name))
    n_chosen = count(chosen)
    final = [c if n_chosen[c.casefold()] == 1 else p for c, p in zip(chosen, by_path, strict=True)]
    n_final = count(final)
    return [  # paths that differ in case only: told apart by a hash of the path
        f if n_final[f.casefold()] == 1 else fit_name(f"{f}~{hashlib.sha256(os.fsencode(r)).hexdigest()[:8]}")
        for f, r in zip(final, resolved, strict=True)
    ]


#: Longest output name (bytes) a folder run gives a slide: room for the longest suffix put after it
#: (``.tile-report.json``, ``.zarr.old-PID``) within :data:`~wsi_pipeline.provenance.MAX_NAME_BYTES`.
MAX_STEM_BYTES = MAX_NAME_BYTES - 24


def fit_name(name: str, limit: int = MAX_STEM_BYTES) -> str:
    """``name``, or where it is longer than ``limit`` bytes its start and ``~`` and 8 hex digits of
    its hash (distinct names stay distinct): a slide whose file name is near the file system's limit
    of 255 bytes gets outputs that can be written (``NAME.report.html`` would not be)."""
    if name_bytes(name) <= limit:
        return name
    tag = "~" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    head = os.fsencode(name)[: limit - len(tag)]
    return head.decode("utf-8", "ignore").rstrip() + tag  # a character cut in two is dropped


def heatmap_path(out: Path, name: str) -> Path:
    """The probability map of the slide named ``name`` (:func:`output_stems`) in results folder ``out``:
    ``out/NAME.tif``, its other outputs beside it (``wsi_pipeline.pipeline.output_paths``). The same
    rule as a single run with ``--out NAME.tif``."""
    return out / f"{name}.tif"


def result_row(manifest: dict[str, Any], out: Path, heatmap: Path | None = None) -> dict[str, Any]:
    """The summary row of one finished (or skipped) slide, with its report and overlay picture
    relative to ``out``.

    ``heatmap``: the slide's probability map now; its report is beside it (the manifest's recorded
    path is where the run wrote it, which a moved or copied results folder no longer is)."""
    m = manifest
    ev = m["label"]["evidence"]
    ood = m["label"].get("ood") or {}
    focus = m["label"].get("focus") or {}
    pos = m["model"]["positive_class"]

    def href(key: str) -> str | None:
        path = m.get("outputs", {}).get(key)
        if not path:
            return None
        if heatmap is not None:
            path = str(heatmap.parent / Path(path).name)
        try:
            return os.path.relpath(path, out).replace(os.sep, "/")
        except ValueError:  # another drive (Windows)
            return Path(path).as_uri()

    return {
        "status": _status(m), "label": m["label"]["label"],
        "positive": bool(m["label"]["positive"]), "positive_class": pos,
        "area_mm2": ev.get(f"{pos}_area_mm2"),
        "area_share": _area_share(ev, pos),
        "regions": (ev.get("regions") or {}).get("count"),
        "greatest_dimension_mm": (ev.get("regions") or {}).get("greatest_dimension_mm"),
        "n_tiles": m["n_tiles"], "max_p": ev["max_p"], "ood_score": ood.get("score"),
        "ood_warning": bool(ood.get("warning")),
        "out_of_focus": focus.get("share_out_of_focus"), "focus_warning": bool(focus.get("warning")),
        "stain_warning": bool((m["label"].get("stain") or {}).get("warning")),
        "pen_mm2": (m.get("tissue") or {}).get("pen_marks_mm2"),
        "pen_warning": bool((ev.get("pen") or {}).get("warning")),
        "mpp": (m.get("resolution") or {}).get("mpp_x"),
        "mpp_source": (m.get("resolution") or {}).get("mpp_source"),
        "mpp_warning": bool((m.get("resolution") or {}).get("override_warning")),
        "seconds": m["seconds"],
        "model": model_name(m),
        "model_sha256": m["model"].get("sha256"),
        "report": href("report"), "overlay": href("overlay"),
    }  # fmt: skip


def _area_share(evidence: dict[str, Any], pos: str) -> float | None:
    """The positive share of the tissue scored; derived for manifests written before it was recorded."""
    if (share := evidence.get(f"{pos}_share_of_tissue")) is not None:
        return float(share)
    area, tissue = evidence.get(f"{pos}_area_mm2"), evidence.get("tissue_area_mm2")
    return None if area is None or tissue is None else round(area_share(area, tissue), 4)


def _status(manifest: dict[str, Any]) -> str:
    if manifest.get("done_by_other_run"):
        return "done by another run"
    return "skipped (done)" if manifest.get("skipped") else "ok"


def labels_text(rows: Sequence[dict[str, Any]]) -> str:
    """``; 2 tumour, 5 no tumour (3 with an OOD warning)`` over the rows with a slide label (scored
    now or done before); nothing for rows without (tiling)."""
    labels = totals(rows).get("labels")
    if not labels:
        return ""
    pos = next((r["positive_class"] for r in rows if r.get("positive_class")), "positive")
    warnings = (
        ("ood_warning", "with an OOD warning"),
        ("focus_warning", "out of focus"),
        ("stain_warning", "normalized for a raw-colour model"),
    )
    notes = [f"{n} {what}" for key, what in warnings if (n := labels.get(key))]
    warned = f" ({', '.join(notes)}: review by eye)" if notes else ""
    return f"; {labels['positive']} {pos}, {labels['negative']} no {pos}{warned}"


def write_folder_report(out: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``out/report.html``: one sortable row per slide (label, area, max P, OOD, ...) linking to each
    slide's ``NAME.report.html``; failed slides with their error."""
    from wsi_pipeline.io.report import write_folder_report as write_page

    return write_page(out / "report.html", rows, title=f"wsi-pipeline results: {out.name or out}")


def read_manifest_csv(path: Path) -> list[BatchItem]:
    """Rows of a CSV with a ``slide`` column (relative paths are relative to the CSV) and optional
    ``mpp`` (per-slide override) and ``regions`` (the slide's region file, ``--regions``) columns. As
    spreadsheets save it: a byte-order mark, headers in any case, and separated by commas, semicolons
    (Excel where the decimal mark is a comma, whose ``0,499`` is read as 0.499) or tabs, in UTF-8 or
    (Excel's plain "CSV" on Windows) Windows-1252."""
    try:  # utf-8-sig: Excel writes a byte-order mark before the header
        data = path.read_bytes()
    except OSError as exc:
        raise WsiError(f"{path}: cannot read the manifest ({exc})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:  # Excel's plain "CSV" on Windows: the ANSI code page, not UTF-8
        text = data.decode("cp1252", errors="replace")
    first = next((line for line in text.splitlines() if line.strip()), "")

    def names(d: str) -> list[str]:
        return [h.strip().lower() for h in next(csv.reader([first], delimiter=d), [])]

    # the one that finds a 'slide' column, else (for the error) the one that splits the line most
    delimiter = next((d for d in (",", ";", "\t") if "slide" in names(d)), None) or max(
        (",", ";", "\t"), key=lambda d: len(names(d))
    )
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = [(reader.line_num, r) for r in reader]
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if "slide" not in header:
        found = ", ".join(repr(h) for h in header) or "none"
        raise WsiError(
            f"{path}: the manifest needs a header with a 'slide' column (and optionally 'mpp'); "
            f"its first line has the columns {found}"
        )
    out: dict[Path, BatchItem] = {}  # by the file each line names: a slide listed twice is scored once
    for i, raw in rows:
        r = {(k or "").strip().lower(): (v or "") for k, v in raw.items()}
        if not any(str(v).strip() for v in r.values()):
            continue  # blank or whitespace-only line
        if not r["slide"].strip():
            raise WsiError(f"{path}: line {i}: empty 'slide' cell; fill it in or delete the line")
        p = _manifest_path(path.parent, r["slide"].strip())
        mpp = (r.get("mpp") or "").strip()
        if delimiter != ",":
            mpp = mpp.replace(",", ".")  # a decimal comma
        cell = (r.get("regions") or "").strip()
        regions = _manifest_path(path.parent, cell) if cell else None
        try:
            item = BatchItem(p, float(mpp) if mpp else None, (i,), regions)
        except ValueError:
            raise WsiError(f"{path}: line {i}: mpp {mpp!r} is not a number") from None
        key = item.slide.resolve()
        if (seen := out.get(key)) is None:
            out[key] = item
        elif seen.mpp != item.mpp or seen.regions != item.regions:
            what, a, b = (
                ("mpp", seen.mpp, item.mpp)
                if seen.mpp != item.mpp
                else ("regions", seen.regions, item.regions)
            )
            raise WsiError(
                f"{path}: lines {seen.lines[0]} and {i} list {item.slide.name} with different {what} "
                f"({a or 'none'} and {b or 'none'}); keep the line with the right one"
            )
        else:
            out[key] = replace(seen, lines=(*seen.lines, i))
    return list(out.values())


def _manifest_path(folder: Path, cell: str) -> Path:
    """A manifest's ``slide`` cell as a path: relative ones are relative to the CSV's ``folder``. Written
    on Windows (``sub\\a.svs``) and read here, the backslashes are folder separators where the file
    exists that way; a Windows drive or share path (``C:\\...``, ``\\\\server\\...``) is kept as it
    is, for the slide's error to say so (:func:`~wsi_pipeline.io.slide.open_slide`)."""
    from pathlib import PureWindowsPath

    if os.name != "nt" and "\\" in cell:
        if PureWindowsPath(cell).drive:
            return Path(cell)
        literal, slashed = folder / cell, folder / cell.replace("\\", "/")
        if not literal.exists() and slashed.exists():
            return slashed
    p = Path(cell)
    return p if p.is_absolute() else folder / p


def repeated_lines(src: Path, items: Sequence[BatchItem]) -> list[str]:
    """A line for each slide that a manifest ``src`` lists more than once (it is scored once)."""
    return [
        f"{src.name}: {it.slide.name} is listed on lines {', '.join(map(str, it.lines))}; taken once"
        for it in items
        if len(it.lines) > 1
    ]


def slides_one_level_down(folder: Path) -> list[Path]:
    """Slide files directly in ``folder``'s subfolders (not hidden, tile stores or MIRAX data folders)
    other than DICOM, which a folder run without ``--recursive`` does not score; sorted. One level
    only, like the DICOM search of such a run, so a deep archive costs no more to list."""
    try:
        _, subfolders = _slides_in(folder)
    except SlideError:
        return []
    found: list[Path] = []
    for sub in subfolders:
        if sub.name.startswith("."):
            continue
        try:
            found += _slide_files(list_folder(sub))  # no DICOM headers read: those are scored anyway
        except SlideError:  # reported by the run itself where it matters
            continue
    return sorted(found)


def _not_searched(folder: Path) -> str | None:
    """'its subfolders hold N slide files (e.g. ...): --recursive scores them', or None."""
    below = slides_one_level_down(folder)
    if not below:
        return None
    files = "slide file" if len(below) == 1 else "slide files"
    example = below[0].relative_to(folder)
    return f"its subfolders hold {len(below)} {files} (e.g. {example}): --recursive scores them"


def batch_notes(src: Path, items: Sequence[BatchItem], *, recursive: bool = False) -> list[str]:
    """Notes for the start of a folder or manifest run: each slide a manifest lists more than once
    (:func:`repeated_lines`) and, for a folder run without ``recursive``, the slide files in its
    subfolders that it leaves alone."""
    notes = repeated_lines(src, items)
    if not recursive and src.is_dir() and not is_dicom_slide_folder(src):
        hint = _not_searched(src)
        if hint:
            notes.append(f"{src}: only the slides directly in it are scored; {hint}")
    return notes


def batch_items(src: Path, *, recursive: bool = False) -> list[BatchItem]:
    """The slides of a folder (``recursive``: and of its subfolders, see :func:`find_slides`) or a CSV
    manifest; an empty batch is an error naming the source."""
    if src.suffix.lower() == ".csv":
        items = read_manifest_csv(src)
    elif is_dicom_slide_folder(src):  # one DICOM slide: a batch of one
        items = [BatchItem(src)]
    else:
        items = [BatchItem(p) for p in find_slides(src, recursive=recursive)]
    if not items:
        hint = None if recursive or not src.is_dir() else _not_searched(src)
        where = (
            "in it or its subfolders"
            if recursive
            else f"in it; {hint}"
            if hint
            else "in it (nor DICOM slides in its subfolders; --recursive searches all)"
        )
        raise WsiError(f"{src}: no slide files ({', '.join(SLIDE_SUFFIXES)}) {where}")
    return items


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> bytes:
    """CSV bytes of ``rows`` (dicts), columns in the order given or of the first row."""
    buf = io.StringIO()
    cols = list(columns or (rows[0] if rows else []))
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return valid_text(buf.getvalue()).encode()


@dataclass(frozen=True)
class BatchResult:
    rows: list[dict[str, Any]]
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]


def run_batch(
    items: Sequence[BatchItem],
    process: Callable[[BatchItem], dict[str, Any] | Future[dict[str, Any]]],
    *,
    out: Path,
    summary_name: str,
    stop_on_error: bool = False,
    on_start: Callable[[int, int, BatchItem], None] | None = None,
    on_error: Callable[[BatchItem, WsiError], None] | None = None,
    also_writes: Sequence[Path] = (),
    retry_busy: Callable[[BatchItem, BusyError], dict[str, Any] | Future[dict[str, Any]]] | None = None,
    on_busy: Callable[[BatchItem, BusyError], None] | None = None,
    summary_every_s: float | None = None,
    on_summary: Callable[[list[dict[str, Any]]], object] | None = None,
    meta: dict[str, Any] | None = None,
    drain: Callable[[], Mapping[BatchItem, dict[str, Any]]] | None = None,
) -> BatchResult:
    """Run ``process`` on every item; a :class:`WsiError` marks the item failed and the batch goes on
    (unless ``stop_on_error``). Writes ``<summary_name>.csv`` and ``.json`` into ``out``; those and
    ``also_writes`` (e.g. the folder's ``report.html``) are checked first: a file of the same name that
    this package did not write stops the batch before any slide (:mod:`wsi_pipeline.io.ownership`).

    ``process`` may return a future of its row (a slide's outputs being written on another thread):
    it is settled after the next item's ``process`` returns, so that work overlaps the next item, and
    its error counts for its own item, in order.

    An item whose outputs another run holds (:class:`BusyError`: two runs into one folder) is passed
    over (``on_busy``) and, once every other item is done, given to ``retry_busy`` with that error, which
    waits for that run to end: so the two runs divide the items between them, and each run's summary ends
    complete. Without ``retry_busy`` such an item counts as failed.

    While the batch runs, the summaries are rewritten every ``summary_every_s`` seconds (default
    ``$WSI_PIPELINE_SUMMARY_SECONDS``, else 60) with ``"in_progress": true`` and the items not done
    yet as ``not run yet``: a run killed where it cannot clean up (out of memory, ``kill -9``, a
    power cut) still leaves a record of the slides it finished; ``on_summary`` gets those rows too (the
    CLI's folder page).

    ``drain`` (:meth:`OutputWriter.drain`): on an interrupt, waits for the outputs still being written
    and gives the rows of every item written, so an item whose future the interrupt kept from reaching
    this function (between its submit and ``process`` returning) still counts as done."""
    summaries = [out / f"{summary_name}.csv", out / f"{summary_name}.json"]
    refuse_foreign_files([*summaries, *also_writes])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(out, exc) from exc
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, BatchItem, Future[dict[str, Any]]]] = []
    busy: list[tuple[int, BatchItem, BusyError]] = []
    stopped = False
    t0 = time.perf_counter()
    every = summary_interval_s() if summary_every_s is None else summary_every_s
    last_summary = t0

    def summary_so_far() -> None:
        nonlocal last_summary
        now = time.perf_counter()
        if now - last_summary < every:
            return
        last_summary = now
        writing = {at for at, _, _ in pending}
        padded = [*rows, *({} for _ in items[len(rows) :])]
        so_far = [
            r if r and at not in writing else _not_run(items[at], NOT_RUN_YET) for at, r in enumerate(padded)
        ]
        try:
            _write_summaries(summaries, so_far, in_progress=True, meta=meta, seconds=now - t0)
            if on_summary:
                on_summary(so_far)
        except OSError:  # a full disk now: the slides say so for themselves, and the end tries again
            pass

    def row(item: BatchItem, result: dict[str, Any]) -> dict[str, Any]:
        return {"slide": str(item.slide), **result, "error": ""}

    def fail(at: int, item: BatchItem, exc: WsiError) -> bool:
        """Mark row ``at`` failed; True when the batch stops on it."""
        if on_error:
            on_error(item, exc)
        rows[at] = failed_row(item, exc)
        return stop_on_error

    def settle(keep: int = 0) -> bool:
        """Rows of the items whose outputs were being written, but the last ``keep``; True when the
        batch stops. A future leaves ``pending`` only once it has its row, so an interrupt while
        waiting for it still finds it there."""
        stop = False
        while len(pending) > keep:
            at, item, fut = pending[0]
            try:
                rows[at] = row(item, fut.result())
            except WsiError as exc:
                stop = fail(at, item, exc) or stop
            pending.pop(0)
        return stop

    try:
        for i, item in enumerate(items, 1):
            if on_start:
                on_start(i, len(items), item)
            rows.append({})
            at = len(rows) - 1
            result: dict[str, Any] | Future[dict[str, Any]] | None = None
            try:
                result = process(item)
                if isinstance(result, Future):  # at once: an interrupt below must find it
                    pending.append((at, item, result))
                stop = False
            except BusyError as exc:  # another run holds its outputs: come back to it at the end
                if retry_busy is None:
                    stop = fail(at, item, exc)
                else:
                    stop = False
                    rows[at] = {"slide": str(item.slide), "status": "busy", "n_tiles": 0, "error": str(exc)}
                    busy.append((at, item, exc))
                    if on_busy:
                        on_busy(item, exc)
            except WsiError as exc:
                stop = fail(at, item, exc)
            # the previous item's outputs, written while this one ran (this one's are written meanwhile)
            stop = settle(keep=1 if isinstance(result, Future) else 0) or stop
            if result is not None and not isinstance(result, Future):
                rows[at] = row(item, result)
            if stop:
                stopped = True
                break
            summary_so_far()
        stopped = settle() or stopped
        for at, item, seen in busy if not stopped else []:  # busy is empty without retry_busy
            assert retry_busy is not None
            try:
                again = retry_busy(item, seen)
            except WsiError as exc:
                if fail(at, item, exc):
                    break
                continue
            if isinstance(again, Future):
                pending.append((at, item, again))
                if settle():
                    break
            else:
                rows[at] = row(item, again)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a time limit, docker stop) through the CLI
        # The outputs being written finish (atomic files) and count; the summary then says which slides
        # this run did and which it did not reach: a killed nightly run still leaves its record.
        for at, item, fut in pending:
            try:
                rows[at] = row(item, fut.result())
            except WsiError as err:
                rows[at] = failed_row(item, err)
        pending.clear()
        rows += [{} for _ in items[len(rows) :]]
        written = drain() if drain else {}
        for at, r in enumerate(rows):
            if not r:
                done = written.get(items[at])
                rows[at] = row(items[at], done) if done else _not_run(items[at], "not run (interrupted)")
        _write_summaries(summaries, rows, interrupted=True, meta=meta, seconds=time.perf_counter() - t0)
        exc.batch_rows = rows  # type: ignore[attr-defined]  # for the caller's own pages
        raise
    finally:
        for _, _, fut in pending:  # interrupted: let the outputs being written finish (atomic files)
            fut.exception()
    seconds = time.perf_counter() - t0
    _write_summaries(summaries, rows, meta=meta, seconds=seconds)
    return BatchResult(rows, seconds)


class OutputWriter:
    """The thread that writes a folder run's slide outputs while the next slide is scored (a context
    manager). It keeps the row of each slide it finished: a Ctrl-C or SIGTERM can land after a slide's
    outputs were submitted but before :func:`run_batch` holds its future, and the slide is written
    all the same, so the interrupted summary takes its row from :meth:`drain`."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, "wsi-writer")
        self._rows: dict[BatchItem, dict[str, Any]] = {}

    def submit(self, item: BatchItem, write: Callable[[], dict[str, Any]]) -> Future[dict[str, Any]]:
        """Run ``write`` (returns the item's summary row) on the writer thread."""

        def run() -> dict[str, Any]:
            row = write()
            self._rows[item] = row
            return row

        return self._pool.submit(run)

    def drain(self) -> dict[BatchItem, dict[str, Any]]:
        """Wait for every submitted write; the rows of the items written."""
        self._pool.shutdown(wait=True)
        return dict(self._rows)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


def _not_run(item: BatchItem, status: str) -> dict[str, Any]:
    return {"slide": str(item.slide), "status": status, "n_tiles": 0, "error": ""}


def failed_row(item: BatchItem, exc: WsiError) -> dict[str, Any]:
    """The summary row of a slide that failed: its error and ``error_code``, the exit code a run of
    that slide alone ends with (3 unreadable, 4 no usable mpp, 5 no tissue, 6 output, ...), so a
    script can pick the slides to re-run with an mpp from the ones to re-scan."""
    return {"slide": str(item.slide), "status": "failed", "n_tiles": 0, "error": str(exc),
            "error_code": exc.exit_code}  # fmt: skip


#: summary status of a slide a running batch has not finished yet (summaries written while it runs)
NOT_RUN_YET = "not run yet (run in progress)"
SUMMARY_INTERVAL_ENV = "WSI_PIPELINE_SUMMARY_SECONDS"


def summary_interval_s() -> float:
    """Seconds between the summaries a running batch writes: ``$WSI_PIPELINE_SUMMARY_SECONDS``, else 60."""
    from wsi_pipeline.progress_lines import env_seconds

    return env_seconds(SUMMARY_INTERVAL_ENV, 60.0)


#: Statuses of the slides a folder run did work on now (scored; tiled, or resumed), not found done
DONE_NOW = ("ok", "written", "resumed")


def totals(rows: Sequence[dict[str, Any]], seconds: float | None = None) -> dict[str, Any]:
    """The figures of a folder run's closing line: slides done and failed, tiles, seconds, tiles/s
    of the slides done now, and the labels (scored now or found done)."""
    status = [str(r.get("status", "")) for r in rows]
    failed = status.count("failed")
    waiting = sum(1 for x in status if x in ("busy", "left to another run") or x.startswith("not run"))
    now = sum(int(r.get("n_tiles") or 0) for r in rows if r.get("status") in DONE_NOW)
    labelled = [r for r in rows if isinstance(r.get("positive"), bool)]
    out: dict[str, Any] = {
        "slides": len(rows), "done": len(rows) - failed - waiting, "failed": failed,
        "tiles": sum(int(r.get("n_tiles") or 0) for r in rows), "tiles_done_now": now,
    }  # fmt: skip
    if seconds is not None:
        out["seconds"] = round(seconds, 3)
        out["tiles_per_s"] = round(now / seconds, 2) if seconds > 0 and now else None
    if labelled:
        out["labels"] = {
            "positive": sum(r["positive"] for r in labelled),
            "negative": sum(not r["positive"] for r in labelled),
            "ood_warning": sum(bool(r.get("ood_warning")) for r in labelled),
            "focus_warning": sum(bool(r.get("focus_warning")) for r in labelled),
            "stain_warning": sum(bool(r.get("stain_warning")) for r in labelled),
        }
    models = sorted({(r.get("model"), r.get("model_sha256")) for r in labelled}, key=str)
    if models:  # the model(s) behind the labels: one, unless results of another were kept
        out["models"] = [{"model": name, "sha256": sha} for name, sha in models]
    return out


def _write_summaries(
    paths: Sequence[Path],
    rows: list[dict[str, Any]],
    *,
    interrupted: bool = False,
    in_progress: bool = False,
    meta: dict[str, Any] | None = None,
    seconds: float | None = None,
) -> None:
    """``NAME.csv`` and ``NAME.json`` (``interrupted``: true when the run was stopped before its end;
    ``in_progress``: true while it runs); the JSON also holds the run's ``totals`` and ``meta`` (the
    command line, the package version)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    atomic_write_bytes(paths[0], rows_to_csv(rows, columns))
    doc: dict[str, Any] = {"generator": f"{GENERATOR} {__version__}", **(meta or {})}
    doc.update(totals=totals(rows, seconds), slides=rows)
    if interrupted:
        doc["interrupted"] = True
    if in_progress:
        doc["in_progress"] = True
    atomic_write_json(paths[1], doc)
