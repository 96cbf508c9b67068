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
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock, Timeout

from arun.core import confine, gitops
from arun.core.context import ExperimentContext, default_budget, experiment_context
from arun.core.errors import ArunError
from arun.core.ledger import Ledger, new_id
from arun.core.process import (RunOutcome, child_env, finite, overhead_split, run_train_file, same_file,
                               sigterm_as_interrupt)
from arun.core.progress import Progress
from arun.core.ratchet import NEAR_MISS, best_record
from arun.core.ratchet import decide as ratchet_decide
from arun.core.record import Record, experiment_record
from arun.core.reproduce import audit_outcomes, reproduce
from arun.core.trainfile import constants
from engines.report import summary_text


def default_hard_timeout(budget: float) -> float:
    """Budget plus an allowance for start-up, compilation and evaluation: at the default 300 s budget
    this is upstream's "if a run exceeds 10 minutes, kill it"."""
    return budget + max(120.0, budget)


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


def train_constants(text: str) -> dict:
    """The hyperparameter block as a dict for the record: literals and arithmetic such as 2**19 evaluated,
    anything else kept as its source text."""
    return constants(text, keep_source=True)


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


# --------------------------------------------------------------------------- the experiment, in stages

@dataclass
class Attempt:
    """One experiment's state as it moves through the stages (inside the repo lock)."""
    ctx: ExperimentContext
    record: Record
    records: list[dict]          # the ledger as it stood when the experiment began
    best: dict | None
    base_commit: str             # the best commit of the key (HEAD before the baseline)
    pre_run: bytes               # the train file that runs
    run_dir: Path
    log_path: Path
    log_is_stdout: bool
    seed_list: list[int | None]
    outcomes: list[RunOutcome] = field(default_factory=list)
    interrupted: str | None = None

    @property
    def results(self) -> list[dict]:
        return [o.result for o in self.outcomes if o.status == "ok" and o.result]

    @property
    def failed(self) -> RunOutcome | None:
        return next((o for o in self.outcomes if o.status != "ok"), None)


DecideFn = Callable[[list[float], "dict | None", list[dict]], tuple[str, bool]]


def run_experiment(repo_dir: Path | str, backend: str, description: str = "", *, budget: float | None = None,
                   seeds: int = 1, device: str | None = None, hard_timeout: float | None = None,
                   show_progress: bool = True, proposer: str | None = None, near_miss: float | None = None,
                   confidence: float | None = None, wait: float = 0.0,
                   record_sink: Callable[[dict], dict] | None = None, decide_fn: DecideFn | None = None,
                   require_confinement: bool | None = None, log: Callable[[str], None] = print) -> dict:
    """One experiment on the current train file; returns the ledger record it appended.

    record_sink: where the record goes instead of bench/<tag>/ledger.jsonl (the swarm's one writer).
    decide_fn(val_bpb per seed, best record, key's records) -> (status, near_miss): a replacement
    for the plain "strictly lower than the best" rule (e.g. a significance test over seeds).
    Raises ArunError (nothing touched) for bad input, KeyboardInterrupt after recording an interrupted run."""
    t_begin = time.perf_counter()
    budget, hard_timeout = check_limits(seeds, budget, hard_timeout)
    confine.require(require_confinement)
    ctx = guard(repo_dir, backend, budget, device)
    with repo_lock(ctx.repo_dir, wait):
        check_scope(ctx.repo_dir, ctx.train_file)  # again: whoever held the lock may have committed meanwhile
        att = begin(ctx, description, seeds, proposer, confidence, log)
        launch(att, hard_timeout, show_progress)
        status, near, val = decide(att, decide_fn, NEAR_MISS if near_miss is None else near_miss)
        if status == "keep":
            status, near = reproduce_keep(att, hard_timeout, log)
        att.record.update(result_fields(att.outcomes, att.results))
        att.record.update(confinement_fields(att.outcomes))
        if status == "invalid" and val is not None:  # a number the harness could not stand behind is not a result
            att.record.update({"claimed_val_bpb": val})
            val = None
        att.record.update({"status": status, "near_miss": bool(near), "val_bpb": val,
                           "best_before": att.best["val_bpb"] if att.best else None,
                           "run_dir": str(att.run_dir.relative_to(ctx.repo_dir))})
        commit_or_revert(att, keep_ledger=record_sink is None)
        appended = write_record(att, t_begin, record_sink)
    report(att, appended, log)
    if att.interrupted:
        raise KeyboardInterrupt(att.interrupted)
    return appended


def check_limits(seeds: int, budget: float | None, hard_timeout: float | None) -> tuple[float, float]:
    """The budget and the hard timeout, defaulted and checked before anything else happens."""
    if seeds < 1:
        raise ArunError(f"--seeds must be at least 1, got {seeds}")
    budget = default_budget(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise ArunError(f"--budget must be a positive number of seconds, got {budget}")
    hard_timeout = float(hard_timeout) if hard_timeout else default_hard_timeout(budget)
    if hard_timeout <= 0:
        raise ArunError(f"--timeout must be positive, got {hard_timeout}")
    return budget, hard_timeout


def guard(repo_dir: Path | str, backend: str, budget: float, device: str | None) -> ExperimentContext:
    """Every check that can refuse comes before anything is written: engine, data, scope."""
    ctx = experiment_context(repo_dir, backend, budget, device, verify_data=True)
    check_scope(ctx.repo_dir, ctx.train_file)
    return ctx


def begin(ctx: ExperimentContext, description: str, seeds: int, proposer: str | None,
          confidence: float | None, log: Callable[[str], None]) -> Attempt:
    """The run branch, the best of the key, the undecided record, the run folder and run.log."""
    repo_dir = ctx.repo_dir
    banner = confine.banner()  # the run's first line: whether the OS confines the train process
    log(banner)
    branch, created = gitops.ensure_run_branch(repo_dir)
    if created:
        log(f"arun: created run branch {branch} from {gitops.head_sha(repo_dir)[:10]} (experiments are committed there)")
    records = Ledger(ctx.ledger_path).records()
    best = best_record(records, ctx.key_id)
    head = gitops.head_sha(repo_dir)
    base_commit = best["commit"] if best else head
    if best and not gitops.commit_exists(repo_dir, base_commit):
        raise ArunError(f"the best commit {base_commit[:10]} of this key ({ctx.key_id}, val_bpb {best['val_bpb']:.6f}) "
                        f"is not in this repository; git fetch the branch that has it")
    pre_run = ctx.train_path.read_bytes()
    config = train_constants(pre_run.decode("utf-8", errors="replace"))
    description = description.strip().splitlines()[0] if description.strip() else ("baseline" if best is None else "")
    record = experiment_record(ctx, id=new_id(), branch=branch, head=head, base=base_commit, train=pre_run,
                               diff=gitops.diff_against(repo_dir, base_commit, ctx.train_file),
                               description=description, best=best, proposer=proposer, config=config,
                               confidence=confidence)
    run_dir = repo_dir / ".arun" / "runs" / str(record.id)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = repo_dir / "run.log"
    log_is_stdout = same_file(sys.stdout, log_path)
    if not log_is_stdout:
        log_path.write_text(banner + "\n")
    against = "baseline run" if best is None else f"best so far {best['val_bpb']:.6f}"
    log(f"arun: {ctx.train_file} on {ctx.tag}, {ctx.budget:g}s budget (key {ctx.key_id}), {against}; output in run.log")
    base_seed = config["SEED"] if isinstance(config.get("SEED"), int) else 42
    seed_list: list[int | None] = [None] if seeds <= 1 else [base_seed + i for i in range(seeds)]
    return Attempt(ctx, record, records, best, base_commit, pre_run, run_dir, log_path, log_is_stdout, seed_list)


def launch(att: Attempt, hard_timeout: float, show_progress: bool) -> None:
    """The train file, once per seed, each in its own process; stops at the first run that fails."""
    ctx, n = att.ctx, len(att.seed_list)
    label = f"{ctx.backend} {att.record.description[:40]}".strip()
    with sigterm_as_interrupt(), Progress(show_progress and sys.stdout.isatty(), label) as bar:
        for i, seed in enumerate(att.seed_list):
            env = child_env(ctx.data.dir, ctx.device, seed, ARUN_TIME_BUDGET=repr(ctx.budget),
                            ARUN_RESULT_JSON=str(att.run_dir / f"result{i}.json"),
                            ARUN_CHECKPOINT=str(att.run_dir / f"weights{i}.npz"))
            if n > 1:
                bar.new_run(f"{label} (seed {seed}, {i + 1}/{n})")
            prefix = f"[seed {seed}] " if n > 1 else ""
            try:
                outcome = run_train_file(ctx.repo_dir, ctx.train_file, env, att.log_path, hard_timeout, bar.line,
                                         prefix, seed, att.log_is_stdout)
            except KeyboardInterrupt as e:
                att.interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
                att.outcomes.append(RunOutcome(seed, status="crash", error=f"interrupted ({att.interrupted})"))
                break
            att.outcomes.append(outcome)
            if outcome.status != "ok":
                break


def decide(att: Attempt, decide_fn: DecideFn | None, near_miss: float) -> tuple[str, bool, float | None]:
    """(status, near_miss, val_bpb): a failed run is its own status; a scored one is audited, then judged
    against the best of its key."""
    failed = att.failed
    if failed is not None:
        att.record.error = failed.error
        return failed.status, False, None
    vals = [float(r["val_bpb"]) for r in att.results]
    val = statistics.fmean(vals)
    att.record.val_bpb_seeds = vals
    att.record.error = audit_outcomes(att.outcomes, att.ctx.budget)
    if att.record.error:
        return "invalid", False, val
    if decide_fn is not None:
        status, near = decide_fn(vals, att.best, [r for r in att.records if r.get("key_id") == att.ctx.key_id])
    else:
        status, near = ratchet_decide(val, att.best, near_miss)
    return status, near, val


def reproduce_keep(att: Attempt, hard_timeout: float, log: Callable[[str], None]) -> tuple[str, bool]:
    """A keep stands only when fixed code gets the same number from the saved weights."""
    ctx = att.ctx
    if ctx.train_path.read_bytes() != att.pre_run:
        # Edited while it ran (an agent that did not wait): what is checked and committed is what ran.
        log(f"arun: {ctx.train_file} changed during the run; keeping the version that ran, your edit is dropped")
        gitops.write_atomic(ctx.train_path, att.pre_run)
    status: tuple[str, bool] = ("keep", False)
    t_verify = time.perf_counter()
    try:
        with sigterm_as_interrupt():
            log("arun: reproducing the result: re-evaluating the saved weights with fixed code")
            att.record.error = reproduce(ctx.repo_dir, att.run_dir, ctx.backend, att.outcomes, ctx.data.dir,
                                         ctx.device, hard_timeout, ctx.budget)
    except KeyboardInterrupt as e:
        att.interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        status = ("crash", False)
        att.record.error = f"interrupted ({att.interrupted}) while the harness reproduced the result"
    else:
        if att.record.error:
            status = ("invalid", False)
    att.record.update({"verify_seconds": time.perf_counter() - t_verify})
    return status


def commit_or_revert(att: Attempt, keep_ledger: bool) -> None:
    """keep -> commit (the train file, and the ledger unless a sink writes it); anything else -> the
    train file goes back to the best commit (after Ctrl-C: exactly as it was before the run)."""
    ctx, rec = att.ctx, att.record
    if rec.status == "keep":
        message = (f"{rec.description or 'arun keep'}\n\narun: val_bpb {rec.val_bpb:.6f} on {ctx.tag} "
                   f"(key {ctx.key_id}, id {rec.id})")
        paths = [ctx.train_file] + ([str(ctx.ledger_path.relative_to(ctx.repo_dir))] if keep_ledger else [])
        try:
            rec.commit = gitops.commit_keep(ctx.repo_dir, paths, message)
        except ArunError as e:  # the run is still recorded, as a crash of the harness's commit
            rec.status, rec.near_miss, rec.error = "crash", False, str(e)
    if rec.status != "keep":
        rec.commit = att.base_commit
        if att.interrupted:
            gitops.write_atomic(ctx.train_path, att.pre_run)
        else:
            gitops.restore_train_file(ctx.repo_dir, ctx.train_file, att.base_commit)


def write_record(att: Attempt, t_begin: float, record_sink: Callable[[dict], dict] | None) -> dict:
    """The timing totals, then one ledger line (or the sink's); weights kept for the best run only."""
    rec = att.record
    wall = time.perf_counter() - t_begin
    rec.wall_seconds = wall
    rec.bookkeeping_seconds = max(0.0, wall - sum(o.wall_seconds for o in att.outcomes))
    rec.overhead_seconds = wall - (rec.training_seconds or 0.0)
    line = rec.to_json()
    appended = record_sink(line) if record_sink else Ledger(att.ctx.ledger_path).append(line)
    _prune_checkpoints(att.ctx.repo_dir, att.run_dir, appended, att.best)
    return appended


def report(att: Attempt, appended: dict, log: Callable[[str], None]) -> None:
    """Upstream's summary block and the verdict, to the log and to run.log."""
    summary = summary_text(_summary_values(appended, att.results)) if att.results and att.failed is None else None
    verdict = verdict_line(appended)
    several = len(att.seed_list) > 1
    if not att.log_is_stdout:  # (when stdout is run.log, the lines below land there anyway)
        with open(att.log_path, "a", encoding="utf-8") as f:
            if summary and several:
                f.write(summary + "\n")  # the children's blocks are prefixed by seed; this one is the experiment's
            f.write(verdict + "\n")
    if summary and not (att.log_is_stdout and not several):  # (else the child's own block is already there)
        log(summary)
    log(verdict)


def result_fields(outcomes: list[RunOutcome], results: list[dict]) -> dict:
    """The measured fields of the record. Seconds are totals over the experiment's runs (one per seed);
    the rest come from the first seed's run."""
    first = results[0] if results else {}
    splits = [overhead_split(o) for o in outcomes if o.result]

    def total(name: str, rows: list[dict]) -> float | None:
        vals = [v for v in (finite(r.get(name)) for r in rows) if v is not None]
        return sum(vals) if vals else None

    memory = [v for v in (finite(r.get("peak_vram_mb")) for r in results) if v is not None]
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


def confinement_fields(outcomes: list[RunOutcome]) -> dict:
    """confined only when every run of the experiment was; confinement says how, or why not."""
    ran = [o for o in outcomes if o.confinement]
    if not ran:
        ok, how = confine.state()
        return {"confined": False, "confinement": f"not run ({how})" if ok else how}
    loose = next((o for o in ran if not o.confined), None)
    return {"confined": loose is None, "confinement": (loose or ran[0]).confinement}


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
