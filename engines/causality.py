"""
Causality probe on an exported forward, run by the evaluator on every batch it scores.

For each scored batch x (the real rows, at the batch size actually scored, padding included)
the evaluator runs two forwards, in an order drawn per batch:
  - the reference: x itself; its logits are the ones scored;
  - the altered batch: every row i keeps its tokens before its own cut c_i and takes the
    tokens from c_i on from another real row (same positions, so it is real text).
Then, per row, the logits before c_i must not move. Since every row changes, a row whose
logits depend on any other row of the batch moves too (rows of the val stream are
consecutive text, so reading across rows is reading ahead). Differences are reduced on the
device to (B, T) maxima; only those come to the host.

Cuts and donor rows are drawn at scoring time from OS randomness (`secrets`), never from
the artifact, so re-exporting cannot steer them, and a forward cannot tell the reference from
the altered call (both are real text; the order is random). A leak at position t that reads
token t+k is seen in a row whose cut falls in (t, t+k]: a forward that leaks on a fraction f
of positions escapes all N scored rows with probability about (1 - f)^N.

Cost: one extra forward per scored batch plus an elementwise difference: every row needs an
altered copy of its own, so this is the floor for covering every row. Measured with
`python benchmarks/bench_artifact.py` (tiny GPT, 128 val rows in one batch of 128, CPU, a loaded
2-core box): probe/eval = 0.71 (MLX: 2.10 s / 2.95 s) and 0.86 (torch: 2.64 s / 3.08 s), i.e.
+71 % / +86 % of the scoring time, above the +50 % goal.

What is compared: the log-softmax of the two forwards (in float32, on the device), not the raw
logits. The softmax ignores a shift of all of a row's logits and any one logit pushed to a huge
negative value, so raw logits let an artifact move a tolerance scaled by their size without
changing what it scores (a red team's -1e6 on the never-scored 0-byte BOS token, or -1e5 on every
logit, lifted a max|logit|-scaled tolerance to ~100 or ~10 and hid a +40 / +8 look-ahead).

Tolerance: PROBE_TOL nats, absolute: nothing in the artifact moves it. Logits above LOGIT_LIMIT in
magnitude anywhere are refused (INVALID, keep them bounded): float32 carries about 7 digits, so a
log-softmax of logits near 1e5 is only good to ~0.01 nats, enough to hide a leak; below 1e3 it is
good to ~1e-4. Softcapped models stay within +-SOFTCAP (15); the tests' tiny GPT within ~2.
Measured on honest models (the tests' tiny GPT from the real train files, 64-token rows, vocab 512,
batches of 8 over the tiny val rows, CPU), max prefix difference over all rows:

    ARUN_DATA_DIR=<the tiny profile: arun prepare --dataset pystdlib --profile tiny> python -m engines.causality
    torch fp32 0  | torch bf16 0  | mlx fp32 0  | mlx bf16 0      (max|logit| ~ 1.7-1.8)

An exported program recomputes a row with the same kernels at the same shapes, so an honest
model moves by exactly 0 on the CPU. GPU kernels are not measured here (no GPU on the machine
this was written on); the same expectation holds there because the altered forward has the
same shapes as the reference, so the same kernels and tilings run, and each output row is a
reduction over that row alone in a shape-fixed order; only kernels that reduce in a
data-dependent order (split-K with atomics) could differ, by float32 rounding, far below
PROBE_TOL. A leak under the tolerance gains at most about PROBE_TOL nats per token.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PROBE_TOL = 1e-3     # nats of log-softmax, absolute
LOGIT_LIMIT = 1e3    # |logit| above this anywhere: refused (float32 log-softmax too coarse)
DONOR_TRIES = 8   # draws for a donor row whose token at the cut differs from the row's own


class ProbeFailure(Exception):
    """The forward's logits before a cut changed when later tokens (or other rows) changed."""


@dataclass
class ProbeResult:
    ok: bool = True
    max_diff: float = 0.0
    tolerance: float = 0.0
    rows: int = 0          # rows altered (every scored row, padding included)
    forwards: int = 0      # altered forwards run
    batch_size: int = 0
    seconds: float = 0.0
    cuts_sha256: str = ""  # of every (cut, donor) drawn: differs between scorings of one artifact
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _rowwise_max(a: Any) -> Any:
    return a.amax(-1) if hasattr(a, "amax") else a.max(axis=-1)   # torch / mlx


def _log_softmax(a: Any) -> Any:
    """float32 log-softmax over the vocab, on the device (torch / mlx)."""
    if hasattr(a, "amax"):
        return a.float().log_softmax(-1)
    import mlx.core as mx
    a = a.astype(mx.float32)
    return a - mx.logsumexp(a, axis=-1, keepdims=True)


def _magnitude(engine: Any, a: Any) -> float:
    return float(engine.to_numpy(_rowwise_max(_rowwise_max(abs(a)))).max())


class Probe:
    """Probes each batch the evaluator scores. `pool`: the real rows donors are taken from (B, T+1)."""

    def __init__(self, engine: Any, pool: np.ndarray, vocab_size: int, rng: np.random.Generator | None = None):
        self.engine, self.pool, self.vocab_size = engine, pool, vocab_size
        # OS randomness at scoring time: nothing in the artifact can predict or steer it.
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self.result = ProbeResult()
        self._digest = hashlib.sha256()

    def draw(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(altered batch, cuts): each row keeps x[i, :c_i] and takes another real row's tokens from c_i on."""
        B, T = x.shape
        n = self.pool.shape[0]
        cuts = np.asarray(self.rng.integers(1, T, size=B)) if T > 1 else np.ones(B, dtype=np.int64)
        altered = x.copy()
        for i, c in enumerate(cuts):
            c = int(c)
            donor = self.pool[int(self.rng.integers(n)), :-1]
            for _ in range(DONOR_TRIES):   # one whose token at the cut differs, so the cut itself changes
                if c >= T or donor[c] != x[i, c]:
                    break
                donor = self.pool[int(self.rng.integers(n)), :-1]
            if n == 1 or c >= T or donor[c] == x[i, c]:   # no other real row differs here: shuffle this row's own tail
                donor = np.concatenate([x[i, :c], self.rng.permutation(x[i, c:])])
            altered[i, c:] = donor[c:T]
        self._digest.update(cuts.astype(np.int64).tobytes() + altered.astype(np.int32).tobytes())
        return np.ascontiguousarray(altered, dtype=np.int32), cuts

    def batch(self, logits_fn: Callable[[Any], Any], x: np.ndarray) -> Any:
        """The reference logits of x (the ones to score), after checking them against an altered
        batch. Raises ProbeFailure (the result says why) or ValueError for logits of the wrong shape."""
        B, T = x.shape
        altered, cuts = self.draw(x)
        first = bool(self.rng.integers(2))   # the altered forward first or second, at random
        t0 = time.perf_counter()
        alt = logits_fn(self.engine.to_device(altered)) if first else None
        probe_s = time.perf_counter() - t0
        ref = logits_fn(self.engine.to_device(x))
        if tuple(ref.shape) != (B, T, self.vocab_size):
            raise ValueError(f"the artifact returns logits {tuple(ref.shape)}, expected {(B, T, self.vocab_size)} "
                             f"(batch, tokens, vocab)")
        # (this also computes the reference, which MLX builds lazily, outside the probe's time)
        scale = _magnitude(self.engine, ref)
        t0 = time.perf_counter()
        if alt is None:
            alt = logits_fn(self.engine.to_device(altered))
        scale = max(scale, _magnitude(self.engine, alt))
        # Shift-invariant: what is scored is the softmax, so that is what must not move.
        la = _log_softmax(alt)
        del alt
        d = self.engine.to_numpy(_rowwise_max(abs(la - _log_softmax(ref)))).astype(np.float64)   # (B, T)
        del la
        self.result.seconds += probe_s + time.perf_counter() - t0
        self._check(d, cuts, scale)
        return ref

    def _check(self, d: np.ndarray, cuts: np.ndarray, scale: float) -> None:
        r = self.result
        r.forwards += 1
        r.rows += d.shape[0]
        r.batch_size = d.shape[0]
        r.cuts_sha256 = self._digest.hexdigest()
        tol = PROBE_TOL
        r.tolerance = tol
        before = np.arange(d.shape[1])[None, :] < cuts[:, None]
        moved = np.where(before, d, 0.0).max(axis=1)                    # per row, before its own cut
        if not np.isfinite(scale) or not np.all(np.isfinite(moved)):
            r.ok, r.max_diff, r.reason = False, float("nan"), "the artifact's logits are not finite"
            raise ProbeFailure(r.reason)
        if scale > LOGIT_LIMIT:
            r.ok, r.max_diff = False, float("nan")
            r.reason = (f"the artifact's logits reach |{scale:.3g}|, above {LOGIT_LIMIT:.0f}: float32 cannot check "
                        f"them for look-ahead; keep logits bounded (e.g. softcap them)")
            raise ProbeFailure(r.reason)
        r.max_diff = max(r.max_diff, float(moved.max()))
        worst = int(moved.argmax())
        if moved[worst] > tol:
            r.ok = False
            r.reason = (f"logits before position {int(cuts[worst])} of a row changed by {moved[worst]:.3g} when its "
                        f"tokens from {int(cuts[worst])} on (and the batch's other rows) changed (tolerance "
                        f"{tol:.3g}): the model looks ahead or reads across rows")
            raise ProbeFailure(r.reason)


def probe_rows(engine: Any, logits_fn: Callable[[Any], Any], rows: np.ndarray, batch_size: int,
               vocab_size: int) -> ProbeResult:
    """The probe over every row as the evaluator scores them (engines.evaluator.evaluate_bpb); the
    result, with ok False instead of an exception on a failure."""
    from engines.evaluator import evaluate_bpb
    probe = Probe(engine, rows, vocab_size)
    try:
        evaluate_bpb(engine, logits_fn, batch_size, rows, np.ones(vocab_size, dtype=np.int64), probe=probe)
    except ProbeFailure:
        pass
    return probe.result


def measure() -> None:
    """Prints the honest models' largest prefix difference per engine and dtype (the tolerance's basis)."""
    import os
    import sys
    from pathlib import Path
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests")]
    os.environ.setdefault("ARUN_DEVICE", "cpu")
    from test_probe import honest_models  # the tests' tiny GPT from the real train files
    for name, engine, fn, rows in honest_models():
        r = probe_rows(engine, fn, rows, 8, 512)
        print(f"{name}: ok={r.ok} max_diff={r.max_diff:.3g} tolerance={r.tolerance:.3g} rows={r.rows}")


if __name__ == "__main__":
    measure()
