"""
No edit is lost: every train file that ran and was not kept is saved under
.arun/attempts/<sha256>.py (content-addressed, so a retry of the same file costs nothing),
and `arun show ID` / `arun restore ID` bring it back.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from arun.core.errors import ArunError
from engines.atomic import write_atomic


def attempts_dir(repo_dir: Path) -> Path:
    return Path(repo_dir) / ".arun" / "attempts"


def save_attempt(repo_dir: Path, text: bytes) -> str:
    """Stores a train file's bytes; returns their sha256 (the record's train_sha256)."""
    sha = hashlib.sha256(text).hexdigest()
    path = attempts_dir(repo_dir) / f"{sha}.py"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    return sha


def load_attempt(repo_dir: Path, sha: str | None) -> bytes | None:
    """The saved train file with this sha256, or None when it was never saved (or was deleted)."""
    if not sha:
        return None
    path = attempts_dir(repo_dir) / f"{sha}.py"
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def attempt_text(repo_dir: Path, rec: dict) -> bytes:
    """The train file an experiment ran: from the attempts store, or from its commit for a keep."""
    from arun.core import gitops
    data = load_attempt(repo_dir, rec.get("train_sha256"))
    if data is None and rec.get("status") == "keep" and rec.get("commit") and rec.get("train_file"):
        try:
            data = gitops.file_at(repo_dir, rec["commit"], rec["train_file"])
        except Exception:  # a commit that is gone is reported below
            data = None
    if data is None:
        raise ArunError(f"the train file of {rec.get('id')} was not saved (.arun/attempts/ has no "
                        f"{str(rec.get('train_sha256'))[:12]}); it ran before arun kept attempts, or the file was deleted")
    return data


def restore_attempt(repo_dir: Path, rec: dict, force: bool = False) -> Path:
    """Writes the experiment's train file back; refuses to overwrite uncommitted edits unless `force`."""
    from arun.core import gitops
    repo_dir = Path(repo_dir)
    train_file = rec.get("train_file")
    if not train_file:
        raise ArunError(f"record {rec.get('id')} names no train file; it is not an experiment that ran")
    data = attempt_text(repo_dir, rec)
    target = repo_dir / train_file
    if not force and target.exists():
        try:
            committed = gitops.file_at(repo_dir, "HEAD", train_file)
        except Exception:  # not committed at all: any content is an uncommitted change
            committed = None
        if target.read_bytes() not in (committed, data):
            raise ArunError(f"{train_file} has uncommitted changes that restoring {rec.get('id')} would overwrite; "
                            f"commit or stash them, or pass --force")
    write_atomic(target, data)
    return target
