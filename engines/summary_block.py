"""End-of-run summary in upstream's format."""

from __future__ import annotations

SUMMARY_FIELDS = [
    ("val_bpb", "{:.6f}"),
    ("training_seconds", "{:.1f}"),
    ("total_seconds", "{:.1f}"),
    ("peak_vram_mb", "{:.1f}"),
    ("mfu_percent", "{:.2f}"),
    ("total_tokens_M", "{:.1f}"),
    ("num_steps", "{}"),
    ("num_params_M", "{:.1f}"),
    ("depth", "{}"),
]


def summary_text(result: dict, with_score: bool = True) -> str:
    """The block agents written for upstream grep: `grep "^val_bpb:" run.log`. with_score=False: the
    train process's block under the harness, which has no score to print (the evaluator has it)."""
    lines = ["---"]
    for name, fmt in SUMMARY_FIELDS:
        if name == "val_bpb" and not with_score:
            continue
        lines.append(f"{name + ':':<18}{summary_value(name, fmt, result.get(name))}")
    return "\n".join(lines)


def summary_value(name: str, fmt: str, value: object) -> str:
    """Always a number, as upstream prints (agents parse these lines with float()). A figure the run
    could not measure is 0 (mfu_percent where the device's peak FLOPs are unknown, e.g. CPUs; the
    record keeps null); millions below 1 get three decimals, so a small run does not read 0.0."""
    if name == "val_bpb" and value is None:
        return "nan"  # never a score that looks real
    if value is None or (isinstance(value, float) and value != value):
        value = 0
    if name.endswith("_M") and isinstance(value, (int, float)) and abs(value) < 1:
        fmt = "{:.3f}"
    return fmt.format(value)
