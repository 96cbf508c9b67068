"""
The swarm's two Ray actors on the driver's machine: the one ledger writer, and the coordinator that
knows the best commit per comparability key and what every worker is running.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from arun.core import forward_store, gitops
from arun.core.errors import ArunError
from arun.core.ledger import Ledger, ledger_path
from arun.core.ratchet import NEAR_MISS, best_record
from arun.core.record import crash_record
from arun.swarm.worktrees import base_ref, commit_ref

# A crashed or lost worker whose in-flight experiment we record says so in this form; `why` says what
# happened to the worker afterwards (restarted, or its machine lost), as far as the swarm knows it.
DIED = "worker w{k} died during the experiment: {why}"
RESTARTED = "its process was killed or crashed; Ray restarted it"


def ray_get(ref: Any, timeout: float | None = None) -> Any:
    import ray  # Ray is an optional dependency (the [swarm] extra): imported where it is used
    return ray.get(ref, timeout=timeout)


class LedgerWriter:
    """The swarm's only ledger writer: appends arrive one at a time (a Ray actor runs its
    methods serially), into the main repo's bench/<tag>/ledger.jsonl."""

    def __init__(self, repo_dir: str):
        self.repo = Path(repo_dir)

    def _ledger(self, tag: str) -> Any:
        return Ledger(ledger_path(self.repo, tag))

    def append(self, record: dict) -> dict:
        return self._ledger(record["tag"]).append(record)

    def records(self, tag: str) -> list[dict]:
        return self._ledger(tag).records()

    def public_key(self) -> str:
        """The key every line of this swarm is signed with (the head node's identity, as its raylet's
        $ARUN_HOME has it): each worker trusts it for the run, so it verifies the best it starts from."""
        from arun.core import trust
        return trust.public_text(trust.own_public())


class Coordinator:
    """Knows the best commit per comparability key and what every worker is running."""

    def __init__(self, repo_dir: str, run: str, base: str, ledger: Any):
        self.repo, self.run, self.base, self.ledger = Path(repo_dir), run, base, ledger
        self.keeps: dict[str, list[dict]] = {}       # key_id -> keep records (the ratchet's input)
        self.best: dict[str, dict] = {}              # key_id -> best keep record
        self.bundles: dict[str, bytes | None] = {}   # commit -> bundle on top of base (None: it is base)
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
        crash = self.crash(k, DIED.format(k=k, why=RESTARTED)) if previous else None
        return {"previous": previous, "crash": crash}

    def _load_key(self, tag: str, key_id: str) -> None:
        if key_id in self.keeps:
            return
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

    def judge(self, record: dict) -> dict:
        """The swarm's one keep rule: a keep is written as a keep only if its val_bpb is strictly lower
        than its key's verified best at the moment it reaches this coordinator (which writes one record
        at a time, so that best includes every keep written before it). A worker judged its result
        against the best it started from; one that another worker has since matched or beaten is
        written as a discard that says so (its commit stays on the worker's branch)."""
        val, key_id = record.get("val_bpb"), record.get("key_id")
        if record.get("status") != "keep" or not isinstance(val, (int, float)) or not key_id:
            return record
        self._load_key(str(record.get("tag")), key_id)
        best = self.best.get(key_id)
        if best is None:
            return record
        if val < best["val_bpb"]:
            # Better: a keep, measured from the real best (a worker that saw no best called it a baseline).
            judged = dict(record, baseline=False, best_before=best["val_bpb"])
        else:
            judged = dict(record, status="discard", baseline=False, best_before=best["val_bpb"],
                          near_miss=val - best["val_bpb"] <= NEAR_MISS,
                          superseded={"by": best.get("id"), "val_bpb": best["val_bpb"],
                                      "kept_commit": record.get("commit"),
                                      "why": "not better than the best written while it ran"})
        mine = {"status": record.get("status"), "baseline": bool(record.get("baseline")),
                "best_before": record.get("best_before")}
        if mine != {"status": judged["status"], "baseline": False, "best_before": judged["best_before"]}:
            judged["rejudged"] = mine  # what the worker had decided, for the record
        return judged

    def record(self, k: int, record: dict, bundle: bytes | None = None,
               forwards: dict[str, bytes] | None = None) -> dict:
        """Appends worker k's record (through the one writer, judged by judge()) and moves the best if it won.
        A keep made in another clone brings its commit (bundle) and its forwards home: the main repo's
        store then holds every keep's forward, for `arun audit` and for the workers that adopt it."""
        record = self.judge(record)
        if forwards and record.get("status") == "keep":
            wanted = set(forward_store.shas_of(record))
            forward_store.put_forwards(self.repo, str(record.get("backend")),
                                       {sha: data for sha, data in forwards.items() if sha in wanted})
        if bundle is not None:
            # A commit made on another machine (or clone) comes home, so the main repo holds every
            # kept commit the ledger names, and can hand it to any other worker.
            try:
                gitops.load_bundle(self.repo, bundle, commit_ref(self.run, record["commit"]))
                self.bundles[record["commit"]] = bundle
            except ArunError:
                pass
        appended = ray_get(self.ledger.append.remote(record))
        self.in_flight.pop(k, None)
        self._release_baseline(k)
        key_id = appended.get("key_id")
        if appended.get("status") == "keep" and key_id and appended.get("val_bpb") is not None:
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
        self.last_crash[k] = ray_get(self.ledger.append.remote(crash_record(info, error).to_json()))
        return self.last_crash[k]

    def _release_baseline(self, k: int) -> None:
        for key_id in [key for key, owner in self.baseline_owner.items() if owner == k]:
            del self.baseline_owner[key_id]

    # -- commits across machines
    def bundle(self, commit: str) -> bytes | None:
        """`commit` for a machine that lacks it (made here, or brought home by record())."""
        if commit not in self.bundles and gitops.commit_exists(self.repo, commit):
            self.bundles[commit] = gitops.make_bundle(self.repo, commit, self.base, commit_ref(self.run, commit))
        return self.bundles.get(commit)

    def forwards(self, record: dict) -> dict[str, bytes]:
        """The stored forwards of a keep, for a worker in another clone that adopts it (and must verify it)."""
        return forward_store.read_forwards(self.repo, record)

    def base_bundle(self) -> bytes:
        return gitops.full_bundle(self.repo, base_ref(self.run))

    def state(self) -> dict:
        return {"best": self.best, "in_flight": self.in_flight, "workers": self.workers,
                "adoptions": self.adoptions, "started_from": self.started_from,
                "bundled": sorted(self.bundles)}
