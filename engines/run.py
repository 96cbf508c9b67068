"""
The fixed end of every training run: causality probe, evaluation, summary,
result JSON and checkpoint. Train files call finish_run() once, after training,
and nothing else, so the number they report is always produced by fixed code.
Also the small helpers a train loop shares: the seed, the step log, fail-fast.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import numpy as np

import prepare
from engines.evaluator import EVALUATOR_VERSION, CausalityError, check_causality, evaluate_bpb
from engines.report import finish
from engines.timer import TimeBudget
from engines.weights import count_params, inference, model_config, save_checkpoint


def env_seed(default: int) -> int:
    """$ARUN_SEED overrides a train file's SEED (the harness uses it for multi-seed scoring)."""
    return int(os.environ.get("ARUN_SEED", default))


def mfu_percent(flops_per_token: float, tokens: float, seconds: float, peak_flops: float | None) -> float | None:
    if not peak_flops or seconds <= 0:
        return None
    return 100.0 * flops_per_token * tokens / seconds / peak_flops


class StepLog:
    """Step lines for people and for the harness's progress bar, at most a few per second."""

    def __init__(self, every_seconds: float = 0.5):
        self.every = every_seconds
        self.last = 0.0

    def __call__(self, budget: TimeBudget, loss: float, tokens_per_step: int, dt: float, mfu: float | None,
                 epoch: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        tok_s = tokens_per_step / dt if dt > 0 else 0.0
        mfu_text = f"{mfu:.1f}%" if mfu is not None else "n/a"
        print(f"step {budget.step:05d} | progress {100 * budget.progress:5.1f}% | loss {loss:.6f} | dt {dt * 1000:.0f}ms | "
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


def finish_run(engine: Any, model: Any, forward: Callable[[Any], Any], *, budget: TimeBudget, t_start: float,
               tokens_per_step: int, flops_per_token: float, eval_batch_size: int, seed: int, constants: dict,
               extra: dict | None = None) -> dict:
    """
    The one call a train file makes after training. model: the trained model (its parameters
    are the checkpoint; its `config` dataclass, when it has one, rebuilds it); forward: token ids
    (B, T) -> logits (B, T, V), the model itself or a compiled version of it; constants: the
    file's globals(), whose ALL_CAPS names are recorded. Probes causality, evaluates on the fixed
    val rows, saves the checkpoint ($ARUN_CHECKPOINT), prints the summary, writes the result JSON.
    """
    data = prepare.PreparedData.open()
    rows, token_bytes = data.val_rows(), data.token_bytes()
    logits_fn = inference(engine, model, forward)
    t_eval = time.perf_counter()
    try:
        causality_diff = check_causality(engine, logits_fn, rows, eval_batch_size, data.manifest["vocab_size"],
                                         seed=seed)
    except CausalityError as e:
        raise SystemExit(f"INVALID: {e}")
    result_eval = evaluate_bpb(engine, logits_fn, eval_batch_size, rows, token_bytes)
    eval_seconds = time.perf_counter() - t_eval

    checkpoint = os.environ.get("ARUN_CHECKPOINT")
    if checkpoint:
        save_checkpoint(model, checkpoint)

    hw = engine.hardware()
    num_params = count_params(model)
    counted = budget.counted_steps
    train_tokens = budget.step * tokens_per_step
    steady_mfu = mfu_percent(flops_per_token, counted * tokens_per_step, budget.training_seconds, engine.peak_flops())
    result = {
        "val_bpb": result_eval.val_bpb,
        "training_seconds": budget.training_seconds,
        "total_seconds": time.time() - t_start,
        "peak_vram_mb": engine.peak_memory_mb(),
        "mfu_percent": steady_mfu,
        "total_tokens_M": train_tokens / 1e6,
        "num_steps": budget.step,
        "num_params_M": num_params / 1e6,
        "depth": constants.get("DEPTH", 0),
        # beyond upstream's block: what the harness records
        "status": "ok",
        "backend": engine.name,
        "hardware": hw.to_dict(),
        "time_budget": budget.seconds,
        "warmup_steps": budget.warmup_steps,
        "warmup_seconds": budget.warmup_seconds,
        "eval_seconds": eval_seconds,
        "eval_tokens": result_eval.tokens,
        "eval_bytes": result_eval.bytes,
        "eval_nats": result_eval.nats,
        "evaluator_version": EVALUATOR_VERSION,
        "causality_max_diff": causality_diff,
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
    result.update(extra or {})
    return finish(json.loads(json.dumps(result, default=float)))
