"""
Loss trajectories and early discard: stop a run that is clearly behind the best, and move on.

A trajectory is the train loss at fixed fractions of the budget (every 5 % of progress), read
from the step lines every train file prints (engines.run.StepLog, parsed by
arun.core.steplines.parse_step_line). The value at 35 % is the mean of the losses printed in
(30 %, 35 %], and each printed loss is itself the mean over the steps since the line before
(StepLog), so a point averages every step in its bin and batch-to-batch jitter mostly cancels; a
bin with no step line in it (a tiny budget, slow steps) carries the previous value forward.

Trajectories are claims, like every figure a train process prints: they are used only to STOP a
run, never to keep one (the evaluator's val_bpb decides every keep). A train file that prints
a high loss stops itself and loses its own time; one that prints a low loss runs to the end and
is judged on its number. A best whose trajectory is implausibly low for its own val_bpb (below
what the baseline's loss-to-val ratio predicts) would stop honest runs, so it is not believed
(`believable`): no early stop against it.

The rule (`behind`): at or after MIN_PROGRESS, the candidate's loss is above the best's by more
than the margin at CONSECUTIVE grid points in a row. The margin is the measured train-loss
spread at that progress (from `arun noise` or the best's own seeds): Z standard deviations of a
difference of two runs, floored at FLOOR_REL of the best's loss; with nothing measured,
DEFAULT_REL of the best's loss.

Changes a mid-run look misjudges are never stopped early (`protected_changes`, `holds_back`): any
change that raises a learning rate or the (annealed) weight decay somewhere in the budget (a larger
*_LR, a shorter warm-down, a larger final LR), any warm-up change, a rate or schedule constant whose
direction cannot be told, the batch size and the model size; and (`rate_code_edits`) an edit to code
outside the constants that sets a rate, its schedule, weight decay or momentum. A higher learning
rate is behind while it is high and gains when it anneals (the short-horizon bias of greedy
learning-rate search: a short look favours the lower rate), a longer warm-up is behind while it
ramps up, and a bigger model or batch takes fewer, slower steps. A change that lowers the learning
rate is the other way round: it looks better mid-run than it ends, so one that is behind mid-run
even so is stopped like any other.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from arun.core.steplines import StepLine

EVERY = 5.0                      # percent of the budget between trajectory points
GRID = tuple(EVERY * (i + 1) for i in range(int(100 / EVERY)))   # 5, 10, ..., 100
MIN_PROGRESS = 20.0              # before this, warm-up and compile dominate the loss curve: never stop
CONSECUTIVE = 2                  # grid points in a row the candidate must be behind at
Z = 3.0                          # standard deviations of a two-run difference a stop needs
FLOOR_REL = 0.005                # the margin is never below 0.5 % of the best's loss (two seeds that agree)
# No spread measured: 3 % of the best's loss. That is 15x the seed spread of the final val_bpb upstream
# measured (about 0.2 %), so only a run far behind is stopped; the mid-run train-loss spread itself is not
# measured here yet (arun noise stores it per key: loss_trajectory_std, which then replaces this default).
DEFAULT_REL = 0.03
BELIEVE_REL = 0.05               # a best's final train loss may be this much below what its val_bpb predicts
MIDRUN_BELIEVE_REL = 0.10        # ... and a point from MIN_PROGRESS on this much below the baseline's, scaled

# The kinds of constant, matched on the name, first match wins. A batch or size change takes fewer or
# slower steps: always protected. A learning rate (larger is higher) and the schedule, or any other name
# that mentions a rate or its decay: protected unless `holds_back` can tell the change lowers the rate.
KINDS = {
    "batch": re.compile(r"BATCH_SIZE|GRAD_ACCUM"),
    "size": re.compile(r"^(DEPTH|ASPECT_RATIO|HEAD_DIM|(N|NUM)_(LAYERS?|HEADS?|KV_HEADS?|EMBD|EMBED)|MODEL_DIM|D_MODEL"
                       r"|EMBED_DIM|WIDTH|HIDDEN_DIM|MLP_RATIO)$"),
    "lr": re.compile(r"^(\w+_)?(LR|LEARNING_RATE)$"),
    "schedule": re.compile(r"WARMUP|WARMDOWN|COOLDOWN|SCHEDULE|ANNEAL|(?<!WEIGHT_)DECAY|(^|_)(LR|LEARNING_RATE)(_|$)"),
}
ALWAYS_PROTECTED = ("batch", "size")
NOT_TRAINING = frozenset({"EVAL_BATCH_SIZE"})  # (how the evaluator batches: moves no training)
# The schedule constants whose direction is known: a longer warm-down or cool-down anneals earlier (a lower
# rate everywhere), a larger final fraction ends higher. A warm-up change is protected either way: a longer
# one is behind while it ramps up, by design, and one longer than the plateau raises the late rate.
LOWER_WHEN_LARGER = re.compile(r"^(WARMDOWN|COOLDOWN)_(RATIO|FRAC)$")
HIGHER_WHEN_LARGER = re.compile(r"^FINAL_LR_FRAC$")
# Weight decay that anneals with progress (as in both train files) holds a run back mid-run like a higher rate.
WEIGHT_DECAY = re.compile(r"(^|_)WEIGHT_DECAY$")
# Code outside the constants that sets a rate, its schedule, weight decay or momentum: an edit there is a
# rate change the constants do not show.
RATE_CODE = re.compile(r"(?<![a-z])lr(?![a-z])|learning_rate|schedul|warmup|warmdown|cooldown|anneal|weight_decay|"
                       r"momentum", re.IGNORECASE)
CONSTANT_LINE = re.compile(r"^[A-Z][A-Z0-9_]*\s*(:[^=]*)?=")


# --------------------------------------------------------------------------- trajectories

def resample(points: list[tuple[float, float]], upto: float | None = None) -> list[float | None]:
    """Train loss at each GRID point from (progress %, loss) pairs in order: the mean of the losses in
    (g - EVERY, g], the previous value when that bin is empty; None before the first loss or past
    `upto` (the progress reached so far: a bin still filling has no value yet)."""
    reached = upto if upto is not None else (max((p for p, _ in points), default=0.0))
    out: list[float | None] = []
    last: float | None = None
    for g in GRID:
        if g > reached + 1e-9:
            out.append(None)
            continue
        inside = [loss for p, loss in points if g - EVERY < p <= g + 1e-9]
        if inside:
            last = statistics.fmean(inside)
        out.append(last)
    return out


def kind_of(name: str) -> str:
    """The kind of change a constant is: batch, size, lr (a learning rate), schedule (anything else that
    names a rate or its schedule) or other."""
    if name in NOT_TRAINING:
        return "other"
    for kind, pattern in KINDS.items():
        if pattern.search(name):
            return kind
    return "other"


def change_kinds(candidate: dict, best: dict) -> dict[str, list[str]]:
    """The constants that differ between two configs, grouped by kind."""
    out: dict[str, list[str]] = {}
    for name in sorted(set(candidate) | set(best)):
        if candidate.get(name) != best.get(name):
            out.setdefault(kind_of(name), []).append(name)
    return out


def holds_back(name: str, new: object, old: object) -> bool:
    """Could changing this constant from `old` to `new` put a run behind mid-run that ends ahead? A higher
    learning rate or weight decay anywhere in the budget, any warm-up change, a batch or size change, and
    any rate or schedule change whose direction cannot be told (not two numbers, a name of unknown meaning)."""
    kind = kind_of(name)
    if kind in ALWAYS_PROTECTED:
        return True
    rate = kind in ("lr", "schedule") or bool(WEIGHT_DECAY.search(name))
    if not rate:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (new, old)):
        return True
    if kind == "lr" or HIGHER_WHEN_LARGER.search(name) or WEIGHT_DECAY.search(name):
        return new > old   # type: ignore[operator]
    if LOWER_WHEN_LARGER.search(name):
        return new < old   # type: ignore[operator]
    return True


def protected_changes(candidate: dict, best: dict) -> list[str]:
    """The changed constants a mid-run look misjudges (`holds_back`): with any, never stop early."""
    candidate, best = candidate or {}, best or {}
    return [name for names in change_kinds(candidate, best).values() for name in names
            if holds_back(name, candidate.get(name), best.get(name))]


def rate_code_edits(best_text: str, candidate_text: str) -> list[str]:
    """The lines outside the constants that the candidate added or removed and that set a rate, its
    schedule, weight decay or momentum (RATE_CODE): a rate change the constants do not show."""
    import difflib
    added: list[str] = []
    removed: list[str] = []
    for line in difflib.unified_diff(best_text.splitlines(), candidate_text.splitlines(), lineterm="", n=0):
        if line.startswith(("+++", "---", "@@")) or line[:1] not in ("+", "-"):
            continue
        code = line[1:].split("#", 1)[0]
        if code.strip() and not CONSTANT_LINE.match(code) and RATE_CODE.search(code):
            (added if line[0] == "+" else removed).append(code.strip())
    return added + removed   # (the new lines first: what the run will do)


def mean_trajectory(trajectories: list[list]) -> list[float | None]:
    """Point-wise mean over seeds (None where any seed has none)."""
    if not trajectories:
        return []
    out = []
    for vals in zip(*trajectories):
        out.append(statistics.fmean(vals) if all(isinstance(v, (int, float)) for v in vals) else None)
    return out


def trajectory_std(trajectories: list[list]) -> list[float | None] | None:
    """Point-wise standard deviation over seeds (two or more), else None."""
    usable = [t for t in trajectories if isinstance(t, list) and len(t) == len(GRID)]
    if len(usable) < 2:
        return None
    out = []
    for vals in zip(*usable):
        out.append(statistics.stdev(vals) if all(isinstance(v, (int, float)) for v in vals) else None)
    return out


# --------------------------------------------------------------------------- the rule (pure)

def margins(best: list, std: list | None) -> tuple[list[float | None], str]:
    """How far behind the best a candidate may be at each grid point, and where that came from."""
    out: list[float | None] = []
    for i, b in enumerate(best):
        if not isinstance(b, (int, float)):
            out.append(None)
        elif std is not None and isinstance(std[i], (int, float)):
            out.append(max(Z * math.sqrt(2.0) * std[i], FLOOR_REL * abs(b)))
        else:
            out.append(DEFAULT_REL * abs(b))
    return out, ("measured spread" if std is not None else "default margin")


def behind(candidate: list, best: list, margin: list) -> dict | None:
    """The evidence for stopping, or None: at the candidate's last CONSECUTIVE grid points (all at or
    after MIN_PROGRESS) its loss exceeds the best's by more than the margin."""
    done = [i for i, v in enumerate(candidate) if isinstance(v, (int, float))]
    if len(done) < CONSECUTIVE:
        return None
    last = done[-CONSECUTIVE:]
    if GRID[last[0]] < MIN_PROGRESS:
        return None
    for i in last:
        b, m = best[i] if i < len(best) else None, margin[i] if i < len(margin) else None
        if not isinstance(b, (int, float)) or not isinstance(m, (int, float)) or not candidate[i] - b > m:
            return None
    i = last[-1]
    return {"progress": GRID[i], "loss": round(candidate[i], 6), "best_loss": round(best[i], 6),
            "margin": round(margin[i], 6)}


def believable(best: dict, baseline: dict | None) -> bool:
    """Is the best's trajectory plausible for its own val_bpb? Train loss tracks val loss, so its final
    train loss should be near baseline_final x best_val / baseline_val; a best that printed losses far
    below that (a lie, or a train file that prints something else) is not compared against."""
    traj = best.get("loss_trajectory") or []
    if not traj or not isinstance(traj[-1], (int, float)):
        return False
    low = min(x for x in traj if isinstance(x, (int, float)))
    if baseline is None or baseline is best or baseline.get("id") == best.get("id"):
        return True
    base = baseline.get("loss_trajectory") or []
    bv, v = baseline.get("val_bpb"), best.get("val_bpb")
    if not (base and isinstance(base[-1], (int, float)) and isinstance(bv, (int, float)) and isinstance(v, (int, float))
            and bv > 0 and v > 0):
        return False
    # Train loss only falls over a run, so no point (not just the last) may sit below what val_bpb implies.
    if low < base[-1] * v / bv * (1.0 - BELIEVE_REL):
        return False
    # Nor may a point mid-run sit far below the baseline's at the same progress, scaled the same way: a
    # best that printed its final level from 5 % on would pass the check above and stop every honest run.
    # (The slack is wider: a real improvement can gain more early than it keeps at the end.)
    return all(not (isinstance(t, (int, float)) and isinstance(b, (int, float)) and g >= MIN_PROGRESS
                    and t < b * v / bv * (1.0 - MIDRUN_BELIEVE_REL)) for g, t, b in zip(GRID, traj, base))


# --------------------------------------------------------------------------- watching a run

@dataclass
class Watch:
    """Fed every step line of one run (as the reader parsed it); `trajectory()` is its loss trajectory so far."""
    points: list[tuple[float, float]] = field(default_factory=list)
    reached: float = 0.0

    def add(self, info: StepLine) -> bool:
        """True when the step line carried progress and a finite loss (a new point)."""
        if info.progress is None or info.loss is None:
            return False
        loss = info.loss
        if not math.isfinite(loss) or info.progress < self.reached:  # progress never goes back
            return False
        self.reached = info.progress
        self.points.append((info.progress, loss))
        return True

    def trajectory(self, final: bool = False) -> list[float | None]:
        """The trajectory; `final`: the run ended, so the last (partly filled) bin counts too."""
        upto = max(self.reached, 100.0) if final and self.reached >= 100.0 - EVERY else self.reached
        return resample(self.points, upto)


@dataclass
class Stopper:
    """Stops a run that is behind `best_traj` by more than `margin` (arun.core.process's should_stop)."""
    best_traj: list
    margin: list
    source: str
    best_id: str | None = None
    evidence: dict | None = None

    def check(self, watch: Watch) -> str | None:
        """The reason to stop now, or None."""
        ev = behind(watch.trajectory(), self.best_traj, self.margin)
        if ev is None:
            return None
        self.evidence = {**ev, "spread": self.source, "best_id": self.best_id}
        return (f"stopped early at {ev['progress']:g}% of the budget: train loss {ev['loss']:.4f} vs the best's "
                f"{ev['best_loss']:.4f} at the same progress, behind by more than {ev['margin']:.4f} ({self.source})")


def make_stopper(best: dict | None, baseline: dict | None, candidate_config: dict, noise: dict | None = None,
                 log: Callable[[str], None] | None = None, code_edits: list[str] | None = None) -> Stopper | None:
    """The stopper for a candidate against the best, or None (with the reason logged) when the rule
    leaves it alone: no best, no believable trajectory, or a change a mid-run look misjudges (among the
    constants, or `code_edits`: lines outside them that set a rate, from rate_code_edits)."""
    def say(msg: str) -> None:
        if log:
            log(f"arun: early stop off for this run: {msg}")
    if best is None:
        return None
    if not believable(best, baseline):
        say("the best has no believable loss trajectory")
        return None
    config = best.get("config")
    changed = protected_changes(candidate_config if isinstance(candidate_config, dict) else {},
                                config if isinstance(config, dict) else {})
    if changed:
        say(f"it changes {', '.join(changed)} (a higher learning rate or weight decay, the warm-up, the batch "
            f"or model size: a mid-run look misjudges those)")
        return None
    if code_edits:
        say(f"it edits code that sets a learning rate, its schedule, weight decay or momentum "
            f"({code_edits[0][:80]!r}{f' and {len(code_edits) - 1} more' if len(code_edits) > 1 else ''}): "
            f"a mid-run look misjudges those")
        return None
    std = None
    if noise and isinstance(noise.get("loss_trajectory_std"), list):
        std = noise["loss_trajectory_std"]
    elif best.get("loss_trajectory_seeds"):
        std = trajectory_std(best["loss_trajectory_seeds"])
    margin, source = margins(best["loss_trajectory"], std)
    return Stopper(best["loss_trajectory"], margin, source, best.get("id"))
