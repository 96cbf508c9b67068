"""
The built-in proposer (`--agent sweep`): no LLM, just the hyperparameter block.

Each proposal changes one or two of the ALL_CAPS constants between
`# --- hyperparameters ---` and `# --- end hyperparameters ---`, by minimal textual edits
(the literal's source span is replaced; comments and layout stay). Each constant lives on a
ladder around its current value:

    positive floats        x (sqrt 2)^k, k in -3..3, 3 significant digits (MATRIX_LR 0.04 -> 0.0566)
    powers of two (ints)   x 2^k, k in -2..2; stay powers of two; `2**19` is rewritten as `2**k`
    DEPTH (a layer count)  +- 1 layer per step (+- 2 from depth 8): layers need not be powers of two
    other ints             + k * max(1, value // 4)
    *_RATIO, *_FRAC, 0.0   a fixed grid 0, 0.02, 0.05, 0.1, ..., 0.9
    betas (0 < b < 1)      1 - (1 - b) x (sqrt 2)^k, element-wise in tuples like ADAM_BETAS
    WINDOW_PATTERN         one of L, SL, SSL, SSSL; bools: True / False
    SEED, WARMUP_STEPS, EVAL_BATCH_SIZE, COMPILE are never touched (they move no val_bpb, or
    would move the timer's warm-up exclusion)

Learning: optuna's TPE sampler, in an in-memory study rebuilt every iteration from the
ledger's records of this comparability key (each record's `config` is a trial, its val_bpb
the value; crashes count as the worst score seen). TPE proposes a full configuration; the
sweep applies one or two of its suggested moves to the current best, so each experiment
stays attributable to a named change. A proposal whose train file sha256 was already scored
for this key is never made: the sweep asks again (up to `max_tries` times).
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arun.core.numbers import finite
from arun.core.trainfile import BEGIN, END, block_span, safe_eval
from arun.search.proposers import Context, Proposal
from engines.atomic import write_atomic

if TYPE_CHECKING:  # optuna is an optional dependency (the [sweep] extra): imported only when the sweep runs
    import optuna
    from optuna.distributions import BaseDistribution

SKIP = frozenset({"SEED", "WARMUP_STEPS", "EVAL_BATCH_SIZE", "COMPILE"})
WINDOW_CHOICES = ("L", "SL", "SSL", "SSSL")
FRACTION_GRID = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROOT2 = math.sqrt(2.0)
STATUSES_SEEN = ("keep", "discard", "crash", "timeout")  # outcomes that count as "already scored"


# --------------------------------------------------------------------------- reading the block

@dataclass
class Literal:
    start: int      # offsets into the whole file's text
    end: int
    source: str
    value: Any


@dataclass
class Constant:
    name: str
    value: Any
    literals: list[Literal]     # one for a scalar, one per element for a tuple
    pow_form: bool = False      # written as 2**k


def parse_block(text: str) -> dict[str, Constant]:
    """The constants of the hyperparameter block with the exact source spans of their values."""
    start, end = block_span(text)
    body = text[start:end]
    tree = ast.parse(body)
    offsets = [0]
    for line in body.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))

    def span(node: ast.expr) -> tuple[int, int]:
        if node.end_lineno is None or node.end_col_offset is None:  # (parsed nodes always carry their end)
            raise ValueError(f"no source span for {ast.dump(node)[:80]}")
        a = start + offsets[node.lineno - 1] + node.col_offset
        b = start + offsets[node.end_lineno - 1] + node.end_col_offset
        return a, b

    out: dict[str, Constant] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if not name.isupper():
            continue
        try:
            value = safe_eval(node.value)
        except (ValueError, ZeroDivisionError, OverflowError):
            continue
        if isinstance(node.value, ast.Tuple):
            lits = []
            for elt in node.value.elts:
                a, b = span(elt)
                lits.append(Literal(a, b, text[a:b], safe_eval(elt)))
        else:
            a, b = span(node.value)
            lits = [Literal(a, b, text[a:b], value)]
        pow_form = (isinstance(node.value, ast.BinOp) and isinstance(node.value.op, ast.Pow)
                    and isinstance(node.value.left, ast.Constant) and node.value.left.value == 2)
        out[name] = Constant(name, value, lits, pow_form)
    return out


# --------------------------------------------------------------------------- ladders

def _is_pow2(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


def round3(v: float) -> float:
    return float(f"{v:.3g}")


@dataclass(eq=False)  # hashed by identity: dims key the moves of one proposal
class Dim:
    """One swept scalar: a constant, or one element of a tuple constant."""
    key: str                      # "MATRIX_LR" or "ADAM_BETAS[1]"
    name: str
    index: int | None
    kind: str                     # log | pow2 | int | unit | grid | choice
    ref: Any                      # the current (best) value
    lo: int = 0
    hi: int = 0
    step: int = 1                 # int kind
    grid: tuple = field(default_factory=tuple)

    def distribution(self) -> BaseDistribution:
        # optuna is an optional dependency (the [sweep] extra): imported only when the sweep runs
        from optuna.distributions import CategoricalDistribution, IntDistribution
        if self.kind == "choice":
            return CategoricalDistribution(self.grid)
        return IntDistribution(self.lo, self.hi)

    def value(self, x: Any) -> Any:
        """The constant's value at ladder coordinate x."""
        if self.kind == "choice":
            return x
        if self.kind == "grid":
            return self.grid[x]
        if self.kind == "log":
            return self.ref if x == 0 else round3(self.ref * ROOT2 ** x)
        if self.kind == "pow2":
            return self.ref * 2 ** x if x >= 0 else self.ref >> -x
        if self.kind == "int":
            return self.ref + x * self.step
        if self.kind == "unit":
            return self.ref if x == 0 else round(1.0 - (1.0 - self.ref) * ROOT2 ** x, 4)
        raise AssertionError(self.kind)

    def coord(self, v: Any) -> Any:
        """The ladder coordinate of a value (from a past record), or None when it is not on the ladder."""
        if v is None or isinstance(v, bool) != isinstance(self.ref, bool):
            return None
        if self.kind == "choice":
            return v if v in self.grid else None
        if not isinstance(v, (int, float)):
            return None
        if self.kind == "grid":
            for i, g in enumerate(self.grid):
                if math.isclose(v, g, rel_tol=1e-6, abs_tol=1e-12):
                    return i
            return None
        if self.kind in ("log", "unit"):
            a, b = (v, self.ref) if self.kind == "log" else (1.0 - v, 1.0 - self.ref)
            if a <= 0 or b <= 0:
                return None
            r = math.log(a / b) / math.log(ROOT2)
            k = round(r)
            return k if abs(r - k) < 0.3 and self.lo <= k <= self.hi else None
        if self.kind == "pow2":
            if not _is_pow2(v):
                return None
            k = int(math.log2(v)) - int(math.log2(self.ref))
            return k if self.lo <= k <= self.hi else None
        if self.kind == "int":
            if not isinstance(v, int) or (v - self.ref) % self.step:
                return None
            k = (v - self.ref) // self.step
            return k if self.lo <= k <= self.hi else None
        return None

    def read(self, config: dict) -> Any:
        v = config.get(self.name)
        if self.index is not None:
            if not isinstance(v, (list, tuple)) or len(v) <= self.index:
                return None
            v = v[self.index]
        return v


def _grid_with(ref: float, grid: tuple) -> tuple:
    if any(math.isclose(ref, g, rel_tol=1e-6, abs_tol=1e-12) for g in grid):
        return grid
    return tuple(sorted(grid + (ref,)))


def make_dim(name: str, value: Any, index: int | None = None, in_betas: bool = False) -> Dim | None:
    """The ladder for one value, or None when the sweep leaves it alone."""
    key = name if index is None else f"{name}[{index}]"
    if isinstance(value, bool):
        return Dim(key, name, index, "choice", value, grid=(False, True))
    if isinstance(value, str):
        if name == "WINDOW_PATTERN":
            return Dim(key, name, index, "choice", value, grid=tuple(dict.fromkeys(WINDOW_CHOICES + (value,))))
        return None
    if isinstance(value, int):
        if value < 1:
            return None
        if name == "DEPTH":
            step = max(1, value // 4)
            return Dim(key, name, index, "int", value, lo=-min(4, (value - 1) // step), hi=4, step=step)
        if _is_pow2(value):
            return Dim(key, name, index, "pow2", value, lo=-min(2, int(math.log2(value))), hi=2)
        step = max(1, value // 4)
        return Dim(key, name, index, "int", value, lo=-min(3, (value - 1) // step), hi=3, step=step)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            return None
        if in_betas or "BETA" in name or "MOMENTUM" in name:
            if 0.0 < value < 1.0:
                hi = 3
                while hi > 0 and round(1.0 - (1.0 - value) * ROOT2 ** hi, 4) <= 0.0:
                    hi -= 1
                return Dim(key, name, index, "unit", value, lo=-3, hi=hi)
            return None
        if name.endswith(("_RATIO", "_FRAC")) and value <= 1.0 or value == 0.0:
            grid = _grid_with(value, FRACTION_GRID)
            return Dim(key, name, index, "grid", value, lo=0, hi=len(grid) - 1, grid=grid)
        return Dim(key, name, index, "log", value, lo=-3, hi=3)
    return None


def make_dims(constants: dict[str, Constant], skip: frozenset = SKIP) -> list[Dim]:
    dims = []
    for c in constants.values():
        if c.name in skip:
            continue
        if isinstance(c.value, tuple):
            for i, v in enumerate(c.value):
                d = make_dim(c.name, v, i, in_betas="BETA" in c.name)
                if d:
                    dims.append(d)
        else:
            d = make_dim(c.name, c.value)
            if d:
                dims.append(d)
    return dims


# --------------------------------------------------------------------------- writing

def render(value: Any, lit: Literal, pow_form: bool = False) -> str:
    """Source text for a value, in the style of the literal it replaces."""
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return f"2**{int(math.log2(value))}" if pow_form and _is_pow2(value) else str(value)
    if isinstance(value, float):
        return repr(round3(value)) if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"
    if isinstance(value, str):
        quote = "'" if lit.source.startswith("'") else '"'
        return quote + value + quote
    return repr(value)


def apply_moves(text: str, constants: dict[str, Constant], moves: dict[Dim, Any]) -> tuple[str, list[str]]:
    """The file with these dims set (minimal span replacements) and the change notes, e.g. 'DEPTH 4 -> 6'."""
    edits, notes = [], []
    for d, v in moves.items():
        c = constants[d.name]
        lit = c.literals[d.index or 0] if d.index is not None else c.literals[0]
        new = render(v, lit, c.pow_form and d.index is None)
        edits.append((lit.start, lit.end, new))
        notes.append(f"{d.key} {lit.source} -> {new}")
    for a, b, new in sorted(edits, reverse=True):
        text = text[:a] + new + text[b:]
    return text, notes


def plausible(config: dict, seq_len: int | None) -> str | None:
    """Why a configuration cannot run (a reason), or None. Only the batch divisibility rule the train
    files enforce up front is checked; everything else is for the run to find out."""
    total, dev = config.get("TOTAL_BATCH_SIZE"), config.get("DEVICE_BATCH_SIZE")
    if seq_len and isinstance(total, int) and isinstance(dev, int) and dev > 0:
        if total % (dev * seq_len):
            return f"TOTAL_BATCH_SIZE {total} is not a multiple of DEVICE_BATCH_SIZE x MAX_SEQ_LEN = {dev} x {seq_len}"
    return None


# --------------------------------------------------------------------------- the proposer

def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def scored_shas(records: list[dict]) -> set[str]:
    return {r["train_sha256"] for r in records if r.get("train_sha256") and r.get("status") in STATUSES_SEEN}


class SweepError(Exception):
    pass


class Sweep:
    """Proposes hyperparameter-block edits with TPE. Stateless between calls: everything it knows
    comes from the records it is given, so a restarted loop (or a swarm worker) picks up where the
    ledger left off; `seed` separates workers."""

    name = "sweep"

    def __init__(self, seed: int = 0, max_tries: int = 50, n_startup_trials: int = 8, skip: frozenset = SKIP):
        self.seed, self.max_tries, self.n_startup_trials, self.skip = seed, max_tries, n_startup_trials, skip

    def _study(self, dims: list[Dim], records: list[dict], seed: int) -> optuna.Study:
        import optuna  # optional dependency, kept lazy (see Dim.distribution)
        from optuna.trial import create_trial
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        vals = [v for v in (finite(r.get("val_bpb")) for r in records) if v is not None]
        worst = max(vals) if vals else None
        for r in records:
            v = finite(r.get("val_bpb"))
            if v is None:
                if r.get("status") not in ("crash", "timeout") or worst is None:
                    continue
                v = worst  # a crashed configuration: as bad as the worst score seen
            config = r.get("config") or {}
            params, dists = {}, {}
            for d in dims:
                x = d.coord(d.read(config))
                if x is not None:
                    params[d.key], dists[d.key] = x, d.distribution()
            if params:
                study.add_trial(create_trial(params=params, distributions=dists, value=float(v)))
        return study

    def propose_text(self, text: str, records: list[dict], seq_len: int | None = None) -> tuple[str, str]:
        """(new train file text, description) for the current text and this key's records."""
        constants = parse_block(text)
        dims = make_dims(constants, self.skip)
        if not dims:
            raise SweepError(f"nothing to sweep: no numeric or choice constants between '{BEGIN}' and '{END}'")
        seen = scored_shas(records) | {sha256_text(text)}
        base_seed = int(hashlib.sha256(f"{self.seed}/{len(records)}".encode()).hexdigest()[:8], 16)
        study = self._study(dims, records, base_seed)
        current = {name: c.value for name, c in constants.items()}
        reasons: list[str] = []
        for attempt in range(self.max_tries):
            rng = random.Random(base_seed + attempt)
            trial = study.ask({d.key: d.distribution() for d in dims})
            suggested = {d: d.value(trial.params[d.key]) for d in dims}
            moved = [d for d, v in suggested.items() if v != d.ref]
            if len(moved) < 1 or attempt >= self.max_tries // 2:
                # TPE keeps landing on the best's values (or on scored files): step off it at random.
                d = rng.choice(dims)
                if d.kind == "choice":
                    options = [c for c in d.grid if c != d.ref]
                else:
                    options = [d.value(x) for x in range(d.lo, d.hi + 1) if d.value(x) != d.ref]
                if not options:
                    continue
                suggested[d] = rng.choice(options)
                moved = [d]
            n = 1 if len(moved) == 1 or rng.random() < 0.6 else 2
            moves = {d: suggested[d] for d in rng.sample(moved, n)}
            config = dict(current)
            for d, v in moves.items():
                if d.index is None:
                    config[d.name] = v
                else:
                    elems = list(config[d.name])
                    elems[d.index] = v
                    config[d.name] = tuple(elems)
            why = plausible(config, seq_len)
            if why:
                reasons.append(why)
                continue
            new_text, notes = apply_moves(text, constants, moves)
            if sha256_text(new_text) in seen:
                reasons.append("already scored")
                continue
            return new_text, "sweep: " + ", ".join(notes)
        last = f" (last: {reasons[-1]})" if reasons else ""
        raise SweepError(f"sweep found no unscored configuration in {self.max_tries} tries{last}")

    def propose(self, ctx: Context) -> Proposal:
        path = Path(ctx.repo_dir) / ctx.train_file
        text = path.read_text(encoding="utf-8")
        try:
            new_text, description = self.propose_text(text, ctx.records, ctx.seq_len)
        except (SweepError, ValueError, SyntaxError) as e:
            return Proposal(description="sweep", error=f"sweep: {e}")
        write_atomic(path, new_text.encode("utf-8"))
        return Proposal(description=description)
