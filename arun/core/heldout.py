"""
The held-out test split, harness side: a keep's (or a baseline's) exported forwards are scored
once more, on the test rows, by the same evaluator process that gave their val_bpb.

The ratchet never reads the result. It is there to tell, the morning after, how much of a
night's val gain holds on documents no decision was ever made on (arun.report.val_vs_test).
Discards are not test-scored: the test rows would only cost time, and a number that never
decides anything needs to exist only for what was kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from arun.core.scoring import score_artifact
from engines.forward_file import SUFFIX


def run_artifacts(run_dir: Path, backend: str, runs: int) -> list[Path]:
    """The exported forwards of a run folder, one per seed in seed order (forward0.pt2, forward1.pt2, ...);
    empty when the folder holds none at all. A missing one among others is the evaluator's error to report."""
    paths = [Path(run_dir) / f"forward{i}{SUFFIX[backend]}" for i in range(runs)]
    return paths if any(p.exists() for p in paths) else []


def test_fields(verdicts: Sequence[dict]) -> dict | None:
    """The record's test fields from val verdicts that already carry `test_bpb` (the evaluator scores
    the test rows in the same process when a run may be kept), or None when any seed lacks one."""
    values = [x for v in verdicts if isinstance(x := v.get("test_bpb"), (int, float))]
    if not values or len(values) < len(verdicts):
        return None
    return {"test_bpb": statistics.fmean(values), "test_bpb_seeds": [float(x) for x in values],
            "test_seconds": sum(float((v.get("seconds") or {}).get("test") or 0.0) for v in verdicts)}


def score_test(ctx: Any, artifacts: Sequence[Path], out_dir: Path,
               log: Callable[[str], None] = print) -> dict:
    """Scores each artifact (one per seed) on the test rows; returns the record's fields:
    `test_bpb` (the mean over seeds, None when any seed could not be scored), `test_bpb_seeds`,
    `test_seconds`, and `test_error` when a seed failed (logged). A failure never changes the decision.

    ctx: the experiment's context (backend, data, device and key are read)."""
    t0 = time.perf_counter()
    values: list[float] = []
    error = None if artifacts else "no exported forward to score"
    for i, artifact in enumerate(artifacts):
        verdict = score_artifact(ctx.backend, Path(artifact), ctx.data.dir, Path(out_dir) / f"test{i}.json",
                                 device=ctx.device, split="test",
                                 expect_fixed_sha=(ctx.key or {}).get("fixed_code_sha256"), fixed_from=ctx.repo_dir)
        if verdict.get("error") or not isinstance(verdict.get("test_bpb"), (int, float)):
            error = f"seed {i + 1}/{len(artifacts)}: {verdict.get('error') or 'no test_bpb in the verdict'}"
            break
        values.append(float(verdict["test_bpb"]))
    fields: dict = {"test_bpb": None if error else statistics.fmean(values), "test_bpb_seeds": values,
                    "test_seconds": time.perf_counter() - t0}
    if error:
        fields["test_error"] = error
    if error and artifacts:  # (a success is shown by the reports; a run folder without forwards by the record)
        log(f"arun: the test rows could not be scored ({error}); the decision stands, test_bpb is left empty")
    return fields
