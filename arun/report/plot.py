"""
`arun plot`: one PNG per hardware tag, in the style of upstream's progress chart.
Each experiment is a dot over its number (discards grey, keeps green), the running
best is a step line, crashes are marked along the top edge. A tag whose ledger holds
several comparability keys (say two budgets) gets one panel per key: keys never share
an axis, since their numbers are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arun.core.ratchet import running_best, scored
from arun.report.compare import FAILED
from arun.report.history import tag_records


@dataclass
class Series:
    """What one panel shows (returned so tests and callers can check the plotted data)."""
    key_id: str
    title: str
    keep: list[tuple[int, float]] = field(default_factory=list)
    discard: list[tuple[int, float]] = field(default_factory=list)
    crash: list[int] = field(default_factory=list)
    best: list[tuple[int, float]] = field(default_factory=list)   # the running-best step line

    @property
    def points(self) -> int:
        return len(self.keep) + len(self.discard)


def series_for(records: list[dict]) -> list[Series]:
    """One Series per key, experiments numbered from 1 in ledger order."""
    by_key: dict[str, list[dict]] = {}
    for r in records:
        by_key.setdefault(r.get("key_id", "?"), []).append(r)
    out = []
    for kid, recs in by_key.items():
        key = recs[0].get("key") or {}
        title = (f"{recs[0].get('tag', '?')} - {key.get('dataset', '?')}/{key.get('profile', '?')}, "
                 f"{key.get('time_budget', 0):g}s budget")
        s = Series(kid, title)
        for n, (r, best) in enumerate(zip(recs, running_best(recs)), start=1):
            if r.get("status") == "keep" and scored(r):
                s.keep.append((n, r["val_bpb"]))
            elif r.get("status") == "discard" and scored(r):
                s.discard.append((n, r["val_bpb"]))
            elif r.get("status") in FAILED or not scored(r):
                s.crash.append(n)
            if best is not None:
                s.best.append((n, best))
        out.append(s)
    return out


def plot_records(records: list[dict], out_path: Path | str) -> list[Series]:
    """Writes the PNG for one tag's records; returns what was plotted."""
    import matplotlib.pyplot as plt
    fig, panels = draw(records)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return panels


def draw(records: list[dict]) -> tuple[Any, list[Series]]:
    """The figure (one panel per key) and what each panel shows."""
    import matplotlib  # heavy and only needed for a plot: imported when one is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    panels = series_for(records)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11.5, 4.2 * len(panels)), squeeze=False)
    for ax, s in zip(axes[:, 0], panels):
        if s.discard:
            ax.scatter(*zip(*s.discard), s=22, color="#b0b0b0", label=f"discard ({len(s.discard)})", zorder=2)
        if s.keep:
            ax.scatter(*zip(*s.keep), s=46, color="#2ca02c", edgecolor="black", linewidth=0.5,
                       label=f"keep ({len(s.keep)})", zorder=3)
        if s.best:
            xs, ys = zip(*s.best)
            last = max(n for n, _ in (s.keep + s.discard)) if s.points else xs[-1]
        if s.best and max(last, xs[-1]) > xs[0]:  # one experiment: a zero-length line, drawn nowhere, no legend entry
            ax.step(list(xs) + [max(last, xs[-1])], list(ys) + [ys[-1]], where="post", color="#2ca02c",
                    linewidth=1.5, alpha=0.8, label=f"best ({ys[-1]:.6f})", zorder=1)
        if s.crash:
            # Crashes have no val_bpb: marked on the top edge so they are counted, not hidden.
            top = blended_transform_factory(ax.transData, ax.transAxes)
            ax.scatter(s.crash, [0.97] * len(s.crash), transform=top, marker="x", color="#d62728", s=30,
                       label=f"crash/timeout/invalid ({len(s.crash)})", zorder=3, clip_on=False)
        ax.set_title(s.title)
        ax.set_xlabel("experiment")
        ax.set_ylabel("val_bpb (lower is better)")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experiments are counted: no 2.5th run
        if s.points or s.crash:
            # Outside the axes, on the right: inside, some night's points always sit under it.
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)
        if not s.points:
            ax.text(0.5, 0.5, "no scored experiments yet", transform=ax.transAxes, ha="center", color="grey")
    fig.tight_layout()  # counts the legends outside the axes: the axes shrink to make room
    return fig, panels


def plot_tags(repo_dir: Path | str, tag: str | None = None, out_dir: Path | str | None = None) -> dict[str, tuple[Path, list[Series]]]:
    """One PNG per tag: bench/<tag>/progress.png, or <out_dir>/<tag>.png."""
    records = tag_records(repo_dir, tag)
    tags: dict[str, list[dict]] = {}
    for r in records:
        tags.setdefault(r.get("tag", "unknown"), []).append(r)
    out = {}
    for t, recs in tags.items():
        path = Path(out_dir) / f"{t}.png" if out_dir else Path(repo_dir) / "bench" / t / "progress.png"
        out[t] = (path, plot_records(recs, path))
    return out
