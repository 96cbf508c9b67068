"""
Side-by-side training throughput: our train_mlx.py against the public MLX port
(trevin-creator/autoresearch-mlx, its train.py) at one config, on the same tokens.

    python benchmarks/compare_mlx_port.py ~/src/autoresearch-mlx \
        --depth 4 --seq-len 512 --batch 4 --seconds 60 --rounds 2

Nothing of the port enters this repository: its train.py is read from the given
checkout (a git repository, bare or not, or a plain folder) into a temporary folder,
its constants are set to the config, and a stand-in `prepare.py` written there feeds
it batches from arun's dataloader (same prepared data, same seed, so the same tokens)
and skips its evaluation. Both scripts run as real subprocesses for the same time
budget, alternately (A B A B ...); each side's tokens/s counts only steady-state steps
(the first `--skip` steps, compilation included, are excluded on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PORT_PREPARE = '''
"""Stand-in for the port's prepare.py, written by arun's benchmarks/compare_mlx_port.py:
batches come from arun's dataloader over an arun-prepared folder; evaluation is skipped."""
import importlib.util, os, sys
import mlx.core as mx

_spec = importlib.util.spec_from_file_location("arun_prepare", {prepare_path!r})
_arun = importlib.util.module_from_spec(_spec)
sys.modules["arun_prepare"] = _arun
_spec.loader.exec_module(_arun)
_data = _arun.PreparedData.open({data_dir!r})

MAX_SEQ_LEN = _data.profile.max_seq_len
TIME_BUDGET = {seconds!r}
EVAL_TOKENS = 0


class Tokenizer:
    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def from_directory(cls, *args, **kwargs):
        return cls(_arun.Tokenizer.from_directory(_data.dir))

    def get_vocab_size(self):
        return self.tok.get_vocab_size()

    def get_bos_token_id(self):
        return self.tok.get_bos_token_id()


def make_dataloader(tokenizer, batch_size, seq_len, split, **kwargs):
    for x, y, epoch in _arun.make_dataloader(batch_size, seq_len, "train", seed={seed!r}, data_dir=_data.dir):
        yield mx.array(x), mx.array(y), epoch


def evaluate_bpb(model, tokenizer, batch_size):
    return float("nan")  # throughput comparison only
'''

# The port prints "\\rstep 00012 (4.1%) | loss: 3.2 | lrm: 1.00 | dt: 123ms | tok/sec: ..."
PORT_STEP = re.compile(r"step (\d+) \([\d.]+%\) \| loss: ([-\d.naif]+) \| lrm: [\d.]+ \| dt: (\d+)ms")


def port_source(checkout: Path) -> str:
    """The port's train.py text, from a git checkout (bare or not) or a plain folder."""
    if (checkout / "train.py").is_file():
        return (checkout / "train.py").read_text()
    out = subprocess.run(["git", "-C", str(checkout), "show", "HEAD:train.py"], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"error: no train.py in {checkout} (not a folder with train.py nor a git repository "
                         f"with one at HEAD): {out.stderr.strip()}")
    return out.stdout


def set_constants(text: str, values: dict[str, object]) -> str:
    """Rewrites `NAME = ...` module-level assignments; every name must exist."""
    for name, value in values.items():
        text, n = re.subn(rf"^{name}\s*=.*$", f"{name} = {value!r}", text, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"error: constant {name} not found in the port's train.py; has the port changed?")
    return text


def ensure_data(seq_len: int, cache: Path) -> Path:
    """pystdlib prepared at seq_len with a 4-row eval (our run's final eval stays short), in its own cache."""
    import prepare
    from arun_data import build
    name = f"bench{seq_len}"
    prepare.PROFILES.setdefault(name, prepare.Profile(max_seq_len=seq_len, eval_tokens=4 * seq_len,
                                                       vocab_size=4096, tokenizer_chars=5_000_000))
    old = os.environ.get("ARUN_CACHE")
    os.environ["ARUN_CACHE"] = str(cache)
    try:
        return build.prepare("pystdlib", name, log=lambda s: None)
    finally:
        if old is None:
            os.environ.pop("ARUN_CACHE", None)
        else:
            os.environ["ARUN_CACHE"] = old


def run_ours(work: Path, data_dir: Path, args: argparse.Namespace, train_file: Path) -> dict:
    text = train_file.read_text()
    text = set_constants(text, {"DEPTH": args.depth, "DEVICE_BATCH_SIZE": args.batch,
                                "TOTAL_BATCH_SIZE": args.total_batch,
                                "WARMUP_STEPS": args.skip, "COMPUTE_DTYPE": args.ours_dtype})
    script = work / "ours" / "train_mlx.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    result = work / "ours" / "result.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, ARUN_DATA_DIR=str(data_dir), ARUN_TIME_BUDGET=str(args.seconds),
               ARUN_RESULT_JSON=str(result), PYTHONPATH=str(REPO))
    env.pop("ARUN_CHECKPOINT", None)
    p = subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env, capture_output=True, text=True)
    if p.returncode != 0 or not result.exists():
        raise SystemExit(f"error: our train_mlx.py failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    r = json.loads(result.read_text())
    return {"tok_s": r["tokens_per_second"], "steps": r["num_steps"] - args.skip,
            "seconds": r["training_seconds"], "loss": _last_loss(p.stdout, r"loss ([-\d.naif]+)")}


def run_port(work: Path, data_dir: Path, args: argparse.Namespace, source: str) -> dict:
    d = work / "port"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.py").write_text(set_constants(source, {"DEPTH": args.depth, "DEVICE_BATCH_SIZE": args.batch,
                                                       "TOTAL_BATCH_SIZE": args.total_batch}))
    (d / "prepare.py").write_text(PORT_PREPARE.format(prepare_path=str(REPO / "prepare.py"), data_dir=str(data_dir),
                                                      seconds=float(args.seconds), seed=args.seed))
    p = subprocess.run([sys.executable, "train.py"], cwd=d, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=""))
    if p.returncode != 0:
        raise SystemExit(f"error: the port's train.py failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    steps = [(int(s), float(loss), int(ms)) for s, loss, ms in PORT_STEP.findall(p.stdout)]
    counted = [ms for s, _, ms in steps if s >= args.skip]
    if not counted:
        raise SystemExit(f"error: the port made no steady-state steps in {args.seconds}s; raise --seconds")
    seconds = sum(counted) / 1000
    return {"tok_s": len(counted) * args.total_batch / seconds, "steps": len(counted), "seconds": seconds,
            "loss": steps[-1][1]}


def _last_loss(text: str, pattern: str) -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("port", type=Path, help="checkout of trevin-creator/autoresearch-mlx (git repo or folder with train.py)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="rows per micro-step (DEVICE_BATCH_SIZE)")
    ap.add_argument("--total-batch", type=int, default=None, help="tokens per optimizer step (default batch x seq-len)")
    ap.add_argument("--seconds", type=float, default=60.0, help="training time budget of each run")
    ap.add_argument("--rounds", type=int, default=2, help="A B pairs")
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps excluded on both sides")
    ap.add_argument("--ours-dtype", default="bfloat16",
                    help="our COMPUTE_DTYPE; the port computes in bfloat16 everywhere, so bfloat16 is the same config")
    ap.add_argument("--seed", type=int, default=42, help="dataloader seed (our train file's SEED)")
    ap.add_argument("--data-dir", type=Path, default=None, help="an arun-prepared folder (default: pystdlib at --seq-len)")
    ap.add_argument("--train-file", type=Path, default=REPO / "train_mlx.py")
    args = ap.parse_args()
    args.total_batch = args.total_batch or args.batch * args.seq_len

    source = port_source(args.port.expanduser())
    cache = Path(os.environ.get("ARUN_CACHE", Path.home() / ".cache" / "arun")).expanduser() / "benchmarks"
    data_dir = args.data_dir or ensure_data(args.seq_len, cache)
    import prepare
    seq = prepare.PreparedData.open(data_dir).profile.max_seq_len
    print(f"config: depth {args.depth}, seq_len {seq}, device batch {args.batch}, total batch {args.total_batch} tokens, "
          f"{args.seconds:g}s per run, {args.rounds} rounds, first {args.skip} steps excluded; our COMPUTE_DTYPE "
          f"{args.ours_dtype}; data {data_dir}")

    ours, port = [], []
    with tempfile.TemporaryDirectory(prefix="arun-vs-port-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            a = run_ours(work, data_dir, args, args.train_file)
            ours.append(a)
            print(f"round {r + 1}  ours: {a['tok_s']:10,.0f} tok/s  ({a['steps']} steps in {a['seconds']:.1f}s, loss {a['loss']})",
                  flush=True)
            b = run_port(work, data_dir, args, source)
            port.append(b)
            print(f"round {r + 1}  port: {b['tok_s']:10,.0f} tok/s  ({b['steps']} steps in {b['seconds']:.1f}s, loss {b['loss']})",
                  flush=True)
    mo = statistics.median(x["tok_s"] for x in ours)
    mp = statistics.median(x["tok_s"] for x in port)
    print(textwrap.dedent(f"""\
        ---
        ours_tok_s:  {mo:,.0f}
        port_tok_s:  {mp:,.0f}
        ratio:       {mo / mp:.3f}   (ours / port, medians; > 1 means ours is faster)"""))


if __name__ == "__main__":
    main()
