"""
Time is charged, whoever books it. The harness measures each train process's wall time from
outside; what the run does not spend training (start-up, compilation, warm-up, export) is free only
up to what the key's own baseline needed, plus a small margin; the rest of its wall time is charged
as training, whatever the run says it was. Its own figures only split the wall time for the record.

    baseline (a key's first run): no reference yet, so it may spend up to the allowance
                                  (max(60 s, budget/5), or --allowance) besides training
    every later run of the key:   min(allowance, reference + margin), where reference is the
                                  baseline's measured non-training seconds (per run)

So a change that adds compilation pays for it out of its budget, and training off the clock (a clock
that runs slow, training booked as warm-up or export) gains at most the margin.
"""

from __future__ import annotations

import math

from arun.core.numbers import finite

MAX_WARMUP_STEPS = 20  # uncounted steps a train file may take (upstream uses 10)
CLAIMED = ("time_budget", "warmup_steps", "warmup_seconds", "startup_seconds", "export_seconds", "training_seconds",
           "total_seconds", "last_step_seconds")
# The margin over the baseline's non-training time. Start-up (imports, data, model build), warm-up and
# export vary with the machine's load and with honest edits (a deeper model's warm-up steps and export
# take longer): on a loaded 2-core box a sweep's run needed 1.7x its baseline's 21 s, and an honest run
# must not be charged for that. So a run may take up to twice the baseline's, or 10 s more, never more
# than the allowance; what it can gain by training off the clock is this margin: for a 15-30 s baseline
# at a 300 s budget, 5-10 % (the flat allowance gave 20-22 %).
MARGIN_SECONDS = 10.0
MARGIN_FRACTION = 1.0
# The last step may finish after the budget is reached; it is believed up to this cap (a run reports
# its own step time, so a claim can buy at most the cap, as the old fixed slack did).
STEP_CAP_SECONDS = 5.0
STEP_CAP_FRACTION = 0.05


def default_allowance(budget: float, allowance: float | None = None) -> float:
    """Non-training seconds a baseline may use: --allowance, else max(60 s, a fifth of the budget)."""
    return float(allowance) if allowance is not None else max(60.0, 0.2 * budget)


def margin(reference: float) -> float:
    """How much more than the baseline's non-training time a later run may spend uncharged."""
    return max(MARGIN_SECONDS, MARGIN_FRACTION * reference)


def non_training_limit(allowance: float, reference: float | None) -> float:
    """Non-training seconds a run may use: the allowance for a baseline (no reference), else the
    baseline's own plus the margin (never more than the allowance)."""
    return allowance if reference is None else min(allowance, reference + margin(reference))


def reference_of(baseline: dict | None) -> float | None:
    """The key's reference: its baseline's measured non-training seconds per run (None before the
    baseline, or for a baseline recorded before the figure existed)."""
    value = finite((baseline or {}).get("non_training_seconds"))
    return value if value is not None and value >= 0 else None


def slack(budget: float) -> float:
    """The last step's overrun when the run does not report its step: max(2 s, 5 % of the budget)."""
    return max(2.0, 0.05 * budget)


def step_slack(result: dict, budget: float) -> float:
    """How far training may run past the budget: the run's last step may finish (a step that starts
    just before the budget ends still completes). The step's reported length is believed up to
    max(5 s, 5 % of the budget) and never below the fixed slack."""
    last = _number(result, "last_step_seconds")
    cap = max(STEP_CAP_SECONDS, STEP_CAP_FRACTION * budget)
    return max(slack(budget), min(last, cap))


def _number(result: dict, name: str) -> float:
    value = result.get(name)
    return 0.0 if value is None else float(value)


def non_training_seconds(result: dict, wall_seconds: float) -> float:
    """The wall time the run does not claim as training."""
    return max(0.0, wall_seconds - _number(result, "training_seconds"))


def charged_seconds(result: dict, wall_seconds: float, limit: float) -> float:
    """The wall time minus the non-training time the run may claim (its claim, at most `limit`)."""
    return wall_seconds - min(non_training_seconds(result, wall_seconds), limit)


def audit_timing(result: dict, wall_seconds: float, budget: float, limit: float,
                 why: str = "--allowance") -> str | None:
    """Checks a run's claims against the wall time the harness measured; a one-line reason when they
    cannot be true. limit: the non-training seconds this run may use (non_training_limit); why: what
    set it, for the message."""
    # The train file writes these numbers: a NaN, an infinity or a string would otherwise pass every
    # comparison below (NaN > x is False) or crash the harness.
    for name in CLAIMED:
        value = result.get(name)
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"the run reports {name} = {str(value)[:40]!r}, not a number"
        if not math.isfinite(number) or number < 0:
            return f"the run reports {name} = {number}; timings must be finite and not negative"
    if result.get("time_budget") is not None and abs(float(result["time_budget"]) - budget) > 1e-6:
        return f"the run used a time budget of {result['time_budget']}s, the harness gave {budget}s"
    if _number(result, "warmup_steps") > MAX_WARMUP_STEPS:
        return (f"{_number(result, 'warmup_steps'):.0f} warm-up steps are not counted against the budget; "
                f"at most {MAX_WARMUP_STEPS} may be")
    limit_training = budget + step_slack(result, budget)
    training = _number(result, "training_seconds")
    if training > limit_training:
        return f"training took {training:.1f}s against a budget of {budget:g}s (and its last step)"
    charged = charged_seconds(result, wall_seconds, limit)
    if charged > limit_training:
        return (f"charged {charged:.1f}s of training against a budget of {budget:g}s: the process ran "
                f"{wall_seconds:.1f}s and at most {limit:.1f}s of it may be start-up, warm-up and export ({why})")
    return None


def timing_split(result: dict, wall_seconds: float, launch_seconds: float | None) -> dict:
    """Where one run's wall time went, by the run's own account (launch: process start to train())."""
    return {"launch_seconds": launch_seconds,
            "startup_seconds": result.get("startup_seconds"),
            "warmup_seconds": result.get("warmup_seconds"),
            "training_seconds": result.get("training_seconds"),
            "export_seconds": result.get("export_seconds"),
            "wall_seconds": wall_seconds}
