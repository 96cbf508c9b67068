"""
`arun swarm`: the research loop scaled out over a Ray cluster.

One worker per GPU (CUDA) or per machine (MLX, CPU), each a Ray actor that works
in its own git worktree (`.arun/swarm/<run>-w<k>`) on its own branch
(`autoresearch/<run>-w<k>`). A worker proposes, runs and records exactly as
`arun loop` does: the experiment itself is the loop's own iteration function.

Three things are the swarm's own:
- one writer: a single ledger actor appends every record to the main repo's
  `bench/<tag>/ledger.jsonl`; workers never write a ledger themselves;
- adoption: a coordinator actor tracks the best per comparability key; before each
  experiment a worker resets its branch onto that commit (adopt and accumulate, no
  merges), so a win by one worker becomes every worker's starting point. Keys never
  mix: a cluster of mixed GPUs has one best per kind;
- faults: the coordinator knows what each worker is running, so a worker that dies
  (process killed, node lost) has its in-flight experiment recorded as `crash`; Ray
  restarts it (max_restarts) and the swarm goes on.

Commits cross machines as git bundles relative to the swarm's base commit, so a
worker on another node can adopt a commit made elsewhere.

At the end (done, or Ctrl-C) every worker is stopped, its leftover processes are
killed, its worktree is removed (the per-worker branches stay, they hold the kept
commits), and `autoresearch/<run>` points at the swarm's best commit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from arun.core.errors import ArunError

SWARM_DIR = Path(".arun") / "swarm"
SCORED = ("keep", "discard")
# A crashed or lost worker whose in-flight experiment we record says so in this form.
DIED = "worker w{k} died during the experiment ({why}); Ray restarts it"


# --------------------------------------------------------------------------- git plumbing

def git(cwd: Path | str, *args: str, check: bool = True, env: dict | None = None) -> str:
    """The git CLI (worktrees and bundles are simpler and sturdier there than in gitpython)."""
    proc = subprocess.run(["git", *args], cwd=str(cwd), capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise ArunError(f"git {' '.join(args)} failed in {cwd}: {msg[-1] if msg else proc.returncode}")
    return proc.stdout.strip()


def commit_exists(repo: Path, sha: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=str(repo),
                          capture_output=True).returncode == 0


def branch_name(run: str, k: int) -> str:
    return f"autoresearch/{run}-w{k}"


def worktree_path(repo: Path, run: str, k: int) -> Path:
    return Path(repo).resolve() / SWARM_DIR / f"{run}-w{k}"


def base_ref(run: str) -> str:
    # A hidden ref keeps the swarm's base commit alive and gives bundles a name to travel under.
    return f"refs/arun/swarm/{run}/base"


def _ignore_swarm_dir(repo: Path) -> None:
    """Worktrees live inside the repo; a `*` .gitignore keeps them out of the main tree's status."""
    d = Path(repo) / SWARM_DIR.parent
    d.mkdir(parents=True, exist_ok=True)
    gi = d / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")


def ensure_worktree(repo: Path, run: str, k: int, commit: str) -> Path:
    """The worker's worktree on its own branch at `commit`; a leftover one is cleaned and reused."""
    repo = Path(repo).resolve()
    _ignore_swarm_dir(repo)
    wt = worktree_path(repo, run, k)
    git(repo, "worktree", "prune")
    if (wt / ".git").exists():
        clean_worktree(wt)
        reset_worktree(wt, commit)
        return wt
    if wt.exists():  # a half-made directory from a crash during `worktree add`
        import shutil
        shutil.rmtree(wt, ignore_errors=True)
    wt.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "add", "--force", "-B", branch_name(run, k), str(wt), commit)
    return wt


def _worktree_gitdir(wt: Path) -> Path | None:
    try:
        return Path(git(wt, "rev-parse", "--absolute-git-dir"))
    except ArunError:
        return None


def clean_worktree(wt: Path) -> None:
    """Back to a clean tree after a kill: a stale index.lock, half-edited files, stray files all go."""
    gitdir = _worktree_gitdir(wt)
    if gitdir is not None:
        lock = gitdir / "index.lock"
        if lock.exists():
            lock.unlink()
    git(wt, "reset", "--hard", "-q")
    git(wt, "clean", "-fdq")


def reset_worktree(wt: Path, commit: str) -> None:
    """Adoption: the worker's branch moves onto `commit` (no merge), the tree matches it exactly."""
    git(wt, "reset", "--hard", "-q", commit)
    git(wt, "clean", "-fdq")


def make_bundle(repo: Path, commit: str, base: str, ref: str) -> bytes | None:
    """`commit` as a git bundle on top of `base` (which every node has); None when commit is base."""
    if commit == base:
        return None
    git(repo, "update-ref", ref, commit)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.bundle"
        git(repo, "bundle", "create", "-q", str(path), ref, f"^{base}")
        return path.read_bytes()


def full_bundle(repo: Path, ref: str) -> bytes:
    """The base commit with its history, for a node whose clone lacks it."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.bundle"
        git(repo, "bundle", "create", "-q", str(path), ref)
        return path.read_bytes()


def load_bundle(repo: Path, data: bytes, ref: str) -> None:
    """Fetches the bundle's `ref` into the same ref here, which also keeps the commit from gc."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.bundle"
        path.write_bytes(data)
        git(repo, "fetch", "-q", str(path), f"+{ref}:{ref}")


def remove_worktree(repo: Path, wt: Path) -> None:
    kill_processes_in(wt)
    if (wt / ".git").exists():
        git(repo, "worktree", "remove", "--force", str(wt), check=False)
    if wt.exists():
        import shutil
        shutil.rmtree(wt, ignore_errors=True)
    git(repo, "worktree", "prune", check=False)


def move_branch(repo: Path, branch: str, commit: str) -> bool:
    """Points `branch` at `commit` unless it is checked out somewhere (then leaves it alone)."""
    out = git(repo, "worktree", "list", "--porcelain", check=False)
    if f"branch refs/heads/{branch}" in out.splitlines():
        return False
    git(repo, "branch", "-f", branch, commit)
    return True


# --------------------------------------------------------------------------- processes

def _processes_with_cwd_under(root: Path) -> list[int]:
    """Processes whose working directory is inside `root`: the train runs and agent commands a
    killed worker leaves behind (they outlive it, and would hold its GPU)."""
    root_s = str(Path(root).resolve())
    me = os.getpid()
    found: list[int] = []
    if Path("/proc").is_dir():
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == root_s or cwd.startswith(root_s + os.sep):
                found.append(int(entry))
        return found
    try:  # macOS and other systems without /proc: lsof lists every process's cwd
        out = subprocess.run(["lsof", "-a", "-d", "cwd", "-Fpn"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return found
    pid = None
    for line in out.splitlines():
        if line.startswith("p"):
            pid = int(line[1:])
        elif line.startswith("n") and pid is not None and pid != me:
            cwd = line[1:]
            if cwd == root_s or cwd.startswith(root_s + os.sep):
                found.append(pid)
    return found


def kill_processes_in(root: Path, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace` seconds, for every process working inside `root`."""
    pids = _processes_with_cwd_under(root)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if not alive or sig == signal.SIGKILL:
            break
        t_end = time.time() + grace
        while time.time() < t_end and any(_alive(p) for p in alive):
            time.sleep(0.1)
        pids = [p for p in alive if _alive(p)]
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _who(record: dict) -> str:
    w = (record.get("swarm") or {}).get("worker")
    return f"w{w}" if w is not None else "an earlier run"


def one_line(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()
    name = type(e).__name__ + ": " if isinstance(e, BaseException) and not isinstance(e, ArunError) else ""
    return (name + (text[-1] if text else "")).strip()[:500]


# --------------------------------------------------------------------------- Ray actors

class LedgerWriter:
    """The swarm's only ledger writer: appends arrive one at a time (a Ray actor runs its
    methods serially), into the main repo's bench/<tag>/ledger.jsonl."""

    def __init__(self, repo_dir: str):
        self.repo = Path(repo_dir)

    def _ledger(self, tag: str) -> Any:
        from arun.core.ledger import Ledger, ledger_path
        return Ledger(ledger_path(self.repo, tag))

    def append(self, record: dict) -> dict:
        return self._ledger(record["tag"]).append(record)

    def records(self, tag: str) -> list[dict]:
        return self._ledger(tag).records()


class Coordinator:
    """Knows the best commit per comparability key and what every worker is running."""

    def __init__(self, repo_dir: str, run: str, base: str, ledger: Any):
        self.repo, self.run, self.base, self.ledger = Path(repo_dir), run, base, ledger
        self.keeps: dict[str, list[dict]] = {}       # key_id -> keep records (the ratchet's input)
        self.best: dict[str, dict] = {}              # key_id -> best keep record
        self.bundles: dict[str, bytes] = {}          # commit -> bundle on top of base
        self.in_flight: dict[int, dict] = {}         # worker -> what it is running
        self.workers: dict[int, dict] = {}           # worker -> pid, node, worktree, starts
        self.baseline_owner: dict[str, int] = {}     # key_id -> worker running its baseline
        self.adoptions: list[dict] = []              # every move of a best, in order
        self.started_from: dict[int, list[tuple[float, str]]] = {}  # worker -> (time, start commit) per experiment
        self.last_crash: dict[int, dict] = {}

    # -- workers
    def register(self, k: int, info: dict) -> dict:
        """A worker (re)started. A restart means its previous process died: if it was running an
        experiment, that one is recorded as crash here (the driver may also have done so)."""
        previous = self.workers.get(k)
        info = dict(info, starts=(previous or {}).get("starts", 0) + 1)
        self.workers[k] = info
        crash = self.crash(k, DIED.format(k=k, why="process restarted")) if previous else None
        return {"previous": previous, "crash": crash}

    def _load_key(self, tag: str, key_id: str) -> None:
        if key_id in self.keeps:
            return
        from arun.core.ratchet import best_record
        records = ray_get(self.ledger.records.remote(tag))
        self.keeps[key_id] = [r for r in records if r.get("key_id") == key_id and r.get("status") == "keep"]
        best = best_record(self.keeps[key_id], key_id)
        if best is not None:
            self.best[key_id] = best

    def start(self, k: int, tag: str, key_id: str) -> dict:
        """What worker k starts its next experiment from: the best commit of its key, or the base
        (then it runs the key's baseline, one worker at a time; the others wait for it)."""
        self._load_key(tag, key_id)
        best = self.best.get(key_id)
        if best is None:
            owner = self.baseline_owner.get(key_id)
            if owner is not None and owner != k:
                return {"wait": True}
            self.baseline_owner[key_id] = k  # until its record (or crash) arrives
        commit = best["commit"] if best else self.base
        return {"wait": False, "commit": commit, "best": best,
                "records": ray_get(self.ledger.records.remote(tag))}

    def running(self, k: int, info: dict) -> None:
        """Worker k is now running this experiment (updated as it learns more, e.g. the diff)."""
        if info.get("done"):
            self.in_flight.pop(k, None)
            self._release_baseline(k)
        elif "parent_commit" in info:
            self.started_from.setdefault(k, []).append((time.time(), info["parent_commit"]))
            self.in_flight[k] = dict(info, since=time.time())
        elif k in self.in_flight:
            self.in_flight[k].update(info)

    def record(self, k: int, record: dict, bundle: bytes | None = None) -> dict:
        """Appends worker k's record (through the one writer) and moves the best if it won."""
        if bundle is not None:
            # A commit made on another machine (or clone) comes home, so the main repo holds every
            # kept commit the ledger names, and can hand it to any other worker.
            try:
                load_bundle(self.repo, bundle, commit_ref(self.run, record["commit"]))
                self.bundles[record["commit"]] = bundle
            except ArunError:
                pass
        appended = ray_get(self.ledger.append.remote(record))
        self.in_flight.pop(k, None)
        self._release_baseline(k)
        key_id = appended.get("key_id")
        if appended.get("status") == "keep" and key_id and appended.get("val_bpb") is not None:
            from arun.core.ratchet import best_record
            self.keeps.setdefault(key_id, []).append(appended)
            new = best_record(self.keeps[key_id], key_id)
            old = self.best.get(key_id)
            if new is not None and (old is None or new.get("id") != old.get("id")):
                self.best[key_id] = new
                self.adoptions.append({"time": time.time(), "key_id": key_id, "commit": new.get("commit"),
                                       "val_bpb": new.get("val_bpb"), "worker": k,
                                       "previous": (old or {}).get("commit")})
        return appended

    def crash(self, k: int, error: str) -> dict | None:
        """Records worker k's in-flight experiment as crash (once); None when it was running none."""
        info = self.in_flight.pop(k, None)
        self._release_baseline(k)
        if info is None:
            return self.last_crash.pop(k, None)  # already recorded (by the restarted worker's register)
        self.last_crash[k] = ray_get(self.ledger.append.remote(crash_record(info, error)))
        return self.last_crash[k]

    def _release_baseline(self, k: int) -> None:
        for key_id in [key for key, owner in self.baseline_owner.items() if owner == k]:
            del self.baseline_owner[key_id]

    # -- commits across machines
    def bundle(self, commit: str) -> bytes | None:
        """`commit` for a machine that lacks it (made here, or brought home by record())."""
        if commit not in self.bundles and commit_exists(self.repo, commit):
            self.bundles[commit] = make_bundle(self.repo, commit, self.base, commit_ref(self.run, commit))
        return self.bundles.get(commit)

    def base_bundle(self) -> bytes:
        return full_bundle(self.repo, base_ref(self.run))

    def state(self) -> dict:
        return {"best": self.best, "in_flight": self.in_flight, "workers": self.workers,
                "adoptions": self.adoptions, "started_from": self.started_from,
                "bundled": sorted(self.bundles)}


def crash_record(info: dict, error: str) -> dict:
    """The ledger record of an experiment whose worker died: every field of a harness record,
    measured ones null, diff and description as far as the worker had reported them."""
    parent = info.get("parent_commit")
    return {
        "key": info.get("key"), "key_id": info.get("key_id"), "tag": info.get("tag"),
        "backend": info.get("backend"), "hardware": info.get("hardware"),
        "branch": info.get("branch"), "commit": parent, "parent_commit": parent, "diff_base": parent,
        "train_file": info.get("train_file"), "time_budget": info.get("budget"), "device": info.get("device"),
        "train_sha256": info.get("train_sha256"), "diff": info.get("diff", ""),
        "description": info.get("description") or "(experiment in flight when its worker died)",
        "status": "crash", "baseline": bool(info.get("baseline", False)),
        "val_bpb": None, "val_bpb_seeds": [], "training_seconds": None,
        "total_seconds": round(time.time() - info["since"], 3) if info.get("since") else None,
        "overhead_seconds": None, "startup_seconds": None, "eval_seconds": None, "peak_memory_mb": None,
        "mfu_percent": None, "total_tokens": None, "num_steps": None, "num_params": None, "seeds": [],
        "error": error, "proposer": info.get("proposer"), "near_miss": False, "config": info.get("config"),
        "swarm": info.get("swarm"),
    }


def ray_get(ref: Any, timeout: float | None = None) -> Any:
    import ray
    return ray.get(ref, timeout=timeout)


def commit_ref(run: str, commit: str) -> str:
    # One hidden ref per bundled commit: unique, so fetching it never clashes, and it keeps the commit from gc.
    return f"refs/arun/swarm/{run}/c/{commit}"


class SwarmLedger:
    """What a worker hands the harness instead of its own ledger: reads are the main ledger as it
    stood when the experiment started (the ratchet compares against the best it adopted); an
    append goes to the coordinator, which writes it through the one ledger actor."""

    def __init__(self, worker: "Worker", records: list[dict], path: Path):
        self.worker, self._records, self.path = worker, records, path
        self.appended: list[dict] = []

    def records(self) -> list[dict]:
        return list(self._records) + list(self.appended)

    def mirror(self, wt: Path, tag: str) -> Path:
        """run_experiment reads the best from the worktree's own bench/<tag>/ledger.jsonl; that file becomes
        a read-only copy of the main ledger as it stood at adoption (appends go through the sink instead)."""
        from arun.core.ledger import ledger_path
        path = ledger_path(wt, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".swarm-tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in self._records), encoding="utf-8")
        tmp.replace(path)
        return path

    def append(self, record: dict) -> dict:
        appended = self.worker.send(record)
        self.appended.append(appended)
        return appended

    __call__ = append  # so the same object also serves as a `record_sink` callable


class Worker:
    """One Ray actor = one GPU (or one machine): a worktree, a branch, a proposer, a loop step."""

    def __init__(self, cfg: dict, k: int):
        import ray
        # By name, not as a constructor argument: Ray restarts an actor from its constructor
        # arguments, and a handle among them would have to outlive everything else in the object store.
        coordinator = ray.get_actor(cfg["coordinator"])
        self.cfg, self.k, self.coord = cfg, k, coordinator
        self.run, self.base = cfg["run"], cfg["base"]
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        self.repo = self._node_repo()
        # Same machine and same clone as the driver: commits are shared, no bundles needed.
        self.shares_main_repo = (self.node_id == cfg["driver_node"]
                                 and self.repo.resolve() == Path(cfg["main_repo"]).resolve())
        self.wt = worktree_path(self.repo, self.run, k)
        if self.wt.exists():
            # A restart on the same machine: the previous process's train run or agent may still be
            # going (they outlive a SIGKILLed parent) and would hold the GPU; they stop first.
            kill_processes_in(self.wt)
        reg = ray_get(coordinator.register.remote(k, {"pid": os.getpid(), "node_id": self.node_id, "host": self.host,
                                                       "repo": str(self.repo), "worktree": str(self.wt)}))
        self.restarted = reg["previous"] is not None
        self._ensure_base()
        ensure_worktree(self.repo, self.run, k, self.base)
        self.probe = probe_key(self.wt, cfg["backend"], cfg.get("budget"), cfg.get("device"))
        self.key, self.key_id, self.tag = self.probe["key"], self.probe["key_id"], self.probe["tag"]
        opts = cfg.get("loop_options") or {}
        if opts.get("confidence") and (opts.get("seeds") or 1) < 2 and "noise_std" not in opts \
                and self.key_id not in (cfg.get("noise") or {}):
            raise ArunError(f"--confidence with one seed needs the run-to-run noise of {self.tag} (key {self.key_id}): "
                            f"measure it with arun noise --backend {cfg['backend']} --seeds 5 on that hardware, "
                            "or pass --seeds 2 or more")
        self.proposer = make_proposer(cfg, k, self.wt)
        self.steps = 0
        self._start_commit = self.base

    def log(self, line: str) -> None:
        """The loop's output, per worker, next to its worktree (.arun/swarm/<run>-w<k>.log): it survives
        the worktree's removal, and the driver's console stays one line per experiment."""
        with open(self.wt.parent / f"{self.wt.name}.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def _node_repo(self) -> Path:
        """This machine's clone: $ARUN_SWARM_REPO (set before `ray start`) or the driver's path."""
        path = Path(self.cfg.get("worker_repo") or os.environ.get("ARUN_SWARM_REPO") or self.cfg["main_repo"])
        if not (path / ".git").exists():
            raise ArunError(f"no git repo at {path} on {self.host}; clone the project there, or set "
                            "ARUN_SWARM_REPO to its clone before `ray start` on that machine")
        return path

    def _ensure_base(self) -> None:
        if not commit_exists(self.repo, self.base):
            load_bundle(self.repo, ray_get(self.coord.base_bundle.remote()), base_ref(self.run))

    def info(self) -> dict:
        return {"k": self.k, "pid": os.getpid(), "host": self.host, "node_id": self.node_id,
                "worktree": str(self.wt), "tag": self.tag, "key_id": self.key_id, "restarted": self.restarted}

    def adopt(self, commit: str) -> None:
        """Branch and tree onto `commit`, fetching it first when it was made on another machine."""
        if not commit_exists(self.repo, commit):
            data = ray_get(self.coord.bundle.remote(commit))
            if data is None:
                raise ArunError(f"the best commit {commit[:10]} of {self.tag} (key {self.key_id}) is in neither "
                                f"{self.repo} nor the main repo; git fetch the branch that has it")
            load_bundle(self.repo, data, commit_ref(self.run, commit))
        reset_worktree(self.wt, commit)

    def send(self, record: dict) -> dict:
        """The harness's record, tagged with who ran it and from where, to the one writer."""
        record = dict(record)
        record["swarm"] = {"run": self.run, "worker": self.k, "host": self.host,
                           "start_commit": self._start_commit, "restarted": self.restarted}
        if record.get("key_id") and record["key_id"] != self.key_id:
            # The harness is the authority on the key; follow it from now on.
            self.key, self.key_id, self.tag = record.get("key"), record["key_id"], record.get("tag", self.tag)
        bundle = None
        if record.get("status") == "keep" and record.get("commit") and not self.shares_main_repo:
            bundle = make_bundle(self.repo, record["commit"], self.base, commit_ref(self.run, record["commit"]))
        return ray_get(self.coord.record.remote(self.k, record, bundle))

    def step(self) -> dict:
        """One experiment: adopt the best, propose, run, record. Returns a short summary."""
        t0 = time.time()
        while True:
            plan = ray_get(self.coord.start.remote(self.k, self.tag, self.key_id))
            if not plan["wait"]:
                break
            time.sleep(0.5)  # another worker is running this key's baseline
        commit = plan["commit"]
        self._start_commit = commit
        best = plan["best"]
        self.log(f"swarm: w{self.k} starts from {commit[:10]}" +
                 (f" (best {best['val_bpb']:.6f} by {_who(best)})" if best else " (no result yet: the baseline)"))
        from arun.core.ledger import ledger_path
        ledger = SwarmLedger(self, plan["records"], ledger_path(Path(self.cfg["main_repo"]), self.tag))
        try:
            self.adopt(commit)
            ledger.mirror(self.wt, self.tag)
            ray_get(self.coord.running.remote(self.k, {
                "parent_commit": commit, "key": self.key, "key_id": self.key_id, "tag": self.tag,
                "backend": self.cfg["backend"], "hardware": self.probe.get("hardware"),
                "train_file": self.probe.get("train_file"), "proposer": getattr(self.proposer, "name", self.cfg["agent"]),
                "branch": branch_name(self.run, self.k), "budget": self.probe.get("budget"),
                "device": self.probe.get("device"),
                "baseline": plan["best"] is None, "pid": os.getpid(),
                "swarm": {"run": self.run, "worker": self.k, "host": self.host, "start_commit": commit}}))
            record = iterate(self, plan, ledger)
        except Exception as e:  # the experiment could not be carried out: it is recorded as crash
            crash = ray_get(self.coord.crash.remote(self.k, one_line(e)))
            try:
                clean_worktree(self.wt)
            except Exception:
                pass
            return {"worker": self.k, "status": "error", "error": one_line(e), "record": crash,
                    "start_commit": commit, "seconds": time.time() - t0}
        ray_get(self.coord.running.remote(self.k, {"done": True}))
        self.steps += 1
        rec = ledger.appended[-1] if ledger.appended else record
        self.log(f"swarm: w{self.k} recorded {(rec or {}).get('status')} in {time.time() - t0:.1f}s")
        return {"worker": self.k, "status": (rec or {}).get("status"), "val_bpb": (rec or {}).get("val_bpb"),
                "record": rec, "start_commit": commit, "seconds": time.time() - t0}


# --------------------------------------------------------------------------- the driver

@dataclass
class SwarmOptions:
    repo_dir: Path
    backend: str
    agent: str = "sweep"
    workers: int | None = None          # None: one per GPU (CUDA) or per machine (MLX, CPU)
    run: str | None = None              # branch names autoresearch/<run>-w<k>; default swarm-<date>
    address: str | None = None          # join this Ray cluster instead of starting one here
    hours: float | None = None
    iterations: int | None = None       # experiments in all, across workers
    budget: float | None = None         # seconds of training per experiment (ARUN_TIME_BUDGET)
    device: str | None = None           # torch engine: "cpu" runs on CPU (tests); GPUs are not asked for
    max_restarts: int = 3               # per worker, by Ray; the swarm drops a worker past this
    max_crashes: int = 3                # a worker with this many unscored experiments in a row is dropped (as arun loop stops)
    agent_timeout: float | None = None  # an external agent's wall clock per proposal (arun loop's default)
    num_cpus: int | None = None         # local cluster only (default: this machine's cores, >= workers)
    object_store_mb: int = 128          # local cluster only: records and bundles are small
    loop_options: dict = field(default_factory=dict)    # to arun.search.loop.iteration: seeds, confidence, near_miss, hard_timeout
    worker_repos: dict = field(default_factory=dict)    # k -> the clone worker k works in (as on another machine)


class Swarm:
    """Starts or joins the cluster, runs the workers, stops them cleanly. run_swarm() is the CLI's way in;
    tests drive the methods one by one."""

    def __init__(self, opts: SwarmOptions, log: Callable[[str], None] = print):
        self.opts, self.log = opts, log
        self.repo = Path(opts.repo_dir).resolve()
        self.run_name = opts.run or time.strftime("swarm-%Y%m%d-%H%M%S")
        self.workers: dict[int, Any] = {}
        self.coord: Any = None
        self.ledger: Any = None
        self.own_cluster = False
        self.results: list[dict] = []
        self.dropped: dict[int, str] = {}
        self.started = False
        self.stopped: dict | None = None
        self.pg: Any = None
        self.driver_node: str | None = None

    # -- start
    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        o = self.opts
        if not (self.repo / ".git").exists():
            raise ArunError(f"{self.repo} is not a git repository; run arun swarm inside the project's clone")
        try:
            self.base = git(self.repo, "rev-parse", "HEAD")
        except ArunError:
            raise ArunError(f"{self.repo} has no commit yet; commit the project first (git add -A && git commit)")
        dirty = git(self.repo, "status", "--porcelain", "--untracked-files=no")
        if dirty:
            self.log(f"note: uncommitted changes in {self.repo} stay there; workers start from {self.base[:12]} (HEAD)")
        git(self.repo, "update-ref", base_ref(self.run_name), self.base)

        if ray.is_initialized():
            pass  # a caller (a test, a notebook) already connected; leave its cluster alone at the end
        elif o.address:
            ray.init(address=o.address, logging_level="WARNING", log_to_driver=True)
        else:
            ncpu = o.num_cpus or max(os.cpu_count() or 1, o.workers or 1)
            # address="local": always a fresh private instance, never one a stale /tmp/ray file points at.
            ray.init(address="local", num_cpus=ncpu, include_dashboard=False, object_store_memory=o.object_store_mb * 2**20,
                     logging_level="WARNING", log_to_driver=True)
            self.own_cluster = True
        self.driver_node = ray.get_runtime_context().get_node_id()

        gpu = o.backend == "cuda" and (o.device or "cuda") != "cpu"
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        n_gpus = int(resources.get("GPU", 0))
        if gpu:
            n = o.workers or n_gpus
            if n_gpus == 0:
                raise ArunError("the Ray cluster has no GPU; start ray on GPU machines, or pass --device cpu")
            if n > n_gpus:
                raise ArunError(f"--workers {n} but the cluster has {n_gpus} GPUs; one worker holds one GPU")
        else:
            n = o.workers or len(nodes)
            if len(nodes) == 1 and n > 1:
                self.log(f"note: {n} {o.backend} workers share this one machine; their timings contend")
        if n < 1:
            raise ArunError("--workers must be at least 1")
        self.n = n

        here = NodeAffinitySchedulingStrategy(node_id=self.driver_node, soft=False)
        self.ledger = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(LedgerWriter) \
            .options(scheduling_strategy=here).remote(str(self.repo))
        self.coord = ray.remote(num_cpus=0)(Coordinator) \
            .options(scheduling_strategy=here, name=f"arun-swarm-{self.run_name}") \
            .remote(str(self.repo), self.run_name, self.base, self.ledger)

        if not gpu and len(nodes) > 1:
            # MLX and CPU on a cluster: one worker per machine, which STRICT_SPREAD enforces.
            if n > len(nodes):
                raise ArunError(f"--workers {n} but the cluster has {len(nodes)} machines; {o.backend} runs one "
                                "worker per machine")
            from ray.util.placement_group import placement_group
            self.pg = placement_group([{"CPU": 1}] * n, strategy="STRICT_SPREAD")
            ray.get(self.pg.ready(), timeout=120)
        cfg = {"run": self.run_name, "base": self.base, "main_repo": str(self.repo), "backend": o.backend,
               "agent": o.agent, "budget": o.budget, "device": o.device, "driver_node": self.driver_node,
               "loop_options": dict(o.loop_options), "workers": n, "agent_timeout": o.agent_timeout,
               "noise": measured_noise(self.repo),
               "coordinator": f"arun-swarm-{self.run_name}"}
        actor = ray.remote(Worker)
        for k in range(n):
            opts: dict = {"max_restarts": o.max_restarts, "max_task_retries": 0,
                          "num_cpus": 1, "num_gpus": 1 if gpu else 0}
            if self.pg is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=k)
            wcfg = dict(cfg, worker_repo=str(Path(o.worker_repos[k]).resolve())) if k in o.worker_repos else cfg
            self.workers[k] = actor.options(**opts).remote(wcfg, k)
        self.started = True
        infos = {}
        for k, w in self.workers.items():
            try:
                infos[k] = ray.get(w.info.remote(), timeout=600)
            except Exception as e:
                raise ArunError(f"worker w{k} did not start: {_ray_cause(e)}")
        self.infos = infos
        tags = sorted({i["tag"] for i in infos.values()})
        self.log(f"swarm {self.run_name}: {n} {o.backend} worker(s) on {len(nodes)} machine(s), base {self.base[:12]}, "
                 f"tag(s) {', '.join(tags)}")

    # -- run
    def run(self, iterations: int | None = None, deadline: float | None = None,
            on_result: Callable[["Swarm", dict], None] | None = None) -> list[dict]:
        """Keeps every worker busy until `iterations` experiments (in all) were dispatched or the
        deadline passed, then waits for those in flight. Returns this call's step summaries."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError
        pending: dict[Any, tuple[int, str]] = {}     # ref -> (worker, "step" | "revive")
        dispatched = 0
        deaths = {k: 0 for k in self.workers}     # worker process deaths in a row
        unscored = {k: 0 for k in self.workers}   # experiments in a row without a score
        revive_until: dict[int, float] = {}
        out: list[dict] = []

        def more() -> bool:
            if iterations is not None and dispatched >= iterations:
                return False
            return deadline is None or time.time() < deadline

        def submit(k: int) -> None:
            nonlocal dispatched
            if k in self.dropped or not more():
                return
            pending[self.workers[k].step.remote()] = (k, "step")
            dispatched += 1

        def drop(k: int, why: str) -> None:
            self.dropped[k] = why
            self.log(f"w{k} dropped: {why}")
            if len(self.dropped) == len(self.workers):
                raise ArunError(f"every worker failed; last: {why}")

        def revive(k: int) -> None:
            # Ray is restarting the actor; a call made too early fails with ActorUnavailableError,
            # so the next step waits until the new process answers.
            revive_until.setdefault(k, time.time() + 600)
            pending[self.workers[k].info.remote()] = (k, "revive")

        for k in list(self.workers):
            submit(k)
        while pending:
            if not more():  # nothing more to dispatch: a worker still coming back has nothing to do
                for ref in [r for r, (_, kind) in pending.items() if kind == "revive"]:
                    del pending[ref]
                if not pending:
                    break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready:
                continue
            ref = ready[0]
            k, kind = pending.pop(ref)
            if kind == "revive":
                try:
                    ray.get(ref)
                except ActorDiedError as e:
                    drop(k, f"worker w{k} is gone for good: {_ray_cause(e)}")
                    continue
                except RayActorError as e:
                    if time.time() > revive_until[k]:
                        drop(k, f"worker w{k} did not come back: {_ray_cause(e)}")
                    else:
                        time.sleep(0.5)
                        revive(k)
                    continue
                revive_until.pop(k, None)
                submit(k)
                continue
            try:
                res = ray.get(ref)
            except RayActorError as e:
                why = f"{type(e).__name__}: process killed or machine lost"
                crash = ray.get(self.coord.crash.remote(k, DIED.format(k=k, why=why)))
                res = {"worker": k, "status": "died", "error": why, "record": crash,
                       "start_commit": (crash or {}).get("parent_commit")}
                permanent = isinstance(e, ActorDiedError)
            except Exception as e:  # the step itself failed outside the experiment: a bug, reported
                res = {"worker": k, "status": "error", "error": _ray_cause(e), "record": None}
                permanent = False
            else:
                permanent = False
            res["adoptions"] = len(ray.get(self.coord.state.remote())["adoptions"])
            self.results.append(res)
            out.append(res)
            if on_result is not None:
                on_result(self, res)
            rec = res.get("record") or {}
            if res["status"] == "died":
                deaths[k] += 1
            elif rec.get("status") in SCORED:
                deaths[k] = unscored[k] = 0
            else:  # crash, timeout, invalid, or a step that failed outside the experiment
                unscored[k] += 1
            if permanent:
                drop(k, f"worker w{k} died and Ray will not restart it ({res['error']})")
            elif res["status"] == "died":
                if deaths[k] > self.opts.max_restarts:
                    drop(k, f"worker w{k} died {deaths[k]} times in a row ({res['error']})")
                else:
                    revive(k)
            elif self.opts.max_crashes > 0 and unscored[k] >= self.opts.max_crashes:
                drop(k, f"{unscored[k]} experiments in a row without a score (crash, timeout or invalid); "
                        f"last: {rec.get('error') or res.get('error')}")
            else:
                submit(k)
        return out

    def state(self) -> dict:
        import ray
        return ray.get(self.coord.state.remote())

    def pid(self, k: int) -> int:
        import ray
        return ray.get(self.workers[k].info.remote())["pid"]

    # -- stop
    def stop(self, interrupted: bool = False) -> dict:
        """Stops every worker, kills what they left running, removes their worktrees (their branches
        stay), points autoresearch/<run> at the best commit. Safe after a partial start."""
        import ray
        summary: dict = {"run": self.run_name, "interrupted": interrupted, "experiments": 0, "best": {},
                         "branches": {}, "adoptions": []}
        if self.stopped is not None:
            return self.stopped
        if not ray.is_initialized():
            return summary
        self.stopped = summary
        log = lambda line: _quiet(self.log, line)  # noqa: E731
        for w in self.workers.values():
            try:
                ray.kill(w, no_restart=True)
            except Exception:
                pass
        for w in self.workers.values():  # ray.kill returns at once; wait until each is really gone
            try:
                ray.get(w.info.remote(), timeout=15)
            except Exception:
                pass
        state = None
        if self.coord is not None:
            try:
                # What the workers were running when they were stopped: recorded as crash, as arun loop
                # records an experiment interrupted by Ctrl-C (its diff stays in the ledger).
                for k in sorted(ray.get(self.coord.state.remote(), timeout=60)["in_flight"]):
                    ray.get(self.coord.crash.remote(k, "interrupted (Ctrl-C): the swarm was stopped"), timeout=60)
                    log(f"w{k}  interrupted: recorded as crash")
                    summary["experiments"] += 1
                state = ray.get(self.coord.state.remote(), timeout=60)
            except Exception as e:
                log(f"coordinator unreachable at stop: {_ray_cause(e)}")
        registered = (state or {}).get("workers", {})
        best_runs = None if state is None else [Path(r["run_dir"]).name for r in state["best"].values()
                                                if r.get("run_dir")]
        where = {k: w.get("node_id") for k, w in registered.items()}
        # The killed workers' train runs and agents outlive them; each machine cleans its own worktrees.
        cleanups = []
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for k in self.workers:
            repo = registered.get(k, {}).get("repo") or str(Path(self.opts.worker_repos.get(k, self.repo)).resolve())
            node = where.get(k)
            if node is None or node not in alive:
                if node is None or node == self.driver_node:
                    cleanup_worker(repo, self.run_name, k, best_runs)
                continue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            task = ray.remote(num_cpus=0)(cleanup_worker).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
            cleanups.append(task.remote(repo, self.run_name, k, best_runs))
        for ref in cleanups:
            try:
                ray.get(ref, timeout=120)
            except Exception as e:
                log(f"cleanup on a worker's machine failed: {_ray_cause(e)}")
        if state is not None:
            best = state["best"]
            summary["best"] = best
            summary["adoptions"] = state["adoptions"]
            for key_id, rec in best.items():
                commit = rec.get("commit")
                if not commit or commit == self.base or not commit_exists(self.repo, commit):
                    continue
                branch = f"autoresearch/{self.run_name}" if len(best) == 1 else \
                    f"autoresearch/{self.run_name}-{rec.get('tag') or key_id}"
                if move_branch(self.repo, branch, commit):
                    summary["branches"][branch] = commit
        summary["experiments"] += sum(1 for r in self.results if r.get("record"))
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        if self.own_cluster:
            ray.shutdown()
        return summary


def cleanup_worker(repo: str, run: str, k: int, best_runs: list[str] | None = None) -> None:
    """On the worker's machine: stop leftovers, keep its runs, remove its worktree; the branch stays."""
    repo_p = Path(repo)
    wt = worktree_path(repo_p, run, k)
    kill_processes_in(wt)
    # Result JSONs (records name them as .arun/runs/<id>) move into this machine's clone, where
    # `arun verify` and friends look for them; weights only for the swarm's best runs, as the harness
    # keeps weights for the best run of each key only (a worker cannot see the others' best).
    runs = wt / ".arun" / "runs"
    if runs.is_dir():
        dest = repo_p / ".arun" / "runs"
        dest.mkdir(parents=True, exist_ok=True)
        for d in runs.iterdir():
            if best_runs is not None and d.name not in best_runs:
                for w in d.glob("weights*"):
                    w.unlink(missing_ok=True)
            if not (dest / d.name).exists():
                d.rename(dest / d.name)
    remove_worktree(repo_p, wt)


def measured_noise(repo: Path) -> dict[str, float]:
    """key_id -> run-to-run std measured by `arun noise` in the main repo (for --confidence with one seed)."""
    out: dict[str, float] = {}
    for path in sorted(Path(repo).glob("bench/*/noise.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for kid, entry in (data.items() if isinstance(data, dict) else []):
            if isinstance(entry, dict) and isinstance(entry.get("std"), (int, float)):
                out[kid] = float(entry["std"])
    return out


def _ray_cause(e: BaseException) -> str:
    """The first useful line of a Ray error (they carry whole tracebacks)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__name__.startswith("Ray"):
        return one_line(cause)
    text = str(e)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("arun.core.errors.ArunError:", "ArunError:")):
            return line.split(":", 1)[1].strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def run_swarm(opts: SwarmOptions, log: Callable[[str], None] = print) -> dict:
    """The CLI's entry: start, run until --iterations / --hours (or Ctrl-C), stop cleanly."""
    deadline = time.time() + opts.hours * 3600 if opts.hours else None
    return drive(Swarm(opts, log), iterations=opts.iterations, deadline=deadline)


def drive(swarm: Swarm, iterations: int | None = None, deadline: float | None = None) -> dict:
    """Starts the swarm if needed, runs it, and stops it whatever happens. Ctrl-C stops the workers
    mid-experiment: those experiments are recorded as crash ("interrupted"), as `arun loop` does."""
    interrupted = False
    try:
        if not swarm.started:
            swarm.start()
        swarm.run(iterations=iterations, deadline=deadline, on_result=lambda s, r: _quiet(s.log, describe(s, r)))
    except KeyboardInterrupt:
        interrupted = True
        _quiet(swarm.log, "stopping the swarm (Ctrl-C): workers stop, worktrees are removed, branches stay")
    finally:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a second Ctrl-C must not
        try:                                                                  # leave half-removed worktrees
            summary = swarm.stop(interrupted)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
    return summary


def _quiet(log: Callable[[str], None], line: str) -> None:
    try:  # a closed stdout (a pipe whose reader took the Ctrl-C too) must not stop the clean-up
        log(line)
    except (OSError, ValueError):
        pass


def describe(swarm: Swarm, res: dict) -> str:
    rec = res.get("record") or {}
    bpb = rec.get("val_bpb")
    parts = [f"w{res['worker']}", f"{(rec.get('status') or res['status']):8s}",
             f"{bpb:.6f}" if isinstance(bpb, (int, float)) else "   -    ",
             f"from {str(res.get('start_commit') or rec.get('parent_commit') or '')[:8]}"]
    if rec.get("description"):
        parts.append(repr(rec["description"])[:60])
    if res.get("error") and res["status"] in ("died", "error"):
        parts.append(f"({res['error'][:120]})")
    return "  ".join(parts)


# --------------------------------------------------------------------------- the loop, reused

def probe_key(wt: Path, backend: str, budget: float | None, device: str | None) -> dict:
    """The comparability key this worker's experiments will carry ({key, key_id, tag, hardware,
    train_file, seq_len, ...}), worked out exactly as the loop does, where they run."""
    from arun.search import loop
    return loop.experiment_key(wt, backend, budget, device)


def make_proposer(cfg: dict, k: int, wt: Path) -> Any:
    """The same proposer `arun loop --agent SPEC` builds, one per worker (seeded by the worker's
    number, so that two workers running the built-in sweep do not propose the same edits)."""
    from arun.search import loop
    extra = {"agent_timeout": cfg["agent_timeout"]} if cfg.get("agent_timeout") else {}
    return loop.make_proposer(cfg["agent"], repo_dir=wt, backend=cfg["backend"], seed=k, **extra)


def iterate(worker: Worker, plan: dict, ledger: SwarmLedger) -> dict:
    """One iteration of `arun loop` (arun.search.loop.iteration) in the worker's worktree, its record going
    through `ledger` to the one writer."""
    from arun.search import loop
    cfg = worker.cfg
    options = dict(cfg.get("loop_options") or {})
    noise = (cfg.get("noise") or {}).get(worker.key_id)
    if options.get("confidence") and "noise_std" not in options and noise is not None:
        options["noise_std"] = noise  # measured in the main repo (arun noise); the worktree has no copy

    def on_proposal(description: str, diff: str) -> None:
        # Reported before training starts, so that a crash record of this experiment (its worker killed
        # mid-run) carries the description and diff.
        ray_get(worker.coord.running.remote(worker.k, {"description": description, "diff": diff}))

    return loop.iteration(worker.wt, cfg["backend"], worker.proposer, ledger=ledger, budget=cfg.get("budget"),
                          device=cfg.get("device"), show_progress=False, on_proposal=on_proposal,
                          log=worker.log, number=worker.steps + 1, **options)
