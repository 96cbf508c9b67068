"""
Kept forwards, content-addressed under .arun/artifacts/<sha256><suffix>, so any kept record can be
re-scored later (`arun audit`). A record names its artifact by sha256; the store never holds two
copies of one forward and never keeps a file whose bytes do not match its name.

One store per clone (its main worktree's .arun/, shared by its git worktrees), and retention reads
the ledgers of every local branch, not the one checked out: a keep on one branch never deletes the
forward of another branch's keep. A keep whose forward is gone cannot be re-scored: it is
unverified, never a best (arun.core.ratchet) and fails `arun audit`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from arun.core.gitops import sealed_env
from arun.core.ledger import all_records, trusted
from arun.core.ratchet import best_record
from engines.forward_file import SUFFIX
from prepare import sha256_file

KEEP_RECENT = 20  # besides each key's best, the newest kept forwards stay on disk
# A forward stored this recently is never pruned: a swarm's coordinator stores a keep's forwards before its
# record reaches the ledger, and a worker sharing the store may prune in between.
RETAIN_GRACE = 3600.0


@functools.lru_cache(maxsize=32)
def _clone_root(repo_dir: str) -> Path:
    """The main worktree of the clone repo_dir belongs to (repo_dir itself outside git)."""
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=repo_dir,
                                capture_output=True, text=True, check=True, env=sealed_env()).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return Path(repo_dir)
    return Path(common).parent if Path(common).name == ".git" else Path(repo_dir)


def store_dir(repo_dir: Path) -> Path:
    return _clone_root(str(Path(repo_dir).resolve())) / ".arun" / "artifacts"


def path_for(repo_dir: Path, backend: str, sha256: str) -> Path:
    return store_dir(repo_dir) / f"{sha256}{SUFFIX[backend]}"


def store(repo_dir: Path, backend: str, artifact: Path) -> tuple[str, Path]:
    """Moves a scored artifact into the store (hashing what is moved); returns (sha256, stored path)."""
    sha = sha256_file(artifact)
    dest = path_for(repo_dir, backend, sha)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ignore = dest.parent.parent / ".gitignore"  # (the harness's state never shows up in git)
    if not ignore.exists():
        ignore.write_text("*\n")
    if dest.exists():
        artifact.unlink(missing_ok=True)
        os.utime(dest)  # stored (again) now: retain()'s grace counts from here
    else:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.move(str(artifact), tmp)
        os.utime(tmp)  # stored now: retain()'s grace counts from here
        os.replace(tmp, dest)
    return sha, dest


def is_sha256(text: object) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def shas_of(record: dict) -> list[str]:
    """Every forward a keep names: its first seed's, then each further seed's (multi-seed keeps); only
    names that are a sha256 (they become file names in the store)."""
    shas = [record.get("artifact_sha256"), *(record.get("artifact_sha256_seeds") or [])]
    return list(dict.fromkeys(s for s in shas if is_sha256(s)))


def read_forwards(repo_dir: Path, record: dict) -> dict[str, bytes]:
    """The stored forwards of a keep, by sha256 (those this store lacks are left out): what a swarm
    worker ships with a keep made in its own clone, so the clones that adopt it can verify it too."""
    backend = str(record.get("backend"))
    if backend not in SUFFIX or record.get("status") != "keep":
        return {}
    paths = {sha: path_for(repo_dir, backend, sha) for sha in shas_of(record)}
    return {sha: path.read_bytes() for sha, path in paths.items() if path.is_file()}


def put_forwards(repo_dir: Path, backend: str, forwards: dict[str, bytes]) -> list[str]:
    """Stores forwards that arrived from another clone; bytes that do not hash to their name are
    dropped (never stored under a name they do not match). Returns the sha256 stored."""
    if backend not in SUFFIX:
        return []
    done = []
    for sha, data in forwards.items():
        if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != sha:
            continue
        dest = path_for(repo_dir, backend, sha)
        if dest.is_file():
            os.utime(dest)  # arrived now: retain()'s grace counts from here
        else:
            incoming = store_dir(repo_dir) / f".incoming-{sha}-{os.getpid()}{SUFFIX[backend]}"
            incoming.parent.mkdir(parents=True, exist_ok=True)
            incoming.write_bytes(data)
            store(repo_dir, backend, incoming)
        done.append(sha)
    return done


def needs_forward(record: dict) -> bool:
    """A keep that names its forward (keeps from before artifacts existed name none)."""
    return record.get("status") == "keep" and bool(record.get("artifact_sha256"))


def stored_check(repo_dir: Path) -> Callable[[dict], bool]:
    """record -> whether its forward can be re-scored here (True for records that need none, and for
    records another trusted machine signed: their forward is kept, and audited, where they ran)."""
    from arun.core.trust import key_id, own_public
    own = key_id(own_public())

    def stored(record: dict) -> bool:
        backend = str(record.get("backend"))
        if not needs_forward(record):
            return True
        if record.get("sig_key") and record.get("sig_key") != own:
            return True
        return backend in SUFFIX and path_for(repo_dir, backend, str(record["artifact_sha256"])).is_file()
    return stored


def local_branches(repo_dir: Path) -> list[str]:
    try:
        out = subprocess.run(["git", "for-each-ref", "--format=%(refname:short)", "refs/heads"], cwd=repo_dir,
                             capture_output=True, text=True, check=True, env=sealed_env()).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [b for b in out.split() if b]


def every_record(repo_dir: Path, extra: list[dict] | None = None) -> list[dict]:
    """The records of every ledger this clone holds: the working copy's, its main worktree's (the swarm's
    ledger) and every local branch's (each record once), plus `extra` (a record not yet written anywhere)."""
    records = all_records(repo_dir, local_branches(repo_dir))
    root = _clone_root(str(Path(repo_dir).resolve()))
    if root != Path(repo_dir).resolve():
        records += all_records(root)
    seen: dict[str, dict] = {}
    for r in records + list(extra or []):
        seen.setdefault(str(r.get("id")) if r.get("id") else str(len(seen)), r)
    return list(seen.values())


@dataclass
class Retention:
    """What the store holds against what retention wants (for `arun doctor`)."""
    wanted: set[str] = field(default_factory=set)   # sha256 of the forwards to keep
    best: int = 0                                   # keys whose best is kept
    recent: int = 0                                 # the newest keeps kept besides
    keeps: int = 0                                  # keeps naming a forward, all branches
    missing: int = 0                                # wanted, but not in the store (unverified keeps)


def plan(records: list[dict], keep_recent: int = KEEP_RECENT) -> Retention:
    """Each key's best (as the ratchet picks it) and the newest `keep_recent` keeps, over the trusted
    records given: an unsigned or foreign line (any branch can carry one) never steers what is deleted.
    A time later than now is a lie: such a keep counts as the oldest, so it can never take the recent slots."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime())

    def when(r: dict) -> str:
        t = str(r.get("time", ""))
        return t if t <= now else ""
    kept = sorted((r for r in records if needs_forward(r) and trusted(r)), key=lambda r: (when(r), str(r.get("id"))))
    out = Retention(keeps=len(kept))
    recent = {r["artifact_sha256"] for r in kept[-keep_recent:]} if keep_recent > 0 else set()
    best = [b for k in {str(r.get("key_id")) for r in kept} if (b := best_record(kept, k)) is not None]
    out.best, out.recent = len(best), len(recent)
    out.wanted = recent | {r["artifact_sha256"] for r in best}
    return out


def retain(repo_dir: Path, records: list[dict], keep_recent: int = KEEP_RECENT,
           grace: float = RETAIN_GRACE) -> list[Path]:
    """Deletes stored forwards no longer needed by `records` (pass every_record(): all branches):
    kept are each key's best, the newest kept records' forwards, and any stored in the last `grace`
    seconds (its record may not be in a ledger yet). Returns what was deleted."""
    wanted = plan(records, keep_recent).wanted
    removed = []
    now = time.time()
    for path in store_dir(repo_dir).glob("*"):
        if path.name.split(".")[0] not in wanted and not path.name.startswith(".") \
                and now - path.stat().st_mtime >= grace:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def retention(repo_dir: Path) -> Retention:
    """The store against every branch's keeps: what is wanted, and how many wanted forwards are gone."""
    out = plan(every_record(repo_dir))
    have = {p.name.split(".")[0] for p in store_dir(repo_dir).glob("*") if p.is_file()}
    out.missing = len(out.wanted - have)
    return out


def disk_use(repo_dir: Path) -> tuple[int, int]:
    """(files, bytes) in the store, for `arun doctor`."""
    files = [p for p in store_dir(repo_dir).glob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
