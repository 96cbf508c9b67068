"""
The ledger record: the one schema of a line of bench/<tag>/ledger.jsonl.

Every record the harness writes is built here (a run of the train file, an attempt that was
not run, an experiment whose swarm worker died), so the three kinds carry the same fields.
The JSON field names are the ledger's format and never change; fields this version does not
know (a newer or older arun wrote them) ride along in `extra`, so a record survives a round trip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field

from arun.core.context import ExperimentContext

STATUSES = ("keep", "discard", "crash", "timeout", "invalid")


@dataclass
class Record:
    # who and what
    id: str | None = None
    time: str | None = None
    key: dict | None = None
    key_id: str | None = None
    tag: str | None = None
    backend: str | None = None
    hardware: dict | None = None
    branch: str | None = None
    commit: str | None = None
    parent_commit: str | None = None
    train_file: str | None = None
    train_sha256: str | None = None
    diff: str = ""
    diff_base: str | None = None
    description: str = ""
    # the decision
    status: str | None = None
    baseline: bool = False
    val_bpb: float | None = None
    val_bpb_seeds: list = field(default_factory=list)
    proposer: str | None = None
    near_miss: bool = False
    config: dict | None = None
    time_budget: float | None = None
    device: str | None = None
    confidence: float | None = None
    error: str | None = None
    best_before: float | None = None
    run_dir: str | None = None
    confined: bool | None = None     # the train process ran under OS confinement (None: nothing ran)
    confinement: str | None = None   # how ("landlock ABI 7"), or why not
    # what was measured (seconds are totals over the experiment's seeds)
    seeds: list = field(default_factory=list)
    training_seconds: float | None = None
    total_seconds: float | None = None
    launch_seconds: float | None = None
    startup_seconds: float | None = None
    warmup_seconds: float | None = None
    eval_seconds: float | None = None
    peak_memory_mb: float | None = None
    mfu_percent: float | None = None
    total_tokens: int | None = None
    tokens_per_second: float | None = None
    num_steps: int | None = None
    num_params: int | None = None
    depth: int | None = None
    wall_seconds: float | None = None
    bookkeeping_seconds: float | None = None
    overhead_seconds: float | None = None
    # claims of the train process, used only to stop a run early, never to keep one (arun.core.early)
    loss_trajectory: list = field(default_factory=list)   # train loss at 5 %, 10 %, ... 100 % of the budget
    stopped_at: float | None = None     # a discard stopped early: the progress (%) it was stopped at
    confirmation: dict | None = None    # a near win re-run with fresh seeds: verdict, seeds, p-value
    extra: dict = field(default_factory=dict)  # anything else: claimed_val_bpb, verify_seconds, swarm, agent_*, ...

    def to_json(self) -> dict:
        """The ledger line as a dict (id and time left out until the ledger stamps them)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for name in ("id", "time"):
            if out[name] is None:
                del out[name]
        # A reader's in-memory marks (the trust of a record, "_trust") never become part of a line.
        out.update({k: v for k, v in self.extra.items() if not str(k).startswith("_")})
        return out

    @classmethod
    def from_json(cls, data: dict) -> Record:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rec = cls(**{k: v for k, v in data.items() if k in known})
        rec.extra = {k: v for k, v in data.items() if k not in known and not str(k).startswith("_")}
        return rec

    def update(self, values: dict) -> None:
        """Sets fields by name; a name the schema does not have goes to `extra`."""
        for name, value in values.items():
            if name != "extra" and hasattr(self, name):
                setattr(self, name, value)
            else:
                self.extra[name] = value


def _identity(ctx: ExperimentContext | dict) -> dict:
    """The fields every record of a key shares: from the context, or from a worker's in-flight dict."""
    get = ctx.get if isinstance(ctx, dict) else (lambda name: getattr(ctx, name, None))
    return {"key": get("key"), "key_id": get("key_id"), "tag": get("tag"), "backend": get("backend"),
            "hardware": get("hardware"), "train_file": get("train_file"), "time_budget": get("budget"),
            "device": get("device")}


def experiment_record(ctx: ExperimentContext, *, id: str, branch: str, head: str, base: str, train: bytes,
                      diff: str, description: str, best: dict | None, proposer: str | None, config: dict,
                      confidence: float | None) -> Record:
    """The record of an experiment about to run: undecided, nothing measured yet."""
    return Record(id=id, **_identity(ctx), branch=branch, parent_commit=head, commit=None,
                  train_sha256=hashlib.sha256(train).hexdigest(), diff=diff, diff_base=base,
                  description=description, baseline=best is None, proposer=proposer, config=config,
                  confidence=confidence)


def invalid_record(ctx: ExperimentContext, *, id: str, branch: str | None, head: str, base: str, train: bytes,
                   diff: str, description: str, best: dict | None, proposer: str, config: dict, error: str,
                   seconds: float, extra: dict | None = None) -> Record:
    """An attempt that was not run (the proposer failed, changed other files, changed nothing, ...)."""
    rec = Record(id=id, **_identity(ctx), branch=branch, commit=base, parent_commit=head,
                 train_sha256=hashlib.sha256(train).hexdigest(), diff=diff, diff_base=base, description=description,
                 status="invalid", proposer=proposer, config=config, error=error, total_seconds=0.0,
                 wall_seconds=seconds, best_before=best["val_bpb"] if best else None)
    rec.update({"proposer_seconds": seconds, **(extra or {})})
    return rec


def crash_record(info: dict, error: str) -> Record:
    """An experiment whose swarm worker died: measured fields null, diff and description as far as the
    worker had reported them (`info` is what it reported: the key's fields and the run's so far)."""
    parent = info.get("parent_commit")
    rec = Record(**_identity(info), branch=info.get("branch"), commit=parent, parent_commit=parent, diff_base=parent,
                 train_sha256=info.get("train_sha256"), diff=info.get("diff", ""),
                 description=info.get("description") or "(experiment in flight when its worker died)",
                 status="crash", baseline=bool(info.get("baseline", False)),
                 total_seconds=round(time.time() - info["since"], 3) if info.get("since") else None,
                 error=error, proposer=info.get("proposer"), config=info.get("config"))
    rec.update({"swarm": info.get("swarm")})
    return rec

