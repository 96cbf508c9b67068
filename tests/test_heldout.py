"""
The held-out test split, harness and reporting side: keeps are scored on the test rows by the
real evaluator process, the ratchet never reads the result, and summary / log / compare show
val and test side by side and flag the val gains the test rows do not confirm.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import arun.cli
from arun.cli import cli
from arun.core.ledger import Ledger, ledger_path
from arun.core.ratchet import best_record, decide
from arun.report.val_vs_test import NOT_CONFIRMED, NOT_REAL, held_out, heldout_lines, heldout_report
from helpers_repo import empty_repo

TAG = "cuda-cpu-test"
KID = "k_test"


def rec(n: int, status: str, val: float | None, test: float | None = None, *, baseline: bool = False,
        description: str = "") -> dict:
    r = {"id": f"r{n:03d}", "time": f"2026-03-05T{n // 60:02d}:{n % 60:02d}:00+0000", "key_id": KID, "tag": TAG,
         "backend": "cuda", "status": status, "baseline": baseline, "val_bpb": val, "description": description,
         "key": {"backend": "cuda", "hardware": TAG, "dataset": "pystdlib", "profile": "tiny", "time_budget": 60.0},
         "commit": f"{n:040d}", "wall_seconds": 70.0}
    if test is not None:
        r["test_bpb"] = test
    return r


def honest_night() -> list[dict]:
    return [rec(1, "keep", 1.00, 1.01, baseline=True, description="baseline"),
            rec(2, "discard", 1.02),
            rec(3, "keep", 0.95, 0.96, description="wider"),
            rec(4, "crash", None),
            rec(5, "keep", 0.90, 0.915, description="deeper")]


def lucky_night() -> list[dict]:
    """Three keeps on val; the second one reverses on test, and little of the total holds."""
    return [rec(1, "keep", 1.00, 1.01, baseline=True, description="baseline"),
            rec(2, "keep", 0.99, 1.005, description="lr 0.05"),
            rec(3, "keep", 0.98, 1.02, description="seed luck"),
            rec(4, "discard", 0.985),
            rec(5, "keep", 0.97, 1.00, description="warmdown")]


# =========================================================================== the pure function


@pytest.mark.unit
def test_an_honest_night_is_confirmed() -> None:
    h = held_out(honest_night(), KID)
    assert (h.start_val, h.end_val, h.start_test, h.end_test) == (1.00, 0.90, 1.01, 0.915)
    assert h.val_gain == pytest.approx(0.10) and h.test_gain == pytest.approx(0.095)
    assert not h.unconfirmed and not h.not_real
    lines = heldout_lines(h)
    assert lines[0] == ("  val 1.000000 -> 0.900000 (-0.100000) | test 1.010000 -> 0.915000 (-0.095000), "
                        "95% of the val gain")
    assert len(lines) == 1


@pytest.mark.unit
def test_unconfirmed_keeps_and_a_night_that_is_mostly_luck_are_flagged() -> None:
    h = held_out(lucky_night(), KID)
    assert [u.id for u in h.unconfirmed] == ["r003"]   # test 1.02 after 1.005; r002 and r005 improve on test
    u = h.unconfirmed[0]
    assert u.val_change == pytest.approx(-0.01) and u.test_change == pytest.approx(0.015)
    assert h.val_gain == pytest.approx(0.03) and h.test_gain == pytest.approx(0.01)
    assert h.not_real
    text = "\n".join(heldout_lines(h))
    assert f"! {NOT_CONFIRMED}: id r003 (val -0.010000, test +0.015000" in text and "seed luck" in text
    assert f"! {NOT_REAL}" in text and "33% of the val gain" in text


@pytest.mark.unit
def test_a_period_is_measured_from_the_best_when_it_began() -> None:
    records = lucky_night()
    h = held_out(records, KID, period_ids={"r004", "r005"})
    assert (h.start_val, h.start_test, h.end_val, h.end_test) == (0.98, 1.02, 0.97, 1.00)
    assert not h.unconfirmed and not h.not_real   # r003 is before the period; the period's keep holds on test


@pytest.mark.unit
def test_records_without_test_rows_are_never_flagged() -> None:
    legacy = [{k: v for k, v in r.items() if k != "test_bpb"} for r in lucky_night()]
    h = held_out(legacy, KID)
    assert h.start_test is None and h.end_test is None and not h.unconfirmed and not h.not_real
    lines = heldout_lines(h)
    assert "test - -> -" in lines[0] and "not scored" in lines[1]


@pytest.mark.unit
def test_the_ratchet_never_reads_test_bpb() -> None:
    """A terrible test_bpb does not stop a better val from being kept, nor from being the best."""
    records = [rec(1, "keep", 1.00, 1.00, baseline=True), rec(2, "keep", 0.99, 9.99)]
    best = best_record(records, KID)
    assert best["id"] == "r002"
    assert decide(0.985, best) == ("keep", False)            # beats val 0.99, whatever its test rows say
    assert decide(0.995, best)[0] == "discard"               # a better test_bpb would not have saved it


# =========================================================================== the commands, on a real ledger


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = empty_repo(tmp_path / "repo")
    led = Ledger(ledger_path(repo, TAG))
    for r in lucky_night():
        led.append(r)
    return repo


@pytest.mark.parametrize("command", [["summary"], ["log"], ["log", "--tag", TAG], ["compare"]])
def test_commands_show_val_and_test_side_by_side(command: list[str], repo: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.setattr(arun.cli.console, "width", 250)
    out = CliRunner().invoke(cli, command)
    assert out.exit_code == 0, out.output
    text = out.output
    assert "val 1.000000 -> 0.970000 (-0.030000) | test 1.010000 -> 1.000000 (-0.010000)" in text, text
    assert f"{NOT_CONFIRMED}: id r003" in text and NOT_REAL in text


@pytest.mark.unit
def test_report_names_each_key() -> None:
    other = [dict(r, key_id="k_other", id=f"o{i}") for i, r in enumerate(honest_night())]
    lines = heldout_report(lucky_night() + other)
    assert lines[0] == f"held-out test rows, key {KID} (cuda, 60s):"
    assert "held-out test rows, key k_other (cuda, 60s):" in lines
    assert sum(NOT_REAL in line for line in lines) == 1   # the honest key is not flagged


# =========================================================================== the harness's test scoring


def test_score_test_scores_each_seed_on_the_test_rows(data_env: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from arun.core.context import experiment_context
    from arun.core.heldout import run_artifacts, score_test
    from engines import get_engine
    from engines.evaluator import evaluate_bpb
    from prepare import PreparedData
    from test_artifact import Built
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    repo = Path(__file__).resolve().parents[1]  # its fixed code is what the evaluator runs and the key pins
    ctx = experiment_context(repo, "cuda", 5.0, "cpu", verify_data=True)
    built = Built("cuda")
    first = tmp_path / "forward0.pt2"
    built.export(first)
    second = shutil.copy(first, tmp_path / "forward1.pt2")
    lines: list[str] = []

    fields = score_test(ctx, [first, second], tmp_path, log=lines.append)
    data = PreparedData(data_env)
    expected = evaluate_bpb(get_engine("cuda"), built.honest, 16, data.test_rows(), data.token_bytes()).val_bpb
    assert fields["test_bpb"] == pytest.approx(expected, rel=1e-4) and len(fields["test_bpb_seeds"]) == 2
    assert "test_error" not in fields and not lines
    assert (tmp_path / "test0.json").exists() and (tmp_path / "test1.json").exists()

    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"not an artifact\n" * 64)
    fields = score_test(ctx, [broken], tmp_path / "b", log=lines.append)
    assert fields["test_bpb"] is None and fields["test_error"].startswith("seed 1/1: ")
    assert "\n" not in fields["test_error"] and "the decision stands" in lines[-1]
    assert score_test(ctx, run_artifacts(tmp_path / "empty", "cuda", 2), tmp_path)["test_error"] == \
        "no exported forward to score"
    assert run_artifacts(tmp_path, "cuda", 2) == [first, tmp_path / "forward1.pt2"]


def test_a_run_that_may_be_kept_is_test_scored_in_the_same_process(data_env: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from arun.core.heldout import test_fields
    from arun.core.scoring import score_artifact
    from test_artifact import Built
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    repo = Path(__file__).resolve().parents[1]
    built = Built("cuda")
    forward = tmp_path / "forward0.pt2"
    built.export(forward)
    alone = score_artifact("cuda", forward, data_env, tmp_path / "t.json", device="cpu", split="test", fixed_from=repo)
    both = score_artifact("cuda", forward, data_env, tmp_path / "v.json", device="cpu", test_below=float("inf"),
                          fixed_from=repo)
    assert both["test_bpb"] == alone["test_bpb"] and "val_bpb" in both  # the same number, one process fewer
    assert test_fields([both])["test_bpb"] == both["test_bpb"]
    above = score_artifact("cuda", forward, data_env, tmp_path / "w.json", device="cpu",
                           test_below=both["val_bpb"], fixed_from=repo)   # not below the best: not test-scored
    assert "test_bpb" not in above and test_fields([above]) is None
