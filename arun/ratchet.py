"""Keep/discard decisions. Only records with the same comparability key are ever compared."""

from __future__ import annotations

import math


def scored(record: dict) -> bool:
    v = record.get("val_bpb")
    return isinstance(v, (int, float)) and math.isfinite(v)


def best_record(records: list[dict], key_id: str) -> dict | None:
    """The kept record with the lowest val_bpb for this key, or None before the baseline."""
    kept = [r for r in records if r.get("key_id") == key_id and r.get("status") == "keep" and scored(r)]
    return min(kept, key=lambda r: r["val_bpb"]) if kept else None


def baseline_record(records: list[dict], key_id: str) -> dict | None:
    for r in records:
        if r.get("key_id") == key_id and r.get("baseline"):
            return r
    return None


def decide(val_bpb: float, best: dict | None, near_miss: float = 0.002) -> tuple[str, bool]:
    """(status, near_miss): strictly lower than the best keeps; within near_miss above it is a near miss."""
    if best is None:
        return "keep", False
    if val_bpb < best["val_bpb"]:
        return "keep", False
    return "discard", val_bpb - best["val_bpb"] <= near_miss
