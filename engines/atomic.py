"""
Write-then-rename, the one way this project replaces a file a reader may be looking at (a train
file, a result JSON, a verdict, the harness's state files). A kill mid-write leaves the old file
or the new one, never half of either; what it can leave is a temp file beside the target, named
`.<name>.<pid>-<random>.arun-tmp` (the harness's scope check ignores that suffix).

It lives in the fixed code because both sides write files: the train process its result JSON
(engines.run), the harness everything else; the fixed code never imports the harness.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

TMP_SUFFIX = ".arun-tmp"


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """Replaces path's content with data in one rename, keeping an existing file's mode (a new file
    gets the umask's). The temp file is created exclusively and never through a link, so a link
    planted at the target or beside it is replaced, never written through."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.is_file() and not path.is_symlink():
                os.fchmod(f.fileno(), path.stat().st_mode & 0o7777)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: object, indent: int | None = 2, sort_keys: bool = False) -> None:
    """obj as JSON (non-JSON numbers such as numpy's as floats), written atomically; the folder is made."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=float) + "\n")
