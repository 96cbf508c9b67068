"""
A keep must be reproduced: the run's saved weights are evaluated again by fixed code in a fresh
process (`python -m arun.core.verify`), and every run's timing is audited from outside.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from arun.core.process import RunOutcome, child_env, last_error_line
from arun.core.verify import audit_timing, matches

VERIFY_MODULE = "arun.core.verify"


def audit_outcomes(outcomes: list[RunOutcome], budget: float, verdicts: list[dict] | None = None) -> str | None:
    """The outside timing audit (arun.core.verify.audit_timing) of every run: the first reason one cannot be true."""
    for i, o in enumerate(outcomes):
        if o.result is not None:
            reference = verdicts[i] if verdicts and i < len(verdicts) else None
            reason = audit_timing(o.result, o.wall_seconds, budget, reference=reference)
            if reason:
                return reason
    return None


def reproduce(repo_dir: Path, run_dir: Path, backend: str, outcomes: list[RunOutcome], data_dir: Path,
              device: str | None, timeout: float, budget: float) -> str | None:
    """A keep must be reproduced: each run's saved weights are evaluated by `python -m arun.core.verify`, a
    fresh process running fixed code (the train file is imported for its model only). Returns why the
    claim does not stand, or None. Runs with the lock held, so the train file is the one that ran."""
    verdicts: list[dict] = []
    env = child_env(data_dir, device)
    for i, o in enumerate(outcomes):
        assert o.result is not None
        checkpoint, out = run_dir / f"weights{i}.npz", run_dir / f"verify{i}.json"
        batch = (o.result.get("config") or {}).get("EVAL_BATCH_SIZE")
        batch = batch if isinstance(batch, int) and 0 < batch <= 1024 else 32
        cmd = [sys.executable, "-m", VERIFY_MODULE, "--backend", backend, "--repo", str(repo_dir),
               "--checkpoint", str(checkpoint), "--batch-size", str(batch), "--out", str(out)]
        try:
            p = subprocess.run(cmd, cwd=repo_dir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            return f"the harness's re-evaluation of the weights did not finish in {timeout:.0f}s"
        try:
            verdict = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError):
            tail = last_error_line(p.stderr.splitlines() + p.stdout.splitlines())
            return f"the harness's re-evaluation of the weights failed (exit {p.returncode}): {tail}"
        if "invalid" in verdict:
            return f"the harness's re-evaluation: {verdict['invalid']}"
        if "error" in verdict:
            return f"the claim cannot be reproduced: re-evaluating the saved weights ({checkpoint.name}) failed: {verdict['error']}"
        claimed = float(o.result["val_bpb"])
        if not matches(claimed, float(verdict["val_bpb"])):
            return (f"the run claims val_bpb {claimed:.6f}, the harness's re-evaluation of its weights gives "
                    f"{verdict['val_bpb']:.6f}: not reproduced")
        verdicts.append(verdict)
    return audit_outcomes(outcomes, budget, verdicts)
