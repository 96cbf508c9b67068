"""
Time is charged, whoever books it. The harness measures each train process's wall time from
outside; the run may spend at most `allowance` seconds on anything but training (start-up,
compilation, warm-up, export), and the rest of its wall time is charged as training, whatever
the run says it was. Its own figures only split the wall time for the record.
"""

from __future__ import annotations

import math

MAX_WARMUP_STEPS = 20  # uncounted steps a train file may take (upstream uses 10)
CLAIMED = ("time_budget", "warmup_steps", "warmup_seconds", "startup_seconds", "export_seconds", "training_seconds",
           "total_seconds")


def default_allowance(budget: float, allowance: float | None = None) -> float:
    """Non-training seconds a run may use: --allowance, else max(60 s, a fifth of the budget)."""
    return float(allowance) if allowance is not None else max(60.0, 0.2 * budget)


def slack(budget: float) -> float:
    """The last step's overrun: a step that starts just before the budget ends still finishes."""
    return max(2.0, 0.05 * budget)


def _number(result: dict, name: str) -> float:
    value = result.get(name)
    return 0.0 if value is None else float(value)


def charged_seconds(result: dict, wall_seconds: float, allowance: float) -> float:
    """The wall time minus the non-training time the run may claim (its claim, at most the allowance)."""
    non_training = max(0.0, wall_seconds - _number(result, "training_seconds"))
    return wall_seconds - min(non_training, allowance)


def audit_timing(result: dict, wall_seconds: float, budget: float, allowance: float) -> str | None:
    """Checks a run's claims against the wall time the harness measured; a one-line reason when they cannot be true."""
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
    limit = budget + slack(budget)
    training = _number(result, "training_seconds")
    if training > limit:
        return f"training took {training:.1f}s against a budget of {budget:g}s"
    charged = charged_seconds(result, wall_seconds, allowance)
    if charged > limit:
        return (f"charged {charged:.1f}s of training against a budget of {budget:g}s: the process ran "
                f"{wall_seconds:.1f}s and at most {allowance:g}s of it may be start-up, warm-up and export "
                f"(--allowance)")
    return None


def timing_split(result: dict, wall_seconds: float, launch_seconds: float | None) -> dict:
    """Where one run's wall time went, by the run's own account (launch: process start to train())."""
    return {"launch_seconds": launch_seconds,
            "startup_seconds": result.get("startup_seconds"),
            "warmup_seconds": result.get("warmup_seconds"),
            "training_seconds": result.get("training_seconds"),
            "export_seconds": result.get("export_seconds"),
            "wall_seconds": wall_seconds}
