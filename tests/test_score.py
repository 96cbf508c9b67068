"""
The evaluator process's own defences, below the harness: its seal (after reading its inputs it can
open no data file and make no TCP connection), the boundary copy (only a plain regular file of its
own, bounded), the nonce-marked verdict line, and its scratch folder removed on an interrupt.
The attacks through the real harness are in tests/attacks/test_evaluator.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from arun.core.scoring import BoundaryError, copy_artifact, read_verdict
from engines import sandbox
from engines.score import verdict_line
from helpers_repo import pid_alive

landlock = pytest.mark.skipif(sandbox.landlock_abi() < 4, reason="needs Landlock ABI >= 4 (Linux >= 6.7)")

SEALED = '''
import socket, sys
from engines.score import seal
ok, how = seal("mlx", "cpu")
assert ok, how
for path in sys.argv[1:]:
    try:
        open(path, "rb").read(1)
        print("READ", path)
    except PermissionError:
        print("denied", path)
s = socket.socket()
try:
    s.connect(("127.0.0.1", 9))
    print("CONNECTED")
except PermissionError:
    print("denied tcp")
except OSError as e:
    print("tcp refused by the peer, not the seal:", e)
'''


@landlock
def test_a_sealed_evaluator_can_open_no_data_file_and_make_no_connection(tiny_data: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    targets = [str(tiny_data / "val_rows.npy"), str(tiny_data / "test_rows.npy"), str(secret), "/etc/hostname"]
    p = subprocess.run([sys.executable, "-c", SEALED, *targets], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TMPDIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:len(targets) + 1] == [f"denied {t}" for t in targets] + ["denied tcp"], p.stdout


@pytest.mark.unit
def test_only_a_plain_regular_file_crosses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real.mlxfn"
    real.write_bytes(b"abc")
    dest = tmp_path / "dest"
    dest.mkdir()
    copy_artifact(real, dest / "ok")
    assert (dest / "ok").read_bytes() == b"abc" and (dest / "ok").stat().st_mode & 0o777 == 0o600
    (tmp_path / "link").symlink_to(real)
    os.mkfifo(tmp_path / "fifo")
    os.link(real, tmp_path / "hard")
    for name, why in [("link", "symlink"), ("fifo", "fifo"), ("hard", "hard links"), ("missing", "no exported")]:
        with pytest.raises(BoundaryError, match=why):
            copy_artifact(tmp_path / name, dest / name)
    big = tmp_path / "big.mlxfn"
    big.write_bytes(b"x" * 100)
    monkeypatch.setattr("engines.forward_file.MAX_ARTIFACT_BYTES", 10)
    with pytest.raises(BoundaryError, match="more than the limit"):
        copy_artifact(big, dest / "big")


@pytest.mark.unit
def test_only_the_line_with_the_nonce_is_the_verdict() -> None:
    real = verdict_line("n1", {"val_bpb": 3.0})
    fake = verdict_line("n0", {"val_bpb": 0.1})
    assert read_verdict(f"{fake}\n{real}\n", "n1") == {"val_bpb": 3.0}
    assert read_verdict(f"{fake}\n", "n1") is None
    assert read_verdict(f"{real}\n{real}\n", "n1") is None   # two lines with our nonce: neither is trusted


# Ctrl-C while the harness waits on the evaluator: a real SIGINT, sent the moment the wait begins (a
# timer raced the scoring, which a bad artifact ends in a quarter of a second: the alarm could come after
# it, even during the interpreter's exit).
INTERRUPTED = '''
import os, signal, subprocess, sys
from pathlib import Path
from arun.core.scoring import score_artifact
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job's children start with it ignored)
wait = subprocess.Popen.communicate
def ctrl_c_while_waiting(self, *args, **kwargs):
    print("evaluator", self.pid, flush=True)
    os.kill(os.getpid(), signal.SIGINT)
    return wait(self, *args, **kwargs)
subprocess.Popen.communicate = ctrl_c_while_waiting
try:
    score_artifact("mlx", Path(sys.argv[1]), Path(sys.argv[2]))
except KeyboardInterrupt:
    print("interrupted")
'''


def test_the_scratch_folder_is_removed_when_scoring_is_interrupted(tiny_data: Path, tmp_path: Path) -> None:
    artifact = tmp_path / "forward.mlxfn"
    artifact.write_bytes(b"not a graph, but the interrupt comes first")
    temp = tmp_path / "t"
    temp.mkdir()
    p = subprocess.run([sys.executable, "-c", INTERRUPTED, str(artifact), str(tiny_data)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "TMPDIR": str(temp)})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("evaluator ") and lines[-1] == "interrupted", p.stdout + p.stderr
    assert list(temp.iterdir()) == [], list(temp.iterdir())
    pid = int(lines[0].split()[1])
    assert not pid_alive(pid)
