"""
GPU readiness check: one prepared, self-stopping run that proves `arun --backend cuda` on a
GPU machine (see gpu_check.sh for the offline install), or the same at tiny scale on the CPU.

    python benchmarks/gpu_check.py                 # on the GPU: upstream profile, 75 s budget
    python benchmarks/gpu_check.py --cpu           # tiny profile, --device cpu, a few seconds

Steps, each guarded so that a failure shows up in the table without hiding the others:
  1. versions and the GPU (nvidia-smi; this process never touches CUDA itself), and whether the
     harness's hardware description leaves a CUDA context behind
  2. an offline corpus: the Python installation's own sources as .jsonl, `arun prepare files:`
  3. `arun --backend cuda` on a throwaway git copy of this project: compile, train, export,
     evaluator process, test rows on a keep, ledger
  4. benchmarks/bench_train.py at the same configuration, once per importable attention kernel
  5. the evaluator alone on the run's artifact, for its host peak RSS
  6. the train file's model with FlexAttention forced for its sliding-window layers, exported
     (as SDPA) and checked like any artifact: what a GPU without FA3 does at every run's end
  7. one table, last; everything also under $OUT (or --out) when set
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from bench_overhead import split as overhead_split  # noqa: E402 - the record's overhead split, one definition

# Tiny constants block for --cpu (as the tests' tiny projects): a few dozen steps a second on one core.
TINY = {"DEPTH": 1, "ASPECT_RATIO": 64, "HEAD_DIM": 32, "WINDOW_PATTERN": "L", "TOTAL_BATCH_SIZE": 512,
        "DEVICE_BATCH_SIZE": 8, "WARMUP_STEPS": 1, "COMPILE": False}
CHARS_PER_TOKEN = 3.0   # code under an 8K BPE vocab, a low guess: the corpus errs on the big side
VAL_SHARE = 8           # arun_data.sources.VAL_EVERY: 1 in 8 documents is val, another 1 in 8 test
MATMUL_N = 8192         # bf16 matmul size for the measured peak


class Check:
    """The figures of every step, and a log line per event, mirrored to out/ when given."""

    def __init__(self, out: Path | None, limit: float):
        self.out, self.figures, self.failed = out, {}, []
        self.deadline = time.monotonic() + limit
        if out:
            out.mkdir(parents=True, exist_ok=True)

    def timeout(self, cap: float) -> float:
        """A step's subprocess limit: its own cap, and never past the check's deadline (so the table prints)."""
        return max(5.0, min(cap, self.deadline - time.monotonic()))

    def log(self, line: str) -> None:
        print(line, flush=True)
        if self.out:
            with open(self.out / "gpu_check.log", "a") as f:
                f.write(line + "\n")

    def step(self, name: str, fn, *args) -> object:
        """Runs one step; a failure is logged and recorded, never raised."""
        self.log(f"== {name}")
        t0 = time.perf_counter()
        try:
            result = fn(*args)
        except Exception as e:  # one failed step must not hide the others' figures
            self.failed.append(name)
            self.log(f"!! {name} failed after {time.perf_counter() - t0:.1f}s: {type(e).__name__}: {e}")
            if self.out:
                (self.out / f"{name}.traceback.txt").write_text(traceback.format_exc())
            return None
        self.log(f"== {name} done in {time.perf_counter() - t0:.1f}s")
        return result

    def save(self, name: str, text: str) -> None:
        if self.out:
            (self.out / name).write_text(text)


_GROUPS: set[int] = set()  # process groups running now, ended with us when the wrapper's timeout stops us


def _end_groups(signum: int, frame) -> None:
    for pgid in list(_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def run_group(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group: on a timeout the whole group goes (a train process
    left behind would hold the GPU through every later step)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _GROUPS.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"stopped after {timeout:.0f}s") from None
    finally:
        _GROUPS.discard(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def sh(check: Check, name: str, cmd: list[str], *, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """A subprocess whose output goes to the log; an exit status other than 0 is an error."""
    p = run_group(cmd, cwd, env, check.timeout(timeout))
    check.save(f"{name}.stdout.txt", p.stdout)
    check.save(f"{name}.stderr.txt", p.stderr)
    for line in (p.stdout + p.stderr).splitlines()[-15:]:
        check.log(f"   {line}")
    if p.returncode != 0:
        raise RuntimeError(f"{name} exited {p.returncode}")
    return p


# --------------------------------------------------------------------------- 1. the machine

def nvidia_smi(*query: str) -> list[str]:
    out = subprocess.run(["nvidia-smi", f"--query-{query[0]}={','.join(query[1:])}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        raise RuntimeError(f"nvidia-smi: {out.stderr.strip() or out.stdout.strip()}")
    return [line.strip() for line in out.stdout.strip().splitlines()]


def machine(check: Check, cpu: bool) -> None:
    import numpy
    import torch
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                "numpy": numpy.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        pass
    check.log(f"   versions: {json.dumps(versions)}")
    check.figures["versions"] = versions
    if cpu:
        check.figures["gpu"] = "none (--cpu)"
        return
    name, mem, driver = nvidia_smi("gpu", "name", "memory.total", "driver_version")[0].split(", ")
    check.figures["gpu"] = f"{name}, {int(mem) / 1024:.0f} GiB, driver {driver}"
    check.log(f"   gpu: {check.figures['gpu']}")


def harness_context(check: Check, project: Path, env: dict, cpu: bool) -> None:
    """Does describing the hardware as the harness does (available(), hardware(), peak_flops())
    leave a CUDA context on the training GPU? It should not: that context costs the run memory."""
    code = ("import os, subprocess; from engines.cuda import ENGINE; ok, why = ENGINE.available(); "
            "hw = ENGINE.hardware(); ENGINE.peak_flops(); "
            "apps = '' if os.environ.get('ARUN_DEVICE') == 'cpu' else subprocess.run(['nvidia-smi', "
            "'--query-compute-apps=pid', '--format=csv,noheader'], capture_output=True, text=True).stdout; "
            "print(hw.tag, str(os.getpid()) in apps.split())")
    p = sh(check, "harness_context", [sys.executable, "-c", code], cwd=project, env=env, timeout=120)
    tag, holds = p.stdout.split()[-2:]
    check.figures["hardware_tag"] = tag
    check.figures["harness_cuda_context"] = "n/a (cpu)" if cpu else ("YES" if holds == "True" else "no")


# --------------------------------------------------------------------------- 2. data

def write_corpus(dest: Path, target_chars: int, doc_chars: int) -> tuple[int, int]:
    """Documents cut from the Python installation's sources (stdlib and site-packages) as .jsonl,
    cycled until target_chars: the throughput check needs enough rows, not good data."""
    root = Path(sysconfig.get_paths()["stdlib"]).parent
    files = sorted(p for p in root.rglob("*.py") if p.is_file())
    if not files:
        raise RuntimeError(f"no .py files under {root}")
    dest.mkdir(parents=True, exist_ok=True)
    chars = docs = 0
    with open(dest / "corpus.jsonl", "w") as f:
        while chars < target_chars:
            for path in files:
                text = path.read_text(encoding="utf-8", errors="replace")
                for i in range(0, len(text), doc_chars):
                    chunk = text[i:i + doc_chars]
                    if chunk.strip():
                        f.write(json.dumps({"text": chunk}) + "\n")
                        chars, docs = chars + len(chunk), docs + 1
                if chars >= target_chars:
                    break
    return chars, docs


def prepare(check: Check, work: Path, project: Path, env: dict, profile: str) -> Path:
    from prepare import PROFILES
    p = PROFILES[profile]
    # A row starts at most one document: documents of about a row each, enough for the val and test
    # rows (1 in VAL_SHARE documents each) with a margin for the hash split's lumps.
    doc_chars = int(p.max_seq_len * CHARS_PER_TOKEN)
    rows = p.eval_tokens // p.max_seq_len
    target = int(max(rows * VAL_SHARE * 1.3 * doc_chars, 1_000_000))
    t0 = time.perf_counter()
    chars, docs = write_corpus(work / "corpus", target, doc_chars)
    check.log(f"   corpus: {docs:,} documents, {chars / 1e6:.0f}M chars in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    sh(check, "prepare", arun(["prepare", "--dataset", f"files:{work / 'corpus'}", "--profile", profile]),
       cwd=project, env=env, timeout=180)
    check.figures["prepare_seconds"] = time.perf_counter() - t0
    current = json.loads((Path(env["ARUN_CACHE"]) / "current.json").read_text())
    return Path(current["data_dir"])


# --------------------------------------------------------------------------- 3. one experiment

def arun(args: list[str]) -> list[str]:
    """The project copy's own CLI (cwd is that copy), never an installed arun."""
    return [sys.executable, "-c", "import sys; from arun.cli import main; sys.argv[0] = 'arun'; main()", *args]


def copy_project(dest: Path) -> Path:
    """A throwaway git repo holding what a user's clone holds (no ledgers, no local state)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode == 0:
        files = [REPO / rel for rel in listed.stdout.splitlines()]
    else:  # a copy of the tree without its .git
        skip = {".git", ".venv", ".arun", "bench", "__pycache__", "wheels"}
        files = [p for p in REPO.rglob("*") if not skip & set(p.relative_to(REPO).parts)]
    for src in files:
        rel = src.relative_to(REPO)
        if src.is_file() and not src.is_symlink() and rel.parts[0] != "bench":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "check@arun"], ["config", "user.name", "gpu check"],
                 ["add", "-A"], ["commit", "-qm", "project"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def experiment(check: Check, project: Path, env: dict, cpu: bool, budget: float) -> dict:
    device = ["--device", "cpu"] if cpu else []
    if cpu:
        sh(check, "set", arun(["set", "--backend", "cuda", *(f"{k}={v!r}" for k, v in TINY.items())]),
           cwd=project, env=env, timeout=60)
    t0 = time.perf_counter()
    p = run_group(arun(["--backend", "cuda", *device, "--budget", str(budget), "-m", "gpu check"]), project, env,
                  check.timeout(budget + 240))
    check.figures["arun_wall_seconds"] = time.perf_counter() - t0
    check.save("arun.stdout.txt", p.stdout)
    check.save("arun.stderr.txt", p.stderr)
    for line in (p.stdout + p.stderr).splitlines()[-25:]:
        check.log(f"   {line}")
    ledgers = sorted((project / "bench").glob("*/ledger.jsonl"))
    if not ledgers:
        raise RuntimeError(f"arun exited {p.returncode} and wrote no ledger")
    rec = json.loads(ledgers[-1].read_text().splitlines()[-1])
    check.save("record.json", json.dumps(rec, indent=2))
    check.figures["record"] = rec
    if p.returncode != 0:
        raise RuntimeError(f"arun exited {p.returncode}: {rec.get('status')} {rec.get('error') or ''}")
    return rec


# --------------------------------------------------------------------------- 4. throughput

def attention_kernels(cpu: bool) -> list[str]:
    if cpu:
        return ["sdpa"]
    from engines import torch_attention
    kernels = ["flex"] if torch_attention._has_flex() else []
    kernels.append("sdpa")
    if torch_attention._flash_attention_3() is not None:
        kernels.insert(0, "fa3")
    return kernels


def bench(check: Check, project: Path, env: dict, cpu: bool, kernel: str) -> dict:
    """bench_train.py at the run's configuration with one attention kernel forced."""
    size = (["--depth", "1", "--seq-len", "64", "--batch", "8", "--vocab", "512", "--steps", "3", "--warmup", "1"]
            if cpu else ["--seq-len", "2048", "--vocab", "8192", "--steps", "4", "--warmup", "2"])  # the file's depth, batch
    # The kernel is chosen where the model is placed: force it by pinning the default for this process.
    code = ("import runpy, sys; from engines import torch_attention as ta; "
            f"ta.default_kernel = lambda device: {kernel!r}; "
            "sys.argv = ['bench_train.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(REPO / 'benchmarks' / 'bench_train.py')!r}, run_name='__main__')")
    train = project / "train_cuda.py"
    p = sh(check, f"bench_{kernel}", [sys.executable, "-c", code, "--backend", "cuda", *size, "--json",
                                      "--train-file", str(train)],
           cwd=project, env={**env, **({"ARUN_DEVICE": "cpu"} if cpu else {})}, timeout=120)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    check.figures.setdefault("bench", {})[kernel] = out
    return out


EXPORT_FLEX = """
import sys, tempfile, torch
from pathlib import Path
from engines import torch_attention
from engines.forward_file import export_forward, load_forward
sys.path.insert(0, ".")
import train_cuda as tf
device = torch.device(sys.argv[1])
config = tf.GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
assert torch_attention.prepare_attention(64, [32], device, kernel="flex") == "flex"
model = tf.GPT(config).to(device)
model.init_weights()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
model.eval()
idx = torch.randint(0, 512, (2, 64), dtype=torch.int32, device=device)
with torch.no_grad():
    eager = model(idx).float()
path = Path(tempfile.mkdtemp()) / "f.pt2"
export_forward("cuda", model, model, path, seq_len=64)
got = load_forward("cuda", path, device.type)(idx).float()
print((got - eager).abs().max().item())
"""


def export_flex(check: Check, project: Path, env: dict, cpu: bool) -> float:
    """The sliding-window layers on FlexAttention, exported through engines.forward_file in a child."""
    device = "cpu" if cpu else "cuda"
    p = sh(check, "export_flex", [sys.executable, "-c", EXPORT_FLEX, device], cwd=project,
           env={**env, **({"ARUN_DEVICE": "cpu"} if cpu else {})}, timeout=120)
    diff = float(p.stdout.split()[-1])
    if not diff <= 0.05:
        raise RuntimeError(f"the flex model's artifact differs from its eager forward by {diff:g}")
    check.figures["export_flex_max_diff"] = diff
    return diff


MATMUL = f"""
import time, torch
n = {MATMUL_N}
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
reps, t0 = 20, time.perf_counter()
for _ in range(reps):
    a @ b
torch.cuda.synchronize()
print(2 * n**3 * reps / (time.perf_counter() - t0))
"""


def matmul_rate(check: Check, project: Path, env: dict) -> float:
    """Measured dense bf16 matmul FLOP/s of this card: the honest MFU denominator next to the datasheet's.
    In a child process, so this process never holds a CUDA context the benchmarks would pay for."""
    p = sh(check, "matmul", [sys.executable, "-c", MATMUL], cwd=project, env=env, timeout=60)
    rate = float(p.stdout.split()[-1])
    check.figures["matmul_flops"] = rate
    return rate


# --------------------------------------------------------------------------- 5. the evaluator alone

def evaluator_rss(check: Check, project: Path, env: dict, data_dir: Path, rec: dict, cpu: bool) -> float:
    """Reruns the evaluator on the run's artifact under a wrapper that reports its peak RSS."""
    artifacts = sorted((project / ".arun").rglob("*.pt2"), key=lambda p: p.stat().st_mtime)  # a keep's, in the store
    if not artifacts:
        raise RuntimeError("the run left no artifact to score")
    out = Path(tempfile.mkdtemp(prefix="score-", dir=project.parent)) / "score.json"
    score = [sys.executable, "-m", "engines.score", "--backend", "cuda", "--artifact", str(artifacts[-1]),
             "--data-dir", str(data_dir), "--out", str(out), *(["--device", "cpu"] if cpu else [])]
    wrapper = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    p = sh(check, "evaluator", [sys.executable, "-c", wrapper, *score], cwd=project, env=env, timeout=90)
    rss_mb = int(p.stdout.strip().splitlines()[-1]) / 1024
    check.figures["evaluator_rss_mb"] = rss_mb
    check.figures["evaluator"] = json.loads(out.read_text())
    return rss_mb


# --------------------------------------------------------------------------- 6. the table

def table(check: Check, budget: float) -> list[tuple[str, str]]:
    f, rec = check.figures, check.figures.get("record") or {}

    def num(x, fmt: str = "{:,.1f}", unit: str = "") -> str:
        return fmt.format(x) + unit if isinstance(x, (int, float)) else "n/a"

    rows = [("gpu", str(f.get("gpu", "n/a"))), ("hardware tag", str(f.get("hardware_tag", "n/a"))),
            ("harness holds a CUDA context", str(f.get("harness_cuda_context", "n/a"))),
            ("prepare seconds", num(f.get("prepare_seconds")))]
    peak = None
    try:
        from engines.cuda import peak_flops_for
        peak = peak_flops_for(str(f.get("gpu", "")).split(",")[0])
    except ImportError:
        pass
    for kernel, b in (f.get("bench") or {}).items():
        tok_s, mfu = b.get("tokens_per_second"), b.get("mfu_percent")  # bench_train's MFU is vs the datasheet
        measured = mfu * peak / f["matmul_flops"] if mfu and peak and f.get("matmul_flops") else None
        rows += [(f"bench {kernel}: tokens/s", num(tok_s, "{:,.0f}")),
                 (f"bench {kernel}: MFU vs datasheet peak", num(mfu, "{:.1f}", " %")),
                 (f"bench {kernel}: MFU vs measured matmul", num(measured, "{:.1f}", " %"))]
        if tok_s:
            steps = 300 * tok_s / b["tokens_per_step"]
            rows.append((f"bench {kernel}: per 300 s", f"{steps:,.0f} steps, {300 * tok_s / 1e6:,.1f}M tokens"))
        rows.append((f"bench {kernel}: peak memory", num(b.get("peak_memory_mb"), "{:,.0f}", " MB")))
    rows.append(("matmul bf16 measured", num((f.get("matmul_flops") or 0) / 1e12 or None, "{:.0f}", " TFLOP/s")))
    rows += [("run: status", str(rec.get("status", "n/a")) + (f" ({rec['error']})" if rec.get("error") else "")),
             ("run: val_bpb (evaluator)", num(rec.get("val_bpb"), "{:.4f}")),
             ("run: test_bpb", num(rec.get("test_bpb"), "{:.4f}")),
             ("run: steps / tokens", f"{rec.get('num_steps', 'n/a')} / {num(rec.get('total_tokens'), '{:,.0f}')}"
                                     f" in {budget:g} s"),
             ("run: tokens/s, MFU", f"{num(rec.get('tokens_per_second'), '{:,.0f}')}, "
                                    f"{num(rec.get('mfu_percent'), '{:.1f}', ' %')}"),
             ("run: peak memory", num(rec.get("peak_memory_mb"), "{:,.0f}", " MB")),
             ("run: startup + compile s", num((rec.get("startup_seconds") or 0) + (rec.get("warmup_seconds") or 0)
                                              if rec else None)),
             ("run: score s (evaluator)", num(rec.get("score_seconds"))),
             ("run: test s (evaluator)", num(rec.get("test_seconds")))]
    if rec.get("wall_seconds"):
        split = overhead_split(rec)
        rows.append(("run: overhead split s", ", ".join(f"{k} {v:.1f}" for k, v in split.items() if k != "overhead %")))
    ev = (f.get("evaluator") or {}).get("seconds") or {}
    rows += [("evaluator alone: seconds", ", ".join(f"{k} {v:.1f}" for k, v in ev.items()) or "n/a"),
             ("evaluator alone: host peak RSS", num(f.get("evaluator_rss_mb"), "{:,.0f}", " MB")),
             ("export with flex attention: max diff", num(f.get("export_flex_max_diff"), "{:.2g}")),
             ("failed steps", ", ".join(check.failed) or "none")]
    return rows


def print_table(check: Check, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    lines = ["", "GPU CHECK", "-" * (width + 40)] + [f"{k:<{width}}  {v}" for k, v in rows]
    for line in lines:
        check.log(line)
    if check.out:
        (check.out / "table.json").write_text(json.dumps(dict(rows), indent=2))
        (check.out / "figures.json").write_text(json.dumps(check.figures, indent=2, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny profile on the CPU device: proves everything but the GPU")
    ap.add_argument("--budget", type=float, default=None, help="training seconds of the run (default 75; 3 with --cpu)")
    ap.add_argument("--profile", default=None, help="data profile (default upstream; tiny with --cpu)")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT") or None, help="logs and figures (default $OUT)")
    ap.add_argument("--limit", type=float, default=420.0, help="seconds for the whole check; the table still prints")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    args = ap.parse_args()
    budget = args.budget or (3.0 if args.cpu else 75.0)
    profile = args.profile or ("tiny" if args.cpu else "upstream")
    signal.signal(signal.SIGTERM, _end_groups)
    check = Check(args.out, args.limit - 10)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work))
    try:
        project = copy_project(work / "project")
        env = dict(os.environ, ARUN_CACHE=str(work / "cache"), ARUN_HOME=str(work / "home"), PYTHONUNBUFFERED="1",
                   COLUMNS="200")
        for name in ("ARUN_DATA_DIR", "ARUN_SEED", "ARUN_DEVICE"):
            env.pop(name, None)
        if args.cpu:
            env["OMP_NUM_THREADS"] = "1"  # tiny tensors on a busy CPU: threads only slow them down
        check.step("machine", machine, check, args.cpu)
        check.step("harness_context", harness_context, check, project, {**env, **({"ARUN_DEVICE": "cpu"} if args.cpu else {})},
                   args.cpu)
        data_dir = check.step("prepare", prepare, check, work, project, env, profile)
        if data_dir:
            env["ARUN_DATA_DIR"] = str(data_dir)
            rec = check.step("experiment", experiment, check, project, env, args.cpu, budget)
            if rec:
                check.step("evaluator", evaluator_rss, check, project, env, data_dir, rec, args.cpu)
        if not args.cpu:
            check.step("matmul", matmul_rate, check, project, env)
        for kernel in attention_kernels(args.cpu):
            check.step(f"bench_{kernel}", bench, check, project, env, args.cpu, kernel)
        check.step("export_flex", export_flex, check, project, env, args.cpu)
        print_table(check, table(check, budget))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
