"""
`arun summary`: the morning report. Pure functions over ledger records.

Per comparability key (hardware tag + data + budget): how many experiments, how they
ended, the best val_bpb against the key's baseline (and against the best when the period
began), the changes that helped most, and the hours spent.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from arun.core.ledger import trust_mark, trusted
from arun.core.numbers import finite
from arun.core.ratchet import NO_SPREAD, WITHIN_NOISE, baseline_record, best_record, scored
from arun.report.val_vs_test import held_out, heldout_lines
from arun_data import held_out as dataset_held_out

STATUS_ORDER = ("keep", "discard", "crash", "timeout", "invalid")


def parse_time(text: str | None) -> datetime | None:
    """A record's time ('2025-03-05T22:14:03+0100') or a user's --since ('2025-03-05', '2025-03-05T22:00',
    with or without a zone; no zone means local time). None when unparseable."""
    if not text:
        return None
    s = str(text).strip()
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M%z"):
        try:
            return datetime.strptime(s, fmt)
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.astimezone()  # naive: the local zone


def select(records: list[dict], tag: str | None = None, since: datetime | None = None) -> list[dict]:
    out = []
    for r in records:
        if tag and r.get("tag") != tag:
            continue
        if since is not None:
            t = parse_time(r.get("time"))
            if t is None or t < since:
                continue
        out.append(r)
    return out


def _seconds(r: dict) -> float:
    for name in ("wall_seconds", "total_seconds"):
        v = finite(r.get(name))
        if v is not None:
            return v
    return 0.0


def summarize(period: list[dict], history: list[dict] | None = None) -> list[dict]:
    """One dict per key of the records in `period`; `history` (default: period) holds every record
    of those keys, so the baseline and the best before the period are found even when older."""
    history = history if history is not None else period
    by_key: dict[str, list[dict]] = {}
    for r in period:
        by_key.setdefault(r.get("key_id") or "?", []).append(r)
    out = []
    for kid, recs in by_key.items():
        hist = [r for r in history if r.get("key_id") == kid] or recs
        period_ids = {r.get("id") for r in recs}
        first = next((i for i, r in enumerate(hist) if r.get("id") in period_ids), 0)
        before = best_record(hist[:first], kid)
        best = best_record(hist, kid)
        base = baseline_record(hist, kid)
        counts = Counter(r.get("status") for r in recs)
        marks = Counter(trust_mark(r) for r in recs if trust_mark(r))
        improvements = []
        for r in recs:
            if r.get("status") == "keep" and scored(r) and trusted(r) and isinstance(r.get("best_before"), (int, float)):
                improvements.append({"gain": r["best_before"] - r["val_bpb"], "val_bpb": r["val_bpb"],
                                     "description": r.get("description") or "", "id": r.get("id"),
                                     "commit": r.get("commit")})
        improvements.sort(key=lambda x: -x["gain"])
        times = [t for t in (parse_time(r.get("time")) for r in recs) if t is not None]
        start = end = None
        if times:
            start = min(times).timestamp() - _seconds(recs[0])
            end = max(times).timestamp()
        key = recs[0].get("key") or {}
        out.append({
            "key_id": kid, "tag": recs[0].get("tag"), "backend": recs[0].get("backend"), "key": key,
            "experiments": len(recs), "counts": {s: counts.get(s, 0) for s in STATUS_ORDER},
            "near_misses": sum(1 for r in recs if r.get("near_miss")),
            **policy_counts(recs),
            "not_believed": dict(marks),
            "baseline": base["val_bpb"] if base else None,
            "best": best["val_bpb"] if best else None,
            "best_commit": best.get("commit") if best else None,
            "best_description": best.get("description") if best else None,
            "best_before_period": before["val_bpb"] if before else None,
            "top": improvements[:5],
            "experiment_hours": sum(_seconds(r) for r in recs) / 3600.0,
            "wall_hours": (end - start) / 3600.0 if start is not None and end is not None else 0.0,
            "start": datetime.fromtimestamp(start, timezone.utc).astimezone().isoformat(timespec="minutes") if start else None,
            "end": datetime.fromtimestamp(end, timezone.utc).astimezone().isoformat(timespec="minutes") if end else None,
        })
    out.sort(key=lambda s: s["start"] or "")
    return out


def _v(x: float | None) -> str:
    return f"{x:.6f}" if isinstance(x, (int, float)) else "-"


def _dur(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 0.1 else f"{hours * 60:.1f} min"


def report(period: list[dict], history: list[dict] | None = None, title: str = "arun summary") -> str:
    """The morning report as plain text."""
    if not period:
        return f"{title}: no experiments in this period"
    lines = []
    for s in summarize(period, history):
        key = s["key"]
        what = ", ".join(str(x) for x in (key.get("dataset"), key.get("profile"),
                                          f"budget {key.get('time_budget'):g}s" if isinstance(key.get("time_budget"), (int, float)) else None)
                         if x)
        held = "" if dataset_held_out(key.get("dataset")) else "; NOT HELD OUT: the train process can read its val/test text"
        lines.append(f"{title} [{s['tag']}] key {s['key_id']} ({what}{held})")
        lines.append(f"  {s['start']} -> {s['end']}: {_dur(s['wall_hours'])} on the clock, "
                     f"{_dur(s['experiment_hours'])} in experiments")
        c = s["counts"]
        parts = [f"{c[k]} {k}" for k in STATUS_ORDER if c[k]]
        near = f" ({s['near_misses']} near miss{'es' if s['near_misses'] > 1 else ''})" if s["near_misses"] else ""
        lines.append(f"  experiments: {s['experiments']}: " + ", ".join(parts) + near)
        if s["stopped_early"] or any(s["confirmations"].values()):
            lines.append("  " + policy_line(s))
        if s["not_believed"]:
            marks = ", ".join(f"{n} {m}" for m, n in sorted(s["not_believed"].items()))
            lines.append(f"  not believed (shown, never a best): {marks}; see arun log and arun audit")
        if s["best"] is not None:
            vs = ""
            if s["baseline"] is not None:
                d = s["best"] - s["baseline"]
                vs = f" vs baseline {_v(s['baseline'])} ({d:+.6f}, {100 * d / s['baseline']:+.2f}%)"
            lines.append(f"  best val_bpb: {_v(s['best'])}{vs} at {str(s['best_commit'])[:10]}: {s['best_description'] or '-'}")
            if s["best_before_period"] is not None and s["best_before_period"] != s["best"]:
                lines.append(f"  best when this period began: {_v(s['best_before_period'])} "
                             f"(this period: {s['best'] - s['best_before_period']:+.6f})")
            lines += heldout_lines(held_out(history or period, s["key_id"], {r.get("id") for r in period}))
        if s["top"]:
            lines.append("  top changes:")
            for t in s["top"]:
                lines.append(f"    {-t['gain']:+.6f} -> {_v(t['val_bpb'])}  {t['description'][:90]}  "
                             f"({str(t['commit'])[:10]}, id {t['id']})")
        else:
            lines.append("  no improvements kept in this period")
    return "\n".join(lines)


def policy_counts(recs: list[dict]) -> dict:
    """The loop's policy at work: discards stopped early (and the training time they did not spend) and
    how results near the best were decided (arun.core.early, arun.search.policy)."""
    stopped = [r for r in recs if r.get("status") == "discard" and isinstance(r.get("stopped_at"), (int, float))]
    verdicts = Counter((r.get("confirmation") or {}).get("verdict") for r in recs if isinstance(r.get("confirmation"), dict))
    return {"stopped_early": len(stopped),
            "stopped_at_mean": sum(r["stopped_at"] for r in stopped) / len(stopped) if stopped else None,
            "confirmations": {v: verdicts.get(v, 0) for v in ("clear win", "confirmed", "not confirmed", WITHIN_NOISE, NO_SPREAD)}}


def policy_line(s: dict) -> str:
    """One line: "stopped early: 4 discards (at 38% of the budget on average); keeps: 1 clear win, ..."."""
    parts = []
    if s["stopped_early"]:
        parts.append(f"stopped early: {s['stopped_early']} discard{'s' if s['stopped_early'] > 1 else ''} "
                     f"(at {s['stopped_at_mean']:.0f}% of the budget on average)")
    c = s["confirmations"]
    if any(c.values()):
        parts.append(f"near the best: {c['clear win']} kept as a clear win, {c['confirmed']} confirmed over fresh "
                     f"seeds, {c['not confirmed']} not confirmed"
                     + (f", {c[WITHIN_NOISE]} within the noise (too small to confirm)" if c[WITHIN_NOISE] else "")
                     + (f", {c[NO_SPREAD]} kept by the plain rule (no spread measured)" if c[NO_SPREAD] else ""))
    return "; ".join(parts)
