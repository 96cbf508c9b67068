"""
One calibration probe: the train file as it is, with some constants changed, run for a few seconds
exactly as an experiment runs it (confined, its own process group, arun.core.process), and what it
measured: seconds per step, the one-time compilation, memory, start-up and export. Nothing is recorded.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from arun.core.deadline import Limits
from arun.core.numbers import finite
from arun.core.process import child_env, run_train_file
from arun.core.steplines import StepLine
from arun.core.trainfile import rewrite_constants
from engines.forward_file import SUFFIX


@dataclass
class Measure:
    """What one probe measured (seconds, MB); error is set when it did not finish."""
    config: dict
    step_seconds: float = float("nan")     # one counted step, after compilation
    compile_seconds: float = float("nan")  # the warm-up steps beyond their share of step time
    startup_seconds: float = float("nan")  # process start to the first step: imports, data, model
    other_seconds: float = float("nan")    # everything but counted training: start-up, warm-up, export
    memory_mb: float | None = None          # the engine's peak, where it reports one
    memory_gb: float | None = None          # the device's memory
    wall_seconds: float = 0.0
    error: str | None = None


def probe(repo_dir: Path, train_file: str, text: str, overrides: dict, *, backend: str, data_dir: Path,
          device: str | None, seconds: float, work_dir: Path, first_step_limit: float = 600.0) -> Measure:
    """Runs `text` (the train file) with `overrides` for `seconds` of training in work_dir (under the
    repo's .arun/runs/, the only place a confined run may write); work_dir is removed afterwards."""
    m = Measure(dict(overrides))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        script = work_dir / Path(train_file).name
        script.write_text(rewrite_constants(text, overrides))
        env = child_env(data_dir, device, None, ARUN_TIME_BUDGET=repr(float(seconds)),
                        ARUN_RESULT_JSON=str(work_dir / "result.json"),
                        ARUN_ARTIFACT=str(work_dir / f"forward{SUFFIX[backend]}"),
                        PYTHONPATH=str(repo_dir))  # the copy imports prepare and engines from the repo
        env.pop("ARUN_CHECKPOINT", None)
        first: list[float] = []
        t0 = time.perf_counter()

        def on_line(line: str, step: StepLine | None) -> None:
            if not first and step is not None:
                first.append(time.perf_counter() - t0)

        out = run_train_file(repo_dir, str(script), env, work_dir / "run.log",
                             Limits(first_step=first_step_limit, after_step=seconds + 120.0), on_line)
        m.wall_seconds = out.wall_seconds
        if out.status != "ok" or not out.result:
            m.error = out.error or out.status
            return m
        r = out.result
        steps = int(r.get("num_steps") or 0) - int(r.get("warmup_steps") or 0)
        training = finite(r.get("training_seconds")) or 0.0
        if steps < 1 or training <= 0:
            m.error = "the probe took no counted step"
            return m
        m.step_seconds = training / steps
        warm = finite(r.get("warmup_seconds")) or 0.0
        m.compile_seconds = max(0.0, warm - int(r.get("warmup_steps") or 0) * m.step_seconds)
        m.startup_seconds = max(0.0, (first[0] if first else out.wall_seconds) - warm)
        m.other_seconds = max(0.0, out.wall_seconds - training)
        mem = finite(r.get("peak_vram_mb"))
        m.memory_mb = mem if mem else None
        m.memory_gb = finite((r.get("hardware") or {}).get("memory_gb"))
        return m
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
