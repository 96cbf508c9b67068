"""
One experiment, end to end: check, run, record, keep or revert.

    engine + data + scope guard (refuse before touching anything)
    -> repo lock -> run branch -> the train file in a subprocess per seed
       (env contract, hard timeout, run.log, progress bar): it trains and exports its forward
    -> the evaluator process scores each exported forward (python -m engines.score)
    -> timing audit -> decision on the evaluator's number against the best record of the same key
    -> commit and store the forward (keep) or restore the best commit's train file, saving the
       attempt (anything else)
    -> one ledger record

The printed summary is for people and for agents written for upstream
(`grep "^val_bpb:" run.log`): only the harness writes it, with the evaluator's number.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from arun.core import confine, forward_store, gitops, runfolder, steplines
from arun.core.attempts import save_attempt
from arun.core.context import ExperimentContext, default_budget, experiment_context
from arun.core.deadline import Limits
from arun.core.early import Stopper, Watch, mean_trajectory
from arun.core.errors import ArunError
from arun.core.heldout import score_test, test_fields
from arun.core.keys import key_difference
from arun.core.ledger import Ledger, new_id
from arun.core.numbers import finite
from arun.core.process import (
    RunOutcome,
    child_env,
    overhead_split,
    run_train_file,
    same_file,
    sigterm_as_interrupt,
)
from arun.core.progress import Progress
from arun.core.ratchet import NEAR_MISS, NO_SPREAD, WITHIN_NOISE, baseline_record, best_record
from arun.core.ratchet import decide as ratchet_decide
from arun.core.record import Record, experiment_record
from arun.core.scoring import score_artifact
from arun.core.steplines import StepLine
from arun.core.timing import (
    audit_timing,
    charged_seconds,
    default_allowance,
    non_training_limit,
    non_training_seconds,
    reference_of,
)
from arun.core.trainfile import constants
from arun_data import held_out
from engines import TRAIN_FILES
from engines.atomic import write_atomic
from engines.fingerprint import fixed_code_sha256, fixed_files
from engines.forward_file import SUFFIX
from engines.summary_block import summary_text


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


MAX_TRAIN_FILE_BYTES = 256 * 1024   # today's train files are ~27 KB


def check_scope(repo_dir: Path, train_file: str) -> None:
    """Only the backend's train file may differ from the run's pinned base commit (HEAD before the
    run branch exists), committed or not; and the fixed code must hash as it did when the run began."""
    gitops.open_repo(repo_dir)
    if not (repo_dir / train_file).exists():
        raise ArunError(f"{repo_dir / train_file} not found; run arun from the project root")
    size = (repo_dir / train_file).stat().st_size
    if size > MAX_TRAIN_FILE_BYTES:   # weights pasted into the source would carry state between runs (SECURITY.md)
        raise ArunError(f"{train_file} is {size // 1024} KB, above the {MAX_TRAIN_FILE_BYTES // 1024} KB cap on a train "
                        f"file; keep it code and hyperparameters (no embedded weights or data)")
    try:
        gitops.file_at(repo_dir, "HEAD", train_file)
    except Exception:  # git's error text is the same point said worse
        raise ArunError(f"{train_file} is not committed; git add {train_file} && git commit -m 'add {train_file}'") from None
    pin = gitops.run_pin(repo_dir)
    base = pin["base"] if pin else gitops.head_sha(repo_dir)
    offending = [p for p in gitops.offending_files(repo_dir, train_file, base if pin else None)
                 if p not in other_train_files(train_file)]
    if offending:
        raise ArunError(scope_message(repo_dir, train_file, base, offending))
    if pin and fixed_code_sha256(repo_dir) != pin["fixed_code_sha256"]:
        raise ArunError(f"the fixed code ({', '.join(fixed_files(repo_dir)[:3])}, ...) no longer hashes as it did when "
                        f"this run began at {base[:10]}; restore it with: git checkout {base[:10]} -- engines arun_data "
                        f"prepare.py, and remove files git ignores there (a change to fixed code needs a new run: "
                        f"arun start NAME)")


def other_train_files(train_file: str) -> set[str]:
    """The other backends' train files: each engine's keeps are its own key's, so a keep with one backend
    on a run branch never blocks a run of the other (both engines on one branch is a normal comparison)."""
    return {f for f in TRAIN_FILES.values() if f != train_file}


def scope_message(repo_dir: Path, train_file: str, base: str, offending: list[str]) -> str:
    """The scope guard's refusal: what differs and the command that restores it (never a commit)."""
    def shown(paths: list[str]) -> str:
        return " ".join(paths[:20]) + (f" (+{len(paths) - 20} more)" if len(paths) > 20 else "")
    old = [p for p in offending if gitops.path_in(repo_dir, base, p)]
    new = [p for p in offending if p not in old]
    fixes = ([f"git checkout {base[:10]} -- {shown(old)}"] if old else []) + ([f"rm {shown(new)}"] if new else [])
    return (f"only {train_file} may differ from the run's base ({base[:10]}), but these do too: {shown(offending)}; "
            f"restore them with: {'; '.join(fixes)} (a change to fixed code needs a new run: arun start NAME)")


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
    verdicts: list[dict] = field(default_factory=list)   # the evaluator's, one per run that exited ok
    allowance: float = 0.0       # non-training seconds a baseline may use (arun.core.timing)
    reference: float | None = None   # the key's baseline's non-training seconds per run (None: this is it)
    interrupted: str | None = None
    watches: list[Watch] = field(default_factory=list)   # each run's loss trajectory (arun.core.early)
    early: dict | None = None    # why a run was stopped early: the evidence (arun.core.early.Stopper)

    def artifact(self, i: int) -> Path:
        """Where run i exports its forward."""
        return self.run_dir / f"forward{i}{SUFFIX[self.ctx.backend]}"

    @property
    def limit(self) -> float:
        """Non-training seconds each run may use before the rest is charged as training."""
        return non_training_limit(self.allowance, self.reference)

    @property
    def results(self) -> list[dict]:
        return [o.result for o in self.outcomes if o.status == "ok" and o.result]

    @property
    def failed(self) -> RunOutcome | None:
        return next((o for o in self.outcomes if o.status != "ok"), None)


# -> (status, near_miss) or (status, near_miss, record fields); status "confirm": re-run with fresh seeds first
DecideFn = Callable[[list[float], "dict | None", list[dict]], tuple]


def run_experiment(repo_dir: Path | str, backend: str, description: str = "", *, budget: float | None = None,
                   seeds: int = 1, device: str | None = None, hard_timeout: float | None = None,
                   show_progress: bool = True, proposer: str | None = None, near_miss: float | None = None,
                   confidence: float | None = None, wait: float = 0.0, allowance: float | None = None,
                   record_sink: Callable[[dict], dict] | None = None, decide_fn: DecideFn | None = None,
                   require_confinement: bool | None = None, extra: dict | None = None,
                   early_stop: Stopper | None = None, log: Callable[[str], None] = print) -> dict:
    """One experiment on the current train file; returns the ledger record it appended.

    record_sink: where the record goes instead of bench/<tag>/ledger.jsonl (the swarm's one writer).
    decide_fn(val_bpb per seed, best record, key's records) -> (status, near_miss): a replacement
    for the plain "strictly lower than the best" rule (e.g. a significance test over seeds).
    allowance: non-training seconds a run may use (default max(60, budget/5); arun.core.timing).
    extra: fields added to the record as they are (e.g. `transfer_from` of arun transfer).
    early_stop: stops a run clearly behind the best (arun.core.early); recorded discard with stopped_at.
    Raises ArunError (nothing touched) for bad input, KeyboardInterrupt after recording an interrupted run."""
    t_begin = time.perf_counter()
    budget, limits = check_limits(seeds, budget, hard_timeout)
    confine.require(require_confinement)
    ctx = guard(repo_dir, backend, budget, device)
    with repo_lock(ctx.repo_dir, wait):
        check_scope(ctx.repo_dir, ctx.train_file)  # again: whoever held the lock may have committed meanwhile
        att = begin(ctx, description, seeds, proposer, confidence, log)
        att.record.update(extra or {})
        att.allowance = default_allowance(ctx.budget, allowance)
        att.record.update({"held_out": held_out(ctx.key.get("dataset"))})  # False: its val rows are readable
        att.reference = reference_of(baseline_record(att.records, ctx.key_id) if att.best else None)
        launch(att, limits, show_progress, early_stop)
        score_runs(att, log)
        status, near, val = decide(att, decide_fn, NEAR_MISS if near_miss is None else near_miss)
        if status == "confirm":
            status, near, val = confirm(att, limits, show_progress, decide_fn, near_miss, log)
        status = score_heldout(att, status, log)
        att.record.update(result_fields(att.outcomes, att.results))
        att.record.update(trajectory_fields(att.watches))
        att.record.update(steplines.note_fields([o.step_lines for o in att.outcomes if o.status == "ok"]))
        att.record.update(score_fields(att))
        att.record.update(confinement_fields(att.outcomes))
        status = keep_artifacts(att, status)
        if status == "invalid" and val is not None:  # a run that broke the rules has no result
            att.record.update({"scored_val_bpb": val})
            val = None
        att.record.update({"status": status, "near_miss": bool(near), "val_bpb": val,
                           "best_before": att.best["val_bpb"] if att.best else None,
                           "run_dir": str(att.run_dir.relative_to(ctx.repo_dir))})
        commit_or_revert(att, keep_ledger=record_sink is None)
        appended = write_record(att, t_begin, record_sink)
        if record_sink is None:
            commit_record(att.ctx, appended, log)
    report(att, appended, log)
    if att.interrupted:
        raise KeyboardInterrupt(att.interrupted)
    return appended


def check_limits(seeds: int, budget: float | None, hard_timeout: float | None) -> tuple[float, Limits]:
    """The budget and when a run is killed (arun.core.deadline), defaulted and checked before anything
    else happens: --timeout counts from the start; by default the clock starts at the first step."""
    if seeds < 1:
        raise ArunError(f"--seeds must be at least 1, got {seeds}")
    budget = default_budget(budget)
    if not math.isfinite(budget) or budget <= 0:
        raise ArunError(f"--budget must be a positive number of seconds, got {budget}")
    if hard_timeout and not (math.isfinite(hard_timeout) and hard_timeout > 0):
        raise ArunError(f"--timeout must be a positive number of seconds, got {hard_timeout}")
    return budget, Limits.for_run(budget, hard_timeout)


def guard(repo_dir: Path | str, backend: str, budget: float, device: str | None) -> ExperimentContext:
    """Every check that can refuse comes before anything is written: engine, data, scope."""
    ctx = experiment_context(repo_dir, backend, budget, device, verify_data=True)
    check_scope(ctx.repo_dir, ctx.train_file)
    if ctx.train_path.is_symlink() or not ctx.train_path.is_file():  # the harness would read what it points at
        raise ArunError(f"{ctx.train_file} is not a plain file (a link?); restore it: git checkout -- {ctx.train_file}")
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
    restore_erased(ctx, branch, log)
    check_missing(ctx, branch, log)
    records = Ledger(ctx.ledger_path).records()
    best = best_record(records, ctx.key_id, stored=forward_store.stored_check(repo_dir))  # unverified keeps never are
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
    if best is None and (other := other_key(records, ctx.key_id)):
        against = (f"baseline run of a new key (differs from key {other['key_id']}: "
                   f"{key_difference(other.get('key') or {}, ctx.key)}; its best {other['val_bpb']:.6f} is not compared)")
    log(f"arun: {ctx.train_file} on {ctx.tag}, {ctx.budget:g}s budget (key {ctx.key_id}), {against}; output in run.log")
    base_seed = config["SEED"] if isinstance(config.get("SEED"), int) else 42
    seed_list: list[int | None] = [None] if seeds <= 1 else [base_seed + i for i in range(seeds)]
    return Attempt(ctx, record, records, best, base_commit, pre_run, run_dir, log_path, log_is_stdout, seed_list)


def restore_erased(ctx: ExperimentContext, branch: str, log: Callable[[str], None]) -> None:
    """Records of this branch that a `git reset` cut from the ledger go back and are committed again
    (arun.core.journal): the ledger is append-only, whatever git is told."""
    restored = Ledger(ctx.ledger_path).restore(branch)
    if not restored:
        return
    ids = ", ".join(str(r.get("id")) for r in restored)
    log(f"arun: put back {len(restored)} record(s) a git reset had erased from {ctx.ledger_path.relative_to(ctx.repo_dir)} "
        f"({ids}); records are never undone, start a new run branch to start afresh (arun start NAME)")
    rel = str(ctx.ledger_path.relative_to(ctx.repo_dir))
    try:
        gitops.commit_keep(ctx.repo_dir, [rel], f"arun: restore {len(restored)} record(s) erased by a git reset")
    except ArunError as e:
        log(f"arun: the restored records are written but not committed ({e}); commit {rel} with git when that is fixed")


def check_missing(ctx: ExperimentContext, branch: str, log: Callable[[str], None]) -> None:
    """Records of this branch that the journal holds and the ledger lost for good (a line edited or cut out,
    a reset past a pruned commit) are said; a lost keep refuses the run, since the best would silently drop."""
    lost = Ledger(ctx.ledger_path).missing(branch)
    if not lost:
        return
    rel = ctx.ledger_path.relative_to(ctx.repo_dir)
    keeps = [str(r.get("id")) for r in lost if r.get("status") == "keep"]
    what = (f"{rel} lacks {len(lost)} record(s) of {branch} that this machine wrote and cannot put back "
            f"({', '.join(str(r.get('id')) for r in lost)}; see arun audit)")
    if keeps:
        raise ArunError(f"{what}, keep(s) {', '.join(keeps)} among them, so the best would silently drop: put the "
                        f"ledger back (git checkout <a commit that has them> -- {rel}) or start a new run branch "
                        f"(arun start NAME)")
    log(f"arun: warning: {what}")


def launch(att: Attempt, limits: Limits, show_progress: bool, early_stop: Stopper | None = None,
           start: int = 0) -> None:
    """The train file, once per seed (from seed_list[start]), each in its own process; stops at the first
    run that fails. Each run's step lines feed its loss trajectory, and early_stop may end it."""
    ctx, n = att.ctx, len(att.seed_list)
    label = f"{ctx.backend} {att.record.description[:40]}".strip()
    with sigterm_as_interrupt(), Progress(show_progress and sys.stdout.isatty(), label) as bar:
        for i, seed in enumerate(att.seed_list):
            if i < start:
                continue
            watch = Watch()
            att.watches.append(watch)

            def should_stop(step: StepLine, watch: Watch = watch) -> str | None:
                return early_stop.check(watch) if watch.add(step) and early_stop is not None else None
            env = child_env(ctx.data.dir, ctx.device, seed, ARUN_TIME_BUDGET=repr(ctx.budget),
                            ARUN_RESULT_JSON=str(att.run_dir / f"result{i}.json"),
                            ARUN_ARTIFACT=str(att.artifact(i)))
            env.pop("ARUN_CHECKPOINT", None)
            if n > 1:
                bar.new_run(f"{label} (seed {seed}, {i + 1}/{n})")
            prefix = f"[seed {seed}] " if n > 1 else ""
            try:
                outcome = run_train_file(ctx.repo_dir, ctx.train_file, env, att.log_path, limits, bar.line,
                                         prefix, seed, att.log_is_stdout, timeout_hint=calibrate_hint(ctx.backend),
                                         should_stop=should_stop)
            except KeyboardInterrupt as e:
                att.interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
                att.outcomes.append(RunOutcome(seed, status="crash", error=f"interrupted ({att.interrupted})"))
                break
            finally:
                # Before anything reads the folder or the next run starts: only the harness's own names
                # stay (data in file names, links, FIFOs and tmp/ go; see arun.core.runfolder).
                runfolder.prune(att.run_dir, runfolder.harness_names(ctx.backend, len(att.seed_list)))
            if outcome.status == "ok" and not att.artifact(i).is_file():
                outcome.status, outcome.error = "crash", "the exported forward is not a plain file (a link or removed)"
            att.outcomes.append(outcome)
            if outcome.status == "stopped" and early_stop is not None:
                att.early = early_stop.evidence
            if outcome.status != "ok":
                break


def calibrate_hint(backend: str) -> str:
    """What to do when the baseline cannot finish on this machine."""
    return f"to size the model for this machine: arun calibrate --backend {backend}"


def score_runs(att: Attempt, log: Callable[[str], None], start: int = 0) -> None:
    """Every run that exited ok is scored by the evaluator process from its exported forward (fixed
    code pinned by the key; the train file never runs there). A forward it cannot score makes the
    run invalid (it looks ahead, does not load, ...); an evaluator that does not finish, a crash."""
    ctx = att.ctx
    t0 = time.perf_counter()
    # A run that may be kept is scored on the held-out test rows in the same evaluator process.
    test_below = att.best["val_bpb"] if att.best else float("inf")
    try:
        with sigterm_as_interrupt():
            for i, o in enumerate(att.outcomes):
                if o.status != "ok" or i < start:
                    continue
                log("arun: scoring the exported forward in the evaluator process"
                    + (f" (seed {o.seed})" if len(att.seed_list) > 1 else ""))
                verdict = score_artifact(ctx.backend, att.artifact(i), ctx.data.dir, att.run_dir / f"score{i}.json",
                                         device=ctx.device, expect_fixed_sha=ctx.key.get("fixed_code_sha256"),
                                         fixed_from=ctx.repo_dir, test_below=test_below)
                att.verdicts.append(verdict)
                if "error" in verdict:
                    reason = str(verdict["error"]).removeprefix("INVALID: ")
                    o.status = "crash" if reason.startswith("the evaluator did not finish") else "invalid"
                    o.error = f"the evaluator refused the exported forward: {reason}"
                    break
    except KeyboardInterrupt as e:
        att.interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        att.outcomes.append(RunOutcome(None, status="crash",
                                       error=f"interrupted ({att.interrupted}) while the harness scored the run"))
    att.record.update({"score_seconds": time.perf_counter() - t0})


def score_heldout(att: Attempt, status: str, log: Callable[[str], None]) -> str:
    """A keep's test_bpb, for the morning report (the ratchet never reads it): from its val verdicts when
    the evaluator already scored the test rows in the same process (a run below the best), else from one
    more evaluator process (arun.core.heldout). Returns the status (crash if interrupted)."""
    if status != "keep":
        return status
    scored = test_fields(att.verdicts)
    if scored is not None:  # (the evaluator already scored the test rows with the val rows)
        att.record.update(scored)
        return status
    try:
        with sigterm_as_interrupt():
            forwards = [att.artifact(i) for i in range(len(att.outcomes))]
            att.record.update(score_test(att.ctx, forwards, att.run_dir, log))
    except KeyboardInterrupt as e:
        att.interrupted = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        att.record.error = f"interrupted ({att.interrupted}) while the harness scored the test rows"
        return "crash"
    return status


def decide(att: Attempt, decide_fn: DecideFn | None, near_miss: float) -> tuple[str, bool, float | None]:
    """(status, near_miss, val_bpb): a failed run is its own status; a scored one is audited, then judged
    on the evaluator's number against the best of its key."""
    failed = att.failed
    if failed is not None:
        att.record.error = failed.error
        if failed.status == "stopped":  # early discard: behind the best mid-run (arun.core.early)
            att.record.update({"stopped_at": (att.early or {}).get("progress"), "early_stop": att.early})
            return "discard", False, None
        return failed.status, False, None
    vals = [float(v["val_bpb"]) for v in att.verdicts]
    val = statistics.fmean(vals)
    att.record.val_bpb_seeds = vals
    why = ("--allowance, the baseline's" if att.reference is None else
           f"the baseline's {att.reference:.1f}s and a margin")
    for o in att.outcomes:
        att.record.error = audit_timing(o.result or {}, o.wall_seconds, att.ctx.budget, att.limit, why)
        if att.record.error:
            return "invalid", False, val
    if decide_fn is not None:
        status, near, *fields = decide_fn(vals, att.best, [r for r in att.records if r.get("key_id") == att.ctx.key_id])
        att.record.update(fields[0] if fields else {})
    else:
        status, near = ratchet_decide(val, att.best, near_miss)
    return status, near, val


# --------------------------------------------------------------------------- early discard and confirmation

def trajectory_fields(watches: list[Watch]) -> dict:
    """The record's loss trajectory: the mean over the runs (seeds), and each run's when there are several."""
    runs = [w.trajectory(final=True) for w in watches]
    if not runs:
        return {}
    return {"loss_trajectory": mean_trajectory(runs), **({"loss_trajectory_seeds": runs} if len(runs) > 1 else {})}


def confirm(att: Attempt, limits: Limits, show_progress: bool, decide_fn: DecideFn | None, near_miss: float | None,
            log: Callable[[str], None]) -> tuple[str, bool, float | None]:
    """A near win (the decider said "confirm"): fresh seeds, one at a time, until the experiment has
    `confirm_seeds` runs, the decider asked again after each; one that decides (the mean is no longer
    below the best) ends it early. Still undecided at the end counts as not confirmed."""
    start = len(att.outcomes)
    total = max(start + 1, int(getattr(decide_fn, "confirm_seeds", 3)))
    config = att.record.config or {}
    base_seed = config["SEED"] if isinstance(config.get("SEED"), int) else 42
    used = {base_seed if s is None else s for s in att.seed_list}
    fresh = [s for s in range(base_seed + 1, base_seed + 1000) if s not in used][:total - start]
    log(f"arun: a near win: confirming with up to {len(fresh)} fresh seed(s) ({', '.join(map(str, fresh))}) "
        "before it is kept")
    status, near, val = "confirm", True, None
    for seed in fresh:
        at = len(att.outcomes)
        att.seed_list = [*att.seed_list, seed]
        launch(att, limits, show_progress, start=at)
        score_runs(att, log, start=at)
        status, near, val = decide(att, decide_fn, NEAR_MISS if near_miss is None else near_miss)
        if status != "confirm":
            break
    if status == "confirm":
        status, near = "discard", True
    return status, near, val


def score_fields(att: Attempt) -> dict:
    """What the evaluator measured, the charged time, and the run's own claims (diagnostics only)."""
    ran = [(o.result, o.wall_seconds) for o in att.outcomes if o.result]
    fields: dict = {"allowance_seconds": att.allowance,
                    # per run: what the baseline needed (the reference), what this run may use, what it used
                    "non_training_reference": att.reference, "non_training_limit": att.limit,
                    "non_training_seconds": max(non_training_seconds(r, wall) for r, wall in ran)
                    if ran else None,
                    "charged_seconds": sum(charged_seconds(r, wall, att.limit)
                                           for r, wall in ran) if att.results else None,
                    "last_step_seconds": max((finite(r.get("last_step_seconds")) or 0.0 for r, _ in ran),
                                             default=None)}
    scored = [v for v in att.verdicts if "val_bpb" in v]
    if scored:
        first = scored[0]
        fields.update({"eval_seconds": sum(sum((v.get("seconds") or {}).values()) for v in scored),
                       "fixed_code_sha256": first.get("fixed_code_sha256"),
                       "artifact_sha256": first.get("artifact_sha256"), "artifact_bytes": first.get("artifact_bytes"),
                       "causality_max_diff": max((v.get("causality") or {}).get("max_diff", 0.0) for v in scored),
                       "eval_batch_size": first.get("batch_size")})
    claims: dict = {}
    for o in att.outcomes:
        for name, value in (o.claimed or {}).items():
            claims.setdefault(name, value)
        v = (o.result or {}).get("val_bpb")
        if "claimed_val_bpb" not in claims and v is not None:
            claims["claimed_val_bpb"] = v if finite(v) is not None else str(v)[:40]
    fields.update(claims)
    return fields


def keep_artifacts(att: Attempt, status: str) -> str:
    """A keep's forwards move to the content-addressed store (checked to be the bytes the evaluator
    scored); every other run's are deleted. Returns the status (invalid if a forward changed)."""
    ctx = att.ctx
    files = [att.artifact(i) for i in range(len(att.outcomes))]
    if status != "keep":
        for f in files:
            f.unlink(missing_ok=True)
        return status
    shas = []
    for f, verdict in zip(files, att.verdicts):
        sha, _ = forward_store.store(ctx.repo_dir, ctx.backend, f)
        if sha != verdict.get("artifact_sha256"):
            att.record.error = "the exported forward changed after the evaluator scored it"
            return "invalid"
        shas.append(sha)
    if len(shas) > 1:
        att.record.update({"artifact_sha256_seeds": shas})
    return status


def commit_or_revert(att: Attempt, keep_ledger: bool) -> None:
    """keep -> commit (the train file, and the ledger unless a sink writes it); anything else -> the
    train file goes back to the best commit (after Ctrl-C: exactly as it was before the run)."""
    ctx, rec = att.ctx, att.record
    if rec.status == "keep" and ctx.train_path.read_bytes() != att.pre_run:
        # Edited while it ran (an agent that did not wait): what is committed is what ran; the edit is saved.
        save_attempt(ctx.repo_dir, ctx.train_path.read_bytes())
        write_atomic(ctx.train_path, att.pre_run)
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
        rec.train_sha256 = save_attempt(ctx.repo_dir, att.pre_run)  # no edit is lost: arun restore ID
        if att.interrupted:
            write_atomic(ctx.train_path, att.pre_run)
        else:
            gitops.restore_train_file(ctx.repo_dir, ctx.train_file, att.base_commit)


def write_record(att: Attempt, t_begin: float, record_sink: Callable[[dict], dict] | None) -> dict:
    """The timing totals, then one ledger line (or the sink's); after a keep, the store's retention."""
    rec = att.record
    wall = time.perf_counter() - t_begin
    rec.wall_seconds = wall
    scoring = rec.extra.get("score_seconds") or 0.0
    rec.bookkeeping_seconds = max(0.0, wall - sum(o.wall_seconds for o in att.outcomes) - scoring)
    rec.overhead_seconds = wall - (rec.training_seconds or 0.0)
    line = rec.to_json()
    appended = record_sink(line) if record_sink else Ledger(att.ctx.ledger_path).append(line)
    if appended.get("status") == "keep":  # (every branch's keeps: retention never depends on the checkout)
        forward_store.retain(att.ctx.repo_dir, forward_store.every_record(att.ctx.repo_dir, [appended] if record_sink else []))
    return appended


def commit_record(ctx: ExperimentContext, rec: dict, log: Callable[[str], None]) -> None:
    """The ledger line rides in its own commit after every experiment (gitops.commit_record)."""
    problem = gitops.commit_record(ctx.repo_dir, ctx.ledger_path, rec)
    if problem:
        log(problem)


def report(att: Attempt, appended: dict, log: Callable[[str], None]) -> None:
    """Upstream's summary block (the evaluator's val_bpb; only for a scored, valid run) and the verdict,
    to the log and to run.log. The train process's own summary-looking lines were neutralised."""
    scored = att.results and att.failed is None and appended.get("val_bpb") is not None
    summary = summary_text(_summary_values(appended, att.results)) if scored else None
    verdict = verdict_line(appended, other_key(att.records, att.ctx.key_id) if att.best is None else None)
    if appended.get("step_line_note"):  # before the verdict, which stays the last line
        verdict = f"arun: note: {appended['step_line_note']}\n{verdict}"
    if not att.log_is_stdout:  # (when stdout is run.log, the lines below land there anyway)
        with open(att.log_path, "a", encoding="utf-8") as f:
            if summary:
                f.write(summary + "\n")
            f.write(verdict + "\n")
    if summary:
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
        "export_seconds": total("export_seconds", splits),
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


def other_key(records: list[dict], key_id: str) -> dict | None:
    """The best record of the key this ledger used last, when that is not `key_id` (a new key starts)."""
    for r in reversed(records):
        if r.get("key_id") not in (None, key_id):
            return best_record(records, r["key_id"])
    return None


def verdict_line(rec: dict, other: dict | None = None) -> str:
    """The run's last line. A key's first run is its BASELINE, not a KEEP: it was compared with nothing
    (other: the best of the key used before, named so a changed --budget does not read as a win)."""
    val, best, status = rec.get("val_bpb"), rec.get("best_before"), rec["status"]
    where = f"[{rec['tag']}] id {rec['id']}"
    if status == "keep" and (rec.get("baseline") or best is None):  # (a baseline has no best before it)
        why = f"first run of key {rec.get('key_id')}"
        if other:
            why += (f": {key_difference(other.get('key') or {}, rec.get('key') or {})}; key {other['key_id']}'s best "
                    f"is {other['val_bpb']:.6f}, not compared")
        return f"arun: BASELINE {val:.6f} ({why}) -> commit {rec['commit'][:10]} {where}"
    how = confirmation_words(rec.get("confirmation"))
    if status == "keep" and val is not None:
        what = f"improved on {best:.6f} by {best - val:.6f}"
        return f"arun: KEEP {val:.6f} ({what}{f'; {how}' if how else ''}) -> commit {rec['commit'][:10]} {where}"
    if status == "discard" and val is None:  # stopped early: never scored (arun.core.early)
        return (f"arun: DISCARD ({rec.get('error')}); train file restored to {rec['commit'][:10]} {where}; "
                f"restore: arun restore {rec['id']}")
    if status == "discard":
        near = (f" ({how})" if how else "") + (" (near miss)" if rec.get("near_miss") else "")
        return (f"arun: DISCARD {val:.6f} vs best {best:.6f}{near}; train file restored to {rec['commit'][:10]} "
                f"{where}; restore: arun restore {rec['id']}")
    restored = ("train file as it was before the run" if str(rec.get("error", "")).startswith("interrupted")
                else f"train file restored to {rec['commit'][:10]}")
    return f"arun: {status.upper()}: {rec.get('error')}; {restored}; see run.log {where}; restore: arun restore {rec['id']}"


def confirmation_words(conf: dict | None) -> str:
    """How a keep was decided: "kept (clear win)", "confirmed over 3 seeds" or "not confirmed over 3 seeds"."""
    if not isinstance(conf, dict) or not conf.get("verdict"):
        return ""
    if conf["verdict"] == "clear win":
        return "kept (clear win)"
    seeds = conf.get("seeds")
    if conf["verdict"] == NO_SPREAD:
        return "kept by the plain rule: no spread measured for this key (arun noise)"
    if conf["verdict"] == WITHIN_NOISE:
        if isinstance(seeds, int) and seeds > 1:
            return f"within the noise after {seeds} seeds: too small a win for more seeds to confirm, stopped there"
        return "within the noise: too small a win for fresh seeds to confirm, not re-run"
    return f"{conf['verdict']} over {seeds} seed{'s' if seeds != 1 else ''}"
