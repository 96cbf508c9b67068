"""
arun loop end to end: real loops on a copy of the project in a tmp git repo, the MLX engine
on the CPU (the loop is the same for both engines, and an MLX run costs a third of a torch one
here: no torch import in either process), a tiny model, 1.5 s budgets, the built-in sweep and a scripted fake agent
(tests/fake_agent.py). The project starts with every learning rate at zero: the weights never
move, so val_bpb depends on the seed alone (deterministic on the CPU, however many steps fit
in the budget), and "restore the learning rates" is a change known to win by far more than
the seed-to-seed noise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_repo import arun_env, git, ledger_records, make_project, pid_alive, replace_once

REPO = Path(__file__).resolve().parents[1]
FAKE = f"{sys.executable} {REPO / 'tests' / 'fake_agent.py'}"
BUDGET = 1.5
BACKEND, DEVICE, TRAIN = "mlx", None, "train_mlx.py"
ENGINE = ["--backend", BACKEND]
GOOD_LR = {"EMBEDDING_LR": 0.6, "UNEMBEDDING_LR": 0.004, "MATRIX_LR": 0.04, "SCALAR_LR": 0.5}
ZERO_LR = {k: 0.0 for k in GOOD_LR}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def base_project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> Path:
    """The project with zero learning rates and its baseline already recorded (one real run)."""
    from arun.core.experiment import run_experiment
    repo = tmp_path_factory.mktemp("loop") / "base"
    make_project(repo, TRAIN, overrides=ZERO_LR)
    saved = {k: os.environ.get(k) for k in ("ARUN_CACHE", "ARUN_DATA_DIR", "OMP_NUM_THREADS")}
    os.environ.update(ARUN_CACHE=str(tiny_cache), ARUN_DATA_DIR=str(tiny_data), OMP_NUM_THREADS="1")
    try:
        rec = run_experiment(repo, BACKEND, "baseline", budget=BUDGET, device=DEVICE, show_progress=False, log=lambda s: None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert rec["status"] == "keep" and rec["baseline"], rec.get("error")
    return repo


@pytest.fixture
def project(base_project: Path, tmp_path: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the base project (its git history and ledger included)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ARUN_SEED", raising=False)
    repo = tmp_path / "repo"
    shutil.copytree(base_project, repo, symlinks=True)
    return repo


@pytest.fixture
def agent_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder the (confined) fake agent may write its pid and dump files to."""
    out = tmp_path / "agent-out"
    out.mkdir()
    monkeypatch.setenv("ARUN_AGENT_EXTRA_WRITE", str(out))
    return out


def unconfined(spec: str):
    """An agent with the caller's rights: what the scope check has to catch where the OS confines nothing."""
    from arun.search.proposers import AgentProposer
    return AgentProposer(spec, confine=False)


def loop(repo: Path, agent, **kw):
    from arun.search.loop import run_loop
    lines: list[str] = []
    kw.setdefault("iterations", 1)
    kw.setdefault("measure", False)  # the spread is measured by the tests that are about it
    result = run_loop(repo, BACKEND, agent, budget=BUDGET, device=DEVICE, show_progress=False, log=lines.append, **kw)
    result.lines = lines
    return result


def cli(repo: Path, *args: str) -> str:
    """The arun CLI in this process, run from the repo; returns its output (exit 0 required)."""
    from click.testing import CliRunner

    from arun.cli import cli as arun_cli
    old = os.getcwd()
    os.chdir(repo)
    try:
        res = CliRunner().invoke(arun_cli, list(args))
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output
    return res.output


def best_commit(repo: Path) -> str:
    from arun.core.ratchet import best_record
    recs = ledger_records(repo)
    return best_record(recs, recs[0]["key_id"])["commit"]


def assert_clean_at_best(repo: Path) -> None:
    """The train file is the best commit's and nothing else differs from HEAD (bench/ aside)."""
    at_best = subprocess.run(["git", "show", f"{best_commit(repo)}:{TRAIN}"], cwd=repo, capture_output=True,
                             check=True).stdout
    assert (repo / TRAIN).read_bytes() == at_best
    porcelain = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout
    status = [line for line in porcelain.splitlines() if not line[3:].startswith("bench/")]
    assert status == []


# --------------------------------------------------------------------------- program.md and the prompt (no runs)

@pytest.mark.unit
def test_program_md_covers_setup_loop_rules_and_history() -> None:
    text = (REPO / "program.md").read_text()
    for needle in ("arun start", "arun doctor", "README.md", "prepare.py", "train_mlx.py", "train_cuda.py",
                   "arun --backend X -m", "arun log", "arun show ID", "arun noise", "--confidence",
                   "Simplicity", "No new dependencies", "tail -n 50 run.log", "near miss", "$ARUN_DESCRIPTION_FILE",
                   "$ARUN_PROMPT_FILE", "arun loop", "Never stop"):
        assert needle in text, needle


@pytest.mark.unit
def test_the_prompt_carries_the_best_the_history_and_the_diffs_to_learn_from(tmp_path: Path) -> None:
    from arun.search.proposers import Context, build_prompt
    base = {"id": "b0", "status": "keep", "val_bpb": 1.5, "baseline": True, "commit": "c0" * 20,
            "description": "baseline", "config": {"DEPTH": 4}}
    best = {"id": "k1", "status": "keep", "val_bpb": 1.4, "commit": "c1" * 20, "description": "deeper",
            "config": {"DEPTH": 6, "MATRIX_LR": 0.04}, "best_before": 1.5}
    near = {"id": "n1", "status": "discard", "near_miss": True, "val_bpb": 1.401, "description": "wider MLP",
            "diff": "--- a/train_cuda.py\n+++ b/train_cuda.py\n-    hidden = 4 * dim\n+    hidden = 5 * dim"}
    bad = {"id": "d1", "status": "discard", "val_bpb": 1.6, "description": "GeLU",
           "diff": "-    relu(x).square()\n+    gelu(x)"}
    crash = {"id": "x1", "status": "crash", "val_bpb": None, "description": "huge batch", "error": "FAIL: out of memory"}
    recs = [base, best, near, bad, crash]
    ctx = Context(repo_dir=tmp_path, backend="cuda", train_file="train_cuda.py", key_id="abc", tag="torch-x",
                  records=recs, best=best, baseline=base, iteration=6, budget=300)
    prompt = build_prompt(ctx, "PROGRAM TEXT")
    assert prompt.startswith("PROGRAM TEXT")
    for needle in ("iteration 6", "Edit `train_cuda.py` only", "best val_bpb: 1.400000", "baseline 1.500000",
                   "DEPTH=6", "| n1 | discard (near miss) | 1.401000 | wider MLP |", "+    hidden = 5 * dim",
                   "+    gelu(x)", "FAIL: out of memory", "$ARUN_DESCRIPTION_FILE", "300 s"):
        assert needle in prompt, needle
    assert prompt.index("Near misses") < prompt.index("Recently discarded")


@pytest.mark.unit
def test_the_morning_report_counts_ranks_and_times_by_key() -> None:
    from arun.report.summary import parse_time, report, select, summarize

    def rec(i, key, status, val, before=None, desc="", near=False):
        return {"id": f"r{i}", "key_id": key, "tag": f"tag-{key}", "status": status, "val_bpb": val,
                "best_before": before, "description": desc, "near_miss": near, "wall_seconds": 360.0,
                "commit": f"{i:040d}", "baseline": i in (0, 10), "key": {"dataset": "d", "time_budget": 300.0},
                "time": f"2025-03-05T{22 + i // 6:02d}:{(i * 10) % 60:02d}:00+0000"}
    recs = [rec(0, "a", "keep", 1.00), rec(1, "a", "discard", 1.001, 1.00, near=True),
            rec(2, "a", "keep", 0.98, 1.00, "deeper"), rec(3, "a", "crash", None, 0.98),
            rec(4, "a", "keep", 0.95, 0.98, "bigger LR"), rec(5, "a", "invalid", None, 0.95),
            rec(10, "b", "keep", 1.30)]
    (a, b) = summarize(recs)
    assert a["experiments"] == 6 and a["counts"] == {"keep": 3, "discard": 1, "crash": 1, "timeout": 0, "invalid": 1}
    assert (a["baseline"], a["best"], a["near_misses"]) == (1.00, 0.95, 1)
    assert [t["description"] for t in a["top"]] == ["bigger LR", "deeper"]  # largest gain first
    assert a["experiment_hours"] == pytest.approx(0.6) and b["experiments"] == 1
    later = select(recs, since=parse_time("2025-03-05T22:35:00+00:00"))
    (a2,) = [s for s in summarize(later, recs) if s["key_id"] == "a"]
    assert a2["experiments"] == 2 and a2["best_before_period"] == 0.98 and a2["baseline"] == 1.00
    text = report(later, recs)
    assert "best when this period began: 0.980000" in text and "bigger LR" in text and "deeper" not in text
    assert select(recs, tag="tag-b") == [recs[-1]]
    assert parse_time("2025-03-05") is not None and parse_time("tomorrow") is None


# --------------------------------------------------------------------------- the built-in sweep

def test_sweep_keeps_only_improvements_and_never_rescores_a_train_file(project: Path) -> None:
    result = loop(project, "sweep", iterations=3)
    assert result.reason == "done" and len(result.records) == 3
    recs = [r for r in ledger_records(project) if r["key_id"] == result.records[0]["key_id"]]
    assert len(recs) == 4  # the baseline and three sweeps
    best = recs[0]["val_bpb"]
    for r in recs[1:]:
        assert r["proposer"] == "sweep" and r["description"].startswith("sweep: ")
        # (invalid only by the time rule: on a box loaded far past its cores, start-up can take more than
        # twice the baseline's, and that is charged as training, as it should be)
        assert r["status"] in ("keep", "discard", "crash") or \
            (r["status"] == "invalid" and str(r.get("error")).startswith("charged ")), r.get("error")
        if r["status"] == "keep":
            assert r["val_bpb"] < r["best_before"] == best
            best = r["val_bpb"]
        elif r["status"] == "discard":
            assert r["val_bpb"] >= r["best_before"] == best
    shas = [r["train_sha256"] for r in recs]
    assert len(set(shas)) == len(shas)
    # every keep was committed, in order (each experiment's ledger line rides in an `arun: record` commit)
    assert git(project, "log", "-1", "--format=%H", "--invert-grep", "--grep=^arun: record ") == best_commit(project)
    assert_clean_at_best(project)
    assert "arun loop (done)" in result.summary and "experiments: 3" in result.summary

    # The morning report over the whole ledger, through the CLI.
    out = cli(project, "summary")
    since = cli(project, "summary", "--since", "2999-01-01")
    assert "experiments: 4" in out and "best val_bpb" in out and " in experiments" in out
    assert "no experiments in this period" in since


# --------------------------------------------------------------------------- unattended safety

def test_consecutive_crashes_stop_the_loop(project: Path) -> None:
    result = loop(project, f"{FAKE} break", iterations=10, max_crashes=3)
    assert result.reason == "crashes"
    assert [r["status"] for r in result.records] == ["crash"] * 3
    assert "SyntaxError" in result.records[0]["error"]
    assert any("3 consecutive iterations without a score" in line for line in result.lines)
    assert "3 crash" in result.summary
    assert_clean_at_best(project)

    # The same broken file again (the fake agent numbers its breakage by iteration): refused unrun.
    (rec,) = loop(project, f"{FAKE} break").records
    assert rec["status"] == "invalid" and rec["total_seconds"] == 0.0
    assert rec["error"].startswith(f"this exact train file was already scored: id {result.records[0]['id']} (crash")
    assert_clean_at_best(project)


def test_an_agent_editing_a_fixed_file_is_reverted_and_recorded_invalid(project: Path) -> None:
    prepare_before = (project / "prepare.py").read_text()
    result = loop(project, unconfined(f"{FAKE} forbidden"))
    (rec,) = result.records
    assert rec["status"] == "invalid" and rec["val_bpb"] is None
    assert "notes.txt" in rec["error"] and "prepare.py" in rec["error"] and "reverted" in rec["error"]
    assert "+# fake agent" in rec["diff"]  # what the agent did to the train file stays on record
    assert rec["description"] == "edited three files"
    assert (project / "prepare.py").read_text() == prepare_before
    assert not (project / "notes.txt").exists()
    kept = project / rec["error"].split("are in ")[1].rstrip("/)")  # nothing the agent wrote is lost
    assert (kept / "notes.txt").read_text() == "scratch\n"
    assert (kept / "prepare.py").read_text().endswith("# the agent was here\n")
    assert_clean_at_best(project)


def test_an_agent_that_commits_outside_the_train_file_is_rolled_back(project: Path) -> None:
    head = git(project, "rev-parse", "HEAD")
    branch = git(project, "branch", "--show-current")
    result = loop(project, unconfined(f"{FAKE} forbidden-commit"))
    (rec,) = result.records
    assert rec["status"] == "invalid" and "prepare.py" in rec["error"]
    # the agent's commit is gone; the only new commit carries the invalid attempt's ledger line
    assert git(project, "rev-parse", "HEAD^") == head and git(project, "branch", "--show-current") == branch
    assert git(project, "log", "-1", "--format=%s") == f"arun: record {rec['id']} (invalid)"
    assert_clean_at_best(project)


def test_a_hanging_agent_is_killed_at_its_time_limit(project: Path, agent_out: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pids = agent_out / "pids"
    monkeypatch.setenv("FAKE_AGENT_PIDS", str(pids))
    t0 = time.monotonic()
    result = loop(project, f"{FAKE} hang", agent_timeout=3)
    assert time.monotonic() - t0 < 60
    (rec,) = result.records
    assert rec["status"] == "invalid" and rec["error"].startswith("agent timed out after 3s")
    agent, grandchild = map(int, pids.read_text().split())
    assert not pid_alive(agent) and not pid_alive(grandchild)  # the whole process group went
    assert_clean_at_best(project)


def test_no_change_is_recorded_invalid_without_running_and_the_prompt_follows_the_convention(
        project: Path, agent_out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dump = agent_out / "dump.json"
    monkeypatch.setenv("FAKE_AGENT_DUMP", str(dump))
    (project / "program.md").write_text("PROGRAM-MD-MARKER: research hard\n")
    git(project, "add", "program.md")
    git(project, "commit", "-qm", "program.md")
    for pin in (project / ".arun" / "pins").rglob("*.json"):  # the human re-pins the run at the new base
        pin.unlink()
    before = len(ledger_records(project))
    result = loop(project, f"{FAKE} nochange {{prompt_file}}", iterations=2, max_crashes=5)
    assert [r["status"] for r in result.records] == ["invalid", "invalid"]
    assert result.records[0]["error"] == "agent made no change" and result.records[0]["total_seconds"] == 0.0
    assert len(ledger_records(project)) == before + 2
    seen = json.loads(dump.read_text())
    prompt = seen["stdin"]
    assert prompt == Path(seen["env"]["ARUN_PROMPT_FILE"]).read_text()
    assert seen["argv"] == ["nochange", seen["env"]["ARUN_PROMPT_FILE"]]  # {prompt_file} was filled in
    assert seen["env"]["ARUN_TRAIN_FILE"] == TRAIN and seen["env"]["ARUN_BACKEND"] == BACKEND
    assert "PROGRAM-MD-MARKER" in prompt and f"Edit `{TRAIN}` only" in prompt
    assert "best val_bpb:" in prompt and "agent made no change" in prompt  # the first attempt is in the history


# --------------------------------------------------------------------------- noise and significance

def test_significance_gate_refuses_noise_and_keeps_a_clear_win(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arun.core.errors import ArunError
    with pytest.raises(ArunError, match="arun noise"):
        loop(project, f"{FAKE} set SEED=43", confidence=0.99)  # one seed and no noise measured yet
    from arun.search.loop import preflight  # (a loop that measures the spread first is not refused)
    assert preflight(project, BACKEND, BUDGET, DEVICE, 1, 0.99, print, measures=True).key_id
    out = cli(project, "noise", *ENGINE, "--budget", str(BUDGET), "--seeds", "3")
    (entry,) = json.loads(next((project / "bench").glob("*/noise.json")).read_text()).values()
    assert entry["n"] == 3 and entry["std"] > 0 and entry["seeds"] == [42, 43, 44]
    assert f"std {entry['std']:.6f}" in out and "DISCARD" not in out  # noise runs get no verdict
    assert len(ledger_records(project)) == 1  # noise runs are not experiments

    # Another seed: a change that moves val_bpb by the seed-to-seed noise only. The lower of the two
    # other seeds' values is taken, so where it beats the best the plain rule would keep it; the gate
    # must not. (With the weights frozen, the run reproduces the value `arun noise` measured.)
    seed, value = min(zip(entry["seeds"][1:], entry["values"][1:]), key=lambda sv: sv[1])
    monkeypatch.setenv("FAKE_AGENT_DESCRIBE", "another seed\nsecond line is ignored")
    result = loop(project, f"{FAKE} set SEED={seed}", confidence=0.99)
    (rec,) = result.records
    assert rec["val_bpb"] == pytest.approx(value, abs=1e-9), (rec.get("status"), rec.get("error"), result.lines)
    assert (rec["status"], rec["near_miss"]) == ("discard", True), rec.get("error")
    assert rec["description"] == "another seed"  # from $ARUN_DESCRIPTION_FILE, first line
    if rec["val_bpb"] < rec["best_before"]:
        # (the gate's line gives p, whichever way it then goes: fresh seeds, or none for a win too small)
        assert any("significance at 0.99: p = " in line for line in result.lines), "\n".join(result.lines)
        assert any(line.startswith("arun: DISCARD") and "(near miss)" in line for line in result.lines), result.lines

    # Learning rates restored: a win far outside the noise.
    monkeypatch.delenv("FAKE_AGENT_DESCRIBE")
    result = loop(project, f"{FAKE} set " + " ".join(f"{k}={v}" for k, v in GOOD_LR.items()), confidence=0.99)
    (rec,) = result.records
    assert rec["status"] == "keep", (rec.get("val_bpb"), rec.get("best_before"), result.lines)
    assert rec["best_before"] - rec["val_bpb"] > 5 * max(entry["std"], 1e-3)
    assert any("significance at 0.99: p = " in line for line in result.lines)
    assert_clean_at_best(project)


def test_a_failed_measurement_stops_a_one_seed_confidence_loop_before_any_proposal(project: Path) -> None:
    """--confidence with one seed tests against the measured spread alone: when the loop cannot measure
    it (here every noise run outlives a 0.5 s hard limit), a keep would be the plain rule under a
    --confidence label, so the loop stops before the first proposal, with the tree at the best."""
    from arun.core.errors import ArunError
    with pytest.raises(ArunError, match="measuring it failed"):
        loop(project, f"{FAKE} set SEED=43", confidence=0.99, measure=True, hard_timeout=0.5)
    assert len(ledger_records(project)) == 1 and not list((project / "bench").glob("*/noise.json"))
    assert_clean_at_best(project)


def test_a_measurement_that_fails_on_the_file_system_stops_the_same_way(project: Path) -> None:
    """An OSError while measuring (here the run folders' parent is a file, so no run folder can be
    made) is a failed measurement like any other: one line, not a traceback, and the tree at the best."""
    from arun.core.errors import ArunError
    runs = project / ".arun" / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.parent.mkdir(parents=True, exist_ok=True)
    runs.write_text("not a folder\n")
    with pytest.raises(ArunError, match="measuring it failed"):
        loop(project, f"{FAKE} set SEED=43", confidence=0.99, measure=True)
    assert len(ledger_records(project)) == 1 and not list((project / "bench").glob("*/noise.json"))
    assert_clean_at_best(project)


def test_a_measurement_cut_short_by_a_full_disk_leaves_the_best_file_whole(project: Path) -> None:
    """Measuring the baseline swaps its file in for the best's. When the disk fills on that write (here a
    real file-size limit: EFBIG, as ENOSPC), the loop may go on only from the best's file, whole: an agent
    must never edit a torn one."""
    import resource

    from arun.core.context import cached_context
    from arun.core.ledger import Ledger, ledger_path
    from arun.search.loop import spread_measured
    baseline = ledger_records(project)[0]
    from arun.core.trainfile import rewrite_constants
    # A best that is not the baseline: a later keep, recorded as the harness records one.
    (project / TRAIN).write_text(rewrite_constants((project / TRAIN).read_text(), GOOD_LR))
    git(project, "commit", "-qam", "a later keep")
    info = cached_context(project, BACKEND, BUDGET, DEVICE)
    Ledger(ledger_path(project, info.tag)).append({
        **{k: baseline[k] for k in ("key", "key_id", "tag", "backend", "confined")}, "status": "keep", "baseline": False,
        "commit": git(project, "rev-parse", "HEAD"), "parent_commit": baseline["commit"],
        "val_bpb": baseline["val_bpb"] - 0.5, "diff": "", "description": "a later keep"})
    best_bytes = (project / TRAIN).read_bytes()
    lines: list[str] = []
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))  # the ~20 KB train file cannot be written
    try:
        assert spread_measured(project, BACKEND, budget=BUDGET, device=DEVICE, hard_timeout=None, allowance=None,
                               show_progress=False, log=lines.append)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert any("the spread could not be measured" in line for line in lines), lines
    assert (project / TRAIN).read_bytes() == best_bytes                       # whole, and the best's
    assert_clean_at_best(project)                                              # no temp file left beside it


def test_the_early_stop_takes_its_margins_from_a_noise_entry_it_is_handed(project: Path) -> None:
    """A swarm worktree has no noise.json: the margins measured in the main repo are handed over."""
    from arun.search.loop import stopper_for
    assert not list((project / "bench").glob("*/noise.json"))
    here = stopper_for(project, BACKEND, BUDGET, DEVICE, log=lambda s: None)
    handed = stopper_for(project, BACKEND, BUDGET, DEVICE, log=lambda s: None, noise={"loss_trajectory_std": [0.5] * 20})
    assert (here.source, handed.source) == ("default margin", "measured spread")


def test_an_edit_to_the_schedule_s_code_is_never_stopped_early(project: Path) -> None:
    """The constants unchanged, the learning-rate schedule's code edited: the diff against the best's
    file (from its commit) protects the run; an edit that sets no rate leaves it stoppable."""
    from arun.search.loop import stopper_for
    path = project / TRAIN
    text = path.read_text()
    path.write_text(replace_once(text, "return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 1.0",
                                 "return progress / WARMUP_RATIO if WARMUP_RATIO > 0 else 2.0"))
    said: list[str] = []
    assert stopper_for(project, BACKEND, BUDGET, DEVICE, log=said.append) is None
    assert any("edits code that sets a learning rate" in s and "2.0" in s for s in said), said
    path.write_text(replace_once(text, "WEIGHT_DECAY = 0.2", "WEIGHT_DECAY = 0.1"))   # a lower decay: stoppable
    assert stopper_for(project, BACKEND, BUDGET, DEVICE, log=said.append) is not None


def test_the_loop_measures_the_spread_once_before_its_first_proposal(project: Path) -> None:
    """Confirmation needs a spread the agent's files do not set: with none stored, the loop measures it
    (3 runs, not experiments) before the first proposal, on the key's baseline even when an agent's file
    is the best by then (kept without it: the plain rule), and never again for that key."""
    first = loop(project, f"{FAKE} set " + " ".join(f"{k}={v}" for k, v in GOOD_LR.items()))
    assert first.records[0]["status"] == "keep", first.lines
    assert first.records[0]["confirmation"]["verdict"] == "no spread measured"
    best_text = (project / TRAIN).read_text()
    result = loop(project, f"{FAKE} set SEED=43", measure=True)
    (entry,) = json.loads(next((project / "bench").glob("*/noise.json")).read_text()).values()
    baseline = ledger_records(project)[0]
    assert entry["n"] == 3 and entry["seeds"] == [42, 43, 44] and entry["std"] > 0
    assert (entry["commit"], entry["train_sha256"]) == (baseline["commit"], baseline["train_sha256"])
    assert any("measuring the run-to-run spread of the key's baseline first" in s for s in result.lines)
    assert len(ledger_records(project)) == 3                                 # noise runs are not experiments
    assert result.records[0]["status"] != "keep" or (project / TRAIN).read_text() != best_text
    assert_clean_at_best(project)                                            # the best is back, whichever it is
    again = loop(project, f"{FAKE} set SEED=44", measure=True)
    assert not any("measuring the run-to-run spread" in s for s in again.lines)
    assert_clean_at_best(project)


# --------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_ends_the_loop_cleanly_with_the_train_file_at_the_best(project: Path, tmp_path: Path,
                                                                    tiny_data: Path, tiny_cache: Path) -> None:
    (tmp_path / "agent-out").mkdir()
    pids = tmp_path / "agent-out" / "pids"
    env = arun_env(tiny_data, tiny_cache, FAKE_AGENT_PIDS=str(pids), ARUN_AGENT_EXTRA_WRITE=str(pids.parent))
    cmd = [sys.executable, "-c", "import sys; from arun.cli import main; sys.argv[0] = 'arun'; main()",
           "loop", *ENGINE, "--budget", str(BUDGET), "--agent", f"{FAKE} hang",
           "--no-measure-noise"]
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not pids.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pids.exists(), proc.communicate(timeout=30)[0] if proc.poll() is not None else "agent never started"
        time.sleep(0.3)
        assert (project / TRAIN).read_text().endswith("# about to hang\n")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted; the train file is at the best commit" in out and "arun loop (interrupted)" in out
    agent, grandchild = map(int, pids.read_text().split())
    assert not pid_alive(agent) and not pid_alive(grandchild)
    assert_clean_at_best(project)
