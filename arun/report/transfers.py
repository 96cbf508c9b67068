"""
The transfer table of `arun report`: for every experiment `arun transfer` ran (records carrying
`transfer_from`), the gain its source winner brought on its own hardware (against that key's
baseline) next to the gain or loss it brought here (against the best it had to beat).
"""

from __future__ import annotations

from dataclasses import dataclass

from arun.core.ledger import trust_mark
from arun.core.ratchet import scored


@dataclass
class TransferRow:
    source_tag: str
    source_id: str
    source_commit: str
    gain_there: float | None            # source baseline val_bpb minus the winner's (positive: better)
    gain_there_percent: float | None
    here_tag: str
    here_backend: str
    here_id: str
    status: str
    changes: str
    gain_here: float | None             # the best before the transfer minus its val_bpb (negative: a loss)
    gain_here_percent: float | None
    source_mark: str = ""               # the source record's trust mark ("foreign": another machine's)


def _gain(before: float | None, after: float | None) -> tuple[float | None, float | None]:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or not before:
        return None, None
    return before - after, 100.0 * (before - after) / before


def transfer_rows(records: list[dict]) -> list[TransferRow]:
    by_id = {r.get("id"): r for r in records}
    rows = []
    for r in records:
        origin = r.get("transfer_from")
        if not isinstance(origin, dict):
            continue
        src = by_id.get(origin.get("id")) or {}
        base = next((x for x in records if x.get("key_id") == src.get("key_id") and x.get("baseline")
                     and x.get("status") == "keep" and scored(x)), None)
        there = _gain((base or {}).get("val_bpb"), src.get("val_bpb") if scored(src) else None)
        here = _gain(r.get("best_before"), r.get("val_bpb") if scored(r) else None)
        applied = r.get("transfer_applied") or {}
        names = r.get("transfer_code_map") or {}
        code = f"code (agent): {', '.join(names)}" if names else "code (agent)"
        changes = ", ".join(f"{k}={v!r}" for k, v in applied.items()) or (code if r.get("transfer_code") else "-")
        rows.append(TransferRow(str(origin.get("tag")), str(origin.get("id")), str(origin.get("commit") or "")[:10],
                                *there, str(r.get("tag")), str(r.get("backend")), str(r.get("id")),
                                str(r.get("status")), changes, *here, trust_mark(src) if src else "not found"))
    return rows
