"""
A copy of every ledger line outside the repo, so that no git command erases a record.

A ledger is a tracked file whose lines ride in commits (gitops.commit_record), so the `git reset --hard`
(or `git reset --hard HEAD~1`) that upstream's program.md has its agent run after a discard takes the
record commit, and the record, with it. The chain cannot tell: a ledger cut short still chains.

So every line arun appends is also appended to $ARUN_HOME/journal/<ledger>.jsonl (beside the identity
key: hidden from the loop's agent and from train processes, arun.core.confine). Before the next append
(and when an experiment begins) the ledger is repaired from it: a journal line goes back, byte for byte,
when it continues the ledger's chain exactly where the file now ends, was written on the branch now
checked out, and names a commit this repo has. Its seal holds as written, so nothing is re-signed and
nothing can be added that this machine did not append; lines of another branch (one made from an
earlier point of the same ledger) or of another clone at the same path are never taken.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from arun.core import trust


def path_for(ledger: Path | str) -> Path:
    """The journal of the ledger at this path (named by a hash of its absolute path)."""
    name = hashlib.sha256(os.path.abspath(ledger).encode()).hexdigest()[:24]
    return trust.home() / "journal" / f"{name}.jsonl"


def note(ledger: Path | str, line: bytes) -> None:
    """Appends one written ledger line; a journal that cannot be written costs a warning, never the record."""
    path = path_for(ledger)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line if line.endswith(b"\n") else line + b"\n")
        finally:
            os.close(fd)
    except OSError as e:
        print(f"arun: could not copy the record to {path} ({e.strerror}); a git reset could erase it", file=sys.stderr)


def erased(ledger: Path | str, tail: str, ids: set[str], branch: str,
           commit_exists: Callable[[str], bool]) -> list[bytes]:
    """The journal's lines that a git reset cut from this ledger, in order: each continues the chain
    from `tail` (the chain value of the ledger's last line, "" when empty), is of `branch`, has an id
    the ledger lacks and names a commit this repo has."""
    try:
        raw = path_for(ledger).read_bytes().splitlines()
    except OSError:
        return []
    lines = []
    for line in raw:
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict):
            lines.append((rec, line))
    out: list[bytes] = []
    while True:
        nxt = next((line for rec, line in lines if rec.get("prev") == tail and isinstance(rec.get("chain"), str)
                    and rec.get("branch") == branch and str(rec.get("id")) not in ids
                    and isinstance(rec.get("commit"), str) and commit_exists(rec["commit"])), None)
        if nxt is None:
            return out
        rec = json.loads(nxt)
        out.append(nxt + b"\n")
        tail = rec["chain"]
        ids.add(str(rec.get("id")))
