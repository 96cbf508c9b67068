"""
Swarm throughput: experiments per hour with 1 and with 2 workers at a fixed tiny budget,
measured in one run, printed with the ratio.

    python benchmarks/bench_swarm.py                       # torch on CPU, tiny model, 2 s budget
    python benchmarks/bench_swarm.py --device cuda         # one GPU per worker (needs 2 GPUs)
    python benchmarks/bench_swarm.py --budget 5 --experiments 12

Each configuration gets a fresh copy of the project (tiny model), a fresh local Ray cluster
and runs its baseline first (not timed: the other workers wait for it); then the next
--experiments experiments are timed from dispatch to the last record. With a fixed
training budget, what a second worker buys is the overlap of everything else (start-up,
evaluation, git, the proposer); on a 2-core machine the two workers share the cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from helpers_repo import make_project  # noqa: E402 - the tests' tiny project (a copy with a tiny train file)


def measure(root: Path, n: int, args: argparse.Namespace) -> dict:
    from arun.swarm.driver import Swarm, SwarmOptions
    from engines import TRAIN_FILES

    repo = root / f"project-{n}"
    repo.mkdir()
    make_project(repo, TRAIN_FILES[args.backend])
    opts = SwarmOptions(repo_dir=repo, backend=args.backend, device=args.device, workers=n, run=f"bench{n}",
                        agent=args.agent, budget=args.budget, object_store_mb=80,
                        num_cpus=max(os.cpu_count() or 1, n))
    swarm = Swarm(opts, log=lambda line: None)
    load = os.getloadavg()[0]  # other work on the machine skews the figure: shown with it
    try:
        t = time.perf_counter()
        swarm.start()
        startup = time.perf_counter() - t
        swarm.run(iterations=n)  # the baseline (and the others' first experiment): not timed
        t0 = time.perf_counter()
        results = swarm.run(iterations=args.experiments)
        seconds = time.perf_counter() - t0
    finally:
        swarm.stop()
    statuses = [(r.get("record") or {}).get("status") or r["status"] for r in results]
    return {"workers": n, "experiments": len(results), "seconds": seconds, "startup": startup, "load": load,
            "per_hour": 3600 * len(results) / seconds, "statuses": statuses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda", choices=["cuda", "mlx"])
    ap.add_argument("--device", default="cpu", help="torch engine: cpu (default here) or cuda")
    ap.add_argument("--budget", type=float, default=2.0, help="training seconds per experiment")
    ap.add_argument("--experiments", type=int, default=8, help="timed experiments per configuration")
    ap.add_argument("--agent", default=None,
                    help="proposer (default: an agent that appends a comment, so every experiment trains the same "
                         "model and the figure is the swarm's own; pass sweep for the built-in sweep)")
    args = ap.parse_args()
    if args.backend == "mlx":
        args.device = None
    if args.agent is None:
        # A new, unscored train file each time at the same cost: one comment line more.
        code = ("import os, time; f = os.environ['ARUN_TRAIN_FILE']; "
                "open(f, 'a').write('# bench %d\\n' % time.time_ns()); print('bench: one comment line')")
        args.agent = f"{sys.executable} -c \"{code}\""

    from arun_data import build

    with tempfile.TemporaryDirectory(prefix="arun-bench-swarm-") as d:
        root = Path(d)
        os.environ["ARUN_CACHE"] = str(root / "cache")  # before ray.init: the workers inherit it
        os.environ["ARUN_DATA_DIR"] = str(build.prepare("pystdlib", "tiny", log=lambda s: None))
        if args.device:
            os.environ["ARUN_DEVICE"] = args.device
        rows = [measure(root, n, args) for n in (1, 2)]

    agent = "comment-only agent" if args.agent.startswith(sys.executable) else args.agent
    print(f"arun swarm throughput: backend {args.backend}, device {args.device or 'default'}, agent {agent}, "
          f"budget {args.budget:g} s, {args.experiments} timed experiments each, {os.cpu_count()} CPU cores")
    print(f"{'workers':>7} {'experiments':>11} {'seconds':>8} {'s/exp':>6} {'exp/hour':>9} {'startup s':>9} {'load':>5}  statuses")
    for r in rows:
        counts = {s: r["statuses"].count(s) for s in sorted(set(r["statuses"]), key=str)}
        print(f"{r['workers']:>7} {r['experiments']:>11} {r['seconds']:>8.1f} {r['seconds'] / r['experiments']:>6.1f} "
              f"{r['per_hour']:>9.0f} {r['startup']:>9.1f} {r['load']:>5.1f}  {counts}")
    print(f"ratio 2 workers / 1 worker: {rows[1]['per_hour'] / rows[0]['per_hour']:.2f}x")


if __name__ == "__main__":
    main()
