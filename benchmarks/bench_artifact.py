"""
What scoring through an exported artifact costs, per engine, at the tests' tiny config
(depth 2, 64 dims, 64-token rows, vocab 512, pystdlib `tiny` val rows):

    export      export_forward: trace + write the .mlxfn / .pt2 (in the train process)
    scorer      `python -m engines.score` wall time, and its own load / probe / eval split
    probe/eval  the causality probe's extra cost (an altered forward per scored batch) over the scoring
    in-process  engines.evaluator.evaluate_bpb on the live model (today's path), for comparison

    python benchmarks/bench_artifact.py [--backend mlx cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_artifact import Built, in_process_bpb  # noqa: E402 - the tests' tiny GPT from the real train files


def tiny_data(cache: Path) -> Path:
    from arun_data import build
    os.environ["ARUN_CACHE"] = str(cache)
    return build.prepare("pystdlib", "tiny", log=lambda s: None)


def bench(backend: str, data_dir: Path, work: Path) -> dict:
    built = Built(backend)
    path = work / f"forward-{backend}{'.mlxfn' if backend == 'mlx' else '.pt2'}"
    meta = built.export(path)
    t0 = time.perf_counter()
    bpb = in_process_bpb(built, built.honest, data_dir)
    in_process = time.perf_counter() - t0
    out = work / f"verdict-{backend}.json"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engines.score", "--backend", backend, "--artifact", str(path),
                    "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu"], check=True,
                   capture_output=True, cwd=work)
    wall = time.perf_counter() - t0
    verdict = json.loads(out.read_text())
    return {"backend": backend, "export_s": meta["seconds"], "artifact_bytes": meta["bytes"], "scorer_wall_s": wall,
            **{f"scorer_{k}_s": v for k, v in verdict["seconds"].items()}, "batch": verdict["batch_size"],
            "probe/eval": verdict["seconds"]["probe"] / verdict["seconds"]["eval"],
            "in_process_eval_s": in_process, "val_bpb": verdict["val_bpb"], "in_process_val_bpb": bpb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", nargs="+", default=["mlx", "cuda"], choices=["mlx", "cuda"])
    args = ap.parse_args()
    os.environ["ARUN_DEVICE"] = "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-artifact-") as tmp:
        work = Path(tmp)
        data_dir = tiny_data(work / "cache")
        os.environ["ARUN_DATA_DIR"] = str(data_dir)
        rows = [bench(b, data_dir, work) for b in args.backend]
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys))


if __name__ == "__main__":
    main()
