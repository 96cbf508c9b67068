"""
PyTorch engine: NVIDIA GPUs through CUDA, or an explicit CPU device for tests
and people without a GPU ($ARUN_DEVICE=cpu). Never a silent fallback: asking
for CUDA on a machine without it is an error that says what was found.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import Any

import numpy as np

from engines.hardware import Hardware, cpu_count, cpu_model, slug, total_memory_gb

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, matched on the device name.
# More specific names first: "H100 PCIe" must win over "H100".
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GH200", 989.5e12),
    ("H200", 989.5e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),          # SXM
    ("H800", 989.5e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165.2e12),
    ("RTX 4080", 97.5e12),
    ("RTX 3090", 71e12),
    ("RTX A6000", 154.8e12),
    ("V100", 125e12),            # fp16 tensor cores; V100 has no bf16
]


def peak_flops_for(name: str) -> float | None:
    upper = name.upper()
    for key, flops in PEAK_BF16_FLOPS:
        if key.upper() in upper:
            return flops
    return None


class TorchEngine:
    name = "cuda"
    train_file = "train_cuda.py"

    def __init__(self) -> None:
        self._pinned: dict[tuple, Any] = {}

    # -- which device -------------------------------------------------------------
    @property
    def device_kind(self) -> str:
        want = os.environ.get("ARUN_DEVICE", "cuda").lower()
        if want not in ("cuda", "cpu"):
            raise ValueError(f"ARUN_DEVICE={want!r}: use cuda or cpu")
        return want

    def available(self) -> tuple[bool, str]:
        try:
            import torch
        except ImportError:
            return False, "torch is not installed; pip install -e '.[cuda]'"
        if self.device_kind == "cpu":
            return True, f"torch {torch.__version__} on the CPU (ARUN_DEVICE=cpu)"
        if torch.version.cuda is None:
            return False, (f"torch {torch.__version__} is a CPU build and sees no GPU; use --backend mlx, "
                           f"or --device cpu (ARUN_DEVICE=cpu) for the torch CPU engine")
        if not torch.cuda.is_available():
            count = torch.cuda.device_count() if hasattr(torch.cuda, "device_count") else 0
            return False, (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU ({count} devices; "
                           f"driver missing or too old for this CUDA); update the driver, or use --device cpu")
        return True, f"{torch.cuda.get_device_name(0)}"

    def device(self) -> Any:
        import torch
        return torch.device("cuda" if self.device_kind == "cuda" else "cpu")

    # -- description ----------------------------------------------------------------
    def hardware(self) -> Hardware:
        import torch
        versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
        if self.device_kind == "cpu":
            name, mem = cpu_model(), total_memory_gb()
            return Hardware(backend=self.name, device=name, memory_gb=round(mem, 1), cores=cpu_count(), kind="cpu",
                            versions=versions, tag=slug("torch-cpu", name))
        props = torch.cuda.get_device_properties(0)
        name = props.name
        mem_gb = props.total_memory / 2**30
        versions.update(cuda=torch.version.cuda or "", driver=_driver_version())
        tag = slug("cuda", name)
        if "gb" not in name.lower():  # e.g. "NVIDIA A100-SXM4" comes in 40 and 80 GB
            tag = slug(tag, f"{round(mem_gb)}gb")
        return Hardware(backend=self.name, device=name, memory_gb=round(mem_gb, 1), cores=props.multi_processor_count,
                        kind="gpu", versions=versions, tag=tag)

    def peak_flops(self) -> float | None:
        if self.device_kind == "cpu":
            return None
        import torch
        return peak_flops_for(torch.cuda.get_device_name(0))

    # -- runtime ----------------------------------------------------------------------
    def sync(self) -> None:
        if self.device_kind == "cuda":
            import torch
            torch.cuda.synchronize()

    def peak_memory_mb(self) -> float:
        if self.device_kind == "cuda":
            import torch
            return torch.cuda.max_memory_allocated() / 2**20
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20

    def to_device(self, a: np.ndarray) -> Any:
        """Host batch -> device. On CUDA through a reused pinned buffer, asynchronously."""
        import torch
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device_kind == "cpu":
            return t
        key = (tuple(t.shape), t.dtype)
        if key not in self._pinned:
            self._pinned[key] = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True), torch.cuda.Event())
        pinned, copied = self._pinned[key]
        copied.synchronize()  # the previous async copy out of this buffer must finish before we overwrite it
        pinned.copy_(t)
        # A new device tensor per batch: the previous one may still be in use by queued kernels.
        out = pinned.to("cuda", non_blocking=True)
        copied.record()
        return out

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.detach().float().cpu().numpy()

    def token_nats(self, logits: Any, targets: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        with torch.no_grad():
            y = torch.from_numpy(np.ascontiguousarray(targets)).to(logits.device).long()
            nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            return nats.reshape(y.shape).double().cpu().numpy()


def _driver_version() -> str:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError, IndexError):
        return ""


ENGINE = TorchEngine()
