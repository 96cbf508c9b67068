"""
MLX engine: the Apple GPU through Metal on macOS, or MLX's CPU backend
(Linux with `mlx[cpu]`, or a Mac told to use the CPU). The device is whatever
MLX's default device is; the hardware tag says which, so CPU and GPU results
never ratchet against each other.
"""

from __future__ import annotations

import platform
import re
import sys
from typing import Any

import numpy as np

from engines.hardware import Hardware, apple_gpu_cores, cpu_count, cpu_model, slug, total_memory_gb

# Dense FP16/BF16 peak of Apple GPUs, FLOP/s, for the full-core configuration of each chip.
# Apple GPUs run FP16/BF16 at the FP32 ALU rate (128 FP32 lanes x 2 FLOP (FMA) x clock per core),
# so the FP32 figure is the half-precision figure too. Binned chips with fewer cores are scaled
# by the core count the system reports. M1 and M2 figures are Apple's published TFLOPS;
# the M3 and M4 rows are ESTIMATES (Apple published no TFLOPS for them): cores x 128 x 2 x clock.
APPLE_GPU_PEAK: dict[str, tuple[int, float]] = {
    # chip: (GPU cores of the full configuration, peak FLOP/s)
    "M1": (8, 2.6e12),
    "M1 Pro": (16, 5.2e12),
    "M1 Max": (32, 10.4e12),
    "M1 Ultra": (64, 21.0e12),
    "M2": (10, 3.6e12),
    "M2 Pro": (19, 6.8e12),
    "M2 Max": (38, 13.6e12),
    "M2 Ultra": (76, 27.2e12),
    "M3": (10, 4.1e12),          # estimate (~1.6 GHz)
    "M3 Pro": (18, 7.4e12),      # estimate
    "M3 Max": (40, 16.4e12),     # estimate
    "M3 Ultra": (80, 32.8e12),   # estimate
    "M4": (10, 4.3e12),          # estimate (~1.7 GHz)
    "M4 Pro": (20, 8.6e12),      # estimate
    "M4 Max": (40, 17.2e12),     # estimate
}


def apple_chip(name: str) -> str | None:
    """'Apple M4 Max' -> 'M4 Max'; None when the name is no M-series chip we know."""
    m = re.search(r"\b(M\d)(?:\s+(Pro|Max|Ultra))?\b", name)
    if not m:
        return None
    chip = m.group(1) + (f" {m.group(2)}" if m.group(2) else "")
    return chip if chip in APPLE_GPU_PEAK else None


def apple_peak_flops(name: str, cores: int | None) -> float | None:
    chip = apple_chip(name)
    if chip is None:
        return None
    full_cores, flops = APPLE_GPU_PEAK[chip]
    return flops * cores / full_cores if cores else flops


class MLXEngine:
    name = "mlx"
    train_file = "train_mlx.py"

    def __init__(self) -> None:
        self._hardware: Hardware | None = None

    # -- which device -------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        try:
            import mlx.core as mx
        except ImportError as e:
            hint = "pip install 'mlx[cpu]'" if platform.system() == "Linux" else "pip install mlx"
            return False, f"mlx is not importable ({e}); {hint}"
        try:
            # Runs one op: the plain `mlx` wheel on Linux imports but has no CPU backend to run it.
            mx.eval(mx.array([1.0]) + 1)
        except Exception as e:  # any backend failure means "not usable", with its text
            hint = ("on Linux the plain `mlx` wheel has no CPU backend: pip install 'mlx[cpu]'"
                    if platform.system() == "Linux" else "reinstall mlx for this macOS / Apple chip")
            return False, f"mlx {getattr(mx, '__version__', '?')} has no usable backend ({str(e).splitlines()[0]}); {hint}"
        return True, f"mlx {mx.__version__} on the {'GPU' if self._on_gpu() else 'CPU'}"

    @staticmethod
    def _on_gpu() -> bool:
        import mlx.core as mx
        return mx.default_device().type == mx.gpu

    # -- description ----------------------------------------------------------------
    def hardware(self) -> Hardware:
        if self._hardware is not None:
            return self._hardware
        import mlx.core as mx
        versions = {"mlx": mx.__version__, "python": sys.version.split()[0]}
        mem = total_memory_gb()
        if self._on_gpu():
            name = cpu_model()  # on Apple Silicon the brand string is the chip, e.g. "Apple M4 Max"
            if not name.lower().startswith("apple"):
                name = _metal_device_name() or name
            cores = apple_gpu_cores()
            hw = Hardware(backend=self.name, device=name, memory_gb=round(mem, 1), cores=cores, kind="gpu",
                          versions=versions, tag=slug("mlx", name, f"{round(mem)}gb"))
        else:
            name = cpu_model()
            hw = Hardware(backend=self.name, device=name, memory_gb=round(mem, 1), cores=cpu_count(), kind="cpu",
                          versions=versions, tag=slug("mlx-cpu", name, f"{round(mem)}gb"))
        self._hardware = hw
        return hw

    def peak_flops(self) -> float | None:
        if not self._on_gpu():
            return None
        hw = self.hardware()
        return apple_peak_flops(hw.device, hw.cores)

    # -- runtime ----------------------------------------------------------------------
    def sync(self) -> None:
        import mlx.core as mx
        if hasattr(mx, "synchronize"):
            mx.synchronize()
        else:  # older MLX: evaluating a fresh array waits for the default stream's queue
            mx.eval(mx.array(0))

    def peak_memory_mb(self) -> float:
        import mlx.core as mx
        if hasattr(mx, "get_peak_memory"):
            return mx.get_peak_memory() / 2**20
        return mx.metal.get_peak_memory() / 2**20

    def to_device(self, a: np.ndarray) -> Any:
        import mlx.core as mx
        return mx.array(np.ascontiguousarray(a))

    def to_numpy(self, a: Any) -> np.ndarray:
        import mlx.core as mx
        if a.dtype == mx.bfloat16:  # numpy has no bfloat16
            a = a.astype(mx.float32)
        return np.array(a)

    def token_nats(self, logits: Any, targets: np.ndarray) -> np.ndarray:
        import mlx.core as mx
        lf = logits.astype(mx.float32)
        y = mx.array(np.ascontiguousarray(targets).astype(np.int32))
        target_logit = mx.take_along_axis(lf, y[..., None], axis=-1)[..., 0]
        nats = mx.logsumexp(lf, axis=-1) - target_logit
        return np.array(nats).astype(np.float64)


def _metal_device_name() -> str | None:
    try:
        import mlx.core as mx
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
        name = info.get("device_name")
        return str(name) if name else None
    except Exception:  # a name is a nicety; the caller falls back to the CPU brand string
        return None


ENGINE = MLXEngine()
