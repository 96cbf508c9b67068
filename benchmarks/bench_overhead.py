"""
Where an experiment's wall time goes besides training: N experiments through the real
harness (arun.core.experiment.run_experiment) on a throwaway copy of this project, and the
overhead split of each, then the median.

    launch      process start -> train() begins (interpreter, imports: torch/mlx, prepare)
    setup       train() -> first training step (model build, optimizer, data loader)
    warm-up     the WARMUP_STEPS steps the budget does not count (compilation)
    export      the train process exporting its forward (engines.forward_file.export_forward)
    score       the evaluator process on val: start, load the forward, causality probe, val_bpb
    test        a keep only: scoring the held-out test rows (inside `score` when the evaluator did both
                in one process, which it does for a run below the best; else inside `harness`)
    harness     arun's other time outside the child (engine probe, git, ledger, commit/restore)
    other       the rest: result JSON, interpreter exit
    overhead    wall - training  (= the sum of the above)

    python benchmarks/bench_overhead.py                              # mlx, tiny model, tiny data, 5 x 2 s
    python benchmarks/bench_overhead.py --backend cuda --device cpu -n 3
    python benchmarks/bench_overhead.py --backend cuda --full --budget 300 -n 3 --data ~/.cache/arun/climbmix-upstream

--full runs the project's train file as it is (the real model; for GPUs); without it the
constants block is shrunk to a tiny model so the numbers are the harness's and the
engine's fixed costs rather than the model's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers_repo import make_project  # noqa: E402 - the tests' throwaway copy of the project (tiny train file)


def split(rec: dict) -> dict:
    def v(name: str) -> float:
        x = rec.get(name)
        return float(x) if isinstance(x, (int, float)) else 0.0
    launch, startup, warmup, export = v("launch_seconds"), v("startup_seconds"), v("warmup_seconds"), v("export_seconds")
    score, test, overhead = v("score_seconds"), v("test_seconds"), v("overhead_seconds")
    harness = v("bookkeeping_seconds")
    setup = max(0.0, startup - launch)
    other = overhead - launch - setup - warmup - export - score - harness
    return {"wall": v("wall_seconds"), "training": v("training_seconds"), "launch": launch, "setup": setup,
            "warm-up": warmup, "export": export, "score": score, "test": test, "harness": harness, "other": other,
            "overhead": overhead,
            "overhead %": 100 * overhead / v("wall_seconds") if v("wall_seconds") else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="mlx")
    ap.add_argument("--device", default=None, help="torch engine: cpu or cuda")
    ap.add_argument("-n", type=int, default=5, help="experiments")
    ap.add_argument("--budget", type=float, default=2.0, help="training seconds per experiment")
    ap.add_argument("--full", action="store_true", help="the train file as it is (no tiny constants block)")
    ap.add_argument("--data", default=None, help="a prepared data folder (default: pystdlib/tiny, prepared in a tmp cache)")
    args = ap.parse_args()

    from arun.core.experiment import run_experiment
    from arun_data import build
    from engines import TRAIN_FILES

    with tempfile.TemporaryDirectory(prefix="arun-bench-") as tmp:
        tmp = Path(tmp)
        if args.data:
            os.environ["ARUN_DATA_DIR"] = str(Path(args.data).expanduser())
        else:
            os.environ["ARUN_CACHE"] = str(tmp / "cache")
            os.environ["ARUN_DATA_DIR"] = str(build.prepare("pystdlib", "tiny", log=lambda s: None))
        train_file = TRAIN_FILES[args.backend]
        repo = tmp / "repo"
        make_project(repo, train_file, tiny=not args.full)
        cols = ["wall", "training", "launch", "setup", "warm-up", "export", "score", "test", "harness", "other",
                "overhead", "overhead %"]
        print(f"backend {args.backend}{' device ' + args.device if args.device else ''}, "
              f"{'full' if args.full else 'tiny'} model, budget {args.budget:g}s, {args.n} experiments (seconds)")
        print(f"{'#':>3} {'status':8} " + " ".join(f"{c:>10}" for c in cols))
        rows = []
        for i in range(args.n):
            t0 = time.perf_counter()
            rec = run_experiment(repo, args.backend, f"bench {i}", budget=args.budget, device=args.device,
                                 show_progress=False, log=lambda s: None)
            if rec["status"] not in ("keep", "discard"):
                print(f"{i + 1:>3} {rec['status']:8} {rec.get('error')}")
                continue
            row = split(rec)
            rows.append(row)
            print(f"{i + 1:>3} {rec['status']:8} " + " ".join(f"{row[c]:>10.2f}" for c in cols)
                  + f"   ({time.perf_counter() - t0:.1f}s)")
        if rows:
            med = {c: statistics.median(r[c] for r in rows) for c in cols}
            print(f"{'med':>3} {'':8} " + " ".join(f"{med[c]:>10.2f}" for c in cols))
            tested = [r["test"] for r in rows if r["test"] > 0]
            if tested:
                print(f"a keep's test-row scoring (median of {len(tested)}): {statistics.median(tested):.2f}s")


if __name__ == "__main__":
    main()
