"""
The harness's own evaluation of a run's saved weights, in a fresh process
running fixed code: the train file is imported only for its model definition
(importing it trains nothing), the weights are loaded, and engines/ probes
causality and computes val_bpb. A keep needs this number to match the run's
claim, so a train file that prints or writes a fake val_bpb is never kept.

The model is rebuilt from the train file's GPTConfig/GPT and the checkpoint's
sidecar JSON ({"config": {...}}), its weights loaded by engines.weights; a train
file with another model shape defines `load_eval_model(config, weights) -> logits_fn` instead.

    python -m arun.core.verify --backend cuda --repo . --checkpoint w.npz --out verdict.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.weights import import_weights, inference

REL_TOLERANCE = 2e-3   # bf16 training vs a re-evaluation of the same weights: far below any real gain
MAX_WARMUP_STEPS = 20  # uncounted steps a train file may take (upstream uses 10)


def load_train_module(path: Path):
    spec = importlib.util.spec_from_file_location("arun_train_module", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    # Registered before it runs: dataclasses (GPTConfig) look their module up in sys.modules while the
    # class is built, which fails for a train file using `from __future__ import annotations` (train_mlx.py).
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_logits_fn(backend: str, module: Any, config: dict, weights: dict[str, np.ndarray], engine: Any) -> Callable:
    """The model from the train file's own definition, with the run's weights, as an inputs -> logits function."""
    if hasattr(module, "load_eval_model"):
        return module.load_eval_model(config, weights)
    cfg = module.GPTConfig(**config)
    model = module.GPT(cfg).to(engine.device()) if backend == "cuda" else module.GPT(cfg)
    if hasattr(model, "init_weights"):
        model.init_weights()  # builds rotary tables and attention masks; the weights are overwritten next
    import_weights(model, weights)
    return inference(engine, model, model)


def reevaluate(backend: str, repo: Path, checkpoint: Path, batch_size: int) -> dict:
    from engines import TRAIN_FILES, get_engine
    from engines.evaluator import CausalityError, check_causality, evaluate_bpb
    from prepare import PreparedData

    engine = get_engine(backend)
    data = PreparedData.open()
    rows, token_bytes = data.val_rows(), data.token_bytes()
    sidecar = checkpoint.with_suffix(".json")  # the model config; a train file with load_eval_model may skip it
    meta = json.loads(sidecar.read_text()) if sidecar.exists() or not checkpoint.exists() else {"config": {}}
    with np.load(checkpoint) as npz:
        weights = {k: npz[k] for k in npz.files}
    module = load_train_module(repo / TRAIN_FILES[backend])
    logits_fn = build_logits_fn(backend, module, meta["config"], weights, engine)
    t0 = time.perf_counter()
    try:
        diff = check_causality(engine, logits_fn, rows, batch_size, data.manifest["vocab_size"])
    except CausalityError as e:
        return {"invalid": str(e)}
    result = evaluate_bpb(engine, logits_fn, batch_size, rows, token_bytes)
    return {"val_bpb": result.val_bpb, "causality_max_diff": diff, "eval_seconds": time.perf_counter() - t0}


def matches(claimed: float, measured: float, rel: float = REL_TOLERANCE) -> bool:
    return math.isfinite(measured) and abs(claimed - measured) <= rel * abs(measured)


def audit_timing(result: dict, wall_seconds: float, budget: float, reference: dict | None = None) -> str | None:
    """Checks a run's claimed timing against what the harness saw from outside; a reason when it cannot be true.
    reference: the harness's own re-evaluation of the run's weights (this module's verdict), when there is one;
    it bounds the evaluation time the run may claim."""
    # The train file writes these numbers: a NaN, an infinity or a string would otherwise pass every
    # comparison below (NaN > x is False) or crash the harness.
    for name in ("time_budget", "warmup_steps", "warmup_seconds", "startup_seconds", "eval_seconds", "training_seconds"):
        value = result.get(name)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"the run reports {name} = {str(value)[:40]!r}, not a number"
        if not math.isfinite(number) or number < 0:
            return f"the run reports {name} = {number}; timings must be finite and not negative"
    if result.get("time_budget") is not None and abs(float(result["time_budget"]) - budget) > 1e-6:
        return f"the run used a time budget of {result['time_budget']}s, the harness gave {budget}s"
    warmup_steps = float(result.get("warmup_steps") or 0)
    if warmup_steps > MAX_WARMUP_STEPS:
        return f"{warmup_steps:.0f} warm-up steps are not counted against the budget; at most {MAX_WARMUP_STEPS} may be"
    warmup_seconds = float(result.get("warmup_seconds") or 0.0)
    if warmup_seconds > max(0.5 * budget, 120.0):
        return f"{warmup_seconds:.0f}s of uncounted warm-up; at most max(budget/2, 120s) may be"
    # Start-up and evaluation are the run's own account too: uncapped, claiming minutes of either
    # would hide minutes of extra training inside the wall time.
    startup_seconds = float(result.get("startup_seconds") or 0.0)
    if startup_seconds > max(0.5 * budget, 120.0):
        return f"{startup_seconds:.0f}s of start-up before the first step; at most max(budget/2, 120s) may be"
    eval_seconds = float(result.get("eval_seconds") or 0.0)
    ref_eval = (reference or {}).get("eval_seconds")
    if isinstance(ref_eval, (int, float)) and eval_seconds > 2 * ref_eval + 0.05 * budget + 10:
        return (f"the run claims {eval_seconds:.0f}s of evaluation; the harness evaluated the same weights "
                f"in {ref_eval:.0f}s")
    training = float(result.get("training_seconds") or 0.0)
    if training > budget * 1.5 + 30:
        return f"training took {training:.1f}s against a budget of {budget:.0f}s"
    # what the process did besides the counted training, by its own account
    other = sum(float(result.get(k) or 0.0) for k in ("startup_seconds", "warmup_seconds", "eval_seconds"))
    unexplained = wall_seconds - other - training
    slack = 0.1 * budget + 30  # the final step's overrun, checkpoint save, interpreter exit
    if unexplained > slack:
        return (f"the process ran {wall_seconds:.1f}s but accounts for {other + training:.1f}s "
                f"(training {training:.1f}s); {unexplained:.1f}s are unexplained")
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description="re-evaluate a run's saved weights with fixed code")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from engines.report import atomic_write_json
    try:
        verdict = reevaluate(args.backend, args.repo, args.checkpoint, args.batch_size)
    except Exception as e:  # any failure to rebuild the model means the claim cannot be checked
        verdict = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    atomic_write_json(args.out, verdict)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
