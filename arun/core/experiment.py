"""
One experiment, end to end: check, run, record, keep or revert.

    engine + data + scope guard (refuse before touching anything)
    -> repo lock -> run branch -> the train file in a subprocess per seed
       (env contract, hard timeout, run.log, progress bar)
    -> result JSON -> decision against the best record of the same key
    -> commit (keep) or restore the best commit's train file (anything else)
    -> one ledger record

The printed summary is for people and for agents written for upstream
(`grep "^val_bpb:" run.log`); the decision only ever reads the result JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO

from filelock import FileLock, Timeout

import prepare
from arun.core import gitops
from arun.core.errors import ArunError
from arun.core.keys import comparability_key, key_id
from arun.core.ledger import Ledger, ledger_path, new_id
from arun.core.progress import Progress
from arun.core.ratchet import best_record, decide
from arun.core.trainfile import constants
from arun.core.verify import audit_timing, matches
from engines import BACKENDS, TRAIN_FILES, EngineUnavailable, get_engine
from engines.evaluator import EVALUATOR_VERSION
from engines.report import summary_text


DEFAULT_NEAR_MISS = 0.002  # n-autoresearch's threshold: a discard this close to the best is worth a second look
DEVICE_BACKENDS = ("cuda",)  # engines that read ARUN_DEVICE (the torch engine)
STATUSES = ("keep", "discard", "crash", "timeout", "invalid")


def default_hard_timeout(budget: float) -> float:
    """Budget plus an allowance for start-up, compilation and evaluation: at the default 300 s budget
    this is upstream's "if a run exceeds 10 minutes, kill it"."""
    return budget + max(120.0, budget)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while an experiment runs."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler stopping us with SIGTERM gets the same clean-up as Ctrl-C (child killed, train
    file restored, crash recorded) instead of leaving an orphaned training run on the GPU."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def repo_lock(repo_dir: Path, wait: float = 0.0) -> Iterator[None]:
    """One experiment per repository at a time; a second arun waits `wait` seconds, then refuses."""
    state = Path(repo_dir) / ".arun"
    state.mkdir(exist_ok=True)
    ignore = state / ".gitignore"
    if not ignore.exists():  # the harness's state never shows up in git, whatever the project's .gitignore says
        ignore.write_text("*\n")
    pid_file = state / "lock.pid"
    lock = FileLock(str(state / "lock"))
    try:
        lock.acquire(timeout=max(0.0, wait))
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.exists() else "unknown"
        raise ArunError(f"another arun (pid {holder or 'unknown'}) is running an experiment in {repo_dir}; "
                        f"wait for it to finish, or pass --wait SECONDS to queue behind it") from None
    try:
        pid_file.write_text(str(os.getpid()))
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        lock.release()


# --------------------------------------------------------------------------- one child process

class RunOutcome:
    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.status = "ok"          # ok | crash | timeout | invalid | interrupted
        self.error: str | None = None
        self.result: dict | None = None
        self.result_mtime: float | None = None
        self.launch_time = 0.0      # time.time() at process start
        self.wall_seconds = 0.0
        self.returncode: int | None = None


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Warning)\b.*")
_NOISE = ("Traceback", "File ", "^", "~", "During handling", "The above exception")


def last_error_line(lines: list[str]) -> str:
    """The line that says what went wrong: an explicit FAIL:/INVALID: exit, else the exception line,
    else the last line that is not traceback scaffolding."""
    stripped = [s.strip() for s in lines if s.strip()]
    for s in reversed(stripped):
        if s.startswith(("FAIL:", "INVALID:")):
            return s[:500]
    for s in reversed(stripped):
        if _EXCEPTION_LINE.match(s) or s.startswith("error:"):
            return s[:500]
    for s in reversed(stripped):
        if not s.startswith(_NOISE):
            return s[:500]
    return "no output"


def _same_file(stream: TextIO, path: Path) -> bool:
    """Is this stream the file at path? (an agent told `arun ... > run.log 2>&1`, as upstream's program.md
    says for train.py: then stdout already is run.log and arun must not write it a second time)."""
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def _log_sink(log_path: Path, to_stdout: bool) -> Iterator[TextIO]:
    if to_stdout:
        yield sys.stdout
        sys.stdout.flush()
    else:
        with open(log_path, "a", encoding="utf-8") as f:
            yield f


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGKILL it when arun dies, even by SIGKILL, so an orphaned
    run never keeps training on the GPU next to the next experiment. Elsewhere a no-op: there the
    orphan dies at its next write to the closed pipe."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def child_env(data_dir: Path, device: str | None, seed: int | None = None, **values: str) -> dict:
    """The environment of a process the harness starts (a run, a re-evaluation): ours, with the data
    folder, the torch device and the seed set explicitly, never inherited from the caller."""
    env = dict(os.environ, ARUN_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", **values)
    env.pop("ARUN_SEED", None)
    env.pop("ARUN_DEVICE", None)
    if seed is not None:
        env["ARUN_SEED"] = str(seed)
    if device:
        env["ARUN_DEVICE"] = device
    return env


def run_train_file(repo_dir: Path, train_file: str, env: dict, log_path: Path, hard_timeout: float,
                   on_line: Callable[[str], None] | None = None, prefix: str = "",
                   seed: int | None = None, log_is_stdout: bool = False) -> RunOutcome:
    """Runs the train file as its own process group (so a kill reaches compile workers and
    dataloader processes too), streaming stdout+stderr into run.log and to on_line."""
    out = RunOutcome(seed)
    lines: list[str] = []
    timed_out = threading.Event()
    result_path = Path(env["ARUN_RESULT_JSON"])
    with _log_sink(log_path, log_is_stdout) as log:
        out.launch_time = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-u", train_file], cwd=repo_dir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace",
                                start_new_session=True, preexec_fn=_die_with_parent)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(hard_timeout, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(prefix + line)
                log.flush()
                lines.append(line)
                if len(lines) > 400:
                    del lines[:200]
                if on_line:
                    on_line(line)
            proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM / anything else: the child must not outlive us (it would hold the GPU).
            watchdog.cancel()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.status, out.error = "interrupted", "interrupted (Ctrl-C)"
            raise
        finally:
            watchdog.cancel()
            out.wall_seconds = time.perf_counter() - t0
            out.returncode = proc.returncode
            # Whatever the child started in its group (compile workers, loader processes) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    if timed_out.is_set():
        out.status, out.error = "timeout", f"killed at the hard timeout of {hard_timeout:.0f}s"
        return out
    if proc.returncode != 0:
        err = last_error_line(lines)
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.valid_signals() else str(-proc.returncode)
            hint = " (out of memory?)" if name == "SIGKILL" else ""
            err = f"killed by {name}{hint}; last output: {err}"
        out.status = "invalid" if err.startswith("INVALID:") else "crash"
        out.error = err
        return out
    if not result_path.exists():
        out.status = "crash"
        out.error = "the train file exited without a result (engines.run.finish_run was not reached)"
        return out
    try:
        out.result = json.loads(result_path.read_text())
        out.result_mtime = result_path.stat().st_mtime
    except (json.JSONDecodeError, OSError) as e:
        out.status, out.error = "crash", f"the result JSON is unreadable ({e})"
        return out
    v = out.result.get("val_bpb")
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        out.status, out.error = "crash", f"val_bpb is {v} (the model diverged or produced non-finite logits)"
    return out


def _num(v: object) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def overhead_split(o: RunOutcome) -> dict:
    """Where one run's wall time went besides training. The train file's clock starts in train()
    (after imports), so launch = process start -> train(), read off the result file's mtime
    (written at the end of finish_run, total_seconds after train() began)."""
    r = o.result or {}
    total, training = _num(r.get("total_seconds")), _num(r.get("training_seconds")) or 0.0
    warmup, evaluation = _num(r.get("warmup_seconds")) or 0.0, _num(r.get("eval_seconds")) or 0.0
    launch = None
    if total is not None and o.result_mtime is not None:
        launch = max(0.0, o.result_mtime - total - o.launch_time)
    setup = _num(r.get("startup_seconds"))
    if setup is None and total is not None:
        setup = max(0.0, total - training - warmup - evaluation)
    startup = None if setup is None else setup + (launch or 0.0)
    return {"launch_seconds": launch, "startup_seconds": startup, "warmup_seconds": warmup if r else None,
            "eval_seconds": evaluation if r else None}


# --------------------------------------------------------------------------- the train file's constants

def train_constants(text: str) -> dict:
    """The hyperparameter block as a dict for the record: literals and arithmetic such as 2**19 evaluated,
    anything else kept as its source text."""
    return constants(text, keep_source=True)


# --------------------------------------------------------------------------- checks before anything runs

def _engine_works(name: str, device: str | None) -> bool:
    try:
        with _env(ARUN_DEVICE=device):
            return bool(get_engine(name).available()[0])
    except Exception:  # noqa: BLE001 - an engine failing to import simply does not work here
        return False


def _alternative(backend: str) -> str:
    for name in BACKENDS:
        if name == backend:
            continue
        if _engine_works(name, None):
            return f"use --backend {name}"
        if name in DEVICE_BACKENDS and _engine_works(name, "cpu"):
            return f"use --backend {name} --device cpu (the torch CPU engine)"
    return "no other engine works here either (see arun doctor)"


def resolve_engine(backend: str, device: str | None):
    """The engine for `backend`, checked to run here; ArunError naming what was found and what would work."""
    if not isinstance(backend, str) or not backend:
        raise ArunError(f"no backend given; use --backend {' or --backend '.join(BACKENDS)}")
    try:
        engine = get_engine(backend)
    except EngineUnavailable as e:
        raise ArunError(str(e)) from None
    except ImportError as e:
        raise ArunError(f"the {backend} engine does not import ({e}); reinstall arun with its extra: "
                        f"pip install -e '.[{backend}]'") from None
    if device is not None and backend not in DEVICE_BACKENDS:
        raise ArunError(f"--device is for the torch engine (--backend cuda); {backend} runs on its own default device")
    with _env(ARUN_DEVICE=device if backend in DEVICE_BACKENDS else None):
        try:
            ok, why = engine.available()
        except ValueError as e:  # e.g. ARUN_DEVICE=tpu
            raise ArunError(f"{backend}: {e}") from None
        if not ok:
            hint = "" if "--backend" in why else f"; {_alternative(backend)}"
            raise ArunError(f"{backend}: {why}{hint}")
        hardware = engine.hardware()
    return engine, hardware


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
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


def check_scope(repo_dir: Path, train_file: str) -> None:
    """Only the backend's train file may differ from HEAD (the last kept commit)."""
    gitops.open_repo(repo_dir)
    if not (repo_dir / train_file).exists():
        raise ArunError(f"{repo_dir / train_file} not found; run arun from the project root")
    try:
        gitops.file_at(repo_dir, "HEAD", train_file)
    except Exception:  # noqa: BLE001 - git's error text is the same point said worse
        raise ArunError(f"{train_file} is not committed; git add {train_file} && git commit -m 'add {train_file}'") from None
    offending = gitops.offending_files(repo_dir, train_file)
    if offending:
        shown = ", ".join(offending[:20]) + (f" (+{len(offending) - 20} more)" if len(offending) > 20 else "")
        raise ArunError(f"only {train_file} may differ from the last kept commit, but these do too: {shown}; "
                        f"commit them (outside the experiment) or revert them (git checkout -- FILE / delete)")


# --------------------------------------------------------------------------- the experiment

def run_experiment(repo_dir: Path | str, backend: str, description: str = "", *, budget: float | None = None,
                   seeds: int = 1, device: str | None = None, hard_timeout: float | None = None,
                   show_progress: bool = True, proposer: str | None = None, near_miss: float | None = None,
                   confidence: float | None = None, wait: float = 0.0,
                   record_sink: Callable[[dict], dict] | None = None,
                   decide_fn: Callable[[list[float], dict | None, list[dict]], tuple[str, bool]] | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """One experiment on the current train file; returns the ledger record it appended.

    record_sink: where the record goes instead of bench/<tag>/ledger.jsonl (the swarm's one writer).
    decide_fn(val_bpb per seed, best record, key's records) -> (status, near_miss): a replacement
    for the plain "strictly lower than the best" rule (e.g. a significance test over seeds).
    Raises ArunError (nothing touched) for bad input, KeyboardInterrupt after recording an interrupted run."""
    t_begin = time.perf_counter()
    repo_dir = Path(repo_dir).resolve()
    if seeds < 1:
        raise ArunError(f"--seeds must be at least 1, got {seeds}")
    budget = float(budget if budget is not None else prepare.DEFAULT_TIME_BUDGET)
    if not math.isfinite(budget) or budget <= 0:
        raise ArunError(f"--budget must be a positive number of seconds, got {budget}")
    hard_timeout = float(hard_timeout) if hard_timeout else default_hard_timeout(budget)
    if hard_timeout <= 0:
        raise ArunError(f"--timeout must be positive, got {hard_timeout}")
    device = device or (os.environ.get("ARUN_DEVICE") if backend in DEVICE_BACKENDS else None)

    # Every check that can refuse comes before anything is written.
    engine, hardware = resolve_engine(backend, device)
    train_file = TRAIN_FILES.get(backend) or engine.train_file
    try:
        data = prepare.PreparedData.open()
        data.verify()
    except prepare.PrepareError as e:
        raise ArunError(str(e)) from None
    check_scope(repo_dir, train_file)

    with repo_lock(repo_dir, wait):
        check_scope(repo_dir, train_file)  # again: whoever held the lock may have committed meanwhile
        branch, created = gitops.ensure_run_branch(repo_dir)
        if created:
            log(f"arun: created run branch {branch} from {gitops.head_sha(repo_dir)[:10]} (experiments are committed there)")
        key = comparability_key(backend, hardware.tag, data.key(), budget, EVALUATOR_VERSION)
        kid = key_id(key)
        ledger = Ledger(ledger_path(repo_dir, hardware.tag))
        records = ledger.records()
        best = best_record(records, kid)
        head = gitops.head_sha(repo_dir)
        base_commit = best["commit"] if best else head
        if best and not gitops.commit_exists(repo_dir, base_commit):
            raise ArunError(f"the best commit {base_commit[:10]} of this key ({kid}, val_bpb {best['val_bpb']:.6f}) "
                            f"is not in this repository; git fetch the branch that has it")
        train_path = repo_dir / train_file
        pre_run = train_path.read_bytes()
        text = pre_run.decode("utf-8", errors="replace")
        config = train_constants(text)
        description = description.strip().splitlines()[0] if description.strip() else ("baseline" if best is None else "")
        record: dict = {
            "id": new_id(), "key": key, "key_id": kid, "tag": hardware.tag, "backend": backend,
            "hardware": hardware.to_dict(), "branch": branch, "commit": None, "parent_commit": head,
            "train_file": train_file, "train_sha256": hashlib.sha256(pre_run).hexdigest(),
            "diff": gitops.diff_against(repo_dir, base_commit, train_file), "diff_base": base_commit,
            "description": description,
            "status": None, "baseline": best is None, "val_bpb": None, "val_bpb_seeds": [],
            "proposer": proposer, "near_miss": False, "config": config,
            "time_budget": budget, "device": device, "confidence": confidence,
        }
        run_rel = f".arun/runs/{record['id']}"
        run_dir = repo_dir / run_rel
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = repo_dir / "run.log"
        log_is_stdout = _same_file(sys.stdout, log_path)
        if not log_is_stdout:
            log_path.write_text("")
        against = "baseline run" if best is None else f"best so far {best['val_bpb']:.6f}"
        log(f"arun: {train_file} on {hardware.tag}, {budget:g}s budget (key {kid}), {against}; output in run.log")
        base_seed = config["SEED"] if isinstance(config.get("SEED"), int) else 42
        seed_list: list[int | None] = [None] if seeds <= 1 else [base_seed + i for i in range(seeds)]
        outcomes: list[RunOutcome] = []
        interrupted: str | None = None
        label = f"{backend} {description[:40]}".strip()
        with _sigterm_as_interrupt(), Progress(show_progress and sys.stdout.isatty(), label) as bar:
            for i, seed in enumerate(seed_list):
                env = child_env(data.dir, device, seed, ARUN_TIME_BUDGET=repr(budget),
                                ARUN_RESULT_JSON=str(run_dir / f"result{i}.json"),
                                ARUN_CHECKPOINT=str(run_dir / f"weights{i}.npz"))
                if len(seed_list) > 1:
                    bar.new_run(f"{label} (seed {seed}, {i + 1}/{len(seed_list)})")
                prefix = f"[seed {seed}] " if len(seed_list) > 1 else ""
                try:
                    outcome = run_train_file(repo_dir, train_file, env, log_path, hard_timeout, bar.line, prefix, seed,
                                             log_is_stdout)
                except KeyboardInterrupt as e:
                    interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
                    o = RunOutcome(seed)
                    o.status, o.error = "crash", f"interrupted ({interrupted})"
                    outcomes.append(o)
                    break
                outcomes.append(outcome)
                if outcome.status != "ok":
                    break

        results = [o.result for o in outcomes if o.status == "ok" and o.result]
        failed = next((o for o in outcomes if o.status != "ok"), None)
        if failed is not None:
            status, near, val = failed.status, False, None
            record["error"] = failed.error
        else:
            vals = [float(r["val_bpb"]) for r in results]
            val = statistics.fmean(vals)
            record["val_bpb_seeds"] = vals
            record["error"] = audit_outcomes(outcomes, budget)
            if record["error"]:
                status, near = "invalid", False
            elif decide_fn is not None:
                status, near = decide_fn(vals, best, [r for r in records if r.get("key_id") == kid])
            else:
                status, near = decide(val, best, DEFAULT_NEAR_MISS if near_miss is None else near_miss)
            if status == "keep":
                if train_path.read_bytes() != pre_run:
                    # Edited while it ran (an agent that did not wait): what is checked and committed is what ran.
                    log(f"arun: {train_file} changed during the run; keeping the version that ran, your edit is dropped")
                    gitops.write_atomic(train_path, pre_run)
                t_verify = time.perf_counter()
                try:
                    with _sigterm_as_interrupt():
                        log("arun: reproducing the result: re-evaluating the saved weights with fixed code")
                        record["error"] = reproduce(repo_dir, run_dir, backend, outcomes, data.dir, device,
                                                    hard_timeout, budget)
                except KeyboardInterrupt as e:
                    interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
                    status, near = "crash", False
                    record["error"] = f"interrupted ({interrupted}) while the harness reproduced the result"
                else:
                    if record["error"]:
                        status, near = "invalid", False
                record["verify_seconds"] = time.perf_counter() - t_verify
        record.update(_result_fields(outcomes, results))
        if status == "invalid" and val is not None:  # a number the harness could not stand behind is not a result
            record["claimed_val_bpb"], val = val, None
        record.update({"status": status, "near_miss": bool(near), "val_bpb": val,
                       "best_before": best["val_bpb"] if best else None, "run_dir": run_rel})

        # The decision: keep -> commit; anything else -> the train file goes back.
        if status == "keep":
            message = f"{description or 'arun keep'}\n\narun: val_bpb {val:.6f} on {hardware.tag} (key {kid}, id {record['id']})"
            paths = [train_file] if record_sink else [train_file, str(ledger.path.relative_to(repo_dir))]
            try:
                record["commit"] = gitops.commit_keep(repo_dir, paths, message)
            except ArunError as e:  # the run is still recorded, as a crash of the harness's commit
                status, near, record["error"] = "crash", False, str(e)
                record["status"], record["near_miss"] = status, False
        if status != "keep":
            record["commit"] = base_commit
            if interrupted:
                gitops.write_atomic(train_path, pre_run)  # Ctrl-C: the train file exactly as before the run
            else:
                gitops.restore_train_file(repo_dir, train_file, base_commit)

        wall = time.perf_counter() - t_begin
        record["wall_seconds"] = wall
        record["bookkeeping_seconds"] = max(0.0, wall - sum(o.wall_seconds for o in outcomes))
        record["overhead_seconds"] = wall - (record["training_seconds"] or 0.0)
        appended = record_sink(record) if record_sink else ledger.append(record)
        _prune_checkpoints(repo_dir, run_dir, appended, best)

    summary = summary_text(_summary_values(appended, results)) if results and failed is None else None
    verdict = verdict_line(appended)
    if not log_is_stdout:  # (when stdout is run.log, the lines below land there anyway)
        with open(log_path, "a", encoding="utf-8") as f:
            if summary and len(seed_list) > 1:
                f.write(summary + "\n")  # the children's blocks are prefixed by seed; this one is the experiment's
            f.write(verdict + "\n")
    if summary and not (log_is_stdout and len(seed_list) == 1):  # (else the child's own block is already there)
        log(summary)
    log(verdict)
    if interrupted:
        raise KeyboardInterrupt(interrupted)
    return appended


def audit_outcomes(outcomes: list[RunOutcome], budget: float, verdicts: list[dict] | None = None) -> str | None:
    """The outside timing audit (arun.core.verify.audit_timing) of every run: the first reason one cannot be true."""
    for i, o in enumerate(outcomes):
        if o.result is not None:
            reference = verdicts[i] if verdicts and i < len(verdicts) else None
            reason = audit_timing(o.result, o.wall_seconds, budget, reference=reference)
            if reason:
                return reason
    return None


def reproduce(repo_dir: Path, run_dir: Path, backend: str, outcomes: list[RunOutcome], data_dir: Path,
              device: str | None, timeout: float, budget: float) -> str | None:
    """A keep must be reproduced: each run's saved weights are evaluated by `python -m arun.core.verify`, a
    fresh process running fixed code (the train file is imported for its model only). Returns why the
    claim does not stand, or None. Runs with the lock held, so the train file is the one that ran."""
    verdicts: list[dict] = []
    env = child_env(data_dir, device)
    for i, o in enumerate(outcomes):
        assert o.result is not None
        checkpoint, out = run_dir / f"weights{i}.npz", run_dir / f"verify{i}.json"
        batch = (o.result.get("config") or {}).get("EVAL_BATCH_SIZE")
        batch = batch if isinstance(batch, int) and 0 < batch <= 1024 else 32
        cmd = [sys.executable, "-m", "arun.core.verify", "--backend", backend, "--repo", str(repo_dir),
               "--checkpoint", str(checkpoint), "--batch-size", str(batch), "--out", str(out)]
        try:
            p = subprocess.run(cmd, cwd=repo_dir, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            return f"the harness's re-evaluation of the weights did not finish in {timeout:.0f}s"
        try:
            verdict = json.loads(out.read_text())
        except (OSError, json.JSONDecodeError):
            tail = last_error_line(p.stderr.splitlines() + p.stdout.splitlines())
            return f"the harness's re-evaluation of the weights failed (exit {p.returncode}): {tail}"
        if "invalid" in verdict:
            return f"the harness's re-evaluation: {verdict['invalid']}"
        if "error" in verdict:
            return f"the claim cannot be reproduced: re-evaluating the saved weights ({checkpoint.name}) failed: {verdict['error']}"
        claimed = float(o.result["val_bpb"])
        if not matches(claimed, float(verdict["val_bpb"])):
            return (f"the run claims val_bpb {claimed:.6f}, the harness's re-evaluation of its weights gives "
                    f"{verdict['val_bpb']:.6f}: not reproduced")
        verdicts.append(verdict)
    return audit_outcomes(outcomes, budget, verdicts)


def _result_fields(outcomes: list[RunOutcome], results: list[dict]) -> dict:
    """The measured fields of the record. Seconds are totals over the experiment's runs (one per seed);
    the rest come from the first seed's run."""
    first = results[0] if results else {}
    splits = [overhead_split(o) for o in outcomes if o.result]

    def total(name: str, rows: list[dict]) -> float | None:
        vals = [v for v in (_num(r.get(name)) for r in rows) if v is not None]
        return sum(vals) if vals else None

    memory = [v for v in (_num(r.get("peak_vram_mb")) for r in results) if v is not None]
    return {
        "seeds": [r.get("seed") for r in results] or [o.seed for o in outcomes if o.seed is not None],
        "training_seconds": total("training_seconds", results),
        "total_seconds": sum(o.wall_seconds for o in outcomes),
        "launch_seconds": total("launch_seconds", splits),
        "startup_seconds": total("startup_seconds", splits),
        "warmup_seconds": total("warmup_seconds", splits),
        "eval_seconds": total("eval_seconds", splits),
        "peak_memory_mb": max(memory) if memory else None,
        "mfu_percent": first.get("mfu_percent"),
        "total_tokens": first.get("total_tokens"),
        "tokens_per_second": first.get("tokens_per_second"),
        "num_steps": first.get("num_steps"),
        "num_params": first.get("num_params"),
        "depth": first.get("depth"),
    }


def _summary_values(rec: dict, results: list[dict]) -> dict:
    """Upstream's summary block for the experiment (val_bpb is the mean over seeds)."""
    first = dict(results[0])
    first["val_bpb"] = rec["val_bpb"]
    return first


def _prune_checkpoints(repo_dir: Path, run_dir: Path, rec: dict, best: dict | None) -> None:
    """Weights are kept for the best run of each key only (a checkpoint can be hundreds of MB);
    result JSONs stay for every run."""
    if rec.get("status") == "keep":
        if best and best.get("run_dir"):
            for w in (repo_dir / best["run_dir"]).glob("weights*"):
                w.unlink(missing_ok=True)
    else:
        for w in run_dir.glob("weights*"):
            w.unlink(missing_ok=True)


def verdict_line(rec: dict) -> str:
    val, best, status = rec.get("val_bpb"), rec.get("best_before"), rec["status"]
    where = f"[{rec['tag']}] id {rec['id']}"
    if status == "keep":
        what = "baseline" if rec.get("baseline") else f"improved on {best:.6f} by {best - val:.6f}"
        return f"arun: KEEP {val:.6f} ({what}) -> commit {rec['commit'][:10]} {where}"
    if status == "discard":
        near = " (near miss)" if rec.get("near_miss") else ""
        return (f"arun: DISCARD {val:.6f} vs best {best:.6f}{near}; train file restored to {rec['commit'][:10]} "
                f"{where}")
    restored = ("train file as it was before the run" if str(rec.get("error", "")).startswith("interrupted")
                else f"train file restored to {rec['commit'][:10]}")
    return f"arun: {status.upper()}: {rec.get('error')}; {restored}; see run.log {where}"
