"""
State carried between runs through run.log (a red-team replay): the train file prints its weights
as text, run.log carries them to the agent, the agent pastes them into a constant of the train
file, and each run continues the last one's training. Bounded at both ends, through the real
harness path: a train-process line reaches run.log cut to MAX_LINE_CHARS, its whole output to
MAX_LOG_BYTES; a train file over MAX_TRAIN_FILE_BYTES is refused before anything runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from arun.core.errors import ArunError
from arun.core.experiment import MAX_TRAIN_FILE_BYTES
from arun.core.process import MAX_LINE_CHARS, MAX_LOG_BYTES
from arun.core.steplines import parse_step_line
from helpers_repo import inject
from test_harness import MINI_MLX, _snapshot, make_repo, run

# After training, before the export: one 1 MB line, then 2 MB of 1000-character lines.
FLOOD = '''
print("W" * 1_000_000, flush=True)
for _i in range(2000):
    print("w" * 1000)
'''


def test_a_run_that_prints_megabytes_reaches_run_log_bounded_and_is_recorded(data_env: Path, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": inject(MINI_MLX, "finish_run(ENGINE", FLOOD, before=True)})
    rec = run(repo, "mlx", "prints its weights")
    assert rec["status"] == "keep" and rec["val_bpb"] is not None, rec.get("error")
    assert rec["num_steps"] and rec["num_steps"] > 0               # the step lines were read as before
    text = (repo / "run.log").read_text()
    assert len(text.encode()) < MAX_LOG_BYTES + 64 * 1024, len(text)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) < MAX_LINE_CHARS + 100
    assert f"[arun: {1_000_000 - MAX_LINE_CHARS} more characters of this line cut]" in text
    assert "is cut from run.log (over 512 KB)" in text
    assert any(parse_step_line(ln) for ln in lines)                         # step lines before the flood parse
    assert f"val_bpb:          {rec['val_bpb']:.6f}" in lines              # the harness's summary after it


def test_a_train_file_over_the_size_cap_is_refused_and_nothing_is_recorded(data_env: Path, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    text = MINI_MLX + f'\n_CARRIED = "{"A" * 300 * 1024}"\n'   # weights pasted from run.log
    (repo / "train_mlx.py").write_text(text)
    before = _snapshot(repo)
    with pytest.raises(ArunError) as e:
        run(repo, "mlx", "continues the last run")
    msg = str(e.value)
    assert f"train_mlx.py is {len(text) // 1024} KB, above the 256 KB cap" in msg and "\n" not in msg, msg
    assert MAX_TRAIN_FILE_BYTES == 256 * 1024
    assert _snapshot(repo) == before
    assert not (repo / ".arun").exists() and not (repo / "run.log").exists()
    assert not list(repo.glob("bench/*/ledger.jsonl"))
