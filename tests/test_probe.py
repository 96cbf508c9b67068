"""
The live causality probe (engines.causality), as the evaluator runs it: every scored batch of the
tiny val rows, at the batch size scored, cuts and donors drawn from OS randomness.

Honest models (the real train files' GPT, fp32 and bf16, both engines) pass; forwards that
leak only where a sampling probe would not look are caught: above the tolerance by a hair,
across rows, only after the first batch, only away from fixed cut points, only at the scored
batch size. The cheats are plain functions here; tests/attacks/test_evaluator.py runs them as
exported forwards through the harness.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import get_engine
from engines.causality import PROBE_TOL, Probe, probe_rows
from test_artifact import SMALL, Built

V = SMALL["vocab_size"]
BATCH = 8
# A leak twice PROBE_TOL (1e-3 nats; the tiny GPT's next-token probabilities are ~1/512, so the
# leaked token's log-softmax moves by ~the whole bump); a literal, so loosening the tolerance fails the test.
NEAR_LEAK = 0.002


def val_rows() -> np.ndarray:
    from prepare import PreparedData
    return PreparedData.open().val_rows()


def built(backend: str, bf16: bool = False) -> tuple[Any, Callable]:
    """(engine, honest forward) of the tiny GPT, in fp32 or bf16 weights."""
    b = Built(backend)
    if bf16 and backend == "cuda":
        import torch
        b.model.to(torch.bfloat16)
    elif bf16:
        import mlx.core as mx
        b.model.set_dtype(mx.bfloat16)
    if backend == "cuda":
        import torch

        def fn(idx):
            with torch.no_grad():
                return b.model(idx).float()
        return get_engine("cuda"), fn
    return get_engine("mlx"), lambda idx: b.model(idx)


def honest_models() -> Iterator[tuple[str, Any, Callable, np.ndarray]]:
    rows = val_rows()
    for backend in ("cuda", "mlx"):
        for bf16 in (False, True):
            engine, fn = built(backend, bf16)
            yield f"{'torch' if backend == 'cuda' else 'mlx'} {'bf16' if bf16 else 'fp32'}", engine, fn, rows


@pytest.fixture
def env(data_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    return data_env


# --------------------------------------------------------------------------- cheats, as array code

def onehot(backend: str, ids: Any, dtype: Any) -> Any:
    if backend == "cuda":
        import torch
        return torch.nn.functional.one_hot(ids.long(), V).to(dtype)
    import mlx.core as mx
    return (mx.arange(V)[None, None, :] == ids[..., None]).astype(dtype)


def roll(backend: str, a: Any, shift: int, axis: int) -> Any:
    if backend == "cuda":
        import torch
        return torch.roll(a, shift, dims=axis)
    import mlx.core as mx
    return mx.roll(a, shift, axis=axis)


def leak(backend: str, honest: Callable, amount: float, where: Callable[[int, int], np.ndarray] | None = None,
         source: str = "next", shift: float = 0.0, bos: float = 0.0) -> Callable:
    """honest + amount on the logit of the next token (source='next') or of the same position of the
    next row (source='row'), at positions where(B, T) (a 0/1 mask), everywhere when None; plus `shift`
    on every logit and `bos` on the last token's (never scored): what a forward uses to inflate a
    tolerance scaled by the logits' size without changing the softmax."""
    def fn(idx):
        logits = honest(idx)
        B, T = idx.shape[0], idx.shape[1]
        ids = roll(backend, idx, -1, 1) if source == "next" else roll(backend, idx, -1, 0)
        bump = amount * onehot(backend, ids, logits.dtype)
        if where is not None:
            mask = get_engine(backend).to_device(where(B, T).astype(np.float32))
            if backend == "cuda":
                mask = mask.to(logits.dtype)
            bump = bump * mask[..., None]
        if bos:
            bump = bump + bos * onehot(backend, ids * 0 + (V - 1), logits.dtype)
        return logits + bump + shift
    return fn


# --------------------------------------------------------------------------- tests

@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_honest_models_pass_on_every_row(backend: str, bf16: bool, env: Path) -> None:
    engine, fn = built(backend, bf16)
    rows = val_rows()
    r = probe_rows(engine, fn, rows, BATCH, V)
    assert r.ok, r.reason
    assert r.max_diff <= r.tolerance
    padded = -(-rows.shape[0] // BATCH) * BATCH
    assert r.rows == padded and r.forwards == padded // BATCH   # every scored row, one extra forward per batch


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_a_leak_just_above_the_tolerance_is_caught(backend: str, env: Path) -> None:
    engine, fn = built(backend)
    rows = val_rows()
    honest = probe_rows(engine, fn, rows, BATCH, V)
    assert honest.tolerance < NEAR_LEAK <= 4 * honest.tolerance   # just above the tolerance (PROBE_TOL)
    over = probe_rows(engine, leak(backend, fn, NEAR_LEAK), rows, BATCH, V)
    assert not over.ok and "looks ahead" in over.reason, over
    assert over.max_diff > over.tolerance >= honest.max_diff


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
@pytest.mark.parametrize("shift,bos,amount", [(-1e5, 0.0, 8.0), (0.0, -1e6, 40.0)], ids=["shift", "bos"])
def test_huge_logits_that_would_hide_a_leak_are_refused(backend: str, shift: float, bos: float, amount: float,
                                                        env: Path) -> None:
    """The red team's forwards: every logit -1e5, or one never-scored token's -1e6 (the softmax barely
    moves), once lifted a size-scaled tolerance above a +8 / +40 look-ahead."""
    engine, fn = built(backend)
    r = probe_rows(engine, leak(backend, fn, amount, shift=shift, bos=bos), val_rows(), BATCH, V)
    assert not r.ok and "keep logits bounded" in r.reason, r
    assert r.tolerance == PROBE_TOL


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_only_the_softmax_is_compared_with_an_absolute_tolerance(backend: str, env: Path) -> None:
    """A shift of a position's logits read from the next token changes no probability: it passes. A 0.01
    look-ahead under a -900 shift of every logit is caught (a tolerance scaled by max|logit| was 0.09)."""
    engine, fn = built(backend)
    rows = val_rows()

    def shifted(idx):
        nxt = roll(backend, idx, -1, 1)
        nxt = nxt.float() if backend == "cuda" else nxt.astype(fn(idx).dtype)
        return fn(idx) + 0.01 * nxt[..., None]
    same = probe_rows(engine, shifted, rows, BATCH, V)
    assert same.ok and same.max_diff <= PROBE_TOL, same
    caught = probe_rows(engine, leak(backend, fn, 0.01, shift=-900.0), rows, BATCH, V)
    assert not caught.ok and "looks ahead" in caught.reason, caught


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_a_model_that_reads_the_next_row_is_caught(backend: str, env: Path) -> None:
    engine, fn = built(backend)
    # (every row but the last reads the next one: a probe that altered only some rows would miss it)
    r = probe_rows(engine, leak(backend, fn, 5.0, lambda B, T: np.repeat((np.arange(B) < B - 1)[:, None], T, 1),
                                source="row"), val_rows(), BATCH, V)
    assert not r.ok and "across rows" in r.reason, r


def test_a_leak_only_after_the_first_batch_is_caught(env: Path) -> None:
    engine, fn = built("cuda")
    calls = [0]
    cheat = leak("cuda", fn, 5.0)

    def late(idx):   # honest on the first batch's forwards (reference and altered), leaks after
        calls[0] += 1
        return fn(idx) if calls[0] <= 2 else cheat(idx)
    r = probe_rows(engine, late, val_rows(), BATCH, V)
    assert not r.ok and r.forwards > 1, r


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_a_leak_away_from_fixed_cut_points_is_caught(backend: str, env: Path) -> None:
    """Leaks at every position except 0, T/2 and T-2 (where fixed cuts 1, T/2+1, T-1 would look)."""
    engine, fn = built(backend)

    def where(B: int, T: int) -> np.ndarray:
        m = np.ones((B, T), dtype=np.float32)
        m[:, [0, T // 2, T - 2, T - 1]] = 0
        return m
    r = probe_rows(engine, leak(backend, fn, 5.0, where), val_rows(), BATCH, V)
    assert not r.ok and "looks ahead" in r.reason, r


def test_a_leak_only_at_the_scored_batch_size_is_caught(env: Path) -> None:
    """Honest at every batch size but the one the evaluator scores with (a probe at another size misses it)."""
    engine, fn = built("cuda")
    cheat = leak("cuda", fn, 5.0)
    r = probe_rows(engine, lambda idx: cheat(idx) if idx.shape[0] == 4 else fn(idx), val_rows(), 4, V)
    assert not r.ok and r.batch_size == 4, r
    assert probe_rows(engine, lambda idx: cheat(idx) if idx.shape[0] == 4 else fn(idx), val_rows(), 8, V).ok


def test_cuts_and_donors_differ_between_two_probes(env: Path) -> None:
    engine, fn = built("cuda")
    rows = val_rows()
    a, b = Probe(engine, rows, V), Probe(engine, rows, V)
    x = rows[:BATCH, :-1].astype(np.int32)
    (xa, ca), (xb, cb) = a.draw(x), b.draw(x)
    assert not (np.array_equal(ca, cb) and np.array_equal(xa, xb))
    assert all(np.array_equal(xa[i, :c], x[i, :c]) for i, c in enumerate(ca))   # the prefix kept, real tokens after
    assert all(xa[i, c] != x[i, c] for i, c in enumerate(ca))


@pytest.mark.parametrize("backend", ["cuda", "mlx"])
def test_a_model_with_its_causal_mask_removed_is_caught(backend: str, env: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    b = Built(backend)
    mod = sys.modules[type(b.model).__module__]
    if backend == "cuda":
        import torch.nn.functional as F

        def unmasked(q, k, v, window):   # (B, T, H, D) in and out, every query sees every key
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        monkeypatch.setattr(mod, "attention", unmasked)
    else:
        import mlx.core as mx
        monkeypatch.setattr(mod, "attention", lambda q, k, v, window: mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0))
    r = probe_rows(get_engine(backend), b.honest, val_rows(), BATCH, V)
    assert not r.ok and "looks ahead" in r.reason, r
