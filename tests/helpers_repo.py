"""
A real project in a tmp git repo, for tests that drive `arun` end to end.

    repo = make_project(tmp_path / "repo")          # fixed files + a tiny train_cuda.py, committed
    proc = run_arun(repo, env, "--budget", "1.5")    # the real CLI in a subprocess (torch; backend="mlx": MLX)
    recs = ledger_records(repo)                      # every line of every ledger, parsed strictly

The copy holds what a user's clone holds (the project's tracked and untracked,
non-ignored files minus tests/, benchmarks/ and bench/), so the harness under test is
this tree's own code, not an installed copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A model that runs a few dozen steps per second on one CPU core (tiny profile: 64-token rows, vocab 512).
TINY = {
    "DEPTH": 1, "ASPECT_RATIO": 64, "HEAD_DIM": 32, "WINDOW_PATTERN": "L", "TOTAL_BATCH_SIZE": 512,
    "DEVICE_BATCH_SIZE": 8, "WARMUP_STEPS": 1, "COMPILE": False,
}


def git(cwd: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True).stdout.strip()


def empty_repo(repo: Path) -> Path:
    """A git repo with one commit (a README) and a local identity."""
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@t")
    git(repo, "config", "user.name", "t")
    (repo / "README").write_text("x\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def tiny_train_text(train_file: str = "train_cuda.py", overrides: dict | None = None) -> str:
    """The project's train file with the tiny constants block (plus any overrides)."""
    from arun.core.trainfile import rewrite_constants
    return rewrite_constants((REPO / train_file).read_text(), {**TINY, **(overrides or {})})


def make_project(dest: Path, train_file: str = "train_cuda.py", overrides: dict | None = None,
                 tiny: bool = True) -> str:
    """Copies the project into dest, makes the train file tiny (unless tiny=False), commits it all;
    returns the commit."""
    dest.mkdir(parents=True, exist_ok=True)
    files = git(REPO, "ls-files", "-co", "--exclude-standard").splitlines()
    for rel in files:
        src = REPO / rel
        if rel.startswith(("bench/", "tests/", "benchmarks/")) or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    if tiny:
        (dest / train_file).write_text(tiny_train_text(train_file, overrides))
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.email", "test@arun")
    git(dest, "config", "user.name", "arun test")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "project")
    return git(dest, "rev-parse", "HEAD")


def inject(text: str, anchor: str, code: str, *, before: bool = False, body: bool = False) -> str:
    """Inserts code after (or before) the first line containing `anchor`, at that line's indentation
    (one level deeper with body=True, for the first lines of a def). Anchors are names the train-file
    contract fixes (def train, finish_run, TimeBudget), so the project's train file can change freely."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if anchor in line:
            indent = line[:len(line) - len(line.lstrip())] + ("    " if body else "")
            block = "".join(indent + c + "\n" if c.strip() else "\n" for c in code.strip("\n").split("\n"))
            lines.insert(i if before else i + 1, block)
            return "".join(lines)
    raise ValueError(f"{anchor!r} not found in the train file")


def replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"{old!r} occurs {text.count(old)} times in the train file, expected once")
    return text.replace(old, new)


def arun_env(data_dir: Path, cache: Path, **extra: str) -> dict:
    env = dict(os.environ, ARUN_CACHE=str(cache), ARUN_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("ARUN_SEED", None)
    env.update(extra)
    return env


# The options that pick an engine on this CPU box. An MLX run costs about a third of a torch one here (no
# torch import in the train process or the evaluator): tests of the harness itself can use either.
ENGINE_ARGS = {"cuda": ["--backend", "cuda", "--device", "cpu"], "mlx": ["--backend", "mlx"]}


def arun_cmd(*args: str, backend: str = "cuda") -> list[str]:
    """The real CLI, this tree's code (cwd is the tmp repo, which holds a copy of arun/)."""
    return [sys.executable, "-c", "import sys; from arun.cli import main; sys.argv[0] = 'arun'; main()",
            *ENGINE_ARGS[backend], *args]


def run_arun(repo: Path, env: dict, *args: str, timeout: float = 120, backend: str = "cuda") -> subprocess.CompletedProcess:
    return subprocess.run(arun_cmd(*args, backend=backend), cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout)


def changed_paths(repo: Path) -> list[str]:
    """Paths `git status` reports (staged, unstaged, untracked)."""
    out = subprocess.run(["git", "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames"],
                         cwd=repo, capture_output=True, text=True, check=True).stdout
    return [entry[3:] for entry in out.split("\0") if len(entry) > 3]


def ledger_paths(repo: Path) -> list[Path]:
    return sorted((repo / "bench").glob("*/ledger.jsonl"))


def ledger_records(repo: Path) -> list[dict]:
    """Every ledger line parsed strictly: a torn or garbage line fails the test."""
    out = []
    for path in ledger_paths(repo):
        for line in path.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------- processes

def processes_under(root: Path) -> list[int]:
    """Pids whose working directory is inside root: what a test's arun and train runs left behind."""
    root = Path(root).resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == root or root in cwd.parents:
            pids.append(int(entry.name))
    return pids


def pid_alive(pid: int) -> bool:
    """Is this process still running? A zombie (exited, not yet reaped) answers kill(0) but counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process (a pid reused since): alive, and not ours
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def kill_under(root: Path, grace: float = 0.0) -> list[int]:
    """Waits up to `grace` seconds for processes under root to exit by themselves, then SIGKILLs the
    rest by pid (only ever processes this test started: their cwd is its tmp repo). Returns the
    pids that had to be killed."""
    deadline = time.time() + grace
    while processes_under(root) and time.time() < deadline:
        time.sleep(0.1)
    killed = []
    for pid in processes_under(root):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


# --------------------------------------------------------------------------- what every failure must leave

def best_commit(repo: Path, records: list[dict], key_id: str | None) -> str:
    """The commit the worktree must match: the best keep of the key, or the commit before any keep."""
    from arun.core.ratchet import best_record
    best = best_record(records, key_id) if key_id else None
    if best:
        return best["commit"]
    mine = [r for r in records if r.get("key_id") == key_id and r.get("commit")]
    return mine[-1]["commit"] if mine else git(repo, "rev-parse", "HEAD")


def assert_worktree_at(repo: Path, commit: str, train_file: str = "train_cuda.py") -> None:
    """The train file is the commit's, nothing is staged, and nothing but the harness's files changed."""
    assert (repo / train_file).read_bytes() == subprocess.run(
        ["git", "show", f"{commit}:{train_file}"], cwd=repo, capture_output=True, check=True).stdout, \
        f"{train_file} is not at {commit[:10]}"
    assert git(repo, "diff", "--cached", "--name-only") == "", "a half-made commit is staged"
    stray = [p for p in changed_paths(repo) if p != train_file and not p.startswith(("bench/", ".arun/"))]
    assert not stray, f"files changed besides the train file: {stray}"
    assert not (repo / ".git" / "index.lock").exists(), "a stale .git/index.lock is left"


def assert_failure_recorded(repo: Path, proc: subprocess.CompletedProcess, before: list[dict], status: str,
                            cause: str, train_file: str = "train_cuda.py") -> dict:
    """A failed experiment through the CLI: a non-zero exit, one record with this status whose error is one
    line naming the cause (also on the verdict line), every earlier record intact, no keep, no traceback
    from arun itself, and the worktree at the best commit. Returns the new record."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    after = ledger_records(repo)
    assert after[:len(before)] == before, "an earlier record changed"
    assert len(after) == len(before) + 1, [r.get("status") for r in after]
    rec = after[-1]
    assert rec["status"] == status, (rec["status"], rec.get("error"), out[-2000:])
    err = rec.get("error") or ""
    assert "\n" not in err and re.search(cause, err, re.I), f"error {err!r} does not name {cause!r}"
    verdict = [line for line in proc.stdout.splitlines() if line.startswith(f"arun: {status.upper()}")]
    assert verdict and re.search(cause, verdict[-1], re.I), proc.stdout[-2000:]
    assert_worktree_at(repo, best_commit(repo, after, rec["key_id"]), train_file)
    return rec


def assert_refused(proc: subprocess.CompletedProcess, cause: str) -> str:
    """An ArunError/PrepareError through the CLI: exit 1 and exactly one `error:` line naming the cause."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and re.search(cause, lines[0], re.I), proc.stderr[-2000:]
    return lines[0]


# --------------------------------------------------------------------------- the fault report

def report_faults(kind: str, injections: int, lost: int) -> None:
    """Adds a row to $ARUN_FAULT_REPORT (JSON lines) when benchmarks/fault_report.py runs the suite."""
    path = os.environ.get("ARUN_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": kind, "injections": injections, "lost": lost}) + "\n")


def load_module(path: Path, name: str):
    """A train file (or any script) imported by path under `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def misjudged_runs(worker_log: str) -> list[str]:
    """The harness lines of a swarm worker's log (.arun/swarm/<run>-w<k>.log) whose run was judged against
    something other than the best the worker adopted for it ("starts from C (best V ...)" then "best so far
    V"): a best this clone cannot verify is dropped, and the harness then judges against an older best or,
    with none left, calls the run a baseline."""
    wrong, adopted = [], None
    for line in worker_log.splitlines():
        start = re.search(r"swarm: w\d+ starts from \w+ \((?:best ([0-9.]+)|no result yet)", line)
        if start:
            adopted = start.group(1)
        elif re.search(r"arun: \S+ on .*budget \(key \w+\), (?:best so far|baseline run)", line):
            seen = re.search(r"best so far ([0-9.]+)", line)
            if (seen.group(1) if seen else None) != adopted:
                wrong.append(line)
    return wrong
