"""
`arun calibrate`: sizes the train file's model and batch for this machine.

    probe 1: a small model, compilation as the file has it (off for MLX on a CPU: compile_choice)
             -> seconds per step, the one-time compilation, memory per row (where the engine reports it)
    -> predict along a ladder (one more layer, twice the rows, in turn) the largest size whose step
       gives the baseline about TARGET_STEPS steps in the budget, micro-batched to fit memory
    probe 2 (and 3 if it misses): that size, measured -> the constants block

Every probe runs the train file as it is (only the constants it sizes changed), exactly as an
experiment runs it, for a few seconds. The result is an ordinary edit of the constants block (as
`arun set`), which the next experiment records; nothing goes into a ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from arun.core.context import experiment_context
from arun.core.errors import ArunError
from arun.core.experiment import repo_lock
from arun.core.timing import default_allowance
from arun.core.trainfile import constants, rewrite_constants
from arun.search.calibration_probe import Measure, probe
from engines.atomic import write_atomic

NEEDED = ("DEPTH", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE")
TARGET_STEPS = 100      # aimed for, so a baseline still gets 50 when the machine is twice as busy
MIN_TOKENS = 1024       # per step: fewer rows make the gradient too noisy to compare changes on
MEMORY_SHARE = 0.5      # of the device's memory a micro-batch may plan to use
WARMUP_SHARE = 0.5      # of the baseline's allowance start-up, warm-up and export may plan to use (load varies)


@dataclass
class Options:
    budget: float
    probe_seconds: float = 2.0        # training seconds of each probe
    max_depth: int | None = None      # caps for the ladder (default: the file's own sizes)
    max_rows: int | None = None
    max_probes: int = 3
    time_limit: float = 150.0         # no new probe starts after this many seconds


@dataclass
class Calibration:
    chosen: dict
    measures: list[Measure] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    compile_seconds: float = float("nan")
    allowance_hint: float | None = None   # --allowance to suggest, when compilation is near the default
    device: str | None = None             # the torch device it was sized on: the next command needs it too


def compile_choice(declared: object, backend: str, kind: str) -> tuple[dict, str | None]:
    """Whether the probes compile, decided before anything compiles: ({"COMPILE": False} or {}, why).
    MLX on a CPU builds its kernels with the system C++ compiler, minutes of a loaded machine (189 s
    seen) that a short budget never earns back, so there it is off from the first probe. torch's file
    already runs eager on a CPU, and on an accelerator compiling pays: left as declared (the first probe
    still switches it off when it costs more than half the allowance)."""
    if declared is True and backend == "mlx" and kind == "cpu":
        return {"COMPILE": False}, ("COMPILE=False: MLX on a CPU compiles its kernels with the C++ compiler, "
                                    "minutes that a short budget does not earn back (decided before the first probe)")
    return {}, None


def width(c: dict, depth: int) -> int | None:
    """model_dim as the project's train files derive it (DEPTH x ASPECT_RATIO rounded up to HEAD_DIM)."""
    ar, hd = c.get("ASPECT_RATIO"), c.get("HEAD_DIM")
    if isinstance(ar, int) and isinstance(hd, int) and hd > 0:
        return max(hd, -(-depth * ar // hd) * hd)
    return None


def step_cost(c: dict, depth: int, rows: int, seq_len: int, vocab: int) -> float:
    """Relative FLOPs of one step: 6 x (block matrices + lm_head) per token, plus attention. Only ratios
    between sizes are used, and each prediction is checked by a probe."""
    n = width(c, depth) or 1
    per_token = 6 * (12 * depth * n * n + vocab * n) + 12 * depth * n * seq_len
    return float(rows * seq_len * per_token)


def ladder(c: dict, seq_len: int, max_depth: int, max_rows: int) -> list[tuple[int, int]]:
    """(depth, rows) from the smallest sensible size up, one layer more and twice the rows in turn."""
    rows = min(max_rows, max(1, MIN_TOKENS // seq_len))
    depth = 1
    out = [(depth, rows)]
    grow_depth = True
    while depth < max_depth or rows < max_rows:
        if (grow_depth and depth < max_depth) or rows >= max_rows:
            depth += 1
        else:
            rows = min(max_rows, rows * 2)
        grow_depth = not grow_depth
        out.append((depth, rows))
    return out


def predict(c: dict, rungs: list[tuple[int, int]], m: Measure, seq_len: int, vocab: int,
            target: float) -> tuple[int, int]:
    """The largest rung whose step, scaled from measure m by relative cost, fits the target (else the smallest)."""
    base = step_cost(c, m.config["DEPTH"], m.config["TOTAL_BATCH_SIZE"] // seq_len, seq_len, vocab)
    fits = [r for r in rungs if m.step_seconds * step_cost(c, *r, seq_len, vocab) / base <= target]
    return fits[-1] if fits else rungs[0]


def micro_rows(rows: int, depth: int, m: Measure, c: dict) -> int:
    """Rows per forward/backward that fit MEMORY_SHARE of the device, from the probe's memory per row
    (scaled by layers x width); all rows when the engine reports no memory."""
    if not m.memory_mb or not m.memory_gb:
        return rows
    probe_rows = m.config["DEVICE_BATCH_SIZE"]
    scale = (depth * (width(c, depth) or 1)) / (m.config["DEPTH"] * (width(c, m.config["DEPTH"]) or 1))
    per_row = m.memory_mb / probe_rows * scale
    fit = max(1, int(MEMORY_SHARE * m.memory_gb * 1024 / per_row))
    micro = 1
    while micro * 2 <= min(rows, fit) and rows % (micro * 2) == 0:
        micro *= 2
    return micro


def warmup_steps(c: dict, m: Measure, allowance: float) -> int | None:
    """The file's WARMUP_STEPS lowered (never raised) so that start-up, warm-up and export fit WARMUP_SHARE
    of the allowance; None when it already fits. The probe ran one warm-up step (it holds the compilation),
    so each further one costs about a counted step."""
    want = c.get("WARMUP_STEPS")
    if not isinstance(want, int) or want <= 1 or not m.step_seconds > 0:
        return None
    room = WARMUP_SHARE * allowance - m.other_seconds
    fits = 1 + max(0, math.floor(room / m.step_seconds))
    return fits if fits < want else None


def sizes(c: dict, depth: int, rows: int, micro: int, seq_len: int) -> dict:
    out = {"DEPTH": depth, "TOTAL_BATCH_SIZE": rows * seq_len, "DEVICE_BATCH_SIZE": micro}
    if "EVAL_BATCH_SIZE" in c:
        out["EVAL_BATCH_SIZE"] = micro
    return out


def calibrate(repo_dir: Path | str, backend: str, opts: Options, device: str | None = None,
              log: Callable[[str], None] = print) -> Calibration:
    """Measures this machine with short probes and writes the chosen sizes into the train file."""
    t0 = time.monotonic()
    repo_dir = Path(repo_dir).resolve()
    ctx = experiment_context(repo_dir, backend, opts.budget, device, verify_data=True)
    text = ctx.train_path.read_text()
    c = constants(text)
    missing = [n for n in NEEDED if not isinstance(c.get(n), int)]
    if missing:
        raise ArunError(f"arun calibrate sizes {', '.join(NEEDED)} in the constants block of {ctx.train_file}, but "
                        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not there as whole numbers; "
                        f"put them back (git show HEAD:{ctx.train_file}) or size the file with arun set")
    seq_len = int(ctx.data.profile.max_seq_len)
    vocab = int(ctx.data.profile.vocab_size)
    target = opts.budget / TARGET_STEPS
    max_depth = max(1, opts.max_depth or c["DEPTH"])
    max_rows = max(1, opts.max_rows or c["TOTAL_BATCH_SIZE"] // seq_len)
    rungs = ladder(c, seq_len, max_depth, max_rows)
    fixed = {"WARMUP_STEPS": 1} if isinstance(c.get("WARMUP_STEPS"), int) and c["WARMUP_STEPS"] > 1 else {}
    cal = Calibration(chosen={}, device=ctx.device)
    log(f"arun calibrate: {ctx.train_file} on {ctx.tag}, {opts.budget:g}s budget: aiming at {target:.2f}s a step "
        f"({TARGET_STEPS} steps); probes of {opts.probe_seconds:g}s each")
    with repo_lock(repo_dir):

        def run(depth: int, rows: int, extra: dict) -> Measure:
            overrides = {**sizes(c, depth, rows, rows, seq_len), **fixed, **extra}
            n = len(cal.measures) + 1
            log(f"arun calibrate: probe {n}: DEPTH={depth}, {rows} rows of {seq_len} tokens"
                + "".join(f", {k}={v!r}" for k, v in extra.items()))
            m = probe(repo_dir, ctx.train_file, text, overrides, backend=backend, data_dir=ctx.data.dir,
                      device=ctx.device, seconds=opts.probe_seconds,
                      work_dir=repo_dir / ".arun" / "runs" / f"calibrate-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            cal.measures.append(m)
            if m.error:
                raise ArunError(f"calibration probe {n} (DEPTH={depth}, TOTAL_BATCH_SIZE={rows * seq_len}) failed: "
                                f"{m.error}; the train file must run as it is before it can be sized")
            return m

        extra, why = compile_choice(c.get("COMPILE"), backend, getattr(ctx.hardware_info, "kind", ""))
        cal.reasons.extend([why] if why else [])
        first = run(*rungs[0], extra)
        cal.compile_seconds = first.compile_seconds
        allowance = default_allowance(opts.budget)
        if not extra and c.get("COMPILE") is True and first.compile_seconds > 0.5 * allowance:
            extra = {"COMPILE": False}
            cal.reasons.append(f"COMPILE=False: compiling took {first.compile_seconds:.0f}s, more than half the "
                               f"{allowance:g}s a run may spend besides training (--allowance)")
        best, last, probed = (rungs[0], first), first, {rungs[0]}

        def cost(rung: tuple[int, int]) -> float:
            return step_cost(c, *rung, seq_len, vocab)

        while len(cal.measures) < opts.max_probes and time.monotonic() - t0 < opts.time_limit:
            guess = predict(c, rungs, last, seq_len, vocab, target)
            if guess in probed:
                break
            probed.add(guess)
            last = run(*guess, extra)
            if last.step_seconds <= 1.25 * target and cost(guess) > cost(best[0]):
                best = (guess, last)
        (depth, rows), m = best
        micro = micro_rows(rows, depth, m, c)
        cal.chosen = {**sizes(c, depth, rows, micro, seq_len), **extra}
        steps = opts.budget / m.step_seconds
        cal.reasons.insert(0, f"DEPTH={depth}, {rows} rows a step: {m.step_seconds:.2f}s a step measured, about "
                              f"{steps:.0f} steps in {opts.budget:g}s" + (" (the largest size up to the file's own)"
                                                                            if (depth, rows) == rungs[-1] else ""))
        warmup = warmup_steps(c, m, allowance)
        if warmup is not None:
            cal.chosen["WARMUP_STEPS"] = warmup
            cal.reasons.append(f"WARMUP_STEPS={warmup}: {c['WARMUP_STEPS']} warm-up steps of {m.step_seconds:.2f}s and "
                               f"{m.other_seconds:.0f}s of start-up and export would not fit {WARMUP_SHARE:.0%} of the "
                               f"{allowance:g}s a baseline may spend besides training (--allowance)")
        if micro < rows:
            cal.reasons.append(f"DEVICE_BATCH_SIZE={micro}: {m.memory_mb:.0f} MB at {m.config['DEVICE_BATCH_SIZE']} "
                               f"rows; {MEMORY_SHARE:.0%} of {m.memory_gb:g} GB fits {micro}")
        other = max((x.other_seconds for x in cal.measures if x.config.get("COMPILE", c.get("COMPILE")) ==
                     cal.chosen.get("COMPILE", c.get("COMPILE"))), default=0.0)
        if other > 0.7 * allowance:
            cal.allowance_hint = float(math.ceil(other * 1.5 / 10) * 10)
        write_atomic(ctx.train_path, rewrite_constants(text, cal.chosen).encode())
    return cal


def calibration_table(cal: Calibration) -> Table:
    """probe | sizes | measured | chosen, for people."""
    t = Table(title="arun calibrate", title_justify="left")
    for name in ("probe", "DEPTH", "rows x seq", "COMPILE", "s / step", "compile s", "memory MB", "chosen"):
        t.add_column(name, justify="left" if name == "probe" else "right")
    chosen = {k: cal.chosen.get(k) for k in ("DEPTH", "TOTAL_BATCH_SIZE")}
    for i, m in enumerate(cal.measures, 1):
        c = m.config
        pick = "<-" if {k: c.get(k) for k in chosen} == chosen else ""
        t.add_row(str(i), str(c["DEPTH"]), f"{c['DEVICE_BATCH_SIZE']} rows", str(c.get("COMPILE", "-")),
                  f"{m.step_seconds:.3f}", f"{m.compile_seconds:.1f}",
                  f"{m.memory_mb:.0f}" if m.memory_mb else "n/a", pick)
    return t
