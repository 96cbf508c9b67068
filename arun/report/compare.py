"""
Reading the ledgers back: `arun compare` (every key side by side), `arun log` (one
ledger's experiments), `arun show ID` (one record with its diff).

Results with different comparability keys are shown next to each other, never
ranked against each other: each row is one key (hardware tag + backend + budget),
each table one dataset/profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from arun.core.errors import ArunError
from arun.core.ledger import Ledger, all_records, ledger_path, ledgers_in, trust_mark, trusted
from arun.core.ratchet import baseline_record, best_record, scored
from arun_data import held_out, not_held_out

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
    return bool(r) and scored(r) and r.get("confined") is not True
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


def _f(v: float | None, fmt: str = "{:.6f}") -> str:
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
        for col, just in [("hardware tag", "left"), ("backend", "left"), ("budget", "right"),
                          ("baseline", "right"), ("best", "right"), ("improvement", "right"),
                          ("run", "right"), ("kept", "right"), ("crashed", "right"), ("unconfined", "right"),
                          ("hours", "right"),
                          ("winning change", "left")]:
            table.add_column(col, justify=just, overflow="fold")
        for s in rows:
            best = _f(s.best) + (UNCONFINED if s.best_unconfined else "")
            table.add_row(s.tag, s.backend, _f(s.time_budget, "{:g}s"), _f(s.baseline), best,
                          _f(s.improvement_percent, "{:.2f}%"), str(s.runs), str(s.kept), str(s.crashed),
                          str(s.unconfined), f"{s.hours:.2f}", s.winning_change + _untrusted_note(s))
        tables.append(table)
    return tables


def _untrusted_note(s: KeySummary) -> str:
    marks = sorted({trust_mark(r) for r in s.records} - {""})
    return f" ({s.untrusted} not believed: {', '.join(marks)})" if s.untrusted else ""


def compare(repo_dir: Path | str, refs: tuple[str, ...] | list[str] = ()) -> list[KeySummary]:
    return summarize(all_records(repo_dir, refs))


# --------------------------------------------------------------------------- log

def tag_records(repo_dir: Path | str, tag: str | None) -> list[dict]:
    """Records of one tag's ledger, or of every ledger under bench/ when tag is None."""
    if tag is not None:
        path = ledger_path(repo_dir, tag)
        if not path.exists():
            known = ", ".join(p.parent.name for p in ledgers_in(repo_dir)) or "none yet"
            raise ArunError(f"no ledger for tag {tag!r} at {path}; tags here: {known}")
        return Ledger(path).records()
    return all_records(repo_dir)


@dataclass
class LogRow:
    n: int
    id: str
    tag: str
    key: str                     # short key id + budget, to tell keys of one tag apart
    status: str
    val_bpb: float | None
    delta: float | None          # val_bpb minus the best kept result of the key before this run
    baseline: bool
    description: str
    commit: str | None
    mark: str = ""               # why the record is not believed ("" when it is)
    unconfined: bool = False
    not_held_out: bool = False


def log_rows(records: list[dict]) -> list[LogRow]:
    """Ledger order; Δ is against the best of the same key before each experiment (what it had to beat)."""
    best_so_far: dict[str, float] = {}
    counts: dict[str, int] = {}
    rows = []
    for r in records:
        kid = r.get("key_id", "")
        counts[kid] = counts.get(kid, 0) + 1
        before = best_so_far.get(kid)
        val = r.get("val_bpb") if scored(r) else None
        delta = val - before if val is not None and before is not None else None
        if r.get("status") == "keep" and val is not None and trusted(r) and (before is None or val < before):
            best_so_far[kid] = val
        budget = (r.get("key") or {}).get("time_budget")
        short = f"{kid[:6]} {budget:g}s" if isinstance(budget, (int, float)) else kid[:6]
        rows.append(LogRow(counts[kid], str(r.get("id", "?")), str(r.get("tag", "?")), short, str(r.get("status", "?")),
                           val, delta, bool(r.get("baseline")) and r.get("status") == "keep",
                           str(r.get("description") or ""), r.get("commit"), trust_mark(r), unconfined(r),
                           not_held_out(r)))
    return rows


def log_table(rows: list[LogRow], show_tag: bool, show_key: bool | None = None) -> Table:
    """`#` counts experiments per key (as the plot's x axis); with several keys a key column says which."""
    if show_key is None:
        show_key = len({r.key for r in rows}) > 1
    table = Table(expand=False)
    for col, just in [("#", "right"), ("id", "left")] + ([("tag", "left")] if show_tag else []) + (
            [("key", "left")] if show_key else []) + [
            ("status", "left"), ("val_bpb", "right"), ("Δ vs best", "right"), ("commit", "left"),
            ("description", "left")]:
        # Ids and numbers are copied into `arun show`: never broken across lines; text folds.
        table.add_column(col, justify=just, overflow="fold", no_wrap=col not in ("tag", "description", "key"))
    for row in rows:
        delta = "baseline" if row.baseline else ("-" if row.delta is None else f"{row.delta:+.6f}")
        status = Text(row.status + (UNCONFINED if row.unconfined else ""), style=STATUS_STYLE.get(row.status, ""))
        if row.mark:
            status.append(f" [{row.mark}]", style="bold red" if row.mark != "foreign" else "yellow")
        cells = [str(row.n), row.id] + ([row.tag] if show_tag else []) + ([row.key] if show_key else []) + [
            status, _f(row.val_bpb) + (NOT_HELD_OUT_STAR if row.not_held_out and row.val_bpb is not None else ""), delta, (row.commit or "")[:7], row.description]
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------- show

def find_record(records: list[dict], ident: str) -> dict:
    """The record whose id is `ident`, starts with it (unique prefix) or ends with it (the suffix the
    output prints, e.g. 850a)."""
    exact = [r for r in records if r.get("id") == ident]
    if exact:
        return exact[-1]
    hits = [r for r in records if str(r.get("id", "")).startswith(ident) or str(r.get("id", "")).endswith(ident)]
    if not hits:
        raise ArunError(f"no experiment with id {ident!r}; list them with arun log")
    if len({r["id"] for r in hits}) > 1:
        ids = sorted({r["id"] for r in hits})
        raise ArunError(f"id {ident!r} matches {len(ids)} experiments ({', '.join(ids[:5])}"
                        f"{', ...' if len(ids) > 5 else ''}); give more of the id")
    return hits[0]


SHOW_FIELDS = ["id", "time", "tag", "backend", "key_id", "_trust", "status", "baseline", "val_bpb", "val_bpb_seeds",
               "test_bpb", "test_bpb_seeds", "best_before", "near_miss", "confined", "confinement", "description", "error", "commit", "parent_commit", "branch",
               "train_file", "train_sha256", "seeds", "proposer", "claimed_val_bpb", "artifact_sha256", "training_seconds",
               "charged_seconds", "allowance_seconds", "total_seconds", "wall_seconds", "startup_seconds",
               "warmup_seconds", "export_seconds", "eval_seconds", "score_seconds", "bookkeeping_seconds",
               "overhead_seconds", "peak_memory_mb", "mfu_percent", "total_tokens", "num_steps", "num_params"]


def _fmt_value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, list):
        return ", ".join(_fmt_value(x) for x in v) or "-"
    return "-" if v is None else str(v)


def show_renderables(rec: dict) -> list[RenderableType]:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name in SHOW_FIELDS:
        if name in rec:
            value = _fmt_value(rec[name])
            if name == "_trust":
                grid.add_row("trust", Text(value, style="" if value == "ok" else "bold red"))
            elif name == "status":
                grid.add_row(name, Text(value, style=STATUS_STYLE.get(value, "")))
            else:
                grid.add_row(name, value)
    key = rec.get("key") or {}
    grid.add_row("key", ", ".join(f"{k}={v}" for k, v in key.items() if not str(k).endswith("sha256")
                                  and k != "dataset_fingerprint"))
    config = rec.get("config") or {}
    if config:
        grid.add_row("config", ", ".join(f"{k}={v!r}" for k, v in config.items()))
    diff = rec.get("diff") or ""
    parts: list[RenderableType] = [grid, Text("")]
    if diff.strip():
        base = f"{str(rec['diff_base'])[:10]} (the best commit of this key when it ran)" if rec.get("diff_base") \
            else "the best commit of this key when it ran"
        parts += [Text(f"diff against {base}", style="bold"),
                  Syntax(diff, "diff", theme="ansi_dark", word_wrap=True)]
    else:
        parts.append(Text("(the train file was identical to the best commit)", style="dim"))
    return [Group(*parts)]
