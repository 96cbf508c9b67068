"""
Training-step throughput of a backend's train file at one config:
tokens/s, step time, MFU and peak memory.

    python benchmarks/bench_train.py --backend mlx --depth 4 --seq-len 512 --batch 4 --steps 10
    python benchmarks/bench_train.py --backend cuda --depth 8 --seq-len 2048 --batch 64 --steps 20

It imports the train file as a module (which runs no training), overrides its
hyperparameter constants with the flags, and drives that file's own model and
optimizer step on random tokens (throughput does not depend on the data), timing
each optimizer step between two engine syncs and reading the loss every step as
the real loop does. Only `runner_<backend>` is backend-specific.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Runner:
    engine: Any                       # the engines.<backend> adapter: sync(), peak_memory_mb(), peak_flops(), hardware()
    num_params: int
    flops_per_token: float
    tokens_per_step: int
    grad_accum_steps: int
    step: Callable[[int], Any]        # step(i) queues one optimizer step, returns the loss (device scalar)
    loss_value: Callable[[Any], float]
    config: dict                      # what was built: depth, seq_len, batch, model dims, dtype...


def load_train_module(path: Path, overrides: dict[str, Any]) -> ModuleType:
    """Imports a train file by path (importing runs no training) and sets its constants."""
    name = f"bench_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    for key, value in overrides.items():
        if value is not None:
            if not hasattr(mod, key):
                raise SystemExit(f"error: {path.name} has no constant {key}")
            setattr(mod, key, value)
    return mod


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        row = rng.integers(0, vocab, size=(batch, seq_len + 1), dtype=np.int32)
        out.append((np.ascontiguousarray(row[:, :-1]), np.ascontiguousarray(row[:, 1:])))
    return out


def runner_mlx(args: argparse.Namespace) -> Runner:
    import mlx.core as mx

    from engines.mlx import ENGINE
    tm = load_train_module(args.train_file or REPO / "train_mlx.py",
                           {"DEPTH": args.depth, "DEVICE_BATCH_SIZE": args.batch, "TOTAL_BATCH_SIZE": args.total_batch,
                            "COMPUTE_DTYPE": args.dtype})
    tokens_per_fwdbwd = tm.DEVICE_BATCH_SIZE * args.seq_len
    if tm.TOTAL_BATCH_SIZE % tokens_per_fwdbwd:
        raise SystemExit(f"error: total batch {tm.TOTAL_BATCH_SIZE} is not a multiple of batch x seq-len = {tokens_per_fwdbwd}")
    accum = tm.TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    mx.random.seed(0)
    model = tm.GPT(tm.build_config(args.vocab, args.seq_len))
    model.init_weights()
    mx.eval(model.parameters())
    opt = tm.build_optimizer(model)
    train_step = tm.make_train_step(model, opt, accum, compile=tm.COMPILE)
    batches = [(mx.array(x), mx.array(y)) for x, y in random_batches(accum, tm.DEVICE_BATCH_SIZE, args.seq_len, args.vocab)]
    config = {"depth": tm.DEPTH, "seq_len": args.seq_len, "batch": tm.DEVICE_BATCH_SIZE, "n_embd": model.config.n_embd,
              "vocab": args.vocab, "dtype": str(model.dtype), "compile": tm.COMPILE}
    return Runner(engine=ENGINE, num_params=model.num_scaling_params()["total"], flops_per_token=model.estimate_flops(),
                  tokens_per_step=tm.TOTAL_BATCH_SIZE, grad_accum_steps=accum,
                  step=lambda i: train_step(batches, 0.0, i), loss_value=lambda loss: loss.item(),
                  config=config)


def runner_cuda(args: argparse.Namespace) -> Runner:
    """train_cuda.py's own model, optimizer and make_train_step; ARUN_DEVICE=cpu for the explicit CPU device."""
    import torch

    from engines.cuda import ENGINE
    ok, why = ENGINE.available()
    if not ok:
        raise SystemExit(f"error: {why}")
    tc = load_train_module(args.train_file or REPO / "train_cuda.py",
                           {"DEPTH": args.depth, "DEVICE_BATCH_SIZE": args.batch, "TOTAL_BATCH_SIZE": args.total_batch})
    tokens_per_fwdbwd = tc.DEVICE_BATCH_SIZE * args.seq_len
    if tc.TOTAL_BATCH_SIZE % tokens_per_fwdbwd:
        raise SystemExit(f"error: total batch {tc.TOTAL_BATCH_SIZE} is not a multiple of batch x seq-len = {tokens_per_fwdbwd}")
    accum = tc.TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    device = ENGINE.device()
    compiled = device.type == "cuda" and tc.COMPILE
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as train_cuda.train() sets it
    with torch.device("meta"):
        model = tc.GPT(tc.build_config(args.vocab, args.seq_len))
    model.to_empty(device=device)
    model.init_weights()
    opt = tc.build_optimizer(model, compile_steps=compiled)
    train_step = tc.make_train_step(model, opt, accum, compile=compiled)
    batches = [(ENGINE.to_device(x), ENGINE.to_device(y))
               for x, y in random_batches(accum, tc.DEVICE_BATCH_SIZE, args.seq_len, args.vocab)]
    config = {"depth": tc.DEPTH, "seq_len": args.seq_len, "batch": tc.DEVICE_BATCH_SIZE, "n_embd": model.config.n_embd,
              "vocab": args.vocab, "device": str(device), "attention": model.attention, "compile": compiled}
    return Runner(engine=ENGINE, num_params=model.num_scaling_params()["total"], flops_per_token=model.estimate_flops(),
                  tokens_per_step=tc.TOTAL_BATCH_SIZE, grad_accum_steps=accum,
                  step=lambda i: train_step(batches, 0.0, i), loss_value=lambda loss: loss.item(), config=config)


RUNNERS: dict[str, Callable[[argparse.Namespace], Runner]] = {"mlx": runner_mlx, "cuda": runner_cuda}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=sorted(RUNNERS), required=True)
    ap.add_argument("--depth", type=int, default=None, help="default: the train file's DEPTH")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="rows per micro-step; default: the train file's DEVICE_BATCH_SIZE")
    ap.add_argument("--total-batch", type=int, default=None,
                    help="tokens per optimizer step; default batch x seq-len (no accumulation)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--dtype", default=None, help="the train file's COMPUTE_DTYPE (mlx: float32, bfloat16)")
    ap.add_argument("--train-file", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = ap.parse_args()
    if args.total_batch is None and args.batch is not None:
        args.total_batch = args.batch * args.seq_len

    r = RUNNERS[args.backend](args)
    ok, why = r.engine.available()
    if not ok:
        raise SystemExit(f"error: {why}")
    hw = r.engine.hardware()
    print(f"{args.backend} on {hw.device} ({hw.tag}); {r.config}")
    print(f"params {r.num_params / 1e6:.2f}M, "
          f"{r.flops_per_token:.3e} FLOPs/token, {r.tokens_per_step:,} tokens/step ({r.grad_accum_steps} micro-steps)",
          flush=True)

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        r.engine.sync()
        t0 = time.perf_counter()
        loss = r.step(i)
        r.engine.sync()
        dt = time.perf_counter() - t0
        losses.append(r.loss_value(loss))
        if i >= args.warmup:
            times.append(dt)
        print(f"  step {i:3d} {'(warm-up) ' if i < args.warmup else ''}{dt * 1000:9.1f} ms  loss {losses[-1]:.4f}", flush=True)

    total = sum(times)
    tok_s = r.tokens_per_step * len(times) / total
    peak = r.engine.peak_flops()
    mfu = 100 * r.flops_per_token * tok_s / peak if peak else None
    out = {
        "backend": args.backend, "hardware": hw.tag, **r.config,
        "tokens_per_step": r.tokens_per_step, "steps": len(times),
        "tokens_per_second": tok_s, "step_ms_median": 1000 * statistics.median(times), "step_ms_min": 1000 * min(times),
        "mfu_percent": mfu, "peak_memory_mb": r.engine.peak_memory_mb(), "final_loss": losses[-1],
    }
    print("---")
    print(f"tokens_per_second: {tok_s:,.0f}")
    print(f"step_ms:           {out['step_ms_median']:.1f} median, {out['step_ms_min']:.1f} min")
    print(f"mfu_percent:       {'n/a (unknown peak FLOP/s)' if mfu is None else f'{mfu:.2f}'}")
    print(f"peak_memory_mb:    {out['peak_memory_mb']:.1f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
