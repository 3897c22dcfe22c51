"""box_mean, the one integer-factor box downsampler: equal to a plain reshape-and-sum reference with
round-half-up, for single images and batches, divisible or not, padded or cropped at the edges."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline.io.resample import box_mean
from wsi_pipeline.io.slide import ArraySlide
from wsi_pipeline.tiling.read import resize_tiles


def reference(image: np.ndarray, k: int) -> np.ndarray:
    """Means of whole k x k blocks (partial edge blocks dropped), rounded half up, in int64."""
    h, w, c = image.shape[-3] // k, image.shape[-2] // k, image.shape[-1]
    x = image[..., : h * k, : w * k, :].astype(np.int64)
    sums = x.reshape(*x.shape[:-3], h, k, w, k, c).sum(axis=(-4, -2))
    return ((sums + k * k // 2) // (k * k)).astype(np.uint8)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 8, 16, 17, 32])
@pytest.mark.parametrize("shape", [(96, 160, 3), (101, 67, 3), (64, 64, 4)])
def test_equals_the_reference(k: int, shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(k).integers(0, 256, shape, dtype=np.uint8)
    out = box_mean(image, k)
    assert out.dtype == np.uint8 and out.shape == (shape[0] // k, shape[1] // k, shape[2])
    assert np.array_equal(out, reference(image, k))


@pytest.mark.parametrize("k", [2, 3, 16])
def test_batch_equals_per_image(k: int) -> None:
    batch = np.random.default_rng(1).integers(0, 256, (2, 3, 50, 70, 3), dtype=np.uint8)
    out = box_mean(batch, k)
    assert out.shape == (2, 3, 50 // k, 70 // k, 3)
    for i in range(2):
        for j in range(3):
            assert np.array_equal(out[i, j], box_mean(batch[i, j], k))


@pytest.mark.parametrize("k", [2, 3, 8])
def test_pad_fills_partial_edge_blocks(k: int) -> None:
    image = np.random.default_rng(2).integers(0, 256, (4, 29, 45, 3), dtype=np.uint8)
    out = box_mean(image, k, pad=255)
    hp, wp = -(-29 // k) * k, -(-45 // k) * k
    padded = np.full((4, hp, wp, 3), 255, np.uint8)
    padded[:, :29, :45] = image
    assert out.shape == (4, hp // k, wp // k, 3)
    assert np.array_equal(out, reference(padded, k))
    whole = image[:, : 24 // k * k, : 40 // k * k]  # divisible: padding changes nothing
    assert np.array_equal(box_mean(whole, k, pad=0), box_mean(whole, k))


def test_ties_round_half_up() -> None:
    # 2 x 2 blocks with means 0.5, 2.5 and 254.5: half up gives 1, 3, 255 (half-even would give 0, 2, 254)
    image = np.array([[[0], [0], [2], [2], [254], [254]], [[1], [1], [3], [3], [255], [255]]], np.uint8)
    assert box_mean(image, 2).ravel().tolist() == [1, 3, 255]


@pytest.mark.parametrize("k", [16, 17, 64, 300])
def test_no_overflow_at_the_accumulator_limits(k: int) -> None:
    white = np.full((2, k, 2 * k, 3), 255, np.uint8)
    assert np.all(box_mean(white, k) == 255)


def test_factor_one_and_errors() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    assert box_mean(image, 1) is image
    assert box_mean(image, 5).shape == (0, 0, 3)  # smaller than a block: nothing whole remains
    with pytest.raises(ValueError, match="uint8"):
        box_mean(image.astype(np.float32), 2)
    with pytest.raises(ValueError, match="uint8"):
        box_mean(np.zeros((4, 4), np.uint8), 2)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="positive integer"):
            box_mean(image, bad)  # type: ignore[arg-type]


def test_pipeline_callers_use_it() -> None:
    """The tiler's integer resize and ArraySlide's pyramid are box_mean (cropped, resp. white-padded)."""
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (5, 448, 448, 3), dtype=np.uint8)
    assert np.array_equal(resize_tiles(tiles, 224), reference(tiles, 2))
    image = rng.integers(0, 256, (50, 61, 3), dtype=np.uint8)
    level = ArraySlide(image, downsamples=(1, 4)).read_region((0, 0), 1, (16, 13))
    padded = np.full((52, 64, 3), 255, np.uint8)
    padded[:50, :61] = image
    assert np.array_equal(level, reference(padded, 4)[:13, :16])
