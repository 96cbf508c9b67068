"""
The fixed ends of every training run. Train files call check_export() once, right
after building the model (a forward the evaluator would refuse fails in seconds, not
after the whole budget), and finish_run() once, after training: it exports the trained
forward (engines.forward_file) for the harness's evaluator process, writes the training
diagnostics and prints a training summary. The number of record never comes from this
process.
Also the small helpers a train loop shares: the seed, the step log, fail-fast.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import prepare
from engines.atomic import write_json
from engines.forward_file import SUFFIX, ArtifactError, export_forward
from engines.summary_block import summary_text
from engines.timer import TimeBudget
from engines.weights import count_params, model_config, save_checkpoint


def env_seed(default: int) -> int:
    """$ARUN_SEED overrides a train file's SEED (the harness uses it for multi-seed scoring)."""
    return int(os.environ.get("ARUN_SEED", default))


def mfu_percent(flops_per_token: float, tokens: float, seconds: float, peak_flops: float | None) -> float | None:
    if not peak_flops or seconds <= 0:
        return None
    return 100.0 * flops_per_token * tokens / seconds / peak_flops


class StepLog:
    """Step lines for people and for the harness (its kill clock, progress bar and loss trajectory), at
    most a few per second. The format, and upstream's that the harness also reads: arun/core/steplines.py.

    Call it every step. The loss it prints is the mean over the steps since the previous line, not the
    last step's alone: one batch's loss jitters by several percent (a tiny model's, on 512 tokens, by
    about 0.25 nats), and the early stop (arun.core.early) reads this loss at every 5 % of the budget,
    where a few single batches would swamp any real difference between two runs."""

    def __init__(self, every_seconds: float = 0.5):
        self.every = every_seconds
        self.last = 0.0
        self.total, self.count = 0.0, 0

    def __call__(self, budget: TimeBudget, loss: float, tokens_per_step: int, dt: float, mfu: float | None,
                 epoch: int, force: bool = False) -> None:
        self.total += loss
        self.count += 1
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        mean = self.total / self.count
        self.total, self.count = 0.0, 0
        tok_s = tokens_per_step / dt if dt > 0 else 0.0
        mfu_text = f"{mfu:.1f}%" if mfu is not None else "n/a"
        print(f"step {budget.step:05d} | progress {100 * budget.progress:5.1f}% | loss {mean:.6f} | dt {dt * 1000:.0f}ms | "
              f"tok/s {tok_s:,.0f} | mfu {mfu_text} | epoch {epoch} | remaining {budget.remaining:.0f}s", flush=True)


def fail_fast(loss: float, step: int, limit: float = 100.0) -> None:
    """Stops a diverged run at once instead of burning the budget."""
    if not np.isfinite(loss):
        raise SystemExit(f"FAIL: training loss is {loss} at step {step}; lower the learning rates or check the model")
    if loss > limit:
        raise SystemExit(f"FAIL: training loss exploded to {loss:.1f} (> {limit}) at step {step}; lower the learning rates")


def hyperparameters(constants: dict) -> dict:
    """The ALL_CAPS constants of a train file's globals() (recorded with every result)."""
    return {k: v for k, v in constants.items()
            if k.isupper() and not k.startswith("_") and isinstance(v, (int, float, str, bool, tuple))}


def check_export(engine: Any, model: Any, forward: Callable[[Any], Any] | None = None) -> float:
    """
    The pre-flight: exports the untrained forward exactly as finish_run will (same exporter, same
    checks), beside the run's artifact, and deletes it. A forward that cannot be exported or uses
    an operator the evaluator refuses stops the run here with one line saying what to change.
    Call it after building the model and before the time budget starts (it is start-up time).
    Returns its seconds; the model's training mode is left as it was.
    """
    t0 = time.perf_counter()
    data = prepare.PreparedData.open()
    seq_len = int(data.manifest["max_seq_len"])
    target = os.environ.get("ARUN_ARTIFACT")
    folder = Path(target).parent if target else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    training = bool(getattr(model, "training", False))
    with tempfile.TemporaryDirectory(prefix="arun-preflight-", dir=folder) as tmp:
        path = Path(tmp) / f"preflight{SUFFIX[engine.name]}"
        try:
            export_or_exit(engine.name, exportable(engine.name, model, forward or model), model, path, seq_len)
        finally:
            model.train(training)
    seconds = time.perf_counter() - t0
    print(f"Export check: the untrained forward exports and passes the evaluator's checks ({seconds:.1f}s)", flush=True)
    return seconds


def export_or_exit(backend: str, forward: Callable[[Any], Any], model: Any, path: Path, seq_len: int) -> dict:
    """export_forward, with a refusal turned into the one-line INVALID:/FAIL: exit the harness records."""
    try:
        return export_forward(backend, forward, model, path, seq_len=seq_len)
    except ArtifactError as e:
        message = str(e)
        raise SystemExit(message if message.startswith(("INVALID:", "FAIL:")) else f"FAIL: {message}") from e


def exportable(backend: str, model: Any, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The function to export: torch.compile's wrapper is unwrapped (torch.export traces the module
    itself), and a torch model is put in eval mode first, as any evaluation would."""
    if backend == "cuda":
        model.eval()
        return getattr(forward, "_orig_mod", forward)
    return forward


def finish_run(engine: Any, model: Any, forward: Callable[[Any], Any], *, budget: TimeBudget, t_start: float,
               tokens_per_step: int, flops_per_token: float, seed: int, constants: dict,
               extra: dict | None = None, eval_batch_size: int | None = None) -> dict:
    """
    The one call a train file makes after training. model: the trained model (it owns the
    weights); forward: token ids (B, T) -> logits (B, T, V), the model itself or a compiled
    version of it, exported as a pure function; constants: the file's globals(), whose ALL_CAPS
    names are recorded. Under the harness ($ARUN_ARTIFACT) it exports the forward there and
    writes the result JSON ($ARUN_RESULT_JSON): training diagnostics only, no val_bpb. Run by
    hand, it exports to a temp file and scores it in this process with the evaluator's own code
    (engines.score), so upstream's summary block with val_bpb is printed as before.
    eval_batch_size (optional, from older train files) is recorded only: the evaluator chooses its own.
    """
    data = prepare.PreparedData.open()
    seq_len = int(data.manifest["max_seq_len"])
    by_hand = not os.environ.get("ARUN_ARTIFACT")
    with tempfile.TemporaryDirectory(prefix="arun-forward-") as tmp:
        path = Path(os.environ.get("ARUN_ARTIFACT") or Path(tmp) / f"forward{SUFFIX[engine.name]}")
        exported = export_or_exit(engine.name, exportable(engine.name, model, forward), model, path, seq_len)
        result = training_result(engine, model, budget, t_start, tokens_per_step, flops_per_token, seed, constants,
                                 data, exported)
        if eval_batch_size is not None:
            result["eval_batch_size"] = eval_batch_size
        result.update(extra or {})
        result = json.loads(json.dumps(result, default=float))
        checkpoint = os.environ.get("ARUN_CHECKPOINT")  # opt-in, for tests that inspect the weights' layout
        if checkpoint:
            save_checkpoint(model, checkpoint)
        if by_hand:
            result.update(score_in_process(engine.name, path, data.dir))
        else:
            result["total_seconds"] = time.time() - t_start
    print(summary_text(result, with_score=by_hand), flush=True)
    if os.environ.get("ARUN_RESULT_JSON"):
        write_json(os.environ["ARUN_RESULT_JSON"], result)
    return result


def training_result(engine: Any, model: Any, budget: TimeBudget, t_start: float, tokens_per_step: int,
                    flops_per_token: float, seed: int, constants: dict, data: Any, exported: dict) -> dict:
    """What the train process measured: the diagnostics of the record, never its score."""
    num_params = count_params(model)
    counted = budget.counted_steps
    train_tokens = budget.step * tokens_per_step
    result = {
        "training_seconds": budget.training_seconds,
        "total_seconds": time.time() - t_start,
        "peak_vram_mb": engine.peak_memory_mb(),
        "mfu_percent": mfu_percent(flops_per_token, counted * tokens_per_step, budget.training_seconds,
                                   engine.peak_flops()),
        "total_tokens_M": train_tokens / 1e6,
        "num_steps": budget.step,
        "num_params_M": num_params / 1e6,
        "depth": constants.get("DEPTH", 0),
        # beyond upstream's block: what the harness records
        "status": "ok",
        "backend": engine.name,
        "hardware": engine.hardware().to_dict(),
        "time_budget": budget.seconds,
        "warmup_steps": budget.warmup_steps,
        "warmup_seconds": budget.warmup_seconds,
        "last_step_seconds": budget.last_step_seconds,  # the harness lets the last step finish
        "export_seconds": exported["seconds"],
        "artifact_sha256": exported["sha256"],
        "artifact_bytes": exported["bytes"],
        "tokens_per_second": counted * tokens_per_step / budget.training_seconds if budget.training_seconds else None,
        "total_tokens": train_tokens,
        "num_params": num_params,
        "flops_per_token": flops_per_token,
        "seed": seed,
        "config": hyperparameters(constants),
        "data": data.key(),
    }
    if model_config(model):
        result["model_config"] = model_config(model)
    return result


def score_in_process(backend: str, artifact: Path, data_dir: Path) -> dict:
    """A run by hand scores its own export with the evaluator's function (the harness never uses this)."""
    from engines.score import ScoreError, score
    try:
        verdict = score(backend, artifact, data_dir)
    except ScoreError as e:
        raise SystemExit(e.args[0] if str(e.args[0]).startswith("INVALID:") else f"FAIL: {e.args[0]}") from e
    return {"val_bpb": verdict["val_bpb"], "eval_seconds": sum(verdict["seconds"].values()),
            "eval_tokens": verdict["tokens"], "eval_bytes": verdict["bytes"], "eval_nats": verdict["nats"],
            "causality_max_diff": verdict["causality"]["max_diff"]}
