"""
Loss trajectories, early discard and confirmation of near wins (arun.core.early, arun.search.policy).

The rules are pure functions tested on hand-made numbers; two real tiny runs (MLX on the CPU, 1.5 s
budget) show the mechanics end to end: a run stopped by a best whose trajectory is far below it ends
`discard` with `stopped_at`, and a forced near win is re-run with fresh seeds before it is decided.
Neither depends on how many steps fit: a run prints a step line at its first and its last step.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from arun.core import early
from arun.core.early import (
    GRID,
    Stopper,
    Watch,
    behind,
    believable,
    change_kinds,
    make_stopper,
    margins,
    protected_changes,
    resample,
)
from arun.core.steplines import parse_step_line
from arun.search.policy import ConfirmingDecider
from helpers_repo import ledger_records, make_project, replace_once

BACKEND, DEVICE, TRAIN = "mlx", None, "train_mlx.py"   # (an MLX run is the cheaper here: no torch import)
BUDGET = 1.5


class Budget:
    """What engines.run.StepLog reads off the timer."""

    def __init__(self, step: int, progress: float):
        self.step, self.progress, self.remaining = step, progress, 10.0


def step_lines(losses_at: list[tuple[float, float]]) -> list[str]:
    """Real step lines, printed by engines.run.StepLog (the format every train file uses)."""
    import contextlib
    import io

    from engines.run import StepLog
    out = io.StringIO()
    log = StepLog()
    with contextlib.redirect_stdout(out):
        for i, (pct, loss) in enumerate(losses_at):
            log(Budget(i + 1, pct / 100), loss, 512, 0.01, None, 1, force=True)
    return out.getvalue().splitlines(keepends=True)


def feed(w: Watch, line: str) -> bool:
    """As the reader does (arun.core.process): parse the line once, hand a step line to the watch."""
    step = parse_step_line(line)
    return step is not None and w.add(step)


# --------------------------------------------------------------------------- trajectories

@pytest.mark.unit
def test_a_step_line_prints_the_mean_loss_of_the_steps_since_the_line_before() -> None:
    """One batch's loss jitters far more than two runs' losses differ; the trajectory averages whole bins
    only if each printed loss covers every step, not the last one before the line."""
    import contextlib
    import io

    from engines.run import StepLog
    out = io.StringIO()
    log = StepLog(every_seconds=3600.0)   # prints the first call, then only when forced
    calls = [(9.0, False), (4.0, False), (5.0, False), (9.0, True), (2.0, True)]
    with contextlib.redirect_stdout(out):
        for i, (loss, force) in enumerate(calls):
            log(Budget(i + 1, (i + 1) / 10), loss, 512, 0.01, None, 1, force=force)
    printed = [(s.step, s.loss) for s in map(parse_step_line, out.getvalue().splitlines()) if s]
    assert printed == [(1, 9.0), (4, pytest.approx(6.0)), (5, 2.0)]


@pytest.mark.unit
def test_step_lines_become_a_trajectory_at_every_5_percent() -> None:
    w = Watch()
    lines = step_lines([(1, 9.0), (3, 7.0), (12, 5.0), (14, 4.0), (40, 3.0)])
    lines.insert(2, "some other output | loss 0.0\n")
    assert [feed(w, s) for s in lines] == [True, True, False, True, True, True]
    assert not feed(w, step_lines([(41, float("nan"))])[0])  # a nan loss is no point
    traj = w.trajectory()
    assert len(traj) == len(GRID) == 20
    assert traj[0] == pytest.approx(8.0)          # mean of the losses in (0, 5]
    assert traj[1] == pytest.approx(8.0)          # (5, 10] is empty: the previous value carries
    assert traj[2] == pytest.approx(4.5)          # (10, 15]
    assert traj[3:7] == [pytest.approx(4.5)] * 4  # nothing printed up to 35 %
    assert traj[7] == pytest.approx(3.0)          # (35, 40]
    assert traj[8:] == [None] * 12                # not reached yet


@pytest.mark.unit
def test_resample_leaves_unreached_bins_empty_and_progress_never_goes_back() -> None:
    assert resample([(50.0, 2.0)], upto=50.0)[:10] == [None] * 9 + [2.0]
    w = Watch()
    for s in step_lines([(30, 3.0), (20, 0.1), (31, 3.0)]):  # a line claiming to go back is ignored
        feed(w, s)
    assert w.points == [(30.0, 3.0), (31.0, 3.0)]


# --------------------------------------------------------------------------- the early-stop rule

BEST = [4.0 - 0.1 * i for i in range(20)]


@pytest.mark.unit
def test_a_run_behind_by_more_than_the_spread_is_stopped() -> None:
    margin, source = margins(BEST, [0.01] * 20)
    assert source == "measured spread" and margin[5] == pytest.approx(max(3 * math.sqrt(2) * 0.01, 0.005 * BEST[5]))
    cand = [b + 0.5 for b in BEST[:6]] + [None] * 14   # 0.5 behind at 5 .. 30 %
    ev = behind(cand, BEST, margin)
    assert ev == {"progress": 30.0, "loss": round(cand[5], 6), "best_loss": round(BEST[5], 6),
                  "margin": round(margin[5], 6)}


@pytest.mark.unit
def test_a_run_within_the_spread_or_too_early_or_behind_once_is_not_stopped() -> None:
    margin, _ = margins(BEST, [0.01] * 20)
    within = [b + 0.9 * margin[i] for i, b in enumerate(BEST)]
    assert behind(within, BEST, margin) is None
    early_only = [b + 1.0 for b in BEST[:3]] + [None] * 17      # far behind, but only up to 15 %
    assert behind(early_only, BEST, margin) is None
    once = [b + 1.0 if i == 5 else b for i, b in enumerate(BEST[:6])] + [None] * 14   # one point only
    assert behind(once, BEST, margin) is None
    ahead = [b - 1.0 for b in BEST]
    assert behind(ahead, BEST, margin) is None


@pytest.mark.unit
def test_without_a_measured_spread_the_margin_is_the_conservative_default() -> None:
    margin, source = margins(BEST, None)
    assert source == "default margin" and margin[9] == pytest.approx(early.DEFAULT_REL * BEST[9])
    cand = [b * (1 + early.DEFAULT_REL / 2) for b in BEST]      # behind, but by less than 3 %
    assert behind(cand, BEST, margin) is None
    assert behind([b * 1.1 for b in BEST], BEST, margin) is not None


def best_record(config: dict, traj: list | None = None, **kw) -> dict:
    return {"id": "b", "val_bpb": 2.0, "config": config, "loss_trajectory": traj or BEST, **kw}


CONFIG = {"DEPTH": 4, "ASPECT_RATIO": 64, "HEAD_DIM": 128, "TOTAL_BATCH_SIZE": 2**16, "DEVICE_BATCH_SIZE": 16,
          "WARMUP_RATIO": 0.05, "WARMDOWN_RATIO": 0.5, "FINAL_LR_FRAC": 0.1, "MATRIX_LR": 0.04, "LR_SCHEDULE": "linear",
          "DECAY_RATIO": 0.5, "WEIGHT_DECAY": 0.2, "LEARNING_RATE": 1e-3, "LR_SCALE": 1.0, "MIN_LR_FRAC": 0.0,
          "WARMUP_ITERS": 100, "N_LAYERS": 4, "MLP_RATIO": 4, "BATCH_SIZE_WARMUP_RATIO": 0.1, "COOLDOWN_FRAC": 0.2,
          "FINAL_LR": 1e-4, "ADAM_BETAS": (0.8, 0.95)}


@pytest.mark.unit
@pytest.mark.parametrize("name,value", [
    ("WARMDOWN_RATIO", 0.3), ("COOLDOWN_FRAC", 0.1), ("FINAL_LR_FRAC", 0.2), ("MATRIX_LR", 0.08),
    ("LEARNING_RATE", 2e-3), ("FINAL_LR", 2e-4), ("WEIGHT_DECAY", 0.4),          # higher rates
    ("WARMUP_RATIO", 0.0), ("WARMUP_RATIO", 0.2), ("WARMUP_ITERS", 0), ("WARMUP_ITERS", 200),   # any warm-up
    ("MATRIX_LR", "0.04 * 2"), ("LR_SCHEDULE", "cosine"), ("DECAY_RATIO", 0.3), ("LR_SCALE", 2.0),
    ("LR_SCALE", 0.5), ("MIN_LR_FRAC", 0.1),                                    # a direction the name does not tell
    ("TOTAL_BATCH_SIZE", 2**15), ("DEVICE_BATCH_SIZE", 4), ("BATCH_SIZE_WARMUP_RATIO", 0.2),
    ("DEPTH", 6), ("ASPECT_RATIO", 96), ("HEAD_DIM", 64), ("N_LAYERS", 8), ("MLP_RATIO", 2)])
def test_a_higher_rate_a_warm_up_batch_and_size_changes_are_never_stopped_early(name: str, value: object) -> None:
    """Behind mid-run by design, possibly ahead at the end: a higher learning rate or weight decay until it
    anneals (a later warm-down, a larger final LR or *_LR; a direction the name does not tell counts as
    higher), any warm-up change (a longer one is behind while it ramps), a batch or model-size change
    (fewer or slower steps)."""
    said: list[str] = []
    assert protected_changes({**CONFIG, name: value}, CONFIG) == [name]
    assert make_stopper(best_record(CONFIG), None, {**CONFIG, name: value}, log=said.append) is None
    assert name in said[0] and "misjudges" in said[0]
    assert change_kinds({**CONFIG, "MATRIX_LR": 0.08, "EVAL_BATCH_SIZE": 8}, CONFIG) == \
        {"lr": ["MATRIX_LR"], "other": ["EVAL_BATCH_SIZE"]}


@pytest.mark.unit
@pytest.mark.parametrize("changes", [{"WARMDOWN_RATIO": 0.7}, {"COOLDOWN_FRAC": 0.3}, {"FINAL_LR_FRAC": 0.0},
                                     {"MATRIX_LR": 0.02}, {"LEARNING_RATE": 5e-4, "FINAL_LR": 5e-5},
                                     {"WEIGHT_DECAY": 0.1}, {"MATRIX_LR": 0.02, "WARMDOWN_RATIO": 0.6},
                                     {"ADAM_BETAS": (0.9, 0.95)}, {"EVAL_BATCH_SIZE": 8}])
def test_a_lower_learning_rate_or_another_change_is_stopped_like_any_other(changes: dict) -> None:
    """A lower rate looks better mid-run than it ends (the short-horizon bias runs that way), so one that is
    behind mid-run even so is behind at the end: stopped."""
    assert protected_changes({**CONFIG, **changes}, CONFIG) == []
    assert isinstance(make_stopper(best_record(CONFIG), None, {**CONFIG, **changes}), Stopper)
    # one raising change among lowering ones protects the run
    assert protected_changes({**CONFIG, **changes, "SCALAR_LR": 1.0}, {**CONFIG, "SCALAR_LR": 0.5}) == ["SCALAR_LR"]


TRAIN_TEXT = """MATRIX_LR = 0.04         # block matrices (Muon)
WARMDOWN_RATIO = 0.5

def get_lr_multiplier(progress):
    return 1.0 if progress < 1.0 - WARMDOWN_RATIO else (1.0 - progress) / WARMDOWN_RATIO

def build_model():
    return GPT(n_layer=4, dropout=0.0)
"""


@pytest.mark.unit
@pytest.mark.parametrize("old,new,edited", [
    ("MATRIX_LR = 0.04         # block matrices (Muon)", "MATRIX_LR = 0.02   # halved", False),  # the constants decide
    ("GPT(n_layer=4, dropout=0.0)", "GPT(n_layer=4, dropout=0.1)", False),                       # no rate in the line
    ("    return 1.0 if progress", "    return 2.0 if progress", True),                          # the schedule's code
    ("def build_model():", "def build_model():\n    opt.param_groups[0]['lr'] *= 2", True),
    ("def build_model():", "def build_model():\n    momentum = 0.99  # was 0.95", True),
    ("def build_model():", "def build_model():\n    scale = 1 + FINAL_LR_FRAC", True),
    ("def build_model():", "def build_model():\n    ctrl = control(GPT)", False),
])
def test_an_edit_to_rate_setting_code_outside_the_constants_is_never_stopped_early(old: str, new: str,
                                                                                  edited: bool) -> None:
    """A rate changed in code leaves the constants as they were: the diff against the best's file decides."""
    candidate = replace_once(TRAIN_TEXT, old, new)
    edits = early.rate_code_edits(TRAIN_TEXT, candidate)
    assert bool(edits) == edited, edits
    said: list[str] = []
    stopper = make_stopper(best_record({}), None, {}, log=said.append, code_edits=edits)
    assert (stopper is None) == edited and (not edited or "edits code that sets a learning rate" in said[0])


@pytest.mark.unit
def test_the_spread_comes_from_arun_noise_else_the_bests_seeds() -> None:
    config = {"MATRIX_LR": 0.04}
    noisy = make_stopper(best_record(config), None, config, noise={"std": 0.01, "loss_trajectory_std": [0.2] * 20})
    assert noisy.source == "measured spread" and noisy.margin[9] == pytest.approx(3 * math.sqrt(2) * 0.2)
    seeds = [[b + d for b in BEST] for d in (-0.05, 0.0, 0.05)]
    from_seeds = make_stopper(best_record(config, loss_trajectory_seeds=seeds), None, config)
    assert from_seeds.source == "measured spread" and from_seeds.margin[9] == pytest.approx(3 * math.sqrt(2) * 0.05)
    assert make_stopper(best_record(config), None, config).source == "default margin"


@pytest.mark.unit
def test_a_best_whose_trajectory_is_too_low_for_its_val_bpb_is_not_believed() -> None:
    """Attack: a train file that prints tiny losses and becomes the best would stop every honest run
    after it. Its trajectory is checked against its own val_bpb (the baseline's loss-to-val ratio)."""
    baseline = {"id": "a", "val_bpb": 2.2, "loss_trajectory": [b + 0.4 for b in BEST]}
    honest = best_record({}, [b + 0.2 for b in BEST])                 # ends at 2.3 + 0.2 vs 2.5 * 2.0/2.2
    liar = best_record({}, [0.01] * 20)
    assert believable(honest, baseline)
    assert not believable(liar, baseline)
    said: list[str] = []
    assert make_stopper(liar, baseline, {}, log=said.append) is None and "believable" in said[0]
    assert not believable(best_record({}, [None] * 20), baseline)       # no trajectory: nothing to compare


@pytest.mark.unit
def test_a_best_that_printed_its_final_level_from_the_start_is_not_believed() -> None:
    """Attack (review of the early stop): a flat trajectory at exactly the level its val_bpb allows passes the
    final-level check and would stop every honest run behind it mid-run. Mid-run points are held to the
    baseline's curve, scaled by the val ratio, with a wider slack than the end's."""
    baseline = {"id": "a", "val_bpb": 2.2, "loss_trajectory": list(BEST)}
    floor = BEST[-1] * 2.0 / 2.2 * (1 - early.BELIEVE_REL)
    assert not believable(best_record({}, [floor] * 20), baseline)
    # an honest best that gains more early (8 % below the scaled baseline mid-run) than at the end is believed
    scaled = [b * 2.0 / 2.2 for b in BEST]
    assert believable(best_record({}, [x * 0.92 for x in scaled[:-1]] + [scaled[-1]]), baseline)


# --------------------------------------------------------------------------- confirmation (pure)

BEST_REC = {"val_bpb": 1.0, "val_bpb_seeds": [1.0], "tag": "t", "key_id": "k"}


@pytest.mark.unit
def test_a_clear_win_is_kept_at_once_and_a_near_win_asks_for_fresh_seeds(tmp_path: Path) -> None:
    said: list[str] = []
    d = ConfirmingDecider(repo_dir=tmp_path, noise_std=0.001, log=said.append)
    assert d([0.99], BEST_REC, []) == ("keep", False, {"confirmation": {"verdict": "clear win", "seeds": 1,
                                                                        "p_value": pytest.approx(0.0, abs=1e-9),
                                                                        "confidence": 0.9}})
    assert d([0.9985], BEST_REC, []) == ("confirm", False, {})         # 1.5 std better: 3 runs could confirm it
    assert "to be confirmed over 3 seeds" in said[-1]
    # 0.5 std better: even 3 runs at this mean would not pass the gate, so no fresh seeds are spent on it
    status, near, fields = d([0.9995], BEST_REC, [])
    assert (status, near, fields["confirmation"]["verdict"], fields["confirmation"]["seeds"]) == \
        ("discard", True, "within the noise", 1)
    assert "within the noise" in said[-1] and "no fresh seeds" in said[-1]
    status, near, fields = d([0.9985, 1.0004, 1.0001], BEST_REC, [])   # the fresh seeds say otherwise
    assert (status, near, fields["confirmation"]["verdict"]) == ("discard", True, "not confirmed")
    status, near, fields = d([0.9985, 0.9998], BEST_REC, [])           # a fresh seed pulls the mean into the noise
    assert (status, fields["confirmation"]["verdict"], fields["confirmation"]["seeds"]) == \
        ("discard", "within the noise", 2)
    assert "no more seeds" in said[-1]
    status, near, fields = d([0.9985, 1.0025], BEST_REC, [])           # the mean is no longer below: ends early
    assert (status, fields["confirmation"]) == ("discard", {"verdict": "not confirmed", "seeds": 2})
    assert d([0.9985, 0.9983], BEST_REC, [])[0] == "confirm"            # only the full count may keep it
    status, _, fields = d([0.996, 0.9962, 0.9958], BEST_REC, [])
    assert (status, fields["confirmation"]["verdict"], fields["confirmation"]["seeds"]) == ("keep", "confirmed", 3)
    assert d([1.01], BEST_REC, [])[0] == "discard"                      # not lower: no confirmation spent
    assert d([0.5], None, []) == ("keep", False, {})                    # the baseline


@pytest.mark.unit
def test_with_no_spread_measured_the_plain_rule_decides_and_says_so(tmp_path: Path) -> None:
    """Fresh seeds of a train file that ignores its seed agree exactly: their own spread (0) would make
    any win 'confirmed'. Without a measured spread the gate has nothing the agent does not set, so the
    plain rule decides; a measured std of 0 (or not a number) counts as none."""
    said: list[str] = []
    for d in (ConfirmingDecider(repo_dir=tmp_path, log=said.append),
              ConfirmingDecider(repo_dir=tmp_path, noise_std=0.0, log=said.append),
              ConfirmingDecider(repo_dir=tmp_path, noise_std=math.nan, log=said.append)):
        assert d([0.99999], BEST_REC, []) == ("keep", False, {"confirmation": {"verdict": "no spread measured",
                                                                               "seeds": 1}})
        assert "no spread measured" in said[-1] and "arun noise" in said[-1]
        assert d([1.0], BEST_REC, [])[0] == "discard"


@pytest.mark.unit
def test_a_train_file_that_ignores_its_seed_gets_no_credit_for_agreeing_with_itself(tmp_path: Path) -> None:
    """With the spread measured, identical fresh runs are floored at it (not three independent proofs of
    zero spread), and a best kept that way lends no zero spread to the next candidate."""
    d = ConfirmingDecider(repo_dir=tmp_path, noise_std=0.01, log=None)
    status, _, fields = d([0.995] * 3, BEST_REC, [])       # 0.5 std better, three identical runs
    assert status == "discard" and fields["confirmation"]["verdict"] == "not confirmed"
    poisoned = {**BEST_REC, "val_bpb": 0.995, "val_bpb_seeds": [0.995] * 3}
    status, _, fields = d([0.99499], poisoned, [])         # a hair better: not a clear win over a zero-spread best
    assert (status, fields["confirmation"]["verdict"]) == ("discard", "within the noise")
    assert d([0.97], poisoned, [])[0] == "keep"             # 2.5 std better is a clear win, as it should be


@pytest.mark.unit
def test_fresh_runs_that_agree_too_closely_to_be_seed_noise_count_as_one(tmp_path: Path) -> None:
    """A file that ignores ARUN_SEED repeats its lucky first run: three copies of one draw are one run,
    while an honest file's three runs, spread as seed noise is, count as three."""
    said: list[str] = []
    d = ConfirmingDecider(repo_dir=tmp_path, noise_std=0.001, log=said.append)
    status, _, fields = d([0.99835] * 3, BEST_REC, [])                # 1.65 std better, three identical runs
    assert (status, fields["confirmation"]["verdict"], fields["confirmation"]["counted_as_one"]) == \
        ("discard", "not confirmed", 3)
    assert "count as one" in said[-1] and "ARUN_SEED" in said[-1]
    status, _, fields = d([0.99735, 0.99935, 0.99835], BEST_REC, [])   # the same mean from three real runs
    assert (status, fields["confirmation"]["verdict"]) == ("keep", "confirmed")
    assert "counted_as_one" not in fields["confirmation"]


def _keep_rate(seed_blind: bool, trials: int = 4000, sigma: float = 0.01) -> float:
    """Proposals that change nothing (every run a draw of the same val_bpb distribution), decided by the
    confirmation gate with the spread measured; a seed-blind file's fresh runs repeat its first."""
    import random
    rng = random.Random(7)  # the same draws for both kinds of file
    d = ConfirmingDecider(repo_dir="/nonexistent", noise_std=sigma, log=None)
    keeps = 0
    for _ in range(trials):
        b = rng.gauss(1.0, sigma)
        best = {"val_bpb": b, "val_bpb_seeds": [b], "tag": "t", "key_id": "k"}
        vals, fresh = [rng.gauss(1.0, sigma)], [rng.gauss(1.0, sigma) for _ in range(2)]
        while (status := d(vals, best, [])[0]) == "confirm":
            vals.append(vals[0] if seed_blind else fresh[len(vals) - 1])
        keeps += status == "keep"
    return keeps / trials


@pytest.mark.unit
def test_ignoring_the_seed_keeps_no_more_noise_than_an_honest_file() -> None:
    """Before runs that agree too closely counted as one, the seed-blind file was kept about 15 % of the
    time against 11 % for an honest one (SECURITY.md)."""
    honest, blind = _keep_rate(False), _keep_rate(True)
    assert 0.05 < honest < 0.2, honest  # the gate at confidence 0.9 keeps some noise, as it says
    assert blind <= honest + 0.005, (blind, honest)


@pytest.mark.unit
def test_the_verdict_line_says_how_a_keep_was_decided() -> None:
    from arun.core.experiment import verdict_line
    rec = {"status": "keep", "val_bpb": 0.99, "best_before": 1.0, "tag": "t", "id": "1", "commit": "abcdef1234567"}
    assert "kept (clear win)" in verdict_line({**rec, "confirmation": {"verdict": "clear win", "seeds": 1}})
    assert "confirmed over 3 seeds" in verdict_line({**rec, "confirmation": {"verdict": "confirmed", "seeds": 3}})
    line = verdict_line({**rec, "status": "discard", "near_miss": True,
                         "confirmation": {"verdict": "not confirmed", "seeds": 3}})
    assert "DISCARD 0.990000" in line and "not confirmed over 3 seeds" in line
    line = verdict_line({**rec, "status": "discard", "near_miss": True,
                         "confirmation": {"verdict": "within the noise", "seeds": 1}})
    assert "DISCARD 0.990000" in line and "within the noise" in line and "not re-run" in line
    line = verdict_line({**rec, "status": "discard", "near_miss": True,       # after one fresh seed
                         "confirmation": {"verdict": "within the noise", "seeds": 2}})
    assert "within the noise after 2 seeds" in line and "not re-run" not in line
    stopped = verdict_line({**rec, "status": "discard", "val_bpb": None, "error": "stopped early at 30% of the budget"})
    assert stopped.startswith("arun: DISCARD (stopped early at 30% of the budget)")


@pytest.mark.unit
def test_the_summary_shows_stopped_early_runs_and_confirmations() -> None:
    from arun.report.summary import report
    recs = [{"id": "1", "key_id": "k", "tag": "t", "status": "keep", "baseline": True, "val_bpb": 1.0},
            {"id": "2", "key_id": "k", "tag": "t", "status": "discard", "val_bpb": None, "stopped_at": 30.0},
            {"id": "3", "key_id": "k", "tag": "t", "status": "discard", "val_bpb": None, "stopped_at": 50.0},
            {"id": "4", "key_id": "k", "tag": "t", "status": "keep", "val_bpb": 0.9, "best_before": 1.0,
             "confirmation": {"verdict": "confirmed", "seeds": 3}},
            {"id": "5", "key_id": "k", "tag": "t", "status": "discard", "val_bpb": 0.95, "best_before": 0.9,
             "confirmation": {"verdict": "not confirmed", "seeds": 3}},
            {"id": "6", "key_id": "k", "tag": "t", "status": "discard", "val_bpb": 0.8999, "best_before": 0.9,
             "confirmation": {"verdict": "within the noise", "seeds": 1}}]
    text = report(recs)
    assert "stopped early: 2 discards (at 40% of the budget on average)" in text
    assert "0 kept as a clear win, 1 confirmed over fresh seeds, 1 not confirmed, 1 within the noise (too small to confirm)" in text
    assert "within the noise" not in report(recs[:-1])


# --------------------------------------------------------------------------- real runs

@pytest.fixture
def project(tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("mlx.core")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ARUN_SEED", raising=False)
    repo = tmp_path / "repo"
    make_project(repo, TRAIN)
    return repo


@pytest.mark.timeout(300)
def test_a_real_run_behind_a_far_better_trajectory_is_stopped_and_discarded(project: Path) -> None:
    from arun.core.experiment import run_experiment
    quiet = dict(budget=BUDGET, device=DEVICE, show_progress=False, log=lambda s: None)
    base = run_experiment(project, BACKEND, "baseline", **quiet)
    assert base["status"] == "keep" and len(base["loss_trajectory"]) == 20 and base["loss_trajectory"][-1] > 0
    (project / TRAIN).write_text((project / TRAIN).read_text().replace("MATRIX_LR = 0.04", "MATRIX_LR = 0.05"))
    # A best whose loss is 0.01 everywhere: any real run is behind it by more than the margin.
    fake = Stopper([0.01] * 20, [0.001] * 20, "test spread", "fake")
    lines: list[str] = []
    rec = run_experiment(project, BACKEND, "more matrix lr", early_stop=fake, **{**quiet, "log": lines.append})
    assert rec["status"] == "discard" and rec["val_bpb"] is None
    assert rec["stopped_at"] >= early.MIN_PROGRESS + early.EVERY and rec["early_stop"]["best_id"] == "fake"
    assert rec["early_stop"]["spread"] == "test spread" and rec["error"].startswith("stopped early at")
    assert any(s.startswith("arun: DISCARD (stopped early at") for s in lines)
    assert "MATRIX_LR = 0.04" in (project / TRAIN).read_text()   # the train file is back at the best
    assert [r["status"] for r in ledger_records(project)] == ["keep", "discard"]
    # killed at the step line, before it could finish: no result written (the export takes far longer than the kill)
    assert not (project / ".arun" / "runs" / rec["id"] / "result0.json").exists()


@pytest.mark.timeout(300)
def test_a_near_win_is_rerun_with_fresh_seeds_before_it_is_decided(project: Path) -> None:
    from arun.core.experiment import run_experiment
    quiet = dict(budget=BUDGET, device=DEVICE, show_progress=False, log=lambda s: None)
    run_experiment(project, BACKEND, "baseline", **quiet)

    class Forced(ConfirmingDecider):
        """The best made to look worse than the first run by 1.67 spreads (a spread of 0.1 %, above the
        0.05 % floor): a near win that one run cannot show but three at that mean could."""
        fake: float | None = None

        def __call__(self, vals, best, records):
            self.noise_std = self.noise_std or 1e-3 * vals[0]
            self.fake = self.fake if self.fake is not None else vals[0] + 1.67 * self.noise_std
            return super().__call__(vals, dict(best, val_bpb=self.fake, val_bpb_seeds=[self.fake]), records)

    lines: list[str] = []
    rec = run_experiment(project, BACKEND, "same file, near win",
                         decide_fn=Forced(repo_dir=project, log=lines.append),
                         **{**quiet, "log": lines.append})
    # The first run, then fresh seeds one at a time: a second run whose mean is no longer below the best,
    # or too close to it for the last seed to confirm, ends it.
    n = len(rec["val_bpb_seeds"])
    assert n in (2, 3) and rec["seeds"][1:] == [43, 44][:n - 1] and len(rec["loss_trajectory_seeds"]) == n
    verdict = rec["confirmation"]["verdict"]
    assert verdict in ("confirmed", "not confirmed", "within the noise") and rec["confirmation"]["seeds"] == n
    if n == 2:
        assert verdict != "confirmed"
    assert rec["status"] == ("keep" if verdict == "confirmed" else "discard")
    assert any("confirming with up to 2 fresh seed(s) (43, 44)" in s for s in lines)
    said = f"{verdict} after {n} seeds" if verdict == "within the noise" else f"{verdict} over {n} seeds"
    assert any(said in s for s in lines if s.startswith(("arun: KEEP", "arun: DISCARD")))


@pytest.mark.timeout(300)
def test_a_confirmation_asks_again_after_each_fresh_seed_and_stops_once_decided(project: Path) -> None:
    """Fresh seeds run one at a time; a decider that has decided after the second run ends the
    confirmation there (no third run)."""
    from arun.core.experiment import run_experiment
    quiet = dict(budget=BUDGET, device=DEVICE, show_progress=False, log=lambda s: None)
    run_experiment(project, BACKEND, "baseline", **quiet)
    asked: list[int] = []

    def decider(vals, best, records):
        asked.append(len(vals))
        if len(vals) == 1:
            return "confirm", False, {}
        return "discard", True, {"confirmation": {"verdict": "not confirmed", "seeds": len(vals)}}

    rec = run_experiment(project, BACKEND, "same file, decided after two runs", decide_fn=decider, **quiet)
    assert asked == [1, 2] and rec["seeds"][1:] == [43] and len(rec["val_bpb_seeds"]) == 2
    assert rec["status"] == "discard" and rec["confirmation"] == {"verdict": "not confirmed", "seeds": 2}


def test_the_cli_has_the_switches() -> None:
    from click.testing import CliRunner

    from arun.cli import cli
    loop_help = CliRunner().invoke(cli, ["loop", "--help"]).output
    assert "--no-early-stop" in loop_help and "--no-confirm" in loop_help and "--no-measure-noise" in loop_help
    assert "--early-stop" in CliRunner().invoke(cli, ["run", "--help"]).output
    assert "--baseline" in CliRunner().invoke(cli, ["noise", "--help"]).output


@pytest.mark.unit
def test_a_best_that_lied_mid_run_but_not_at_the_end_is_not_believed() -> None:
    """Attack (redteam-trust early_stop_lie): ~0 losses for 19 points and an honest last one. Train loss
    only falls over a run, so every point, not just the last, must fit the best's val_bpb."""
    baseline = {"id": "a", "val_bpb": 2.2, "loss_trajectory": [b + 0.4 for b in BEST]}
    honest = best_record({"MATRIX_LR": 0.05}, [b + 0.2 for b in BEST])
    liar = best_record({"MATRIX_LR": 0.05}, [0.01] * 19 + [BEST[-1] + 0.2])
    assert believable(honest, baseline)
    assert not believable(liar, baseline)
    assert isinstance(make_stopper(honest, baseline, {"MATRIX_LR": 0.045}), Stopper)  # (a lower rate: stoppable)
    assert make_stopper(liar, baseline, {"MATRIX_LR": 0.045}, log=lambda s: None) is None
