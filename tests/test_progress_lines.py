"""Progress where output is not a terminal (a SLURM log, cron mail, ``docker logs``): plain lines with
tiles done, tiles/s and ETA at most every ``$WSI_PIPELINE_PROGRESS_SECONDS``, never bar frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import Fixture
from wsi_pipeline.cli import main
from wsi_pipeline.progress_lines import DEFAULT_INTERVAL_S, FolderClock, LineProgress, clock_text, interval_s


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_are_rate_limited_and_carry_rate_and_eta() -> None:
    clock, lines = FakeClock(), []
    p = LineProgress("big.svs", lines.append, every_s=30, clock=clock)
    p(1000, 9000)  # a resumed slide: 1,000 tiles were done before this run
    clock.t += 10
    p(1500, 9000)
    assert lines == []  # less than 30 s since the start
    clock.t += 20
    p(2500, 9000)  # 1,500 tiles in 30 s: 50 tiles/s, 6,500 left: 130 s
    assert lines == ["big.svs: 2,500/9,000 tiles (27%), 50.0 tiles/s, ETA 0:02:10"]
    clock.t += 29
    p(3000, 9000)
    assert len(lines) == 1
    clock.t += 3600
    p(9000, 9000)  # done: the result line follows, no progress line
    assert len(lines) == 1
    clock.t += 1
    p(8999, 9000)
    assert lines[-1].startswith("big.svs: 8,999/9,000 tiles (99%)") and lines[-1].endswith("ETA 0:00:01")


def test_a_stalled_slide_says_its_eta_is_unknown() -> None:
    clock, lines = FakeClock(), []
    p = LineProgress("s.svs", lines.append, every_s=0, clock=clock)
    p(0, 10)
    clock.t += 5
    p(0, 10)
    assert lines == ["s.svs: 0/10 tiles (0%), 0.0 tiles/s, ETA unknown"]


def test_folder_clock_adds_elapsed_and_eta_from_the_second_slide() -> None:
    clock = FakeClock()
    folder = FolderClock(clock)
    assert folder.line(1, 4, "a.svs") == "[1/4] a.svs"
    clock.t += 90
    assert folder.line(2, 4, "b.svs") == "[2/4] b.svs (folder: 0:01:30 so far, ETA 0:04:30)"
    assert clock_text(3725.2) == "1:02:06"


@pytest.mark.parametrize(("raw", "want"), [("0", 0.0), ("2.5", 2.5), ("", None), ("-1", None), ("x", None),
                                           ("nan", None)])  # fmt: skip
def test_interval_from_the_environment(raw: str, want: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_PIPELINE_PROGRESS_SECONDS", raw)
    assert interval_s() == (DEFAULT_INTERVAL_S if want is None else want)


def _folder(tumour_slide: Fixture, benign_slide: Fixture, tmp_path: Path) -> Path:
    d = tmp_path / "slides"
    d.mkdir()
    for p in (tumour_slide.path, benign_slide.path):
        shutil.copy(p, d / p.name)
    return d


def test_a_folder_run_into_a_log_prints_progress_lines_not_bar_frames(
    tumour_slide: Fixture, benign_slide: Fixture, test_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    src = _folder(tumour_slide, benign_slide, tmp_path)
    args = [str(src), "--out", str(tmp_path / "res") + "/", "--model", str(test_model), "--batch-size", "8"]
    monkeypatch.setenv("WSI_PIPELINE_PROGRESS_SECONDS", "0")  # a line at every update
    r = CliRunner().invoke(main, args)  # CliRunner's stdout is no terminal, as a log file is not
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "━" not in r.stdout and "\r" not in r.stdout  # no bar frames
    progress = [ln for ln in lines if " tiles (" in ln and "tiles/s, ETA " in ln]
    assert any(ln.startswith("benign.svs: ") for ln in progress)
    assert any(ln.startswith("tumour.svs: ") for ln in progress)
    assert lines[0] == "[1/2] benign.svs"
    assert any(ln.startswith("[2/2] tumour.svs (folder: ") and "ETA" in ln for ln in lines)
    # At the default interval a short slide prints only its start and result lines.
    monkeypatch.delenv("WSI_PIPELINE_PROGRESS_SECONDS")
    r = CliRunner().invoke(main, [*args, "--overwrite"])
    assert r.exit_code == 0, r.stderr
    assert not [ln for ln in r.stdout.splitlines() if "tiles/s, ETA" in ln]
    assert "━" not in r.stdout
    # --quiet: no progress at all.
    monkeypatch.setenv("WSI_PIPELINE_PROGRESS_SECONDS", "0")
    r = CliRunner().invoke(main, [*args, "--overwrite", "-q"])
    assert r.exit_code == 0 and "tiles/s, ETA" not in r.stdout


def test_tile_into_a_log_prints_progress_lines(
    tumour_slide: Fixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSI_PIPELINE_PROGRESS_SECONDS", "0")
    r = CliRunner().invoke(main, ["tile", str(tumour_slide.path), "--out", str(tmp_path / "t.zarr")])
    assert r.exit_code == 0, r.stderr
    assert any(ln.startswith("tumour.svs: ") and "tiles/s, ETA" in ln for ln in r.stdout.splitlines())
    result = r.stdout.splitlines()[-1]
    assert " written) in " in result and "written, written" not in result
