"""models.rule: a decision rule written before training, checked against the files that decide it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.rule import RuleError, check, figure_value, main


def _seed(tmp_path: Path, name: str, consep: float, immune_called: float, blur_auc: float) -> dict[str, str]:
    compare = [
        {
            "model": f"models/runs/{name}/tumour-cnn.onnx",
            "consep_val_auc": consep,
            "immune_val_called": immune_called,
            "paired": {"consep_val_auc": {"diff": -0.01, "ci95": [-0.13, 0.12]}},
        }
    ]
    blur = [{"sigma_um": 0.0, "auc": 0.99}, {"sigma_um": 1.0, "auc": blur_auc}]
    (tmp_path / f"{name}.compare.json").write_text(json.dumps(compare))
    (tmp_path / f"{name}.blur.json").write_text(json.dumps(blur))
    return {"compare": f"{name}.compare.json", "blur": f"{name}.blur.json"}


def _rule(tmp_path: Path, consep_floor: float) -> dict:
    return {
        "name": "r",
        "declared": "before training",
        "seeds": [_seed(tmp_path, "a", 0.81, 0.18, 0.99), _seed(tmp_path, "b", 0.85, 0.40, 0.97)],
        "mean_over_seeds": {"consep_val_auc": [">=", consep_floor], "blur_auc@1": [">=", 0.9]},
        "first_seed": {"immune_val_called": ["<=", 0.2727], "paired.consep_val_auc.low": [">=", -0.15]},
    }


def test_rule_judges_means_over_seeds_and_the_first_seed_alone(tmp_path: Path) -> None:
    """The mean of 0.81 and 0.85 is 0.83: it passes a floor of 0.83 and fails 0.8348 (the session-32
    miss); the first seed's 0.18 inflamed called passes <= 0.2727 although the second seed's 0.40
    would not; the blur figure is read at its sigma and the paired one from the interval's end."""
    verdicts = {(v.scope, v.figure): v for v in check(_rule(tmp_path, 0.83), tmp_path)}
    consep = verdicts[("mean", "consep_val_auc")]
    assert consep.per_seed == (0.81, 0.85) and consep.value == pytest.approx(0.83) and consep.holds
    assert verdicts[("mean", "blur_auc@1")].value == pytest.approx(0.98)
    assert (
        verdicts[("first", "immune_val_called")].value == 0.18
        and verdicts[("first", "immune_val_called")].holds
    )
    assert verdicts[("first", "paired.consep_val_auc.low")].value == -0.13
    failed = [v for v in check(_rule(tmp_path, 0.8348), tmp_path) if not v.holds]
    assert [(v.scope, v.figure) for v in failed] == [("mean", "consep_val_auc")]


def test_rule_cli_exit_codes_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for floor, code, verdict in (
        (0.83, 0, "PASS"),
        (0.8348, 1, "FAIL: 1 of 4 criteria fail (consep_val_auc)"),
    ):
        path = tmp_path / f"rule-{floor}.json"
        path.write_text(json.dumps(_rule(tmp_path, floor)))
        assert main([str(path), "--root", str(tmp_path)]) == code
        out = capsys.readouterr().out
        assert verdict in out and "| mean of 2 seeds | consep_val_auc | 0.8100 | 0.8500 | 0.8300 |" in out
    broken = _rule(tmp_path, 0.83)
    broken["seeds"][1]["compare"] = "missing.json"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert main([str(path), "--root", str(tmp_path)]) == 2
    assert "missing.json: no such compare file" in capsys.readouterr().err


def test_rule_refuses_what_it_cannot_judge(tmp_path: Path) -> None:
    rule = _rule(tmp_path, 0.83)
    with pytest.raises(RuleError, match="unknown comparison"):
        check({**rule, "mean_over_seeds": {"consep_val_auc": ["=>", 0.8]}}, tmp_path)
    with pytest.raises(RuleError, match="not a number"):
        check({**rule, "first_seed": {"no_such_figure": [">=", 0.8]}}, tmp_path)
    with pytest.raises(RuleError, match="no 'auc' at sigma 2"):
        figure_value("blur_auc@2", {}, [{"sigma_um": 1.0, "auc": 0.9}])
    with pytest.raises(RuleError, match="no criteria"):
        check({"seeds": rule["seeds"]}, tmp_path)
    # a figure models.compare left out on purpose: the rule says the compare row's reason
    note = "trained on CoNSeP's train tiles (--consep or --immune-fraction): not a validation set"
    drew = {"consep_all_auc": None, "consep_all_note": note, "paired": {}}
    with pytest.raises(RuleError, match=r"not a number in the compare row \(None\): trained on CoNSeP"):
        figure_value("consep_all_auc", drew, None)
    with pytest.raises(RuleError, match=r"no paired 'consep_all_auc' \(trained on CoNSeP"):
        figure_value("paired.consep_all_auc.diff", drew, None)
    with pytest.raises(RuleError, match="run it with --paired"):
        figure_value("paired.consep_val_auc.diff", {"consep_val_auc": 0.8}, None)


def test_every_seed_criteria_hold_only_when_each_seed_meets_the_bound(tmp_path: Path) -> None:
    """``every_seed``: the mean of 0.18 and 0.40 (0.29) is not what is judged; the second seed's 0.40
    fails <= 0.2727 and is the value shown; a paired file's first row is the reference, so a seed with
    ``model`` is judged on its own row, not on the reference's."""
    rule = _rule(tmp_path, 0.83)
    rule["every_seed"] = {"immune_val_called": ["<=", 0.2727], "consep_val_auc": [">=", 0.80]}
    verdicts = {(v.scope, v.figure): v for v in check(rule, tmp_path)}
    immune = verdicts[("every", "immune_val_called")]
    assert immune.per_seed == (0.18, 0.40) and immune.value == 0.40 and not immune.holds
    consep = verdicts[("every", "consep_val_auc")]
    assert consep.holds and consep.value == 0.81  # the worst seed for a floor: the lowest
    paired = [
        {"model": "models/tumour-cnn.onnx", "consep_val_auc": 0.82, "immune_val_called": 0.27},
        {"model": "models/runs/c/tumour-cnn.onnx", "consep_val_auc": 0.79, "immune_val_called": 0.0},
    ]
    (tmp_path / "c.compare.json").write_text(json.dumps(paired))
    one = {
        "seeds": [{"compare": "c.compare.json", "model": "models/runs/c/tumour-cnn.onnx"}],
        "every_seed": {"consep_val_auc": [">=", 0.80]},
    }
    (v,) = check(one, tmp_path)
    assert v.value == 0.79 and not v.holds
    with pytest.raises(RuleError, match="no row for the candidate models/runs/d"):
        check({**one, "seeds": [{"compare": "c.compare.json", "model": "models/runs/d/x.onnx"}]}, tmp_path)


def test_kept_evidence_lets_a_verdict_be_checked_again_once_the_runs_are_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--keep copies the seeds' files beside the rule (evidence/NAME/); with the runs deleted (a fresh
    checkout has no models/runs) the rule reads them from there and gives the same table."""
    runs = tmp_path / "runs"
    runs.mkdir()
    rule = _rule(runs, 0.8348)
    rules = tmp_path / "rules"
    rules.mkdir()
    path = rules / "r.json"
    path.write_text(json.dumps(rule))
    assert main([str(path), "--root", str(runs), "--keep"]) == 1
    first = capsys.readouterr().out
    kept = sorted(p.name for p in (rules / "evidence" / "r").iterdir())
    assert kept == ["a.blur.json", "a.compare.json", "b.blur.json", "b.compare.json"]
    for f in runs.iterdir():
        f.unlink()
    assert main([str(path), "--root", str(runs)]) == 1
    again = capsys.readouterr().out
    assert again == first.split("\nkept ")[0] + "\n"
    # without the kept copies the missing run is named, as before
    for f in (rules / "evidence" / "r").iterdir():
        f.unlink()
    assert main([str(path), "--root", str(runs)]) == 2
    assert "a.compare.json: no such compare file" in capsys.readouterr().err


RULES = Path(__file__).resolve().parents[1] / "models" / "rules"


@pytest.mark.parametrize(
    "rule",
    sorted(p for p in RULES.glob("*.json") if (RULES / "evidence" / p.stem).is_dir()),
    ids=lambda p: p.stem,
)
def test_every_rule_with_kept_evidence_gives_its_recorded_verdict(
    rule: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The repository's rules whose files were kept are judged again from those files alone (a root
    with no runs), and give the verdict their result commits recorded."""
    recorded = {
        "blur-fold10-s23": (1, "FAIL: 6 of 21 criteria fail"),
        "ens-0.4.0-s234": (1, "FAIL: 1 of 13 criteria fail (immune_val_called)"),
        "swa-0.4.0-s23": (
            1,
            "FAIL: 8 of 18 criteria fail (glas_auc_without_adenoma, glas_auc_adenoma_negative",
        ),
        "norm-train-0.4.0": (
            1,
            "FAIL: 5 of 10 criteria fail (stain_called_max_shift, glas_auc_without_adenoma",
        ),
        "stainrot-0.4.0-s23": (
            1,
            "FAIL: 5 of 17 criteria fail (stain_called_max_shift, glas_auc_without_adenoma",
        ),
        "macenko-0.4.0-s23": (
            1,
            "FAIL: 4 of 17 criteria fail (glas_auc_without_adenoma, immune_val_mean_p",
        ),
        "stainmix-0.4.0-s23": (
            1,
            "FAIL: 4 of 17 criteria fail (stain_called_max_shift, immune_val_mean_p, stain_called_max_shift",
        ),
    }
    assert rule.stem in recorded, f"{rule.name} has kept evidence: add the verdict its result commit recorded"
    code, verdict = recorded[rule.stem]
    assert main([str(rule), "--root", str(tmp_path)]) == code
    assert verdict in capsys.readouterr().out
