"""
Files the harness shares with a process it confines (a train process's run folder, the loop agent's
exchange folder). The other side may plant anything there: a symlink to a key, a FIFO, thousands of
names that carry data to the next run. So the harness never follows a link in such a folder: it reads
only regular files (O_NOFOLLOW, fstat, a size cap), writes only files it has just created itself
(O_CREAT|O_EXCL|O_NOFOLLOW), and after a train process exits it prunes the run folder to the names it
hands out itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from engines.forward_file import SUFFIX


def harness_names(backend: str, runs: int) -> set[str]:
    """The entries of a run folder the harness names (per seed i): result, forward, val and test verdicts."""
    return {n for i in range(runs)
            for n in (f"result{i}.json", f"forward{i}{SUFFIX[backend]}", f"score{i}.json", f"test{i}.json")}


def prune(folder: Path, keep: Iterable[str]) -> int:
    """Removes every entry of folder but the names in keep, and those too unless they are plain regular
    files with one link (a symlink, FIFO or hard link would make the harness read or write elsewhere).
    Links are removed, never followed. Returns how many entries went."""
    keep, gone = set(keep), 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        p = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(p)
            if name in keep and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                continue
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p)  # lstat said a real folder; rmtree unlinks links inside, never follows them
            else:
                os.unlink(p)
            gone += 1
    return gone


def read_regular(path: Path, cap: int) -> bytes | None:
    """Up to cap bytes of path when it is a regular file reached without following a link, else None
    (missing, a symlink, a FIFO, a device: the caller notes it and goes on without)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(cap)


def remove(path: Path) -> None:
    """path gone, whatever it is (a link is unlinked, never followed; a real folder with its contents)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def create_fresh(path: Path, mode: int = 0o600) -> int:
    """A new file at path the harness alone made (whatever was there, a link included, is removed
    first; O_EXCL|O_NOFOLLOW refuse anything planted in between). Returns a writable fd."""
    remove(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
