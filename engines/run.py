"""
The fixed end of every training run: causality probe, evaluation, summary,
result JSON and checkpoint. Train files call finish_run() and nothing else
after training, so the number they report is always produced by fixed code.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.evaluator import EVALUATOR_VERSION, CausalityError, check_causality, evaluate_bpb
from engines.report import finish
from engines.timer import TimeBudget


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


def finish_run(engine: Any, logits_fn: Callable[[Any], Any], *, budget: TimeBudget, t_start: float,
               tokens_per_step: int, num_params: int, flops_per_token: float, depth: int, eval_batch_size: int,
               vocab_size: int, config: dict, seed: int, save_weights: Callable[[Path], None] | None = None,
               extra: dict | None = None) -> dict:
    """Probe causality, evaluate on the fixed val rows, print the summary, write the result JSON."""
    import prepare

    data = prepare.PreparedData.open()
    rows, token_bytes = data.val_rows(), data.token_bytes()
    t_eval = time.perf_counter()
    try:
        causality_diff = check_causality(engine, logits_fn, rows, eval_batch_size, vocab_size, seed=seed)
    except CausalityError as e:
        raise SystemExit(f"INVALID: {e}")
    result_eval = evaluate_bpb(engine, logits_fn, eval_batch_size, rows, token_bytes)
    eval_seconds = time.perf_counter() - t_eval

    checkpoint = os.environ.get("ARUN_CHECKPOINT")
    if checkpoint and save_weights is not None:
        path = Path(checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(path)

    hw = engine.hardware()
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
        "depth": depth,
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
        "config": config,
        "data": data.key(),
    }
    result.update(extra or {})
    return finish(json.loads(json.dumps(result, default=float)))
