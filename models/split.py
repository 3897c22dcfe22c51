"""Reading a tile index and splitting it by group, so that no group can leak across splits.

Standard library only (no numpy, no torch), so that tests and the evaluation CLI can rebuild the
exact held-out split anywhere. The split is a pure function of the group names, their strata
(the ``label`` column) and an integer seed: each group's place in the order is the SHA-256 of
``"{seed}:{group}"``, which does not depend on row order, library versions or platform.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
DEFAULT_SEED = 20260101
REQUIRED_COLUMNS = ("path", "label", "tumour", "group")


@dataclass(frozen=True)
class IndexRow:
    """One tile: absolute ``path``, source class ``label``, ``tumour`` (0/1) and its ``group``."""

    path: Path
    label: str
    tumour: int
    group: str


def read_index(index_csv: str | Path) -> list[IndexRow]:
    """Read an index CSV with at least the columns ``path,label,tumour,group``.

    ``path`` is relative to the CSV's folder (or absolute). Raises ``FileNotFoundError`` when the file
    is missing and ``ValueError`` naming the file and line when a column or value is wrong, or when one
    group holds more than one label (a group must be a single source picture).
    """
    index_csv = Path(index_csv)
    root = index_csv.resolve().parent
    rows: list[IndexRow] = []
    with index_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{index_csv}: missing column(s) {missing}; need {list(REQUIRED_COLUMNS)}")
        for line_no, rec in enumerate(reader, start=2):
            tumour = rec["tumour"].strip()
            if tumour not in ("0", "1"):
                raise ValueError(f"{index_csv}:{line_no}: tumour must be 0 or 1, got {tumour!r}")
            group = rec["group"].strip()
            if not group:
                raise ValueError(f"{index_csv}:{line_no}: empty group; every tile needs its source group")
            path = Path(rec["path"])
            rows.append(
                IndexRow(path if path.is_absolute() else root / path, rec["label"], int(tumour), group)
            )
    if not rows:
        raise ValueError(f"{index_csv}: no rows")
    check_groups(rows, source=str(index_csv))
    return rows


def check_groups(rows: Iterable[IndexRow], source: str = "index") -> None:
    """Raise ``ValueError`` when a group carries more than one label or tumour value."""
    seen: dict[str, tuple[str, int]] = {}
    for r in rows:
        first = seen.setdefault(r.group, (r.label, r.tumour))
        if first != (r.label, r.tumour):
            raise ValueError(
                f"{source}: group {r.group!r} mixes {first} and {(r.label, r.tumour)}; "
                "a group must be one source picture with one label"
            )


def _order_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_groups(
    groups: Sequence[str],
    strata: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, list[str]]:
    """Assign whole groups to ``train``/``val``/``test``, stratified by ``strata``.

    ``groups[i]`` and ``strata[i]`` describe row ``i`` (rows of one group must share a stratum).
    Within each stratum the groups are ordered by ``sha256(f"{seed}:{group}")``; the first
    ``round(n * fractions[2])`` go to test, the next ``round(n * fractions[1])`` to val and the rest
    to train (at least one group each for val and test when the stratum has 3 or more groups and
    their fraction is positive). Returns the sorted group names per split.
    """
    if len(groups) != len(strata):
        raise ValueError(f"groups ({len(groups)}) and strata ({len(strata)}) differ in length")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    stratum_of: dict[str, str] = {}
    for g, s in zip(groups, strata, strict=True):
        if stratum_of.setdefault(g, s) != s:
            raise ValueError(f"group {g!r} appears in strata {stratum_of[g]!r} and {s!r}")
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    for stratum in sorted(set(stratum_of.values())):
        members = sorted(
            (g for g, s in stratum_of.items() if s == stratum), key=lambda g: _order_key(seed, g)
        )
        n = len(members)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        if n >= 3:
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        out["test"] += members[:n_test]
        out["val"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    return {name: sorted(gs) for name, gs in out.items()}


def split_rows(
    rows: Sequence[IndexRow],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> dict[str, list[int]]:
    """Row indices per split, by group and stratified by ``label`` (see ``split_groups``)."""
    parts = split_groups([r.group for r in rows], [r.label for r in rows], fractions, seed)
    where = {g: name for name, gs in parts.items() for g in gs}
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, r in enumerate(rows):
        out[where[r.group]].append(i)
    return out


def split_summary(rows: Sequence[IndexRow], split: dict[str, list[int]]) -> dict[str, dict[str, object]]:
    """Tiles and groups per split, in total and per label (for logs and the model card)."""
    summary: dict[str, dict[str, object]] = {}
    for name, idx in split.items():
        per_label: dict[str, dict[str, int]] = {}
        for label in sorted({rows[i].label for i in idx}):
            sel = [rows[i] for i in idx if rows[i].label == label]
            per_label[label] = {"tiles": len(sel), "groups": len({r.group for r in sel})}
        summary[name] = {
            "tiles": len(idx),
            "groups": len({rows[i].group for i in idx}),
            "tumour_tiles": sum(rows[i].tumour for i in idx),
            "per_label": per_label,
        }
    return summary


def sample_rows(indices: Sequence[int], rows: Sequence[IndexRow], n: int, seed: int = 0) -> list[int]:
    """A deterministic sample of ``n`` of ``indices``, ordered by a hash of ``seed`` and the file name."""
    keyed = sorted(indices, key=lambda i: _order_key(seed, rows[i].path.name + "|" + rows[i].group))
    return sorted(keyed[:n])
