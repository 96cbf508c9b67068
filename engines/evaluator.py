"""
The one val_bpb evaluator. Every engine and every run scores the same fixed
val rows (prepared once, verified by sha256) with the same host arithmetic:

    val_bpb = sum(nats over target tokens with bytes > 0) / (ln 2 * sum(bytes of those tokens))

The model only ever sees inputs x; the engine adapter (fixed code) turns its
logits into nats against targets the model never receives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

EVALUATOR_VERSION = 1

LogitsFn = Callable[[Any], Any]   # device int array (B, T) -> logits (B, T, V)


@dataclass
class EvalResult:
    val_bpb: float
    nats: float
    bytes: int
    tokens: int
    seconds: float


def bpb_from_sums(nats: float, nbytes: int) -> float:
    return nats / (math.log(2) * nbytes) if nbytes > 0 else float("nan")


def evaluate_bpb(engine, logits_fn: LogitsFn, batch_size: int, rows: np.ndarray,
                 token_bytes: np.ndarray, probe: Any = None) -> EvalResult:
    """Scores every row of `rows` (the fixed val rows, from PreparedData) once; token_bytes: the
    UTF-8 byte length of each token id. The last batch is padded with copies of row 0 (and
    ignored) so compiled models see one shape. probe: an engines.causality.Probe that checks every
    batch before it is scored (the evaluator process always passes one)."""
    t0 = time.perf_counter()
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    n = rows.shape[0]
    batch_size = max(1, min(batch_size, n))
    for start in range(0, n, batch_size):
        batch = rows[start:start + batch_size]
        real = batch.shape[0]
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(rows[:1], batch_size - real, axis=0)])
        x = np.ascontiguousarray(batch[:, :-1])
        y = np.ascontiguousarray(batch[:real, 1:])
        logits = probe.batch(logits_fn, x) if probe is not None else logits_fn(engine.to_device(x))
        nats = engine.token_nats(logits[:real] if real < batch_size else logits, y).astype(np.float64)
        nbytes = token_bytes[y].astype(np.int64)
        mask = nbytes > 0
        if not np.all(np.isfinite(nats[mask])):
            return EvalResult(float("nan"), float("nan"), int(nbytes.sum()), total_tokens, time.perf_counter() - t0)
        total_nats += float(nats[mask].sum())
        total_bytes += int(nbytes.sum())
        total_tokens += int(mask.sum())
    return EvalResult(bpb_from_sums(total_nats, total_bytes), total_nats, total_bytes, total_tokens,
                      time.perf_counter() - t0)
