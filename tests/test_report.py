"""Issue 14: the HTML reports, checked in a real browser.

A folder run on the bundled sample slide plus a synthetic tumour slide writes ``report.html`` and
one ``NAME.report.html`` per slide. The tumour slide's name holds characters that mean something in a
URL (``#``, ``%``, a space), as lab file names do, and a third's is Latin-1 bytes that are not UTF-8
(an old Windows share): their pages, pictures and links must still resolve. One headless Chromium launch loads a harness page that holds
them in iframes; a script in the harness (the test's, not the product's) records, after the load
event, whether every image of every page loaded, the table's order before and after a click on a
header, and the links; the same launch takes a screenshot, which must not be blank.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes, urlsplit

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import Fixture
from wsi_pipeline.cli import main
from wsi_pipeline.provenance import valid_text

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"
TUMOUR = "tumour #2 (50%)"  # "#" starts a URL fragment, "%" an escape: both must be encoded
#: a Latin-1 name (an old Windows share, a zip): bytes that are not UTF-8, kept by Python as surrogates
LATIN1 = os.fsdecode(b"caf\xe9")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_HARNESS = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">
{frames}
<pre id="result"></pre>
<script>
window.addEventListener("load", function() {{
  var out = {{pages: []}};
  document.querySelectorAll("iframe").forEach(function(f) {{
    var d = f.contentDocument;
    var page = {{src: f.getAttribute("src"), title: d.title, images: [], links: []}};
    Array.from(d.images).forEach(function(i) {{
      page.images.push({{src: i.getAttribute("src").slice(0, 40), ok: i.complete && i.naturalWidth > 0}});
    }});
    Array.from(d.querySelectorAll("a")).forEach(function(a) {{ page.links.push(a.getAttribute("href")); }});
    page.badges = Array.from(d.querySelectorAll("span.label")).map(function(b) {{
      return [b.textContent, getComputedStyle(b).backgroundColor];
    }});
    page.errors = Array.from(d.querySelectorAll("span.err")).map(function(c) {{
      var r = c.getBoundingClientRect();
      return [c.textContent, Math.round(r.left), Math.round(r.right)];
    }});
    page.width = d.documentElement.clientWidth;
    var table = d.querySelector("table.sortable");
    if (table) {{
      var names = function() {{
        return Array.from(table.tBodies[0].rows).map(function(r) {{ return r.cells[0].textContent; }});
      }};
      var th = Array.from(table.querySelectorAll("th")).find(function(t) {{ return t.textContent === "max P"; }});
      page.order = names();
      if (th) {{
        th.click();
        page.asc = names();
        th.click();
        page.desc = names();
      }}
    }}
    out.pages.push(page);
  }});
  document.getElementById("result").textContent = JSON.stringify(out);
}});
</script></body></html>
"""


def _target(folder: Path, href: str) -> Path:
    """The file a relative link on a page in ``folder`` opens, as a browser reads the link."""
    url = urlsplit(href)
    assert not (url.scheme or url.query or url.fragment), f"not a plain relative link: {href!r}"
    return folder / os.fsdecode(unquote_to_bytes(url.path))


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(
        "no Chromium found (tried " + ", ".join(BROWSERS) + "): install it (`apt-get install -y chromium`, "
        "as .ci/run does) to test the HTML report in a real browser"
    )


@pytest.fixture(scope="module")
def folder_run(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("report")
    src = root / "slides"
    src.mkdir()
    shutil.copy2(SAMPLE, src / SAMPLE.name)
    shutil.copy2(tumour_slide.path, src / f"{TUMOUR}.svs")
    shutil.copy2(benign_slide.path, src / f"{LATIN1}.svs")
    out = root / "out"
    r = CliRunner().invoke(main, [str(src), "--out", str(out), "--model", str(test_model), "-q"])
    assert r.exit_code == 0, r.output
    assert str(out / "report.html") in r.output
    return out


@pytest.fixture(scope="module")
def browsed(folder_run: Path) -> dict:
    """One Chromium launch: the harness's findings (JSON) and its screenshot."""
    pages = ["out/report.html", "out/CMU-1-Small-Region.report.html", f"out/{LATIN1}.report.html",
             f"out/{TUMOUR}.report.html"]  # fmt: skip
    return _browse(folder_run.parent, pages)


def _browse(root: Path, pages: list[str]) -> dict:
    """Load ``pages`` (paths relative to ``root``) in one harness in one Chromium launch: the harness's
    findings (JSON) and its screenshot."""
    chromium = _browser()
    frames = "\n".join(
        f'<iframe src="{quote(os.fsencode(p))}" style="width:1260px;height:1100px;border:0"></iframe>'
        for p in pages
    )
    harness = root / "harness.html"
    harness.write_text(_HARNESS.format(frames=frames))
    assert all((root / p).is_file() for p in pages), pages
    shot = root / "screenshot.png"
    cmd = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--allow-file-access-from-files", "--virtual-time-budget=10000", "--window-size=1280,3400",
        f"--screenshot={shot}", "--dump-dom", harness.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), f"no result from the harness (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return {"result": json.loads(html.unescape(m.group(1))), "screenshot": shot}


def test_every_page_renders_with_every_image_loaded(browsed: dict) -> None:
    pages = browsed["result"]["pages"]
    assert [os.fsdecode(unquote_to_bytes(p["src"])) for p in pages] == [
        "out/report.html", "out/CMU-1-Small-Region.report.html", f"out/{LATIN1}.report.html",
        f"out/{TUMOUR}.report.html",
    ]  # fmt: skip
    folder = pages[0]  # a picture per slide: its overlay, beside the page
    assert [os.fsdecode(unquote_to_bytes(i["src"])) for i in folder["images"]] == [
        "CMU-1-Small-Region.overlay.png", f"{LATIN1}.overlay.png", f"{TUMOUR}.overlay.png",
    ]  # fmt: skip
    assert all(i["ok"] for i in folder["images"]), folder["images"]
    for page in pages[1:]:
        srcs = [i["src"] for i in page["images"]]
        # thumbnail (data: URI), overlay (the PNG beside the page), 10 top tiles (data: URIs)
        assert len(srcs) == 12 and srcs[1].endswith(".overlay.png"), srcs
        assert all(i["ok"] for i in page["images"]), page["images"]
    assert pages[0]["title"] == "wsi-pipeline results: out"  # the folder's name
    assert pages[3]["title"] == f"{TUMOUR}.svs: tumour"
    assert pages[2]["title"].startswith("caf\\xe9.svs: ")  # the byte shown, not a page that failed


def test_folder_table_links_each_slide_and_sorts(browsed: dict, folder_run: Path) -> None:
    folder = browsed["result"]["pages"][0]
    targets = {_target(folder_run, h) for h in folder["links"]}
    assert {
        folder_run / "CMU-1-Small-Region.report.html", folder_run / f"{LATIN1}.report.html",
        folder_run / f"{TUMOUR}.report.html",
    } <= targets  # fmt: skip
    assert all(t.is_file() for t in targets), folder["links"]
    assert folder["order"] == ["CMU-1-Small-Region.svs", "caf\\xe9.svs", f"{TUMOUR}.svs"]  # sorted by name
    rows = json.loads((folder_run / "summary.json").read_text())["slides"]
    by_p = [valid_text(Path(r["slide"]).name) for r in sorted(rows, key=lambda r: r["max_p"])]
    assert folder["asc"] == by_p and folder["desc"] == by_p[::-1]


# The label badge's colour as the browser paints it: red tumour, green no tumour, amber a "no tumour"
# under an OOD or focus warning (not a negative result).
BADGE = {
    "pos": "rgb(179, 38, 30)",
    "neg": "rgb(46, 107, 48)",
    "review": "rgb(138, 83, 0)",
    "fail": "rgb(119, 119, 119)",
}


def _badge_kind(manifest: dict) -> str:
    lab = manifest["label"]
    if lab["positive"]:
        return "pos"
    warned = any((lab.get(k) or {}).get("warning") for k in ("ood", "focus"))
    return "review" if warned else "neg"


def test_label_badges_are_painted_by_what_the_label_means(browsed: dict, folder_run: Path) -> None:
    """Each slide's badge, on its page and in the folder table, is red for tumour, green for no
    tumour and amber for a "no tumour" that an OOD or focus warning says is not a negative result; the
    test model calls the benign slide no tumour (green) and the tumour slide tumour (red)."""
    folder, *slides = browsed["result"]["pages"]
    kinds = []
    for page, stem in zip(slides, ["CMU-1-Small-Region", LATIN1, TUMOUR], strict=True):
        manifest = json.loads((folder_run / f"{stem}.run.json").read_text())
        kind = _badge_kind(manifest)
        kinds.append(kind)
        assert page["badges"] == [[manifest["label"]["label"].upper(), BADGE[kind]]], (stem, page["badges"])
    assert sorted(b[1] for b in folder["badges"]) == sorted(BADGE[k] for k in kinds), folder["badges"]
    assert kinds[1:] == ["neg", "pos"], kinds


def test_a_no_tumour_under_an_ood_warning_is_amber_not_green(tmp_path: Path) -> None:
    """The shipped model on the bundled sample (real benign skin, unlike its training tissue): no
    tumour with an OOD warning. Its badge is amber on its page and in the folder table, with a title
    saying why; a green badge would read as a negative result, which the warning says it is not."""
    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy2(SAMPLE, src / SAMPLE.name)
    (src / "zz-cut-short.svs").write_bytes(SAMPLE.read_bytes()[:5000])  # a copy cut short: fails
    r = CliRunner().invoke(main, [str(src), "--out", str(tmp_path / "out"), "-q"])
    assert r.exit_code == 1, r.output  # the folder ran past the broken slide, and says it failed
    manifest = json.loads((tmp_path / "out" / "CMU-1-Small-Region.run.json").read_text())
    assert not manifest["label"]["positive"] and manifest["label"]["ood"]["warning"], manifest["label"]
    found = _browse(tmp_path, ["out/report.html", "out/CMU-1-Small-Region.report.html"])["result"]["pages"]
    assert [p["badges"] for p in found] == [
        [["no tumour", BADGE["review"]], ["failed", BADGE["fail"]]],
        [["NO TUMOUR", BADGE["review"]]],
    ]
    # the failed slide's error is listed in full below the table, inside the page's width (no
    # scrolling sideways to a table's last column to read it); its badge links there
    ((error, left, right),) = found[0]["errors"]
    assert error.startswith(str(src / "zz-cut-short.svs")) and len(error) > 60, error
    assert 0 <= left < right <= found[0]["width"], found[0]
    folder_text = (tmp_path / "out" / "report.html").read_text()
    assert '<a href="#failed"><span class="label fail"' in folder_text and 'id="failed"' in folder_text
    page = (tmp_path / "out" / "CMU-1-Small-Region.report.html").read_text()
    assert 'id="label" title="not a negative result: see the warning below"' in page
    folder_page = (tmp_path / "out" / "report.html").read_text()
    assert 'title="not a negative result: see the warning on its page">no tumour<' in folder_page
    # the badge's hover text is the badge's, not the page's (a shadowed name once made it the heading)
    assert found[0]["title"] == "wsi-pipeline results: out"
    assert "<h1>wsi-pipeline results: out</h1>" in folder_page


def test_screenshot_is_not_blank(browsed: dict) -> None:
    from PIL import Image

    img = np.asarray(Image.open(browsed["screenshot"]).convert("RGB"))
    assert img.shape[0] >= 3000 and img.shape[1] >= 1200
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    assert colours > 2000, colours  # text, the label badges, slide pictures, the overlay's ramp
    assert (img.reshape(-1, 3) != 255).any(axis=1).mean() > 0.1


def test_pages_fetch_nothing_and_name_the_model(folder_run: Path, test_model: Path) -> None:
    from wsi_pipeline.inference.card import resolve_model

    card = resolve_model(test_model)
    for page in [folder_run / "report.html", *folder_run.glob("*.report.html")]:
        text = page.read_text()
        refs = re.findall(r'(?:src|href)="([^"]*)"', text)
        assert refs and all(r.startswith("data:image/") or "/" not in r for r in refs), refs
        assert "http://" not in text and "https://" not in text and "<link" not in text
        if page.name != "report.html":
            assert card.sha256 in text and card.name in text and "seconds" in text
            assert "<th>precision</th><td>fp32</td>" in text  # the CPU runs fp32, said on the page
            assert all(
                _target(folder_run, html.unescape(r)).is_file() for r in refs if not r.startswith("data:")
            )


def test_links_are_encoded_paths_or_untouched_urls() -> None:
    from wsi_pipeline.io.report import folder_report_html

    rows = [
        {"slide": "/s/a#1.svs", "report": "case 7/a#1 100%.report.html", "status": "done"},
        {"slide": "/s/b.svs", "report": "file:///D:/res/b%231.report.html", "status": "done"},
    ]
    page = folder_report_html(rows)
    assert 'href="case%207/a%231%20100%25.report.html"' in page  # a path: encoded once
    assert 'href="file:///D:/res/b%231.report.html"' in page  # a URL (another drive): as it is


def test_the_folder_page_keeps_its_title_whatever_its_rows_badges() -> None:
    """Each row's badge and hover text are the row's own: an amber row, a green row after it and a
    red one leave the page's title and heading as given."""
    from wsi_pipeline.io.report import folder_report_html

    rows = [
        {"slide": "/s/a.svs", "label": "no tumour", "positive": False, "ood_warning": True, "status": "done"},
        {"slide": "/s/b.svs", "label": "no tumour", "positive": False, "status": "done"},
        {"slide": "/s/c.svs", "label": "tumour", "positive": True, "focus_warning": True, "status": "done"},
    ]
    for order in (rows, rows[::-1]):
        page = folder_report_html(order, title="Lab 3, batch 12")
        assert "<title>Lab 3, batch 12</title>" in page and "<h1>Lab 3, batch 12</h1>" in page
        badges = re.findall(r'<span class="label (\w+)"[^>]*?( title="[^"]*")?>([^<]*)<', page)
        got = {(cls, hover != "") for cls, hover, _ in badges}
        assert got == {("review", True), ("neg", False), ("pos", False)}, badges
    stained = {"slide": "/s/d.svs", "label": "no tumour", "positive": False, "stain_warning": True}
    assert '<span class="label review"' in folder_report_html([stained])  # normalized for a raw-colour model


def test_the_folder_page_lists_failures_with_the_fix_for_slides_without_mpp() -> None:
    """Failed slides are listed under the table with their errors; slides that failed for want of an
    mpp get the folder-level fix (a CSV with one value each), which --mpp on a folder cannot give."""
    from wsi_pipeline.io.report import folder_report_html

    ok = {"slide": "/s/a.svs", "label": "tumour", "positive": True, "status": "done"}
    broken = {"slide": "/s/b.svs", "status": "failed", "error": "/s/b.svs: corrupt", "error_code": 3}
    no_mpp = {"slide": "/s/c.tif", "status": "failed", "error": "/s/c.tif: no mpp", "error_code": 4}
    assert 'id="failed"' not in folder_report_html([ok])
    page = folder_report_html([ok, broken])
    assert "Failed slides (1)" in page and "<b>b.svs</b>: <span" in page and "/s/b.svs: corrupt" in page
    assert "columns slide,mpp" not in page
    page = folder_report_html([ok, broken, no_mpp, {**no_mpp, "slide": "/s/d.tif"}])
    assert "Failed slides (3)" in page and "2 slides have no usable resolution (mpp)" in page


def test_the_evaluation_page_shows_each_slide_with_its_truth_outlined(
    folder_run: Path, tumour_slide: Fixture, tmp_path: Path
) -> None:
    """`evaluate` writes metrics.html beside metrics.json: the summary, and per slide its metrics and
    its overlay with the expert's annotation outlined (inline, one file); checked in Chromium."""
    from wsi_pipeline.evaluation.annotations import write_asap_xml

    ann = tmp_path / "annotations"
    ann.mkdir()
    write_asap_xml(ann / f"{TUMOUR}.xml", [("Tumor", e.polygon(96)) for e in tumour_slide.spec.tumour])
    r = CliRunner().invoke(main, ["evaluate", str(folder_run), "-a", str(ann), "-o", f"{tmp_path}/m/"])
    assert r.exit_code == 0, r.output
    page = tmp_path / "m" / "metrics.html"
    assert str(page) in r.output
    text = page.read_text()
    assert "Dice" in text and f"{TUMOUR}.svs" in html.unescape(text) and "no annotation file" in text
    chromium = _browser()
    harness = tmp_path / "harness.html"
    harness.write_text(_HARNESS.format(frames=f'<iframe src="{quote("m/metrics.html")}" '
                                              'style="width:1260px;height:900px;border:0"></iframe>'))  # fmt: skip
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", harness.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    m = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), proc.stderr[-2000:]
    (got,) = json.loads(html.unescape(m.group(1)))["pages"]
    assert got["title"] == "wsi-pipeline evaluation"
    assert (
        len(got["images"]) == 1
        and got["images"][0]["ok"]
        and got["images"][0]["src"].startswith("data:image/")
    )
    assert got["order"] == [f"{TUMOUR}.svs"]
