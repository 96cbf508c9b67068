"""
A copy of every ledger line outside the repo: what a git reset cut from the ledger goes back, and what
was lost otherwise is said, never silently forgotten.

A ledger is a tracked file whose lines ride in commits (gitops.commit_record), so the `git reset --hard`
(or `git reset --hard HEAD~1`) that upstream's program.md has its agent run after a discard takes the
record commit, and the record, with it. The chain cannot tell: a ledger cut short still chains.

So every line arun appends is also appended to $ARUN_HOME/journal/<ledger>.jsonl (beside the identity
key: hidden from the loop's agent and from train processes, arun.core.confine). A line belongs to one
incarnation of its branch: named for it and written no earlier than the branch's birth, the oldest entry
of its reflog (gitops.branch_birth; deleting a branch deletes its reflog, a reset only adds to it), so a
branch deleted and started again under the same name starts afresh.

Restored: before the next append (and when an experiment begins) a journal line of the branch checked out
goes back, byte for byte, when it continues the ledger's chain exactly where the file now ends and names a
commit this repo has. Its seal holds as written, so nothing is re-signed and nothing can be added that this
machine did not append. Without a reflog for the branch nothing is put back (one warning says so).
Detected, not restored: a line of this incarnation the ledger lacks that cannot go back (edited or cut out
of the middle, the ledger replaced, a reset past a commit gc has pruned): the next run says so, and refuses
when a keep is among them (the best would silently drop); `arun audit` fails each such id.
Not defended: whoever can rewrite the reflog (so the birth) or $ARUN_HOME (the journal, the machine key)
can hide records or forge anything; a branch deleted and made again within the same second as its last
record may receive that record.
Nor does it follow a branch renamed or copied (`git branch -m`, `git checkout -b`), a project folder moved,
or a reflog birth in the future: SECURITY.md, "Plain git moves the journal does not follow".
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
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


def _lines(ledger: Path | str) -> list[tuple[dict, bytes]]:
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
    return lines


def _written_at(rec: dict) -> float | None:
    try:
        return datetime.strptime(str(rec.get("time")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def of_branch(ledger: Path | str, branch: str, born: float | None) -> list[tuple[dict, bytes]]:
    """The journal's lines written on this incarnation of `branch`: named for it and written no earlier
    than its birth (gitops.branch_birth; None, no reflog: every line of that name)."""
    return [(rec, line) for rec, line in _lines(ledger) if rec.get("branch") == branch
            and (born is None or ((t := _written_at(rec)) is not None and t >= born))]


def missing(ledger: Path | str, ids: set[str], branch: str, born: float | None) -> list[dict]:
    """The records this machine wrote on this incarnation of `branch` that the ledger (its `ids`) lacks. A swarm's
    records are left out: the driver writes them to the main ledger under each worker's branch name, and the
    worker's own branch never carries that ledger, so their absence there is no loss."""
    return [rec for rec, _ in of_branch(ledger, branch, born) if str(rec.get("id")) not in ids and "swarm" not in rec]


def erased(ledger: Path | str, tail: str, ids: set[str], branch: str, born: float,
           commit_exists: Callable[[str], bool]) -> list[bytes]:
    """The journal's lines that a git reset cut from this ledger, in order: each continues the chain
    from `tail` (the chain value of the ledger's last line, "" when empty), was written on this
    incarnation of `branch` (born then), has an id the ledger lacks and names a commit this repo has."""
    lines = of_branch(ledger, branch, born)
    out: list[bytes] = []
    while True:
        nxt = next((line for rec, line in lines if rec.get("prev") == tail and isinstance(rec.get("chain"), str)
                    and str(rec.get("id")) not in ids
                    and isinstance(rec.get("commit"), str) and commit_exists(rec["commit"])), None)
        if nxt is None:
            return out
        rec = json.loads(nxt)
        out.append(nxt + b"\n")
        tail = rec["chain"]
        ids.add(str(rec.get("id")))
