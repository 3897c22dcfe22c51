"""Tile grid geometry and block ordering."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsi_pipeline.io.slide import LevelChoice
from wsi_pipeline.tiling.grid import block_order, make_grid


def test_grid_without_resize() -> None:
    g = make_grid((1000, 500), 2.0, LevelChoice(1, 0.5, 1.0, 0.5), tile_px=224)
    assert (g.cols, g.rows, g.read_px, g.stride_read_px) == (4, 2, 224, 224)
    np.testing.assert_array_equal(g.origins_l0(np.array([[1, 1], [3, 0]])), [[448, 448], [1344, 0]])
    assert g.tile_l0_px == 448


def test_grid_with_downscale_and_overlap() -> None:
    # 0.25 um/px level read for 0.5 um/px tiles: 448 level pixels per tile, stride (224-32)*2.
    g = make_grid((2000, 1000), 1.0, LevelChoice(0, 0.25, 0.5, 0.5), tile_px=224, overlap_px=32)
    assert (g.read_px, g.stride_read_px) == (448, 384)
    assert g.cols == (2000 - 448) // 384 + 1 and g.rows == (1000 - 448) // 384 + 1
    boxes = g.boxes_l0(g.all_positions())
    assert boxes[:, 2].max() <= 2000 and boxes[:, 3].max() <= 1000  # whole tiles only


def test_grid_smaller_than_a_tile() -> None:
    g = make_grid((100, 100), 1.0, LevelChoice(0, 0.5, 1.0, 0.5), tile_px=224)
    assert g.cols == 0 and len(g.all_positions()) == 0


def test_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        make_grid((1000, 1000), 1.0, LevelChoice(0, 0.5, 1.0, 0.5), tile_px=224, overlap_px=224)


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=200, unique=True),
    st.integers(1, 9),
)
def test_block_order_groups_blocks_contiguously(cells: list[tuple[int, int]], b: int) -> None:
    colrow = np.array(cells)
    order = block_order(colrow, b)
    assert sorted(order.tolist()) == list(range(len(cells)))  # a permutation
    keys = [tuple(k) for k in (colrow[order] // b).tolist()]
    seen: list[tuple[int, int]] = []
    for k in keys:  # each block appears in one run
        if not seen or seen[-1] != k:
            assert k not in seen
            seen.append(k)
