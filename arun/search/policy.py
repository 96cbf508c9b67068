"""
The loop's default keep rule: a clear win is kept at once, a near win is confirmed with fresh seeds.

Most of what a night of single-seed keeps calls progress is selection on noise: the median keep
of upstream's H100 night gained less than a seed-only change moved val_bpb. So a result that
beats the best is tested with the Welch gate (arun.search.stats) against the best's runs and the
spread `arun noise` measured:

- significantly better already -> kept (clear win);
- better, but so little that even `confirm_seeds` runs at this mean would not pass the gate (the
  spread measured) -> discarded at once, "within the noise": fresh seeds could confirm it only by luck;
- better, but within the noise, or no spread known yet -> run again with fresh seeds, one at a
  time, until the experiment has `confirm_seeds` runs (run_experiment does this when told "confirm"),
  then the gate on the mean over all of them: "confirmed over N seeds" (keep) or "not confirmed"
  (discard, a near miss). A mean that is no longer below the best, or that has become too small a
  win for the remaining seeds to confirm ("within the noise"), ends the confirmation early. The
  fresh runs measure the candidate's own spread, so no prior `arun noise` is needed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from arun.core.numbers import finite
from arun.core.ratchet import NEAR_MISS, NO_SPREAD, WITHIN_NOISE
from arun.search.noise import measured_spread
from arun.search.stats import best_runs, independent, significantly_better

CONFIRM_SEEDS = 3          # runs of a near win before it may be kept
CONFIRM_CONFIDENCE = 0.9   # the gate's confidence unless --confidence says otherwise


class ConfirmingDecider:
    """A run_experiment decide_fn: (status, near_miss, {"confirmation": ...}); status "confirm" asks for
    fresh seeds first."""

    def __init__(self, confidence: float | None = None, *, confirm_seeds: int = CONFIRM_SEEDS,
                 repo_dir: Path | str | None = None, noise_std: float | None = None, near_miss: float = NEAR_MISS,
                 log: Callable[[str], None] | None = print):
        self.confidence = confidence or CONFIRM_CONFIDENCE
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
        if confirm_seeds < 2:
            raise ValueError(f"confirmation needs at least 2 seeds, got {confirm_seeds}")
        self.confirm_seeds, self.noise_std, self.near_miss, self.log = confirm_seeds, noise_std, near_miss, log
        self.repo_dir = Path(repo_dir) if repo_dir else Path.cwd()

    def noise(self, best: dict) -> dict | None:
        """The key's measured spread, or None: a std that is not a positive finite number measures nothing
        (0 is what a train file that ignores its seed gives, and it would switch the gate off)."""
        noise = {"std": self.noise_std} if self.noise_std is not None else \
            measured_spread(self.repo_dir, best.get("tag", ""), best.get("key_id", ""))
        std = finite(noise.get("std")) if noise else None
        if std is None or std <= 0:
            return None
        return noise

    def __call__(self, vals: list[float], best: dict | None, records: list[dict]) -> tuple[str, bool, dict]:
        if best is None:
            return "keep", False, {}
        mean, n = statistics.fmean(vals), len(vals)
        final = n >= self.confirm_seeds
        if mean >= best["val_bpb"]:
            conf = {"confirmation": {"verdict": "not confirmed", "seeds": n}} if n > 1 else {}
            return "discard", mean - best["val_bpb"] <= self.near_miss, conf
        noise = self.noise(best)
        if noise is None:
            # Without a spread measured on a file the agent did not write, the fresh runs' own spread is
            # all the gate would have, and the train file controls it (one that ignores its seed repeats
            # its lucky first run exactly: zero variance, p = 0, any win "confirmed"). So the plain rule
            # decides, and says so; `arun loop` measures the spread before its first proposal.
            self.say("no spread measured for this key (none stored, or one of 0): kept by the plain rule "
                     "(arun noise --seeds 3 measures one; arun loop does it when none is stored)")
            return "keep", False, {"confirmation": {"verdict": NO_SPREAD, "seeds": n}}
        std = finite(noise.get("std"))
        # Fresh runs that agree too closely to be seed noise are one run (a file that ignores ARUN_SEED
        # repeats its lucky first draw), and so is a best's sample that does.
        sample = independent(vals, std)
        try:
            ok, p = significantly_better(sample, best_runs(best, noise, std), self.confidence, std)
        except ValueError:  # a spread that is not a finite number: nothing to test with
            ok, p = False, None
        said = f"p = {p:.4g}" if p is not None else "no usable spread"
        if len(sample) < n:
            said += (f" (its {n} runs agree too closely to be seed noise and count as one: does the train file "
                     "use ARUN_SEED?)")
        if ok and 1 < n < self.confirm_seeds:
            # Part way through a confirmation: only the full count may keep it (one look at the gate, not
            # one per fresh seed, which would keep more noise than the confidence says).
            self.say(f"{said} over {n} runs: {self.confirm_seeds - n} more to go")
            return "confirm", False, {}
        if ok:
            verdict = "confirmed" if n > 1 else "clear win"
        elif not final and not self.could_pass(mean, best, noise):
            self.say(f"{said}: within the noise: {self.confirm_seeds} runs at this mean would not pass the gate, "
                     f"so no {'fresh' if n == 1 else 'more'} seeds are spent on it")
            return "discard", True, {"confirmation": {"verdict": WITHIN_NOISE, "seeds": n, "p_value": p,
                                                      "confidence": self.confidence}}
        elif not final:
            self.say(f"{said}: a near win, to be confirmed over {self.confirm_seeds} seeds")
            return "confirm", False, {}
        else:
            verdict = "not confirmed"
        self.say(f"{said} over {n} run(s) -> {verdict}")
        status = "keep" if ok else "discard"
        agree = {"counted_as_one": n} if len(sample) < n else {}
        return status, not ok, {"confirmation": {"verdict": verdict, "seeds": n, "p_value": p,
                                                 "confidence": self.confidence, **agree}}

    def could_pass(self, mean: float, best: dict, noise: dict) -> bool:
        """Would `confirm_seeds` runs at this mean pass the gate? With the spread measured, a win smaller
        than that is one the fresh seeds could confirm only by luck (and the first run of a near win is
        already the lucky one of the proposals tried): it is discarded without them."""
        try:
            std = finite(noise.get("std"))
            ok, _ = significantly_better([mean] * self.confirm_seeds, best_runs(best, noise, std), self.confidence, std)
        except ValueError:
            return True
        return ok

    def say(self, text: str) -> None:
        if self.log:
            self.log(f"arun: significance at {self.confidence:g}: {text}")
