"""
Training speed confined vs not: the same tiny next-token model (embedding, MLP, tied
head) trained for a few seconds in a fresh process, once plain and once under
engines.sandbox (Landlock on Linux, Seatbelt on macOS), alternating rounds, for torch
on CPU and MLX. Prints tokens per wall second and per CPU second for each, and the
median of the confined/plain ratios of each round (CPU seconds are less disturbed by
other processes on a shared machine).

    python benchmarks/bench_sandbox.py                     # both engines, 5 rounds of 5 s
    python benchmarks/bench_sandbox.py --engines torch --rounds 5 --seconds 10
    python benchmarks/bench_sandbox.py --real              # the real train files, through the harness

--real runs the project's own train_cuda.py (torch on the CPU) and train_mlx.py at a tiny config
(depth 1, 64-token rows of the pystdlib `tiny` data, built in a scratch cache unless ARUN_DATA_DIR
is set) through arun.core.process.run_train_file, confined and plain, and compares the
tokens_per_second each run reports (training steps only: start-up and evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, T, VOCAB, DIM = 8, 64, 512, 128


def train_torch(seconds: float, warmup: int) -> dict:
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the same for both sides; several threads on a shared CPU only add noise
    emb, mlp = torch.nn.Embedding(VOCAB, DIM), torch.nn.Sequential(torch.nn.Linear(DIM, 4 * DIM), torch.nn.GELU(),
                                                                     torch.nn.Linear(4 * DIM, DIM))
    params = list(emb.parameters()) + list(mlp.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    tokens = torch.randint(0, VOCAB, (1024, T + 1))

    def step(i: int) -> None:
        rows = tokens[(i * B) % 1024:(i * B) % 1024 + B]
        h = mlp(emb(rows[:, :-1]))
        loss = torch.nn.functional.cross_entropy((h @ emb.weight.T).flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed(step, seconds, warmup)


def train_mlx(seconds: float, warmup: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, DIM)
            self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

        def __call__(self, x):
            return self.emb.as_linear(self.mlp(self.emb(x)))

    mx.random.seed(0)
    model, opt = Model(), optim.AdamW(learning_rate=1e-3)
    tokens = mx.random.randint(0, VOCAB, (1024, T + 1))
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())

    def step(i: int) -> None:
        rows = tokens[(i * B) % 1024:(i * B) % 1024 + B]
        loss, grads = loss_and_grad(model, rows[:, :-1], rows[:, 1:])
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)

    return _timed(step, seconds, warmup)


def _timed(step, seconds: float, warmup: int) -> dict:
    """Steps per second after warmup; both engines finish each step synchronously (CPU torch, mx.eval)."""
    for i in range(warmup):
        step(i)
    steps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        step(warmup + steps)
        steps += 1
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens_per_s": steps * B * T / dt, "tokens_per_cpu_s": steps * B * T / cpu}


def run_worker(engine: str, seconds: float, confined: bool, scratch: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--seconds", str(seconds)]
    if confined:
        from engines.sandbox import Policy, confined_command
        run, temp = Path(tempfile.mkdtemp(dir=scratch)), Path(tempfile.mkdtemp(dir=scratch))
        cmd = confined_command(Policy(read=[Path(__file__).resolve()], write=[run], temp=temp), cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} worker failed ({'confined' if confined else 'plain'}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


REPO = Path(__file__).resolve().parents[1]
TINY = {"DEPTH": 1, "ASPECT_RATIO": 64, "HEAD_DIM": 32, "WINDOW_PATTERN": "L", "TOTAL_BATCH_SIZE": 512,
        "DEVICE_BATCH_SIZE": 8, "WARMUP_STEPS": 1}
TRAIN_FILES = {"torch": ("train_cuda.py", "cpu"), "mlx": ("train_mlx.py", None)}


def real_project(scratch: Path) -> Path:
    """The fixed files and both train files at the tiny config, as a user's clone holds them."""
    import shutil

    from arun.core.trainfile import rewrite_constants
    repo = scratch / "project"
    repo.mkdir()
    shutil.copy2(REPO / "prepare.py", repo / "prepare.py")
    for pkg in ("engines", "arun_data"):
        shutil.copytree(REPO / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, _ in TRAIN_FILES.values():
        (repo / name).write_text(rewrite_constants((REPO / name).read_text(), TINY))
    return repo


def real_round(engine: str, repo: Path, data_dir: Path, seconds: float, confined: bool, n: int) -> dict:
    from arun.core.process import child_env, run_train_file
    from engines.forward_file import SUFFIX
    train_file, device = TRAIN_FILES[engine]
    engine_name = "mlx" if engine == "mlx" else "cuda"  # (the harness exports, the evaluator is not run here)
    run_dir = repo / ".arun" / "runs" / f"{engine}-{n}-{'confined' if confined else 'plain'}"
    run_dir.mkdir(parents=True)
    env = child_env(data_dir, device, ARUN_TIME_BUDGET=repr(seconds), ARUN_RESULT_JSON=str(run_dir / "result.json"),
                    ARUN_ARTIFACT=str(run_dir / f"forward{SUFFIX[engine_name]}"), OMP_NUM_THREADS="1")
    out = run_train_file(repo, train_file, env, run_dir / "run.log", seconds + 300, confine=confined)
    if out.status != "ok" or out.confined != confined:
        raise SystemExit(f"{engine} {'confined' if confined else 'plain'} run failed: {out.status}: {out.error}")
    return {"tokens_per_s": float(out.result["tokens_per_second"]), "wall_s": out.wall_seconds}


def main_real(engines: list[str], rounds: int, seconds: float) -> None:
    import os
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = os.environ.get("ARUN_DATA_DIR")
        if not data_dir:
            os.environ["ARUN_CACHE"] = str(Path(scratch) / "cache")
            from arun_data import build
            data_dir = str(build.prepare("pystdlib", "tiny", log=lambda s: None))
        repo = real_project(Path(scratch))
        for engine in engines:
            pairs = []
            for r in range(rounds):
                pair = {c: real_round(engine, repo, Path(data_dir), seconds, c, r)
                        for c in ((False, True) if r % 2 == 0 else (True, False))}
                print(f"  {engine:5s} round {r + 1}: plain {pair[False]['tokens_per_s']:10,.0f} tok/s   "
                      f"confined {pair[True]['tokens_per_s']:10,.0f} tok/s")
                pairs.append(pair)
            ratio = statistics.median(p[True]["tokens_per_s"] / p[False]["tokens_per_s"] for p in pairs)
            plain = statistics.median(p[False]["tokens_per_s"] for p in pairs)
            conf = statistics.median(p[True]["tokens_per_s"] for p in pairs)
            print(f"{engine:5s} {TRAIN_FILES[engine][0]}: plain {plain:,.0f} tok/s, confined {conf:,.0f} tok/s, "
                  f"median paired ratio {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default="torch,mlx")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--real", action="store_true", help="the real train files through the harness (tiny config)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        fn = {"torch": train_torch, "mlx": train_mlx}[args.worker]
        print(json.dumps(fn(args.seconds, warmup=5)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engines.sandbox import available
    ok, why = available()
    if not ok:
        raise SystemExit(f"cannot compare: {why}")
    print(f"confinement: {why}; {args.rounds} alternating rounds of {args.seconds:g} s per engine")
    if args.real:
        main_real(args.engines.split(","), args.rounds, args.seconds)
        return
    with tempfile.TemporaryDirectory() as scratch:
        for engine in args.engines.split(","):
            rounds = []
            for r in range(args.rounds):
                pair = {}
                for confined in ((False, True) if r % 2 == 0 else (True, False)):
                    pair[confined] = fig = run_worker(engine, args.seconds, confined, Path(scratch))
                    print(f"  {engine:5s} round {r + 1} {'confined' if confined else 'plain   '} "
                          f"{fig['tokens_per_s']:10,.0f} tok/s {fig['tokens_per_cpu_s']:10,.0f} tok/cpu-s")
                rounds.append(pair)
            # Paired ratios (the two runs of a round are back to back) cancel most of a shared machine's drift.
            summary = [f"{engine:5s}"]
            for k in ("tokens_per_s", "tokens_per_cpu_s"):
                plain = statistics.median(p[False][k] for p in rounds)
                conf = statistics.median(p[True][k] for p in rounds)
                ratio = statistics.median(p[True][k] / p[False][k] for p in rounds)
                summary.append(f"{k}: plain {plain:,.0f} confined {conf:,.0f} ratio {ratio:.3f}")
            print(" | ".join(summary))


if __name__ == "__main__":
    main()
