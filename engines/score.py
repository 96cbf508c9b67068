"""
The evaluator process: the score of record, from an exported forward, in a process
that runs fixed code only (prepare.py, engines/, numpy and the framework; never a
train file).

    python -m engines.score --backend mlx|cuda --artifact PATH --data-dir DIR [--out verdict.json]
                            [--device cpu|cuda] [--split val|test] [--expect-fixed-sha SHA]

It verifies the prepared data against its manifest, reads the rows and the artifact's
bytes (a regular file, never through a symlink), then seals itself (engines.sandbox.
seal_self: no path but Python's own installation and a private temp folder, no TCP) and
only then deserializes the artifact. It scores the fixed rows of the split (val: what the
ratchet reads; test: the held-out rows that only confirm or refute a gain) with
engines.evaluator's arithmetic at a batch size it chooses, probing every batch it scores
(engines.causality), and prints the verdict as one stdout line `ARUN-VERDICT <nonce> <json>`
(the nonce is what the harness sent on stdin with --nonce-stdin; `-` without), whose score
is `<split>_bpb`; --out also writes it to a file (opened before the seal).
Exit 0: scored. Exit 1: the verdict has an `error` (a causality failure, a broken
artifact, bad data) and no score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("val", "test")
VERDICT_MARKER = "ARUN-VERDICT"
# Bytes of fp32 logits one batch may take. The probe holds up to five batches of them at once
# (reference, the two log-softmaxes, their difference and its magnitude), so a CUDA budget is a
# sixth of the free memory.
LOGITS_BUDGET_CPU = 2**28
LOGITS_BUDGET_GPU = 2**31


class ScoreError(Exception):
    """A one-line reason the artifact was not scored."""


def logits_budget(backend: str, device: str) -> int:
    if device == "cpu":
        return LOGITS_BUDGET_CPU
    if backend == "cuda":
        import torch
        free, _ = torch.cuda.mem_get_info()
        return min(2**32, free // 6)
    return LOGITS_BUDGET_GPU


def choose_batch_size(accepted: tuple[int, ...], n_rows: int, seq_len: int, vocab_size: int, budget: int) -> int:
    """The largest ladder size the artifact accepts whose logits fit the budget (and no more than the rows)."""
    from engines.forward_file import BATCH_LADDER
    cap = min(n_rows, max(1, budget // (seq_len * vocab_size * 4)))
    fits = [b for b in BATCH_LADDER if b in accepted and b <= cap]
    if not fits:
        raise ScoreError(f"the artifact accepts batch sizes {list(accepted)}, the evaluator needs one of "
                         f"{[b for b in BATCH_LADDER if b <= cap]}; re-export with engines.forward_file.export_forward")
    return max(fits)


def failed_to_run(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"the artifact failed to run ({type(e).__name__}: {first[:160]})"


def _select_device(backend: str, device: str | None) -> str:
    """Points the engine adapter at the device; returns its kind ('cpu', 'cuda' or 'gpu'). The torch
    adapter reads $ARUN_DEVICE: the caller of score() restores it (an in-process score, e.g. by a
    train file run by hand, must not change its process's device)."""
    if backend == "cuda":
        device = device or os.environ.get("ARUN_DEVICE") or "cuda"
        os.environ["ARUN_DEVICE"] = device
        return device
    import mlx.core as mx
    if device == "cpu":
        mx.set_default_device(mx.cpu)
    return "cpu" if mx.default_device().type == mx.cpu else "gpu"


def score(backend: str, artifact: Path, data_dir: Path, device: str | None = None, split: str = "val",
          expect_fixed_sha: str | None = None, test_below: float | None = None, seal: bool = False) -> dict:
    """The verdict of one artifact; raises ScoreError with the partial verdict in its args[1].
    test_below: on the val split, also score the test rows when val_bpb comes out below this (the
    harness passes the key's best, so a run that may be kept is test-scored in the same process).
    seal: once the rows and the artifact's bytes are read, drop every file-system and network right
    for the rest of this process's life (the evaluator process does; a train file run by hand that
    scores itself in-process does not)."""
    before = os.environ.get("ARUN_DEVICE")
    try:
        return _score(backend, artifact, data_dir, device, split, expect_fixed_sha, test_below, seal)
    finally:
        if before is None:
            os.environ.pop("ARUN_DEVICE", None)
        else:
            os.environ["ARUN_DEVICE"] = before


def seal(backend: str, kind: str, secret: tuple[Path, ...] = ()) -> tuple[bool, str]:
    """Confines this process to computing: it may read Python's own installation (public code, for the
    frameworks' lazy imports) and write a fresh private temp folder (MLX's CPU backend compiles kernels
    into TMPDIR), nothing else: no data folder, no repo, no home, no TCP. Everything the loader needs
    is imported first. secret: folders (the data) that must stay out even if an installation folder
    held them. (True, how) or (False, why not) where the OS cannot."""
    import atexit
    import shutil
    import tempfile

    # What deserializing and running the graph would import lazily (and could not, sealed, from the
    # fixed code folder, which the seal does not list).
    import engines.causality
    import engines.evaluator
    import engines.forward_file
    import engines.opsets
    import engines.pt2check
    from engines import sandbox
    if backend == "cuda":
        import torch
        import torch._export.serde.serialize
        import torch.export
        import torch.export.passes
        if kind == "cuda":
            torch.cuda.init()
    else:
        import mlx.core  # noqa: F401

        import engines.mlxcheck  # noqa: F401  (the loader checks the imported graph's primitives)
    ok, why = sandbox.available()
    if not ok or sandbox.landlock_abi() <= 0:
        return False, why if not ok else "no Landlock on this OS"
    private = tempfile.mkdtemp(prefix="arun-sealed-")
    atexit.register(shutil.rmtree, private, True)   # (the seal leaves this process its own folder to remove)
    for name in ("TMPDIR", "TMP", "TEMP"):
        os.environ[name] = private
    tempfile.tempdir = private
    try:
        readable = [p for p in sandbox.python_paths()
                    if not any(Path(s).resolve().is_relative_to(p.resolve()) for s in secret)]
        abi = sandbox.seal_self(readable, [Path(private)], devices=kind != "cpu")
    except OSError as e:
        return False, str(e)
    return True, f"landlock ABI {abi}: computes only (reads Python's installation, writes {private})"


def _score(backend: str, artifact: Path, data_dir: Path, device: str | None, split: str,
           expect_fixed_sha: str | None, test_below: float | None, sealed: bool) -> dict:
    from engines import get_engine
    from engines.causality import Probe, ProbeFailure
    from engines.evaluator import evaluate_bpb
    from engines.fingerprint import fixed_code_sha256
    from engines.forward_file import ArtifactError, load_forward, read_artifact
    from prepare import PreparedData, PrepareError

    verdict: dict = {"backend": backend, "split": split, "artifact": str(artifact)}

    def fail(message: str) -> ScoreError:
        return ScoreError(message.splitlines()[0] if message else "failed", verdict)

    if split not in SPLITS:
        raise fail(f"--split {split}: unknown split; use --split val or --split test")
    verdict["fixed_code_sha256"] = fixed_code_sha256(REPO)
    if expect_fixed_sha and verdict["fixed_code_sha256"] != expect_fixed_sha:
        raise fail(f"the fixed code here hashes to {verdict['fixed_code_sha256'][:12]}, the key pins "
                   f"{expect_fixed_sha[:12]}: restore the pinned prepare.py and engines/ before scoring")
    # Everything this process will ever read, read now: the rows, the byte table, the artifact.
    test_rows = None
    try:
        data = PreparedData(Path(data_dir))
        data.verify()
        rows = data.val_rows() if split == "val" else data.test_rows()
        if split == "val" and test_below is not None:
            test_rows = data.test_rows()
        token_bytes = data.token_bytes()
    except PrepareError as e:
        raise fail(str(e)) from e
    verdict["data"] = data.key()
    kind = _select_device(backend, device)
    verdict["device"] = kind
    engine = get_engine(backend)
    ok, why = engine.available()
    if not ok:
        raise fail(why)
    try:
        blob = read_artifact(Path(artifact))
    except ArtifactError as e:
        raise fail(str(e)) from e
    if sealed:
        verdict["sealed"], verdict["seal"] = seal(backend, kind, (Path(data_dir), Path(artifact).parent))
        if not verdict["sealed"]:
            print(f"warning: the evaluator is not sealed ({verdict['seal']}); the artifact runs with its reads",
                  file=sys.stderr)

    t0 = time.perf_counter()
    try:
        fn = load_forward(backend, artifact, kind if backend == "cuda" else None, data=blob)
    except ArtifactError as e:
        raise fail(str(e)) from e
    except Exception as e:  # an importer meeting a hostile file may raise anything
        raise fail(f"broken artifact ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}); "
                   f"re-export the forward") from e
    del blob
    verdict["artifact_sha256"] = fn.sha256
    verdict["artifact_bytes"] = fn.bytes
    seconds = {"load": time.perf_counter() - t0}
    verdict["seconds"] = seconds
    seq_len, vocab = rows.shape[1] - 1, int(token_bytes.shape[0])
    if fn.contract.get("seq_len") != seq_len:
        raise fail(f"the artifact takes sequences of {fn.contract.get('seq_len')} tokens, the data's rows have "
                   f"{seq_len}; export with seq_len={seq_len}")
    batch = choose_batch_size(fn.batch_sizes, rows.shape[0], seq_len, vocab, logits_budget(backend, kind))
    verdict["batch_size"] = batch

    # Every scored batch is probed (engines.causality): cuts and donor rows drawn now, from OS randomness.
    probe = Probe(engine, rows, vocab)

    def scored(which: np.ndarray, name: str):
        probed = probe.result.seconds
        try:
            result = evaluate_bpb(engine, fn, batch, which, token_bytes, probe=probe)
        except ProbeFailure:
            result = None
        except Exception as e:  # a graph that fails at run time is a broken artifact
            raise fail(failed_to_run(e)) from e
        finally:
            verdict["causality"] = probe.result.to_dict()
            seconds["probe"] = probe.result.seconds
        if result is None:
            raise fail(f"INVALID: {probe.result.reason}")
        seconds[name] = result.seconds - (probe.result.seconds - probed)   # the scoring alone, probe apart
        return result

    result = scored(rows, "eval")
    if not result.val_bpb == result.val_bpb:   # NaN
        raise fail(f"the artifact's logits are not finite on the {split} rows")
    # (the evaluator names its result val_bpb whatever rows it was given)
    verdict.update({f"{split}_bpb": result.val_bpb, "nats": result.nats, "bytes": result.bytes,
                    "tokens": result.tokens})
    if test_rows is not None and result.val_bpb < test_below:
        probe.pool = test_rows   # donors from the rows being scored
        held = scored(test_rows, "test")
        verdict["test_bpb"] = held.val_bpb
    return verdict


def verdict_line(nonce: str, verdict: dict) -> str:
    """The verdict as the harness reads it: one stdout line, marked with the nonce the harness sent on
    stdin (a line printed by anything else in this process cannot carry it)."""
    return f"{VERDICT_MARKER} {nonce} {json.dumps(verdict, default=float)}"


def main(argv: list[str] | None = None, sealed: bool = False) -> int:
    """The CLI. sealed: seal this process before loading the artifact (the `python -m` entry point
    does; a test calling main() in its own process does not want its process sealed)."""
    ap = argparse.ArgumentParser(prog="python -m engines.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, choices=["mlx", "cuda"])
    ap.add_argument("--artifact", required=True, type=Path)
    ap.add_argument("--data-dir", required=True, type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the verdict to this JSON file")
    ap.add_argument("--device", choices=["cpu", "cuda", "gpu"], default=None)
    ap.add_argument("--split", default="val", help="val (the ratchet's rows) or test (held-out rows)")
    ap.add_argument("--expect-fixed-sha", default=None)
    ap.add_argument("--test-below", type=float, default=None, metavar="BPB",
                    help="with --split val: also score the test rows when val_bpb is below this (inf: always)")
    ap.add_argument("--nonce-stdin", action="store_true",
                    help="read a nonce from stdin and mark the stdout verdict line with it (the harness does)")
    args = ap.parse_args(argv)
    nonce = sys.stdin.readline().strip() if args.nonce_stdin else "-"
    # Opened now: once sealed, this process can open nothing.
    out = open(args.out, "w") if args.out is not None else None   # written at the end
    rc = 0
    try:
        verdict = score(args.backend, args.artifact, args.data_dir, args.device, args.split, args.expect_fixed_sha,
                        args.test_below, seal=sealed)
    except ScoreError as e:
        verdict = dict(e.args[1]) if len(e.args) > 1 else {}
        verdict["error"] = str(e.args[0])
        print(f"error: {verdict['error']}", file=sys.stderr)
        rc = 1
    if out is not None:
        with out:
            json.dump(verdict, out, indent=2, default=float)
    print(verdict_line(nonce, verdict), flush=True)
    if rc == 0:
        s = verdict["seconds"]
        score_name = f"{args.split}_bpb"
        print(f"{score_name} {verdict[score_name]:.6f} | batch {verdict['batch_size']} | load {s['load']:.2f}s "
              f"probe {s['probe']:.2f}s eval {s['eval']:.2f}s | causality max diff "
              f"{verdict['causality']['max_diff']:.3g}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sealed=True))
