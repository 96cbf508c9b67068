"""
Causal sliding-window attention for PyTorch train files. Which kernel runs is fixed
plumbing, not research: a train file calls attention(q, k, v, window) and gets

- FA3 on CUDA when `flash_attn_interface` is already installed (nothing is downloaded),
- else FlexAttention with block masks that skip tiles wholly outside a window, and
  SDPA(is_causal) wherever the window covers the whole context,
- on the CPU, SDPA with explicit boolean masks,
- and while the forward is exported (engines.forward_file, inside exporting()), SDPA on every
  device: FA3 is a custom op and FlexAttention a higher-order op with Python mask code,
  neither of which the evaluator's allow-list of pure ATen operators accepts (and flex
  fails in torch.export.save). The artifact computes the same windows with dense masks.

Window semantics as FA3's window_size=(window, 0): query i sees keys i - window .. i.
Masks are built by prepare_attention(), once per window, never inside a compiled graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

FLEX_BLOCK_SIZE = 128    # FlexAttention tile
KERNELS = ("fa3", "flex", "sdpa")
_EXPORTING = [False]


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """While active, attention() runs SDPA with dense masks whatever the kernel (what the artifact holds)."""
    before, _EXPORTING[0] = _EXPORTING[0], True
    try:
        yield
    finally:
        _EXPORTING[0] = before


def window_mask_mod(window: int):
    """FlexAttention mask_mod: query i sees keys i - window .. i."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mask_mod


def dense_window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True = may attend; the same rule as window_mask_mod."""
    i = torch.arange(seq_len, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d <= window)


def _flash_attention_3():
    try:
        import flash_attn_interface
        return flash_attn_interface
    except ImportError:
        return None


def _has_flex() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


def default_kernel(device: torch.device) -> str:
    if device.type != "cuda":
        return "sdpa"
    return "fa3" if _flash_attention_3() is not None else ("flex" if _has_flex() else "sdpa")


class Attention:
    """One kernel on one device, with its masks by (sequence length, window)."""

    def __init__(self, device: torch.device, kernel: str | None = None):
        kernel = kernel or default_kernel(device)
        if kernel not in KERNELS:
            raise ValueError(f"unknown attention kernel {kernel!r}; use fa3, flex or sdpa")
        self.device, self.kernel = device, kernel
        self.fa3: Any = _flash_attention_3() if kernel == "fa3" else None  # not None when kernel == "fa3"
        if kernel == "fa3" and (self.fa3 is None or device.type != "cuda"):
            raise RuntimeError("attention kernel fa3 needs a CUDA device and flash_attn_interface installed")
        if kernel == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            self._create_block_mask = create_block_mask
            # flex_attention is only fused when compiled; the model's compile inlines this one
            self._flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        self.masks: dict[tuple[int, int], object] = {}
        self.dense: dict[tuple[int, int], torch.Tensor] = {}   # SDPA masks for export

    def mask(self, T: int, window: int):
        key = (T, window)
        if key not in self.masks:
            if self.kernel == "flex":
                self.masks[key] = self._create_block_mask(window_mask_mod(window), None, None, T, T,
                                                          device=self.device, BLOCK_SIZE=FLEX_BLOCK_SIZE)
            else:
                self.masks[key] = dense_window_mask(T, window, self.device)
        return self.masks[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        T = q.shape[1]
        if _EXPORTING[0] and self.kernel != "sdpa":
            return self._sdpa_for_export(q, k, v, window)
        if self.kernel == "fa3":
            out = self.fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
            return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if window >= T - 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.kernel == "flex":
            y = self._flex(q, k, v, block_mask=self.mask(T, window))
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(T, window))
        return y.transpose(1, 2)

    def _sdpa_for_export(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        T = q.shape[1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if window >= T - 1:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        if (T, window) not in self.dense:
            self.dense[(T, window)] = dense_window_mask(T, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense[(T, window)]).transpose(1, 2)


_BY_DEVICE: dict[tuple[str, int], Attention] = {}


def _key(device: torch.device) -> tuple[str, int]:
    return device.type, device.index or 0  # torch.device("cuda") and a tensor's cuda:0 are one device


def prepare_attention(seq_len: int, windows: list[int], device: torch.device, kernel: str | None = None) -> str:
    """Picks the kernel for `device` and builds the masks of these windows now, outside any compiled
    graph (call it when the model is placed on its device). Returns the kernel's name."""
    att = _BY_DEVICE.get(_key(device))
    if att is None or (kernel is not None and att.kernel != kernel):
        att = _BY_DEVICE[_key(device)] = Attention(device, kernel)
    for w in sorted(set(windows)):
        if w < seq_len - 1:
            att.mask(seq_len, w)
    return att.kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention over (B, T, H, D) queries, keys and values (as many kv heads as query heads):
    query i attends to keys i - window .. i."""
    att = _BY_DEVICE.get(_key(q.device))
    if att is None:
        att = _BY_DEVICE[_key(q.device)] = Attention(q.device)
    return att(q, k, v, window)
