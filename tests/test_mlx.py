"""
MLX engine and train_mlx.py, on MLX's CPU backend with a tiny model and the tiny corpus.

The end-to-end runs are real subprocesses of a copy of train_mlx.py whose hyperparameter
block is rewritten to a tiny model. They run with COMPILE = False: on the CPU, mx.compile
JIT-builds C++ kernels (about a minute on a cold cache, then cached under $TMPDIR/mlx), so
the compiled path is checked once, in process, against the eager one.

The end-to-end runs use the live train_mlx.py and check behaviour only; the in-process
tests of its internals load the frozen copy in tests/baseline/, so a kept refactor of the
live file on a run branch does not break them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from engines.mlx import ENGINE, apple_chip, apple_peak_flops  # noqa: E402
from engines.mlx_attention import attention, window_mask  # noqa: E402
from engines.weights import export_weights, import_weights, save_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "train_mlx.py"
BASELINE = REPO / "tests" / "baseline" / "train_mlx.py"

TINY = {
    "DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 16, "WINDOW_PATTERN": "SL",
    "TOTAL_BATCH_SIZE": 8 * 64, "DEVICE_BATCH_SIZE": 8,
    "EMBEDDING_LR": 0.6, "UNEMBEDDING_LR": 0.004, "MATRIX_LR": 0.04, "SCALAR_LR": 0.5, "WEIGHT_DECAY": 0.2,
    "ADAM_BETAS": (0.8, 0.95), "WARMUP_RATIO": 0.0, "WARMDOWN_RATIO": 0.5, "FINAL_LR_FRAC": 0.0,
    "SEED": 42, "WARMUP_STEPS": 3, "COMPILE": False, "COMPUTE_DTYPE": "float32",
}
BLOCK = re.compile(r"^# --- hyperparameters ---\n.*?^# --- end hyperparameters ---\n", re.S | re.M)


def tiny_train_file(dest: Path, **overrides: object) -> Path:
    """A copy of train_mlx.py whose hyperparameter block is replaced by the tiny one."""
    values = {**TINY, **overrides}
    block = "# --- hyperparameters ---\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items()) + \
            "# --- end hyperparameters ---\n"
    text, n = BLOCK.subn(lambda m: block, TRAIN_FILE.read_text())
    assert n == 1, "train_mlx.py must have exactly one hyperparameter block between the marker lines"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "train_mlx.py"
    path.write_text(text)
    return path


def run_train(script: Path, budget: float, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, ARUN_TIME_BUDGET=str(budget), PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, str(script)], cwd=script.parent, env=full_env, capture_output=True,
                          text=True, timeout=300)


def load_module(path: Path = BASELINE, name: str = "train_mlx_under_test", **constants: object) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    for key, value in {**TINY, **constants}.items():
        setattr(mod, key, value)
    return mod


def tiny_model(tm: ModuleType, seed: int = 0, vocab: int = 512, seq: int = 64):
    mx.random.seed(seed)
    model = tm.GPT(tm.build_config(vocab, seq))
    model.init_weights()
    mx.eval(model.parameters())
    return model


# ---------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------

def test_train_run_end_to_end(data_env: Path, tmp_path: Path) -> None:
    import prepare
    budget = 3.0
    script = tiny_train_file(tmp_path / "run")
    result_path, ckpt = tmp_path / "result.json", tmp_path / "ckpt" / "model.npz"
    p = run_train(script, budget, ARUN_RESULT_JSON=str(result_path), ARUN_CHECKPOINT=str(ckpt))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert re.search(r"^val_bpb:\s+\d", p.stdout, re.M), p.stdout[-2000:]
    assert "Model config:" in p.stdout and "Parameter counts:" in p.stdout

    r = json.loads(result_path.read_text())
    data = prepare.PreparedData.open(data_env)
    rows, token_bytes = data.val_rows(), data.token_bytes()
    vocab = int(token_bytes.shape[0])
    nbytes = token_bytes[rows[:, 1:]]
    uniform_bpb = math.log2(vocab) * int((nbytes > 0).sum()) / int(nbytes.sum())
    assert math.isfinite(r["val_bpb"]) and 0 < r["val_bpb"] < uniform_bpb, (r["val_bpb"], uniform_bpb)

    # Counted time reaches the budget and overshoots it by less than the last step took.
    last_dt = float(re.findall(r"^step \d+ .*\| dt (\d+)ms", p.stdout, re.M)[-1]) / 1000
    assert budget <= r["training_seconds"] < budget + last_dt + 0.002, (r["training_seconds"], last_dt)
    assert r["num_steps"] > TINY["WARMUP_STEPS"]
    assert r["backend"] == "mlx" and r["hardware"]["tag"].startswith("mlx-")
    assert r["config"]["DEPTH"] == 2 and r["model_config"]["n_embd"] == 64

    # The checkpoint: upstream names, fp32, and a config sidecar that rebuilds the model.
    weights = dict(np.load(ckpt))
    side = json.loads(ckpt.with_suffix(".json").read_text())
    assert side["config"] == r["model_config"]
    assert all(w.dtype == np.float32 for w in weights.values())
    tm = load_module(script, name="train_mlx_ckpt")
    model = tm.GPT(tm.GPTConfig(**side["config"]))
    import_weights(model, weights)
    x = mx.array(rows[:4, :-1])
    nats = ENGINE.token_nats(model(x), rows[:4, 1:])
    assert np.isfinite(nats).all() and nats.mean() < math.log(vocab)


def test_diverging_run_fails_fast(data_env: Path, tmp_path: Path) -> None:
    script = tiny_train_file(tmp_path / "nan", EMBEDDING_LR=1e30, UNEMBEDDING_LR=1e30, MATRIX_LR=1e30, SCALAR_LR=1e30)
    result_path = tmp_path / "result.json"
    p = run_train(script, 30.0, ARUN_RESULT_JSON=str(result_path))
    assert p.returncode != 0
    assert "FAIL:" in p.stderr + p.stdout, p.stderr[-2000:]
    assert not result_path.exists()
    assert "val_bpb" not in p.stdout


def test_import_runs_no_training(data_env: Path, tmp_path: Path) -> None:
    script = tiny_train_file(tmp_path / "imp")
    code = ("import sys, time; t = time.time(); import train_mlx as t_; "
            "assert callable(t_.train) and t_.GPT and t_.build_config; print('imported', round(time.time() - t, 1))")
    p = subprocess.run([sys.executable, "-c", code], cwd=script.parent, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=f"{script.parent}{os.pathsep}{REPO}", ARUN_TIME_BUDGET="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("imported") and "step" not in p.stdout and "val_bpb" not in p.stdout


# ---------------------------------------------------------------------------
# Model, weights, optimizer
# ---------------------------------------------------------------------------

def upstream_names(n_layer: int) -> set[str]:
    names = {"transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas"}
    for i in range(n_layer):
        names |= {f"transformer.h.{i}.attn.c_{k}.weight" for k in ("q", "k", "v", "proj")}
        names |= {f"transformer.h.{i}.mlp.c_fc.weight", f"transformer.h.{i}.mlp.c_proj.weight"}
        if i % 2 == (n_layer - 1) % 2:
            names |= {f"transformer.h.{i}.attn.ve_gate.weight", f"value_embeds.{i}.weight"}
    return names


@pytest.mark.unit
def test_export_import_round_trip(tmp_path: Path) -> None:
    tm = load_module(name="train_mlx_rt", DEPTH=3)
    a, b = tiny_model(tm, seed=1), tiny_model(tm, seed=2)
    wa = export_weights(a)
    assert set(wa) == upstream_names(3)
    assert wa["transformer.h.0.mlp.c_fc.weight"].shape == (4 * 96, 96)        # torch Linear: (out, in)
    assert wa["transformer.h.2.attn.ve_gate.weight"].shape == (6, 32)         # 96 / HEAD_DIM 16 = 6 kv heads
    assert wa["value_embeds.2.weight"].shape == (512, 96)
    assert all(w.dtype == np.float32 for w in wa.values())

    save_checkpoint(a, tmp_path / "w.npz")
    assert (tmp_path / "w.npz").exists() and not (tmp_path / "w.npz.npz").exists()
    assert json.loads((tmp_path / "w.json").read_text())["config"]["n_layer"] == 3
    import_weights(b, dict(np.load(tmp_path / "w.npz")))
    for name, w in export_weights(b).items():
        np.testing.assert_array_equal(w, wa[name], err_msg=name)
    x = mx.array(np.random.default_rng(0).integers(0, 512, (2, 64), dtype=np.int32))
    np.testing.assert_array_equal(np.array(a(x)), np.array(b(x)))

    with pytest.raises(ValueError, match="missing"):
        import_weights(b, {k: v for k, v in wa.items() if k != "lm_head.weight"})


@pytest.mark.unit
def test_rope_matches_upstream_formula() -> None:
    """Upstream: split halves, y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos, freqs t / 10000^(2i/D), on (B, T, H, D)."""
    tm = load_module(name="train_mlx_rope")
    B, T, H, D = 2, 37, 3, 16
    x = np.random.default_rng(0).standard_normal((B, T, H, D)).astype(np.float32)
    inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2, dtype=np.float64) / D))
    freqs = np.outer(np.arange(T, dtype=np.float64), inv_freq)
    cos, sin = np.cos(freqs)[None, :, None, :], np.sin(freqs)[None, :, None, :]
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    want = np.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)
    got = np.array(tm.rope(mx.array(x).transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.unit
def test_config_and_window_sizes() -> None:
    tm = load_module(name="train_mlx_cfg", DEPTH=5, ASPECT_RATIO=64, HEAD_DIM=128, WINDOW_PATTERN="SSSL")
    c = tm.build_config(8192, 2048)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (384, 3, 3, 5)   # ceil(320 / 128) * 128
    assert tm.window_sizes(c) == [1024, 1024, 1024, 2048, 2048]                # the last layer is always full
    m = np.array(window_mask(8, 3))
    i, j = np.indices((8, 8))
    np.testing.assert_array_equal(m, (j <= i) & (i - j <= 3))                  # FA3 window_size=(3, 0)


@pytest.mark.unit
@pytest.mark.parametrize("seq_len, window", [(64, 64), (64, 32), (37, 5)])
def test_attention_matches_reference(seq_len: int, window: int) -> None:
    """Query i attends to keys i - window .. i; grouped-query heads share their kv head."""
    rng = np.random.default_rng(seq_len + window)
    q, k, v = (rng.standard_normal((2, h, seq_len, 16)).astype(np.float32) for h in (4, 2, 2))
    kk, vv = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    i, j = np.indices((seq_len, seq_len))
    scores = np.einsum("bhid,bhjd->bhij", q, kk) / 4.0
    scores = np.where((j <= i) & (i - j <= window), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhij,bhjd->bhid", p / p.sum(-1, keepdims=True), vv)
    got = np.array(attention(mx.array(q), mx.array(k), mx.array(v), window))
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.unit
def test_model_is_causal_with_windows() -> None:
    tm = load_module(name="train_mlx_causal")
    model = tiny_model(tm)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 512, (2, 64), dtype=np.int32)
    y = x.copy()
    y[:, 40:] = rng.integers(0, 512, (2, 24))
    a, b = np.array(model(mx.array(x))), np.array(model(mx.array(y)))
    assert a.shape == (2, 64, 512) and a.dtype == np.float32 and np.abs(a).max() <= 15.0
    np.testing.assert_allclose(a[:, :40], b[:, :40], atol=1e-5)
    assert np.abs(a[:, 40:] - b[:, 40:]).max() > 1e-4


@pytest.mark.e2e
def test_compiled_step_matches_eager() -> None:
    """Same init, two optimizer steps (one micro-batch, then accumulation of two): compiled == eager."""
    tm = load_module(name="train_mlx_compile")
    rng = np.random.default_rng(0)
    batches = [(mx.array(rng.integers(0, 512, (4, 64), dtype=np.int32)),
                mx.array(rng.integers(0, 512, (4, 64), dtype=np.int32))) for _ in range(2)]
    results = {}
    for compiled in (False, True):
        model = tiny_model(tm, seed=3)
        for accum in (1, 2):
            step = tm.make_train_step(model, tm.build_optimizer(model), accum, compile=compiled)
            losses = [step(batches[:accum], 0.1 * i, i).item() for i in range(2)]
        results[compiled] = (losses, export_weights(model))
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    for name, w in results[False][1].items():
        np.testing.assert_allclose(results[True][1][name], w, atol=2e-4, rtol=1e-3, err_msg=name)
    assert all(np.isfinite(results[False][0]))


def test_training_reduces_loss_on_a_fixed_batch() -> None:
    tm = load_module(name="train_mlx_fit")
    model = tiny_model(tm, seed=4)
    step = tm.make_train_step(model, tm.build_optimizer(model), 1, compile=False)
    rng = np.random.default_rng(1)
    batch = [(mx.array(rng.integers(0, 512, (4, 64), dtype=np.int32)), mx.array(rng.integers(0, 512, (4, 64), dtype=np.int32)))]
    losses = [step(batch, 0.0, i).item() for i in range(8)]
    assert abs(losses[0] - math.log(512)) < 0.1      # lm_head starts near zero: uniform predictions
    assert losses[-1] < losses[0] - 0.5


# ---------------------------------------------------------------------------
# Engine adapter
# ---------------------------------------------------------------------------

@pytest.mark.unit
def test_token_nats_matches_numpy_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 7, 50)) * 4).astype(np.float32)
    targets = rng.integers(0, 50, (3, 7)).astype(np.int32)
    l64 = logits.astype(np.float64)
    m = l64.max(-1, keepdims=True)
    log_softmax = l64 - (m + np.log(np.exp(l64 - m).sum(-1, keepdims=True)))
    want = -np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    got = ENGINE.token_nats(ENGINE.to_device(logits), targets)
    assert got.dtype == np.float64 and got.shape == (3, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    got_bf16 = ENGINE.token_nats(ENGINE.to_device(logits).astype(mx.bfloat16), targets)  # upcast before the math
    np.testing.assert_allclose(got_bf16, want, atol=0.2)


@pytest.mark.unit
def test_engine_on_this_machine() -> None:
    ok, why = ENGINE.available()
    assert ok, why
    hw = ENGINE.hardware()
    assert ENGINE.name == "mlx" and ENGINE.train_file == "train_mlx.py"
    assert hw.backend == "mlx" and hw.kind == "cpu" and hw.tag.startswith("mlx-cpu-") and hw.tag.endswith("gb")
    assert set(hw.versions) >= {"mlx", "python"} and hw.memory_gb > 0
    assert ENGINE.peak_flops() is None
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    d = ENGINE.to_device(a)
    assert d.dtype == mx.int32
    np.testing.assert_array_equal(ENGINE.to_numpy(d), a)
    ENGINE.sync()
    assert ENGINE.peak_memory_mb() > 0


@pytest.mark.unit
def test_apple_peak_flops_table() -> None:
    assert apple_chip("Apple M4 Max") == "M4 Max" and apple_chip("Apple M1") == "M1"
    assert apple_chip("Apple M2 Ultra") == "M2 Ultra" and apple_chip("AMD EPYC 7B13") is None
    assert apple_peak_flops("Apple M1 Max", 32) == pytest.approx(10.4e12)
    assert apple_peak_flops("Apple M1 Max", 24) == pytest.approx(7.8e12)     # binned: scaled by cores
    assert apple_peak_flops("Apple M4", None) == pytest.approx(4.3e12)
    assert apple_peak_flops("Intel Xeon", 8) is None
