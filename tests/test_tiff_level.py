"""The thumbnail's fast path (issue 17): a small TIFF level decoded whole by tifffile is used only
when its pixels are exactly the slide reader's, and thumbnails are the same either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wsi_pipeline.io.tiff_level as tiff_level
from conftest import Fixture, shared
from wsi_pipeline.io.slide import ArraySlide, open_slide, read_thumbnails
from wsi_pipeline.io.tiff_level import decode_level

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "CMU-1-Small-Region.svs"


def _whole_level(reader: Any, level: int) -> np.ndarray:
    w, h = reader.level_dimensions[level]
    return np.asarray(reader.read_region((0, 0), level, (w, h)))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_the_bundled_sample_is_decoded_whole_with_the_readers_pixels(backend: str) -> None:
    reader = open_slide(SAMPLE, backend)
    got = decode_level(reader, 0, workers=2)
    assert got is not None  # the sample's thumbnail takes the fast path
    np.testing.assert_array_equal(got, _whole_level(reader, 0))


@pytest.mark.parametrize(
    "parts",
    [
        ("aperio", "tcga-cr-7395-01a-01-ts1.svs"),
        ("plain-tiff", "kidney-48-5.tif"),
        ("tiny-fixtures", "small.svs"),
        ("tiny-fixtures", "boxes.tiff"),
        ("hamamatsu", "test3-TRITC-2-560.ndpi"),
    ],
)
def test_real_slides_get_the_readers_pixels_or_no_fast_path(parts: tuple[str, str]) -> None:
    """Every level of real slides: decoded whole only when equal to the reader's whole level."""
    path = shared("slides", *parts)
    reader = open_slide(path)
    for level, (w, h) in enumerate(reader.level_dimensions):
        if w * h > tiff_level.WHOLE_LEVEL_MAX_PX:
            assert decode_level(reader, level) is None
            continue
        got = decode_level(reader, level, workers=2)
        if got is not None:
            np.testing.assert_array_equal(got, _whole_level(reader, level), err_msg=f"{path} level {level}")


def test_thumbnails_are_the_same_with_and_without_the_fast_path(
    aperio_slide: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for path, mpp in ((SAMPLE, 0.499), (aperio_slide.path, 0.25)):
        reader = open_slide(path, "openslide")
        level = len(reader.level_dimensions) - 1
        assert decode_level(reader, level) is not None
        fast = read_thumbnails(reader, mpp, [8.0, 2 * mpp], workers=2)
        with monkeypatch.context() as m:
            m.setattr(tiff_level, "decode_level", lambda *a, **k: None)
            slow = read_thumbnails(reader, mpp, [8.0, 2 * mpp], workers=2)
        for a, b in zip(fast, slow, strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                assert a.downsample == b.downsample
                np.testing.assert_array_equal(a.image, b.image)


class _OtherPixels:
    """A reader whose pixels differ from the file's (as a reader with its own colour handling would)."""

    def __init__(self, reader: Any) -> None:
        self._r = reader
        self.path, self.backend = reader.path, reader.backend
        self.level_dimensions, self.level_downsamples = reader.level_dimensions, reader.level_downsamples

    def read_region(self, loc: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(self._r.read_region(loc, level, size)) // 2


def test_pixels_that_differ_from_the_readers_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    other = _OtherPixels(open_slide(SAMPLE, "openslide"))
    assert decode_level(other, 0) is None
    (thumb,) = read_thumbnails(other, 0.499, [8.0])  # type: ignore[arg-type]
    monkeypatch.setattr(tiff_level, "decode_level", lambda *a, **k: None)
    (own,) = read_thumbnails(other, 0.499, [8.0])  # type: ignore[arg-type]
    assert thumb is not None and own is not None
    np.testing.assert_array_equal(thumb.image, own.image)  # the reader's pixels, not the file's


def test_large_levels_and_non_tiff_sources_are_read_through_the_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reader = open_slide(SAMPLE, "openslide")
    monkeypatch.setattr(tiff_level, "WHOLE_LEVEL_MAX_PX", 2220 * 2967 - 1)
    assert decode_level(reader, 0) is None
    img = np.full((64, 64, 3), 200, np.uint8)
    assert decode_level(ArraySlide(img, mpp=0.5, downsamples=(1,)), 0) is None


@pytest.mark.parametrize("fast", [True, False])
def test_thumbnails_of_a_fractional_downsample_level_are_its_exact_pixels(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tcga-cr's level 1 has downsample 2.0005. Its thumbnail is the level's own pixels box-averaged,
    decoded whole or read in blocks through tiffslide (each block starting on its level pixel: it
    once started on round(x * ds), which tiffslide truncates to the pixel before: seams)."""
    from wsi_pipeline.io.resample import box_mean

    reader = open_slide(shared("slides", "aperio", "tcga-cr-7395-01a-01-ts1.svs"), "tiffslide")
    ds = reader.level_downsamples[1]
    assert not float(ds).is_integer()
    if not fast:
        monkeypatch.setattr(tiff_level, "decode_level", lambda *a, **k: None)
    (thumb,) = read_thumbnails(reader, 0.25, [0.25 * ds * 2], block_px=256)
    assert thumb is not None and thumb.downsample == pytest.approx(2 * ds)
    np.testing.assert_array_equal(thumb.image, box_mean(_whole_level(reader, 1), 2, pad=255))


def test_scored_tiles_come_from_openslide_which_refuses_a_corrupt_tile(
    tmp_path: Path, test_model: Path
) -> None:
    """The thumbnail's fast path decodes a corrupt JPEG tile into noise without a word (tifffile's
    codecs); the tiles under tissue are scored from OpenSlide's reads, which refuse it: the run stops
    with an error naming the slide, and writes nothing."""
    import shutil

    import tifffile

    from wsi_pipeline.errors import SlideError
    from wsi_pipeline.pipeline import run_slide

    bad = tmp_path / "corrupt.svs"
    shutil.copy(SAMPLE, bad)
    with tifffile.TiffFile(bad) as tf:
        offset, count = tf.pages[0].dataoffsets[74], tf.pages[0].databytecounts[74]  # under tissue
    with bad.open("r+b") as fh:
        fh.seek(offset + count // 3)
        fh.write(b"\xff\x00" * 200)
    assert decode_level(open_slide(bad, "openslide"), 0) is not None  # the thumbnail took the fast path
    out = tmp_path / "out" / "x.tif"
    with pytest.raises(SlideError, match=r"corrupt\.svs: cannot read pixels.*Corrupt JPEG data"):
        run_slide(bad, out, model=test_model)
    assert not out.parent.exists()
