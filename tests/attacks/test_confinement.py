"""
Attacks on the confinement of the processes the harness does not trust, end to end: real
experiments (the torch engine on the CPU, a tiny model, 1.5 s budgets) whose train file reaches
for what it must not touch, the scorer's policy, and the loop's agent (tests/fake_agent.py).
Each attack must fail at the OS with an error naming the path, be recorded, and change nothing;
the honest run beside them must not notice. Skipped where the OS cannot confine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from arun.core import confine
from engines import sandbox
from helpers_repo import git, ledger_records, make_project

REPO = Path(__file__).resolve().parents[2]
FAKE = f"{sys.executable} {REPO / 'tests' / 'fake_agent.py'}"
BUDGET = 1.5
TRAIN = "train_cuda.py"
CONFINED, WHY = sandbox.available()

pytestmark = pytest.mark.timeout(300)


def run(repo: Path, description: str) -> dict:
    from arun.core.experiment import run_experiment
    lines: list[str] = []
    rec = run_experiment(repo, "cuda", description, budget=BUDGET, device="cpu", show_progress=False, log=lines.append)
    rec["_lines"] = lines
    return rec


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> Path:
    """A project whose honest baseline ran confined (one real run)."""
    if not CONFINED:
        pytest.skip(f"no OS confinement here: {WHY}")
    pytest.importorskip("torch")
    repo = tmp_path_factory.mktemp("confine") / "repo"
    make_project(repo, TRAIN)
    saved = {k: os.environ.get(k) for k in ("ARUN_CACHE", "ARUN_DATA_DIR", "OMP_NUM_THREADS")}
    os.environ.update(ARUN_CACHE=str(tiny_cache), ARUN_DATA_DIR=str(tiny_data), OMP_NUM_THREADS="1")
    try:
        rec = run(repo, "baseline")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert rec["status"] == "keep" and rec["baseline"], rec.get("error")
    assert rec["confined"] is True and rec["confinement"] == WHY
    assert rec["_lines"][0] == f"arun: confined ({WHY})"
    assert (repo / "run.log").read_text().splitlines()[0] == f"arun: confined ({WHY})"
    return repo


@pytest.fixture
def project(base: Path, data_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return base


def snapshot(repo: Path) -> dict:
    """What an attack must leave as it was: the ledger, the tracked files, the best."""
    ledger = next((repo / "bench").glob("*/ledger.jsonl"))
    recs = ledger_records(repo)
    best = [r for r in recs if r["status"] == "keep"][-1]
    return {"ledger": ledger.read_bytes(), "tree": git(repo, "status", "--porcelain", "--untracked-files=all"),
            "head": git(repo, "rev-parse", "HEAD"), "best": best["id"], "prepare": (repo / "prepare.py").read_bytes()}


def unchanged(repo: Path, before: dict) -> None:
    after = snapshot(repo)
    assert after["ledger"].startswith(before["ledger"])  # one more line, the old ones intact
    assert after["ledger"].count(b"\n") == before["ledger"].count(b"\n") + 1
    # nothing committed but the attempt's ledger line, in its `arun: record` commit
    assert git(repo, "rev-parse", "HEAD^") == before["head"] and after["prepare"] == before["prepare"]
    assert git(repo, "log", "-1", "--format=%s").startswith("arun: record ")
    assert after["best"] == before["best"]
    assert [s for s in after["tree"].splitlines() if "bench/" not in s] == \
           [s for s in before["tree"].splitlines() if "bench/" not in s]


def attack_file(code: str) -> str:
    """A train file that attacks before anything else (no training, no evaluation)."""
    return "import os\n" + textwrap.dedent(code)


def targets(repo: Path, data: Path) -> dict[str, tuple[str, Path]]:
    """name -> (code, the path the kernel must deny)."""
    ledger = next((repo / "bench").glob("*/ledger.jsonl")).resolve()
    baseline = ledger_records(repo)[0]
    other = (repo / baseline["run_dir"] / "result0.json").resolve()
    val, test = (data / "val_rows.npy").resolve(), (data / "test_rows.npy").resolve()
    bench_new, repo_file = (ledger.parent / "injected.jsonl"), (repo / "prepare.py").resolve()
    return {
        "val_rows": (f"open({str(val)!r}, 'rb').read()", val),
        "test_rows": (f"open({str(test)!r}, 'rb').read()", test),
        "other_run": (f"open({str(other)!r}).read()", other),
        "ledger_read": (f"open({str(ledger)!r}).read()", ledger),
        "ledger_write": (f"open({str(ledger)!r}, 'a').write('{{}}\\n')", ledger),
        "bench_write": (f"open({str(bench_new)!r}, 'w').write('x')", bench_new),
        "repo_write": (f"open({str(repo_file)!r}, 'a').write('# x\\n')", repo_file),
    }


@pytest.mark.parametrize("name", ["val_rows", "test_rows", "other_run", "ledger_read", "ledger_write",
                                  "bench_write", "repo_write"])
def test_a_train_file_reaching_outside_is_denied_recorded_and_changes_nothing(project: Path, data_env: Path,
                                                                            name: str, monkeypatch) -> None:
    code, path = targets(project, data_env)[name]
    if not path.exists() and name == "test_rows":
        pytest.skip("this data has no test rows")
    before = snapshot(project)
    (project / TRAIN).write_text(attack_file(code))
    rec = run(project, f"attack {name}")
    assert rec["status"] == "crash" and rec["val_bpb"] is None
    assert f"Permission denied: '{path}'" in rec["error"], rec["error"]
    assert rec["confined"] is True
    unchanged(project, before)
    assert not (path.parent / "injected.jsonl").exists()


def test_the_scorer_reads_the_data_and_writes_only_its_output(project: Path, data_env: Path, tmp_path: Path) -> None:
    out = tmp_path / "verdict"
    out.mkdir()
    ledger = next((project / "bench").glob("*/ledger.jsonl")).resolve()
    policy = confine.scorer_policy(data_env, project / TRAIN, out, tmp_path / "tmp")
    code = f"""
        import numpy
        open({str(data_env / 'val_rows.npy')!r}, 'rb').read()
        open({str(out / 'v.json')!r}, 'w').write('{{}}')
        open({str(ledger)!r}, 'a').write('x')
    """
    proc = subprocess.run(sandbox.confined_command(policy, [sys.executable, "-c", textwrap.dedent(code)]),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert f"Permission denied: '{ledger}'" in proc.stderr, proc.stderr
    assert (out / "v.json").exists()


def test_score_artifact_runs_the_evaluator_confined(project: Path, data_env: Path, tmp_path: Path) -> None:
    from arun.core.scoring import score_artifact
    bogus = tmp_path / "forward.pt2"
    bogus.write_bytes(b"not an artifact")
    (tmp_path / "out").mkdir()
    verdict = score_artifact("cuda", bogus, data_env, tmp_path / "out" / "v.json", device="cpu", timeout=120)
    assert verdict["confined"] is True and verdict["confinement"] == WHY
    assert "error" in verdict  # not an artifact; what matters is that it ran under the policy


# --------------------------------------------------------------------------- the loop's agent

def propose(repo: Path, mode: str):
    from arun.core.context import cached_context
    from arun.search.proposers import AgentProposer, Context
    info = cached_context(repo, "cuda", BUDGET, "cpu")
    ctx = Context(repo_dir=repo, backend="cuda", train_file=TRAIN, key_id=info.key_id, tag=info.tag, records=[],
                  best=None, budget=BUDGET)
    return AgentProposer(f"{FAKE} {mode}").propose(ctx)


@pytest.mark.parametrize("what", ["val", "bench", "pth", "evaluator"])
def test_the_agent_cannot_read_the_val_rows_or_write_outside_the_train_file(project: Path, data_env: Path,
                                                                            what: str) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    evaluator = (project / "engines" / "evaluator.py").read_bytes()
    before = (project / TRAIN).read_bytes()
    try:
        proposal = propose(project, f"attack {what}")
        out = (project / ".arun" / "agent-logs" / "stdout.log").read_text()
        assert proposal.extra["agent_confined"] is True and proposal.extra["agent_exit"] == 0, out
        assert "denied: [Errno 13] Permission denied" in out and "done:" not in out
        assert "git diff exit 0" in out  # the agent may read git history
        assert (project / TRAIN).read_bytes() != before  # the honest edit went through
    finally:
        (project / TRAIN).write_bytes(before)
    assert not (site / "zz_agent.pth").exists() and not (project / "bench" / "stolen.txt").exists()
    assert (project / "engines" / "evaluator.py").read_bytes() == evaluator


def test_a_confined_agent_in_the_loop_records_as_before(project: Path) -> None:
    from arun.search.loop import run_loop
    lines: list[str] = []
    before = len(ledger_records(project))
    result = run_loop(project, "cuda", f"{FAKE} set SEED=7", iterations=1, budget=BUDGET, device="cpu",
                      show_progress=False, log=lines.append, measure=False)
    (rec,) = result.records
    assert rec["status"] in ("keep", "discard"), rec.get("error")
    assert rec["description"] == "set SEED=7" and rec["confined"] is True
    assert len(ledger_records(project)) == before + 1
    assert any(line == f"arun: confined ({WHY})" for line in lines)
    assert json.loads(json.dumps(rec))["confinement"] == WHY


# --------------------------------------------------------------------------- where the OS cannot confine

@pytest.fixture
def no_confinement(monkeypatch: pytest.MonkeyPatch) -> str:
    """This machine as one without Landlock or Seatbelt (the only stand-in here: the OS probe)."""
    why = "Landlock is not available on kernel 5.4 (it needs Linux >= 5.13 with landlock in the lsm= boot list)"
    monkeypatch.setattr(confine, "state", lambda: (False, why))
    monkeypatch.delenv("ARUN_REQUIRE_CONFINEMENT", raising=False)
    return why


def test_unconfined_runs_work_are_marked_and_can_be_refused(tmp_path: Path, data_env: Path, no_confinement: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from arun.cli import cli
    from arun.core.errors import ArunError
    from arun.report.compare import compare_tables, summarize
    from arun.report.history import log_rows
    pytest.importorskip("torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    repo = tmp_path / "repo"
    make_project(repo, TRAIN)
    rec = run(repo, "baseline")
    assert rec["status"] == "keep" and rec["confined"] is False and rec["confinement"] == no_confinement
    assert rec["_lines"][0] == f"arun: NOT confined: {no_confinement}"
    assert log_rows([rec])[0].unconfined and summarize([rec])[0].best_unconfined
    assert compare_tables(summarize([rec]))  # renders with the mark
    before = (next((repo / "bench").glob("*/ledger.jsonl"))).read_bytes()
    with pytest.raises(ArunError, match="confinement is required"):
        from arun.core.experiment import run_experiment
        run_experiment(repo, "cuda", "again", budget=BUDGET, device="cpu", require_confinement=True, log=lambda s: None)
    monkeypatch.chdir(repo)
    for args in (["run", "--backend", "cuda", "--device", "cpu"], ["loop", "--backend", "cuda", "--agent", "sweep"],
                 ["noise", "--backend", "cuda"], ["swarm", "--backend", "cuda"]):
        res = CliRunner().invoke(cli, [*args, "--require-confinement"])
        assert res.exit_code == 1 and "confinement is required" in res.output, res.output
        assert len(res.output.strip().splitlines()) <= 3  # one line (wrapped at the terminal's width)
        monkeypatch.delenv("ARUN_REQUIRE_CONFINEMENT", raising=False)
    assert next((repo / "bench").glob("*/ledger.jsonl")).read_bytes() == before
