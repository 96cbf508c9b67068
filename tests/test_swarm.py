"""arun swarm: git plumbing on real repos, then one real swarm on a local Ray cluster.

The swarm test runs two workers of the MLX engine on the CPU (an MLX run costs a third of a
torch one here; the swarm is the same for both engines) with a tiny model and a 1.5 s budget, the built-in sweep proposer, worker w1 in a separate clone (as on
another machine, so adoption goes through git bundles), and kills w1 mid-experiment.
Tier `swarm` (tests/conftest.py): deselect with `-m "not swarm"`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from arun.core.gitops import commit_exists, load_bundle, make_bundle, move_branch, reset_worktree
from arun.swarm.actors import Coordinator, LedgerWriter
from arun.swarm.driver import Swarm, SwarmOptions, drive
from arun.swarm.procs import _processes_with_cwd_under
from arun.swarm.worker import probe_key
from arun.swarm.worktrees import cleanup_worker, commit_ref, ensure_worktree

# the project copied into a tmp git repo (with a tiny train file); a worker log's misjudged runs
from helpers_repo import make_project, misjudged_runs

REPO = Path(__file__).resolve().parents[1]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def init_repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@arun")
    git(path, "config", "user.name", "arun test")
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "base")
    return git(path, "rev-parse", "HEAD")


# --------------------------------------------------------------------------- plumbing (no Ray)

@pytest.mark.unit
def test_a_world_readable_ray_token_is_made_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from arun.swarm.cluster import private_token
    token = tmp_path / "auth_token"
    token.write_text("t" * 64)
    token.chmod(0o644)  # as `ray get-auth-token --generate` leaves ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    assert "made it private" in private_token()
    assert token.stat().st_mode & 0o777 == 0o600 and private_token() is None


@pytest.mark.unit
def test_workers_confirm_with_the_spread_measured_in_the_main_repo_not_only_under_confidence(tmp_path: Path) -> None:
    """The worktrees have no noise.json: without the main repo's spread, every worker's confirmation would
    fall back to the plain rule (and a floored spread must not be read back below its floor)."""
    from arun.search.noise import save_noise
    from arun.swarm.driver import measured_noise
    from arun.swarm.worker import loop_options
    entry = {"key_id": "k1", "tag": "t", "values": [1.0, 1.1], "n": 2, "loss_trajectory_std": [0.1] * 20}
    save_noise(tmp_path, "t", {**entry, "std": 0.05})
    save_noise(tmp_path, "t", {**entry, "std": 0.0})         # measured again on a seed-blind best: the floor stays
    cfg = {"noise": measured_noise(tmp_path), "loop_options": {"seeds": 1}}
    assert cfg["noise"]["k1"]["std"] == 0.05
    options = loop_options(cfg, "k1")
    assert (options["seeds"], options["noise_std"]) == (1, 0.05)
    assert options["noise"]["loss_trajectory_std"] == [0.1] * 20   # the early stop's margins travel too
    assert loop_options(cfg, "other") == {"seeds": 1}
    assert loop_options({**cfg, "loop_options": {"noise_std": 0.2}}, "k1")["noise_std"] == 0.2


@pytest.mark.unit
def test_a_key_without_a_measured_spread_is_named_before_the_night() -> None:
    from arun.swarm.driver import spread_warnings
    infos = {0: {"tag": "t", "key_id": "aaa"}, 1: {"tag": "t", "key_id": "aaa"}, 2: {"tag": "u", "key_id": "bbb"}}
    (line,) = spread_warnings(infos, {"bbb": {"std": 0.01}}, "cuda")
    assert "key aaa (t)" in line and "arun noise --backend cuda" in line
    assert spread_warnings(infos, {"aaa": {"std": 0.01}, "bbb": {"std": 0.02}}, "cuda") == []  # measured: nothing to say


@pytest.mark.unit
def test_swarm_records_are_committed_here_and_on_the_run_branch(tmp_path: Path) -> None:
    from arun.swarm.records import commit_records
    repo = tmp_path / "r"
    base = init_repo(repo, {"train.py": "X = 1\n", "bench/t/ledger.jsonl": '{"id": "old"}\n'})
    git(repo, "checkout", "-qb", "autoresearch/s-w0")
    (repo / "train.py").write_text("X = 2\n")
    git(repo, "commit", "-qam", "a win")
    best = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    with open(repo / "bench" / "t" / "ledger.jsonl", "a") as f:
        f.write('{"id": "new"}\n')
    (repo / "bench" / "u").mkdir()
    (repo / "bench" / "u" / "ledger.jsonl").write_text('{"id": "other-tag"}\n')
    out = commit_records(repo, "s", {"autoresearch/s": best}, base)
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-parse", "autoresearch/s^") == best
    assert git(repo, "show", "autoresearch/s:train.py") == "X = 2"  # the best's code, with the records
    assert "new" in git(repo, "show", "autoresearch/s:bench/t/ledger.jsonl")
    assert "other-tag" in git(repo, "show", "autoresearch/s:bench/u/ledger.jsonl")
    assert any("autoresearch/s carries the run's records" in line for line in out["lines"])
    assert commit_records(repo, "s", {}, base) == {"lines": []}  # nothing new: nothing committed

@pytest.mark.unit
def test_a_commit_travels_between_clones_as_a_bundle(tmp_path: Path) -> None:
    a = tmp_path / "a"
    base = init_repo(a, {"train.py": "X = 1\n"})
    git(tmp_path, "clone", "-q", str(a), "b")
    b = tmp_path / "b"
    wt = ensure_worktree(a, "r", 0, base)
    assert git(wt, "branch", "--show-current") == "autoresearch/r-w0"
    (wt / "train.py").write_text("X = 2\n")
    git(wt, "commit", "-qam", "better")
    c = git(wt, "rev-parse", "HEAD")
    assert not commit_exists(b, c)
    load_bundle(b, make_bundle(a, c, base, commit_ref("r", c)), commit_ref("r", c))
    assert commit_exists(b, c)
    wtb = ensure_worktree(b, "r", 1, base)
    reset_worktree(wtb, c)  # adoption: the other machine's worker moves onto the winner's commit
    assert (wtb / "train.py").read_text() == "X = 2\n"
    assert git(wtb, "rev-parse", "HEAD") == c
    assert make_bundle(a, base, base, "refs/arun/x") is None  # the base needs no bundle


@pytest.mark.unit
def test_cleanup_kills_leftovers_and_removes_the_worktree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    base = init_repo(repo, {"train.py": "X = 1\n"})
    wt = ensure_worktree(repo, "r", 0, base)
    # What a killed worker leaves: a half-edited file, a stray file, a stale index.lock, a running child.
    (wt / "train.py").write_text("X = 3\n")
    (wt / "stray.txt").write_text("x")
    gitdir = Path(git(wt, "rev-parse", "--absolute-git-dir"))
    (gitdir / "index.lock").write_text("")
    child = subprocess.Popen(["sleep", "60"], cwd=wt)
    try:
        assert child.pid in _processes_with_cwd_under(wt)
        again = ensure_worktree(repo, "r", 0, base)  # a restarted worker reuses and cleans it
        assert again == wt and git(wt, "status", "--porcelain") == ""
        cleanup_worker(str(repo), "r", 0)
        assert child.wait(timeout=10) != 0
    finally:
        if child.poll() is None:
            child.kill()
    assert not wt.exists()
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert git(repo, "branch", "--list", "autoresearch/r-w0")  # the branch stays
    assert git(repo, "status", "--porcelain") == ""  # .arun/ is ignored by its own .gitignore
    assert move_branch(repo, "autoresearch/r", base)
    assert not move_branch(repo, "main", base)  # checked out: left alone


# --------------------------------------------------------------------------- one real swarm

@pytest.fixture(scope="module")
def cluster(tiny_data: Path, tiny_cache: Path):
    """One local Ray instance for the module (2 CPUs, no dashboard, a small object store); the
    environment is set first because the workers Ray starts inherit it."""
    import ray
    env = {"ARUN_CACHE": str(tiny_cache), "ARUN_DATA_DIR": str(tiny_data), "ARUN_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20,
             logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def swarm_run(tmp_path_factory: pytest.TempPathFactory, cluster) -> dict:
    """One swarm, observed throughout: start; once a worker's win was adopted by the other, kill w1
    mid-experiment; run on until the restarted w1 recorded again; Ctrl-C while both train. The tests
    below read what happened.

    The main ledger already holds a poor result (val_bpb 9.0) for this machine's key at the base
    commit, as a previous run would have left it: the swarm starts from that best, and the first
    experiment to finish beats it whatever the two workers' contention for the 2 cores does to
    their step counts; from then on the workers compete on equal terms."""
    from arun.core.ledger import Ledger, ledger_path
    root = tmp_path_factory.mktemp("swarm")
    repo, clone = root / "repo", root / "clone"
    repo.mkdir()
    base = make_project(repo, "train_mlx.py")
    git(root, "clone", "-q", str(repo), str(clone))
    probe = probe_key(repo, "mlx", 1.5, None)
    Ledger(ledger_path(repo, probe["tag"])).append({
        "key": probe["key"], "key_id": probe["key_id"], "tag": probe["tag"], "backend": "mlx", "status": "keep",
        "baseline": True, "commit": base, "parent_commit": base, "val_bpb": 9.0, "diff": "",
        "description": "an earlier, poor result", "swarm": None})
    lines: list[str] = []
    opts = SwarmOptions(repo_dir=repo, backend="mlx", device=None, workers=2, run="t", agent="sweep",
                           budget=1.5, worker_repos={1: clone})
    swarm = Swarm(opts, log=lines.append)
    out: dict = {"repo": repo, "clone": clone, "base": base, "lines": lines, "probe": probe}
    killed: dict = {}
    done = threading.Event()

    def killer() -> None:
        # Once a win was adopted across workers, kill w1 while its train run is under way.
        while not done.wait(0.1):
            st = swarm.state()
            info = st["in_flight"].get(1)
            if _cross_adoptions(st, base) and info and time.time() - info["since"] > 1.0:
                killed["pid"] = st["workers"][1]["pid"]
                killed["start_commit"] = info["parent_commit"]
                os.kill(killed["pid"], signal.SIGKILL)
                return

    th = threading.Thread(target=killer)
    try:
        swarm.start()
        th.start()
        results = swarm.run(iterations=6)
        # Until the kill happened and the restarted w1 recorded a real experiment after it.
        for _ in range(4):
            died = [i for i, r in enumerate(results) if r["status"] == "died"]
            if died and any(r["worker"] == 1 and r["status"] not in ("died", "error") for r in results[died[0] + 1:]):
                break
            results += swarm.run(iterations=2)
        done.set()
        th.join()
        out["results"], out["killed"] = results, killed
        out["pids_after"] = {k: swarm.pid(k) for k in swarm.workers}
        out["state"] = swarm.state()
        out["worktrees"] = {k: Path(i["worktree"]) for k, i in out["state"]["workers"].items()}

        # Ctrl-C (a real SIGINT to this process) once both workers are training: drive() stops the swarm.
        # Far more iterations than it takes both to train at once, so on a loaded box the signal never
        # comes after drive() has already finished on its own.
        # As `arun swarm` does (arun.cli): Ctrl-C is KeyboardInterrupt even where this process was started
        # with SIGINT ignored (a background job of a script, as a busy-box run of the suite may be).
        drove = threading.Event()
        interrupter = threading.Thread(target=_interrupt_when_both_train, args=(swarm, drove, out))
        old_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        interrupter.start()
        try:
            out["summary"] = drive(swarm, iterations=40)
        finally:
            drove.set()
            interrupter.join()
            signal.signal(signal.SIGINT, old_sigint)
    finally:
        done.set()
        if th.is_alive():
            th.join()
        out.setdefault("summary", swarm.stop())
    return out


def _interrupt_when_both_train(swarm: Swarm, drove: threading.Event, out: dict) -> None:
    # No deadline of its own: on a loaded box the first moment both train may come late, and drive()
    # running out of iterations first is reported as such, not as a lost Ctrl-C.
    while not drove.wait(0.1):
        flying = swarm.state()["in_flight"]
        if len(flying) == 2 and all(time.time() - i["since"] > 1.0 for i in flying.values()):
            out["sigint_sent"] = time.time()
            os.kill(os.getpid(), signal.SIGINT)
            return


def _cross_adoptions(state: dict, base: str) -> list[tuple[int, str]]:
    """(worker, commit) for each experiment that started from a commit another worker had won with."""
    won_by = {a["commit"]: a["worker"] for a in state["adoptions"] if a["commit"] != base}
    return [(k, c) for k, starts in state["started_from"].items() for _, c in starts
            if c in won_by and won_by[c] != k]


def _ledger(run: dict) -> list[dict]:
    paths = list((run["repo"] / "bench").glob("*/ledger.jsonl"))
    assert len(paths) == 1, paths  # one tag: both workers are the same kind of device
    records = [json.loads(line) for line in paths[0].read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("swarm")]  # the swarm's, not the seeded earlier result


@pytest.mark.swarm
def test_both_workers_run_and_one_ledger_holds_every_record(swarm_run: dict) -> None:
    records = _ledger(swarm_run)
    results = swarm_run["results"]
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    reported = {r["record"]["id"] for r in results if r.get("record")}
    stopped = {r["id"] for r in records if (r["error"] or "").startswith("interrupted")}
    assert reported | stopped == set(ids)  # every experiment, and nothing else, is in the one ledger
    by_worker = {k: [r for r in records if r["swarm"]["worker"] == k and r["status"] != "crash"] for k in (0, 1)}
    assert all(len(v) >= 2 for v in by_worker.values()), {k: len(v) for k, v in by_worker.items()}
    assert all(r["key_id"] == swarm_run["probe"]["key_id"] for r in records)
    # No spread was measured in this repo: the driver said so once, before the first experiment.
    warned = [i for i, line in enumerate(swarm_run["lines"]) if "no run-to-run spread measured" in line]
    assert len(warned) == 1 and swarm_run["probe"]["key_id"] in swarm_run["lines"][warned[0]], swarm_run["lines"][:5]
    assert not any(r.get("baseline") for r in records)  # the ledger's earlier best was the start
    # The one writer: no worker wrote a ledger of its own (w1's clone has none).
    assert not list((swarm_run["clone"] / "bench").glob("*/ledger.jsonl"))
    assert all(isinstance(r.get("diff"), str) for r in records)


@pytest.mark.swarm
def test_a_win_is_adopted_by_the_other_worker(swarm_run: dict) -> None:
    st, base = swarm_run["state"], swarm_run["base"]
    wins = [a for a in st["adoptions"] if a["commit"] != base]
    assert wins, "no experiment beat the earlier result"
    # Every experiment of every worker started from the swarm's best at that moment.
    moves = sorted((a["time"], a["commit"]) for a in st["adoptions"])
    for k, starts in st["started_from"].items():
        for t, commit in starts:
            best = [c for when, c in moves if when <= t]
            assert commit == (best[-1] if best else base), (k, t, commit)
    # In particular, a worker's win became the other worker's starting point (and the record says so).
    cross = _cross_adoptions(st, base)
    assert cross, "no worker started from another worker's win"
    records = _ledger(swarm_run)
    assert any((r["swarm"]["worker"], r["swarm"]["start_commit"]) in cross for r in records)
    # Wins made in w1's clone reached the main repo (as from another machine: by git bundle).
    for a in wins:
        assert commit_exists(swarm_run["repo"], a["commit"])


@pytest.mark.swarm
def test_each_worker_judges_against_the_best_it_adopted(swarm_run: dict) -> None:
    """w1 works in another clone: the best w0 kept (its forward in the main repo's store) must verify
    there too, or w1's harness would judge against the older best (and w0's, against w1's keeps, alike)."""
    logs = {k: (wt.parent / f"{wt.name}.log").read_text() for k, wt in swarm_run["worktrees"].items()}
    assert set(logs) == {0, 1} and all(log.count("starts from") >= 2 for log in logs.values())
    assert {k: misjudged_runs(log) for k, log in logs.items()} == {0: [], 1: []}
    assert not [r["rejudged"] for r in _ledger(swarm_run) if (r.get("rejudged") or {}).get("baseline")]


@pytest.mark.swarm
def test_a_killed_worker_is_restarted_and_its_experiment_recorded_as_crash(swarm_run: dict) -> None:
    killed = swarm_run["killed"]
    assert killed, "w1 was never seen running an experiment"
    assert swarm_run["pids_after"][1] != killed["pid"]  # Ray restarted it
    records = _ledger(swarm_run)
    crashes = [r for r in records if r["status"] == "crash" and r["swarm"]["worker"] == 1 and "died" in (r["error"] or "")]
    assert len(crashes) == 1
    assert crashes[0]["parent_commit"] == killed["start_commit"]
    later = records[records.index(crashes[0]) + 1:]  # the ledger is in append order
    after = [r for r in later if r["swarm"]["worker"] == 1 and r["status"] != "crash"]
    assert after, "the restarted worker recorded nothing"


@pytest.mark.swarm
def test_ctrl_c_records_the_interrupted_experiments_and_leaves_no_worktree(swarm_run: dict) -> None:
    repo, clone, summary = swarm_run["repo"], swarm_run["clone"], swarm_run["summary"]
    assert "sigint_sent" in swarm_run, "drive() ran out of iterations before both workers trained at once"
    assert summary["interrupted"]
    records = _ledger(swarm_run)
    interrupted = [r for r in records if r["status"] == "crash" and (r["error"] or "").startswith("interrupted")]
    assert sorted(r["swarm"]["worker"] for r in interrupted) == [0, 1]
    assert records[-2:] == interrupted  # the last two records: nothing was recorded after the stop
    for r in (repo, clone):
        assert git(r, "worktree", "list", "--porcelain").count("worktree ") == 1
        assert not [p for p in (r / ".arun" / "swarm").glob("t-w*") if p.is_dir()]  # the per-worker logs stay
        assert not list((r / ".arun" / "swarm").glob("t-w*.tmp"))  # nor the workers' scratch (scorer) folders
    assert git(repo, "branch", "--list", "autoresearch/t-w0") and git(clone, "branch", "--list", "autoresearch/t-w1")
    for wt in swarm_run["worktrees"].values():
        assert not _processes_with_cwd_under(wt)
    (best,) = summary["best"].values()
    assert best["commit"] != swarm_run["base"]
    # Every run's result stays in its machine's clone; weights only for the best run, as the harness keeps them.
    runs = {p.name for r in (repo, clone) for p in (r / ".arun" / "runs").iterdir()}
    assert {r["id"] for r in _ledger(swarm_run) if r.get("run_dir")} <= runs
    weights = {p.parent.name for r in (repo, clone) for p in (r / ".arun" / "runs").glob("*/weights*.npz")}
    assert weights <= {Path(best["run_dir"]).name}
    # The run's branch: its best commit, and on top the records commit (as a single run's record commit).
    assert git(repo, "rev-parse", "autoresearch/t^") == best["commit"]
    assert git(repo, "log", "-1", "--format=%s", "autoresearch/t") == "arun: swarm t records"
    on_branch = git(repo, "show", f"autoresearch/t:bench/{best['tag']}/ledger.jsonl")
    assert all(r["id"] in on_branch for r in records)
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert git(repo, "for-each-ref", "refs/arun/swarm/t/base") == ""


@pytest.mark.swarm
def test_one_baseline_per_key_the_other_workers_wait(tmp_path: Path, cluster) -> None:
    """With no result for a key yet, one worker runs the baseline; the others wait for its record."""
    repo = tmp_path / "repo"
    base = init_repo(repo, {"train.py": "X = 1\n"})
    ledger = cluster.remote(LedgerWriter).remote(str(repo))
    coord = cluster.remote(Coordinator).remote(str(repo), "b", base, ledger)
    first = cluster.get(coord.start.remote(0, "tag-a", "key-a"))
    assert not first["wait"] and first["best"] is None and first["commit"] == base
    assert cluster.get(coord.start.remote(1, "tag-a", "key-a"))["wait"]
    assert not cluster.get(coord.start.remote(1, "tag-b", "key-b"))["wait"]  # another kind: its own baseline
    cluster.get(coord.running.remote(0, {"parent_commit": base, "key_id": "key-a", "tag": "tag-a"}))
    cluster.get(coord.record.remote(0, {"key_id": "key-a", "tag": "tag-a", "status": "keep", "baseline": True,
                                        "val_bpb": 2.5, "commit": base}))
    after = cluster.get(coord.start.remote(1, "tag-a", "key-a"))
    assert not after["wait"] and after["best"]["val_bpb"] == 2.5 and len(after["records"]) == 1
    # A worker that dies mid-experiment: its in-flight experiment becomes one crash record.
    cluster.get(coord.running.remote(1, {"parent_commit": base, "key_id": "key-a", "tag": "tag-a",
                                         "description": "try", "diff": "d"}))
    crash = cluster.get(coord.crash.remote(1, "worker w1 died"))
    assert crash["status"] == "crash" and crash["description"] == "try" and crash["commit"] == base
    assert cluster.get(coord.crash.remote(1, "again"))["id"] == crash["id"]  # recorded once
    assert len(cluster.get(ledger.records.remote("tag-a"))) == 2


@pytest.mark.swarm
def test_a_keep_brings_its_forwards_home_and_to_the_clones_that_adopt_it(tmp_path: Path, cluster) -> None:
    """A keep made in another clone is verified where it is adopted only if its forward is in that clone's
    store (a keep whose forward is gone is never a best): the worker that kept it sends its forwards with
    the record, the coordinator stores them in the main repo, and a worker of a third clone that adopts
    the keep fetches them. Worker methods run alone (a whole Worker needs a worktree and a proposer)."""
    import hashlib
    from types import SimpleNamespace

    from arun.core import forward_store
    from arun.swarm.worker import Worker
    repo, made, adopts = tmp_path / "repo", tmp_path / "made", tmp_path / "adopts"
    base = init_repo(repo, {"train.py": "X = 1\n"})
    for clone in (made, adopts):
        init_repo(clone, {"train.py": "X = 1\n"})
    ledger = cluster.remote(LedgerWriter).remote(str(repo))
    coord = cluster.remote(Coordinator).remote(str(repo), "f", base, ledger)
    data = [b"the forward of seed 42", b"the forward of seed 43"]
    shas = [hashlib.sha256(d).hexdigest() for d in data]
    for sha, d in zip(shas, data):
        forward_store.path_for(made, "cuda", sha).parent.mkdir(parents=True, exist_ok=True)
        forward_store.path_for(made, "cuda", sha).write_bytes(d)
    rec = {"key_id": "key-a", "tag": "tag-a", "status": "keep", "baseline": True, "val_bpb": 2.5,
           "backend": "cuda", "artifact_sha256": shas[0], "artifact_sha256_seeds": shas}

    def worker(clone: Path, k: int) -> SimpleNamespace:
        return SimpleNamespace(repo=clone, shares_main_repo=False, coord=coord, k=k, run="f", base=base, host="h",
                               key_id="key-a", _start_commit=base, restarted=False)

    kept = Worker.send(worker(made, 0), rec)
    assert kept["status"] == "keep" and forward_store.stored_check(repo)(kept)
    assert sorted(p.name for p in forward_store.store_dir(repo).iterdir()) == sorted(f"{s}.pt2" for s in shas)
    # The worker of another clone that adopts the keep fetches its forwards before it runs.
    assert not forward_store.stored_check(adopts)(kept)
    Worker.fetch_forwards(worker(adopts, 1), kept)
    assert forward_store.stored_check(adopts)(kept)
    assert [forward_store.path_for(adopts, "cuda", s).read_bytes() for s in shas] == data
    # Only the forwards a keep names come home; a discard (here: judged one) brings none.
    stray, lost = b"a forward no record names", b"a discard's forward"
    cluster.get(coord.record.remote(0, {**rec, "val_bpb": 2.4, "baseline": False}, None,
                                    {hashlib.sha256(stray).hexdigest(): stray}))
    cluster.get(coord.record.remote(0, {**rec, "val_bpb": 9.0, "artifact_sha256": hashlib.sha256(lost).hexdigest(),
                                        "artifact_sha256_seeds": None}, None, {hashlib.sha256(lost).hexdigest(): lost}))
    assert len(list(forward_store.store_dir(repo).iterdir())) == 2


@pytest.mark.swarm
def test_a_keep_must_beat_the_best_written_while_it_ran(tmp_path: Path, cluster) -> None:
    """Near-simultaneous keeps: the coordinator writes one record at a time, and a keep is written as a
    keep only if strictly below the verified best at that moment; the later one becomes a discard that
    names the record that beat it. The writer's key is what workers are told to trust."""
    from arun.core import trust
    repo = tmp_path / "repo"
    base = init_repo(repo, {"train.py": "X = 1\n"})
    ledger = cluster.remote(LedgerWriter).remote(str(repo))
    assert cluster.get(ledger.public_key.remote()) == trust.public_text(trust.own_public())
    coord = cluster.remote(Coordinator).remote(str(repo), "n", base, ledger)

    def keep(k: int, val: float, **extra) -> dict:
        rec = {"key_id": "key-a", "tag": "tag-a", "status": "keep", "val_bpb": val, "commit": base, **extra}
        return cluster.get(coord.record.remote(k, rec))

    assert keep(0, 2.5, baseline=True)["status"] == "keep"
    first = keep(0, 2.3)                          # both workers started from 2.5; w0 reaches the writer first
    late = keep(1, 2.4, best_before=2.5)          # better than where w1 started, not than 2.3
    tie = keep(1, 2.3)                            # equal is not better
    stale_baseline = keep(1, 2.6, baseline=True)  # a worker that saw no best at all
    win = keep(1, 2.2, baseline=True, best_before=None)  # better, from a worker that saw no best
    assert first["status"] == "keep" and win["status"] == "keep"
    assert not win["baseline"] and win["best_before"] == 2.3 and win["rejudged"]["baseline"]
    assert stale_baseline["rejudged"] == {"status": "keep", "baseline": True, "best_before": None}
    for rec in (late, tie, stale_baseline):
        assert rec["status"] == "discard" and rec["superseded"]["by"] == first["id"] and not rec["baseline"]
        assert rec["best_before"] == 2.3
    assert cluster.get(coord.state.remote())["best"]["key-a"]["id"] == win["id"]
