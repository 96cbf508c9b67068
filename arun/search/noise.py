"""
`arun noise`: how much does val_bpb move when nothing but the seed changes?

Runs the current best train file N times (ARUN_SEED = SEED, SEED+1, ...) through exactly
the path `arun --backend X --seeds N` takes, records nothing in the ledger (nothing was
tried), and stores the spread with the comparability key in `bench/<tag>/noise.json`:

    {"<key_id>": {"key": {...}, "commit": "...", "train_sha256": "...", "values": [...],
                  "seeds": [...], "mean": m, "std": s, "n": N, "time": "...", "wall_seconds": w}}

The significance gate (arun.search.stats) uses `std` as a floor on the spread of every comparison
for that key, and the values themselves as extra runs of the best when its train file is the
one that was measured.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from arun.core import gitops
from arun.core.context import cached_context
from arun.core.early import trajectory_std
from arun.core.errors import ArunError
from arun.core.experiment import run_experiment
from arun.core.ledger import read_records
from arun.core.numbers import finite
from arun.core.ratchet import NEAR_MISS, baseline_record, best_record
from arun.search.stats import gate
from engines.atomic import write_atomic, write_json


def noise_path(repo_dir: Path | str, tag: str) -> Path:
    return Path(repo_dir) / "bench" / tag / "noise.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _std(entry: object, field: str = "std") -> float | None:
    value = finite(entry.get(field) if isinstance(entry, dict) else None)
    return value if value is not None and 0 <= value < 1e6 else None


def load_noise(repo_dir: Path | str, tag: str, key_id: str) -> dict | None:
    """The stored noise measurement of this key, or None. Its std is never below the largest this key
    has measured before (std_floor)."""
    if not tag or not key_id:
        return None
    entry = _read(noise_path(repo_dir, tag)).get(key_id)
    if not isinstance(entry, dict):
        return None
    std, floor = _std(entry), _std(entry, "std_floor")
    if floor is not None and (std is None or floor > std):
        return {**entry, "std": floor, "measured_std": std}
    return entry if std is not None else None


def measured_spread(repo_dir: Path | str, tag: str, key_id: str) -> dict | None:
    """load_noise's entry when it measures something, else None: a std of 0 is what a baseline that
    ignores its seed gives, and every gate would read it as certainty. The one test of "is a spread
    measured" for the loop's refusal, the gates and the swarm."""
    entry = load_noise(repo_dir, tag, key_id)
    return entry if entry is not None and entry["std"] > 0 else None


def save_noise(repo_dir: Path | str, tag: str, entry: dict) -> Path:
    """Adds or replaces this key's entry, atomically (one rename). A new measurement may raise the key's
    spread but never lower it (std_floor): measured again on a later best that ignores its seed, the
    spread would be about 0 and the confirmation gate would keep anything."""
    path = noise_path(repo_dir, tag)
    data = _read(path)
    old = data.get(entry["key_id"])
    floors = [s for s in (_std(old, "std_floor"), _std(old), _std(entry)) if s is not None]
    if floors:
        entry = {**entry, "std_floor": max(floors)}
    data[entry["key_id"]] = entry
    write_json(path, data, indent=1, sort_keys=True)
    return path


def spread(values: list[float]) -> dict:
    return {"values": list(values), "n": len(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def measure_noise(repo_dir: Path | str, backend: str, seeds: int, *, budget: float | None = None,
                  device: str | None = None, hard_timeout: float | None = None, show_progress: bool = True,
                  allowance: float | None = None, of_baseline: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Runs the best train file (of_baseline: the key's baseline's, a file no agent wrote) `seeds` times
    and saves the spread; returns the stored entry. Refuses (ArunError) when the train file differs from
    the best commit: the runs restore it."""
    if seeds < 2:
        raise ArunError(f"arun noise needs at least 2 seeds to measure a spread, got {seeds}; try --seeds 5")
    repo_dir = Path(repo_dir).resolve()
    ctx = cached_context(repo_dir, backend, budget, device)
    records = read_records(repo_dir, ctx.tag, None)
    best = best_record(records, ctx.key_id)
    base = best["commit"] if best else gitops.head_sha(repo_dir)
    train_file = ctx.train_file
    current = (repo_dir / train_file).read_bytes()
    try:
        at_base = gitops.file_at(repo_dir, base, train_file)
    except Exception:  # not in this repository: run_experiment says so better
        at_base = current
    if current != at_base:
        raise ArunError(f"arun noise measures the best train file (commit {base[:10]}), but {train_file} has "
                        f"uncommitted edits that the runs would revert; run them (arun --backend {backend}) "
                        f"or revert them first")
    measured, of = current, base
    first = baseline_record(records, ctx.key_id) if of_baseline else None
    if first and first.get("commit") and first["commit"] != base:
        try:
            measured, of = gitops.file_at(repo_dir, first["commit"], train_file), first["commit"]
        except Exception:
            raise ArunError(f"the baseline's commit {first['commit'][:10]} is not in this repository; git fetch "
                            f"the branch that has it, or measure the best (arun noise without --baseline)") from None
    captured: list[dict] = []

    def sink(record: dict) -> dict:
        captured.append(record)
        return record

    def quiet(line: str) -> None:
        if not line.startswith(("arun: KEEP", "arun: DISCARD")):  # nothing was decided: no verdict
            log(line)

    t0 = time.time()
    what = "best" if of == base else "baseline"
    try:
        if measured != current:  # the baseline's bytes: the discard (or the finally) restores the best
            write_atomic(repo_dir / train_file, measured)  # (whole or not at all, on a full disk too)
        run_experiment(repo_dir, backend, f"noise: {what} over {seeds} seeds", budget=budget, seeds=seeds,
                       device=device, hard_timeout=hard_timeout, show_progress=show_progress, proposer="noise",
                       allowance=allowance,
                       record_sink=sink, decide_fn=lambda vals, best, recs: ("discard", False), log=quiet)
    finally:
        if (repo_dir / train_file).read_bytes() != current:
            write_atomic(repo_dir / train_file, current)
    rec = captured[-1]
    if rec.get("status") != "discard" or not rec.get("val_bpb_seeds"):
        raise ArunError(f"a noise run failed ({rec.get('status')}: {rec.get('error')}); see run.log, "
                        f"fix the train file and measure again")
    entry = {"key_id": rec["key_id"], "key": rec["key"], "tag": rec["tag"], "backend": backend,
             "commit": of, "train_sha256": hashlib.sha256(measured).hexdigest(),
             "seeds": rec.get("seeds"), **spread([float(v) for v in rec["val_bpb_seeds"]]),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": round(time.time() - t0, 3),
             "time_budget": rec.get("time_budget"), "device": rec.get("device"),
             # the train-loss spread at each 5 % of the budget: the early-stop margin (arun.core.early)
             "loss_trajectory_std": trajectory_std(rec.get("loss_trajectory_seeds") or [])}
    path = save_noise(repo_dir, rec["tag"], entry)
    stored = load_noise(repo_dir, rec["tag"], rec["key_id"]) or entry
    floor = (f"; the key's gate keeps the larger spread measured before, {stored['std']:.6f}"
             if stored["std"] > entry["std"] else "")
    log(f"arun: noise over {entry['n']} seeds: mean {entry['mean']:.6f}, std {entry['std']:.6f} "
        f"(min {min(entry['values']):.6f}, max {max(entry['values']):.6f}) -> {path.relative_to(repo_dir)}{floor}")
    return entry


def significance_decider(confidence: float, *, repo_dir: Path | str | None = None, noise_std: float | None = None,
                         near_miss: float = NEAR_MISS,
                         log: Callable[[str], None] | None = print) -> Callable[[list[float], dict | None, list[dict]], tuple[str, bool]]:
    """A `decide_fn` for arun.core.experiment.run_experiment: the significance gate, with the noise
    measured by `arun noise` for the best's key (bench/<tag>/noise.json under repo_dir, default
    the current directory) unless noise_std is given."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")

    def decide(vals: list[float], best: dict | None, records: list[dict]) -> tuple[str, bool]:
        noise = None
        if best is not None:
            if noise_std is not None:
                noise = {"std": noise_std}
            else:
                noise = measured_spread(Path(repo_dir) if repo_dir else Path.cwd(), best.get("tag", ""),
                                        best.get("key_id", ""))
        status, near, details = gate(vals, best, confidence, noise, near_miss)
        if log and best is not None:
            std = details.get("noise_std")
            log(f"arun: significance at {confidence:g}: {details['reason']} "
                f"({details.get('candidate_n')} run(s) vs {details.get('best_n')} of the best"
                f"{f', noise std {std:.4g}' if std is not None else ''}) -> {status}{' (near miss)' if near else ''}"
                + (f"; its {details['counted_as_one']} runs agree too closely to be seed noise and count as one "
                   "(does the train file use ARUN_SEED?)" if details.get("counted_as_one") else ""))
        return status, near

    return decide
