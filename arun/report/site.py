"""
`arun report`: a self-contained static site from every ledger under bench/ (and on --ref refs).

    <out>/index.html          leaderboards, winning changes, transfers, one section per tag
    <out>/assets/plotly.js    the charting library, local (the page needs no network)
    <out>/assets/style.css

Tables and diffs are plain HTML (readable without JavaScript); only the charts need plotly.js.
Every string from a ledger goes through html.escape: descriptions and diffs are agent-written.
"""

from __future__ import annotations

import html
import re
import time
from dataclasses import dataclass
from pathlib import Path

from arun.core.ledger import all_records, trust_mark
from arun.report.board import BoardRow, board
from arun.report.charts import chart_html, plotly_js
from arun.report.signers import signer_lines
from arun.report.summary import policy_counts, policy_line
from arun.report.transfers import TransferRow, transfer_rows

ASSETS = "assets"
STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; } table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
.wide { overflow-x: auto; } table.leaderboard { font-size: 13px; }
table.leaderboard td:last-child { min-width: 220px; overflow-wrap: anywhere; }
pre.diff { background: #fafafa; border: 1px solid #ddd; padding: 8px; overflow-x: auto; font-size: 12px; }
.add { color: #116611; } .del { color: #aa1111; } .hunk { color: #555599; }
.bad { color: #aa1111; font-weight: bold; } .note { color: #666; font-size: 12px; }
"""


@dataclass
class Site:
    index: Path
    rows: list[BoardRow]
    transfers: list[TransferRow]
    charts: int


def e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def num(v: float | None, fmt: str = "{:.6f}") -> str:
    return "-" if v is None else fmt.format(v)


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-") or "x"


def cells(values: list[str], header: bool = False, text_cols: tuple[int, ...] = ()) -> str:
    """One table row; values are already escaped HTML."""
    tag = "th" if header else "td"
    return "<tr>" + "".join(f"<{tag}{' class=text' if i in text_cols else ''}>{v}</{tag}>"
                            for i, v in enumerate(values)) + "</tr>\n"


def diff_html(diff: str) -> str:
    """A unified diff, escaped, with added and removed lines coloured."""
    out = []
    for line in diff.splitlines():
        cls = "hunk" if line.startswith("@@") else "add" if line.startswith("+") and not line.startswith("+++") \
            else "del" if line.startswith("-") and not line.startswith("---") else ""
        out.append(f'<span class="{cls}">{e(line)}</span>' if cls else e(line))
    return '<pre class="diff">' + "\n".join(out) + "</pre>"


BOARD_COLUMNS = ["hardware tag", "backend", "budget", "baseline val_bpb", "best val_bpb", "test_bpb of best",
                 "held-out gain (val / test)", "improvement", "run", "kept", "crashed", "invalid", "per hour", "hours",
                 "noise (std)", "audit", "trust", "confined", "winning change"]


def board_row(row: BoardRow) -> str:
    s, h = row.s, row.heldout
    gains = f"{num(h.val_gain, '{:+.6f}')} / {num(h.test_gain, '{:+.6f}')}"
    if h.not_real or h.unconfirmed:
        gains += ' <span class="bad">not confirmed on test</span>'
    noise = num(row.noise["std"], "{:.6f}") + f" (n={row.noise.get('n', '?')})" if row.noise else "not measured"
    trust = e(row.trust) if row.trust == "all sealed here" else f'<span class="bad">{e(row.trust)}</span>'
    audit = f'<span class="bad">{e(row.audit)}</span>' if "failed" in row.audit else e(row.audit)
    change = "baseline is best" if row.best and row.base and row.best.get("id") == row.base.get("id") else \
        (e(", ".join(row.changes)) or ("code change" if row.best else "-"))
    return cells([e(s.tag), e(s.backend), num(s.time_budget, "{:g}s"), num(s.baseline), num(s.best),
                  num(row.test_best), gains, num(s.improvement_percent, "{:.2f}%"), str(s.runs), str(s.kept),
                  str(row.crashed), str(row.invalid), num(row.per_hour, "{:.1f}"), f"{s.hours:.2f}", noise, audit,
                  trust, e(row.confined), change], text_cols=(0, 1, 14, 15, 16, 17, 18))


def leaderboards(rows: list[BoardRow]) -> str:
    groups: dict[tuple[str, str], list[BoardRow]] = {}
    for row in rows:
        groups.setdefault((row.s.dataset, row.s.profile), []).append(row)
    parts = []
    for (dataset, profile), group in groups.items():
        parts.append(f'<h2 id="board-{slug(dataset + "-" + profile)}">Leaderboard: {e(dataset)} / {e(profile)}</h2>')
        parts.append('<div class="wide"><table class="leaderboard">\n' + cells([e(c) for c in BOARD_COLUMNS], header=True,
                                                             text_cols=(0, 1, 14, 15, 16, 17, 18)))
        parts += [board_row(r) for r in group]
        parts.append("</table></div>")
        parts.append('<p class="note">A key is hardware tag + backend + data + budget; rows are never ranked '
                     'against each other across keys. Only records signed by a key this repo trusts count as a '
                     'best (this machine\'s, and bench/trusted_keys\'; others show as foreign).</p>')
        for r in group:
            if r.best and r.base and r.best.get("id") != r.base.get("id"):
                parts.append(f'<h3 class="winning">Winning change on {e(r.s.tag)} ({e(r.s.backend)}): '
                             f'{e(", ".join(r.changes) or "code change")} '
                             f'@ {e(str(r.best.get("commit"))[:10])}</h3>')
                parts.append(f'<p class="description">id {e(r.best.get("id"))}: {e(r.best.get("description"))}</p>')
                parts.append(diff_html(r.diff) if r.diff.strip() else '<p class="note">(no diff recorded)</p>')
    return "\n".join(parts)


TRANSFER_COLUMNS = ["from tag", "source id", "source commit", "gain there", "here (tag, backend)", "id here",
                    "status here", "constants applied", "gain here"]


def transfer_table(rows: list[TransferRow]) -> str:
    if not rows:
        return ""
    out = ['<h2 id="transfers">Transfers: one machine\'s winner on another</h2>', '<table class="transfers">',
           cells([e(c) for c in TRANSFER_COLUMNS], header=True, text_cols=(0, 1, 2, 4, 5, 6, 7))]
    for t in rows:
        there = f"{num(t.gain_there, '{:+.6f}')} ({num(t.gain_there_percent, '{:+.2f}%')})"
        if t.source_mark:
            there += f" [{e(t.source_mark)}]"
        out.append(cells([e(t.source_tag), e(t.source_id), e(t.source_commit), there,
                          f"{e(t.here_tag)}, {e(t.here_backend)}", e(t.here_id), e(t.status), e(t.changes),
                          f"{num(t.gain_here, '{:+.6f}')} ({num(t.gain_here_percent, '{:+.2f}%')})"],
                         text_cols=(0, 1, 2, 4, 5, 6, 7)))
    out.append("</table>")
    out.append('<p class="note">gain there: the winner against its own key\'s baseline; gain here: the transferred '
               'change against the best it had to beat on this machine (negative: a loss).</p>')
    return "\n".join(out)


def near_miss_list(rows: list[BoardRow]) -> str:
    items = [(r, m) for r in rows for m in r.near_misses]
    if not items:
        return '<p class="note">no near-misses</p>'
    out = ["<h3>Near-misses</h3>", '<table class="near-misses">',
           cells(["id", "val_bpb", "best before", "description"], header=True, text_cols=(0, 3))]
    for _, m in items:
        out.append(cells([e(m.get("id")), num(m.get("val_bpb")), num(m.get("best_before")), e(m.get("description"))],
                         text_cols=(0, 3)))
    return "\n".join(out + ["</table>"])


def tag_sections(rows: list[BoardRow]) -> tuple[str, int]:
    by_tag: dict[str, list[BoardRow]] = {}
    for row in rows:
        by_tag.setdefault(row.s.tag, []).append(row)
    parts, n = [], 0
    for tag, group in by_tag.items():
        parts.append(f'<h2 id="tag-{slug(tag)}">{e(tag)}</h2>')
        for row in group:
            s = row.s
            title = f"{s.tag} ({s.backend}) - {s.dataset}/{s.profile}, {num(s.time_budget, '{:g}s')} budget"
            n += 1
            std = row.noise["std"] if row.noise else None
            parts.append(f'<div class="chart">{chart_html(s.records, title, f"chart-{n}", std)}</div>')
            policy = policy_counts(s.records)  # stopped-early discards and confirmations (arun summary's line)
            if policy["stopped_early"] or any(policy["confirmations"].values()):
                parts.append(f'<p class="note">{e(policy_line(policy))}.</p>')
            signed = signer_lines(s.records)
            if signed:
                parts.append('<p class="note">' + "<br>".join(e(line) for line in signed) + '</p>')
            marks = sum(1 for r in s.records if trust_mark(r))
            if marks:
                parts.append(f'<p class="note">{marks} record(s) not believed ({e(row.trust)}): shown, never a best.</p>')
        parts.append(near_miss_list(group))
    return "\n".join(parts), n


def page(rows: list[BoardRow], transfers: list[TransferRow], sources: str) -> tuple[str, int]:
    sections, charts = tag_sections(rows)
    body = leaderboards(rows) if rows else "<p>No experiments yet: bench/*/ledger.jsonl is empty.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>arun report</title>
<link rel="stylesheet" href="{ASSETS}/style.css">
<script src="{ASSETS}/plotly.js"></script>
</head><body>
<h1>arun report</h1>
<p class="note">Made {e(time.strftime("%Y-%m-%d %H:%M %Z"))} from {e(sources)}.</p>
{body}
{transfer_table(transfers)}
{sections}
</body></html>
""", charts


def build_site(repo_dir: Path | str, out_dir: Path | str, refs: tuple[str, ...] | list[str] = ()) -> Site:
    """Writes the site; returns what it shows (for the command's summary and for tests)."""
    records = all_records(repo_dir, refs)
    rows = board(repo_dir, records)
    transfers = transfer_rows(records)
    sources = "bench/*/ledger.jsonl" + "".join(f", {r}" for r in refs)
    text, charts = page(rows, transfers, sources)
    out = Path(out_dir)
    (out / ASSETS).mkdir(parents=True, exist_ok=True)
    (out / ASSETS / "style.css").write_text(STYLE)
    js = out / ASSETS / "plotly.js"
    source = plotly_js()
    if not js.exists() or js.read_text() != source:
        js.write_text(source)
    (out / "index.html").write_text(text, encoding="utf-8")
    return Site(out / "index.html", rows, transfers, charts)

