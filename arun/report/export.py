"""
`arun export`: upstream's results.tsv (program.md's format), so tools and habits
built for karpathy/autoresearch read arun's ledger unchanged:

    commit	val_bpb	memory_gb	status	description

7-character commit; val_bpb to 6 decimals; peak memory in GB to .1f; status keep,
discard or crash (0.000000 and 0.0 for crashes). Upstream has no timeout or invalid:
those are exported as crash with the reason appended to the description.
"""

from __future__ import annotations

from pathlib import Path

from arun.core.ledger import trust_mark
from arun.core.ratchet import scored

HEADER = ("commit", "val_bpb", "memory_gb", "status", "description")


def _clean(text: str) -> str:
    # Tabs and newlines would break the row; upstream's reason for TSV is that commas may appear.
    return " ".join(str(text).split())


def tsv_rows(records: list[dict]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for r in records:
        status = r.get("status") or "crash"
        desc = _clean(r.get("description") or "")
        if trust_mark(r):  # upstream's five columns have no place for it: the description says it
            desc = f"{desc} [not believed: {_clean(str(r.get('_trust')))}]".strip()
        if status in ("keep", "discard") and scored(r):
            val = f"{r['val_bpb']:.6f}"
            mem = r.get("peak_memory_mb")
            mem_gb = f"{mem / 1024:.1f}" if isinstance(mem, (int, float)) else "0.0"
        else:
            if status != "crash":
                desc = f"{desc} ({status}: {_clean(r.get('error') or '')})".strip()
            status, val, mem_gb = "crash", "0.000000", "0.0"
        rows.append((str(r.get("commit") or "0000000")[:7], val, mem_gb, status, desc))
    return rows


def write_tsv(records: list[dict], path: Path | str) -> int:
    """Writes results.tsv; returns the number of experiment rows."""
    rows = tsv_rows(records)
    text = "\t".join(HEADER) + "\n" + "".join("\t".join(row) + "\n" for row in rows)
    Path(path).write_text(text, encoding="utf-8")
    return len(rows)
