"""
The step line: what a train file prints once per logged training step, and the one parser the
harness reads it with. It starts the kill clock's second phase (arun.core.deadline), feeds the
progress bar (arun.core.progress), the loss trajectory and early stop (arun.core.early), and the
start-up measure of `arun calibrate` (arun.search.calibration_probe). Each output line is parsed
once, by the reader (arun.core.process.run_train_file), which hands the StepLine (or None) to each.

The format. A step line starts with `step N` and carries `|`-separated fields, each `name value` or
`name: value`; both train files print it through engines.run.StepLog:

    step 00012 | progress   4.1% | loss 3.210000 | dt 12ms | tok/s 12,345 | mfu 1.2% | epoch 1 | remaining 287s

and upstream autoresearch's train.py prints it (with a leading carriage return and no newline, so a
terminal rewrites one line in place):

    \\rstep 00012 (4.1%) | loss: 3.210000 | lrm: 1.00 | dt: 12ms | tok/sec: 12,345 | mfu: 1.2% | epoch: 1 | remaining: 287s

Both are read alike. A line may end in \\n, \\r or \\r\\n (split_lines); only `step N` is required
(the kill clock needs nothing more); progress (`progress P%` or `(P%)` after the step), loss, tok/s
(or tok/sec) and remaining are read when present and None when not. The progress bar, the loss
trajectory and early stop need progress and loss. The loss is whatever the line says: StepLog prints
the mean over the steps since its previous line, upstream's train.py a smoothed (EMA) loss.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

FORMAT_DOC = "arun/core/steplines.py"
EXAMPLE = "step 00012 | progress 4.1% | loss 3.210000 | ... | remaining 287s"

_HEAD = re.compile(r"step\s+(\d+)(?:\s*\(\s*([\d.]+)\s*%\s*\))?\s*(?:\||$)")
_FIELD = re.compile(r"\s*([A-Za-z/_]+)\s*:?\s*(\S+)")


@dataclass(frozen=True)
class StepLine:
    step: int
    progress: float | None = None         # percent of the time budget used
    loss: float | None = None             # train loss as printed (nan/inf included)
    tokens_per_second: int | None = None
    remaining: int | None = None          # seconds of budget left


def parse_step_line(line: str) -> StepLine | None:
    """The step line in `line` (a carriage return before it and a line ending after it allowed; of
    several joined by \\r, the last), or None when it is not one."""
    text = line.rstrip("\r\n").rsplit("\r", 1)[-1].rstrip()  # of \r-joined lines, the last (a terminal's)
    m = _HEAD.match(text)
    if not m:
        return None
    fields = {}
    for part in text[m.end():].split("|"):
        f = _FIELD.match(part)
        if f:
            fields[f.group(1).lower()] = f.group(2)
    progress = _number(m.group(2) or fields.get("progress", "").rstrip("%"))
    tok = _number((fields.get("tok/s") or fields.get("tok/sec") or "").replace(",", ""))
    remaining = _number(fields.get("remaining", "").rstrip("s"))
    return StepLine(int(m.group(1)), progress, _number(fields.get("loss", "")),
                    int(tok) if tok is not None and math.isfinite(tok) else None,
                    int(remaining) if remaining is not None and math.isfinite(remaining) else None)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def split_lines(buffer: str) -> tuple[list[str], str]:
    """(the complete lines in buffer, each ending in \\n, and the unterminated rest). \\n, \\r\\n and a lone
    \\r each end a line; a \\r that ends nothing (upstream's \\r before each step line, after the previous
    line's \\n) is dropped. A \\r at the very end stays in the rest: a \\n may follow in the next chunk."""
    lines: list[str] = []
    start = i = 0
    n = len(buffer)
    while i < n:
        c = buffer[i]
        if c == "\n" or (c == "\r" and i + 1 < n):
            end = i + 2 if c == "\r" and buffer[i + 1] == "\n" else i + 1
            text = buffer[start:i]
            if text or c == "\n" or end == i + 2:
                lines.append(text + "\n")
            start = i = end
            continue
        i += 1
    return lines, buffer[start:]


def no_step_line(where: str = "") -> str:
    """The one line saying a run printed no step line: what was expected and where it is written down."""
    where = f" {where}" if where else ""
    return (f"the train file printed no step line{where} (expected lines like `{EXAMPLE}`, or upstream's "
            f"`step 00012 (4.1%) | loss: ...`; the format: {FORMAT_DOC}): no progress bar, loss trajectory or "
            f"early stop, and its kill clock counted from the start")


def note_fields(counts: list[int]) -> dict:
    """The record's one-line note when runs trained to the end (counts: the step lines each printed)
    and none printed a step line; else nothing."""
    return {"step_line_note": no_step_line()} if counts and not any(counts) else {}
