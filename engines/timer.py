"""The fixed training-time budget shared by every engine."""

from __future__ import annotations

import time
from collections.abc import Callable


class TimeBudget:
    """
    Counts wall-clock training time, excluding the first `warmup_steps` steps
    (compilation and allocator warm-up, as upstream). Each step is bracketed by
    the engine's sync() so asynchronous devices are timed honestly.

        budget = TimeBudget(TIME_BUDGET, warmup_steps=10, sync=engine.sync)
        while not budget.done:
            budget.start_step()
            ...one optimizer step...
            dt = budget.end_step()
    """

    def __init__(self, seconds: float, warmup_steps: int = 10, sync: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.perf_counter):
        if seconds <= 0:
            raise ValueError(f"time budget must be positive, got {seconds}")
        self.seconds = float(seconds)
        self.warmup_steps = int(warmup_steps)
        self.sync = sync
        self.clock = clock
        self.step = 0                 # completed steps
        self.training_seconds = 0.0   # counted time, warm-up excluded
        self.warmup_seconds = 0.0
        self.last_step_seconds = 0.0  # the last counted step: the one that may run past the budget
        self._t0: float | None = None

    def start_step(self) -> None:
        self.sync()
        self._t0 = self.clock()

    def end_step(self) -> float:
        """Ends the step begun by start_step(); returns its duration in seconds."""
        if self._t0 is None:
            raise RuntimeError("end_step() without start_step()")
        self.sync()
        dt = self.clock() - self._t0
        self._t0 = None
        if self.step < self.warmup_steps:
            self.warmup_seconds += dt
        else:
            self.training_seconds += dt
            self.last_step_seconds = dt
        self.step += 1
        return dt

    @property
    def counted_steps(self) -> int:
        return max(0, self.step - self.warmup_steps)

    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]; drives LR schedules."""
        return min(self.training_seconds / self.seconds, 1.0)

    @property
    def remaining(self) -> float:
        return max(0.0, self.seconds - self.training_seconds)

    @property
    def done(self) -> bool:
        return self.step > self.warmup_steps and self.training_seconds >= self.seconds
