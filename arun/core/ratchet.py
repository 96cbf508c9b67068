"""Keep/discard decisions. Only records with the same comparability key are ever compared, and only
records this machine sealed (and no audit failed) are believed: a forged, edited, foreign or legacy
line is shown by the reports but never becomes a best or a baseline."""

from __future__ import annotations

from collections.abc import Callable

from arun.core.ledger import trusted
from arun.core.numbers import finite

NEAR_MISS = 0.002  # n-autoresearch's threshold: a discard this close to the best is worth a second look
# A near win too small for fresh seeds to confirm (arun.search.policy): discarded without re-running it.
WITHIN_NOISE = "within the noise"
# No spread measured for the key: the fresh seeds' own spread is the train file's to choose, so the plain rule decides.
NO_SPREAD = "no spread measured"
SCORED = ("keep", "discard")  # the statuses that carry a val_bpb


def scored(record: dict) -> bool:
    return finite(record.get("val_bpb")) is not None


def key_records(records: list[dict], key_id: str) -> list[dict]:
    """The trusted records of one key, in ledger order: the only ones a decision about that key may read."""
    return [r for r in records if r.get("key_id") == key_id and trusted(r)]


def best_record(records: list[dict], key_id: str, stored: Callable[[dict], bool] | None = None) -> dict | None:
    """The kept record with the lowest val_bpb for this key, or None before the baseline.
    Ties go to the earlier record (a later equal result was not an improvement).
    stored(record): whether its forward is still in the store (arun.core.forward_store.stored_check); a keep
    that cannot be re-scored is unverified and never a best."""
    kept = [r for r in key_records(records, key_id) if r.get("status") == "keep" and scored(r)
            and (stored is None or stored(r))]
    # An unconfined run (no OS confinement: it could have read the val rows) is never the best
    # against confined ones: once the key has a confined keep, only confined keeps compete.
    kept = [r for r in kept if r.get("confined") is True] or kept
    return min(kept, key=lambda r: r["val_bpb"]) if kept else None


def baseline_record(records: list[dict], key_id: str) -> dict | None:
    """The key's first kept run: what every later improvement is measured from."""
    for r in key_records(records, key_id):
        if r.get("baseline") and r.get("status") == "keep" and scored(r):
            return r
    return None


def decide(val_bpb: float, best: dict | None, near_miss: float = NEAR_MISS) -> tuple[str, bool]:
    """(status, near_miss): the first scored run of a key is its baseline (keep); after that only a
    strictly lower val_bpb keeps; a discard within `near_miss` of the best is flagged as a near miss."""
    if best is None:
        return "keep", False
    if val_bpb < best["val_bpb"]:
        return "keep", False
    return "discard", val_bpb - best["val_bpb"] <= near_miss


def running_best(records: list[dict]) -> list[float | None]:
    """For each record (one key, ledger order), the best kept val_bpb after it."""
    out, best = [], None
    for r in records:
        if r.get("status") == "keep" and scored(r) and trusted(r) and (best is None or r["val_bpb"] < best):
            best = r["val_bpb"]
        out.append(best)
    return out
