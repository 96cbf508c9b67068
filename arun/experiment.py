"""
One experiment, end to end: check, run, record, keep or revert.

    scope guard -> lock -> train file in a subprocess (hard timeout, run.log)
    -> result JSON -> ledger record -> commit (keep) or restore the best (anything else)

The printed summary is for people and for agents written for upstream
(`grep "^val_bpb:" run.log`); the decision only ever reads the result JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

import prepare
from arun import gitops
from arun.errors import ArunError
from arun.keys import comparability_key, key_id
from arun.ledger import Ledger, ledger_path, new_id
from arun.ratchet import best_record, decide
from arun.trainfile import constants
from engines import TRAIN_FILES, EngineUnavailable, get_engine
from engines.evaluator import EVALUATOR_VERSION
from engines.report import summary_text

STEP_LINE = re.compile(r"^step (\d+) \| progress\s+([\d.]+)% \| loss ([\d.naif]+) .*?tok/s ([\d,]+) .*?remaining (\d+)s")
DEFAULT_NEAR_MISS = 0.002  # n-autoresearch's threshold: a discard this close to the best is worth a second look


def default_hard_timeout(budget: float) -> float:
    """Budget plus a generous allowance for start-up, compilation and evaluation."""
    return budget * 1.5 + 180


@contextlib.contextmanager
def _env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def repo_lock(repo_dir: Path, wait: float = 0.0):
    """One experiment per repository at a time; a second arun waits `wait` seconds, then refuses."""
    state = repo_dir / ".arun"
    state.mkdir(exist_ok=True)
    pid_file = state / "lock.pid"
    lock = FileLock(str(state / "lock"))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.exists() else "unknown"
        raise ArunError(f"another arun (pid {holder}) is running an experiment in {repo_dir}; "
                        f"wait for it to finish or pass --wait SECONDS") from None
    try:
        pid_file.write_text(str(os.getpid()))
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        lock.release()


class RunOutcome:
    def __init__(self) -> None:
        self.status = "ok"          # ok | crash | timeout | invalid | interrupted
        self.error: str | None = None
        self.result: dict | None = None
        self.wall_seconds = 0.0
        self.returncode: int | None = None


def _last_error_line(lines: list[str]) -> str:
    for line in reversed(lines):
        s = line.strip()
        if s.startswith(("FAIL:", "INVALID:")):
            return s
    for line in reversed(lines):
        s = line.strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", s) or s.startswith("error:"):
            return s[:300]
    tail = [s.strip() for s in lines if s.strip()]
    return tail[-1][:300] if tail else "no output"


def run_train_file(repo_dir: Path, train_file: str, env: dict, log_path: Path, hard_timeout: float,
                   on_line: Callable[[str], None] | None = None) -> RunOutcome:
    """Runs the train file as a child process group, streaming its output to run.log."""
    out = RunOutcome()
    t0 = time.perf_counter()
    lines: list[str] = []
    timed_out = threading.Event()
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-u", train_file], cwd=repo_dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(hard_timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                lines.append(line)
                if len(lines) > 400:
                    del lines[:200]
                if on_line:
                    on_line(line)
            proc.wait()
        except KeyboardInterrupt:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.status, out.error = "interrupted", "interrupted (Ctrl-C)"
            raise
        finally:
            watchdog.cancel()
            out.wall_seconds = time.perf_counter() - t0
            out.returncode = proc.returncode
    if timed_out.is_set():
        out.status, out.error = "timeout", f"killed at the hard timeout of {hard_timeout:.0f}s"
        return out
    result_path = Path(env["ARUN_RESULT_JSON"])
    if proc.returncode != 0:
        err = _last_error_line(lines)
        out.status = "invalid" if err.startswith("INVALID:") else "crash"
        out.error = err
        return out
    if not result_path.exists():
        out.status, out.error = "crash", "the train file exited without a result (engines.run.finish_run was not reached)"
        return out
    try:
        out.result = json.loads(result_path.read_text())
    except json.JSONDecodeError:
        out.status, out.error = "crash", "the result JSON is unreadable"
        return out
    v = out.result.get("val_bpb")
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        out.status, out.error = "crash", f"val_bpb is {v}"
    return out


class Progress:
    """A rich progress bar fed by the train file's step lines."""

    def __init__(self, enabled: bool, budget: float, label: str):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=True)
        self.task = self.bar.add_task(label, total=100.0, info="starting")

    def __enter__(self) -> "Progress":
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()

    def line(self, line: str) -> None:
        if not self.enabled:
            return
        m = STEP_LINE.match(line)
        if m:
            step, pct, loss, tok, rem = m.groups()
            self.bar.update(self.task, completed=float(pct),
                            info=f"step {int(step)} | loss {loss} | tok/s {tok} | {rem}s left")


def _seed_list(seeds: int, base: int) -> list[int | None]:
    return [None] if seeds <= 1 else [base + i for i in range(seeds)]


def run_experiment(repo_dir: Path | str, backend: str, description: str = "", *, budget: float | None = None,
                   seeds: int = 1, device: str | None = None, hard_timeout: float | None = None,
                   show_progress: bool = True, proposer: str | None = None, near_miss: float | None = None,
                   confidence: float | None = None, wait: float = 0.0,
                   record_sink: Callable[[dict], dict] | None = None,
                   decide_fn: Callable[[list[float], dict | None, list[dict]], tuple[str, bool]] | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """One experiment on the current train file; returns the ledger record it appended."""
    t_begin = time.perf_counter()
    repo_dir = Path(repo_dir).resolve()
    try:
        engine = get_engine(backend)
    except EngineUnavailable as e:
        raise ArunError(str(e)) from None
    train_file = TRAIN_FILES[backend]
    if not (repo_dir / train_file).exists():
        raise ArunError(f"{repo_dir / train_file} not found; run arun from the project root")
    budget = float(budget if budget is not None else prepare.DEFAULT_TIME_BUDGET)
    if budget <= 0:
        raise ArunError(f"--budget must be positive, got {budget}")
    hard_timeout = hard_timeout or default_hard_timeout(budget)
    device_env = device or os.environ.get("ARUN_DEVICE")

    with _env(ARUN_DEVICE=device_env):
        ok, why = engine.available()
        if not ok:
            other = "mlx" if backend == "cuda" else "cuda --device cpu"
            raise ArunError(f"{backend}: {why}" + ("" if "--backend" in why else f"; try --backend {other}"))
        hardware = engine.hardware()
    try:
        data = prepare.PreparedData.open()
        data.verify()
    except prepare.PrepareError as e:
        raise ArunError(str(e)) from None

    offending = gitops.offending_files(repo_dir, train_file)
    if offending:
        raise ArunError(f"only {train_file} may differ from the last kept commit; commit or revert: {', '.join(offending)}")

    with repo_lock(repo_dir, wait):
        branch, created = gitops.ensure_run_branch(repo_dir)
        if created:
            log(f"arun: started run branch {branch}")
        key = comparability_key(backend, hardware.tag, data.key(), budget, EVALUATOR_VERSION)
        kid = key_id(key)
        ledger = Ledger(ledger_path(repo_dir, hardware.tag))
        records = ledger.records()
        best = best_record(records, kid)
        base_commit = best["commit"] if best else gitops.head_sha(repo_dir)
        train_path = repo_dir / train_file
        pre_run = train_path.read_bytes()
        text = pre_run.decode("utf-8", errors="replace")
        record = {
            "id": new_id(), "key": key, "key_id": kid, "tag": hardware.tag, "backend": backend,
            "hardware": hardware.to_dict(), "branch": branch, "parent_commit": gitops.head_sha(repo_dir),
            "train_file": train_file, "train_sha256": hashlib.sha256(pre_run).hexdigest(),
            "diff": gitops.diff_against(repo_dir, base_commit, train_file), "description": description,
            "proposer": proposer, "config": constants(text), "baseline": best is None,
        }
        run_dir = repo_dir / ".arun" / "runs" / record["id"]
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = repo_dir / "run.log"
        log_path.write_text("")
        base_seed = record["config"].get("SEED", 42) if isinstance(record["config"].get("SEED"), int) else 42
        seed_list = _seed_list(seeds, base_seed)
        outcomes: list[RunOutcome] = []
        interrupted = False
        with Progress(show_progress and sys.stdout.isatty(), budget, f"{backend} {description[:40]}") as bar:
            for i, seed in enumerate(seed_list):
                env = dict(os.environ, ARUN_DATA_DIR=str(data.dir), ARUN_TIME_BUDGET=repr(budget),
                           ARUN_RESULT_JSON=str(run_dir / f"result{i}.json"), ARUN_CHECKPOINT=str(run_dir / f"weights{i}.npz"),
                           PYTHONUNBUFFERED="1")
                env.pop("ARUN_SEED", None)
                if seed is not None:
                    env["ARUN_SEED"] = str(seed)
                if device_env:
                    env["ARUN_DEVICE"] = device_env
                try:
                    outcome = run_train_file(repo_dir, train_file, env, log_path, hard_timeout, bar.line)
                except KeyboardInterrupt:
                    interrupted = True
                    o = RunOutcome()
                    o.status, o.error = "crash", "interrupted (Ctrl-C)"
                    outcomes.append(o)
                    break
                outcomes.append(outcome)
                if outcome.status != "ok":
                    break

        results = [o.result for o in outcomes if o.status == "ok" and o.result]
        failed = next((o for o in outcomes if o.status != "ok"), None)
        record["seeds"] = [r.get("seed") for r in results]
        if failed is not None:
            status, near = (failed.status if failed.status != "interrupted" else "crash"), False
            record["error"] = failed.error
            val = None
        else:
            vals = [float(r["val_bpb"]) for r in results]
            val = statistics.fmean(vals)
            record["val_bpb_seeds"] = vals
            if decide_fn is not None:
                status, near = decide_fn(vals, best, records)
            else:
                status, near = decide(val, best, DEFAULT_NEAR_MISS if near_miss is None else near_miss)
            record["error"] = None
        first = results[0] if results else {}
        n = max(1, len(results))
        record.update({
            "status": status, "near_miss": near, "val_bpb": val,
            "training_seconds": sum(r.get("training_seconds", 0.0) for r in results) / n if results else None,
            "total_seconds": sum(o.wall_seconds for o in outcomes),
            "startup_seconds": first.get("startup_seconds"),
            "warmup_seconds": first.get("warmup_seconds"),
            "eval_seconds": first.get("eval_seconds"),
            "peak_memory_mb": max((r.get("peak_vram_mb") or 0.0) for r in results) if results else None,
            "mfu_percent": first.get("mfu_percent"),
            "total_tokens": first.get("total_tokens"),
            "num_steps": first.get("num_steps"),
            "num_params": first.get("num_params"),
            "tokens_per_second": first.get("tokens_per_second"),
            "best_before": best["val_bpb"] if best else None,
        })
        if status == "keep" and not interrupted:
            message = f"{description or 'arun keep'} (val_bpb {val:.6f})"
            record["commit"] = gitops.commit_keep(repo_dir, [train_file], message)
        else:
            record["commit"] = base_commit
            if interrupted:
                train_path.write_bytes(pre_run)  # Ctrl-C: the train file as it was before the run
            else:
                gitops.restore_train_file(repo_dir, train_file, base_commit)
        experiment_seconds = time.perf_counter() - t_begin
        training = (record["training_seconds"] or 0.0) * max(1, len(results))
        record["wall_seconds"] = experiment_seconds
        record["overhead_seconds"] = experiment_seconds - training
        record["bookkeeping_seconds"] = experiment_seconds - record["total_seconds"]
        appended = record_sink(record) if record_sink else ledger.append(record)
        shutil.rmtree(run_dir, ignore_errors=True)

    with open(log_path, "a", encoding="utf-8") as f:
        f.write(summary_text(first or {"val_bpb": None}) + "\n")
    log(summary_text(first or {"val_bpb": None}))
    log(verdict_line(appended))
    if interrupted:
        raise KeyboardInterrupt
    return appended


def verdict_line(rec: dict) -> str:
    val = rec.get("val_bpb")
    best = rec.get("best_before")
    if rec["status"] == "keep":
        what = "baseline" if rec.get("baseline") else f"improved on {best:.6f} by {best - val:.6f}"
        return f"arun: KEEP {val:.6f} ({what}) -> {rec['commit'][:10]} [{rec['tag']}] id {rec['id']}"
    if rec["status"] == "discard":
        near = " (near miss)" if rec.get("near_miss") else ""
        return f"arun: DISCARD {val:.6f} vs best {best:.6f}{near}; train file restored to {rec['commit'][:10]} id {rec['id']}"
    return f"arun: {rec['status'].upper()} ({rec.get('error')}); train file restored to {rec['commit'][:10]} id {rec['id']}"
