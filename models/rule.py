"""Check a model decision rule, written down before training, against the figures that decide it.

Example (from the repository root)::

    python -m models.rule models/rules/long-ft-immune10.json

A rule is a JSON file committed before its candidate is trained::

    {
      "name": "long-ft-immune10",
      "declared": "when and where it was written (commit)",
      "seeds": [
        {"compare": "models/runs/compare-val-X.json", "blur": "models/runs/blur-check-X.json"},
        {"compare": "models/runs/compare-val-X-s1.json", "blur": "models/runs/blur-check-X-s1.json"}
      ],
      "mean_over_seeds": {"consep_val_auc": [">=", 0.8348], "blur_auc@1": [">=", 0.8953]},
      "first_seed": {"immune_val_called": ["<=", 0.2727]},
      "every_seed": {"paired.consep_val_auc.high": [">=", 0.0]}
    }

``seeds`` lists, per seed of the candidate recipe (the first is the model that would ship), the
``models.compare --json`` file (its first row; the row whose ``model`` is the seed's ``model`` when
the seed names one, as it must for a ``--paired`` file, whose first row is the reference; or the
rule's ``candidate``) and optionally the ``models.blur_check --json`` file. A figure is a key of the
compare row (``glas_auc_adenoma_negative``), ``blur_<column>@<sigma>`` from the blur table
(``blur_auc@1`` = AUC at 1 um of blur), ``stain_<key>`` from the ``summary`` of the seed's optional
``models.stain_check --json`` file (``stain``: ``stain_auc_min``, ``stain_called_max_shift``), or
``paired.<figure>.<diff|low|high>`` from a compare row
made with ``--paired`` (the difference from the reference and its 95 % interval's ends).
``mean_over_seeds`` criteria are judged on the mean over the seeds, ``first_seed`` on the first seed
alone, ``every_seed`` on the worst seed (the lowest for a floor, the highest for a ceiling: it holds
only when every seed meets the bound). Prints every criterion with its value and verdict; exit 0 when
all pass, 1 when any fails, 2 when the rule or a figure cannot be read.

The seeds' files live in ``models/runs/``, which is not in the repository. ``--keep`` copies them into
the rule's evidence folder (``models/rules/evidence/NAME/`` for ``models/rules/NAME.json``) to be
committed with the result, and a file missing at its path is read from there, so a verdict can be
checked again from any checkout.
"""

from __future__ import annotations

import argparse
import json
import operator
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


class RuleError(ValueError):
    """A rule file or a figure it needs cannot be read."""


@dataclass(frozen=True)
class Verdict:
    """One criterion: where it is judged (``mean`` over seeds, the ``first`` seed or ``every`` seed),
    the figure, the value per seed and the value judged (for ``every``: the worst seed's), the bound
    and whether it holds."""

    scope: str
    figure: str
    per_seed: tuple[float, ...]
    value: float
    op: str
    bound: float
    holds: bool


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RuleError(f"{path}: no such {what} file (run the measurement the rule names first)") from e
    except json.JSONDecodeError as e:
        raise RuleError(f"{path}: not JSON ({e.msg} at line {e.lineno}); write it again") from e


def figure_value(
    name: str,
    compare_row: dict[str, Any],
    blur_rows: list[dict[str, Any]] | None,
    stain: dict[str, Any] | None = None,
) -> float:
    """The value of figure ``name`` (see the module docstring) for one seed."""
    if name.startswith("stain_"):
        key = name[len("stain_") :]
        value = ((stain or {}).get("summary") or {}).get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise RuleError(
                f"figure {name!r} needs the seed's 'stain' file (models.stain_check --json) with {key!r}"
            )
        return float(value)
    if name.startswith("blur_"):
        column, _, sigma = name[len("blur_") :].partition("@")
        if not sigma or blur_rows is None:
            raise RuleError(f"figure {name!r} needs a blur table (seed's 'blur' file) and '@<sigma um>'")
        for row in blur_rows:
            if abs(float(row["sigma_um"]) - float(sigma)) < 1e-9 and column in row:
                return float(row[column])
        raise RuleError(f"figure {name!r}: the blur table has no {column!r} at sigma {sigma} um")
    if name.startswith("paired."):
        _, fig, end = name.split(".", 2)
        d = (compare_row.get("paired") or {}).get(fig)
        if d is None:
            why = _why_absent(fig, compare_row) or "run it with --paired"
            raise RuleError(f"figure {name!r}: the compare row has no paired {fig!r} ({why})")
        return float({"diff": d["diff"], "low": d["ci95"][0], "high": d["ci95"][1]}[end])
    value = compare_row.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        why = _why_absent(name, compare_row)
        raise RuleError(
            f"figure {name!r} is not a number in the compare row ({value!r})" + (f": {why}" if why else "")
        )
    return float(value)


def _why_absent(name: str, compare_row: dict[str, Any]) -> str | None:
    """The compare row's own reason a figure is absent (``consep_all_auc`` -> ``consep_all_note``)."""
    note = compare_row.get(name.rsplit("_", 1)[0] + "_note")
    return str(note) if note else None


def _compare_row(rows: Any, candidate: str | None, path: Path) -> dict[str, Any]:
    if not isinstance(rows, list) or not rows:
        raise RuleError(f"{path}: not a models.compare --json file (a list of rows)")
    if candidate is None:
        return dict(rows[0])
    for row in rows:
        if Path(row.get("model", "")).as_posix() == Path(candidate).as_posix():
            return dict(row)
    raise RuleError(f"{path}: no row for the candidate {candidate}")


def evidence_dir(rule_file: Path) -> Path:
    """Where the seed files of the rule in ``rule_file`` are kept: ``evidence/<rule file stem>`` beside it."""
    return rule_file.parent / "evidence" / rule_file.stem


def seed_files(rule: dict[str, Any]) -> list[str]:
    """The compare, blur and stain files the rule's seeds name, in order."""
    return [s[k] for s in rule.get("seeds") or [] for k in ("compare", "blur", "stain") if s.get(k)]


def _locate(rel: str, root: Path, evidence: Path | None) -> Path:
    """``root / rel``, or its kept copy in ``evidence`` when the run's own file is gone."""
    path = root / rel
    if not path.exists() and evidence is not None and (evidence / Path(rel).name).exists():
        return evidence / Path(rel).name
    return path


def check(rule: dict[str, Any], root: Path = Path("."), evidence: Path | None = None) -> list[Verdict]:
    """Every criterion of ``rule`` judged on its files (paths relative to ``root``; a file that is not
    there is read from ``evidence`` when kept there)."""
    seeds = rule.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise RuleError("the rule lists no seeds (each: {'compare': ..., 'blur': ...})")
    per_seed = []
    for s in seeds:
        cpath = _locate(s["compare"], root, evidence)
        row = _compare_row(_read_json(cpath, "compare"), s.get("model", rule.get("candidate")), cpath)
        blur = _read_json(_locate(s["blur"], root, evidence), "blur table") if s.get("blur") else None
        stain = _read_json(_locate(s["stain"], root, evidence), "stain table") if s.get("stain") else None
        per_seed.append((row, blur, stain))
    out = []
    for scope, key in (("mean", "mean_over_seeds"), ("first", "first_seed"), ("every", "every_seed")):
        for figure, (op, bound) in (rule.get(key) or {}).items():
            if op not in OPS:
                raise RuleError(f"{figure}: unknown comparison {op!r} (use one of {', '.join(OPS)})")
            values = tuple(figure_value(figure, row, blur, stain) for row, blur, stain in per_seed)
            b = float(bound)
            if scope == "every":  # the worst seed decides: the lowest for a floor, the highest for a ceiling
                value = min(values) if op in (">=", ">") else max(values)
            else:
                value = sum(values) / len(values) if scope == "mean" else values[0]
            out.append(Verdict(scope, figure, values, value, op, b, OPS[op](value, b)))
    if not out:
        raise RuleError("the rule has no criteria (mean_over_seeds, first_seed, every_seed)")
    return out


def table(rule: dict[str, Any], verdicts: list[Verdict]) -> str:
    """The verdicts as a Markdown table with the rule's name and its overall result."""
    n = len(verdicts[0].per_seed) if verdicts else 0
    runs = " | ".join(f"run {i + 1}" + (" (ships)" if i == 0 else "") for i in range(n))
    lines = [
        f"rule {rule.get('name', '?')} ({rule.get('declared', 'declaration not recorded')})",
        "",
        f"| judged on | figure | {runs} | value | bound | holds |",
        "| --- | --- | " + " | ".join("---" for _ in range(n)) + " | --- | --- | --- |",
    ]
    for v in verdicts:
        shown = [f"{x:.4f}" if v.scope != "first" or i == 0 else "" for i, x in enumerate(v.per_seed)]
        seeds = " | ".join(shown)
        where = {"mean": f"mean of {n} seeds", "first": "first seed", "every": f"each of {n} seeds"}[v.scope]
        lines.append(
            f"| {where} | {v.figure} | {seeds} | {v.value:.4f} | {v.op} {v.bound:g} | "
            f"{'yes' if v.holds else '**NO**'} |"
        )
    failed = [v for v in verdicts if not v.holds]
    lines += [
        "",
        "PASS: every criterion holds"
        if not failed
        else f"FAIL: {len(failed)} of {len(verdicts)} criteria fail ({', '.join(v.figure for v in failed)})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.rule", description=__doc__.split("\n")[0])
    p.add_argument("rule", type=Path, help="the rule's JSON file")
    p.add_argument("--root", type=Path, default=Path("."), help="folder the rule's paths are relative to")
    p.add_argument(
        "--keep", action="store_true",
        help="copy the seeds' files into the rule's evidence folder (evidence/NAME/ beside the rule)",
    )  # fmt: skip
    args = p.parse_args(argv)
    evidence = evidence_dir(args.rule)
    try:
        rule = _read_json(args.rule, "rule")
        verdicts = check(rule, args.root, evidence)
    except (RuleError, KeyError, TypeError) as e:
        print(f"error: {args.rule}: {e}", file=sys.stderr)
        return 2
    print(table(rule, verdicts))
    if args.keep:
        files = seed_files(rule)
        if len({Path(rel).name for rel in files}) < len(files):
            print(f"error: {args.rule}: two seed files share a file name; name them apart", file=sys.stderr)
            return 2
        evidence.mkdir(parents=True, exist_ok=True)
        for rel in files:
            src = _locate(rel, args.root, evidence)
            if src.parent.resolve() != evidence.resolve():  # not already the kept copy
                shutil.copyfile(src, evidence / Path(rel).name)
        print(f"kept {len(files)} files in {evidence}: commit them with the result")
    return 0 if all(v.holds for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
