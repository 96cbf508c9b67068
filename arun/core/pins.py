"""
Run pins, `.arun/pins/<branch>.json`: the commit a run branch started from and the hash of the
fixed code at that moment. The scope guard compares against the pin, not against HEAD, so a
committed edit of the evaluator (or of anything but the train file) is refused like an uncommitted
one; and the hash must still match, whatever git says.
"""

from __future__ import annotations

import json
from pathlib import Path

from arun.core.errors import ArunError
from engines.atomic import write_json
from engines.fingerprint import fixed_code_sha256


def pin_path(repo_dir: Path | str, branch: str) -> Path:
    return Path(repo_dir) / ".arun" / "pins" / f"{branch}.json"


def read_pin(repo_dir: Path | str, branch: str | None) -> dict | None:
    """{"branch", "base", "fixed_code_sha256"} for this branch, or None when it has none."""
    if not branch:
        return None
    path = pin_path(repo_dir, branch)
    try:
        pin = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        raise ArunError(f"{path} is unreadable; restore it, or start a new run: arun start NAME") from None
    if not isinstance(pin, dict) or not isinstance(pin.get("base"), str) or not isinstance(pin.get("fixed_code_sha256"), str):
        raise ArunError(f"{path} is not a run pin; restore it, or start a new run: arun start NAME")
    return pin


def write_pin(repo_dir: Path | str, branch: str, base: str) -> dict:
    """Pins `branch` to `base` and the fixed code as it is now (atomically; an existing pin is kept)."""
    path = pin_path(repo_dir, branch)
    existing = read_pin(repo_dir, branch)
    if existing is not None:
        return existing
    pin = {"branch": branch, "base": base, "fixed_code_sha256": fixed_code_sha256(Path(repo_dir))}
    write_json(path, pin, indent=1)
    return pin
