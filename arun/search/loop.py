"""
`arun loop`: the unattended research loop.

    baseline (once per key) -> [ propose -> check -> run_experiment -> keep/revert ] x N

Each iteration asks a proposer (an external coding agent, or the built-in sweep) for one
change to the backend's train file, checks what it changed (only the train file may change;
anything else is reverted and the attempt recorded `invalid`; no change, or a train file
already scored, is recorded `invalid` without running), then runs it through
`arun.core.experiment.run_experiment` -- exactly what `arun --backend X` does.

Unattended safety: the agent's wall-clock limit is enforced (process group killed); after
`max_crashes` consecutive iterations without a score (crash, timeout or invalid) the loop
stops; Ctrl-C or SIGTERM ends it at a clean point with the train file at the best commit;
every ending prints the summary of the loop's experiments.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arun.core import confine as confinement
from arun.core import gitops
from arun.core.context import ExperimentContext, cached_context, open_data
from arun.core.early import Stopper, make_stopper, rate_code_edits
from arun.core.errors import ArunError
from arun.core.experiment import DecideFn, check_scope, repo_lock, run_experiment, train_constants
from arun.core.ledger import Ledger, new_id, read_records
from arun.core.process import sigterm_as_interrupt
from arun.core.ratchet import NEAR_MISS, SCORED, baseline_record, best_record, key_records
from arun.core.record import invalid_record
from arun.core.trainfile import constants
from arun.report.summary import report
from arun.search.noise import load_noise, measure_noise, measured_spread, significance_decider
from arun.search.policy import CONFIRM_SEEDS, ConfirmingDecider
from arun.search.proposers import DEFAULT_AGENT_TIMEOUT, AgentProposer, Context, Proposal
from arun.search.sweep import Sweep
from engines.atomic import write_atomic

DEFAULT_MAX_CRASHES = 3


def make_proposer(spec: str, *, repo_dir: Path | str | None = None, backend: str | None = None, seed: int = 0,
                  agent_timeout: float = DEFAULT_AGENT_TIMEOUT) -> Any:
    """`sweep` -> the built-in TPE sweep; anything else -> an external agent command."""
    spec = (spec or "").strip()
    if spec == "sweep":
        try:
            import optuna  # noqa: F401 - optional dependency, imported lazily: only the sweep needs it
        except ImportError:
            raise ArunError("--agent sweep needs optuna; install it with: pip install -e '.[sweep]'") from None
        return Sweep(seed=seed)
    return AgentProposer(spec, timeout=agent_timeout)


# --------------------------------------------------------------------------- what a proposer changed

@dataclass
class RepoState:
    branch: str | None
    head: str
    train: bytes


def snapshot(repo_dir: Path, train_file: str) -> RepoState:
    return RepoState(gitops.current_branch(repo_dir), gitops.head_sha(repo_dir), (repo_dir / train_file).read_bytes())


def restore_head(repo_dir: Path, pre: RepoState) -> list[str]:
    """An agent that committed or switched branches: the branch and HEAD go back to where they were
    (the working tree keeps its files, so its changes are judged like uncommitted ones). Returns the
    files its commits touched."""
    repo = gitops.open_repo(repo_dir)
    now_branch, now_head = gitops.current_branch(repo_dir), gitops.head_sha(repo_dir)
    if now_branch == pre.branch and now_head == pre.head:
        return []
    touched = repo.git.diff("--name-only", pre.head, now_head).split("\n") if now_head != pre.head else []
    if pre.branch:
        repo.git.update_ref(f"refs/heads/{pre.branch}", pre.head)
        repo.git.symbolic_ref("HEAD", f"refs/heads/{pre.branch}")
    else:
        repo.git.update_ref("--no-deref", "HEAD", pre.head)
    repo.git.reset("-q")  # index = HEAD; the working tree is left as the agent made it
    return [t for t in touched if t]


def revert_all(repo_dir: Path, train_file: str, pre: RepoState, keep_dir: Path | None = None) -> list[str]:
    """Undoes everything since `pre`: HEAD and branch, every changed or new file outside bench/ and
    .arun/ (tracked files back to HEAD, new files removed), and the train file. Nothing is lost: the
    versions it reverts are moved (new files) or copied (changed ones) under keep_dir when given.
    Returns what it reverted."""
    committed = restore_head(repo_dir, pre)
    repo = gitops.open_repo(repo_dir)
    offending = gitops.offending_files(repo_dir, train_file)
    for rel in offending:
        path = repo_dir / rel
        try:
            gitops.file_at(repo_dir, "HEAD", rel)
            in_head = True
        except Exception:  # not in HEAD: a new file
            in_head = False
        if keep_dir is not None and (path.is_file() or path.is_symlink()):
            (keep_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, keep_dir / rel, follow_symlinks=False)
        if in_head:
            repo.git.checkout("HEAD", "--", rel)
        else:
            repo.git.rm("--cached", "-q", "--ignore-unmatch", "--", rel)
            if path.is_symlink() or path.is_file():
                path.unlink()
            with contextlib.suppress(OSError):  # empty folders the agent made go too
                parent = path.parent
                while parent != repo_dir and not any(parent.iterdir()):
                    parent.rmdir()
                    parent = parent.parent
    repo.git.reset("-q", "--", train_file)  # unstage, if the agent staged it
    write_atomic(repo_dir / train_file, pre.train)
    return sorted(set(offending) | (set(committed) - {train_file}))


# --------------------------------------------------------------------------- one iteration

def iteration(repo_dir: Path | str, backend: str, proposer: Any, *, ledger: Any = None, budget: float | None = None,
              device: str | None = None, seeds: int = 1, confidence: float | None = None,
              near_miss: float | None = None, hard_timeout: float | None = None, show_progress: bool = True,
              allowance: float | None = None, on_proposal: Callable[[str, str], Any] | None = None, log: Callable[[str], None] = print,
              number: int = 1, noise_std: float | None = None, noise: dict | None = None, early_stop: bool = True,
              confirm: bool = True) -> dict:
    """One experiment of the loop; returns its ledger record. `ledger`: an object with records() and
    append(record) (the swarm's), else the repo's own ledger. Raises KeyboardInterrupt after cleaning up.
    early_stop: stop a run clearly behind the best (arun.core.early); confirm: a near win is re-run
    with fresh seeds before it is kept (arun.search.policy). noise_std, noise: the key's measured spread
    and its whole noise.json entry (the early stop's margins) where repo_dir has none (a swarm worktree)."""
    repo_dir = Path(repo_dir).resolve()
    info = cached_context(repo_dir, backend, budget, device)
    train_file, kid = info.train_file, info.key_id
    recs = key_records(read_records(repo_dir, info.tag, ledger), kid)
    best = best_record(recs, kid)
    decide_fn: DecideFn | None = None
    near = NEAR_MISS if near_miss is None else near_miss
    if confirm:
        decide_fn = ConfirmingDecider(confidence, repo_dir=repo_dir, noise_std=noise_std, log=log, near_miss=near)
    elif confidence:
        decide_fn = significance_decider(confidence, repo_dir=repo_dir, noise_std=noise_std, log=log, near_miss=near)
    name = getattr(proposer, "name", "proposer")

    def run(description: str, early_stop: Stopper | None = None) -> dict:
        return run_experiment(repo_dir, backend, description, proposer=name, early_stop=early_stop, budget=budget,
                              seeds=seeds, device=device, hard_timeout=hard_timeout, show_progress=show_progress,
                              allowance=allowance, near_miss=near_miss, confidence=confidence, decide_fn=decide_fn,
                              log=log, record_sink=ledger.append if ledger is not None else None)

    if best is None:
        log(f"arun loop: no baseline yet for {info.tag} (key {kid}); running {train_file} as it is")
        if on_proposal:
            on_proposal("baseline", "")
        return run("baseline")

    ctx = Context(repo_dir=repo_dir, backend=backend, train_file=train_file, key_id=kid, tag=info.tag,
                  records=recs, best=best, baseline=baseline_record(recs, kid), seq_len=info.seq_len,
                  iteration=number, budget=info.budget)
    # Anything but the train file already out of place is not the proposer's doing: refuse rather than revert it.
    check_scope(repo_dir, train_file)
    pre = snapshot(repo_dir, train_file)
    log(f"arun loop: iteration {number}: asking {name} for a change to {train_file} "
        f"(best {best['val_bpb']:.6f})")
    t0 = time.monotonic()
    try:
        # The repo lock is held while the proposer works, so an agent that runs `arun` itself is refused.
        with repo_lock(repo_dir, wait=60.0):
            proposal: Proposal = proposer.propose(ctx)
    except KeyboardInterrupt:
        revert_all(repo_dir, train_file, pre)
        raise
    except ArunError:
        revert_all(repo_dir, train_file, pre)
        raise
    except Exception as e:  # a broken proposer is an invalid attempt, not a dead loop
        proposal = Proposal(description=name, error=f"{name} failed: {type(e).__name__}: {e}"[:500])
    seconds = proposal.seconds or (time.monotonic() - t0)
    base = best["commit"]
    committed = restore_head(repo_dir, pre)
    new = (repo_dir / train_file).read_bytes()
    diff = gitops.diff_against(repo_dir, base, train_file)
    pin = gitops.run_pin(repo_dir)  # the same guard as check_scope: against the run's pinned base
    outside = sorted(set(gitops.offending_files(repo_dir, train_file, pin["base"] if pin else None))
                     | (set(committed) - {train_file}))
    extra = {k: v for k, v in proposal.extra.items() if k.startswith("agent_")}

    def invalid(error: str) -> dict:
        rec = invalid_record(info, id=new_id(), branch=gitops.current_branch(repo_dir), head=gitops.head_sha(repo_dir),
                             base=base, train=new, diff=diff, description=proposal.description, best=best,
                             proposer=name, config=constants(new.decode("utf-8", errors="replace")), error=error,
                             seconds=seconds, extra=extra).to_json()
        appended = ledger.append(rec) if ledger is not None else Ledger(info.ledger_path).append(rec)
        if ledger is None and (problem := gitops.commit_record(repo_dir, info.ledger_path, appended)):
            log(problem)
        log(f"arun: INVALID: {error}; train file restored to {base[:10]} [{info.tag}] id {appended['id']}")
        return appended

    if proposal.error:
        revert_all(repo_dir, train_file, pre)
        return invalid(proposal.error)
    if outside:
        keep = Path(".arun") / "reverted" / time.strftime("%Y%m%d-%H%M%S")
        revert_all(repo_dir, train_file, pre, keep_dir=repo_dir / keep)
        shown = ", ".join(outside[:20]) + (f" (+{len(outside) - 20} more)" if len(outside) > 20 else "")
        return invalid(f"changed files outside {train_file}: {shown} (all reverted; the changed versions are in {keep}/)")
    if new == pre.train:
        revert_all(repo_dir, train_file, pre)
        return invalid(extra.get("agent_error") or "agent made no change")
    sha = hashlib.sha256(new).hexdigest()
    again = next((r for r in recs if r.get("train_sha256") == sha and r.get("status") in ("keep", "discard", "crash", "timeout")), None)
    if again is not None:
        revert_all(repo_dir, train_file, pre)
        v = again.get("val_bpb")
        return invalid(f"this exact train file was already scored: id {again.get('id')} ({again.get('status')}"
                       f"{f', val_bpb {v:.6f}' if isinstance(v, (int, float)) else ''})")
    repo = gitops.open_repo(repo_dir)
    repo.git.reset("-q", "--", train_file)  # staged by the agent: back to a plain working-tree change
    log(f"arun loop: proposal: {proposal.description}")
    if on_proposal:
        on_proposal(proposal.description, diff)
    stopper = stopper_for(repo_dir, backend, budget, device, log, ledger, noise) if early_stop else None
    return run(proposal.description, early_stop=stopper)


def stopper_for(repo_dir: Path | str, backend: str, budget: float | None, device: str | None,
                log: Callable[[str], None] = print, ledger: Any = None, noise: dict | None = None) -> Any:
    """The early-stop rule for the current train file against the best of its key (None: no stop), with
    the margins of `noise` (a noise.json entry) or else of the key's entry under repo_dir."""
    info = cached_context(Path(repo_dir).resolve(), backend, budget, device)
    recs = key_records(read_records(Path(repo_dir), info.tag, ledger), info.key_id)
    text = (Path(repo_dir) / info.train_file).read_text(encoding="utf-8", errors="replace")
    best = best_record(recs, info.key_id)
    try:  # the best's file as it ran: edits to rate-setting code outside the constants protect the run
        best_text = gitops.file_at(repo_dir, best["commit"], info.train_file).decode("utf-8", "replace") if best else text
    except Exception:  # (its commit is not here: the constants alone decide)
        best_text = text
    return make_stopper(best, baseline_record(recs, info.key_id), train_constants(text),
                        noise if noise is not None else load_noise(repo_dir, info.tag, info.key_id), log=log,
                        code_edits=rate_code_edits(best_text, text))


# --------------------------------------------------------------------------- the loop

@dataclass
class LoopResult:
    reason: str                          # done | hours | crashes | baseline | interrupted | error
    records: list[dict] = field(default_factory=list)
    summary: str = ""


def spread_missing(repo_dir: Path, info: ExperimentContext, seeds: int, confidence: float | None) -> bool:
    """--confidence with one seed tests against the key's measured spread alone: is none stored?"""
    return confidence is not None and seeds < 2 and measured_spread(repo_dir, info.tag, info.key_id) is None


def preflight(repo_dir: Path, backend: str, budget: float | None, device: str | None, seeds: int,
              confidence: float | None, log: Callable[[str], None], *, measures: bool = False) -> ExperimentContext:
    """Everything that can refuse before the first iteration: engine, data, scope, a clean train file,
    and whether --confidence has a spread to test against (`measures`: the loop will measure one
    before its first proposal, see spread_measured)."""
    confinement.require()  # (ARUN_REQUIRE_CONFINEMENT, set by --require-confinement)
    info = cached_context(repo_dir, backend, budget, device)
    open_data(verify=True)
    train_file = info.train_file
    check_scope(repo_dir, train_file)
    best = best_record(read_records(repo_dir, info.tag), info.key_id)
    base = best["commit"] if best else gitops.head_sha(repo_dir)
    try:
        committed = gitops.file_at(repo_dir, base, train_file)
    except Exception:
        raise ArunError(f"the best commit {base[:10]} is not in this repository; git fetch the branch that has it") from None
    if (repo_dir / train_file).read_bytes() != committed:
        raise ArunError(f"{train_file} has edits that are not the best commit ({base[:10]}); run them once "
                        f"(arun --backend {backend} -m '...') or revert them (git checkout {base[:10]} -- {train_file}) "
                        f"before starting the loop")
    if confidence is not None:
        if not 0 < confidence < 1:
            raise ArunError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
        if not measures and spread_missing(repo_dir, info, seeds, confidence):
            raise ArunError(f"--confidence with one seed needs the run-to-run noise of this key: measure it with "
                            f"arun noise --backend {backend} --seeds 5 (or pass --seeds 2 or more)")
    return info


def run_loop(repo_dir: Path | str, backend: str, agent: str | Any = "sweep", *, iterations: int | None = None,
             hours: float | None = None, seeds: int = 1, confidence: float | None = None, budget: float | None = None,
             device: str | None = None, hard_timeout: float | None = None,
             agent_timeout: float = DEFAULT_AGENT_TIMEOUT, max_crashes: int = DEFAULT_MAX_CRASHES,
             near_miss: float | None = None, show_progress: bool = True, seed: int = 0,
             allowance: float | None = None, early_stop: bool = True, confirm: bool = True,
             measure: bool = True, log: Callable[[str], None] = print) -> LoopResult:
    """Iterates until `iterations` experiments, `hours` of wall clock, `max_crashes` consecutive
    unscored iterations, or Ctrl-C. With neither limit it runs until stopped, like upstream's agent.
    measure: with confirmation or early stop on, measure the key's spread (arun noise) before the
    first proposal that has a best to beat, when none is stored."""
    repo_dir = Path(repo_dir).resolve()
    if iterations is not None and iterations < 1:
        raise ArunError(f"--iterations must be at least 1, got {iterations}")
    if hours is not None and hours <= 0:
        raise ArunError(f"--hours must be positive, got {hours}")
    if seeds < 1:
        raise ArunError(f"--seeds must be at least 1, got {seeds}")
    measures = measure and (confirm or early_stop)
    info = preflight(repo_dir, backend, budget, device, seeds, confidence, log, measures=measures)
    proposer = agent if not isinstance(agent, str) else make_proposer(agent, repo_dir=repo_dir, backend=backend,
                                                                      seed=seed, agent_timeout=agent_timeout)
    if isinstance(proposer, AgentProposer):
        ok, how = confinement.state()
        where = f"confined ({how})" if proposer.confine and ok else f"NOT confined: {how if proposer.confine else 'turned off'}"
        log(f"arun loop: the agent runs {where}")
    start = len(key_records(read_records(repo_dir, info.tag), info.key_id))  # the ledger only grows
    deadline = time.monotonic() + hours * 3600 if hours else None
    result = LoopResult(reason="done")
    streak = 0
    n = 0
    tried_noise = False
    with sigterm_as_interrupt():
        try:
            while True:
                if iterations is not None and n >= iterations:
                    result.reason = "done"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    result.reason = "hours"
                    break
                if measures and not tried_noise:
                    tried_noise = spread_measured(repo_dir, backend, budget=budget, device=device,
                                                  hard_timeout=hard_timeout, allowance=allowance,
                                                  show_progress=show_progress, log=log)
                    if tried_noise and spread_missing(repo_dir, info, seeds, confidence):
                        # One seed against nothing measured would be the plain rule under a --confidence label.
                        raise ArunError(f"--confidence with one seed needs the run-to-run noise of this key and "
                                        f"measuring it failed (see above); fix that and run arun noise --backend "
                                        f"{backend} --seeds 5, or pass --seeds 2 or more")
                n += 1
                rec = iteration(repo_dir, backend, proposer, budget=budget, device=device, seeds=seeds,
                                confidence=confidence, near_miss=near_miss, hard_timeout=hard_timeout,
                                show_progress=show_progress, allowance=allowance, log=log, number=n,
                                early_stop=early_stop, confirm=confirm)
                result.records.append(rec)
                if rec.get("baseline") and rec.get("status") not in SCORED:
                    result.reason = "baseline"  # the train file as it is cannot finish: asking again would spin
                    log(baseline_hint(rec, backend))
                    break
                streak = 0 if rec.get("status") in SCORED else streak + 1
                if max_crashes > 0 and streak >= max_crashes:
                    result.reason = "crashes"
                    log(f"arun loop: stopping after {streak} consecutive iterations without a score "
                        f"(crash, timeout or invalid); last: {rec.get('error')}")
                    break
        except KeyboardInterrupt:
            result.reason = "interrupted"
            main = threading.current_thread() is threading.main_thread()
            old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a 2nd Ctrl-C must not cut the clean-up short
            try:
                _back_to_best(repo_dir, info)
            finally:
                if main:
                    signal.signal(signal.SIGINT, old)
            log("arun loop: interrupted; the train file is at the best commit")
        except ArunError as e:
            # Something refused mid-loop (another arun holding the repo, a full disk, ...): report, then say why.
            result.reason = "error"
            _back_to_best(repo_dir, info)
            _finish(repo_dir, info, result, start, log)
            raise ArunError(f"arun loop stopped: {e}") from None
    _finish(repo_dir, info, result, start, log)
    return result


def spread_measured(repo_dir: Path, backend: str, *, budget: float | None, device: str | None,
                    hard_timeout: float | None, allowance: float | None, show_progress: bool,
                    log: Callable[[str], None]) -> bool:
    """Measures the key's run-to-run spread on its baseline (arun noise --baseline, CONFIRM_SEEDS runs)
    unless one is stored; False while the key has no best yet (ask again after the baseline). The
    confirmation gate needs a spread that the agent's files do not set (arun.search.policy): a best
    kept from an agent's file might ignore its seed (a spread of 0) or crash on fresh seeds (none at
    all). The early stop's margins come from it too. A measurement that fails is reported and not
    retried: the loop goes on with the plain rule and the default margins."""
    info = cached_context(repo_dir, backend, budget, device)
    if measured_spread(repo_dir, info.tag, info.key_id) is not None:
        return True
    if best_record(read_records(repo_dir, info.tag), info.key_id) is None:
        return False
    log(f"arun loop: measuring the run-to-run spread of the key's baseline first ({CONFIRM_SEEDS} runs, once per "
        "key; --no-measure-noise skips it): the confirmation gate and the early-stop margins use it")
    try:
        measure_noise(repo_dir, backend, CONFIRM_SEEDS, budget=budget, device=device, hard_timeout=hard_timeout,
                      show_progress=show_progress, allowance=allowance, of_baseline=True, log=log)
    except (ArunError, OSError) as e:  # (a full disk or an unwritable folder is a failed measurement too)
        log(f"arun loop: the spread could not be measured ({e}); near wins are kept by the plain rule until "
            f"`arun noise --backend {backend} --seeds 3` measures it")
        # The measurement swaps the baseline's file in and the best's back (atomically): whatever failed,
        # the loop goes on only from the best's file, whole (an agent must never edit a torn one).
        best = best_record(read_records(repo_dir, info.tag), info.key_id)
        if best is not None and (repo_dir / info.train_file).read_bytes() != gitops.file_at(
                repo_dir, best["commit"], info.train_file):
            raise ArunError(f"{info.train_file} could not be put back to the best commit {best['commit'][:10]} after "
                            f"the failed measurement ({e}); free the disk and run git checkout "
                            f"{best['commit'][:10]} -- {info.train_file}") from e
    return True


def baseline_hint(rec: dict, backend: str) -> str:
    """Why the loop stops when its baseline has no score, and what to do."""
    fix = (f"size the model for this machine with: arun calibrate --backend {backend}" if rec.get("status") == "timeout"
           else f"fix {rec.get('train_file') or 'the train file'} (see run.log), or size it with: arun calibrate --backend {backend}")
    return (f"arun loop: stopping: the baseline did not finish ({rec.get('status')}: {rec.get('error')}) and every "
            f"experiment is judged against it; {fix}, then run arun loop again")


def _finish(repo_dir: Path, info: ExperimentContext, result: LoopResult, start: int, log: Callable[[str], None]) -> None:
    """The summary of this loop's experiments: every record of the key appended since the loop began
    (including one for a run interrupted by Ctrl-C, which run_experiment records before re-raising)."""
    history = key_records(read_records(repo_dir, info.tag), info.key_id)
    result.summary = report(history[start:], history, title=f"arun loop ({result.reason})")
    log(result.summary)


def _back_to_best(repo_dir: Path, info: ExperimentContext) -> None:
    best = best_record(read_records(repo_dir, info.tag), info.key_id)
    commit = best["commit"] if best else gitops.head_sha(repo_dir)
    with contextlib.suppress(Exception):
        gitops.restore_train_file(repo_dir, info.train_file, commit)
