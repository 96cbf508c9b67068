"""
The content hash of the fixed code that scores runs. The comparability key carries it,
so a committed change to the evaluator starts a new key instead of ratcheting against
numbers the old code produced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FIXED_FILES = ("prepare.py",)
FIXED_DIRS = ("arun_data", "engines")   # every *.py below these; a missing one is skipped


def fixed_files(repo_dir: Path) -> list[str]:
    """Relative POSIX paths of the fixed code under repo_dir, sorted."""
    repo_dir = Path(repo_dir)
    found = {f for f in FIXED_FILES if (repo_dir / f).is_file()}
    for d in FIXED_DIRS:
        if (repo_dir / d).is_dir():
            found.update(p.relative_to(repo_dir).as_posix() for p in (repo_dir / d).rglob("*.py")
                         if p.is_file() and "__pycache__" not in p.parts)
    return sorted(found)


def fixed_code_sha256(repo_dir: Path) -> str:
    """sha256 over (path, length, content) of every fixed file: a rename, an edit or a new file changes it."""
    h = hashlib.sha256()
    for rel in fixed_files(repo_dir):
        content = (Path(repo_dir) / rel).read_bytes()
        h.update(f"{rel}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()
