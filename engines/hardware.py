"""Host description and the hardware tag slugs that keep ledgers apart."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field


@dataclass
class Hardware:
    backend: str                 # "mlx" or "cuda"
    device: str                  # e.g. "NVIDIA H100 80GB HBM3", "Apple M4 Max", CPU model
    memory_gb: float             # device memory (unified memory on Apple, RAM for CPU devices)
    cores: int | None = None     # GPU cores / SMs / CPU cores
    kind: str = "gpu"            # "gpu" or "cpu"
    versions: dict = field(default_factory=dict)
    tag: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def slug(*parts: object) -> str:
    text = "-".join(str(p) for p in parts if p not in (None, ""))
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu @ [\d.]+ghz|with radeon graphics|processor|\d+-core)\b", "", text)
    return re.sub(r"[^a-z0-9.]+", "-", text).strip("-.")


def cpu_model() -> str:
    if platform.system() == "Darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def total_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def apple_gpu_cores() -> int | None:
    """GPU core count as the system reports it (macOS only)."""
    if platform.system() != "Darwin":
        return None
    try:
        out = subprocess.run(["system_profiler", "SPDisplaysDataType"], capture_output=True, text=True, timeout=20).stdout
        m = re.search(r"Total Number of Cores:\s*(\d+)", out)
        return int(m.group(1)) if m else None
    except (OSError, subprocess.SubprocessError):
        return None
