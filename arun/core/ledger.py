"""
The append-only experiment ledger, bench/<tag>/ledger.jsonl.

Every append is one write() of one line under an exclusive flock, followed by
fsync, so two processes never interleave and a completed record is on disk.
A writer killed mid-line leaves a torn tail; the next append cuts it off
(keeping the bytes in ledger.jsonl.torn) before writing. Readers skip lines
that do not parse rather than fail.
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
from pathlib import Path
from typing import Any

from arun.core.errors import ArunError


def new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def ledger_path(repo_dir: Path | str, tag: str) -> Path:
    return Path(repo_dir) / "bench" / tag / "ledger.jsonl"


def _warn(msg: str) -> None:
    print(f"arun: {msg}", file=sys.stderr)


def parse_lines(text: str, source: str) -> list[dict]:
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        _warn(f"{source}: skipped {bad} unreadable line(s)")
    return records


class Ledger:
    def __init__(self, path: Path | str):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return parse_lines(self.path.read_text(encoding="utf-8", errors="replace"), str(self.path))

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

    def append(self, record: dict) -> dict:
        record = dict(record)
        record.setdefault("id", new_id())
        record.setdefault("time", now_iso())
        line = (json.dumps(record, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = None
            try:
                self._repair(fd)  # inside the try: a full disk can stop the repair too
                size = os.fstat(fd).st_size
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as e:
                if size is not None:
                    os.ftruncate(fd, size)  # never leave half a record
                why = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                       errno.EFBIG: "file size limit reached, see ulimit -f"}.get(e.errno, e.strerror)
                raise ArunError(f"could not write {self.path} ({why}); free space and rerun, the ledger is unchanged") from e
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
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
            seen.setdefault(rec.get("id") or json.dumps(rec, sort_keys=True), rec)
    for ref in refs:
        try:
            names = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, "--", "bench"], cwd=repo_dir,
                                   capture_output=True, text=True, check=True).stdout.split()
        except subprocess.CalledProcessError as e:
            raise ArunError(f"git ref {ref!r} not found ({e.stderr.strip()}); fetch it first, e.g. git fetch origin") from e
        for name in names:
            if name.endswith("/ledger.jsonl"):
                text = subprocess.run(["git", "show", f"{ref}:{name}"], cwd=repo_dir, capture_output=True,
                                      text=True, check=True).stdout
                for rec in parse_lines(text, f"{ref}:{name}"):
                    seen.setdefault(rec.get("id") or json.dumps(rec, sort_keys=True), rec)
    return sorted(seen.values(), key=lambda r: (r.get("time", ""), r.get("id", "")))
