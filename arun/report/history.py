"""
Reading one ledger back: `arun log` (its experiments in order, each against the best of its key
before it) and `arun show ID` (one record with its diff).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Group, JustifyMethod, RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from arun.core.errors import ArunError
from arun.core.ledger import Ledger, all_records, ledger_path, ledgers_in, trust_mark, trusted
from arun.core.ratchet import scored
from arun.report.compare import NOT_HELD_OUT_STAR, STATUS_STYLE, UNCONFINED, fmt_number, unconfined
from arun_data import not_held_out

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
    columns: list[tuple[str, JustifyMethod]] = [
        ("#", "right"), ("id", "left"), ("tag", "left"), ("key", "left"), ("status", "left"), ("val_bpb", "right"),
        ("Δ vs best", "right"), ("commit", "left"), ("description", "left")]
    shown = [show_tag if col == "tag" else show_key if col == "key" else True for col, _ in columns]
    for (col, just), show in zip(columns, shown):
        if show:  # Ids and numbers are copied into `arun show`: never broken across lines; text folds.
            table.add_column(col, justify=just, overflow="fold", no_wrap=col not in ("tag", "description", "key"))
    for row in rows:
        delta = "baseline" if row.baseline else ("-" if row.delta is None else f"{row.delta:+.6f}")
        status = Text(row.status + (UNCONFINED if row.unconfined else ""), style=STATUS_STYLE.get(row.status, ""))
        if row.mark:
            status.append(f" [{row.mark}]", style="bold red" if row.mark != "foreign" else "yellow")
        cells: list[RenderableType] = [
            str(row.n), row.id, row.tag, row.key, status,
            fmt_number(row.val_bpb) + (NOT_HELD_OUT_STAR if row.not_held_out and row.val_bpb is not None else ""),
            delta, (row.commit or "")[:7], row.description]
        table.add_row(*(cell for cell, show in zip(cells, shown) if show))
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
