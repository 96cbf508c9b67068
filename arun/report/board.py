"""
The leaderboard of `arun report`: one row per comparability key (hardware tag + backend + budget),
with everything a reader needs to judge a best: the test-split figure and the held-out gain, the
measured noise, the audit, the trust of the records, confinement, and the winning change itself.
Pure functions over ledger records (plus the repository's git objects for the winning diff).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from arun.core.gitops import sealed_env
from arun.core.ledger import audit_verdicts, trust_mark
from arun.core.ratchet import baseline_record, best_record, key_records, scored
from arun.report.compare import KeySummary, config_changes, summarize, unconfined
from arun.report.val_vs_test import HeldOut, held_out, heldout_bpb


@dataclass
class BoardRow:
    s: KeySummary
    base: dict | None
    best: dict | None
    test_best: float | None
    heldout: HeldOut
    crashed: int                                   # crash + timeout
    invalid: int
    per_hour: float | None
    noise: dict | None                             # bench/<tag>/noise.json's entry for the key
    audit: str
    trust: str
    confined: str
    changes: list[str] = field(default_factory=list)
    diff: str = ""
    near_misses: list[dict] = field(default_factory=list)


def train_file_at(repo_dir: Path | str, commit: str | None, path: str | None) -> str | None:
    """A train file as a commit holds it, or None when the commit (or file) is not in this repository."""
    if not commit or not path:
        return None
    out = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=repo_dir, capture_output=True, text=True,
                         env=sealed_env())
    return out.stdout if out.returncode == 0 else None


def winning_diff(repo_dir: Path | str, base: dict | None, best: dict | None) -> str:
    """The best's train file against the baseline's: from git when both commits are here, else the
    diffs the improving keeps recorded (each against the best commit when it ran), in order."""
    if not base or not best or base.get("id") == best.get("id"):
        return ""
    path = best.get("train_file")
    if path and train_file_at(repo_dir, base.get("commit"), path) is not None and \
            train_file_at(repo_dir, best.get("commit"), path) is not None:
        return subprocess.run(["git", "diff", str(base["commit"]), str(best["commit"]), "--", path], cwd=repo_dir,
                              capture_output=True, text=True, env=sealed_env()).stdout
    return "\n".join(str(r.get("diff") or "") for r in improvements(best.get("_chain") or [best]))


def improvements(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "keep" and not r.get("baseline")]


def noise_entry(repo_dir: Path | str, tag: str, key_id: str) -> dict | None:
    """bench/<tag>/noise.json's entry for the key (written by arun noise), or None."""
    try:
        data = json.loads((Path(repo_dir) / "bench" / tag / "noise.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    entry = data.get(key_id) if isinstance(data, dict) else None
    return entry if isinstance(entry, dict) and isinstance(entry.get("std"), (int, float)) else None


def audit_status(repo_dir: Path | str, tag: str, records: list[dict]) -> str:
    verdicts = audit_verdicts(Path(repo_dir) / "bench" / tag)
    mine = [verdicts[str(r.get("id"))] for r in records if str(r.get("id")) in verdicts]
    if not mine:
        return "not audited"
    failed = sum(v.startswith("failed") for v in mine)
    return f"{failed} failed of {len(mine)}" if failed else f"{len(mine)} ok"


def trust_status(records: list[dict]) -> str:
    marks = Counter(trust_mark(r) for r in records if trust_mark(r))
    return ", ".join(f"{n} {m}" for m, n in sorted(marks.items())) if marks else "all sealed here"


def near_misses(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("near_miss") and scored(r)]


def board(repo_dir: Path | str, records: list[dict]) -> list[BoardRow]:
    """One row per key, in compare's order (dataset, profile, best)."""
    rows = []
    for s in summarize(records):
        recs = key_records(records, s.key_id)
        base, best = baseline_record(recs, s.key_id), best_record(recs, s.key_id)
        if best is not None:
            upto = recs[:recs.index(best) + 1]
            best = {**best, "_chain": [r for r in upto if r.get("status") == "keep" and scored(r)]}
        n_unconfined = sum(unconfined(r) for r in recs)
        n_scored = sum(scored(r) for r in recs)
        rows.append(BoardRow(
            s=s, base=base, best=best, test_best=heldout_bpb(best), heldout=held_out(recs, s.key_id),
            crashed=sum(r.get("status") in ("crash", "timeout") for r in recs),
            invalid=sum(r.get("status") == "invalid" for r in recs),
            per_hour=s.runs / s.hours if s.hours > 0 else None,
            noise=noise_entry(repo_dir, s.tag, s.key_id), audit=audit_status(repo_dir, s.tag, recs),
            trust=trust_status(recs),
            confined="yes" if n_unconfined == 0 else f"no ({n_unconfined} of {n_scored} scored)",
            changes=config_changes((base or {}).get("config"), (best or {}).get("config")) if best and base
            and best.get("id") != base.get("id") else [],
            diff=winning_diff(repo_dir, base, best), near_misses=near_misses(recs)))
    return rows
