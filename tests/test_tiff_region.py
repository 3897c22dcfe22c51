"""Tile reads' fast path (issue 17): tiffslide slides' regions decoded straight from their TIFF tiles
with tifffile are the reader's own pixels at every level and edge; OpenSlide slides never use it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Fixture, shared
from wsi_pipeline.errors import SlideError
from wsi_pipeline.io import tiff_region
from wsi_pipeline.io.slide import open_slide

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"


def _same_as_the_library(reader: Any, seed: int, per_level: int = 40) -> int:
    """Random regions (inside, over the edges, at every level) read both ways; returns how many."""
    rng = np.random.default_rng(seed)
    n = 0
    for level, (w, h) in enumerate(reader.level_dimensions):
        ds = reader.level_downsamples[level]
        for _ in range(per_level):
            size = (int(rng.integers(1, 500)), int(rng.integers(1, 500)))
            loc = (round(int(rng.integers(-40, w)) * ds), round(int(rng.integers(-40, h)) * ds))
            np.testing.assert_array_equal(
                reader.read_region(loc, level, size), reader._library_read(loc, level, size),
                err_msg=f"{reader.path} level {level} at {loc} size {size}",
            )  # fmt: skip
            n += 1
    return n


@pytest.mark.filterwarnings("ignore:location=")  # tiffslide's note on regions over the edge
def test_tiffslide_regions_are_the_readers_own(aperio_slide: Fixture, generic_slide: Fixture) -> None:
    for i, path in enumerate([SAMPLE, aperio_slide.path, generic_slide.path]):
        reader = open_slide(path, "tiffslide")
        assert reader._tiles is not None and reader._tiles.levels == tuple(
            range(len(reader.level_dimensions))
        )
        assert _same_as_the_library(reader, i) > 0


@pytest.mark.filterwarnings("ignore:location=")
@pytest.mark.parametrize(
    "parts",
    [
        ("aperio", "tcga-cr-7395-01a-01-ts1.svs"),  # JPEG 2000, level 1 at downsample 2.0005
        ("tiny-fixtures", "boxes.tiff"),  # generic pyramid, downsamples 4.016 and 8.086
        ("tiny-fixtures", "small.svs"),
    ],
)
def test_real_tiffslide_slides_read_the_same_at_fractional_downsamples(parts: tuple[str, str]) -> None:
    reader = open_slide(shared("slides", *parts), "tiffslide")
    assert reader._tiles is not None
    _same_as_the_library(reader, 7)


def test_stripped_tiffs_and_openslide_readers_do_not_use_it(aperio_slide: Fixture) -> None:
    assert open_slide(SAMPLE, "openslide")._tiles is None  # type: ignore[attr-defined]
    assert open_slide(aperio_slide.path, "openslide")._tiles is None  # type: ignore[attr-defined]
    plain = open_slide(shared("slides", "plain-tiff", "kidney-48-5.tif"))  # strips, not tiles
    assert plain.backend == "tiffslide" and plain._tiles is None  # type: ignore[attr-defined]


def test_openslide_still_refuses_a_corrupt_tile(tmp_path: Path) -> None:
    """Why OpenSlide slides keep OpenSlide's reads: it refuses a corrupt JPEG tile that tifffile's
    codecs (and so tiffslide) decode into noise without a word."""
    import tifffile

    bad = tmp_path / "corrupt.svs"
    shutil.copy(SAMPLE, bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        offset, count, cols = (
            page.dataoffsets[40],
            page.databytecounts[40],
            -(-page.shape[1] // page.tilewidth),
        )
    with bad.open("r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(b"\xff\x00" * 200)
    x, y = (40 % cols) * 240, (40 // cols) * 240
    with pytest.raises(SlideError, match="cannot read pixels"):
        open_slide(bad, "openslide").read_region((x, y), 0, (240, 240))
    reader = open_slide(bad, "tiffslide")
    assert reader._tiles is not None  # type: ignore[attr-defined]
    np.testing.assert_array_equal(  # the same noise as tiffslide's own read: nothing changes there
        reader.read_region((x, y), 0, (240, 240)),
        reader._library_read((x, y), 0, (240, 240)),  # type: ignore[attr-defined]
    )


def test_probes_that_differ_mean_no_fast_path() -> None:
    reader = open_slide(SAMPLE, "tiffslide")
    assert tiff_region.tiff_tiles_for(reader, reader._library_read) is not None  # type: ignore[attr-defined]
    darker = lambda loc, level, size: reader._library_read(loc, level, size) // 2  # type: ignore[attr-defined]  # noqa: E731
    assert tiff_region.tiff_tiles_for(reader, darker) is None


def test_the_decoded_tile_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiff_region, "CACHE_BYTES", 5 * 240 * 240 * 3)
    reader = open_slide(SAMPLE, "tiffslide")
    tiles = reader._tiles  # type: ignore[attr-defined]
    assert tiles is not None
    for y in range(0, 2900, 224):
        for x in range(0, 2000, 224):
            reader.read_region((x, y), 0, (224, 224))
    assert 0 < tiles._cached_bytes <= tiff_region.CACHE_BYTES and len(tiles._cache) <= 5


def test_readers_dropped_without_close_release_their_files() -> None:
    """Reader threads' handles may be dropped with their thread, never closed: nothing stays open."""
    import gc
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc (Linux) to count open files")
    before = open_fds()
    for _ in range(30):
        reader = open_slide(SAMPLE, "tiffslide")
        assert reader._tiles is not None  # type: ignore[attr-defined]
        reader.read_region((0, 0), 0, (300, 300))
        del reader
    gc.collect()
    assert open_fds() <= before + 2
