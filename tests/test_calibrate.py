"""`arun calibrate` on the real train file (tiny corpus, reduced sizes), its refusal, and the
timeout rules it exists for: compilation before the first step never times out, a hang after it
does, a loop whose baseline cannot finish stops, and an `arun set` edit survives a timeout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arun.core.deadline import Limits
from arun.core.process import child_env, run_train_file
from arun.core.trainfile import constants
from helpers_repo import arun_env, assert_refused, changed_paths, git, inject, make_project

CLI = [sys.executable, "-c", "import sys; from arun.cli import main; sys.argv[0] = 'arun'; main()"]


def cli(repo: Path, env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def mlx_project(data_env: Path, tmp_path: Path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    make_project(repo, "train_mlx.py", overrides={"DEPTH": 2, "TOTAL_BATCH_SIZE": 1024, "DEVICE_BATCH_SIZE": 16})
    return repo, arun_env(data_env, data_env.parent)


def test_calibrate_probes_the_real_train_file_and_writes_its_sizes(mlx_project: tuple[Path, dict]) -> None:
    repo, env = mlx_project
    p = cli(repo, env, "calibrate", "--backend", "mlx", "--budget", "30", "--probe-seconds", "1",
            "--max-depth", "2", "--max-rows", "8", "--max-probes", "2")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    c = constants((repo / "train_mlx.py").read_text())
    assert 1 <= c["DEPTH"] <= 2 and c["TOTAL_BATCH_SIZE"] in (64 * r for r in (1, 2, 4, 8))
    assert c["TOTAL_BATCH_SIZE"] % (c["DEVICE_BATCH_SIZE"] * 64) == 0 and "EVAL_BATCH_SIZE" not in c
    assert "s / step" in p.stdout and "one-time compilation:" in p.stdout and "probe 1" in p.stdout
    # An ordinary edit of the train file: nothing else changed, nothing recorded, no probe left behind.
    assert changed_paths(repo) == ["train_mlx.py"]
    assert not (repo / "bench").exists()
    assert not list((repo / ".arun" / "runs").glob("calibrate-*"))


def test_calibrate_refuses_a_train_file_without_the_constants_it_sizes(mlx_project: tuple[Path, dict]) -> None:
    repo, env = mlx_project
    path = repo / "train_mlx.py"
    path.write_text(path.read_text().replace("\nDEVICE_BATCH_SIZE =", "\n_DEVICE_BATCH_SIZE ="))
    line = assert_refused(cli(repo, env, "calibrate", "--backend", "mlx"), "DEVICE_BATCH_SIZE")
    assert "arun calibrate sizes" in line


# --------------------------------------------------------------------------- when a run is killed

STEPPER = '''import json, os, sys, time
time.sleep(float(sys.argv[1]) if len(sys.argv) > 1 else {before})   # start-up and compilation
print("step 00001 | loss 1.0", flush=True)
time.sleep({after})
json.dump({{}}, open(os.environ["ARUN_RESULT_JSON"], "w"))
'''


def run_stepper(tmp_path: Path, data: Path, before: float, after: float, limits: Limits):
    repo = tmp_path / "proj"
    (repo / "run").mkdir(parents=True, exist_ok=True)
    (repo / "train.py").write_text(STEPPER.format(before=before, after=after))
    env = child_env(data, None, None, ARUN_RESULT_JSON=str(repo / "run" / "result.json"))
    return run_train_file(repo, "train.py", env, tmp_path / "run.log", limits)


def test_a_slow_start_before_the_first_step_is_not_a_timeout(data_env: Path, tmp_path: Path) -> None:
    # 4 s before the first step, against 2 s from the first step on: the old single clock would kill it.
    out = run_stepper(tmp_path, data_env, before=4, after=0, limits=Limits(first_step=60, after_step=2))
    assert out.status == "ok", out.error


def test_a_run_that_hangs_after_its_first_step_is_killed(data_env: Path, tmp_path: Path) -> None:
    out = run_stepper(tmp_path, data_env, before=0, after=600, limits=Limits(first_step=60, after_step=2))
    assert out.status == "timeout" and "after the first step" in out.error and "arun calibrate" not in out.error


def test_a_run_that_never_reaches_its_first_step_is_killed_at_the_cap(data_env: Path, tmp_path: Path) -> None:
    out = run_stepper(tmp_path, data_env, before=600, after=0, limits=Limits(first_step=2, after_step=600))
    assert out.status == "timeout" and "no step line within 2s" in out.error


@pytest.mark.unit
def test_default_limits_count_from_the_first_step_and_timeout_from_the_start() -> None:
    assert Limits.for_run(300) == Limits(first_step=1800, after_step=600, total=None)
    assert Limits.for_run(300, 20) == Limits(first_step=20, after_step=None, total=20)


# --------------------------------------------------------------------------- after a timeout

def hang(repo: Path) -> None:
    path = repo / "train_mlx.py"
    path.write_text(inject(path.read_text(), "def train(", "time.sleep(600)  # hangs", body=True))


def test_an_arun_set_edit_followed_by_a_timeout_is_restored(mlx_project: tuple[Path, dict]) -> None:
    repo, env = mlx_project
    head = (repo / "train_mlx.py").read_text()
    assert cli(repo, env, "set", "--backend", "mlx", "DEPTH=1", "MATRIX_LR=0.03").returncode == 0
    hang(repo)
    edited = (repo / "train_mlx.py").read_text()
    p = cli(repo, env, "--backend", "mlx", "--budget", "1", "--timeout", "3", "-m", "set, then hangs")
    assert p.returncode == 2 and "TIMEOUT" in p.stdout and "arun restore" in p.stdout, p.stdout[-2000:]
    assert (repo / "train_mlx.py").read_text() == head       # the timeout put the best commit back
    rec = [json.loads(line) for f in (repo / "bench").glob("*/ledger.jsonl") for line in f.read_text().splitlines()][-1]
    assert rec["status"] == "timeout"
    assert cli(repo, env, "restore", rec["id"]).returncode == 0
    assert (repo / "train_mlx.py").read_text() == edited     # ... and arun restore brings the edits back


def test_a_loop_whose_baseline_times_out_stops_with_a_hint(mlx_project: tuple[Path, dict]) -> None:
    repo, env = mlx_project
    hang(repo)
    git(repo, "commit", "-qam", "a baseline that hangs")
    p = cli(repo, env, "loop", "--backend", "mlx", "--agent", "true", "--iterations", "3", "--budget", "1",
            "--timeout", "3")
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "the baseline did not finish" in p.stdout and "arun calibrate --backend mlx" in p.stdout
    recs = [line for f in (repo / "bench").glob("*/ledger.jsonl") for line in f.read_text().splitlines()]
    assert len(recs) == 1                                     # it did not spin on the same baseline


# --------------------------------------------------------------------------- warm-up and the next command

def test_calibrate_sizes_warm_up_to_fit_and_names_the_device(data_env: Path, tmp_path: Path) -> None:
    """Slow steps (3 s each, as a loaded CPU box): the file's 10 warm-up steps would not fit the
    baseline's allowance, so calibrate lowers WARMUP_STEPS; the next command carries --device cpu."""
    repo = tmp_path / "repo"
    make_project(repo, "train_cuda.py", overrides={"DEPTH": 1, "TOTAL_BATCH_SIZE": 1024, "DEVICE_BATCH_SIZE": 16,
                                                   "COMPILE": False, "WARMUP_STEPS": 10})
    path = repo / "train_cuda.py"
    path.write_text(inject(path.read_text(), "budget.start_step()", "time.sleep(3.0)"))
    env = arun_env(data_env, data_env.parent)
    p = cli(repo, env, "calibrate", "--backend", "cuda", "--device", "cpu", "--budget", "30", "--probe-seconds", "1",
            "--max-depth", "1", "--max-rows", "16", "--max-probes", "1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert 1 <= constants(path.read_text())["WARMUP_STEPS"] < 10
    assert "WARMUP_STEPS=" in p.stdout and "next: arun --backend cuda --device cpu --budget 30" in p.stdout


@pytest.mark.unit
def test_warm_up_is_lowered_only_when_it_does_not_fit() -> None:
    from arun.search.calibrate import warmup_steps
    from arun.search.calibration_probe import Measure
    m = Measure({}, step_seconds=2.0, other_seconds=10.0)
    assert warmup_steps({"WARMUP_STEPS": 10}, m, 60.0) is None      # 1 + (30 - 10) / 2 = 11 fit: left as it is
    assert warmup_steps({"WARMUP_STEPS": 20}, m, 60.0) == 11
    assert warmup_steps({"WARMUP_STEPS": 10}, Measure({}, step_seconds=2.0, other_seconds=40.0), 60.0) == 1
    assert warmup_steps({"WARMUP_STEPS": 3}, m, 60.0) is None


# --------------------------------------------------------------------------- compiling, decided first

@pytest.mark.unit
def test_compile_is_decided_before_anything_compiles() -> None:
    from arun.search.calibrate import compile_choice
    off, why = compile_choice(True, "mlx", "cpu")
    assert off == {"COMPILE": False} and why and why.startswith("COMPILE=False")
    assert compile_choice(True, "mlx", "gpu") == ({}, None)          # Metal: compiling pays
    assert compile_choice(True, "cuda", "cpu") == ({}, None)         # train_cuda.py is eager on a CPU anyway
    assert compile_choice(True, "cuda", "gpu") == ({}, None)
    assert compile_choice(False, "mlx", "cpu") == ({}, None)         # nothing to switch off
    assert compile_choice(None, "mlx", "cpu") == ({}, None)          # a file without the constant is left alone


def test_calibrate_with_mlx_on_a_cpu_never_compiles(data_env: Path, tmp_path: Path) -> None:
    """The file says COMPILE=True: on a CPU every probe already runs with COMPILE=False (no minutes of
    kernel compiling first), and the written file says so with the reason."""
    repo = tmp_path / "repo"
    make_project(repo, "train_mlx.py", overrides={"DEPTH": 1, "TOTAL_BATCH_SIZE": 512, "DEVICE_BATCH_SIZE": 8,
                                                  "COMPILE": True})
    env = arun_env(data_env, data_env.parent)
    p = cli(repo, env, "calibrate", "--backend", "mlx", "--budget", "30", "--probe-seconds", "1",
            "--max-depth", "1", "--max-rows", "8", "--max-probes", "1")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    probes = [line for line in p.stdout.splitlines() if "arun calibrate: probe" in line]
    assert probes and all("COMPILE=False" in line for line in probes), p.stdout[-2000:]
    assert "decided before the first probe" in p.stdout
    assert constants((repo / "train_mlx.py").read_text())["COMPILE"] is False
