"""HTML reports: one page per slide (``NAME.report.html``) and one per folder run (``report.html``).

Plain static files that open from disk in any browser: inline CSS, a few lines of inline JavaScript
(sorting the folder table), small pictures (slide thumbnail, top tiles) as ``data:`` URIs and the
overlay linked as the PNG file beside the page. Nothing is fetched from anywhere at view time.
"""

from __future__ import annotations

import base64
import html
import os
import shlex
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from wsi_pipeline import __version__
from wsi_pipeline.errors import folder_mpp_hint
from wsi_pipeline.io.outputs import encode_image
from wsi_pipeline.io.ownership import GENERATOR
from wsi_pipeline.provenance import atomic_write_bytes, valid_text

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5em auto;max-width:1200px;
padding:0 1em;color:#222;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em;word-break:break-all}h2{font-size:1.15em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.label{display:inline-block;font-size:1.3em;font-weight:bold;padding:.2em .7em;border-radius:.3em;color:#fff}
.pos{background:#b3261e}.neg{background:#2e6b30}.review{background:#8a5300}.fail{background:#777}
.warn{background:#fff4ce;border:1px solid #e0b000;padding:.5em .8em;margin:.8em 0}
.pics{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}figure{margin:0}
figcaption{font-size:.85em;color:#555;max-width:40em}
.pics img{max-width:100%;border:1px solid #ccc}.thumb img{max-height:420px}.ovl img{max-height:720px}
.tiles{display:flex;flex-wrap:wrap;gap:.6em}.tiles figure{width:150px}.tiles img{width:150px;height:150px;
border:1px solid #ccc;image-rendering:auto}code{font-size:.9em;word-break:break-all}
th.s{cursor:pointer;user-select:none}th.s:after{content:" \\2195";color:#999}
th[data-dir=asc]:after{content:" \\2191";color:#000}th[data-dir=desc]:after{content:" \\2193";color:#000}
footer{margin-top:2em;font-size:.8em;color:#666}
"""

# Sorts the table by a clicked header: numbers numerically (a cell's data-v when it has one), text
# alphabetically, empty cells last; a second click reverses.
_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach(function(th, i) {
  th.classList.add("s");
  th.addEventListener("click", function() {
    var body = th.closest("table").tBodies[0], asc = th.dataset.dir !== "asc";
    th.parentNode.querySelectorAll("th").forEach(function(t) { delete t.dataset.dir; });
    th.dataset.dir = asc ? "asc" : "desc";
    function key(r) {
      var c = r.cells[i], v = c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim();
      var n = parseFloat(v);
      return v === "" ? null : (isNaN(n) || !/^-?[0-9.]/.test(v) ? v.toLowerCase() : n);
    }
    Array.from(body.rows).sort(function(a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return x === y ? 0 : (x === null ? 1 : -1);
      var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
      return asc ? c : -c;
    }).forEach(function(r) { body.appendChild(r); });
  });
});
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _url(ref: str) -> str:
    """``ref``, a file path relative to the page (``/``-separated) or a URL, as an attribute value:
    a path is percent-encoded, since lab file names hold ``#`` (which would start a fragment), ``%``,
    ``?`` and spaces; a URL (``file:``, ``data:``) is already encoded."""
    if urlsplit(ref).scheme and not PureWindowsPath(ref).drive:
        return _e(ref)
    return _e(quote(os.fsencode(ref), safe="/"))  # the name's own bytes, also where they are not UTF-8


def data_uri(image: np.ndarray, fmt: str = "JPEG") -> str:
    """A ``data:`` URI of an (h, w, 3) uint8 picture (JPEG or PNG)."""
    mime = "image/jpeg" if fmt.upper() == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(encode_image(image, fmt)).decode()}"


def _page(title: str, body: str, script: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{GENERATOR} {__version__}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )


def _rows(pairs: Sequence[tuple[str, Any]]) -> str:
    out = []
    for k, v in pairs:
        num = isinstance(v, int | float) and not isinstance(v, bool)
        out.append(f"<tr><th>{_e(k)}</th><td{' class=n' if num else ''}>{_e(v)}</td></tr>")
    return "<table>" + "".join(out) + "</table>"


def _rule_text(rule: Mapping[str, Any], positive: str) -> str:
    if rule.get("rule") == "topk":
        return (
            f"top-k rule: {positive} when the mean of the {rule.get('top_k')} highest tile probabilities "
            f"is at least {rule.get('topk_threshold')}"
        )
    return (
        f"area rule: {positive} when the tissue area of tiles with P >= {rule.get('tile_threshold')} "
        f"reaches {rule.get('min_area_mm2')} mm^2"
    )


def _review_title(where: str) -> str:
    """The hover text of an amber badge, pointing to the warning ``where`` it is."""
    return f' title="not a negative result: see the warning {where}"'


def label_class(positive: bool, unsure: bool) -> str:
    """The label badge's CSS class: ``pos`` (red) for a positive slide, ``neg`` (green) for a negative
    one, and ``review`` (amber) for a negative one with an OOD or focus warning, which says that its
    "no tumour" is not a negative result: a green badge would tell the reader the opposite."""
    if positive:
        return "pos"
    return "review" if unsure else "neg"


def slide_report_html(
    manifest: Mapping[str, Any],
    *,
    overlay_href: str,
    thumbnail: np.ndarray,
    top_tiles: Sequence[tuple[np.ndarray, Mapping[str, Any]]],
    links: Mapping[str, str],
) -> str:
    """The page of one slide.

    ``manifest``: the run manifest (label, evidence, timings, model, ...); ``overlay_href``: the
    overlay PNG relative to the page; ``thumbnail``: picture of the slide; ``top_tiles``: (picture,
    {"rank", "p", "x_l0", "y_l0"}) of the highest-P tiles; ``links``: file label -> href of the other
    outputs.
    """
    lab = manifest["label"]
    model = manifest["model"]
    pos = model["positive_class"]
    ev = lab["evidence"]
    name = Path(str(manifest["slide"])).name
    ood, focus, stain = lab.get("ood"), lab.get("focus"), lab.get("stain")
    unsure = any(bool(c and c.get("warning")) for c in (ood, focus, stain))
    label_cls = label_class(bool(lab["positive"]), unsure)
    hover = _review_title("below") if label_cls == "review" else ""
    parts = [
        f"<h1>{_e(name)}</h1>",
        f'<p><span class="label {label_cls}" id="label"{hover}>'
        f"{_e(str(lab['label']).upper())}</span> &nbsp;{_e(_rule_text(lab['rule'], pos))}</p>",
    ]
    for check in (ood, focus, stain):
        if check and check.get("warning"):
            parts.append(f'<div class="warn"><b>Warning:</b> {_e(check["warning"])}</div>')
    if mpp_warning := (manifest.get("resolution") or {}).get("override_warning"):
        parts.append(f'<div class="warn"><b>Warning:</b> {_e(mpp_warning)}</div>')
    evidence = [
        (f"{pos} area (mm^2)", ev.get(f"{pos}_area_mm2")),
        (f"{pos} tiles (P >= {lab['rule'].get('tile_threshold')})", ev.get(f"{pos}_tiles")),
        ("tiles scored", ev.get("tiles")),
        ("tissue area scored (mm^2)", ev.get("tissue_area_mm2")),
        *(
            [(f"{pos} share of the tissue scored (area, not a tumour cell count)", f"{share:.1%}")]
            if (share := ev.get(f"{pos}_share_of_tissue")) is not None
            else []
        ),
        ("max P", ev.get("max_p")),
        (f"mean P of the top {lab['rule'].get('top_k')}", ev.get("topk_mean_p")),
    ]
    regions = ev.get("regions") or {}
    if regions:
        evidence.append((f"{pos} regions", regions.get("count")))
        if regions.get("count"):
            greatest = regions.get("greatest_dimension_mm")
            evidence.append((f"greatest dimension of a {pos} region (mm)", greatest))
    if ood:
        evidence.append((f"OOD score (warns above {ood.get('warn_above', 1.0):g})", ood.get("score")))
    if focus:
        evidence.append((
            f"tiles out of focus (focus score < {focus['sharp_at_least']:g}; warns from "
            f"{focus['warn_share']:.0%})",
            f"{focus['tiles_out_of_focus']} ({focus['share_out_of_focus']:.1%})",
        ))  # fmt: skip
    roi = (manifest.get("tissue") or {}).get("regions")
    if roi:
        evidence.append(("scored only inside the regions of", f"{Path(roi['file']).name} ({roi['polygons']} "
                         f"polygon(s), {roi['area_mm2']} mm^2 on the slide)"))  # fmt: skip
    pen = (manifest.get("tissue") or {}).get("pen_marks_mm2")
    if pen:
        evidence.append(("marker-pen ink left out of the tissue (mm^2)", pen))
        near = ev.get("pen") or {}
        if near:
            reach = f"{near['reach_um']:g} um"
            evidence.append((f"scored tiles within {reach} of the ink", near["tiles_near_ink"]))
            evidence.append((f"{pos} tiles within {reach} of the ink", near["positive_tiles_near_ink"]))
    parts += ["<h2>Evidence</h2>", _rows(evidence)]
    res = manifest.get("resolution") or {}
    heat = manifest.get("heatmap") or {}
    cell_um = round(float(heat.get("mpp") or 0.0), 1)
    th, tw = thumbnail.shape[:2]
    href = _url(overlay_href)
    cropped = str((heat.get("overlay") or {}).get("background", "")).endswith("(tissue)")
    caption = (
        "The tissue: the slide cut to it and a margin (it is small on the glass)."
        if cropped
        else "The slide."
    )
    parts += [
        "<h2>Slide and heatmap</h2>",
        '<div class="pics">',
        f'<figure class="thumb"><img src="{data_uri(thumbnail)}" alt="slide thumbnail" width="{tw}" '
        f'height="{th}"><figcaption>{caption}</figcaption></figure>',
        f'<figure class="ovl"><a href="{href}"><img src="{href}" alt="heatmap overlay"></a>'
        f"<figcaption>P({_e(pos)}) over the slide: colour only where P is above the floor shown on the bar, "
        f"stronger with P; black outlines: {_e(pos)} regions (tiles with P >= "
        f"{_e(lab['rule'].get('tile_threshold'))}). One heatmap cell = {cell_um} um.</figcaption></figure>",
        "</div>",
    ]
    parts += _regions_table(regions, pos)
    tiles_html = []
    for img, info in top_tiles:
        tiles_html.append(
            f'<figure><img src="{data_uri(img)}" alt="tile {_e(info.get("rank"))}" width="150" height="150">'
            f"<figcaption>#{_e(info.get('rank'))} P {float(info.get('p', 0.0)):.3f}<br>"
            f"x {_e(info.get('x_l0'))}, y {_e(info.get('y_l0'))}</figcaption></figure>"
        )
    parts += [
        f"<h2>Top tiles</h2><p>The {len(top_tiles)} tiles with the highest P({_e(pos)}); "
        "x, y: top-left corner in level-0 slide pixels.</p>",
        '<div class="tiles">' + "".join(tiles_html) + "</div>",
    ]
    t = manifest.get("timings") or {}
    parts += [
        "<h2>Run</h2>",
        _rows(
            [
                ("seconds (whole run)", manifest.get("seconds")),
                ("scoring seconds", t.get("scoring_s")),
                ("tiles per second", manifest.get("tiles_per_s")),
                ("read + normalize seconds (summed over workers)", t.get("read_normalize_s_summed")),
                ("inference seconds (summed over workers)", t.get("inference_s_summed")),
                ("provider", manifest.get("provider")),
                *_reused_rows(manifest, pos),
                ("precision", _precision(manifest.get("run") or {})),
                ("scheduler", manifest.get("scheduler")),
                ("slide um/px (source)", f"{res.get('mpp_x')} ({res.get('mpp_source')})"),
                ("tiles at um/px", res.get("effective_mpp")),
                ("finished", manifest.get("finished_at")),
                *(
                    [("command", " ".join(shlex.quote(a) for a in command["argv"]))]
                    if (command := manifest.get("command"))
                    else []
                ),
            ]
        ),
        "<h2>Model</h2>",
        _rows(
            [
                ("name", model.get("name")),
                ("version", model.get("version")),
                ("sha256", model.get("sha256")),
                ("classes", ", ".join(model.get("classes", []))),
                ("trained at um/px", model.get("mpp")),
            ]
        ),
        *_known_defects(model),
        "<h2>Files</h2><ul>"
        + "".join(f'<li><a href="{_url(href)}">{_e(label)}</a></li>' for label, href in links.items())
        + "</ul>",
        f"<footer>slide: <code>{_e(manifest.get('slide'))}</code><br>wsi-pipeline "
        f"{_e(manifest.get('package_version'))}. Research use only: not for diagnosis.</footer>",
    ]
    return _page(f"{name}: {lab['label']}", "\n".join(parts))


def _regions_table(regions: Mapping[str, Any], pos: str) -> list[str]:
    """The slide page's table of its largest regions (none: nothing)."""
    rows = regions.get("largest") or []
    if not rows:
        return []
    more = regions.get("count", 0) - len(rows)
    head = "".join(
        f"<th>{_e(h)}</th>"
        for h in ("#", "area (mm^2)", "greatest dimension (mm)", "tiles", "mean P", "max P", "centre x, y")
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class=n>{_e(v)}</td>"
            for v in (r["rank"], r["area_mm2"], r["length_mm"], r["tiles"], r["mean_p"], r["max_p"])
        )
        + f"<td>{_e(r['centre_l0'][0])}, {_e(r['centre_l0'][1])}</td></tr>"
        for r in rows
    )
    note = f" The other {more} are in the GeoJSON and the ASAP XML." if more > 0 else ""
    return [
        f"<h2>{_e(pos.capitalize())} regions</h2><p>Largest first: each region is the outline of touching "
        f"{_e(pos)} tiles (its area includes the tiles' whole squares); centre in level-0 slide pixels, "
        f"to find it in a viewer.{note}</p>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
    ]


def _known_defects(model: Mapping[str, Any]) -> list[str]:
    """The slide page's list of what its model is known to get wrong (from its card; none: nothing)."""
    defects = model.get("known_defects") or []
    if not defects:
        return []
    items = "".join(
        f"<li><b>{_e(d.get('name'))}</b>: {_e(d.get('advice'))}. <small>{_e(d.get('finding'))}.</small></li>"
        for d in defects
    )
    return [
        '<h2 id="known-defects">What this model is known to get wrong</h2>'
        "<p>Measured on tissue it never trained on (its model card has the figures and how to reproduce "
        f"them). Read this slide's result with them in mind.</p><ul>{items}</ul>"
    ]


def _reused_rows(manifest: Mapping[str, Any], positive: str) -> list[tuple[str, Any]]:
    """The Run table's row saying the scores came from an earlier run (none when they did not)."""
    reused = manifest.get("scores_reused")
    if not reused:
        return []
    rule = _rule_text(reused.get("label") or {}, positive)
    when = reused.get("scored_at") or reused.get("finished_at")  # the run that scored them
    text = f"reused from the run finished {when} (only the label rule changed: it was the {rule})"
    return [("scores", text)]


def _precision(run: dict[str, Any]) -> str | None:
    """``fp16``, or ``fp32`` with the reason a GPU ran fp32, and how batches reached the device."""
    if not run:
        return None
    out = str(run.get("precision"))
    if run.get("why_fp32"):
        out += f" ({run['why_fp32']})"
    if run.get("io_binding"):
        out += ", I/O binding, " + ("pinned input" if run.get("pinned_input") else "pageable input")
    elif run.get("io_binding_why_not"):
        out += f", plain runs ({run['io_binding_why_not']})"
    return out


def write_slide_report(
    path: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    *,
    overlay_href: str,
    thumbnail: np.ndarray,
    top_tiles: Sequence[tuple[np.ndarray, Mapping[str, Any]]],
    links: Mapping[str, str],
) -> Path:
    page = slide_report_html(
        manifest, overlay_href=overlay_href, thumbnail=thumbnail, top_tiles=top_tiles, links=links
    )
    return atomic_write_bytes(path, valid_text(page).encode())


#: Columns of the folder table: (row key, header, numeric).
FOLDER_COLUMNS = (
    ("label", "label", False),
    ("area_mm2", "{positive} area (mm^2)", True),
    ("area_share", "share of tissue", True),
    ("regions", "{positive} regions", True),
    ("greatest_dimension_mm", "greatest dimension (mm)", True),
    ("max_p", "max P", True),
    ("ood_score", "OOD score", True),
    ("out_of_focus", "out of focus (share)", True),
    ("pen_mm2", "pen ink (mm^2)", True),
    ("n_tiles", "tiles", True),
    ("seconds", "seconds", True),
    ("status", "status", False),
)


def _map_cell(row: Mapping[str, Any]) -> str:
    """The folder table's picture of a slide: its overlay PNG (the file beside the page, loaded as the
    row scrolls into view) at 64 px high, linking to the slide's page; empty for a failed slide."""
    overlay, report = row.get("overlay"), row.get("report")
    if not overlay:
        return '<td data-v=""></td>'
    img = f'<img src="{_url(str(overlay))}" alt="" loading="lazy" style="height:64px;display:block">'
    if report:
        img = f'<a href="{_url(str(report))}">{img}</a>'
    return f'<td data-v="">{img}</td>'


def folder_report_html(rows: Sequence[Mapping[str, Any]], *, title: str = "wsi-pipeline results") -> str:
    """The page of a folder run: one sortable row per slide, linking to its page (``row["report"]``,
    relative to the folder page). Failed slides show their error."""
    n_pos = sum(1 for r in rows if r.get("positive") is True)
    n_fail = sum(1 for r in rows if r.get("status") == "failed")
    n_warn = sum(1 for r in rows if r.get("ood_warning") is True)
    n_blur = sum(1 for r in rows if r.get("focus_warning") is True)
    n_pen = sum(1 for r in rows if r.get("pen_mm2"))
    n_pen_warn = sum(1 for r in rows if r.get("pen_warning") is True)
    mpp_warned = [Path(str(r.get("slide", ""))).name for r in rows if r.get("mpp_warning") is True]
    more = ", ..." if len(mpp_warned) > 10 else ""
    positive = next((str(r["positive_class"]) for r in rows if r.get("positive_class")), "tumour")
    headers = ("slide", "map", *(c[1].format(positive=positive) for c in FOLDER_COLUMNS))
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for r in rows:
        name = Path(str(r.get("slide", ""))).name
        href = r.get("report")
        cell = f'<a href="{_url(str(href))}">{_e(name)}</a>' if href else _e(name)
        tds = [f'<td data-v="{_e(name.lower())}">{cell}</td>', _map_cell(r)]
        for key, _, numeric in FOLDER_COLUMNS:
            v = r.get(key)
            v = "" if v is None else v
            if key == "label" and v != "":
                unsure = any(r.get(k) is True for k in ("ood_warning", "focus_warning", "stain_warning"))
                cls = label_class(bool(r.get("positive")), unsure)
                hover = _review_title("on its page") if cls == "review" else ""
                span = f'<span class="label {cls}" style="font-size:.85em"{hover}>{_e(v)}</span>'
                tds.append(f'<td data-v="{_e(v)}">{span}</td>')
            elif key == "label" and r.get("status") == "failed":
                err = _e(r.get("error"))
                span = f'<span class="label fail" style="font-size:.85em" title="{err}">failed</span>'
                tds.append(f'<td data-v="failed"><a href="#failed">{span}</a></td>')
            elif (key, True) in (("ood_score", r.get("ood_warning")), ("pen_mm2", r.get("pen_warning")),
                                 ("out_of_focus", r.get("focus_warning"))):  # fmt: skip
                tds.append(f'<td class="n" data-v="{_e(v)}" style="background:#fff4ce">{_e(v)} !</td>')
            else:
                tds.append(f'<td{" class=n" if numeric else ""} data-v="{_e(v)}">{_e(v)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    n_neg = sum(1 for r in rows if r.get("positive") is False)
    n_not_run = sum(1 for r in rows if str(r.get("status", "")).startswith("not run"))
    running = any(str(r.get("status", "")).startswith("not run yet") for r in rows)
    not_run = f", {n_not_run} not run" if n_not_run else ""
    parts = [
        f"<h1>{_e(title)}</h1>",
        (
            f'<p class="warn">This run is still going: {n_not_run} slides are not done yet (page written '
            f"{time.strftime('%Y-%m-%d %H:%M')}; reload it later for more).</p>"
            if running
            else f'<p class="warn">This run was interrupted before its end: {n_not_run} slides were not run. '
            "Re-run the same command to finish them (the slides done are kept and skipped).</p>"
            if n_not_run
            else ""
        ),
        (
            f'<p class="warn">--mpp overrode the slide\'s own resolution by more than 10 % for '
            f"{len(mpp_warned)} slides ({_e(', '.join(mpp_warned[:10]))}{more}):"
            " if their metadata is right, their tiles were cut at the wrong scale; give per-slide values "
            "in a CSV manifest's mpp column.</p>"
            if mpp_warned
            else ""
        ),
        f"<p>{len(rows)} slides: {n_pos} called positive, {n_neg} negative, "
        f"{n_fail} failed{not_run}; {n_warn} with an OOD warning (marked !: the model may not know this "
        "tissue, stain or scanner; review by eye)"
        + (
            f"; {n_blur} with much tissue out of focus (marked !: a 'no {_e(positive)}' there is not a "
            "negative result; re-scan or review by eye)"
            if n_blur
            else ""
        )
        + (
            f"; {n_pen} with marker-pen ink left out of the tissue ({n_pen_warn} marked !: every positive "
            "tile lies beside the ink)"
            if n_pen
            else ""
        )
        + ". Click a column header to sort.</p>",
        f'<table class="sortable" id="slides"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>",
        _failed_list(rows),
        "<footer>Research use only: not for diagnosis. summary.csv and summary.json hold the same rows."
        "</footer>",
    ]
    return _page(title, "\n".join(parts), _SORT_JS)


def _failed_list(rows: Sequence[Mapping[str, Any]]) -> str:
    """The failed slides, each with its error (which names the fix), below the table: read in full
    there rather than in a table column."""
    failed = [r for r in rows if r.get("status") == "failed"]
    if not failed:
        return ""
    items = "".join(
        f'<li><b>{_e(Path(str(r.get("slide", ""))).name)}</b>: <span class="err">{_e(r.get("error") or "")}'
        "</span></li>"
        for r in failed
    )
    hint = folder_mpp_hint(rows)
    return (
        f'<h2 id="failed">Failed slides ({len(failed)})</h2><p>Each error names the fix; re-run the same '
        f"command after it: the slides done are kept and skipped.</p><ul>{items}</ul>"
        + (f'<p class="warn">{_e(hint)}.</p>' if hint else "")
    )


def write_folder_report(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *, title: str = "wsi-pipeline results"
) -> Path:
    return atomic_write_bytes(path, valid_text(folder_report_html(rows, title=title)).encode())


#: Columns of the evaluation table: (row key, header, numeric).
EVALUATION_COLUMNS = (
    ("truth", "truth", False),
    ("dice", "Dice", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("cell_dice", "cell Dice", True),
    ("truth_area_mm2", "truth (mm^2)", True),
    ("false_positive_mm2", "false positive (mm^2)", True),
    ("auc", "tile AUC", True),
    ("lesions", "tumour foci", True),
    ("lesions_found", "foci found", True),
    ("false_positive_regions", "false-positive regions", True),
    ("slide_label", "slide label", False),
    ("slide_label_correct", "label correct", False),
    ("out_of_focus", "out of focus (share)", True),
)


def evaluation_report_html(
    slides: Sequence[Mapping[str, Any]],
    pictures: Mapping[str, np.ndarray | None],
    *,
    summary: str,
    notes: Sequence[str] = (),
    title: str = "wsi-pipeline evaluation",
    sweep: Sequence[Mapping[str, Any]] = (),
    run: Mapping[str, Any] | None = None,
    sweep_best: str = "",
) -> str:
    """The page of ``evaluate``: ``summary`` (its closing line), then one sortable row per slide with
    its metrics and its picture (``pictures[row["manifest"]]``: the overlay with the truth outlined, a
    JPEG inline, so the page is one file); ``notes``: slides not scored and errors; ``run``: the
    models, parameters and command behind the figures (metrics.json's ``run``)."""
    headers = ("slide", "prediction (black) vs truth (cyan)", *(c[1] for c in EVALUATION_COLUMNS))
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for r in slides:
        name = Path(str(r.get("slide", ""))).name
        pic = pictures.get(str(r.get("manifest")))
        img = f'<img src="{data_uri(pic)}" alt="" style="max-height:360px">' if pic is not None else ""
        tds = [f'<td data-v="{_e(name.lower())}">{_e(name)}</td>', f'<td data-v="">{img}</td>']
        for key, _, numeric in EVALUATION_COLUMNS:
            v = r.get(key)
            text = "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            warned = key == "out_of_focus" and r.get("focus_warning") is True
            mark = ' style="background:#fff4ce"' if warned else ""  # the run warned about its focus
            tds.append(
                f'<td{" class=n" if numeric else ""}{mark} data-v="{_e("" if v is None else v)}">'
                f"{_e(text)}{' !' if warned else ''}</td>"
            )
        body.append("<tr>" + "".join(tds) + "</tr>")
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<p>{_e(summary)}</p>",
        "<p>Pictures: the run's overlay (colour: P(tumour); black outlines: the model's tumour regions at "
        "the run's threshold) with the expert's annotated tumour outlined in cyan. Dice, precision and "
        "recall are area-exact (the ACDC@LUNGHP metric); empty where undefined (no tumour in truth nor "
        "prediction). A tumour focus (an annotated polygon) is found when a predicted region overlaps it; "
        "a predicted region that overlaps none is a false-positive region. Out of focus: the run's share of "
        "tiles below the focus check's score (! where it warned: misses there may be the blur's). Click a "
        "column header to sort.</p>",
        f'<table class="sortable" id="slides"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>",
        *(f'<p class="warn">{_e(n)}</p>' for n in notes),
        *_sweep_table(sweep, sweep_best),
        *_evaluation_run(run),
        "<footer>Research use only: not for diagnosis. metrics.json and metrics.csv hold the same rows."
        "</footer>",
    ]
    return _page(title, "\n".join(parts), _SORT_JS)


def _evaluation_run(run: Mapping[str, Any] | None) -> list[str]:
    """The evaluation page's record of how its figures were made (none: nothing)."""
    if not run:
        return []
    par = run.get("parameters") or {}
    models = [
        f"{m.get('model') or 'not recorded'}"
        + (f" (sha256 {str(m['sha256'])[:12]})" if m.get("sha256") else "")
        + f": {m.get('slides')} slide(s)"
        for m in run.get("models") or []
    ]
    threshold = par.get("threshold")
    pairs = [
        ("model(s)", "; ".join(models) or "none"),
        ("tile threshold", par.get("threshold_note") if threshold is None else threshold),
        ("truth fraction of a cell", par.get("truth_fraction")),
        ("positive groups", ", ".join(par.get("positive_groups") or []) or "every group not excluded"),
        ("exclusion groups", ", ".join(par.get("exclusion_groups") or [])),
        ("results", run.get("results")),
        ("annotations", run.get("annotations")),
        ("command", " ".join(run.get("command") or []) or "(from Python)"),
        ("wsi-pipeline", run.get("package_version")),
        ("finished", run.get("finished_at")),
    ]
    return ["<h2>Run</h2>", _rows(pairs)]


#: Columns of the operating-points table: (key, header)
SWEEP_COLUMNS = (
    ("threshold", "threshold"),
    ("dice", "mean Dice"),
    ("recall", "mean recall"),
    ("precision", "mean precision"),
    ("foci_found", "foci found"),
    ("false_positive_regions_per_slide", "false-positive regions per slide"),
    ("slide_sensitivity", "tumour slides called tumour"),
    ("slide_specificity", "benign slides called no tumour"),
)


def _sweep_table(points: Sequence[Mapping[str, Any]], best: str = "") -> list[str]:
    """The evaluation page's operating points (none: nothing), with ``best`` (a line naming the
    thresholds to start from) above the table."""
    if not points:
        return []
    head = "".join(f"<th>{_e(h)}</th>" for _, h in SWEEP_COLUMNS)

    def cell(key: str, r: Mapping[str, Any]) -> str:
        v = r.get(key)
        if key == "foci_found" and v is not None:
            return f"{v} of {r.get('foci')}"
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    rows = ("".join(f"<td class=n>{_e(cell(k, r))}</td>" for k, _ in SWEEP_COLUMNS) for r in points)
    body = "".join(f"<tr>{tds}</tr>" for tds in rows)
    return [
        "<h2>Operating points</h2><p>Every run scored again at each tile threshold (the slide label by each "
        "run's own rule at that threshold). Choose a threshold on slides you will not also use to report "
        "its figures; then re-run the folder with <code>--tile-threshold</code> (the scores are reused).</p>",
        *([f"<p class=best>{_e(best[0].upper() + best[1:])}.</p>"] if best else []),
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
    ]


def write_evaluation_report(
    path: str | os.PathLike[str],
    slides: Sequence[Mapping[str, Any]],
    pictures: Mapping[str, np.ndarray | None],
    *,
    summary: str,
    notes: Sequence[str] = (),
    sweep: Sequence[Mapping[str, Any]] = (),
    run: Mapping[str, Any] | None = None,
    sweep_best: str = "",
) -> Path:
    page = evaluation_report_html(
        slides, pictures, summary=summary, notes=notes, sweep=sweep, run=run, sweep_best=sweep_best
    )
    return atomic_write_bytes(path, valid_text(page).encode())
