"""
The metric cannot be gamed: each known attack from SECURITY.md, carried out by a real train file.

Unit level: the timing audit (arun.core.timing.audit_timing); the causality probe's unit tests
are in tests/test_probe.py.
CLI level: `arun --backend cuda --device cpu` in tmp git repos with a tiny train_cuda.py whose
model or loop cheats. A cheat must never be kept, must be recorded `invalid` with a reason, and
must leave the worktree at the best commit with every earlier record intact.

The harness (arun/core/experiment.py) scores every run's exported forward in the evaluator process
(python -m engines.score) and audits its timing; the CLI attacks below go through that path
(tests/attacks/test_boundary.py has the attacks on the boundary itself).

The two slow attacks (45 s past the budget, 1000 uncounted warm-up steps) start in the
background when the module starts and are checked by the last tests, so they overlap the rest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers_repo import (
    arun_cmd,
    arun_env,
    assert_failure_recorded,
    inject,
    kill_under,
    ledger_records,
    make_project,
    replace_once,
    run_arun,
    tiny_train_text,
)


def noncausal_train_text() -> str:
    """The tiny train file with its attention call swapped for one without a causal mask."""
    return replace_once(tiny_train_text(), "attention(q, k, v, window)", "F.scaled_dot_product_attention("
                        "q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)")


# (the causality probe's unit tests, both engines: tests/test_probe.py)


# =========================================================================== audit_timing

HONEST = {"time_budget": 300.0, "warmup_steps": 10, "warmup_seconds": 25.0, "training_seconds": 300.3,
          "startup_seconds": 12.0, "export_seconds": 2.0}
ALLOWANCE = 60.0   # max(60, budget/5) at 300 s


def _audit(wall: float = 350.0, budget: float = 300.0, allowance: float = ALLOWANCE, **changes: object) -> str | None:
    from arun.core.timing import audit_timing
    return audit_timing({**HONEST, **changes}, wall, budget, allowance)


def test_audit_timing_passes_honest_runs() -> None:
    assert _audit() is None
    assert _audit(wall=300 + 15 + 60 - 0.1) is None            # just inside budget + slack (15 s) + allowance
    assert _audit(warmup_steps=20) is None                     # upstream uses 10; 20 is the limit
    from arun.core.timing import audit_timing
    assert audit_timing({}, 5.0, 1.0, 60.0) is None             # a run that reports nothing: 5 s < 1 + 2 + 60
    assert audit_timing({"training_seconds": 1.02, "time_budget": 1.0, "warmup_steps": 1}, 12.0, 1.0, 60.0) is None


@pytest.mark.unit
@pytest.mark.parametrize("changes, wall, budget, allowance, reason", [
    ({}, 300.3 + 60 + 15.5, 300.0, ALLOWANCE, "charged"),                   # trained past the budget, claimed 300 s
    ({"warmup_seconds": 200.0}, 520.0, 300.0, ALLOWANCE, "charged"),       # training booked as warm-up
    ({"training_seconds": 1.0, "time_budget": 1.0}, 10.0, 1.0, 2.0, "charged"),   # a small --allowance
    ({"warmup_steps": 21}, 350.0, 300.0, ALLOWANCE, "warm-up steps"),
    ({"warmup_steps": 1000}, 350.0, 300.0, ALLOWANCE, "warm-up steps"),
    ({"time_budget": 600.0}, 350.0, 300.0, ALLOWANCE, "time budget"),      # ran with another budget
    ({"training_seconds": 480.5}, 520.0, 300.0, ALLOWANCE, "training took"),
    ({"training_seconds": "300"}, 1000.0, 300.0, ALLOWANCE, "charged"),    # strings are numbers too
    # Numbers that would slip past every comparison (NaN > x is False) or crash the harness:
    ({"export_seconds": float("nan")}, 1000.0, 300.0, ALLOWANCE, "finite"),
    ({"training_seconds": float("nan")}, 1000.0, 300.0, ALLOWANCE, "finite"),
    ({"warmup_seconds": float("inf")}, 1000.0, 300.0, ALLOWANCE, "finite"),
    ({"startup_seconds": -600.0}, 1000.0, 300.0, ALLOWANCE, "negative"),
    ({"warmup_steps": "1000"}, 350.0, 300.0, ALLOWANCE, "warm-up steps"),
    ({"warmup_steps": "many"}, 350.0, 300.0, ALLOWANCE, "not a number"),
    ({"warmup_seconds": [1]}, 350.0, 300.0, ALLOWANCE, "not a number"),
])
def test_audit_timing_flags_each_overrun(changes: dict, wall: float, budget: float, allowance: float,
                                         reason: str) -> None:
    got = _audit(wall=wall, budget=budget, allowance=allowance, **changes)
    assert got is not None and reason in got, got
    assert "\n" not in got


@pytest.mark.unit
def test_audit_timing_does_not_trust_claimed_startup_warmup_or_export_time() -> None:
    """The wall time is the only thing the harness sees from outside: whatever the run books as
    start-up, warm-up or export, at most the allowance of it is not charged as training."""
    for name in ("startup_seconds", "warmup_seconds", "export_seconds"):
        assert _audit(wall=500.0, **{name: 190.0}) is not None
    from arun.core.timing import charged_seconds, default_allowance
    assert default_allowance(300.0) == 60.0 and default_allowance(1000.0) == 200.0 and default_allowance(5, 1) == 1.0
    assert charged_seconds({"training_seconds": 300.0}, 500.0, 60.0) == 440.0


def _cli_attack(root: Path, tiny_data: Path, tiny_cache: Path, train_text: str, *args: str,
                overrides: dict | None = None) -> tuple[Path, subprocess.CompletedProcess]:
    repo = root / "repo"
    make_project(repo, overrides=overrides)
    (repo / "train_cuda.py").write_text(train_text)
    try:
        proc = run_arun(repo, arun_env(tiny_data, tiny_cache), "--budget", "1", "-m", "attack", *args, timeout=300)
    finally:
        kill_under(repo, grace=5)
    return repo, proc


def test_noncausal_model_is_recorded_invalid(tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> None:
    text = noncausal_train_text()
    repo, proc = _cli_attack(tmp_path, tiny_data, tiny_cache, text)
    rec = assert_failure_recorded(repo, proc, [], "invalid", "looks ahead")
    assert rec["val_bpb"] is None and proc.returncode == 2


def test_probe_disabled_in_the_train_process_is_caught_by_the_evaluator(tmp_path: Path, tiny_data: Path,
                                                                       tiny_cache: Path) -> None:
    """No causal mask, and the probe patched out in the train process: the evaluator process, which
    never runs the train file, probes the exported forward itself."""
    text = noncausal_train_text()
    text = inject(text, "from engines.run import", "import engines.causality as _probe\n"
                  "_probe.Probe.batch = lambda self, fn, x: fn(self.engine.to_device(x))  # cheat: skip the probe")
    repo, proc = _cli_attack(tmp_path, tiny_data, tiny_cache, text)
    assert_failure_recorded(repo, proc, [], "invalid", "looks ahead")


FAKE_RESULT = '''"""A train file that never trains: it prints the number it wants and writes the result JSON itself."""
import json
import os

# --- hyperparameters ---
SEED = 42
WARMUP_STEPS = 1
# --- end hyperparameters ---

if __name__ == "__main__":
    budget = float(os.environ["ARUN_TIME_BUDGET"])
    result = {"val_bpb": 0.1, "training_seconds": budget, "total_seconds": budget + 1.0, "time_budget": budget,
              "warmup_steps": 1, "warmup_seconds": 0.05, "startup_seconds": 0.5, "eval_seconds": 0.4,
              "num_steps": 50, "status": "ok", "causality_max_diff": 0.0}
    print("---")
    print("val_bpb:          0.100000")
    print(f"training_seconds: {budget:.1f}")
    with open(os.environ["ARUN_RESULT_JSON"], "w") as f:
        json.dump(result, f)
'''


def test_fake_result_json_is_never_kept(tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> None:
    repo, proc = _cli_attack(tmp_path, tiny_data, tiny_cache, FAKE_RESULT)
    recs = ledger_records(repo)
    assert all(r["status"] != "keep" for r in recs), [(r["status"], r.get("val_bpb")) for r in recs]
    rec = assert_failure_recorded(repo, proc, [], "crash", r"export")
    assert rec["claimed_val_bpb"] == 0.1 and rec["val_bpb"] is None


# --------------------------------------------------------------------------- slow attacks, in the background

def _over_budget_text() -> str:
    """Trains 45 s past the budget (sleeping steps, so the test costs little CPU) and then reports
    exactly the budget as its training time."""
    text = tiny_train_text()
    text = inject(text, "budget = TimeBudget(", "budget.seconds += 45  # cheat: keep training past the budget")
    text = inject(text, "budget.start_step()", "time.sleep(0.25)")
    return inject(text, "finish_run(", "budget.seconds = budget.training_seconds = float(os.environ['ARUN_TIME_BUDGET'])"
                  "  # cheat: report the budget", before=True)


BACKGROUND = {
    # test name: (train text, constants overrides, arun options)
    "test_training_past_the_budget_is_invalid": (_over_budget_text, None, ("--allowance", "10")),
    # 1000 steps "not counted": minimal steps so the attack costs ~30 s of one core.
    "test_uncounted_warmup_steps_are_invalid": (tiny_train_text, {"WARMUP_STEPS": 1000, "DEVICE_BATCH_SIZE": 1,
                                                                  "TOTAL_BATCH_SIZE": 64}, ()),
}


@pytest.fixture(scope="module", autouse=True)
def background(request: pytest.FixtureRequest, tiny_data: Path, tiny_cache: Path,
               tmp_path_factory: pytest.TempPathFactory):
    """Starts the slow attacks selected in this session as soon as the module starts."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    runs: dict[str, dict] = {}
    root = tmp_path_factory.mktemp("background")
    for name, (text_fn, overrides, options) in BACKGROUND.items():
        if name not in selected:
            continue
        repo = root / name / "repo"
        make_project(repo, overrides=overrides)
        from arun.core.trainfile import rewrite_constants
        (repo / "train_cuda.py").write_text(rewrite_constants(text_fn(), overrides or {}))
        out, err = open(repo.parent / "stdout", "w"), open(repo.parent / "stderr", "w")
        proc = subprocess.Popen(arun_cmd("--budget", "1", "-m", name, *options), cwd=repo, env=arun_env(tiny_data, tiny_cache),
                                stdout=out, stderr=err, text=True)
        runs[name] = {"repo": repo, "proc": proc, "files": (out, err)}
    yield runs
    for run in runs.values():
        if run["proc"].poll() is None:
            run["proc"].kill()
        run["proc"].wait()
        kill_under(run["repo"])
        for f in run["files"]:
            f.close()


def _finish(run: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    run["proc"].wait(timeout=timeout)
    for f in run["files"]:
        f.flush()
    repo = run["repo"]
    kill_under(repo, grace=5)
    return subprocess.CompletedProcess(run["proc"].args, run["proc"].returncode,
                                       (repo.parent / "stdout").read_text(), (repo.parent / "stderr").read_text())


def test_training_past_the_budget_is_invalid(background: dict) -> None:
    run = background["test_training_past_the_budget_is_invalid"]
    proc = _finish(run)
    [rec] = ledger_records(run["repo"])
    assert rec["total_seconds"] > 45 and rec["training_seconds"] == pytest.approx(1.0, abs=0.01)  # the attack ran
    rec = assert_failure_recorded(run["repo"], proc, [], "invalid", r"charged")
    assert rec["status"] != "keep"


def test_uncounted_warmup_steps_are_invalid(background: dict) -> None:
    run = background["test_uncounted_warmup_steps_are_invalid"]
    proc = _finish(run)
    assert_failure_recorded(run["repo"], proc, [], "invalid", r"warm-up")
