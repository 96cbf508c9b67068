"""
When a train process is killed. A timeout is for a hung run, never for one-time compilation
(MLX's CPU kernels, torch.compile), which can take minutes on a cold cache and prints nothing:

- by default, two clocks: the run has FIRST_STEP_CAP seconds to print its first step line
  (start-up and compilation included), then budget + max(120, budget) seconds from that line on;
- an explicit --timeout S is one clock from the process start, as the user asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from arun.core.steplines import FORMAT_DOC, StepLine, parse_step_line

FIRST_STEP_CAP = 1800.0  # a run that never reaches its first step is hung (30 minutes)


def after_first_step(budget: float) -> float:
    """Training, the last evaluation and export after the first step: at the default 300 s budget this
    is upstream's "if a run exceeds 10 minutes, kill it", counted from the first step."""
    return budget + max(120.0, budget)


@dataclass(frozen=True)
class Limits:
    """first_step: seconds from the start to the first step line; after_step: seconds from that line
    to the end (None: no such clock); total: seconds from the start, whatever the run printed."""
    first_step: float = FIRST_STEP_CAP
    after_step: float | None = None
    total: float | None = None

    @classmethod
    def for_run(cls, budget: float, timeout: float | None = None, first_step: float | None = None) -> Limits:
        """--timeout S: S from the start; otherwise the two clocks."""
        if timeout:
            return cls(first_step=float(timeout), total=float(timeout))
        return cls(first_step=float(first_step or FIRST_STEP_CAP), after_step=after_first_step(budget))


class Clock:
    """Fed every output line of one run (parsed once by the reader, arun.core.process); says which limit
    it is past, if any."""

    def __init__(self, limits: Limits, hint: str = ""):
        self.limits, self.hint = limits, hint
        self.start = time.monotonic()
        self.first_step: float | None = None   # monotonic time of the first step line

    def step(self, step: StepLine | None) -> None:
        """One complete output line, as parsed: the first step line starts the second clock."""
        if self.first_step is None and step is not None:
            self.first_step = time.monotonic()

    def partial(self, text: str) -> None:
        """What has arrived of an unfinished line: upstream's step line (a \\r before it, nothing after) ends
        only when the next one begins, so the first is read as it arrives. Parsed only until the first step."""
        if self.first_step is None:
            self.step(parse_step_line(text))

    def expired(self) -> str | None:
        """None while the run may go on; else the timeout's one-line reason (which limit, what to do)."""
        now, lim = time.monotonic(), self.limits
        hint = f"; {self.hint}" if self.hint else ""
        if lim.total is not None and now - self.start >= lim.total:
            return (f"killed at the hard timeout of {lim.total:g}s (--timeout, counted from the start, compilation "
                    f"included); raise --timeout, or leave it out to count from the first step{hint}")
        if self.first_step is None and now - self.start >= lim.first_step:
            return (f"killed at the hard timeout: no step line within {lim.first_step:g}s of the start (start-up and "
                    f"compilation included; the format: {FORMAT_DOC}); the run hung before training, prints no step "
                    f"line, or one step at these sizes takes longer than that here{hint}")
        if self.first_step is not None and lim.after_step is not None and now - self.first_step >= lim.after_step:
            return (f"killed at the hard timeout of {lim.after_step:g}s after the first step (budget + max(120, "
                    f"budget)): the run hung, or its evaluation and export take too long here; --timeout S sets "
                    f"one limit from the start instead{hint}")
        return None
