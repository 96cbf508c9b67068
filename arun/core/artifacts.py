"""
Kept forwards, content-addressed under .arun/artifacts/<sha256><suffix>, so any kept record can be
re-scored later (`arun audit`). A record names its artifact by sha256; the store never holds two
copies of one forward and never keeps a file whose bytes do not match its name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from engines.artifact import SUFFIX
from prepare import sha256_file

KEEP_RECENT = 20  # besides each key's best, the newest kept forwards stay on disk


def store_dir(repo_dir: Path) -> Path:
    return Path(repo_dir) / ".arun" / "artifacts"


def path_for(repo_dir: Path, backend: str, sha256: str) -> Path:
    return store_dir(repo_dir) / f"{sha256}{SUFFIX[backend]}"


def store(repo_dir: Path, backend: str, artifact: Path) -> tuple[str, Path]:
    """Moves a scored artifact into the store (hashing what is moved); returns (sha256, stored path)."""
    sha = sha256_file(artifact)
    dest = path_for(repo_dir, backend, sha)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        artifact.unlink(missing_ok=True)
    else:
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.move(str(artifact), tmp)
        os.replace(tmp, dest)
    return sha, dest


def retain(repo_dir: Path, records: list[dict], keep_recent: int = KEEP_RECENT) -> list[Path]:
    """Deletes stored forwards no longer needed: kept are each key's best and the newest kept records'
    forwards. Returns what was deleted."""
    kept = [r for r in records if r.get("status") == "keep" and r.get("artifact_sha256")]
    wanted = {r["artifact_sha256"] for r in kept[-keep_recent:]}
    best: dict[str, dict] = {}
    for r in kept:
        v = r.get("val_bpb")
        if isinstance(v, (int, float)) and (r.get("key_id") not in best or v < best[r["key_id"]]["val_bpb"]):
            best[r["key_id"]] = r
    wanted |= {r["artifact_sha256"] for r in best.values()}
    removed = []
    for path in store_dir(repo_dir).glob("*"):
        if path.name.split(".")[0] not in wanted and not path.name.startswith("."):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def disk_use(repo_dir: Path) -> tuple[int, int]:
    """(files, bytes) in the store, for `arun doctor`."""
    files = [p for p in store_dir(repo_dir).glob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
