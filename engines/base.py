"""What every engine adapter provides. Adding a backend = one adapter + one train file."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from engines.hardware import Hardware


class EngineUnavailable(Exception):
    """The engine cannot run here; the message says what was detected and what would work."""


class Engine(Protocol):
    name: str          # "mlx", "cuda"
    train_file: str    # the agent-editable file this engine runs, e.g. "train_mlx.py"

    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, the reason, e.g. 'no CUDA device: torch 2.x sees 0 GPUs')."""

    def hardware(self) -> Hardware:
        """Device description and its slug tag, e.g. cuda-nvidia-h100-80gb-hbm3."""

    def sync(self) -> None:
        """Blocks until queued device work is done (the timer calls it)."""

    def peak_memory_mb(self) -> float: ...

    def to_device(self, a: np.ndarray) -> Any:
        """Host numpy batch -> device array (int32 tokens stay integer)."""

    def to_numpy(self, a: Any) -> np.ndarray: ...

    def token_nats(self, logits: Any, targets: np.ndarray) -> np.ndarray:
        """Per-token cross-entropy in nats, float64 numpy (B, T), computed in fp32 from logits (B, T, V)."""

    def peak_flops(self) -> float | None:
        """Dense bf16 peak FLOP/s of the device for MFU, or None when unknown."""
