"""The first hour of an agent that follows upstream autoresearch's program.md unchanged, through the real
`arun` CLI on a tiny model: it keeps an untracked results.tsv (which must not block a run) and runs
`git reset --hard` after a discard (which must not erase arun's record of it). Next to each tolerance,
the attacks that would hide a forbidden change behind it: each is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from arun.core.ledger import Ledger
from engines import sandbox
from helpers_repo import arun_env, git, inject, ledger_records, make_project, run_arun

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
# The journal and the tolerances are the harness's, the same for both engines: MLX runs, a third of the cost.
BACKEND, TRAIN = "mlx", "train_mlx.py"
SLOW = ["MATRIX_LR=0.0004", "EMBEDDING_LR=0.006", "UNEMBEDDING_LR=0.00004", "SCALAR_LR=0.005"]


@pytest.fixture
def project(tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    make_project(repo, TRAIN)
    return repo, arun_env(tiny_data, tiny_cache)


def run(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return run_arun(repo, env, "--budget", "1.5", *args, timeout=300, backend=BACKEND)


def crash_edit(repo: Path) -> None:
    """An edit that fails at once: a cheap experiment, recorded and committed like any other."""
    path = repo / TRAIN
    path.write_text(inject(path.read_text(), "# --- hyperparameters ---", "raise SystemExit('first-hour probe')\n",
                           before=True))


def committed_ids(repo: Path) -> list[str]:
    text = git(repo, "show", "HEAD:bench/" + ledger_tag(repo) + "/ledger.jsonl")
    return [json.loads(line)["id"] for line in text.splitlines() if line.strip()]


def ledger_tag(repo: Path) -> str:
    return next((repo / "bench").glob("*/ledger.jsonl")).parent.name


# --------------------------------------------------------------------------- results.tsv

def test_an_untracked_results_tsv_does_not_block_a_run(project: tuple[Path, dict]) -> None:
    repo, env = project
    (repo / "results.tsv").write_text(HEADER)
    p = run(repo, env, "-m", "baseline")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "arun: BASELINE" in p.stdout
    assert (repo / "results.tsv").read_text() == HEADER                      # left as the agent wrote it
    assert "results.tsv" not in git(repo, "ls-files")                         # and never committed
    assert [r["status"] for r in ledger_records(repo)] == ["keep"]


@pytest.mark.parametrize("attack", ["fixed file edited", "committed", "staged", "symlink", "folder",
                                    "not at the root", "look-alike name", "second train file"])
def test_results_tsv_hides_no_other_change(project: tuple[Path, dict], attack: str) -> None:
    """An agent paid to fake a win, using the tolerated name as cover: every variant is still refused."""
    repo, env = project
    assert run_arun(repo, env, "start", "cover", backend=BACKEND).returncode == 0             # a pinned run branch
    (repo / "results.tsv").write_text(HEADER)
    named = "results.tsv"
    if attack == "fixed file edited":
        (repo / "prepare.py").write_text((repo / "prepare.py").read_text() + "\nVAL_TOKENS = 1\n")
        named = "prepare.py"
    elif attack == "committed":
        git(repo, "add", "results.tsv")
        git(repo, "commit", "-qm", "log")
    elif attack == "staged":
        git(repo, "add", "results.tsv")
    elif attack == "symlink":
        (repo / "results.tsv").unlink()
        (repo / "results.tsv").symlink_to(repo / "prepare.py")
    elif attack == "folder":
        (repo / "results.tsv").unlink()
        (repo / "results.tsv").mkdir()
        (repo / "results.tsv" / "helper.py").write_text("X = 1\n")
    elif attack == "not at the root":
        (repo / "engines" / "results.tsv").write_text(HEADER)
        named = "engines/results.tsv"
    elif attack == "look-alike name":
        (repo / "results.tsv.py").write_text("X = 1\n")
        named = "results.tsv.py"
    elif attack == "second train file":
        (repo / "train_helper.py").write_text("X = 1\n")
        named = "train_helper.py"
    p = run(repo, env, "-m", "cover")
    assert p.returncode != 0
    assert f"only {TRAIN} may differ" in p.stderr and named in p.stderr, p.stderr[-2000:]
    assert not list((repo / "bench").glob("*/ledger.jsonl"))                  # nothing ran, nothing recorded


@pytest.mark.skipif(sandbox.landlock_abi() < 4, reason="needs Landlock ABI >= 4 (Linux >= 6.7)")
def test_a_confined_train_file_cannot_read_results_tsv(project: tuple[Path, dict]) -> None:
    """The tolerated file is no side channel: a train file that reads it (weights an agent stored there,
    say) is stopped by the OS, and the attempt is recorded as a crash with nothing kept."""
    repo, env = project
    (repo / "results.tsv").write_text(HEADER + "weights\t0.1 0.2 0.3\n")
    path = repo / TRAIN
    path.write_text(inject(path.read_text(), "# --- hyperparameters ---",
                           "STORED = open(__import__('pathlib').Path(__file__).resolve().parent / 'results.tsv').read()\n",
                           before=True))
    p = run(repo, env, "-m", "read results.tsv")
    assert "arun: confined" in p.stdout, p.stdout[-1000:]
    assert "arun: CRASH: PermissionError" in p.stdout and "results.tsv" in p.stdout
    assert [r["status"] for r in ledger_records(repo)] == ["crash"]


# --------------------------------------------------------------------------- git reset

def test_a_git_reset_after_a_discard_never_erases_its_record(project: tuple[Path, dict]) -> None:
    """Upstream's agent resets after every discard; arun puts the record back (sealed as it was) and
    commits it again at the next run, however far back the branch was reset."""
    repo, env = project
    assert run(repo, env, "-m", "baseline").returncode == 0
    assert run_arun(repo, env, "set", "--backend", BACKEND, *SLOW, backend=BACKEND).returncode == 0
    p = run(repo, env, "-m", "learning rates 100x smaller")
    assert "arun: DISCARD" in p.stdout, p.stdout[-2000:]
    base, discard = [r["id"] for r in ledger_records(repo)]

    git(repo, "reset", "--hard", "HEAD~1")                                    # upstream: "git reset back"
    assert [r["id"] for r in ledger_records(repo)] == [base]                 # the discard's line is gone
    crash_edit(repo)
    p = run(repo, env, "-m", "after a reset")
    assert "put back 1 record(s) a git reset had erased" in p.stdout and discard in p.stdout, p.stdout[-2000:]
    ids = [r["id"] for r in ledger_records(repo)]
    assert ids[:2] == [base, discard] and len(ids) == 3
    assert committed_ids(repo) == ids                                         # committed again, tree clean
    assert all(r["_trust"] == "ok" for r in Ledger(next((repo / "bench").glob("*/ledger.jsonl"))).records())

    git(repo, "reset", "--hard", "main")                                      # before any record at all
    assert not list((repo / "bench").glob("*/ledger.jsonl"))
    crash_edit(repo)
    p = run(repo, env, "-m", "after a reset to main")
    assert "put back 3 record(s)" in p.stdout, p.stdout[-2000:]
    assert [r["id"] for r in ledger_records(repo)][:3] == ids
    assert committed_ids(repo)[:3] == ids


def test_another_branch_or_clone_never_receives_a_branchs_records(project: tuple[Path, dict],
                                                                    tiny_data: Path, tiny_cache: Path) -> None:
    """No false positive: the journal only repairs the branch and the clone it came from."""
    repo, env = project
    crash_edit(repo)
    assert "arun: CRASH" in run(repo, env, "-m", "on the first branch").stdout
    first = [r["id"] for r in ledger_records(repo)]
    git(repo, "checkout", "-q", "-f", "main")
    assert run_arun(repo, env, "start", "second", backend=BACKEND).returncode == 0             # from main: an empty ledger
    crash_edit(repo)
    assert "arun: CRASH" in run(repo, env, "-m", "on the second branch").stdout
    assert [r["id"] for r in ledger_records(repo)] != first and len(ledger_records(repo)) == 1

    # A branch made again within the same second as its last record may receive that record (reflog times
    # are whole seconds: SECURITY.md, Not defended); on a quick box this clone comes that fast.
    time.sleep(1.1)
    shutil.rmtree(repo)                                                       # a fresh clone at the same path
    make_project(repo, TRAIN)
    assert run_arun(repo, env, "start", "second", backend=BACKEND).returncode == 0
    crash_edit(repo)
    p = run(repo, env, "-m", "in a new clone")
    assert "put back" not in p.stdout and len(ledger_records(repo)) == 1, p.stdout[-2000:]


# --------------------------------------------------------------------------- arun transfer --from TAG

GOOD = ["MATRIX_LR=0.04", "EMBEDDING_LR=0.6", "UNEMBEDDING_LR=0.004", "SCALAR_LR=0.5"]


def test_transfer_from_a_tag_takes_this_machines_own_winner_over_a_shipped_reference(
        tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> None:
    """A clone ships reference ledgers under bench/; on the same hardware they share the user's tag. The
    reference (another machine's key) wins only while this machine has no record of that tag."""
    repo = tmp_path / "repo"
    make_project(repo, TRAIN, overrides={k: float(v) for k, v in (s.split("=") for s in SLOW)})
    ref_env = arun_env(tiny_data, tiny_cache, ARUN_HOME=str(tmp_path / "reference-machine"))
    assert run(repo, ref_env, "-m", "baseline").returncode == 0
    assert run_arun(repo, ref_env, "set", "--backend", BACKEND, *GOOD, backend=BACKEND).returncode == 0
    assert "arun: KEEP" in run(repo, ref_env, "-m", "learning rates restored").stdout
    ref_branch = git(repo, "rev-parse", "--abbrev-ref", "HEAD")
    git(repo, "checkout", "-q", "-f", "main")
    git(repo, "checkout", ref_branch, "--", "bench")
    git(repo, "commit", "-qm", "ship the reference ledger")
    tag = ledger_tag(repo)

    from arun.search.transfer import find_winner
    shipped = find_winner(repo, tag)
    assert shipped.record["status"] == "keep" and "other machines' records" in shipped.source

    env = arun_env(tiny_data, tiny_cache)
    assert run_arun(repo, env, "start", "mine", backend=BACKEND).returncode == 0
    assert "arun: BASELINE" in run(repo, env, "-m", "baseline").stdout
    before = ledger_records(repo)
    p = run_arun(repo, env, "transfer", "--backend", BACKEND, "--from", tag, timeout=300, backend=BACKEND)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"the winner comes from this machine's own records in bench/{tag}/ledger.jsonl (1 of its 3" in p.stdout
    assert before[-1]["id"] in p.stdout and shipped.record["id"] not in p.stdout
    assert "nothing to run here" in p.stdout and ledger_records(repo) == before


def test_any_append_puts_back_what_a_reset_erased_first(tmp_path: Path) -> None:
    """Records appended outside an experiment (the loop's invalid turns) repair the ledger too: the
    erased line goes back verbatim before the new one, and the chain holds."""
    from helpers_repo import empty_repo
    repo = empty_repo(tmp_path / "repo")
    git(repo, "checkout", "-qb", "autoresearch/x")                           # the run branch (its birth: now)
    head = git(repo, "rev-parse", "HEAD")
    path = repo / "bench" / "t" / "ledger.jsonl"
    ledger = Ledger(path)
    first = ledger.append({"branch": "autoresearch/x", "commit": head, "status": "crash"})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "record 1")
    erased = ledger.append({"branch": "autoresearch/x", "commit": head, "status": "discard"})
    git(repo, "commit", "-qam", "record 2")
    git(repo, "reset", "--hard", "HEAD~1")
    assert [r["id"] for r in ledger.records()] == [first["id"]]
    other = Ledger(path).append({"branch": "autoresearch/y", "commit": head, "status": "invalid"})
    assert [r["id"] for r in ledger.records()] == [first["id"], other["id"]]   # another branch's: not its
    git(repo, "checkout", "-q", "--", "bench")
    last = Ledger(path).append({"branch": "autoresearch/x", "commit": head, "status": "invalid"})
    recs = ledger.records()
    assert [r["id"] for r in recs] == [first["id"], erased["id"], last["id"]]
    assert all(r["_trust"] == "ok" for r in recs)


# --------------------------------------------------------------------------- the journal: one branch incarnation

def test_a_deleted_and_restarted_branch_starts_afresh(project: tuple[Path, dict]) -> None:
    """Delete a run branch and `arun start` the same name (what arun advises to start afresh): the old
    branch's records stay in the journal but are never put back onto the new one, nor missed by it."""
    repo, env = project
    assert run_arun(repo, env, "start", "again", backend=BACKEND).returncode == 0
    assert "arun: BASELINE" in run(repo, env, "-m", "baseline").stdout
    old = [r["id"] for r in ledger_records(repo)]
    git(repo, "checkout", "-q", "-f", "main")
    git(repo, "branch", "-D", "autoresearch/again")
    time.sleep(1.1)                                                           # (records carry whole seconds)
    assert run_arun(repo, env, "start", "again", backend=BACKEND).returncode == 0
    p = run(repo, env, "-m", "afresh")
    assert p.returncode == 0 and "put back" not in p.stdout and "lacks" not in p.stdout + p.stderr, p.stdout[-2000:]
    assert "baseline run" in p.stdout and "arun: BASELINE" in p.stdout, p.stdout[-2000:]
    assert [r["id"] for r in ledger_records(repo)] != old and len(ledger_records(repo)) == 1


def _drop_first_line(ledger: Path) -> None:
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[1:]))


def _one_unsealed_line(ledger: Path) -> None:
    ledger.write_text(json.dumps({"id": "legacy-1", "status": "crash", "description": "old"}) + "\n")


@pytest.mark.parametrize("attack", [_drop_first_line, _one_unsealed_line], ids=["middle-line", "replaced"])
def test_a_keep_edited_out_of_the_ledger_refuses_the_run_and_fails_the_audit(project: tuple[Path, dict],
                                                                              attack) -> None:
    """An actor who can write bench/ and .git cuts the best's line from the middle of the ledger (or replaces the
    ledger with one unsealed line) and commits: nothing can be put back (it no longer chains), so the next run
    refuses naming the lost keep, and `arun audit` fails it, instead of ratcheting against a worse best."""
    repo, env = project
    assert "arun: BASELINE" in run(repo, env, "-m", "baseline").stdout
    crash_edit(repo)
    assert "arun: CRASH" in run(repo, env, "-m", "a line after the keep").stdout
    keep = ledger_records(repo)[0]["id"]
    ledger = next((repo / "bench").glob("*/ledger.jsonl"))
    attack(ledger)
    git(repo, "commit", "-qam", "tidy the ledger")
    git(repo, "checkout", "-q", "--", ".")
    p = run(repo, env, "-m", "ratchet against a worse best")
    assert p.returncode != 0 and keep in p.stderr and "arun start NAME" in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    assert "arun: KEEP" not in p.stdout and "arun: BASELINE" not in p.stdout
    a = run_arun(repo, env, "audit", timeout=300, backend=BACKEND)
    assert a.returncode == 1 and "missing from the ledger" in a.stdout and keep in a.stdout, a.stdout[-2000:]


def test_a_reset_past_a_pruned_keep_refuses_the_run(project: tuple[Path, dict]) -> None:
    """A reset past a keep, then reflog expire and gc --prune=now: its commit is gone, so the record cannot go
    back; the run refuses naming it rather than fall back to an older best."""
    repo, env = project
    assert "arun: BASELINE" in run(repo, env, "-m", "baseline").stdout
    keep = ledger_records(repo)[0]["id"]
    git(repo, "reset", "-q", "--hard", "main")
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    p = run(repo, env, "-m", "after the prune")
    assert p.returncode != 0 and keep in p.stderr and "put back" not in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
    assert "arun: BASELINE" not in p.stdout


def test_without_a_reflog_nothing_is_put_back_and_a_swarms_records_are_never_lost(tmp_path: Path,
                                                                                   capfd: pytest.CaptureFixture) -> None:
    """No reflog (expired, or reflogs off): arun cannot tell a reset branch from a re-made one, so it puts
    nothing back and says so. A swarm's records (the driver's, under a worker's branch name) are never
    counted as lost on that branch, which never carries the main ledger."""
    from helpers_repo import empty_repo
    repo = empty_repo(tmp_path / "repo")
    git(repo, "checkout", "-qb", "autoresearch/r-w0")
    head = git(repo, "rev-parse", "HEAD")
    path = repo / "bench" / "t" / "ledger.jsonl"
    ledger = Ledger(path)
    mine = ledger.append({"branch": "autoresearch/r-w0", "commit": head, "status": "keep"})
    ledger.append({"branch": "autoresearch/r-w0", "commit": head, "status": "keep", "swarm": {"run": "r"}})
    path.unlink()
    assert [r["id"] for r in ledger.missing("autoresearch/r-w0")] == [mine["id"]]
    git(repo, "reflog", "expire", "--expire=now", "--all")
    capfd.readouterr()
    assert ledger.restore("autoresearch/r-w0") == [] and not path.exists()
    assert "has no reflog here" in capfd.readouterr().err
