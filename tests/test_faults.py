"""
Faults lose nothing: real SIGKILLs, real hangs, real crashes, a real full disk, corrupt inputs.

Every CLI-level fault must end with a one-line error naming the cause, a non-zero exit, the
worktree at the best commit, and every completed record intact (helpers_repo.assert_*).

Most CLI tests share one project repo (`project`, module scope) taken through a sequence —
baseline, kills, crashes, a hang with a second and third arun at the door, corrupt data, a full
disk — so the expensive baseline run happens once. Each test checks its own step against the
records that were there before it. ARUN_FAULT_KILLS / ARUN_LEDGER_KILLS scale the kill counts
(benchmarks/fault_report.py runs more).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_repo import (
    REPO,
    arun_cmd,
    arun_env,
    assert_failure_recorded,
    assert_refused,
    assert_worktree_at,
    best_commit,
    changed_paths,
    empty_repo,
    git,
    inject,
    kill_under,
    ledger_paths,
    ledger_records,
    make_project,
    report_faults,
    run_arun,
    tiny_train_text,
)

# The harness's fault handling is the same for both engines; MLX runs cost a third of torch ones here.
# (The SIGTERM-while-scored test stays on torch: its evaluator runs long enough to be caught mid-score.)
BACKEND, TRAIN = "mlx", "train_mlx.py"
STATUSES = {"keep", "discard", "crash", "timeout", "invalid"}


# =========================================================================== the ledger under SIGKILL

APPENDER = textwrap.dedent('''
    """Forks children that append to the ledger in a tight loop and SIGKILLs each at a random moment.
    Single-threaded, so fork is safe. Prints JSON: the ids whose append() returned, per child."""
    import json, os, random, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from arun.core.ledger import Ledger
    path, kills, seed = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    completed, sizes = [], []
    for child in range(kills):
        r, w = os.pipe()
        child_seed = rng.randrange(1 << 30)
        pid = os.fork()
        if pid == 0:
            os.close(r)
            crng = random.Random(child_seed)
            ledger, n = Ledger(path), 0
            while True:
                # mostly small records, some far larger than a 64 KiB tail (a big diff)
                size = crng.choice([50, 200, 1000]) if crng.random() < 0.7 else crng.randrange(70_000, 400_000)
                rec = ledger.append({"id": f"c{child}-{n}", "size": size, "pad": "x" * size})
                os.write(w, (rec["id"] + "\\n").encode())  # only after append() returned
                n += 1
        os.close(w)
        time.sleep(rng.uniform(0.0, 0.04))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            completed += f.read().split()
    print(json.dumps({"completed": completed}))
''')


def test_sigkilled_appenders_lose_no_completed_record(tmp_path: Path) -> None:
    kills = int(os.environ.get("ARUN_LEDGER_KILLS", "200"))
    seed = int(os.environ.get("ARUN_FAULT_SEED", str(random.randrange(1 << 30))))
    path = tmp_path / "bench" / "tag" / "ledger.jsonl"
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    p = subprocess.run([sys.executable, str(script), str(REPO), str(path), str(kills), str(seed)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    completed = json.loads(p.stdout)["completed"]
    torn_before = not path.read_bytes().endswith(b"\n")

    # The next append (a fresh process) repairs a torn tail and says so on stderr.
    fin = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                          f"from arun.core.ledger import Ledger; Ledger({str(path)!r}).append({{'id': 'final'}})"],
                         capture_output=True, text=True, timeout=60)
    assert fin.returncode == 0, fin.stderr
    assert ("repaired a torn last line" in fin.stderr) == torn_before, (torn_before, fin.stderr)

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a newline
    records = [json.loads(line) for line in lines[:-1]]  # every line parses: no torn or merged lines
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert all(len(r["pad"]) == r["size"] for r in records if r["id"] != "final")
    present = set(ids)
    lost = [i for i in completed if i not in present]
    torn = path.with_name("ledger.jsonl.torn")
    repairs = torn.read_bytes().count(b"\n") if torn.exists() else 0
    print(f"ledger: {kills} kills (seed {seed}), {len(completed)} completed appends, {repairs} torn tails repaired, "
          f"{len(lost)} lost")
    report_faults("SIGKILL of a ledger appender", kills, len(lost))
    assert not lost, f"{len(lost)} completed records lost (seed {seed}): {lost[:5]}"
    assert ids[-1] == "final"


@pytest.mark.unit
def test_a_torn_line_longer_than_64k_keeps_every_earlier_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Regression: the repair looked for the last newline in a 64 KiB tail only, and cut the whole
    file when the torn record (a big diff) was longer: every earlier record went with it."""
    from arun.core.ledger import Ledger
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for i in range(3):
        ledger.append({"id": f"r{i}", "diff": "d" * 100_000})
    with open(ledger.path, "ab") as f:
        f.write(b'{"id": "torn", "diff": "' + b"d" * 300_000)  # killed mid-write
    ledger.append({"id": "next"})
    assert "repaired a torn last line (300024 bytes)" in capsys.readouterr().err
    assert [r["id"] for r in ledger.records()] == ["r0", "r1", "r2", "next"]
    assert ledger.path.with_name("ledger.jsonl.torn").read_bytes().startswith(b'{"id": "torn"')


DISK_FULL = textwrap.dedent('''
    import json, os, resource, signal, sys
    sys.path.insert(0, sys.argv[1])
    from arun.core.errors import ArunError
    from arun.core.ledger import Ledger
    path = sys.argv[2]
    size = os.path.getsize(path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death, as on a full disk (ENOSPC)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, size + 100))
    try:
        Ledger(path).append({"id": "too-big", "diff": "d" * 20_000})
    except ArunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
''')


def test_a_file_size_limit_mid_append_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    """The write gets 100 bytes in, then EFBIG: the half line is cut and the error is one line."""
    from arun.core.ledger import Ledger
    path = tmp_path / "ledger.jsonl"
    for i in range(3):
        Ledger(path).append({"id": f"r{i}"})
    before = path.read_bytes()
    (tmp_path / "full.py").write_text(DISK_FULL)
    p = subprocess.run([sys.executable, str(tmp_path / "full.py"), str(REPO), str(path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    err = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "could not write" in err[0] and "file size limit" in err[0] and "unchanged" in err[0]
    assert path.read_bytes() == before
    report_faults("file size limit during a ledger append", 1, 0)


# =========================================================================== corrupt inputs

class _Payload:
    """A pickle that creates a marker file when unpickled: proof that a tampered tokenizer never is."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def data_copy(tiny_data: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared tiny data that a test may corrupt."""
    dest = tmp_path / "data"
    shutil.copytree(tiny_data, dest)
    return dest


def _set_manifest(data: Path, **values: object) -> None:
    m = json.loads((data / "manifest.json").read_text())
    m.update(values)
    (data / "manifest.json").write_text(json.dumps(m))


def test_a_tampered_tokenizer_is_refused_before_unpickling(data_copy: Path, tmp_path: Path) -> None:
    import prepare
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Payload(marker))
    # Control: the payload is live (unpickling it elsewhere creates its marker).
    control = tmp_path / "control"
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=pickle.dumps(_Payload(control)), check=True, timeout=60)
    assert control.exists()

    (data_copy / "tokenizer.pkl").write_bytes(payload)
    with pytest.raises(prepare.PrepareError, match=r"tokenizer\.pkl: sha256 .* does not match the manifest"):
        prepare.Tokenizer.from_directory(data_copy)
    with pytest.raises(prepare.PrepareError, match=r"tokenizer\.pkl"):
        prepare.PreparedData.open(data_copy).verify()
    assert not marker.exists(), "the tampered tokenizer was unpickled"


def test_corrupt_arrays_are_one_line_errors(data_copy: Path) -> None:
    import prepare
    data = prepare.PreparedData.open(data_copy)
    rows = data.val_rows()

    # Rows of another shape under a manifest whose sha256 was updated to match: only the shape check sees it.
    np.save(data_copy / "val_rows.npy", rows[:, :-1].copy())
    _set_manifest(data_copy, val_rows_sha256=prepare.sha256_file(data_copy / "val_rows.npy"))
    with pytest.raises(prepare.PrepareError, match=r"val rows are int32\(\d+, 64\), manifest says int32\(\d+, 65\)"):
        prepare.PreparedData.open(data_copy).verify()

    # Not an array at all, sha256 updated too.
    (data_copy / "val_rows.npy").write_bytes(b"not a numpy file")
    _set_manifest(data_copy, val_rows_sha256=prepare.sha256_file(data_copy / "val_rows.npy"))
    with pytest.raises(prepare.PrepareError, match=r"val_rows\.npy: unreadable array"):
        prepare.PreparedData.open(data_copy).val_rows()

    # token_bytes.npy gone.
    (data_copy / "token_bytes.npy").unlink()
    with pytest.raises(prepare.PrepareError, match=r"token_bytes\.npy: missing; rerun arun prepare"):
        prepare.PreparedData.open(data_copy).verify()


def test_truncated_parquet_is_a_one_line_prepare_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    docs = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 50 for i in range(400)]}), docs)
    data = docs.read_bytes()
    docs.write_bytes(data[: len(data) // 2])
    env = dict(os.environ, ARUN_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    env.pop("ARUN_DATA_DIR", None)
    p = subprocess.run([sys.executable, "-m", "arun.cli", "prepare", "--dataset", f"files:{docs}", "--profile", "tiny"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    line = assert_refused(p, r"docs\.parquet: unreadable parquet")
    assert "rerun prepare" in line
    assert not list((tmp_path / "cache").glob("files-*"))  # no half-made data folder
    report_faults("truncated parquet", 1, 0)


# =========================================================================== the project sequence (CLI)

@pytest.fixture(scope="module")
def project(tiny_data: Path, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A project repo with a baseline keep, shared by the CLI tests below (in file order)."""
    root = tmp_path_factory.mktemp("faults")
    repo = root / "repo"
    make_project(repo, TRAIN)
    env = arun_env(tiny_data, tiny_cache)
    t0 = time.perf_counter()
    p = run_arun(repo, env, "--budget", "1", "-m", "baseline", timeout=300, backend=BACKEND)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rec = ledger_records(repo)[-1]
    assert rec["status"] == "keep"
    state = {"repo": repo, "root": root, "env": env, "run_seconds": time.perf_counter() - t0, "key_id": rec["key_id"],
             "seed": 100}
    yield state
    kill_under(repo)


def _edit(project: dict, overrides: dict | None = None, anchor: str | None = None, code: str = "",
          body: bool = True) -> bytes:
    """A new experiment: the best train file with a fresh SEED (so it differs from the best commit),
    optionally with code injected. Returns the pre-run bytes."""
    repo = project["repo"]
    project["seed"] += 1
    from arun.core.ledger import all_records
    best = git(repo, "show", f"{best_commit(repo, all_records(repo), project['key_id'])}:{TRAIN}")
    from arun.core.trainfile import rewrite_constants
    text = rewrite_constants(best + "\n", {"SEED": project["seed"], **(overrides or {})})
    if anchor:
        text = inject(text, anchor, code, body=body)
    (repo / TRAIN).write_text(text)
    return text.encode()


def test_sigkill_of_arun_at_random_moments_loses_nothing(project: dict) -> None:
    repo, env = project["repo"], project["env"]
    kills = int(os.environ.get("ARUN_FAULT_KILLS", "6"))  # (benchmarks/fault_report.py kills more)
    seed = int(os.environ.get("ARUN_FAULT_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    span = project["run_seconds"] * 1.1
    lost = 0
    phases = []
    stale_index_locks = 0
    for k in range(kills):
        before = ledger_records(repo)
        pre_run = _edit(project)
        best = best_commit(repo, before, project["key_id"])
        best_text = subprocess.run(["git", "show", f"{best}:{TRAIN}"], cwd=repo, capture_output=True).stdout
        delay = span * (k + rng.random()) / kills  # stratified: every part of a run gets hit
        proc = subprocess.Popen(arun_cmd("--budget", "1", "-m", f"kill {k}", backend=BACKEND), cwd=repo, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finished = False
        try:
            proc.wait(timeout=delay)
            phases.append(f"{delay:.1f}s: finished first")
            finished = True
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            phases.append(f"{delay:.1f}s: killed")
        # The orphaned train process dies on its next write to the dead pipe; give it the time.
        leftovers = kill_under(repo, grace=15)
        if leftovers:
            phases[-1] += f" (train process outlived arun by 15 s: {leftovers})"
        if (repo / ".git" / "index.lock").exists():
            stale_index_locks += 1  # a kill inside the keep commit left git's lock behind
        after = ledger_records(repo)  # strict: every line parses
        if after[:len(before)] != before or stale_index_locks:
            lost += 1
        assert after[:len(before)] == before, f"kill {k} at {delay:.1f}s changed earlier records (seed {seed})"
        assert not stale_index_locks, f"kill {k} at {delay:.1f}s left .git/index.lock behind (seed {seed})"
        new_records = len(after) - len(before)
        assert new_records in (0, 1) and (new_records == 1 or not finished), f"kill {k}: {new_records} new records"
        assert all(r["status"] in STATUSES for r in after)
        now = (repo / TRAIN).read_bytes()
        assert now in (pre_run, best_text), f"kill {k} at {delay:.1f}s left a train file that is neither (seed {seed})"
        assert git(repo, "diff", "--cached", "--name-only") == "", f"kill {k}: a half-made commit is staged"
        stray = [p for p in changed_paths(repo) if p != TRAIN and not p.startswith(("bench/", ".arun/"))]
        assert not stray, stray
    print(f"arun kills (seed {seed}, run ~{project['run_seconds']:.0f}s): " + "; ".join(phases)
          + f"; stale index.lock {stale_index_locks}x")
    report_faults("SIGKILL of arun mid-experiment", kills, lost)

    # Nothing left behind blocks the next run: it runs, records, and leaves a clean worktree.
    before = ledger_records(repo)
    _edit(project)
    p = run_arun(repo, env, "--budget", "1", "-m", "after the kills", timeout=300, backend=BACKEND)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    after = ledger_records(repo)
    assert after[:len(before)] == before and len(after) == len(before) + 1
    assert after[-1]["status"] in ("keep", "discard")
    assert_worktree_at(repo, best_commit(repo, after, project["key_id"]))


@pytest.mark.parametrize("fault, overrides, anchor, code, cause", [
    ("nan loss", None, "def train(",
     "global cross_entropy\n_ce = cross_entropy\ncross_entropy = lambda *a, **k: _ce(*a, **k) * float('nan')  # the loss turns NaN",
     r"FAIL: training loss is nan"),
    ("out of memory", None, "def train(",
     "global cross_entropy\n\ndef _oom(*args, **kwargs):\n    raise MemoryError('out of memory. Tried to allocate 20.00 GiB')\n"
     "cross_entropy = _oom  # the first forward runs out of memory", r"MemoryError: out of memory"),
    # (a syntax error: test_a_garbage_line_in_the_ledger_is_skipped_with_a_warning)
])
def test_a_crashing_train_file_is_recorded_crash(project: dict, fault: str, overrides: dict | None, anchor: str,
                                                 code: str, cause: str) -> None:
    repo = project["repo"]
    before = ledger_records(repo)
    _edit(project, overrides, anchor, code)
    p = run_arun(repo, project["env"], "--budget", "1", "-m", fault, timeout=300, backend=BACKEND)
    assert p.returncode == 2
    assert_failure_recorded(repo, p, before, "crash", cause)
    report_faults(f"train file: {fault}", 1, 0)


def test_a_hang_is_killed_at_the_timeout_while_a_second_arun_is_refused_and_a_third_waits(project: dict) -> None:
    """The train process sleeps forever: `--timeout 20` kills it and records `timeout`. Meanwhile a
    second arun refuses at once naming the lock's holder, and a third with --wait queues behind it;
    their records never interleave."""
    repo, env = project["repo"], project["env"]
    before = ledger_records(repo)
    _edit(project, None, "def train(", "time.sleep(10**6)  # hangs")
    hang = subprocess.Popen(arun_cmd("--budget", "1", "--timeout", "20", "-m", "hangs", backend=BACKEND), cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid_file = repo / ".arun" / "lock.pid"
        deadline = time.time() + 120
        while not (pid_file.exists() and pid_file.read_text().strip() == str(hang.pid)):
            assert hang.poll() is None and time.time() < deadline, "the first arun never took the lock"
            time.sleep(0.1)
        second = run_arun(repo, env, "--budget", "1", "-m", "second", timeout=120, backend=BACKEND)
        line = assert_refused(second, rf"another arun \(pid {hang.pid}\) is running an experiment")
        assert "--wait" in line
        third = subprocess.Popen(arun_cmd("--budget", "1", "--wait", "300", "-m", "third", backend=BACKEND), cwd=repo, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = hang.communicate(timeout=200)
        third_out, third_err = third.communicate(timeout=300)
    finally:
        for p in (hang,):
            if p.poll() is None:
                p.kill()
        kill_under(repo, grace=5)
    first = subprocess.CompletedProcess(hang.args, hang.returncode, out, err)
    # The third run appended right after; check the hang's record against the state before both.
    after = ledger_records(repo)
    assert after[:len(before)] == before and len(after) == len(before) + 2
    hung, queued = after[-2], after[-1]
    assert hung["description"] == "hangs" and queued["description"] == "third"
    assert hung["status"] == "timeout" and "hard timeout of 20s" in hung["error"], hung
    assert first.returncode == 2 and "Traceback" not in out + err
    assert any(line.startswith("arun: TIMEOUT") and "hard timeout of 20s" in line for line in out.splitlines()), out
    assert third.returncode == 0, third_out[-2000:] + third_err[-3000:]
    assert queued["status"] in ("keep", "discard") and queued["time"] >= hung["time"]
    assert_worktree_at(repo, best_commit(repo, after, project["key_id"]))
    report_faults("train process hangs (hard timeout)", 1, 0)
    report_faults("two arun at once (refuse / --wait)", 2, 0)


@pytest.mark.parametrize("corruption", ["tokenizer pickle", "token_bytes missing", "val rows shape"])
def test_corrupt_data_refuses_the_run_and_touches_nothing(project: dict, tiny_data: Path, tmp_path: Path,
                                                          corruption: str) -> None:
    import prepare
    repo = project["repo"]
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    marker = tmp_path / "UNPICKLED"
    if corruption == "tokenizer pickle":
        (data / "tokenizer.pkl").write_bytes(pickle.dumps(_Payload(marker)))
        cause = r"tokenizer\.pkl: sha256 \w+ does not match the manifest"
    elif corruption == "token_bytes missing":
        (data / "token_bytes.npy").unlink()
        cause = r"token_bytes\.npy: missing"
    else:
        rows = np.load(data / "val_rows.npy")
        np.save(data / "val_rows.npy", rows[: rows.shape[0] // 2])
        _set_manifest(data, val_rows_sha256=prepare.sha256_file(data / "val_rows.npy"))
        cause = r"val_rows\.npy: val rows are int32"
    before = ledger_records(repo)
    pre_run = _edit(project)
    head = git(repo, "rev-parse", "HEAD")
    env = dict(project["env"], ARUN_DATA_DIR=str(data))
    p = run_arun(repo, env, "--budget", "1", "-m", corruption, timeout=120, backend=BACKEND)
    assert_refused(p, cause)
    assert ledger_records(repo) == before
    assert (repo / TRAIN).read_bytes() == pre_run and git(repo, "rev-parse", "HEAD") == head  # untouched
    assert not marker.exists(), "the tampered tokenizer was unpickled"
    report_faults(f"corrupt data: {corruption}", 1, 0)


def test_a_garbage_line_in_the_ledger_is_skipped_with_a_warning(project: dict) -> None:
    repo = project["repo"]
    [path] = ledger_paths(repo)
    lines = path.read_text().splitlines(keepends=True)
    good = [json.loads(line) for line in lines]
    path.write_text("".join(lines[:1]) + "this is not json {\n" + "".join(lines[1:]))
    try:
        _garbage_is_skipped(project, path, good)
    finally:  # leave the ledger strict-parseable for the tests after this one
        kept = [line for line in path.read_text().splitlines(keepends=True) if line != "this is not json {\n"]
        path.write_text("".join(kept))
    report_faults("garbage line in the ledger", 1, 0)


def _garbage_is_skipped(project: dict, path: Path, good: list[dict]) -> None:
    repo, env = project["repo"], project["env"]
    cli = [sys.executable, "-m", "arun.cli"]
    for cmd in (["log"], ["compare"]):
        p = subprocess.run(cli + cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert "skipped 1 unreadable line" in p.stderr, p.stderr
    from arun.core.ledger import Ledger, written
    back = Ledger(path).records()
    assert [written(r) for r in back] == good and {r["_trust"] for r in back} == {"ok"}  # seals survive the garbage
    # A run still reads the best correctly and appends after the garbage; this run's train file
    # has a syntax error: recorded crash, naming SyntaxError.
    _edit(project, None, "def train(", "x = (1,  # never closed")
    p = run_arun(repo, env, "--budget", "1", "-m", "a syntax error", timeout=300, backend=BACKEND)
    recs = Ledger(path).records()
    assert [written(r) for r in recs[:-1]] == good and recs[-1]["status"] == "crash" and recs[-1]["best_before"] is not None
    assert recs[-1]["error"].startswith("SyntaxError") and "\n" not in recs[-1]["error"], recs[-1]["error"]
    assert any(line.startswith("arun: CRASH: SyntaxError") for line in p.stdout.splitlines()), p.stdout[-1500:]
    assert path.read_text().splitlines()[1] == "this is not json {"  # the ledger is append-only: left in place
    assert p.returncode == 2 and "skipped 1 unreadable line" in p.stderr and "Traceback" not in p.stderr
    assert_worktree_at(repo, best_commit(repo, recs, project["key_id"]))
    report_faults("train file: syntax error", 1, 0)


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


def test_a_full_disk_under_the_ledger_is_a_one_line_error_and_changes_nothing(project: dict, tmp_path: Path) -> None:
    """bench/<tag>/ is a nearly full tmpfs: the crash record of the next run cannot be written."""
    repo, env = project["repo"], project["env"]
    if not _can_mount_tmpfs(tmp_path / "probe"):
        pytest.skip("needs root and tmpfs to make a real full disk (the RLIMIT_FSIZE test covers the library)")
    [path] = ledger_paths(repo)
    saved = path.read_bytes()
    tag_dir = path.parent
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tag_dir)], check=True)
    try:
        path.write_bytes(saved)
        fd = os.open(tag_dir / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # fill it to the last byte
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        before = ledger_records(repo)
        # A record bigger than the slack in the ledger's last page: its diff carries 12 KB of comments.
        _edit(project, None, "def train(", "x = (1,  # never closed\n" + "# padding padding padding\n" * 480)
        p = run_arun(repo, env, "--budget", "1", "-m", "disk full", timeout=300, backend=BACKEND)
        assert_refused(p, r"could not write .*ledger\.jsonl \(disk full\); free space and rerun, the ledger is unchanged")
        assert path.read_bytes() == saved and ledger_records(repo) == before
        assert_worktree_at(repo, best_commit(repo, before, project["key_id"]))
    finally:
        subprocess.run(["umount", str(tag_dir)], check=True)
    assert path.read_bytes() == saved
    report_faults("disk full during a ledger append", 1, 0)


# =========================================================================== a kill inside the keep commit

def test_a_kill_inside_the_keep_commit_does_not_block_the_next_keep(tmp_path: Path, tiny_data: Path,
                                                                    tiny_cache: Path) -> None:
    repo = tmp_path / "repo"
    make_project(repo, TRAIN)
    # A project with many tracked files: gitpython holds index.lock for ~0.1 s while it rewrites the
    # index, so a kill aimed at it lands even on a loaded machine.
    many = repo / "assets"
    many.mkdir()
    for i in range(5000):
        (many / f"{i}.txt").write_text(f"{i}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "assets")
    env = arun_env(tiny_data, tiny_cache)
    from arun.core.trainfile import rewrite_constants
    lock = repo / ".git" / "index.lock"
    for attempt in range(3):
        # Each attempt is the first run of its own key (budget), so it is a keep that commits a change.
        budget = f"{1 + attempt / 100:g}"
        (repo / TRAIN).write_text(rewrite_constants(tiny_train_text(TRAIN), {"SEED": 7 + attempt}))
        proc = subprocess.Popen(arun_cmd("--budget", budget, "-m", "killed while committing", backend=BACKEND), cwd=repo, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # After the result is written, the next index.lock is the keep commit's (gitpython, in process).
        while proc.poll() is None and not list((repo / ".arun" / "runs").glob("*/result0.json")):
            time.sleep(0.002)
        spins, landed = 0, False
        while not lock.exists():
            spins += 1
            if spins % 2000 == 0 and proc.poll() is not None:
                break
        if proc.poll() is None:  # the commit holds index.lock right now
            proc.send_signal(signal.SIGKILL)
            landed = True
        proc.wait()
        kill_under(repo, grace=5)
        if landed:
            break
    else:
        pytest.skip("the kill never landed inside the keep commit (3 tries)")
    assert [r for r in ledger_records(repo) if r["key"]["time_budget"] == float(budget)] == []  # killed before the record
    p = run_arun(repo, env, "--budget", budget, "-m", "the next keep", timeout=300, backend=BACKEND)
    kill_under(repo, grace=5)
    report_faults("SIGKILL inside the keep commit", 1, int(p.returncode != 0))  # the next run's record is lost
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
    recs = [r for r in ledger_records(repo) if r["key"]["time_budget"] == float(budget)]
    assert len(recs) == 1 and recs[0]["status"] == "keep"
    assert_worktree_at(repo, recs[0]["commit"])


DIES_AFTER_THE_ADD = """
import os, signal, subprocess, sys
from arun.core.gitops import commit_keep
spawn = subprocess.Popen.__init__
def dies_after_the_add(self, args, *a, **k):
    spawn(self, args, *a, **k)
    if " add " in " ".join(map(str, args)) + " ":   # the child that stages: let it finish, then arun dies
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
subprocess.Popen.__init__ = dies_after_the_add
commit_keep(sys.argv[1], [sys.argv[2]], "arun: record r1 (keep)")
"""


def test_arun_killed_between_staging_and_committing_leaves_nothing_staged(tmp_path: Path) -> None:
    """Found beside four busy loops (a SIGKILL at a random moment left the ledger staged): staging and
    committing are one child that outlives arun, so the kill lands before both or after both."""
    repo = empty_repo(tmp_path / "repo")
    ledger = repo / "bench" / "t" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text('{"id": "r1"}\n')
    p = subprocess.run([sys.executable, "-c", DIES_AFTER_THE_ADD, str(repo), "bench/t/ledger.jsonl"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert git(repo, "diff", "--cached", "--name-only") == ""               # nothing half-made is staged
    assert git(repo, "log", "-1", "--format=%s") == "arun: record r1 (keep)"  # the commit happened
    assert git(repo, "status", "--porcelain") == ""


CTRL_C_DURING_THE_ADD = """
import os, signal, subprocess, sys, time
from arun.core.gitops import commit_keep
spawn = subprocess.Popen.__init__
def ctrl_c_during_the_add(self, args, *a, **k):
    spawn(self, args, *a, **k)
    if " add " in " ".join(map(str, args)) + " ":
        try:
            os.killpg(os.getpgid(0), signal.SIGINT)   # a terminal's Ctrl-C goes to the whole process group
            time.sleep(2)
        except KeyboardInterrupt:
            pass
subprocess.Popen.__init__ = ctrl_c_during_the_add
commit_keep(sys.argv[1], [sys.argv[2]], "arun: record r1 (keep)")
print("committed")
"""


def test_a_ctrl_c_during_the_commit_does_not_cut_it_in_half(tmp_path: Path) -> None:
    """The add-and-commit child runs in its own session: the Ctrl-C that reaches arun does not reach it."""
    repo = empty_repo(tmp_path / "repo")
    (repo / "ledger.jsonl").write_text('{"id": "r1"}\n')
    p = subprocess.run([sys.executable, "-c", CTRL_C_DURING_THE_ADD, str(repo), "ledger.jsonl"], capture_output=True,
                       text=True, timeout=60, cwd=REPO, start_new_session=True)
    assert p.returncode == 0 and "committed" in p.stdout, p.stderr[-2000:]
    assert git(repo, "log", "-1", "--format=%s") == "arun: record r1 (keep)"
    assert git(repo, "status", "--porcelain") == ""


# =========================================================================== an interrupt during the scoring

def test_sigterm_during_the_scoring_records_an_interrupted_crash(tmp_path: Path, tiny_data: Path,
                                                                     tiny_cache: Path) -> None:
    """SIGTERM while the evaluator process scores the run: recorded as crash (interrupted), nothing
    committed, the train file exactly as before the run, exit 130."""
    repo = tmp_path / "repo"
    head = make_project(repo)
    pre_run = (repo / "train_cuda.py").read_bytes()
    proc = subprocess.Popen(arun_cmd("--budget", "1", "-m", "interrupted while scored"), cwd=repo,
                            env=arun_env(tiny_data, tiny_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("arun: scoring"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=120)
    kill_under(repo, grace=5)
    assert any(s.startswith("arun: scoring") for s in seen), "".join(seen) + err
    assert proc.returncode == 130, "".join(seen) + out + err
    [rec] = ledger_records(repo)
    assert rec["status"] == "crash" and "while the harness scored" in rec["error"], rec["error"]
    assert (repo / "train_cuda.py").read_bytes() == pre_run and rec["commit"] == head == git(repo, "rev-parse", "HEAD^")
    assert git(repo, "log", "-1", "--format=%s") == f"arun: record {rec['id']} (crash)"
    assert git(repo, "diff", "--cached", "--name-only") == ""
    report_faults("SIGTERM during the scoring of a run", 1, 0)
