"""
The interactive progress chart of `arun report`, one per comparability key, drawn by plotly: every
experiment over its number (discards grey, keeps green, failures as red crosses along the top),
the running best as a step line, the measured noise as a band around it; hovering a point shows
its id, status, val_bpb and description.

Every string from a ledger is HTML-escaped before plotly sees it: descriptions are agent-written,
and plotly renders a subset of HTML in hover text and embeds the data in a <script>.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from arun.core.ratchet import running_best, scored

if TYPE_CHECKING:
    import plotly.graph_objects as go

COLORS = {"keep": "#2ca02c", "discard": "#9a9a9a", "failed": "#d62728", "best": "#2ca02c"}


def _hover(n: int, r: dict) -> str:
    val = f"{r['val_bpb']:.6f}" if scored(r) else "no score"
    text = html.escape(str(r.get("description") or "")[:160])
    why = html.escape(str(r.get("error") or "")[:120])
    return (f"#{n} {html.escape(str(r.get('id', '?')))}<br>{html.escape(str(r.get('status', '?')))}: {val}"
            f"<br>{text}" + (f"<br>{why}" if why else ""))


def figure(records: list[dict], title: str, noise_std: float | None = None) -> go.Figure:
    """The plotly Figure of one key's records (ledger order)."""
    import plotly.graph_objects as go  # heavy: imported when a chart is drawn

    groups: dict[str, tuple[list, list, list]] = {"keep": ([], [], []), "discard": ([], [], []), "failed": ([], [], [])}
    for n, r in enumerate(records, start=1):
        group = r["status"] if scored(r) and r.get("status") in ("keep", "discard") else "failed"
        xs, ys, texts = groups[group]
        xs.append(n)
        ys.append(r["val_bpb"] if group != "failed" else None)
        texts.append(_hover(n, r))
    vals = [r["val_bpb"] for r in records if scored(r)]
    top = max(vals) if vals else 1.0
    fig = go.Figure()
    best = running_best(records)
    steps = [(n, b) for n, b in enumerate(best, start=1) if b is not None]
    step_xs, step_ys = zip(*steps) if steps else ((), ())
    if steps and noise_std:
        fig.add_trace(go.Scatter(x=step_xs, y=[y + noise_std for y in step_ys], mode="lines",
                                 line=dict(width=0, shape="hv"), hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=step_xs, y=[y - noise_std for y in step_ys], mode="lines",
                                 line=dict(width=0, shape="hv"), fill="tonexty", fillcolor="rgba(44,160,44,0.15)",
                                 hoverinfo="skip", name=f"noise ±{noise_std:.4f}"))
    if steps:
        fig.add_trace(go.Scatter(x=step_xs, y=step_ys, mode="lines", line=dict(color=COLORS["best"], shape="hv", width=2),
                                 name=f"running best ({step_ys[-1]:.6f})", hoverinfo="skip"))
    for group, (xs, ys, texts) in groups.items():
        if not xs:
            continue
        if group == "failed":
            ys = [top] * len(xs)  # no val_bpb: marked along the top, counted, not hidden
        marker = dict(color=COLORS[group], size=9 if group == "keep" else 7,
                      symbol="x" if group == "failed" else "circle",
                      line=dict(width=1, color="black") if group == "keep" else dict(width=0))
        label = "crash/timeout/invalid" if group == "failed" else group
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=marker, name=f"{label} ({len(xs)})",
                                 hovertext=texts, hoverinfo="text"))
    fig.update_layout(title=dict(text=html.escape(title), font=dict(size=14)), height=360,
                      margin=dict(l=60, r=20, t=50, b=40), template="plotly_white",
                      legend=dict(orientation="h", yanchor="top", y=-0.15, x=0),
                      xaxis=dict(title="experiment", tickformat="d", dtick=max(1, len(records) // 10)),
                      yaxis=dict(title="val_bpb (lower is better)"))
    return fig


def chart_html(records: list[dict], title: str, div_id: str, noise_std: float | None = None) -> str:
    """The chart as a <div> plus its script; plotly.js itself is loaded once by the page."""
    import plotly.io as pio
    return pio.to_html(figure(records, title, noise_std), full_html=False, include_plotlyjs=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True})


def plotly_js() -> str:
    """plotly.js as the installed plotly ships it: the page's one local asset (no CDN, works offline)."""
    from plotly.offline import get_plotlyjs
    return get_plotlyjs()
