"""The step line (arun.core.steplines): one parser for ours and upstream's format, lines ended by \\r
as well as \\n, and through the real launch path: a train file that prints its step lines the way
upstream's train.py does (a \\r before each, no newline) starts the kill clock at its first step line,
feeds the loss trajectory, and a run that prints none is told so in one line."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest

from arun.core import steplines
from arun.core.deadline import Clock, Limits
from arun.core.early import Watch
from arun.core.process import child_env, output_lines, run_train_file
from arun.core.progress import Progress
from arun.core.steplines import FORMAT_DOC, StepLine, parse_step_line, split_lines
from helpers_repo import arun_env, ledger_records, make_project, replace_once, run_arun

OURS = "step 00012 | progress   4.1% | loss 3.210000 | dt 12ms | tok/s 12,345 | mfu 1.2% | epoch 1 | remaining 287s"
UPSTREAM = ("\rstep 00012 (4.1%) | loss: 3.210000 | lrm: 1.00 | dt: 12ms | tok/sec: 12,345 | mfu: 1.2% | "
            "epoch: 1 | remaining: 287s    ")
WHOLE = StepLine(step=12, progress=4.1, loss=3.21, tokens_per_second=12345, remaining=287)


def test_ours_and_upstreams_step_lines_parse_alike() -> None:
    assert parse_step_line(OURS + "\n") == WHOLE
    assert parse_step_line(UPSTREAM) == WHOLE
    assert parse_step_line(UPSTREAM.lstrip("\r") + "\n") == WHOLE


def test_of_step_lines_joined_by_carriage_returns_the_last_counts() -> None:
    joined = UPSTREAM.replace("00012", "00011").replace("4.1%", "4.0%") + UPSTREAM
    assert parse_step_line(joined) == WHOLE


def test_only_the_step_number_is_required_and_missing_fields_are_none() -> None:
    assert parse_step_line("step 00001 | loss 1.0") == StepLine(1, None, 1.0, None, None)
    assert parse_step_line("step 7") == StepLine(7)
    nan = parse_step_line("\rstep 00003 (9.0%) | loss: nan | remaining: 1s")
    assert nan is not None and nan.progress == 9.0 and math.isnan(nan.loss)


def test_lines_that_only_look_like_step_lines_are_not() -> None:
    for line in ("stepping up", "step five", "  step 5", "step 5 done", "Step 5 | loss 1", "x step 5 | loss 1", ""):
        assert parse_step_line(line) is None, line


def test_newline_carriage_return_and_both_end_a_line() -> None:
    lines, rest = split_lines("a\n\rstep 1 (1%) | x    \rstep 2 | y\r\n\nb\r\nc")
    assert lines == ["a\n", "step 1 (1%) | x    \n", "step 2 | y\n", "\n", "b\n"] and rest == "c"
    # A \r at the end of what has arrived may be half of a \r\n: it waits for the next chunk.
    assert split_lines("a\r") == ([], "a\r")


class Chunks(io.RawIOBase):
    """A pipe that delivers exactly these chunks, one per read."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)

    def read1(self, n: int = -1) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""


def test_the_reader_splits_on_carriage_returns_across_chunks_and_shows_an_unfinished_step_line() -> None:
    partial: list[str] = []
    chunks = [b"start\n", UPSTREAM.encode(), UPSTREAM.replace("00012", "00013").encode(), b"\r", b"\nsum\xc3",
              b"\xa9\n", b"tail"]
    lines = list(output_lines(Chunks(chunks), on_partial=partial.append))
    assert lines == ["start\n", UPSTREAM.strip("\r") + "\n", UPSTREAM.strip("\r").replace("00012", "00013") + "\n",
                     "sum\u00e9\n", "tail\n"]
    # Each step line was seen the moment it arrived, before the next one ended it.
    assert [parse_step_line(p).step for p in partial[:2]] == [12, 13]


def test_the_reader_cuts_an_over_long_line_and_counts_what_went() -> None:
    lines = list(output_lines(Chunks([b"x" * 30, b"y" * 30 + b"\r", b"\nnext\n"]), width=10))
    assert lines == ["xxxxxxxxxx [arun: 50 more characters of this line cut]\n", "next\n"]
    assert list(output_lines(Chunks([b"z" * 25]), width=10)) == ["zzzzzzzzzz [arun: 15 more characters of this line cut]\n"]


# --------------------------------------------------------------------------- through the launch path

PRINTER = '''import sys
w = sys.stdout.write  # one write per line: the reader never sees half of one unless the line is unfinished
w("compiling\\n")
for i in range(1, 4):
    w(f"step {i:05d} | progress {10 * i}.0% | loss {4 - i}.5 | remaining 9s\\n")
w("\\rstep 00004 (40.0%) | loss: 0.4 | remaining: 8s    ")   # upstream's: a \\r before, nothing after
w("\\rstep 00005 (50.0%) | loss: 0.3 | remaining: 7s    ")
w("\\ndone\\n")
'''


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the step-line parser is called with, from now on: every module that holds the parser gets a
    counting wrapper around the real one, so whoever parses, it is counted."""
    original, calls = steplines.parse_step_line, []

    def counted(line: str) -> StepLine | None:
        calls.append(line)
        return original(line)
    for module in list(sys.modules.values()):
        if getattr(module, "parse_step_line", None) is original:
            monkeypatch.setattr(module, "parse_step_line", counted)
    return calls


def test_an_unfinished_line_is_parsed_for_the_kill_clock_only_until_the_first_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_parses(monkeypatch)
    clock = Clock(Limits())
    chunks = [b"compiling", b" done\n", UPSTREAM.encode(), UPSTREAM.replace("00012", "00013").encode(), b"\n"]
    assert len(list(output_lines(Chunks(chunks), on_partial=clock.partial))) == 3
    assert clock.first_step is not None  # started by upstream's step line while it was still unfinished
    assert calls == ["compiling", UPSTREAM.lstrip("\r")]  # the later unfinished step line is not parsed again


def test_each_output_line_is_parsed_once_for_the_clock_the_count_the_bar_and_the_watch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_parses(monkeypatch)
    repo = tmp_path / "proj"
    (repo / "run").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (repo / "train.py").write_text(PRINTER)
    env = child_env(tmp_path / "data", None, None, ARUN_RESULT_JSON=str(repo / "run" / "result.json"))
    lines: list[str] = []
    watch = Watch()

    def on_line(line: str, step: StepLine | None) -> None:
        lines.append(line)
        bar.line(line, step)

    with Progress(True, "counted") as bar:  # the harness's consumers, wired as arun.core.experiment wires them
        out = run_train_file(repo, "train.py", env, tmp_path / "run.log", Limits(first_step=60, after_step=60),
                             on_line, should_stop=lambda step: None if watch.add(step) else None)
    assert lines == ["compiling\n"] + [f"step {i:05d} | progress {10 * i}.0% | loss {4 - i}.5 | remaining 9s\n"
                                       for i in range(1, 4)] + [
        "step 00004 (40.0%) | loss: 0.4 | remaining: 8s    \n", "step 00005 (50.0%) | loss: 0.3 | remaining: 7s    \n",
        "done\n"]
    assert out.step_lines == 5 and [p for p, _ in watch.points] == [10.0, 20.0, 30.0, 40.0, 50.0]
    # Each complete line once; an unfinished line only for the kill clock, and only until its first step
    # (here the first step line came whole, so none).
    assert [c for c in calls if c.endswith("\n")] == lines
    assert [c for c in calls if not c.endswith("\n")] == []


UPSTREAM_STEPPER = '''import time
print("compiling\\rval_bpb:          0.100000", flush=True)   # a summary line hidden behind a \\r
print({line!r}, end="", flush=True)   # upstream's way: a \\r before, nothing after
time.sleep(600)                        # hangs after its first step line
'''


@pytest.mark.e2e
def test_an_upstream_style_step_line_starts_the_clock_at_once(data_env: Path, tmp_path: Path) -> None:
    # Hung after its first \r step line: killed by the clock that starts there (1 s), not at the
    # first-step cap (60 s here, 30 minutes by default), which is what a run with no step line gets.
    repo = tmp_path / "proj"
    (repo / "run").mkdir(parents=True)
    (repo / "train.py").write_text(UPSTREAM_STEPPER.format(line=UPSTREAM))
    env = child_env(data_env, None, None, ARUN_RESULT_JSON=str(repo / "run" / "result.json"))
    out = run_train_file(repo, "train.py", env, tmp_path / "run.log", Limits(first_step=60, after_step=1))
    assert out.status == "timeout" and "after the first step" in out.error, out.error
    log = (tmp_path / "run.log").read_text().splitlines()
    assert log[-1] == UPSTREAM.strip("\r")
    # The \r ends a line before the summary-line check: the train process's val_bpb is marked as its own.
    assert log[:2] == ["compiling", "train| val_bpb:          0.100000"]


UPSTREAM_LOG = '''def log(budget, loss, tokens_per_step, dt, mfu, epoch, force=False):
    print(f"\\rstep {budget.step:05d} ({100 * budget.progress:.1f}%) | loss: {loss:.6f} | lrm: 1.00 | "
          f"dt: {dt * 1000:.0f}ms | tok/sec: {int(tokens_per_step / dt):,} | mfu: 0.0% | epoch: {epoch} | "
          f"remaining: {budget.remaining:.0f}s    ", end="", flush=True)
'''


def cli_run(tmp_path: Path, data: Path, log_code: str) -> tuple[object, dict, str]:
    repo = tmp_path / "repo"
    make_project(repo, "train_mlx.py")   # (the step line is the harness's contract, the same for both engines)
    path = repo / "train_mlx.py"
    path.write_text(replace_once(path.read_text(), "    log = StepLog()\n", "\n".join(
        "    " + ln if ln else "" for ln in log_code.splitlines()) + "\n"))
    p = run_arun(repo, arun_env(data, data.parent), "--budget", "1", "-m", "step lines", timeout=300, backend="mlx")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p, ledger_records(repo)[-1], (repo / "run.log").read_text()


@pytest.mark.e2e
def test_a_train_file_logging_as_upstream_gets_its_loss_trajectory(data_env: Path, tmp_path: Path) -> None:
    p, rec, log = cli_run(tmp_path, data_env, UPSTREAM_LOG)
    assert rec["status"] == "keep" and "step_line_note" not in rec
    # The first and the last step are always printed, so the trajectory's end is a real loss.
    assert rec["loss_trajectory"] and math.isfinite(rec["loss_trajectory"][-1]), json.dumps(rec)[:2000]
    assert any(ln.startswith("step 00001 (") for ln in log.splitlines()) and "\r" not in log
    assert "no step line" not in p.stdout


@pytest.mark.e2e
def test_a_run_that_prints_no_step_line_is_told_so_in_one_line(data_env: Path, tmp_path: Path) -> None:
    p, rec, log = cli_run(tmp_path, data_env, "def log(*args, **kwargs):\n    pass\n")
    assert rec["status"] == "keep" and rec["loss_trajectory"] in ([], [None] * len(rec["loss_trajectory"]))
    note = rec["step_line_note"]
    assert "\n" not in note and "no step line" in note and FORMAT_DOC in note and "step 00012" in note
    notes = [ln for ln in p.stdout.splitlines() if ln.startswith("arun: note: ")]
    assert notes == [f"arun: note: {note}"] and note in log
    assert p.stdout.splitlines()[-1].startswith("arun: BASELINE")
