"""
Packed training tokens per second on one core: arun's best-fit packer against
an equivalent of upstream's (a pure-Python scan of a 1000-document buffer for
every placement), on the same documents, side by side, alternating rounds.

    python benchmarks/bench_dataloader.py                       # synthetic web-like lengths, upstream profile
    python benchmarks/bench_dataloader.py --data ~/.cache/arun/pystdlib-small
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prepare import PROFILES, BestFitPacker, PreparedData


def synthetic_docs(n: int, seed: int = 0) -> list[np.ndarray]:
    """Lengths log-normal around ~600 tokens with a long tail, like filtered web text."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(mean=6.3, sigma=1.0, size=n).astype(int), 8, 20000)
    return [np.concatenate([[0], rng.integers(1, 8192, size=L - 1)]).astype(np.uint16) for L in lens]


def real_docs(path: Path, n: int) -> list[np.ndarray]:
    tokens, offsets = PreparedData(path).train_shards()[0]
    idx = np.arange(min(n, len(offsets) - 1))
    return [np.asarray(tokens[offsets[i]:offsets[i + 1]]) for i in idx]


def ours(docs: list[np.ndarray], B: int, T: int, batches: int) -> int:
    packer = BestFitPacker(iter(docs), T + 1, buffer_size=1000)
    for _ in range(batches):
        rows = np.empty((B, T + 1), dtype=np.int32)
        for r in range(B):
            packer.fill(rows[r])
        _x, _y = np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])  # the copy a loader makes
    return batches * B * T


def upstream_equivalent(docs: list[list[int]], B: int, T: int, batches: int, buffer_size: int = 1000) -> int:
    """Upstream's algorithm: scan the whole buffer for the largest doc that fits, else crop the shortest."""
    row_capacity = T + 1
    source = iter(docs)
    buf: list[list[int]] = []
    for _ in range(batches):
        rows = np.empty((B, row_capacity), dtype=np.int32)
        for r in range(B):
            pos = 0
            while pos < row_capacity:
                while len(buf) < buffer_size:
                    buf.append(next(source))
                remaining = row_capacity - pos
                best_idx, best_len = -1, 0
                for i, doc in enumerate(buf):
                    n = len(doc)
                    if n <= remaining and n > best_len:
                        best_idx, best_len = i, n
                if best_idx >= 0:
                    doc = buf.pop(best_idx)
                    rows[r, pos:pos + len(doc)] = doc
                    pos += len(doc)
                else:
                    i = min(range(len(buf)), key=lambda k: len(buf[k]))
                    doc = buf.pop(i)
                    rows[r, pos:pos + remaining] = doc[:remaining]
                    pos += remaining
        _x, _y = np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])  # the copy a loader makes
    return batches * B * T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="a prepared folder to take real documents from")
    ap.add_argument("--seq-len", type=int, default=PROFILES["upstream"].max_seq_len)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=8, help="batches per round for ours (upstream gets fewer: it is slower)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as the target says

    docs = real_docs(args.data, 200_000) if args.data else synthetic_docs(200_000)
    need = args.batches * args.batch * (args.seq_len + 1) * 3 // max(1, int(np.mean([len(d) for d in docs[:1000]])))
    docs = (docs * (need // len(docs) + 2))[: max(need, 5000)]
    as_lists = [d.tolist() for d in docs]
    print(f"documents: {len(docs):,} ({'real: ' + str(args.data) if args.data else 'synthetic log-normal'}), "
          f"mean length {np.mean([len(d) for d in docs]):.0f} tokens; rows of {args.seq_len + 1}, batch {args.batch}, one core")
    a_rates, b_rates = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        n = ours(docs, args.batch, args.seq_len, args.batches)
        a_rates.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        n = upstream_equivalent(as_lists, args.batch, args.seq_len, max(1, args.batches // 8))
        b_rates.append(n / (time.perf_counter() - t0))
    ratios = [a / b for a, b in zip(a_rates, b_rates)]
    print(f"arun best-fit (sorted buffer): median {statistics.median(a_rates) / 1e6:8.2f} M tokens/s  (min {min(a_rates) / 1e6:.2f}, max {max(a_rates) / 1e6:.2f})")
    print(f"upstream-equivalent scan:      median {statistics.median(b_rates) / 1e6:8.2f} M tokens/s  (min {min(b_rates) / 1e6:.2f}, max {max(b_rates) / 1e6:.2f})")
    print(f"ratio arun/upstream per round: median {statistics.median(ratios):.1f}x  (min {min(ratios):.1f}, max {max(ratios):.1f})")


if __name__ == "__main__":
    main()
