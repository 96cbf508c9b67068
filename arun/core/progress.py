"""The live progress bar of one experiment, fed by the train file's StepLog lines."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

# engines.run.StepLog:
# step 00012 | progress   4.1% | loss 3.210000 | dt 12ms | tok/s 12,345 | mfu 1.2% | epoch 1 | remaining 287s
STEP_LINE = re.compile(r"^step (\d+) \| progress\s+([\d.]+)% \| loss (\S+) \|.*?\| tok/s ([\d,]+) \|.*?remaining (\d+)s")


@dataclass
class StepInfo:
    step: int
    progress: float     # percent of the budget used
    loss: str           # as printed (may be nan/inf)
    tokens_per_second: int
    remaining: int      # seconds of budget left


def parse_step_line(line: str) -> StepInfo | None:
    m = STEP_LINE.match(line)
    if not m:
        return None
    step, pct, loss, tok, rem = m.groups()
    return StepInfo(int(step), float(pct), loss, int(tok.replace(",", "")), int(rem))


class Progress:
    """A rich progress bar (only on a terminal). `line()` takes every output line of the run."""

    def __init__(self, enabled: bool, label: str):
        self.enabled = enabled
        self.phase = "starting"
        if not enabled:
            return
        self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=True)
        self.task = self.bar.add_task(label, total=100.0, info="starting (imports, data, compile)")

    def __enter__(self) -> Progress:
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()

    def new_run(self, label: str) -> None:
        if self.enabled:
            self.bar.update(self.task, description=label, completed=0.0, info="starting (imports, data, compile)")

    def line(self, line: str) -> None:
        if not self.enabled:
            return
        info = parse_step_line(line)
        if info is not None:
            tail = "evaluating" if info.progress >= 100.0 else f"{info.remaining}s left"
            self.bar.update(self.task, completed=info.progress,
                            info=f"step {info.step} | loss {info.loss} | {info.tokens_per_second:,} tok/s | {tail}")
        elif line.startswith("---"):  # the summary block follows the evaluation
            self.bar.update(self.task, completed=100.0, info="done")
