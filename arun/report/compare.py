"""
`arun compare`: every key's baseline, best and winning change side by side (`arun log` and
`arun show` are in arun.report.history).

Results with different comparability keys are shown next to each other, never
ranked against each other: each row is one key (hardware tag + backend + budget),
each table one dataset/profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import JustifyMethod
from rich.table import Table

from arun.core.ledger import all_records, trust_mark, trusted
from arun.core.ratchet import baseline_record, best_record, scored
from arun_data import held_out

FAILED = ("crash", "timeout", "invalid")
UNCONFINED = " (unconfined)"  # marks a result whose train process the OS did not confine
NOT_HELD_OUT_MARK = " (not held out)"  # a dataset whose val/test text the train process can read (arun_data)
NOT_HELD_OUT_STAR = "*"                # the same, after each such val_bpb in `arun log` (a footnote says it)
NOT_HELD_OUT_NOTE = (f"{NOT_HELD_OUT_STAR} not held out: the train process can read this dataset's val/test text "
                     f"(pystdlib is Python's own source), so the number may be rebuilt, not earned; prepare another "
                     f"dataset for numbers that count")


def unconfined(r: dict | None) -> bool:
    """A scored result whose train process ran without OS confinement (records older than
    confinement carry no `confined` field: they ran unconfined too)."""
    return r is not None and scored(r) and r.get("confined") is not True
STATUS_STYLE = {"keep": "bold green", "discard": "dim", "crash": "red", "timeout": "red", "invalid": "magenta"}


# --------------------------------------------------------------------------- compare

@dataclass
class KeySummary:
    key_id: str
    tag: str
    backend: str
    dataset: str
    profile: str
    time_budget: float | None
    baseline: float | None
    best: float | None
    improvement_percent: float | None
    runs: int
    kept: int
    crashed: int
    hours: float
    winning_change: str
    best_commit: str | None
    best_unconfined: bool = False
    unconfined: int = 0           # scored results of the key whose train process ran unconfined
    records: list[dict] = field(repr=False, default_factory=list)
    untrusted: int = 0           # foreign, legacy, forged, edited or audit-failed: shown, never a best


def config_changes(before: dict | None, after: dict | None) -> list[str]:
    """The constants that differ between two configs, as NAME old->new."""
    before, after = before or {}, after or {}
    out = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, "-"), after.get(name, "-")
        if a != b:
            out.append(f"{name} {a!r}->{b!r}" if name in before and name in after else f"{name} {a}->{b}")
    return out


def winning_change(baseline: dict | None, best: dict | None) -> str:
    if not baseline or not best:
        return "-"
    if best.get("id") == baseline.get("id"):
        return "baseline is best"
    changes = config_changes(baseline.get("config"), best.get("config"))
    text = ", ".join(changes) if changes else "code change (same constants)"
    return f"{text} @ {str(best.get('commit'))[:7]}"


def record_hours(r: dict) -> float:
    seconds = r.get("wall_seconds") or r.get("total_seconds") or 0.0
    return float(seconds) / 3600 if isinstance(seconds, (int, float)) else 0.0


def summarize(records: list[dict]) -> list[KeySummary]:
    """One summary per comparability key found in the records."""
    by_key: dict[str, list[dict]] = {}
    for r in records:
        if r.get("key_id"):
            by_key.setdefault(r["key_id"], []).append(r)
    out = []
    for kid, recs in by_key.items():
        key = recs[0].get("key") or {}
        base, best = baseline_record(recs, kid), best_record(recs, kid)
        b0, b1 = (base or {}).get("val_bpb"), (best or {}).get("val_bpb")
        improvement = 100.0 * (b0 - b1) / b0 if b0 and b1 is not None else None
        out.append(KeySummary(
            key_id=kid, tag=recs[0].get("tag") or key.get("hardware", "?"),
            backend=recs[0].get("backend") or key.get("backend", "?"),
            dataset=str(key.get("dataset", "?")), profile=str(key.get("profile", "?")),
            time_budget=key.get("time_budget"), baseline=b0, best=b1, improvement_percent=improvement,
            runs=len(recs), kept=sum(r.get("status") == "keep" for r in recs),
            crashed=sum(r.get("status") in FAILED for r in recs), hours=sum(record_hours(r) for r in recs),
            winning_change=winning_change(base, best), best_commit=(best or {}).get("commit"), records=recs,
            untrusted=sum(not trusted(r) for r in recs),
            best_unconfined=unconfined(best), unconfined=sum(unconfined(r) for r in recs)))
    return sorted(out, key=lambda s: (s.dataset, s.profile, s.best if s.best is not None else float("inf")))


def fmt_number(v: float | None, fmt: str = "{:.6f}") -> str:
    return "-" if v is None else fmt.format(v)


def compare_tables(summaries: list[KeySummary]) -> list[Table]:
    """A table per dataset/profile, a row per hardware tag + backend (+ budget when several)."""
    groups: dict[tuple[str, str], list[KeySummary]] = {}
    for s in summaries:
        groups.setdefault((s.dataset, s.profile), []).append(s)
    tables = []
    for (dataset, profile), rows in groups.items():
        mark = NOT_HELD_OUT_MARK if not held_out(dataset) else ""
        table = Table(title=f"{dataset} / {profile}{mark}", title_style="bold", expand=False)
        columns: list[tuple[str, JustifyMethod]] = [("hardware tag", "left"), ("backend", "left"), ("budget", "right"),
                          ("baseline", "right"), ("best", "right"), ("improvement", "right"),
                          ("run", "right"), ("kept", "right"), ("crashed", "right"), ("unconfined", "right"),
                          ("hours", "right"),
                          ("winning change", "left")]
        for col, just in columns:
            table.add_column(col, justify=just, overflow="fold")
        for s in rows:
            best = fmt_number(s.best) + (UNCONFINED if s.best_unconfined else "")
            table.add_row(s.tag, s.backend, fmt_number(s.time_budget, "{:g}s"), fmt_number(s.baseline), best,
                          fmt_number(s.improvement_percent, "{:.2f}%"), str(s.runs), str(s.kept), str(s.crashed),
                          str(s.unconfined), f"{s.hours:.2f}", s.winning_change + _untrusted_note(s))
        tables.append(table)
    return tables


def _untrusted_note(s: KeySummary) -> str:
    marks = sorted({trust_mark(r) for r in s.records} - {""})
    return f" ({s.untrusted} not believed: {', '.join(marks)})" if s.untrusted else ""


def compare(repo_dir: Path | str, refs: tuple[str, ...] | list[str] = ()) -> list[KeySummary]:
    return summarize(all_records(repo_dir, refs))
