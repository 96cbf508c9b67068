"""
The PyTorch engine and train_cuda.py, on the explicit CPU device (ARUN_DEVICE=cpu):
real torch, real subprocess runs of the train file at a tiny config, real prepared data.
The runs use the live train_cuda.py and check behaviour only; in-process tests of the model
load the frozen copy in tests/baseline/; the attention kernels are tested in engines/.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from arun.core.trainfile import rewrite_constants
from engines import torch_attention
from engines.cuda import ENGINE, gpu_tag, memory_bucket_gb, peak_flops_for
from engines.weights import import_weights
from helpers_repo import load_module

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "tests" / "baseline" / "train_cuda.py"
TINY = dict(DEPTH=2, ASPECT_RATIO=32, HEAD_DIM=16, DEVICE_BATCH_SIZE=8, TOTAL_BATCH_SIZE=8 * 64)
BUDGET = 3.0




def tiny_train_file(tmp_path: Path, text_edit=None) -> Path:
    text = rewrite_constants((REPO / "train_cuda.py").read_text(), TINY)
    if text_edit:
        text = text_edit(text)
    path = tmp_path / "train_cuda.py"
    path.write_text(text)
    return path


def run_train(path: Path, tmp_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # One intra-op thread: on a busy 2-core machine, spinning OpenMP threads slow tiny steps 100-fold.
    env = dict(os.environ, ARUN_DEVICE="cpu", ARUN_TIME_BUDGET=str(BUDGET), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               ARUN_RESULT_JSON=str(tmp_path / "result.json"), ARUN_CHECKPOINT=str(tmp_path / "weights.npz"))
    env.pop("ARUN_SEED", None)
    return subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests too: tiny tensors gain nothing from threads, and lose a lot when cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARUN_DEVICE", "cpu")


def test_tiny_run_end_to_end(data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = run_train(tiny_train_file(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "step 00001 | progress" in out
    for line in ("val_bpb:", "training_seconds:", "total_seconds:", "peak_vram_mb:", "num_steps:", "depth:            2"):
        assert line in out, line

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == "cuda" and result["hardware"]["tag"].startswith("torch-cpu-")
    bpb = result["val_bpb"]
    uniform = math.log2(result["model_config"]["vocab_size"]) * result["eval_tokens"] / result["eval_bytes"]
    assert math.isfinite(bpb) and 0 < bpb < uniform, (bpb, uniform)
    # the budget counts training time after the warm-up steps; it stops at the first step past it
    assert BUDGET <= result["training_seconds"] < BUDGET + 2.0, result["training_seconds"]
    assert result["num_steps"] > result["warmup_steps"]
    assert result["config"]["DEPTH"] == 2 and result["compile"] is False and result["attention"] == "sdpa"

    # the checkpoint rebuilds the same model: same val_bpb from the fixed evaluator
    meta = json.loads((tmp_path / "weights.json").read_text())
    with np.load(tmp_path / "weights.npz") as npz:
        weights = {k: npz[k] for k in npz.files}
    assert "transformer.h.1.attn.ve_gate.weight" in weights and "value_embeds.1.weight" in weights
    assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (256, 64)  # torch Linear layout (out, in)
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    module = load_module(tmp_path / "train_cuda.py", "train_cuda_ckpt")
    model = module.GPT(module.GPTConfig(**meta["config"]))
    model.init_weights()
    import_weights(model, weights)
    from engines.evaluator import evaluate_bpb
    from prepare import PreparedData
    data = PreparedData.open()
    with torch.no_grad():
        again = evaluate_bpb(ENGINE, model, 32, data.val_rows(), data.token_bytes())
    assert abs(again.val_bpb - bpb) <= 1e-6 * bpb


def test_nan_config_fails_fast(data_env: Path, tmp_path: Path) -> None:
    path = tiny_train_file(tmp_path, lambda t: t.replace("EMBEDDING_LR = 0.6", 'EMBEDDING_LR = float("nan")'))
    assert 'float("nan")' in path.read_text()
    proc = run_train(path, tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("FAIL: training loss is nan at step"), proc.stderr[-2000:]
    assert int(err.split("at step ")[1].split(";")[0]) <= 3  # stopped at once, not after the budget
    assert not (tmp_path / "result.json").exists()


def test_import_runs_no_training(data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    monkeypatch.setenv("ARUN_RESULT_JSON", str(tmp_path / "r.json"))
    t0 = time.perf_counter()
    module = load_module(REPO / "train_cuda.py", "train_cuda_import")
    assert time.perf_counter() - t0 < 5
    assert capsys.readouterr().out == ""  # no setup, no steps, no summary
    assert not (tmp_path / "r.json").exists()
    assert callable(module.train) and isinstance(module.DEPTH, int)


@pytest.mark.unit
@pytest.mark.skipif(torch.version.cuda is not None, reason="this machine's torch is a CUDA build")
def test_unavailable_without_cuda_names_the_cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARUN_DEVICE", raising=False)
    ok, why = ENGINE.available()
    assert not ok
    assert torch.__version__ in why and "CPU build" in why
    assert "--backend mlx" in why and "ARUN_DEVICE=cpu" in why  # says what would work


@pytest.mark.unit
def test_cuda_build_with_unusable_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA build of torch on a machine whose driver is missing or too old (what torch reports there)."""
    def is_available() -> bool:
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).", stacklevel=2)
        return False
    monkeypatch.delenv("ARUN_DEVICE", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    ok, why = ENGINE.available()
    assert not ok
    assert "CUDA 12.8" in why and "sees 0 GPUs" in why and "driver on your system is too old" in why
    assert "ARUN_DEVICE=cpu" in why


@pytest.mark.unit
def test_torch_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` does without torch installed
    ok, why = ENGINE.available()
    assert not ok and "pip install -e '.[cuda]'" in why


@pytest.mark.unit
def test_unknown_device_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARUN_DEVICE", "mps")
    ok, why = ENGINE.available()
    assert not ok and "ARUN_DEVICE" in why and "cpu" in why


@pytest.mark.unit
def test_cpu_device_description(cpu_device: None) -> None:
    ok, why = ENGINE.available()
    assert ok, why
    hw = ENGINE.hardware()
    assert hw.tag.startswith("torch-cpu-") and hw.kind == "cpu" and hw.backend == "cuda"
    assert hw.versions["torch"] == torch.__version__
    assert ENGINE.peak_flops() is None
    assert ENGINE.peak_memory_mb() > 10
    ENGINE.sync()  # a no-op on the CPU


@pytest.mark.unit
def test_cpu_arrays_and_token_nats(cpu_device: None) -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    t = ENGINE.to_device(x)
    assert t.dtype == torch.int32 and t.device.type == "cpu" and np.array_equal(ENGINE.to_numpy(t), x)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5)).astype(np.int32)
    nats = ENGINE.token_nats(torch.from_numpy(logits).to(torch.bfloat16), targets)
    assert nats.dtype == np.float64 and nats.shape == (2, 5)
    ref = torch.from_numpy(logits).to(torch.bfloat16).double()
    want = (torch.logsumexp(ref, -1) - ref.gather(-1, torch.from_numpy(targets).long()[..., None])[..., 0]).numpy()
    np.testing.assert_allclose(nats, want, rtol=1e-5)


@pytest.mark.unit
@pytest.mark.parametrize("name, mem, flops, tag", [
    ("NVIDIA H100 80GB HBM3", 79.1, 989.5e12, "cuda-nvidia-h100-80gb-hbm3"),
    ("NVIDIA H100 PCIe", 79.2, 756e12, "cuda-nvidia-h100-pcie-80gb"),
    ("NVIDIA H100 NVL", 93.6, 835e12, "cuda-nvidia-h100-nvl-94gb"),
    ("NVIDIA H200", 139.8, 989.5e12, "cuda-nvidia-h200-141gb"),
    ("NVIDIA GH200 480GB", 94.5, 989.5e12, "cuda-nvidia-gh200-480gb"),
    ("NVIDIA A100-SXM4-40GB", 39.4, 312e12, "cuda-nvidia-a100-sxm4-40gb"),
    ("NVIDIA A10G", 22.5, 70e12, "cuda-nvidia-a10g-24gb"),
    ("NVIDIA L4", 22.5, 121e12, "cuda-nvidia-l4-24gb"),
    ("NVIDIA L40S", 44.5, 362.05e12, "cuda-nvidia-l40s-48gb"),
    ("NVIDIA GeForce RTX 4090", 23.6, 165.2e12, "cuda-nvidia-geforce-rtx-4090-24gb"),
    ("NVIDIA B200", 178.4, 2250e12, "cuda-nvidia-b200-180gb"),
    ("Tesla T4", 14.6, None, "cuda-tesla-t4-16gb"),
])
def test_gpu_names_to_peak_flops_and_tags(name: str, mem: float, flops: float | None, tag: str) -> None:
    assert peak_flops_for(name) == flops
    assert gpu_tag(name, mem) == tag


@pytest.mark.unit
def test_memory_buckets() -> None:
    assert [memory_bucket_gb(g) for g in (7.6, 11.7, 15.7, 23.6, 47.5, 79.2, 300.0)] == [8, 12, 16, 24, 48, 80, 300]


# ---------------------------------------------------------------------------
# Attention: the sliding-window masks of every kernel path agree with one dense reference
# ---------------------------------------------------------------------------

def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """(B, T, H, D) float64 attention with the rule written out: query i sees keys i-window .. i."""
    B, T, H, D = q.shape
    allowed = torch.tensor([[0 <= i - j <= window for j in range(T)] for i in range(T)])
    scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / math.sqrt(D)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v.double())


@pytest.mark.e2e
@pytest.mark.parametrize("seq_len", [256])  # two 128-token flex blocks: tiles fully in, partly in, out
def test_sliding_window_masks_match_dense_reference(cpu_device: None, seq_len: int) -> None:
    from torch.nn.attention.flex_attention import create_mask
    ta = torch_attention
    cpu = torch.device("cpu")
    assert ta.prepare_attention(seq_len, [seq_len // 2] * 3 + [seq_len], cpu) == "sdpa"  # the CPU's kernel
    assert set(ta._BY_DEVICE[("cpu", 0)].masks) >= {(seq_len, seq_len // 2)}  # built up front, not in a graph
    sdpa, flex = ta.Attention(cpu, "sdpa"), ta.Attention(cpu, "flex")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, seq_len, 2, 16, generator=g) for _ in range(3))
    for window in (3, seq_len // 2, seq_len):
        want = torch.tensor([[0 <= i - j <= window for j in range(seq_len)] for i in range(seq_len)])
        assert torch.equal(ta.dense_window_mask(seq_len, window, cpu), want)
        assert torch.equal(create_mask(ta.window_mask_mod(window), 1, 1, seq_len, seq_len, device="cpu")[0, 0], want)
        ref = reference_attention(q, k, v, window)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention warns that it is unfused when not compiled
            for attention in (sdpa, flex, ta.attention):
                got = attention(q, k, v, window)
                assert got.shape == q.shape
                torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        ta.Attention(cpu, "magic")


@pytest.mark.unit
def test_model_is_causal_and_softcapped(cpu_device: None) -> None:
    t = load_module(BASELINE, "train_cuda_causal")
    torch.manual_seed(0)
    model = t.GPT(t.GPTConfig(sequence_len=32, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialized projections would hide attention entirely
            p.add_(0.05 * torch.randn_like(p))
        idx = torch.randint(0, 64, (2, 32), dtype=torch.int32)
        changed = idx.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % 64
        a, b = model(idx), model(changed)
    assert a.dtype == torch.float32 and a.shape == (2, 32, 64) and a.abs().max() <= 15
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.equal(a[:, 20:], b[:, 20:])
