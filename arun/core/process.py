"""
One run of the train file as a child process: its environment, its own process group (so a kill
reaches everything it started), the hard timeout, run.log, and what it left behind (the result JSON
and the exported forward). Its output reaches run.log with summary-looking lines neutralised
(`train| val_bpb: ...`): only the harness writes the summary block agents grep for.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, cast

from arun.core import confine as confinement
from arun.core.deadline import Clock, Limits
from arun.core.numbers import finite
from arun.core.runfolder import read_regular
from arun.core.steplines import StepLine, parse_step_line, split_lines


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while an experiment runs."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


@dataclass
class RunOutcome:
    seed: int | None = None
    status: str = "ok"              # ok | crash | timeout | invalid | interrupted
    error: str | None = None
    result: dict | None = None
    result_mtime: float | None = None
    launch_time: float = 0.0        # time.time() at process start
    wall_seconds: float = 0.0
    returncode: int | None = None
    claimed: dict | None = None     # summary figures the run printed itself (diagnostics only)
    confined: bool = False          # ran under OS confinement (arun.core.confine)
    confinement: str = ""           # how, or why not
    step_lines: int = 0             # step lines it printed (arun.core.steplines)


RESULT_CAP = 16 << 20  # a result JSON is a few KB; a bigger one is a train file's trick
SUMMARY_LINE = re.compile(r"^\s*(val_bpb|test_bpb|training_seconds|total_seconds|peak_vram_mb|mfu_percent|"
                          r"total_tokens_M|num_steps|num_params_M|depth)\s*:")


# What of the train process's output reaches run.log. run.log is read by the agent, which edits the
# train file: a run that prints its weights there hands them to the next run (SECURITY.md, state
# carried between runs). Step lines are ~200 characters; a whole honest run prints a few KB.
MAX_LINE_CHARS = 2000
MAX_LOG_BYTES = 512 * 1024


def output_lines(stream: io.BufferedIOBase, width: int = MAX_LINE_CHARS,
                 on_partial: Callable[[str], None] | None = None) -> Iterator[str]:
    """The stream's lines as they arrive, each ending in \\n and cut to `width` characters (saying how
    many went; a longer line is never held whole in memory). \\n, \\r\\n and \\r end a line
    (arun.core.steplines.split_lines). on_partial gets what has arrived of an unfinished line: upstream's
    step line is printed with a \\r before it and nothing after, so it ends only when the next one comes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    rest, head, cut = "", "", -1   # cut >= 0: inside an over-long line, counting what goes
    skip_lf = False                # a cut line ended in \\r at the end of a chunk: a \\n may follow
    while True:
        chunk = stream.read1(65536)
        text = decoder.decode(chunk, final=not chunk)
        if skip_lf and text:
            text, skip_lf = text[text.startswith("\n"):], False
        if cut >= 0:
            end = min((i for i in (text.find("\n"), text.find("\r")) if i >= 0), default=-1)
            if end < 0:
                cut += len(text)
                if chunk:
                    continue
                end = len(text)
            cut += end
            yield _cut_line(head, cut)
            skip_lf = text[end:] == "\r"
            text, cut = text[end + 1:] if text[end:end + 2] != "\r\n" else text[end + 2:], -1
        lines, rest = split_lines(rest + text)
        yield from lines
        if len(rest) > width:
            head, cut, rest = rest[:width], len(rest) - width, ""
        if not chunk:
            if cut >= 0 or rest.strip("\r"):
                yield _cut_line(head, cut) if cut >= 0 else rest.strip("\r") + "\n"
            return
        if rest and on_partial is not None:
            on_partial(rest)


def _cut_line(head: str, cut: int) -> str:
    return f"{head} [arun: {cut} more characters of this line cut]\n"


def neutralise(line: str) -> str:
    """A train-process line that looks like a summary line is marked as the train process's."""
    return "train| " + line if SUMMARY_LINE.match(line) else line


def printed_claims(lines: list[str]) -> dict:
    """`name: number` summary figures the run printed (the last of each), as claimed_<name>."""
    claims = {}
    for line in lines:
        m = SUMMARY_LINE.match(line)
        if m:
            try:
                claims[f"claimed_{m.group(1)}"] = float(line.split(":", 1)[1].split()[0])
            except (ValueError, IndexError):
                pass
    return claims


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


def same_file(stream: TextIO, path: Path) -> bool:
    """Is this stream the file at path? (an agent told `arun ... > run.log 2>&1`, as upstream's program.md
    says for train.py: then stdout already is run.log and arun must not write it a second time)."""
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextlib.contextmanager
def log_sink(log_path: Path, to_stdout: bool) -> Iterator[TextIO]:
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
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def end_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Ends a launched process and everything it started. SIGTERM to its group reaches the jail's
    supervisor (engines.jail), which SIGKILLs every process beneath it, detached ones included, and
    exits; SIGKILL to the group after `grace` for whatever is left (where there is no jail: macOS).
    Never SIGKILL first: a supervisor killed outright cannot reap the detached part of its tree."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def child_env(data_dir: Path, device: str | None, seed: int | None = None, **values: str) -> dict:
    """The environment of a process the harness starts (a run, the evaluator): ours, with the data
    folder, the torch device and the seed set explicitly, never inherited from the caller."""
    env = dict(os.environ, ARUN_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", **values)
    env.pop("ARUN_SEED", None)
    env.pop("ARUN_DEVICE", None)
    if seed is not None:
        env["ARUN_SEED"] = str(seed)
    if device:
        env["ARUN_DEVICE"] = device
    return env


def run_train_file(repo_dir: Path, train_file: str, env: dict, log_path: Path, limits: Limits | float,
                   on_line: Callable[[str, StepLine | None], None] | None = None, prefix: str = "",
                   seed: int | None = None, log_is_stdout: bool = False, confine: bool = True,
                   timeout_hint: str = "", should_stop: Callable[[StepLine], str | None] | None = None) -> RunOutcome:
    """Runs the train file as its own process group (so a kill reaches compile workers and
    dataloader processes too), streaming stdout+stderr into run.log (neutralised) and to on_line(line, step):
    each line is parsed as a step line once, here (arun.core.steplines; step is None for other lines). Where the OS
    can, the process is confined: it writes only its run folder (the folder of $ARUN_RESULT_JSON,
    with a private TMPDIR inside) and never reads the val/test rows, ledgers or other runs.
    limits: when it is killed (arun.core.deadline; a number is one limit from the start).
    should_stop(step) -> reason, for each step line: the harness ends the run early (status "stopped",
    arun.core.early)."""
    out = RunOutcome(seed)
    lines: list[str] = []
    claims: list[str] = []
    timed_out = threading.Event()
    stopped = threading.Event()
    stop = threading.Event()
    if not isinstance(limits, Limits):
        limits = Limits(first_step=float(limits), total=float(limits))
    clock = Clock(limits, timeout_hint)
    why: list[str] = []
    result_path = Path(env["ARUN_RESULT_JSON"])
    policy = confinement.train_policy(Path(repo_dir), Path(env["ARUN_DATA_DIR"]), result_path.parent)
    run = confinement.wrap(policy, [sys.executable, "-u", train_file], env, confine)
    out.confined, out.confinement = run.confined, run.how
    with log_sink(log_path, log_is_stdout) as log:
        out.launch_time = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(run.cmd, cwd=repo_dir, env=run.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_die_with_parent)

        def watch() -> None:
            while not stop.wait(0.2):
                reason = clock.expired()
                if reason:
                    why.append(reason)
                    timed_out.set()
                    end_tree(proc)
                    return

        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        try:
            assert proc.stdout is not None
            logged = 0
            # cast: with the default bufsize Popen's stdout is a BufferedReader; typeshed says IO[bytes] (no read1)
            for line in output_lines(cast(io.BufferedIOBase, proc.stdout), on_partial=clock.partial):
                step = parse_step_line(line)  # the one parse of this line: the clock, the count and the callbacks share it
                clock.step(step)
                out.step_lines += step is not None
                if logged < MAX_LOG_BYTES:
                    text = prefix + neutralise(line)
                    logged += len(text.encode("utf-8", "replace"))
                    log.write(text)
                    if logged >= MAX_LOG_BYTES:
                        log.write(f"{prefix}[arun: the rest of the train process's output is cut from run.log "
                                  f"(over {MAX_LOG_BYTES // 1024} KB)]\n")
                    log.flush()
                if SUMMARY_LINE.match(line) and len(claims) < 100:
                    claims.append(line)
                lines.append(line)
                if len(lines) > 400:
                    del lines[:200]
                if on_line:
                    on_line(line, step)
                if should_stop and step is not None and (reason := should_stop(step)):  # early discard (arun.core.early)
                    why.append(reason)
                    stopped.set()
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    break
            proc.wait()
        except BaseException:
            # Ctrl-C / SIGTERM / anything else: the child must not outlive us (it would hold the GPU).
            stop.set()
            end_tree(proc, grace=2.0)
            proc.wait()
            out.status, out.error = "interrupted", "interrupted (Ctrl-C)"
            raise
        finally:
            stop.set()
            out.wall_seconds = time.perf_counter() - t0
            out.returncode = proc.returncode
            # Whatever the child started in its group (compile workers, loader processes) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    out.claimed = printed_claims(claims)
    if stopped.is_set():
        out.status, out.error = "stopped", why[-1]
        return out
    if timed_out.is_set():
        out.status, out.error = "timeout", why[0] if why else "killed at the hard timeout"
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
        # The run folder is the train process's: a link or FIFO there is never followed (arun.core.runfolder).
        raw = read_regular(result_path, RESULT_CAP)
        if raw is None:
            raise OSError("not a plain file: a link, a FIFO or a device")
        out.result = json.loads(raw)
        out.result_mtime = os.lstat(result_path).st_mtime
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        out.status, out.error = "crash", f"the result JSON is unreadable ({e})"
        return out
    if not isinstance(out.result, dict):
        out.status, out.error, out.result = "crash", "the result JSON is not an object", None
        return out
    artifact = env.get("ARUN_ARTIFACT")
    if artifact and not Path(artifact).is_file():
        out.status = "crash"
        out.error = "the train file exited without exporting its forward (engines.run.finish_run was not reached)"
    return out


def overhead_split(o: RunOutcome) -> dict:
    """Where one run's wall time went besides training, by its own account (the record's split; the
    timing audit never trusts it). The train file's clock starts in train() (after imports), so
    launch = process start -> train(), read off the result file's mtime (written at the end of
    finish_run, total_seconds after train() began)."""
    r = o.result or {}
    total, training = finite(r.get("total_seconds")), finite(r.get("training_seconds")) or 0.0
    warmup, export = finite(r.get("warmup_seconds")) or 0.0, finite(r.get("export_seconds")) or 0.0
    launch = None
    if total is not None and o.result_mtime is not None:
        launch = max(0.0, o.result_mtime - total - o.launch_time)
    setup = finite(r.get("startup_seconds"))
    if setup is None and total is not None:
        setup = max(0.0, total - training - warmup - export)
    return {"launch_seconds": launch, "startup_seconds": setup, "warmup_seconds": warmup if r else None,
            "export_seconds": export if r else None}
