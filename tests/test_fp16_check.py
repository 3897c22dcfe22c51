"""The fp16 measurement that allows half precision on a card (models/fp16_check.py, issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.fp16_check import MAX_ABS_DP, compare_precisions, main

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT.parent / "shared" / "data" / "tiles" / "lc25000-lung" / "index.csv"


def _sets(dp: float, flips: int, n: int = 1000) -> dict[str, object]:
    rng = np.random.default_rng(0)
    y = (np.arange(n) % 2).astype(np.int64)
    p32 = y * 0.5 + rng.uniform(0, 0.5, n)  # classes meet at the threshold 0.5
    p16 = p32.copy()
    p16[0] += dp
    near = np.argsort(np.abs(p32 - 0.5))[:flips]  # the tiles nearest the threshold change side
    p16[near] = np.where(p32[near] >= 0.5, 0.4999, 0.5001)
    return compare_precisions(["set"], [y], [p32], [p16], 0.5)


def test_the_rule_allows_small_changes_and_refuses_large_ones() -> None:
    ok = _sets(dp=0.005, flips=2)
    assert ok["allowed"] is True and ok["label_flips"] == 2 and ok["n_tiles"] == 1000
    assert _sets(dp=MAX_ABS_DP + 0.001, flips=0)["allowed"] is False  # one tile moved too far
    assert _sets(dp=0.0, flips=6)["allowed"] is False  # 0.6 % of the tiles change label


@pytest.mark.realdata
def test_shipped_card_fp16_section_is_reproduced() -> None:
    if not INDEX.exists():
        pytest.skip(f"real data not available: {INDEX} (the shared data folder is absent)")
    assert main(["--model", str(ROOT / "models" / "tumour-cnn.onnx"), "--check"]) == 0
