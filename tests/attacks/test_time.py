"""
Time that is not charged. After a key's baseline, a run may spend on anything but training only what
the baseline needed plus a margin (arun.core.timing); the rest of its wall time is charged as
training. Real train files through the harness (tiny MLX model, 2 s budget): training off the clock
ends invalid, an honest run and an honest run with slow steps pass.

The tests share one project (a module fixture) and run in file order after its honest baseline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from arun.core import timing
from arun.core.experiment import run_experiment
from arun.core.forward_store import path_for
from arun.core.ledger import Ledger
from arun.core.ratchet import best_record
from helpers_repo import git, inject, make_project, tiny_train_text

BUDGET = 2.0


class Project:
    def __init__(self, root: Path):
        self.repo = root
        self.clean = (root / "train_mlx.py").read_text()
        self.baseline: dict = {}

    def run(self, text: str | None = None, backend: str = "mlx", budget_delta: float = 0.0, **kw) -> dict:
        if text is not None:
            (self.repo / "train_mlx.py").write_text(text)
        return run_experiment(self.repo, backend, "time", budget=BUDGET + budget_delta, show_progress=False,
                              log=lambda s: None,
                              device="cpu" if backend == "cuda" else None, **kw)

    def records(self) -> list[dict]:
        return [r for p in sorted((self.repo / "bench").glob("*/ledger.jsonl")) for r in Ledger(p).records()]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> Iterator[Project]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dict(ARUN_CACHE=str(tiny_cache), ARUN_DATA_DIR=str(tiny_data), ARUN_DEVICE="cpu",
                                OMP_NUM_THREADS="1").items():
            mp.setenv(name, value)
        root = tmp_path_factory.mktemp("time") / "repo"
        make_project(root, "train_mlx.py", overrides={"COMPILE": False})
        p = Project(root)
        p.baseline = p.run()
        yield p


def assert_charged(project: Project, text: str) -> None:
    before = best_record(project.records(), project.baseline["key_id"])
    rec = project.run(text)
    assert rec["status"] == "invalid" and "charged" in rec["error"], rec
    assert rec["charged_seconds"] > BUDGET + timing.step_slack({}, BUDGET)
    assert best_record(project.records(), rec["key_id"])["id"] == before["id"]
    assert (project.repo / "train_mlx.py").read_text() == project.clean


def test_the_baseline_sets_the_reference(project: Project) -> None:
    rec = project.baseline
    assert rec["status"] == "keep" and rec["baseline"], rec
    # the baseline has no reference: the allowance bounds it, and its own non-training time becomes the key's
    assert rec["non_training_reference"] is None and rec["non_training_limit"] == rec["allowance_seconds"] == 60.0
    assert 0 < rec["non_training_seconds"] < 60.0 and rec["charged_seconds"] <= BUDGET + timing.step_slack({}, BUDGET) + 5


def test_an_honest_run_after_the_baseline_is_not_charged(project: Project) -> None:
    rec = project.run(project.clean)
    assert rec["status"] in ("keep", "discard"), rec
    ref = project.baseline["non_training_seconds"]
    assert rec["non_training_reference"] == pytest.approx(ref)
    assert rec["non_training_limit"] == pytest.approx(min(60.0, ref + timing.margin(ref)))


def extra(project: Project) -> float:
    """Off-the-clock training the attacks get: past the margin (which scales with the baseline)."""
    return timing.margin(project.baseline["non_training_seconds"]) + 10.0


def test_a_clock_that_runs_slow_is_charged(project: Project) -> None:
    # the budget's clock slowed until the training past the budget exceeds the margin; the budget claimed
    slow = 1.0 + extra(project) / BUDGET
    text = inject(project.clean, "budget = TimeBudget(", f"budget.clock = lambda: time.perf_counter() / {slow}")
    assert_charged(project, text)


def test_training_through_the_allowance_is_charged(project: Project) -> None:
    # the budget honoured, then more steps off the clock before the export: the claim is the budget
    code = f'''_end = time.perf_counter() + {extra(project)}
while time.perf_counter() < _end:
    _b = []
    for _ in range(grad_accum_steps):
        x, y, epoch = next(loader)
        _b.append((mx.array(x), mx.array(y)))
    train_step(_b, 0.5, budget.step).item()'''
    assert_charged(project, inject(project.clean, "mx.clear_cache()", code, before=True))


def test_a_last_step_longer_than_the_slack_is_not_invalid(project: Project) -> None:
    # every counted step takes over 4 s (over budget + the 2 s fixed slack at this budget): an honest slow machine
    slow = "time.sleep(4.3) if budget.step >= budget.warmup_steps else None"
    rec = project.run(inject(project.clean, "budget.start_step()", slow))
    assert rec["status"] in ("keep", "discard"), rec
    assert rec["training_seconds"] > BUDGET + timing.slack(BUDGET)   # the old rule would have refused it
    assert rec["last_step_seconds"] > 4.0


def test_both_engines_on_one_branch(project: Project) -> None:
    # an mlx keep that changed train_mlx.py (the baseline of a key with another budget: kept whatever it
    # scores), then the torch train file joins the same run branch: it runs, and the mlx keep stays
    from arun.core.trainfile import rewrite_constants
    (project.repo / "train_mlx.py").write_text(rewrite_constants(project.clean, {"WARMUP_STEPS": 2}))
    mlx = project.run(budget_delta=1.0)
    assert mlx["status"] == "keep" and mlx["baseline"], mlx
    (project.repo / "train_cuda.py").write_text(tiny_train_text("train_cuda.py", {"COMPILE": False}))
    git(project.repo, "commit", "-qm", "tiny torch train file", "--", "train_cuda.py")
    mlx_before = (project.repo / "train_mlx.py").read_bytes()
    assert mlx_before != project.clean.encode()
    mlx_best = best_record(project.records(), mlx["key_id"])
    rec = project.run(backend="cuda")
    assert rec["status"] == "keep" and rec["baseline"], rec
    assert (project.repo / "train_mlx.py").read_bytes() == mlx_before
    assert best_record(project.records(), mlx["key_id"])["id"] == mlx_best["id"]
    assert path_for(project.repo, "mlx", mlx_best["artifact_sha256"]).is_file()
    # and a torch discard restores only the torch train file
    text = (project.repo / "train_cuda.py").read_text()
    (project.repo / "train_cuda.py").write_text(text.replace("EMBEDDING_LR =", "EMBEDDING_LR = 0.0 * ", 1))
    rec = project.run(backend="cuda")
    assert (project.repo / "train_mlx.py").read_bytes() == mlx_before
    assert rec["status"] != "keep" or (project.repo / "train_cuda.py").read_text() != text


# --------------------------------------------------------------------------- the rules, without a run

@pytest.mark.unit
def test_the_limit_is_the_baseline_plus_the_margin() -> None:
    assert timing.non_training_limit(60.0, None) == 60.0
    assert timing.non_training_limit(60.0, 8.0) == 18.0                 # 10 s floor
    assert timing.non_training_limit(300.0, 100.0) == 200.0             # twice a long start-up
    assert timing.non_training_limit(60.0, 25.0) == 50.0
    assert timing.non_training_limit(60.0, 55.0) == 60.0                # never above the allowance
    assert timing.reference_of({"non_training_seconds": float("nan")}) is None
    honest = {"training_seconds": 300.0, "time_budget": 300.0}
    assert timing.audit_timing(honest, 300.0 + 17.9, 300.0, 18.0) is None
    assert "charged" in timing.audit_timing(honest, 300.0 + 18.0 + 15.1, 300.0, 18.0)


@pytest.mark.unit
def test_the_last_step_is_believed_only_up_to_its_cap() -> None:
    assert timing.step_slack({}, 20.0) == 2.0
    assert timing.step_slack({"last_step_seconds": 3.0}, 20.0) == 3.0
    assert timing.step_slack({"last_step_seconds": 1000.0}, 20.0) == 5.0     # a claim buys at most the cap
    assert timing.step_slack({"last_step_seconds": 1000.0}, 300.0) == 15.0
    r = {"training_seconds": 23.0, "last_step_seconds": 3.1, "time_budget": 20.0}
    assert timing.audit_timing(r, 30.0, 20.0, 60.0) is None
    assert "training took" in timing.audit_timing({**r, "last_step_seconds": 0.5}, 30.0, 20.0, 60.0)
    assert "not a number" in timing.audit_timing({**r, "last_step_seconds": "x"}, 30.0, 20.0, 60.0)


# --------------------------------------------------------------------------- records on that project

def test_records_on_pystdlib_say_not_held_out(project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from arun.cli import cli
    assert all(r["held_out"] is False for r in project.records() if r.get("status") == "keep")
    monkeypatch.chdir(project.repo)
    log = CliRunner().invoke(cli, ["log"]).output
    assert f"{project.baseline['val_bpb']:.6f}*" in log and "* not held out" in log
    assert "(not held out)" in CliRunner().invoke(cli, ["compare"]).output
    assert "NOT HELD OUT" in CliRunner().invoke(cli, ["summary"]).output


def test_a_keep_whose_forward_is_gone_is_not_the_best_a_run_must_beat(project: Project) -> None:
    keeps = [r for r in project.records() if r.get("status") == "keep" and r["key_id"] == project.baseline["key_id"]]
    for r in keeps:
        path_for(project.repo, "mlx", r["artifact_sha256"]).unlink(missing_ok=True)
    rec = project.run(project.clean)
    assert rec["status"] == "keep" and rec["baseline"] and rec["best_before"] is None, rec
