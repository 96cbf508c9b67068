"""
The harness's side of the boundary: it hands an exported forward to the fixed evaluator process
(`python -m engines.score`) and reads back the verdict. The number of record comes from here,
never from the train process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from arun.core import confine
from arun.core.process import child_env, last_error_line
from engines.fingerprint import fixed_files

SCORE_TIMEOUT_FLOOR = 300.0  # a cold compile of the evaluator's graph on a slow machine


def score_artifact(backend: str, artifact: Path, data_dir: Path, out: Path, *, device: str | None = None,
                   split: str = "val", expect_fixed_sha: str | None = None,
                   timeout: float = SCORE_TIMEOUT_FLOOR, fixed_from: Path | None = None,
                   test_below: float | None = None) -> dict:
    """Scores `artifact` on the fixed rows of `split`; returns the verdict (with `error` and no score
    when it could not be scored) and adds `wall_seconds`, the harness's view of the process, and
    `confined`/`confinement`.
    test_below: also score the test rows in the same process when val_bpb is below it.
    fixed_from: a project whose fixed code (engines.fingerprint.fixed_files, nothing else) the
    evaluator runs, copied into its private folder; else the installed arun's."""
    args = ["--backend", backend, "--artifact", str(artifact),
            "--data-dir", str(data_dir), "--out", str(out), "--split", split]
    if device:
        args += ["--device", device]
    if expect_fixed_sha:
        args += ["--expect-fixed-sha", expect_fixed_sha]
    if test_below is not None:
        args += ["--test-below", repr(float(test_below))]
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    # The working directory is a fresh empty folder: nothing the agent left in the repo can shadow
    # a module the evaluator imports (and -I keeps the working folder off sys.path as well).
    # Confined where the OS can: it reads the data, the artifact and fixed code, writes only `out`'s
    # folder and its temp folder (so nothing in the artifact can reach the ledger or the repo).
    with tempfile.TemporaryDirectory(prefix="arun-score-") as cwd:
        env = child_env(data_dir, device)
        env.pop("PYTHONPATH", None)
        if fixed_from is not None:
            # Only the fixed files cross over: the key's fixed_code_sha256 is their hash, and no other
            # file of the project (an agent's numpy.py, a stale .pyc) can shadow a module.
            for rel in fixed_files(Path(fixed_from)):
                (Path(cwd) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(fixed_from) / rel, Path(cwd) / rel)
        # Isolated (-I -S): no PYTHON* variable, user site, .pth or sitecustomize, confined or not.
        cmd = confine.isolated_module("engines.score", args, first=Path(cwd) if fixed_from is not None else None)
        policy = confine.scorer_policy(data_dir, artifact, out.parent, Path(cwd) / "tmp")
        policy.read.append(Path(cwd))
        run = confine.wrap(policy, cmd, env)
        try:
            p = subprocess.run(run.cmd, cwd=cwd, env=run.env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            return {"error": f"the evaluator did not finish in {timeout:.0f}s", "wall_seconds": timeout, **run.fields()}
    wall = time.perf_counter() - t0
    try:
        verdict = json.loads(out.read_text())
    except (OSError, json.JSONDecodeError):
        tail = last_error_line(p.stderr.splitlines() + p.stdout.splitlines())
        verdict = {"error": f"the evaluator failed (exit {p.returncode}): {tail}"}
    if p.returncode != 0 and "error" not in verdict:
        verdict["error"] = f"the evaluator exited {p.returncode}"
    verdict.update(wall_seconds=wall, **run.fields())
    return verdict
