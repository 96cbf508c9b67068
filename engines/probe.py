"""
Causality probe on an exported forward, run by the evaluator before it scores.

The probe batch is the evaluation's first batch, at the evaluation's batch size (so an
MLX artifact is probed on the very trace that scores it). For each cut c, a few rows of
that batch get their tokens from c on replaced by the same positions of other real val
rows (real text, not random tokens, so a model cannot key on implausible input). Then
  - altered rows: logits before c must not move;
  - all other rows: logits must not move at all (no information across rows).
Differences are reduced on the device to (B, T) maxima; only those come to the host.

Tolerance: PROBE_RTOL x (1 + max|logit|). An exported program recomputes a row with the
same kernels at the same shapes, so an honest model moves by ~0 (exactly 0 on the CPU).
A model that leaks the next token into logits under the tolerance gains at most about
that many nats per token: 1e-4 x 16 ~ 0.0016 nats for softcapped logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

PROBE_RTOL = 1e-4
FIXED_CUTS = 2      # the first and the last position are always cut
RANDOM_CUTS = 3     # plus this many cut points drawn per artifact
ROWS_PER_CUT = 2    # rows altered at each cut


@dataclass
class ProbeResult:
    ok: bool
    max_diff: float
    tolerance: float
    cuts: list[int]
    batch_size: int
    pairs: list[tuple[int, int]] = field(default_factory=list)   # (cut, row in the batch) altered
    forwards: int = 0
    reason: str = ""

    def within(self, moved: float, what: str, verdict: str) -> bool:
        """Records one difference; False (and the reason) when it is over the tolerance or not finite."""
        self.max_diff = max(self.max_diff, moved) if np.isfinite(moved) else float("nan")
        if np.isfinite(moved) and moved <= self.tolerance:
            return True
        self.ok = False
        self.reason = f"{what.format(f'{moved:.3g}')} (tolerance {self.tolerance:.3g}): {verdict}"
        return False

    def to_dict(self) -> dict:
        return asdict(self)


def probe_cuts(seq_len: int, seed: int) -> list[int]:
    """Cut 1 and T-1, plus RANDOM_CUTS positions drawn from the artifact's own hash."""
    fixed = {1, seq_len - 1} if seq_len > 1 else set()
    rng = np.random.default_rng(seed)
    drawn = rng.integers(2, seq_len - 1, size=RANDOM_CUTS) if seq_len > 3 else []
    return sorted(c for c in fixed | {int(c) for c in drawn} if 1 <= c < seq_len)


def first_batch(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Row indices of the evaluation's first batch, padded with row 0 as evaluate_bpb pads."""
    real = min(batch_size, rows.shape[0])
    return np.array(list(range(real)) + [0] * (batch_size - real))


def _rowwise_max(a: Any) -> Any:
    return a.amax(-1) if hasattr(a, "amax") else a.max(axis=-1)   # torch / mlx


def probe_causality(engine: Any, logits_fn: Callable[[Any], Any], rows: np.ndarray, batch_size: int,
                    vocab_size: int, seed: int = 0) -> ProbeResult:
    """Raises ValueError when the logits are not (batch_size, T, vocab_size)."""
    n, T = rows.shape[0], rows.shape[1] - 1
    index = first_batch(rows, batch_size)
    base = np.ascontiguousarray(rows[index, :-1]).astype(np.int32)
    ref = logits_fn(engine.to_device(base))
    if tuple(ref.shape) != (batch_size, T, vocab_size):
        raise ValueError(f"the artifact returns logits {tuple(ref.shape)}, expected {(batch_size, T, vocab_size)} "
                         f"(batch, tokens, vocab)")
    scale = float(engine.to_numpy(_rowwise_max(abs(ref))).max())
    cuts = probe_cuts(T, seed)
    result = ProbeResult(True, 0.0, PROBE_RTOL * (1.0 + scale) if np.isfinite(scale) else 0.0, cuts, batch_size,
                         forwards=1)
    if not np.isfinite(scale):
        result.ok, result.max_diff, result.reason = False, float("nan"), "the artifact's logits are not finite"
        return result
    # Each (cut, replica) alters one row; one forward alters up to half the batch, spread over it,
    # so most probes take a single extra forward and the rest of the batch checks cross-row leaks.
    todo = [cut for cut in cuts for _ in range(ROWS_PER_CUT)]
    per_forward = max(1, batch_size // 2)
    for g in range(0, len(todo), per_forward):
        group = todo[g:g + per_forward]
        where = np.unique(np.linspace(0, batch_size - 1, len(group)).round().astype(int))
        x = base.copy()
        for j, (cut, p) in enumerate(zip(group, where)):
            donor = (int(index[p]) + 1 + g + j) % n   # another real row's continuation
            x[p, cut:] = rows[donor, cut:-1]
            result.pairs.append((cut, int(p)))
        out = logits_fn(engine.to_device(x))
        d = engine.to_numpy(_rowwise_max(abs(out - ref))).astype(np.float64)   # (B, T): all that leaves the device
        del out
        result.forwards += 1
        for cut, p in zip(group, where):
            if not result.within(float(d[p, :cut].max()), f"logits before position {cut} changed by {{}} when "
                                 f"tokens from {cut} on changed", "the model looks ahead"):
                return result
        others = np.setdiff1d(np.arange(batch_size), where)
        if not result.within(float(d[others].max()) if others.size else 0.0, "logits of unaltered rows changed by "
                             "{} when other rows of the batch changed", "the model reads across rows"):
            return result
    return result
    return result
