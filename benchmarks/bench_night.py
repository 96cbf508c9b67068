"""
A night you can measure: one seeded sequence of sweep proposals replayed under two keep policies,
side by side, on a throwaway copy of this project (tiny model, tiny data).

    plain   upstream's ratchet: every run to the end, kept when its val_bpb is below the best's
    night   arun loop's default: a run clearly behind the best mid-run is stopped (arun.core.early),
            a near win is re-run with fresh seeds before it is kept (arun.search.policy)

The proposals come from the built-in sweep (arun.search.sweep), drawn once from the baseline
train file with a fixed seed, so both policies see the same changes in the same order; each is
applied to that policy's current best. The experiments of the two policies alternate, so a
loaded machine slows both alike. Printed: experiments per hour, wall time, keeps, the final val
and held-out test gain over the baseline, the share of keeps whose test_bpb confirms their val
gain, and the Spearman rank correlation between the train loss at 30/50/70 % of the budget and
the final val_bpb (over every run that went to the end), overall and by kind of change.

    python benchmarks/bench_night.py --iterations 6 --budget 8          # tiny, a few minutes on a CPU
    python benchmarks/bench_night.py --backend mlx --iterations 40 --budget 30
    python benchmarks/bench_night.py --backend mlx --iterations 30 --budget 20 --set MATRIX_LR=0.01   # room to improve
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from helpers_repo import make_project  # noqa: E402 - the tests' throwaway copy of the project (tiny train file)

POINTS = {30: 5, 50: 9, 70: 13}   # progress % -> index in a loss trajectory (5 %, 10 %, ...)


def proposals(text: str, n: int, seed: int) -> list[tuple[dict, str]]:
    """n (changed constants, description) from the sweep, drawn from the baseline file alone (no
    results), so the sequence is the same whichever policy runs it."""
    from arun.core.trainfile import constants
    from arun.search.sweep import Sweep
    sweep, base, seen, out = Sweep(seed=seed), constants(text), [], []
    for _ in range(n):
        new, description = sweep.propose_text(text, seen)
        cfg = constants(new)
        out.append(({k: v for k, v in cfg.items() if base.get(k) != v}, description))
        seen.append({"train_sha256": hashlib.sha256(new.encode()).hexdigest(), "status": "discard", "config": cfg})
    return out


class Replay:
    """A proposer for arun.search.loop.iteration that applies the next change of the fixed sequence."""
    name = "sweep-replay"

    def __init__(self, changes: dict, description: str):
        self.changes, self.description = changes, description

    def propose(self, ctx):
        from arun.core.trainfile import rewrite_constants
        from arun.search.proposers import Proposal
        from engines.atomic import write_atomic
        path = Path(ctx.repo_dir) / ctx.train_file
        write_atomic(path, rewrite_constants(path.read_text(), self.changes).encode())
        return Proposal(description=self.description)


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2.0
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (ties averaged); None under 3 pairs or with no spread."""
    if len(xs) < 3:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else None


def outcome(records: list[dict], wall: float) -> dict:
    """One policy's figures from its records (the baseline first)."""
    base = records[0]
    best, keeps, confirmed = base, 0, 0
    for r in records[1:]:
        if r.get("status") == "keep":
            keeps += 1
            if isinstance(r.get("test_bpb"), (int, float)) and isinstance(best.get("test_bpb"), (int, float)):
                confirmed += r["test_bpb"] < best["test_bpb"]
            best = r
    ran = [r for r in records[1:] if r.get("status") in ("keep", "discard", "crash", "timeout")]
    test_gain = (base["test_bpb"] - best["test_bpb"]
                 if all(isinstance(x.get("test_bpb"), (int, float)) for x in (base, best)) else None)
    return {"experiments": len(ran), "wall": wall, "per_hour": 3600 * len(ran) / wall if wall else 0.0,
            "keeps": keeps, "val_gain": base["val_bpb"] - best["val_bpb"], "test_gain": test_gain,
            "confirmed_share": confirmed / keeps if keeps else None,
            "stopped": sum(1 for r in ran if r.get("stopped_at") is not None),
            "confirm_runs": sum(len(r.get("val_bpb_seeds") or []) - 1 for r in ran if r.get("confirmation"))}


def correlations(records: list[dict], kinds: dict[str, str]) -> dict[str, dict[int, tuple[float | None, int]]]:
    """Spearman(train loss at p %, val_bpb) over runs that went to the end, overall and by kind."""
    full = [r for r in records if isinstance(r.get("val_bpb"), (int, float)) and len(r.get("loss_trajectory") or []) == 20]
    groups = {"all": full}
    for r in full:
        groups.setdefault(kinds.get(r.get("description") or "", "baseline"), []).append(r)
    out = {}
    for name, rs in groups.items():
        row = {}
        for pct, i in POINTS.items():
            pairs = [(r["loss_trajectory"][i], r["val_bpb"]) for r in rs if isinstance(r["loss_trajectory"][i], (int, float))]
            row[pct] = (spearman([a for a, _ in pairs], [b for _, b in pairs]), len(pairs))
        out[name] = row
    return out


def rule_group(candidate: dict, best: dict) -> str:
    """Which side of the protection rule (arun.core.early.protected_changes) a change falls on."""
    from arun.core.early import kind_of, protected_changes
    names = protected_changes(candidate, best)
    if any(kind_of(n) in ("batch", "size") for n in names):
        return "protected: batch or size"
    return ("protected: a higher rate or weight decay, or a warm-up change" if names
            else "stoppable: a lower rate, or no rate change")


def counterfactual(records: list[dict], kinds: dict[str, str], std: list | None, z: float | None = None,
                   by_rule: bool = False) -> dict[str, dict]:
    """The early-stop rule (arun.core.early.behind), protection aside, replayed on the plain policy's runs
    that went to the end, against the best of their time: by kind of change (by_rule: by the side of the
    protection rule it falls on), how many it would have stopped, how many of those ended as keeps (a
    wrong stop), and the share of training it would have saved. What decides whether a kind may be
    stopped early. z: the rule's Z (standard deviations of a two-run difference) in place of
    arun.core.early.Z, to see what a looser or stricter rule would do."""
    from arun.core import early
    from arun.core.early import GRID, behind, margins
    out: dict[str, dict] = {}
    best = None
    for r in records:
        traj = r.get("loss_trajectory") or []
        if best is not None and isinstance(r.get("val_bpb"), (int, float)) and len(traj) == len(GRID):
            margin, _ = margins(best["loss_trajectory"], std)
            if z is not None and std is not None:
                margin = [m if m is None else max(m * z / early.Z, early.FLOOR_REL * abs(b))
                          for m, b in zip(margin, best["loss_trajectory"])]
            at = next((GRID[j - 1] for j in range(1, len(GRID) + 1)
                       if behind(traj[:j] + [None] * (len(GRID) - j), best["loss_trajectory"], margin)), None)
            group = (rule_group(r.get("config") or {}, best.get("config") or {}) if by_rule
                     else kinds.get(r.get("description") or "", "other"))
            row = out.setdefault(group, {"runs": 0, "stopped": 0, "wrong": 0, "saved": 0.0})
            row["runs"] += 1
            if at is not None:
                row["stopped"] += 1
                row["wrong"] += r.get("status") == "keep"
                row["saved"] += (100.0 - at) / 100.0
        if r.get("status") == "keep" and len(traj) == len(GRID):
            best = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--device", default="cpu", help="torch engine: cpu or cuda (ignored by mlx)")
    ap.add_argument("--iterations", type=int, default=12, help="proposals replayed under each policy")
    ap.add_argument("--budget", type=float, default=8.0, help="training seconds per run")
    ap.add_argument("--seed", type=int, default=0, help="the sweep's seed (the sequence of proposals)")
    ap.add_argument("--data", default=None, help="a prepared data folder (default: pystdlib/tiny in a tmp cache)")
    ap.add_argument("--noise-seeds", type=int, default=3,
                    help="`arun noise --seeds N` on the night policy's baseline first, as `arun loop` does: "
                         "the measured spread sets the early-stop margins and the confirmation's gate; its "
                         "wall time counts against the night policy (0: none: default margins, and near wins "
                         "kept by the plain rule)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a constant of the starting train file (repeatable), e.g. MATRIX_LR=0.01: a start with "
                         "room to improve, as a real night's baseline has (the tiny constants are tuned)")
    ap.add_argument("--keep", default=None, metavar="FILE", help="also write the records, walls and noise to FILE")
    ap.add_argument("--report", default=None, metavar="FILE", help="print the tables of a night --keep wrote; run nothing")
    args = ap.parse_args()
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    start = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            start[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            sys.exit(f"--set {item!r}: the value is not a Python literal; write e.g. --set MATRIX_LR=0.01")

    from arun.core.context import cached_context
    from arun.core.early import change_kinds, kind_of
    from arun.core.experiment import run_experiment
    from arun.core.ledger import read_records
    from arun.search.loop import iteration
    from arun.search.noise import load_noise, measure_noise
    from arun_data import build
    from engines import TRAIN_FILES

    device = args.device if args.backend != "mlx" else None
    with tempfile.TemporaryDirectory(prefix="arun-night-") as tmp:
        tmp = Path(tmp)
        if args.data:
            os.environ["ARUN_DATA_DIR"] = str(Path(args.data).expanduser())
        else:
            os.environ["ARUN_CACHE"] = str(tmp / "cache")
            os.environ["ARUN_DATA_DIR"] = str(build.prepare("pystdlib", "tiny", log=lambda s: None))
        train_file = TRAIN_FILES[args.backend]
        repos = {"plain": tmp / "plain", "night": tmp / "night"}
        make_project(repos["plain"], train_file, overrides=start)
        quiet = dict(budget=args.budget, device=device, show_progress=False, log=lambda s: None)
        t0 = time.perf_counter()
        base = run_experiment(repos["plain"], args.backend, "baseline", **quiet)
        base_wall = time.perf_counter() - t0
        if base.get("status") != "keep":
            sys.exit(f"the baseline did not finish: {base.get('status')}: {base.get('error')}")
        shutil.copytree(repos["plain"], repos["night"], symlinks=True)
        seq = proposals((repos["plain"] / train_file).read_text(), args.iterations, args.seed)
        base_cfg = base.get("config") or {}
        kinds = {d: "+".join(sorted(change_kinds({**base_cfg, **c}, base_cfg))) or "none" for c, d in seq}
        print(f"backend {args.backend}{f' ({device})' if device else ''}, tiny model"
              f"{''.join(f', {k}={v!r}' for k, v in start.items())}, budget {args.budget:g}s, "
              f"{len(seq)} sweep proposals (seed {args.seed}); baseline val_bpb {base['val_bpb']:.6f} "
              f"({base_wall:.0f}s)")
        walls = {"plain": 0.0, "night": 0.0}
        if args.noise_seeds >= 2:
            t = time.perf_counter()
            noise = measure_noise(repos["night"], args.backend, args.noise_seeds, budget=args.budget, device=device,
                                  show_progress=False, log=lambda s: None)
            walls["night"] += time.perf_counter() - t
            print(f"night: arun noise over {noise['n']} seeds: val_bpb std {noise['std']:.6f} "
                  f"({walls['night']:.0f}s, counted in the night's wall time)")
        for i, (changes, description) in enumerate(seq):
            for policy in ("plain", "night"):
                on = policy == "night"
                t = time.perf_counter()
                rec = iteration(repos[policy], args.backend, Replay(changes, description), early_stop=on, confirm=on,
                                number=i + 1, **quiet)
                walls[policy] += time.perf_counter() - t
                how = (f" stopped at {rec['stopped_at']:g}%" if rec.get("stopped_at") is not None else "") + \
                      (f" {rec['confirmation']['verdict']}" if rec.get("confirmation") else "")
                val = rec.get("val_bpb")
                print(f"  {i + 1:>2} {policy:5} {rec['status']:8} {f'{val:.6f}' if val is not None else '-':>9}"
                      f"{how}  [{kind_of(next(iter(changes), '')) if changes else '-'}] {description[:60]}", flush=True)
        ctx = cached_context(repos["plain"], args.backend, args.budget, device)
        data = {"args": {k: v for k, v in vars(args).items() if k not in ("keep", "report")}, "walls": walls,
                "kinds": kinds, "noise": load_noise(repos["night"], ctx.tag, ctx.key_id),
                "records": {p: [r for r in read_records(repos[p], ctx.tag) if r.get("key_id") == ctx.key_id]
                            for p in repos}}
    if args.keep:
        Path(args.keep).write_text(json.dumps(data, default=str))
        print(f"(records kept in {args.keep}: python benchmarks/bench_night.py --report {args.keep})")
    report(data)


def report(data: dict) -> None:
    """The tables, from what a night left (main's `data`, or a file --keep wrote)."""
    recs, walls, kinds, noise = data["records"], data["walls"], data["kinds"], data.get("noise")
    res = {p: outcome(recs[p], walls[p]) for p in recs}

    def fmt(v, spec="{:.4f}"):
        return "-" if v is None else spec.format(v)
    print()
    print("| policy | experiments | wall (s) | experiments/hour | keeps | stopped early | confirm runs "
          "| val gain | test gain | keeps confirmed by test |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, r in res.items():
        print(f"| {p} | {r['experiments']} | {r['wall']:.0f} | {r['per_hour']:.0f} | {r['keeps']} | {r['stopped']} "
              f"| {r['confirm_runs']} | {fmt(r['val_gain'], '{:.6f}')} | {fmt(r['test_gain'], '{:.6f}')} "
              f"| {fmt(r['confirmed_share'], '{:.0%}')} |")
    print()
    print("Spearman(train loss at p % of the budget, final val_bpb), runs that went to the end (plain policy):")
    print("| change kind | n | 30 % | 50 % | 70 % |")
    print("|---|---:|---:|---:|---:|")
    for name, row in correlations(recs["plain"], kinds).items():
        n = max(k for _, k in row.values())
        print(f"| {name} | {n} | " + " | ".join(fmt(row[p][0], '{:+.2f}') for p in POINTS) + " |")
    std = noise.get("loss_trajectory_std") if noise else None
    from arun.core.early import Z
    for z in ([Z, 2.0, 1.5] if std else [None]):
        print()
        print(f"The early-stop rule replayed on the plain policy's runs, protection aside "
              f"({f'measured spread, Z = {z:g}' if std else 'default margin'}):")
        for by_rule in (False, True):
            print(f"| {'side of the rule' if by_rule else 'change kind'} | runs | would stop | of them kept (wrong) "
                  f"| training saved |")
            print("|---|---:|---:|---:|---:|")
            for name, row in sorted(counterfactual(recs["plain"], kinds, std, z, by_rule).items()):
                print(f"| {name} | {row['runs']} | {row['stopped']} | {row['wrong']} | "
                      f"{row['saved'] / row['runs']:.0%} |")
            print()

if __name__ == "__main__":
    main()
