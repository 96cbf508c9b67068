"""
The harness's own evaluation of a run's saved weights, in a fresh process
running fixed code: the train file is imported only for its model definition
(importing it trains nothing), the weights are loaded, and engines/ probes
causality and computes val_bpb. A keep needs this number to match the run's
claim, so a train file that prints or writes a fake val_bpb is never kept.

    python -m arun.verify --backend cuda --repo . --checkpoint w.npz --out verdict.json
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

REL_TOLERANCE = 2e-3   # bf16 training vs a re-evaluation of the same weights: far below any real gain
MAX_WARMUP_STEPS = 20  # uncounted steps a train file may take (upstream uses 10)


def load_train_module(path: Path):
    spec = importlib.util.spec_from_file_location("arun_train_module", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    spec.loader.exec_module(module)
    return module


def build_logits_fn(backend: str, module: Any, config: dict, weights: dict[str, np.ndarray], engine: Any) -> Callable:
    """The model from the train file's own definition, with the run's weights, as an inputs -> logits function."""
    if hasattr(module, "load_eval_model"):
        return module.load_eval_model(config, weights)
    cfg = module.GPTConfig(**config)
    if backend == "cuda":
        import torch
        device = engine.device()
        model = module.GPT(cfg).to(device)
        model.init_weights()  # builds rotary tables and attention masks; the weights are overwritten next
        module.import_weights(model, weights)
        model.eval()
        autocast = torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def logits_fn(x):
            with torch.no_grad(), autocast:
                return model(x)
        return logits_fn
    model = module.GPT(cfg)
    if hasattr(model, "init_weights"):
        model.init_weights()
    module.import_weights(model, weights)
    return lambda x: model(x)


def reevaluate(backend: str, repo: Path, checkpoint: Path, batch_size: int) -> dict:
    from engines import TRAIN_FILES, get_engine
    from engines.evaluator import CausalityError, check_causality, evaluate_bpb
    from prepare import PreparedData

    engine = get_engine(backend)
    data = PreparedData.open()
    rows, token_bytes = data.val_rows(), data.token_bytes()
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
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


def audit_timing(result: dict, wall_seconds: float, budget: float) -> str | None:
    """Checks a run's claimed timing against what the harness saw from outside; a reason when it cannot be true."""
    if result.get("time_budget") is not None and abs(float(result["time_budget"]) - budget) > 1e-6:
        return f"the run used a time budget of {result['time_budget']}s, the harness gave {budget}s"
    warmup_steps = result.get("warmup_steps") or 0
    if warmup_steps > MAX_WARMUP_STEPS:
        return f"{warmup_steps} warm-up steps are not counted against the budget; at most {MAX_WARMUP_STEPS} may be"
    warmup_seconds = float(result.get("warmup_seconds") or 0.0)
    if warmup_seconds > max(0.5 * budget, 120.0):
        return f"{warmup_seconds:.0f}s of uncounted warm-up; at most max(budget/2, 120s) may be"
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
