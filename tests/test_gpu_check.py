"""
benchmarks/gpu_check.sh --cpu end to end: the offline corpus, `arun prepare files:`, a real
`arun --backend cuda --device cpu` run (train process, export, evaluator, test rows, ledger),
the evaluator alone under an RSS wrapper, bench_train.py, and the table printed last. This is
everything the GPU check does except touching a GPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = ["gpu", "hardware tag", "harness holds a CUDA context", "prepare seconds", "bench sdpa: tokens/s",
        "bench sdpa: MFU vs datasheet peak", "bench sdpa: MFU vs measured matmul", "bench sdpa: per 300 s",
        "bench sdpa: peak memory", "matmul bf16 measured", "run: status", "run: val_bpb (evaluator)", "run: test_bpb",
        "run: steps / tokens", "run: tokens/s, MFU", "run: peak memory", "run: startup + compile s",
        "run: score s (evaluator)", "run: test s (evaluator)", "run: overhead split s", "evaluator alone: seconds",
        "evaluator alone: host peak RSS", "export with flex attention: max diff", "failed steps"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_cpu_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path), HOME=str(tmp_path / "home"))
    for name in ("ARUN_CACHE", "ARUN_DATA_DIR", "ARUN_DEVICE", "ARUN_SEED"):
        env.pop(name, None)
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    table_at = lines.index("GPU CHECK")
    assert [line.split("  ")[0].strip() for line in lines[table_at + 2:]] == ROWS  # the table is last

    table = json.loads((out / "table.json").read_text())
    assert list(table) == ROWS
    assert table["run: status"] == "keep"  # the first run of a key is its baseline
    assert float(table["run: val_bpb (evaluator)"]) > 0 and float(table["run: test_bpb"]) > 0
    assert table["failed steps"] == "none"
    assert table["harness holds a CUDA context"] == "n/a (cpu)"
    assert table["hardware tag"].startswith("torch-cpu")
    assert float(table["evaluator alone: host peak RSS"].split()[0].replace(",", "")) > 0

    figures = json.loads((out / "figures.json").read_text())
    rec = figures["record"]
    assert rec["val_bpb"] == pytest.approx(figures["evaluator"]["val_bpb"])  # the rerun scores the kept bytes alike
    assert rec["device"] == "cpu" and rec["confined"] is not None
    assert figures["bench"]["sdpa"]["tokens_per_second"] > 0
    assert figures["export_flex_max_diff"] < 1e-3   # the sliding-window layers on flex export (as SDPA) and agree
    for name in ("gpu_check.log", "arun.stdout.txt", "record.json", "prepare.stdout.txt"):
        assert (out / name).exists(), name
    assert not list(tmp_path.glob("gpu-check-*")), "the scratch folder was left behind"


@pytest.mark.unit
def test_nvidia_smi_description_gives_the_torch_tag() -> None:
    """The harness describes the GPU from nvidia-smi (no CUDA context); the tag must be the one torch's
    description gives, or ledgers would split (nvidia-smi's MiB run a little above torch's total)."""
    from engines.cuda import gpu_tag, parse_nvidia_smi_gpu
    smi = parse_nvidia_smi_gpu("NVIDIA H100 80GB HBM3, 81559, 9.0")
    assert smi == {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 81559 / 1024, "capability": "9.0"}
    assert gpu_tag(smi["name"], smi["memory_gib"]) == gpu_tag("NVIDIA H100 80GB HBM3", 79.1)
    pcie = parse_nvidia_smi_gpu("NVIDIA H100 PCIe, 81559, 9.0")
    assert gpu_tag(pcie["name"], pcie["memory_gib"]) == gpu_tag("NVIDIA H100 PCIe", 79.1) == "cuda-nvidia-h100-pcie-80gb"
    assert parse_nvidia_smi_gpu("No devices were found") is None
    assert parse_nvidia_smi_gpu("NVIDIA A10G, [N/A], 8.6") is None
