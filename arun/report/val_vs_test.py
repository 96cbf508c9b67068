"""
How much of a val gain is real: the night's gain on val and on the held-out test rows side by
side, and the keeps the test rows do not confirm. Pure functions over ledger records.

Why it matters: the ratchet keeps whatever scores lowest on one fixed set of val rows, so after
many experiments part of the gain is luck on those rows. The test rows are documents no decision
was made on; a gain that is real shows up on both, a gain that is noise shrinks or reverses on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arun.core.numbers import finite
from arun.core.ratchet import baseline_record, best_record, key_records, scored

CONFIRMED_FRACTION = 0.5  # a night whose test gain is less than this share of its val gain is flagged
NOT_CONFIRMED = "val gain not confirmed on test"
NOT_REAL = "most of the val gain is not real: consider --seeds/--confidence or a larger eval set"


def heldout_bpb(record: dict | None) -> float | None:
    """A record's test_bpb, or None (a discard, a failed test scoring, a record older than the test split)."""
    return finite((record or {}).get("test_bpb"))


@dataclass
class Unconfirmed:
    """A keep whose test_bpb is worse than that of the record it beat."""
    id: str
    description: str
    val_change: float            # val_bpb minus the previous best's (negative: a val gain)
    test_change: float           # test_bpb minus the previous best's (positive: worse on test)


@dataclass
class HeldOut:
    """One key's night on both splits: `start` is the best when the period began (the baseline
    when the period holds the whole key), `end` the best (by val, as the ratchet chose it)."""
    key_id: str
    start_val: float | None
    end_val: float | None
    start_test: float | None
    end_test: float | None
    unconfirmed: list[Unconfirmed] = field(default_factory=list)

    @property
    def val_gain(self) -> float | None:
        return None if self.start_val is None or self.end_val is None else self.start_val - self.end_val

    @property
    def test_gain(self) -> float | None:
        return None if self.start_test is None or self.end_test is None else self.start_test - self.end_test

    @property
    def not_real(self) -> bool:
        """The night's test gain is less than half its val gain (only judged when val improved)."""
        vg, tg = self.val_gain, self.test_gain
        return vg is not None and tg is not None and vg > 0 and tg < CONFIRMED_FRACTION * vg


def held_out(history: list[dict], key_id: str, period_ids: set | None = None) -> HeldOut:
    """The held-out view of one key. history: every record (ledger order; other keys are ignored);
    period_ids: the ids of the records in the period looked at (default: all of the key's)."""
    recs = key_records(history, key_id)
    first = 0
    if period_ids is not None:
        first = next((i for i, r in enumerate(recs) if r.get("id") in period_ids), len(recs))
    start = best_record(recs[:first], key_id) or baseline_record(recs, key_id)
    end = best_record(recs, key_id)
    out = HeldOut(key_id, (start or {}).get("val_bpb"), (end or {}).get("val_bpb"),
                  heldout_bpb(start), heldout_bpb(end))
    for i in range(max(first, 1), len(recs)):
        r = recs[i]
        if r.get("status") != "keep" or r.get("baseline") or not scored(r):
            continue
        prev = best_record(recs[:i], key_id)
        t, t0 = heldout_bpb(r), heldout_bpb(prev)
        if prev is not None and t is not None and t0 is not None and t > t0:
            out.unconfirmed.append(Unconfirmed(str(r.get("id")), str(r.get("description") or ""),
                                               r["val_bpb"] - prev["val_bpb"], t - t0))
    return out


def _v(x: float | None) -> str:
    return "-" if x is None else f"{x:.6f}"


def _arrow(a: float | None, b: float | None) -> str:
    change = f" ({b - a:+.6f})" if a is not None and b is not None else ""
    return f"{_v(a)} -> {_v(b)}{change}"


def heldout_lines(h: HeldOut, indent: str = "  ") -> list[str]:
    """The side-by-side line and the flags, as text (for summary, log and compare)."""
    share = ""
    if h.val_gain and h.val_gain > 0 and h.test_gain is not None:
        share = f", {100 * h.test_gain / h.val_gain:.0f}% of the val gain"
    lines = [f"{indent}val {_arrow(h.start_val, h.end_val)} | test {_arrow(h.start_test, h.end_test)}{share}"]
    if (h.start_val is not None and h.start_test is None) or (h.end_val is not None and h.end_test is None):
        lines.append(f"{indent}(test rows not scored for every record compared: "
                     f"records older than the test split, or a failed test scoring)")
    for u in h.unconfirmed:
        lines.append(f"{indent}! {NOT_CONFIRMED}: id {u.id} (val {u.val_change:+.6f}, test {u.test_change:+.6f} "
                     f"vs the best before it) {u.description[:60]}")
    if h.not_real:
        lines.append(f"{indent}! {NOT_REAL}")
    return lines


def heldout_report(records: list[dict], period_ids: set | None = None, history: list[dict] | None = None) -> list[str]:
    """The held-out block of every key in `records` (ledger order), a header line per key."""
    history = history if history is not None else records
    keys = list(dict.fromkeys(r["key_id"] for r in records if r.get("key_id")))
    lines: list[str] = []
    for kid in keys:
        key = next((r.get("key") or {} for r in records if r.get("key_id") == kid), {})
        budget = key.get("time_budget")
        what = ", ".join(str(x) for x in (key.get("backend"), f"{budget:g}s" if isinstance(budget, (int, float))
                                          else None) if x)
        lines.append(f"held-out test rows, key {kid} ({what}):")
        lines += heldout_lines(held_out(history, kid, period_ids))
    return lines
