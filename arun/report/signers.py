"""Who vouches for the records a report shows: verified ones by their signing key's name, foreign
ones by the key id they name (with how to trust it), so a lab sees at once whose records it believes."""

from __future__ import annotations

from collections import Counter

from arun.core.ledger import SIGNER, TRUST


def signer_lines(records: list[dict]) -> list[str]:
    """One line for the verified records (per signer) and one per foreign key; [] when nothing is signed."""
    verified = Counter(str(r[SIGNER]) for r in records if r.get(TRUST) == "ok" and r.get(SIGNER))
    foreign = Counter(str(r.get(SIGNER) or "an unnamed key") for r in records if r.get(TRUST) == "foreign")
    lines = []
    if verified:
        lines.append("verified: " + ", ".join(f"{n} signed by {who}" for who, n in verified.most_common()))
    for who, n in foreign.most_common():
        lines.append(f"foreign: {n} record(s) signed by {who}, not trusted in this repo (shown, never a best); "
                     "if it is a lab machine: arun trust add <its `arun trust show`> --name NAME")
    return lines
