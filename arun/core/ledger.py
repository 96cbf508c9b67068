"""
The append-only experiment ledger, bench/<tag>/ledger.jsonl.

Every append is one write() of one line under an exclusive flock, followed by
fsync, so two processes never interleave and a completed record is on disk.
A writer killed mid-line leaves a torn tail; the next append cuts it off
(keeping the bytes in ledger.jsonl.torn) before writing. Readers skip lines
that do not parse rather than fail.

Every line is sealed (arun/core/chain.py) against the line before it, under the same lock, and
signed with this machine's identity key (arun/core/trust.py). Readers give each record its trust,
in memory only (the `_trust` key, never written): "ok" (signed by a key trusted here: this
machine's, bench/trusted_keys', or a legacy HMAC seal of this machine), "foreign" (a key not trusted
here), "legacy" (written before seals), "forged: ..." / "edited: ..." (its seal fails), "audit
failed: ..." (bench/<tag>/audit.json). Decisions rest on "ok" records only. `_signer` says who
vouches for a verified record (the key's name) or which key a foreign one names.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from arun.core import chain, journal, trust
from arun.core.errors import ArunError

TRUST = "_trust"     # the in-memory trust mark; a key that starts with "_" is never written
SIGNER = "_signer"   # in memory: the trusted key's name, or "key <id>" for a foreign line
AUDIT_FILE = "audit.json"
_warned: set[tuple[str, int, str]] = set()


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def ledger_path(repo_dir: Path | str, tag: str) -> Path:
    return Path(repo_dir) / "bench" / tag / "ledger.jsonl"


def _warn(msg: str) -> None:
    print(f"arun: {msg}", file=sys.stderr)


def parse_lines(text: str, source: str, numbers: list[int] | None = None) -> list[dict]:
    """The records of a ledger's text; `numbers`, when given, gets each record's 1-based line number."""
    records, bad = [], 0
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
            if numbers is not None:
                numbers.append(n)
        else:
            bad += 1
    if bad:
        _warn(f"{source}: skipped {bad} unreadable line(s)")
    return records


def written(record: dict) -> dict:
    """The record as a ledger line holds it: in-memory marks (keys starting with "_") left out."""
    return {k: v for k, v in record.items() if not str(k).startswith("_")}


def trusted(record: dict) -> bool:
    """Whether a decision may rest on this record. Records read from a ledger carry their trust;
    one built in memory by this process (no mark) is ours."""
    return record.get(TRUST, "ok") == "ok"


def trust_mark(record: dict) -> str:
    """A short mark for tables: "" for a trusted record, else foreign / legacy / forged / edited / audit failed."""
    trust = str(record.get(TRUST, "ok"))
    return "" if trust == "ok" else trust.split(":")[0]


def audit_verdicts(folder: Path) -> dict[str, str]:
    """bench/<tag>/audit.json as written by `arun audit`: record id -> verdict ("ok" or why not)."""
    path = Path(folder) / AUDIT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        _warn(f"{path}: unreadable, ignored; rerun arun audit to rewrite it")
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def repo_of(ledger: Path | str) -> Path:
    """The repo a bench/<tag>/ledger.jsonl belongs to (whose bench/trusted_keys decides its trust): read
    from the path as named, never through a link (a link would borrow another folder's trusted_keys)."""
    return Path(os.path.abspath(ledger)).parent.parent.parent


def refuse_links(ledger: Path | str) -> None:
    """A ledger, its tag folder, bench/ and bench/trusted_keys must be real files and folders of the repo:
    git stores symlinks, so a merged branch could point any of them at a folder that vouches for itself."""
    path = Path(os.path.abspath(ledger))
    for p in (path, path.parent, path.parent.parent, path.parent.parent / "trusted_keys"):
        if p.is_symlink():
            raise ArunError(f"{p} is a symlink (to {os.readlink(p)}); arun reads ledgers and trust only from "
                            f"the repo's own files: replace it with a real file or folder (git rm it)")


def annotate(records: list[dict], lines: list[int], source: str, audit: dict[str, str],
             repo_dir: Path | str | None = None) -> list[dict]:
    """Sets each record's trust from its seal (under the keys trusted in `repo_dir`'s working tree, never
    a fetched ref's own list) and the audit's verdict; one warning per bad record."""
    verdict = chain.check(records, chain.existing_key(), lines, trust.trusted(repo_dir))
    why: dict[int, str] = {}
    first: dict[str, int] = {}  # id -> line of its first record: a later line reusing an id is not believed
    for i, rec in enumerate(records):
        if rec.get("id") is None:
            continue
        rid = str(rec["id"])
        if rid in first and i not in verdict.bad:
            verdict.bad.add(i)
            verdict.problems.append(chain.Problem(lines[i], rid, f"forged: reuses the id of line {first[rid]}"))
        first.setdefault(rid, lines[i])
    for p in verdict.problems:
        why.setdefault(p.line, p.what)
        if (source, p.line, p.record_id) not in _warned:
            _warned.add((source, p.line, p.record_id))
            _warn(f"{source} line {p.line} (id {p.record_id}): {p.what}; ignored")
    for i, rec in enumerate(records):
        if i in verdict.bad:
            rec[TRUST] = chain.trust_label(why.get(lines[i], "its seal does not hold"))
        elif i in verdict.foreign:
            rec[TRUST] = "foreign"
            rec[SIGNER] = f"key {rec.get('sig_key') or rec.get('mac_key')}"
        elif i in verdict.legacy:
            rec[TRUST] = "legacy"
        else:
            rec[TRUST] = "ok"
            if i in verdict.signer:
                rec[SIGNER] = verdict.signer[i]
        audited = audit.get(str(rec.get("id")))
        if rec[TRUST] == "ok" and audited and audited.startswith("failed"):
            rec[TRUST] = "audit failed: " + audited[len("failed:"):].strip()
    return records


class Ledger:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def records(self, audit: bool = True) -> list[dict]:
        """The records in file order, each with its trust (see the module's docstring); `audit`: honour
        the folder's audit.json (`arun audit` itself reads without it)."""
        refuse_links(self.path)
        if not self.path.exists():
            return []
        lines: list[int] = []
        recs = parse_lines(self.path.read_text(encoding="utf-8", errors="replace"), str(self.path), lines)
        return annotate(recs, lines, str(self.path), audit_verdicts(self.path.parent) if audit else {},
                        repo_of(self.path))

    def _prev(self, fd: int) -> str:
        """The chain value of the file's last line (read under the lock): the prev of the next line."""
        size = os.fstat(fd).st_size
        tail = os.pread(fd, min(size, 1 << 16), max(0, size - (1 << 16))).rstrip(b"\n")
        last = tail[tail.rfind(b"\n") + 1:] if b"\n" in tail or size <= (1 << 16) else b""
        try:
            rec = json.loads(last) if last.strip() else None
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("chain"), str):
            return rec["chain"]
        if size == 0:
            return ""
        # An unsealed or unreadable last line (or a long one): walk the whole file as a reader would.
        text = os.pread(fd, size, 0).decode("utf-8", errors="replace")
        return chain.head(parse_lines(text, str(self.path)))

    def _repair(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        # The last newline may lie further back than any fixed tail (a record with a large diff):
        # scan back block by block, so a long torn line never takes earlier records with it.
        keep, pos = 0, size
        while pos > 0:
            start = max(0, pos - (1 << 16))
            cut = os.pread(fd, pos - start, start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        torn = os.pread(fd, size - keep, keep)
        with open(self.path.with_name(self.path.name + ".torn"), "ab") as f:
            f.write(torn + b"\n")
        os.ftruncate(fd, keep)
        os.fsync(fd)
        _warn(f"{self.path}: repaired a torn last line ({len(torn)} bytes) left by a killed writer")

    def _fresh_id(self, fd: int, record: dict) -> dict:
        """The record with an id no line of the file has (read under the lock): a sent id (a swarm
        worker's) that is taken gets a new one, kept as `sent_id`, so no line can claim another's verdict."""
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")
        taken = {str(r.get("id")) for r in parse_lines(text, str(self.path))}
        if str(record["id"]) not in taken:
            return record
        fresh = new_id()
        while fresh in taken:
            fresh = new_id()
        return dict(record, id=fresh, sent_id=record["id"])

    @contextmanager
    def _locked(self) -> Iterator[int]:
        """The ledger file, opened for appending (made if missing) and held under its exclusive lock."""
        refuse_links(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a link planted between the check and the open is refused too
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise ArunError(f"{self.path} is a symlink; arun appends only to the repo's own ledger file: "
                            f"replace it with a real file") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _write(self, fd: int, line: bytes) -> None:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view):]

    def _restore(self, fd: int, branch: str) -> list[dict]:
        """Puts back, verbatim, the lines a git reset cut from this ledger (arun.core.journal)."""
        from arun.core.gitops import branch_birth, commit_exists  # (late: gitops loads gitpython)
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")
        ids = {str(r.get("id")) for r in parse_lines(text, str(self.path))}
        born = branch_birth(repo_of(self.path), branch)
        if born is None:  # a deleted branch's records must never land on a new one of the same name
            if journal.missing(self.path, ids, branch, None):
                _warn(f"{branch} has no reflog here, so arun cannot tell its records from a deleted branch's of the "
                      f"same name: the journal's records of it the ledger lacks are not put back")
            return []
        lines = journal.erased(self.path, self._prev(fd), ids, branch, born,
                               lambda sha: commit_exists(repo_of(self.path), sha))
        for line in lines:
            self._write(fd, line)
        if lines:
            os.fsync(fd)
        return [json.loads(line) for line in lines]

    def restore(self, branch: str) -> list[dict]:
        """The records of `branch` a git reset erased from this ledger, appended again as they were."""
        if not journal.path_for(self.path).exists():
            return []
        existed = self.path.exists()
        with self._locked() as fd:
            self._repair(fd)
            restored = self._restore(fd, branch)
        if not restored and not existed:
            self.path.unlink(missing_ok=True)  # (opening it made an empty one)
        return restored

    def missing(self, branch: str) -> list[dict]:
        """The records this machine wrote on this incarnation of `branch` (arun.core.journal) that the ledger
        lacks and could not be put back: a line edited or cut out of it, or a reset past a pruned commit."""
        from arun.core.gitops import branch_birth  # (late: gitops loads gitpython)
        if not journal.path_for(self.path).exists():
            return []
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""
        ids = {str(r.get("id")) for r in parse_lines(text, str(self.path))}
        return journal.missing(self.path, ids, branch, branch_birth(repo_of(self.path), branch))

    def append(self, record: dict) -> dict:
        """Seals the record against the file's last line and appends it; returns the sealed record.
        Records of its branch that a git reset erased go back first (arun.core.journal)."""
        record = written(record)
        record.setdefault("id", new_id())
        record.setdefault("time", now_iso())
        trust.signing_key()  # made (or read) before the lock: the first append makes it
        with self._locked() as fd:
            size = None
            try:
                self._repair(fd)  # inside the try: a full disk can stop the repair too
                if isinstance(record.get("branch"), str):
                    self._restore(fd, record["branch"])
                size = os.fstat(fd).st_size
                record = self._fresh_id(fd, record)
                record = chain.seal(record, self._prev(fd))
                line = (json.dumps(record) + "\n").encode()
                self._write(fd, line)
                os.fsync(fd)
            except OSError as e:
                if size is not None:
                    os.ftruncate(fd, size)  # never leave half a record
                why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                       errno.EFBIG: "file size limit reached, see ulimit -f"}.get(e.errno or 0) or e.strerror or str(e)
                raise ArunError(f"could not write {self.path} ({why}); free space and rerun, the ledger is unchanged") from e
            journal.note(self.path, line)
        return record


def read_records(repo_dir: Path | str, tag: str, ledger: Any = None) -> list[dict]:
    """The ledger's records: `ledger`'s when given (an object with records(), e.g. the swarm's),
    else bench/<tag>/ledger.jsonl."""
    if ledger is not None:
        return list(ledger.records())
    return Ledger(ledger_path(repo_dir, tag)).records()


def ledgers_in(repo_dir: Path | str) -> list[Path]:
    return sorted((Path(repo_dir) / "bench").glob("*/ledger.jsonl"))


def all_records(repo_dir: Path | str, refs: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """Every record under bench/, plus those in bench/*/ledger.jsonl on the given git refs (deduplicated by id)."""
    seen: dict[str, dict] = {}
    for path in ledgers_in(repo_dir):
        for rec in Ledger(path).records():
            seen.setdefault(rec.get("id") or json.dumps(written(rec), sort_keys=True), rec)
    from arun.core.gitops import sealed_env  # (late: gitops loads gitpython)
    for ref in refs:
        try:
            names = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, "--", "bench"], cwd=repo_dir,
                                   capture_output=True, text=True, check=True, env=sealed_env()).stdout.split()
        except subprocess.CalledProcessError as e:
            raise ArunError(f"git ref {ref!r} not found ({e.stderr.strip()}); fetch it first, e.g. git fetch origin") from e
        for name in names:
            if name.endswith("/ledger.jsonl"):
                text = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=repo_dir, capture_output=True,
                                      text=True, check=True, env=sealed_env()).stdout
                lines: list[int] = []
                recs = parse_lines(text, f"{ref}:{name}", lines)
                audit = audit_verdicts((Path(repo_dir) / name).parent)
                for rec in annotate(recs, lines, f"{ref}:{name}", audit, repo_dir):
                    seen.setdefault(rec.get("id") or json.dumps(written(rec), sort_keys=True), rec)
    return sorted(seen.values(), key=lambda r: (r.get("time", ""), r.get("id", "")))
