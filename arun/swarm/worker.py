"""
One swarm worker (a Ray actor): a worktree, a branch, a proposer, and `arun loop`'s own iteration,
its records going to the coordinator instead of a ledger of its own.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from arun.core import forward_store, gitops, trust
from arun.core.context import cached_context
from arun.core.errors import ArunError
from arun.core.ledger import ledger_path, written
from arun.search.loop import iteration
from arun.search.loop import make_proposer as loop_proposer
from arun.swarm.actors import ray_get
from arun.swarm.procs import kill_processes_in
from arun.swarm.worktrees import base_ref, branch_name, commit_ref, ensure_worktree, temp_path, worktree_path
from engines.atomic import write_atomic
from engines.forward_file import SUFFIX


def _who(record: dict, run: str) -> str:
    """Who made a best: a worker of this run, or an earlier run (whose worker numbers are not ours)."""
    swarm = record.get("swarm") or {}
    if swarm.get("run") == run and swarm.get("worker") is not None:
        return f"w{swarm['worker']}"
    return f"run {swarm['run']}" if swarm.get("run") else "an earlier run"


def one_line(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()
    name = type(e).__name__ + ": " if isinstance(e, BaseException) and not isinstance(e, ArunError) else ""
    return (name + (text[-1] if text else "")).strip()[:500]


class SwarmLedger:
    """What a worker hands the harness instead of its own ledger: reads are the main ledger as it
    stood when the experiment started (the ratchet compares against the best it adopted); an
    append goes to the coordinator, which writes it through the one ledger actor."""

    def __init__(self, worker: Worker, records: list[dict], path: Path):
        self.worker, self._records, self.path = worker, records, path
        self.appended: list[dict] = []

    def records(self) -> list[dict]:
        return list(self._records) + list(self.appended)

    def mirror(self, wt: Path, tag: str) -> Path:
        """run_experiment reads the best from the worktree's own bench/<tag>/ledger.jsonl; that file becomes
        a read-only copy of the main ledger as it stood at adoption (appends go through the sink instead)."""
        path = ledger_path(wt, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, "".join(json.dumps(written(r), default=str) + "\n" for r in self._records))
        return path

    def append(self, record: dict) -> dict:
        appended = self.worker.send(record)
        self.appended.append(appended)
        return appended

    __call__ = append  # so the same object also serves as a `record_sink` callable


class Worker:
    """One Ray actor = one GPU (or one machine): a worktree, a branch, a proposer, a loop step."""

    def __init__(self, cfg: dict, k: int):
        import ray  # Ray is an optional dependency (the [swarm] extra): imported where it is used
        # By name, not as a constructor argument: Ray restarts an actor from its constructor
        # arguments, and a handle among them would have to outlive everything else in the object store.
        coordinator = ray.get_actor(cfg["coordinator"])
        self.cfg, self.k, self.coord = cfg, k, coordinator
        if cfg.get("head_key"):
            # Every line of the swarm's ledger is signed by the head: trusted here, the mirrored ledger
            # verifies and this worker's ratchet sees the real best (not "no best": a false baseline keep).
            trust.trust_for_session(cfg["head_key"], "swarm head")
        self.run, self.base = cfg["run"], cfg["base"]
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        self.repo = self._node_repo()
        # Same machine and same clone as the driver: commits are shared, no bundles needed.
        self.shares_main_repo = (self.node_id == cfg["driver_node"]
                                 and self.repo.resolve() == Path(cfg["main_repo"]).resolve())
        self.wt = worktree_path(self.repo, self.run, k)
        tmp = temp_path(self.repo, self.run, k)
        if self.wt.exists():
            # A restart on the same machine: the previous process's train run, agent or scorer may still
            # be going (they outlive a SIGKILLed parent) and would hold the GPU; they stop first.
            kill_processes_in(self.wt)
            kill_processes_in(tmp)
        # Scratch folders (the scorer's) go beside the worktree, not in the machine's TMPDIR: removed
        # with the worker at the end even when it was killed mid-scoring.
        tmp.mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = None  # re-read TMPDIR
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
        if not gitops.commit_exists(self.repo, self.base):
            gitops.load_bundle(self.repo, ray_get(self.coord.base_bundle.remote()), base_ref(self.run))

    def info(self) -> dict:
        return {"k": self.k, "pid": os.getpid(), "host": self.host, "node_id": self.node_id,
                "worktree": str(self.wt), "tag": self.tag, "key_id": self.key_id, "restarted": self.restarted}

    def adopt(self, commit: str) -> None:
        """Branch and tree onto `commit`, fetching it first when it was made on another machine."""
        if not gitops.commit_exists(self.repo, commit):
            data = ray_get(self.coord.bundle.remote(commit))
            if data is None:
                raise ArunError(f"the best commit {commit[:10]} of {self.tag} (key {self.key_id}) is in neither "
                                f"{self.repo} nor the main repo; git fetch the branch that has it")
            gitops.load_bundle(self.repo, data, commit_ref(self.run, commit))
        gitops.reset_worktree(self.wt, commit)

    def send(self, record: dict) -> dict:
        """The harness's record, tagged with who ran it and from where, to the one writer."""
        record = dict(record)
        record["swarm"] = {"run": self.run, "worker": self.k, "host": self.host,
                           "start_commit": self._start_commit, "restarted": self.restarted}
        if record.get("key_id") and record["key_id"] != self.key_id:
            # The harness is the authority on the key; follow it from now on.
            self.key, self.key_id, self.tag = record.get("key"), record["key_id"], record.get("tag", self.tag)
        bundle, forwards = None, None
        if record.get("status") == "keep" and not self.shares_main_repo:
            if record.get("commit"):
                bundle = gitops.make_bundle(self.repo, record["commit"], self.base, commit_ref(self.run, record["commit"]))
            forwards = forward_store.read_forwards(self.repo, record)
        return ray_get(self.coord.record.remote(self.k, record, bundle, forwards))

    def fetch_forwards(self, best: dict | None) -> None:
        """The best's forwards into this clone's store when it was kept in another clone: a keep whose
        forward this clone lacks is unverified here, and the harness would see no best at all (a false
        baseline, judged against nothing: no early stop, no confirmation of a near win)."""
        if best is None or self.shares_main_repo:
            return
        backend = str(best.get("backend"))
        missing = [sha for sha in forward_store.shas_of(best)
                   if backend in SUFFIX and not forward_store.path_for(self.repo, backend, sha).is_file()]
        if missing and forward_store.needs_forward(best):
            forward_store.put_forwards(self.repo, backend, ray_get(self.coord.forwards.remote(best)))

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
                 (f" (best {best['val_bpb']:.6f} by {_who(best, self.run)})" if best else " (no result yet: the baseline)"))
        ledger = SwarmLedger(self, plan["records"], ledger_path(Path(self.cfg["main_repo"]), self.tag))
        try:
            self.adopt(commit)
            self.fetch_forwards(best)
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
                gitops.clean_worktree(self.wt)
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


def probe_key(wt: Path, backend: str, budget: float | None, device: str | None) -> dict:
    """The comparability key this worker's experiments will carry ({key, key_id, tag, hardware,
    train_file, seq_len, ...}), worked out exactly as the loop does, where they run."""
    return cached_context(wt, backend, budget, device).info()


def make_proposer(cfg: dict, k: int, wt: Path) -> Any:
    """The same proposer `arun loop --agent SPEC` builds, one per worker (seeded by the worker's
    number, so that two workers running the built-in sweep do not propose the same edits)."""
    extra = {"agent_timeout": cfg["agent_timeout"]} if cfg.get("agent_timeout") else {}
    return loop_proposer(cfg["agent"], repo_dir=wt, backend=cfg["backend"], seed=k, **extra)


def loop_options(cfg: dict, key_id: str | None) -> dict:
    """The swarm's `arun loop` options for one iteration, with the key's spread measured in the main repo
    (arun noise): the worktree has no copy, and the confirmation gate needs it as much as --confidence
    does (without it, near wins are kept by the plain rule)."""
    options = dict(cfg.get("loop_options") or {})
    noise = (cfg.get("noise") or {}).get(key_id) if key_id else None
    if noise is not None:
        options["noise"] = noise  # (the early stop's margins: its loss_trajectory_std)
        if "noise_std" not in options:
            options["noise_std"] = noise["std"]
    return options


def iterate(worker: Worker, plan: dict, ledger: SwarmLedger) -> dict:
    """One iteration of `arun loop` (arun.search.loop.iteration) in the worker's worktree, its record going
    through `ledger` to the one writer."""
    cfg = worker.cfg
    options = loop_options(cfg, worker.key_id)

    def on_proposal(description: str, diff: str) -> None:
        # Reported before training starts, so that a crash record of this experiment (its worker killed
        # mid-run) carries the description and diff.
        ray_get(worker.coord.running.remote(worker.k, {"description": description, "diff": diff}))

    return iteration(worker.wt, cfg["backend"], worker.proposer, ledger=ledger, budget=cfg.get("budget"),
                          device=cfg.get("device"), show_progress=False, on_proposal=on_proposal,
                          log=worker.log, number=worker.steps + 1, **options)
