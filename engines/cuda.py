"""
PyTorch engine: NVIDIA GPUs through CUDA, or an explicit CPU device for tests
and people without a GPU ($ARUN_DEVICE=cpu). Never a silent fallback: asking
for CUDA on a machine without it is an error that says what was found.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import resource
import subprocess
import sys
import warnings
from typing import Any

import numpy as np

from engines.hardware import Hardware, cpu_count, cpu_model, slug, total_memory_gb

INSTALL_HINT = "pip install -e '.[cuda]'"  # from the project's clone, as the README installs it

# Dense bf16 tensor-core peaks (no sparsity, fp32 accumulate), FLOP/s, matched on the
# device name as a whole token: "A10" does not match "A10G", "H200" does not match "GH200".
# More specific names first: "H100 PCIe" must win over "H100".
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("GH200", 989.5e12),
    ("H200", 989.5e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.5e12),          # SXM: "NVIDIA H100 80GB HBM3"
    ("H800", 989.5e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364.2e12),
    ("RTX A6000", 154.8e12),
    ("RTX 5090", 209.5e12),
    ("RTX 4090", 165.2e12),      # 330.3 with sparsity; dense is the honest MFU denominator
    ("RTX 4080", 97.5e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),            # fp16 tensor cores; V100 has no bf16
]

# Marketed memory sizes: a name without its size ("NVIDIA H100 PCIe") gets the nearest one at or
# above what the driver reports (drivers report a little less than the marketed figure).
MEMORY_BUCKETS_GB = (4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 141, 144, 180, 192, 288)


def peak_flops_for(name: str) -> float | None:
    upper = " ".join(name.upper().replace("-", " ").split())
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"(?<![A-Z0-9]){re.escape(key.upper())}(?![A-Z0-9])", upper):
            return flops
    return None


def memory_bucket_gb(gib: float) -> int:
    for size in MEMORY_BUCKETS_GB:
        if size >= gib - 0.6:
            return size
    return round(gib)


def gpu_tag(name: str, memory_gib: float) -> str:
    """'NVIDIA H100 80GB HBM3' -> cuda-nvidia-h100-80gb-hbm3; 'NVIDIA H100 PCIe' (80 GB) -> cuda-nvidia-h100-pcie-80gb."""
    tag = slug("cuda", name)
    if not re.search(r"\d+\s*gb", name.lower()):  # e.g. "NVIDIA A10G", "NVIDIA GeForce RTX 4090"
        tag = slug(tag, f"{memory_bucket_gb(memory_gib)}gb")
    return tag


class TorchEngine:
    name = "cuda"
    train_file = "train_cuda.py"

    RING = 4  # pinned staging buffers per batch shape: a buffer is refilled only after its copy is done

    def __init__(self) -> None:
        self._pinned: dict[tuple, list] = {}
        self._next_slot: dict[tuple, int] = {}
        self._copy_stream: Any = None
        self._hardware: dict[str, Hardware] = {}
        self._peak: dict[str, float | None] = {}

    # -- which device -------------------------------------------------------------
    @property
    def device_kind(self) -> str:
        """'cuda' (default) or 'cpu', from $ARUN_DEVICE; anything else is an error, never a guess."""
        want = (os.environ.get("ARUN_DEVICE") or "cuda").strip().lower()
        if want not in ("cuda", "cpu"):
            raise ValueError(f"ARUN_DEVICE={want!r} is not a torch engine device; use cuda or cpu")
        return want

    def available(self) -> tuple[bool, str]:
        try:
            kind = self.device_kind
        except ValueError as e:
            return False, str(e)
        if kind == "cpu":
            try:
                return True, f"torch {torch_version()} on the CPU (ARUN_DEVICE=cpu)"
            except ImportError as e:
                return False, f"torch is not importable ({e}); {INSTALL_HINT}"
        try:
            import torch
        except ImportError as e:
            return False, f"torch is not importable ({e}); {INSTALL_HINT}"
        if torch.version.cuda is None:
            return False, (f"no CUDA device: torch {torch.__version__} is a CPU build; use --backend mlx, "
                           f"or --device cpu (ARUN_DEVICE=cpu) to run the torch engine on the CPU")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            usable = torch.cuda.is_available()
            count = _device_count(torch)
        if not usable:
            # torch explains a missing or too-old driver in a warning; pass its first line on
            said = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
            return False, (f"no usable CUDA device: torch {torch.__version__} (built for CUDA {torch.version.cuda}) "
                           f"sees {count} GPUs" + (f" ({said})" if said else "")
                           + "; install or update the NVIDIA driver, or use --device cpu (ARUN_DEVICE=cpu)")
        smi = nvidia_smi_gpu()
        return True, smi["name"] if smi else torch.cuda.get_device_name(0)

    def device(self) -> Any:
        import torch
        return torch.device(self.device_kind)

    # -- description ----------------------------------------------------------------
    def hardware(self) -> Hardware:
        kind = self.device_kind
        if kind not in self._hardware:
            self._hardware[kind] = self._describe(kind)
        return self._hardware[kind]

    def _describe(self, kind: str) -> Hardware:
        versions = {"torch": torch_version(), "python": sys.version.split()[0], "numpy": np.__version__}
        if kind == "cpu":
            name = cpu_model()
            return Hardware(backend=self.name, device=name, memory_gb=round(total_memory_gb(), 1), cores=cpu_count(),
                            kind="cpu", versions=versions, tag=slug("torch-cpu", name))
        import torch
        versions.update(torch=torch.__version__, cuda=torch.version.cuda or "", driver=_driver_version())
        if torch.backends.cudnn.is_available():
            versions["cudnn"] = str(torch.backends.cudnn.version())
        smi = None if torch.cuda.is_initialized() else nvidia_smi_gpu()
        if smi:
            # The harness and swarm actors describe the GPU through the driver's tool, so they hold
            # no CUDA context (hundreds of MB) on the GPU the train process needs whole.
            versions["capability"] = smi["capability"]
            return Hardware(backend=self.name, device=smi["name"], memory_gb=round(smi["memory_gib"], 1),
                            cores=None, kind="gpu", versions=versions, tag=gpu_tag(smi["name"], smi["memory_gib"]))
        props = torch.cuda.get_device_properties(0)
        mem_gib = props.total_memory / 2**30
        versions["capability"] = f"{props.major}.{props.minor}"
        return Hardware(backend=self.name, device=props.name, memory_gb=round(mem_gib, 1),
                        cores=props.multi_processor_count, kind="gpu", versions=versions,
                        tag=gpu_tag(props.name, mem_gib))

    def peak_flops(self) -> float | None:
        kind = self.device_kind
        if kind == "cpu":
            return None
        if kind not in self._peak:
            self._peak[kind] = peak_flops_for(self.hardware().device)
        return self._peak[kind]

    # -- runtime ----------------------------------------------------------------------
    def sync(self) -> None:
        if self.device_kind == "cuda":
            import torch
            torch.cuda.synchronize()

    def peak_memory_mb(self) -> float:
        if self.device_kind == "cuda":
            import torch
            return torch.cuda.max_memory_allocated() / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024

    def to_device(self, a: np.ndarray) -> Any:
        """
        Host batch -> device, dtype kept (int32 tokens stay int32; embeddings accept them).
        On CUDA: staged through reused pinned buffers and copied on a side stream, so the
        copy neither waits behind queued compute nor makes the host wait for it; the
        compute stream waits for the copy before using the result.
        """
        import torch
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device_kind == "cpu":
            return t
        key = (tuple(t.shape), t.dtype)
        ring = self._pinned.setdefault(key, [])
        slot = self._next_slot.get(key, 0)
        self._next_slot[key] = (slot + 1) % self.RING
        if slot == len(ring):
            ring.append((torch.empty(t.shape, dtype=t.dtype, pin_memory=True), torch.cuda.Event()))
        pinned, copied = ring[slot]
        copied.synchronize()  # the last copy out of this buffer must be done before we overwrite it
        pinned.copy_(t)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()
        compute = torch.cuda.current_stream()
        with torch.cuda.stream(self._copy_stream):
            out = pinned.to("cuda", non_blocking=True)
            copied.record(self._copy_stream)
        compute.wait_stream(self._copy_stream)
        out.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return out

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.detach().float().cpu().numpy()

    def token_nats(self, logits: Any, targets: np.ndarray) -> np.ndarray:
        """Per-token cross-entropy in nats (fp32 on the device, float64 on the host); targets stay on the host until here."""
        import torch
        import torch.nn.functional as F
        with torch.no_grad():
            y = torch.from_numpy(np.ascontiguousarray(targets)).to(logits.device).long()
            nats = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            return nats.reshape(y.shape).cpu().numpy().astype(np.float64)


def torch_version() -> str:
    """torch's version, without importing torch where it is not imported yet: the harness describes a
    CPU device before every run, and importing torch there costs seconds the run does not need
    (the train process and the evaluator import it themselves). ImportError when torch is missing."""
    if "torch" in sys.modules:
        loaded = sys.modules["torch"]
        if loaded is None:  # blocked, as `import torch` would find it
            raise ImportError("import of torch halted; None in sys.modules")
        return str(loaded.__version__)
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError as e:
        raise ImportError("No module named 'torch'") from e


def _device_count(torch: Any) -> int:
    try:
        return torch.cuda.device_count()
    except Exception:  # a broken driver can raise anything here; 0 is the honest answer
        return 0


def parse_nvidia_smi_gpu(line: str) -> dict | None:
    """One line of `nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits`."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        return {"name": parts[0], "memory_gib": float(parts[1]) / 1024, "capability": parts[2]}
    except ValueError:
        return None


def nvidia_smi_gpu() -> dict | None:
    """The first visible GPU as the driver describes it, without creating a CUDA context; None when
    nvidia-smi is missing or says nothing usable (the caller then asks torch)."""
    visible = (os.environ.get("CUDA_VISIBLE_DEVICES") or "").split(",")[0].strip()
    if visible in ("-1",) or (os.environ.get("CUDA_VISIBLE_DEVICES") is not None and not visible):
        return None
    cmd = ["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(cmd + (["-i", visible] if visible else []), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return parse_nvidia_smi_gpu(lines[0]) if out.returncode == 0 and lines else None


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        lines = out.stdout.strip().splitlines()
        return lines[0].strip() if out.returncode == 0 and lines else ""
    except (OSError, subprocess.SubprocessError):
        return ""


ENGINE = TorchEngine()
