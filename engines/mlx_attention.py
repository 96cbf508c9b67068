"""
Causal sliding-window attention for MLX train files: the MLX side of engines.torch_attention, so
both train files call attention(q, k, v, window) from a fixed module in the same place. MLX has
one kernel (mx.fast.scaled_dot_product_attention) on every device, and the exported forward runs
it as it is, so here the choice is only the mask: the built-in causal mask where the window covers
the whole context, else an explicit boolean one.

Window semantics as FA3's window_size=(window, 0): query i sees keys i - window .. i.
Layout: (B, H, T, D), MLX's native one (torch's kernels take (B, T, H, D)); grouped-query
heads are supported by the kernel directly.
"""

from __future__ import annotations

import mlx.core as mx

KERNELS = ("sdpa",)


def window_mask(seq_len: int, window: int) -> mx.array:
    """Boolean (T, T) mask, True = may attend: causal, at most `window` keys back."""
    i = mx.arange(seq_len)[:, None]
    j = mx.arange(seq_len)[None, :]
    return (j <= i) & (i - j <= window)


def prepare_attention(seq_len: int, windows: list[int], device: object = None, kernel: str | None = None) -> str:
    """The same call as engines.torch_attention.prepare_attention; returns the kernel's name. The
    masks are built inside the traced forward (MLX compiles them into the graph), so nothing is cached."""
    if kernel not in (None, *KERNELS):
        raise ValueError(f"unknown MLX attention kernel {kernel!r}; MLX has only sdpa")
    return "sdpa"


def attention(q: mx.array, k: mx.array, v: mx.array, window: int) -> mx.array:
    """Causal attention over (B, H, T, D) queries and (B, H_kv, T, D) keys/values:
    query i attends to keys i - window .. i."""
    T = q.shape[2]
    mask = "causal" if window >= T else window_mask(T, window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
