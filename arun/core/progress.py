"""The live progress bar of one experiment, fed by the train file's step lines (arun.core.steplines)."""

from __future__ import annotations

from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from arun.core.steplines import StepLine


class Progress:
    """A rich progress bar (only on a terminal). `line()` takes every output line of the run, with its step
    line as the reader parsed it (None: not one)."""

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

    def line(self, line: str, info: StepLine | None) -> None:
        if not self.enabled:
            return
        if info is not None and info.progress is not None:
            tail = "evaluating" if info.progress >= 100.0 else f"{info.remaining}s left" if info.remaining is not None else ""
            parts = [f"step {info.step}", f"loss {info.loss:.6f}" if info.loss is not None else "",
                     f"{info.tokens_per_second:,} tok/s" if info.tokens_per_second is not None else "", tail]
            self.bar.update(self.task, completed=info.progress, info=" | ".join(p for p in parts if p))
        elif line.startswith("---"):  # the summary block follows the evaluation
            self.bar.update(self.task, completed=100.0, info="done")
