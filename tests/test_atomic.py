"""engines.atomic: the one write-then-rename every file replacement in the project goes through."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from engines import atomic
from engines.atomic import TMP_SUFFIX, write_atomic, write_json


def test_a_file_is_replaced_whole_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "train.py"
    path.write_text("old\n")
    path.chmod(0o750)
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o750
    write_atomic(tmp_path / "fresh.bin", b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "fresh.bin").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.bin", "train.py"]


def test_a_link_at_the_target_is_replaced_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "verdict.json").symlink_to(victim)
    write_json(tmp_path / "verdict.json", {"val_bpb": 1.0})
    assert victim.read_text() == "keep me" and not (tmp_path / "verdict.json").is_symlink()
    assert json.loads((tmp_path / "verdict.json").read_text()) == {"val_bpb": 1.0}


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "result.json"
    write_json(path, {"n": 1})

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_json(path, {"n": 2})
    assert json.loads(path.read_text()) == {"n": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TMP_SUFFIX)]


def test_json_is_made_in_a_new_folder_with_numbers_of_any_kind(tmp_path: Path) -> None:
    import numpy as np
    write_json(tmp_path / "a" / "b.json", {"x": np.float32(0.5)}, indent=None)
    assert (tmp_path / "a" / "b.json").read_text() == '{"x": 0.5}\n'
