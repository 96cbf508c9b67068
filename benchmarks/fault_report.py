"""
Fault-injection report: runs the fault and integrity suites (tests/test_faults.py,
tests/test_integrity.py) with larger kill counts and prints one row per fault kind:
how many faults were injected and how many completed records were lost.

    python benchmarks/fault_report.py                       # 1000 ledger kills, 20 arun kills
    python benchmarks/fault_report.py --ledger-kills 5000 --arun-kills 50 --seed 7
    python benchmarks/fault_report.py --only ledger         # just the ledger stress (seconds)

Each test adds its row through tests/helpers_repo.report_faults when $ARUN_FAULT_REPORT is set.
A test that fails still reports what it saw; the table says which tests failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ledger-kills", type=int, default=1000, help="SIGKILLs of ledger appenders")
    ap.add_argument("--arun-kills", type=int, default=20, help="SIGKILLs of arun mid-experiment")
    ap.add_argument("--seed", type=int, default=None, help="random seed for the kill moments (default: random)")
    ap.add_argument("--only", choices=["ledger", "faults", "all"], default="all",
                    help="ledger: the ledger stress only; faults: tests/test_faults.py; all: both suites")
    args = ap.parse_args()

    tests = {"ledger": ["tests/test_faults.py::test_sigkilled_appenders_lose_no_completed_record"],
             "faults": ["tests/test_faults.py"],
             "all": ["tests/test_faults.py", "tests/test_integrity.py"]}[args.only]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = dict(os.environ, ARUN_FAULT_REPORT=str(report), ARUN_LEDGER_KILLS=str(args.ledger_kills),
                   ARUN_FAULT_KILLS=str(args.arun_kills))
        if args.seed is not None:
            env["ARUN_FAULT_SEED"] = str(args.seed)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfxX", "-p", "no:cacheprovider", *tests],
                              cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []

    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        totals[row["kind"]][0] += row["injections"]
        totals[row["kind"]][1] += row["lost"]
    width = max([len(k) for k in totals] + [10])
    print(f"{'fault kind':<{width}}  {'injections':>10}  {'records lost':>12}")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 12}")
    for kind, (n, lost) in totals.items():
        print(f"{kind:<{width}}  {n:>10}  {lost:>12}")
    print(f"{'-' * width}  {'-' * 10}  {'-' * 12}")
    print(f"{'total':<{width}}  {sum(v[0] for v in totals.values()):>10}  {sum(v[1] for v in totals.values()):>12}")
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "XFAIL", "XPASS", "ERROR"))]
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    print(f"\npytest ({seconds:.0f}s): {tail}")
    for line in summary:
        print("  " + line[:200])
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
