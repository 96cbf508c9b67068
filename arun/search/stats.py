"""
Is a change really better, or just a lucky seed? Pure statistics for the keep/discard gate.

A five-minute run is noisy (seed, data order, and how many steps fit in the wall-clock
budget all move val_bpb), so with `--confidence C` a change is kept only when a one-sided
Welch t-test says its mean val_bpb is lower than the best's at that confidence.

The Student-t CDF is computed here from the regularized incomplete beta function
(a Lentz continued fraction over `math.lgamma`), so no scipy is needed. A spread measured
by `arun noise` (the standard deviation of the best train file over several seeds) acts as
a floor on each side's spread: two runs that happen to agree closely do not make a tiny
difference look significant.
"""

from __future__ import annotations

import math
import statistics

from arun.core.numbers import finite
from arun.core.ratchet import NEAR_MISS

# --------------------------------------------------------------------------- distributions

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got {a}, {b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def chi2_cdf(x: float, k: float) -> float:
    """P(X <= x) for a chi-square variable with k degrees of freedom: the regularized lower incomplete
    gamma P(k/2, x/2), by its power series (used here for small x, where it converges at once)."""
    if k <= 0 or math.isnan(x):
        raise ValueError(f"chi2_cdf needs a number x and k > 0, got x={x}, k={k}")
    if x <= 0:
        return 0.0
    a, y = k / 2.0, x / 2.0
    if y > a + 40.0 + 10.0 * math.sqrt(a):  # past the mode by far more than the tail holds: 1 to double precision
        return 1.0
    term = total = 1.0 / a
    for n in range(1, int(y) + 500):
        term *= y / (a + n)
        total += term
        if term < 1e-16 * total:
            break
    return min(1.0, math.exp(a * math.log(y) - y - math.lgamma(a)) * total)


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom (df = inf: the normal distribution)."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        raise ValueError(f"t_cdf needs a number t and df > 0, got t={t}, df={df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(df) or df > 1e7:
        return normal_cdf(t)
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


# --------------------------------------------------------------------------- the test

# The smallest run-to-run spread believed, relative to val_bpb: 0.05 %. Seeds move val_bpb by about 0.2 %
# on an H100 at 5 minutes and 0.8 % for the tiny CPU model; a train file that ignores its seed (or adds a
# hair of it) shows 0, and a spread of 0 would make any difference certain (p = 0).
MIN_REL_SPREAD = 5e-4


# Runs that agree far more closely than the measured spread allows did not draw fresh randomness: a train
# file that ignores ARUN_SEED repeats its first run, and three copies of one lucky draw are not three
# runs. Below this chi-square lower tail ((n-1) s^2 / noise^2 on n-1 degrees of freedom) a side's runs
# count as one. An honest side lands there 5 % of the time, and then only loses the extra runs' weight
# (simulated: a real win of 1 std is kept 30.9 % of the time instead of 31.3 %); at 1 % a file that
# adds a third of the spread as seed jitter kept its excess (13.1 % vs 11.1 %), at 5 % it keeps 11.5 %.
TOO_TIGHT = 0.05


def independent(values: list[float], noise_std: float | None) -> list[float]:
    """`values` as the runs they are: unchanged, or their mean alone when they agree too closely to be
    seed noise of the measured spread (TOO_TIGHT)."""
    n = len(values)
    if n < 2 or noise_std is None or not math.isfinite(noise_std) or noise_std <= 0:
        return list(values)
    # (against the measured spread itself, not the gate's 0.05 % floor: a key whose seeds move val_bpb
    # less than that has honest runs that close together)
    try:
        x = (n - 1) * statistics.variance(values) / noise_std ** 2
        tight = chi2_cdf(x, n - 1) < TOO_TIGHT
    except (ArithmeticError, ValueError):  # values too far apart for floats: certainly not too tight
        return list(values)
    return [statistics.fmean(values)] if tight else list(values)


def _spread(values: list[float], noise_std: float | None, min_std: float = 0.0) -> tuple[float | None, float]:
    """(variance, degrees of freedom) of one side. A known noise spread is a floor; a variance
    taken from it is treated as known (infinite degrees of freedom). min_std floors a side's own
    variance too (never creates one where there is none)."""
    n = len(values)
    var = statistics.variance(values) if n >= 2 else None
    if noise_std is not None:
        floor = max(float(noise_std), min_std) ** 2
        if var is None or var < floor:
            return floor, math.inf
    if var is not None and var < min_std ** 2:
        var = min_std ** 2
    return var, (n - 1 if var is not None else math.nan)


def welch(candidate: list[float], best: list[float], noise_std: float | None = None) -> tuple[float, float]:
    """(t, df) of Welch's test of mean(candidate) - mean(best). When one side has a single value
    and no noise_std is known, it borrows the other side's variance (equal spread assumed).
    ValueError when neither side has any spread information."""
    if not candidate or not best:
        raise ValueError("both samples need at least one value")
    if noise_std is not None and (not math.isfinite(noise_std) or noise_std < 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    min_std = MIN_REL_SPREAD * abs(statistics.fmean([*candidate, *best]))
    vc, dfc = _spread(candidate, noise_std, min_std)
    vb, dfb = _spread(best, noise_std, min_std)
    if vc is None:  # one side without a spread borrows the other's
        if vb is None:
            raise ValueError("no spread to test against: give one side at least two values, or a noise_std "
                             "(arun noise measures one)")
        vc, dfc = vb, dfb
    elif vb is None:
        vb, dfb = vc, dfc
    nc, nb = len(candidate), len(best)
    diff = statistics.fmean(candidate) - statistics.fmean(best)
    a, b = vc / nc, vb / nb
    se2 = a + b
    if se2 <= 0:
        return (-math.inf if diff < 0 else math.inf if diff > 0 else 0.0), math.inf
    # Welch–Satterthwaite; a side whose variance is known (df = inf) contributes nothing to the denominator.
    den = (a * a / dfc if math.isfinite(dfc) else 0.0) + (b * b / dfb if math.isfinite(dfb) else 0.0)
    df = se2 * se2 / den if den > 0 else math.inf
    return diff / math.sqrt(se2), df


def significantly_better(candidate: list[float], best: list[float], confidence: float,
                         noise_std: float | None = None) -> tuple[bool, float]:
    """One-sided Welch t-test that the candidate's mean val_bpb is LOWER than the best's.
    Returns (better at this confidence, p-value). confidence in (0, 1), e.g. 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    t, df = welch(candidate, best, noise_std)
    p = t_cdf(t, df)
    return p < 1.0 - confidence, p


# --------------------------------------------------------------------------- the decision hook

def is_seed(s: object) -> bool:
    """A seed as the harness hands them out: an int (JSON's true is not seed 1)."""
    return isinstance(s, int) and not isinstance(s, bool)


def best_sample(best: dict, noise: dict | None = None) -> list[float]:
    """Every val_bpb measured for the best train file: its own seeds, plus the runs of `arun noise`
    when those were of the same file (same train_sha256). A noise run with a seed the best already ran
    (both start at the train file's SEED) repeats that run, so it is counted once: twice would shrink
    the measured spread and pass a gate the data do not."""
    own_values = best.get("val_bpb_seeds")
    values = numbers(own_values if isinstance(own_values, list) else []) or numbers([best["val_bpb"]])
    if noise and noise.get("train_sha256") and noise.get("train_sha256") == best.get("train_sha256"):
        extra, seeds = noise.get("values"), noise.get("seeds")
        extra = list(extra) if isinstance(extra, list) else []
        if isinstance(seeds, list) and len(seeds) == len(extra):
            own = {s for s in best.get("seeds") or [] if is_seed(s)} if isinstance(best.get("seeds"), list) else set()
            extra = [v for seed, v in zip(seeds, extra) if not (is_seed(seed) and seed in own)]
        values += numbers(extra)
    return values


def best_runs(best: dict, noise: dict | None, noise_std: float | None) -> list[float]:
    """The best's side of every gate: its runs (best_sample), copies counted once (independent)."""
    return independent(best_sample(best, noise), noise_std)


def numbers(values: list) -> list[float]:
    """The numbers among `values` that can be a val_bpb (finite, above 0, below 1e6): a hand-edited
    noise file may hold anything."""
    return [v for v in map(finite, values) if v is not None and 0 < v < 1e6]


def gate(vals: list[float], best: dict | None, confidence: float, noise: dict | None = None,
         near_miss: float = NEAR_MISS) -> tuple[str, bool, dict]:
    """(status, near_miss, details) for a scored experiment under the significance gate.

    - no best yet: keep (the baseline);
    - mean lower than the best and significantly so: keep;
    - mean lower but within the noise: discard, flagged near miss;
    - otherwise: discard, a near miss when within `near_miss` of the best."""
    if best is None:
        return "keep", False, {"reason": "baseline"}
    mean = statistics.fmean(vals)
    noise_std = finite(noise.get("std")) if noise else None
    if mean >= best["val_bpb"]:
        details: dict = {"candidate_n": len(vals), "best_n": len(best_sample(best, noise)), "noise_std": noise_std,
                         "reason": "not lower than the best"}
        return "discard", mean - best["val_bpb"] <= near_miss, details
    runs, (vals, sample) = len(vals), (independent(vals, noise_std), best_runs(best, noise, noise_std))
    details = {"candidate_n": len(vals), "best_n": len(sample), "noise_std": noise_std}
    if len(vals) < runs:
        details["counted_as_one"] = runs
    try:
        ok, p = significantly_better(vals, sample, confidence, noise_std)
    except ValueError:
        # One run on each side and no noise measurement: nothing to test against, so the plain
        # rule decides (callers check up front and warn; see arun.search.loop.preflight).
        details["reason"] = "no spread known: plain comparison"
        return "keep", False, details
    details["p_value"] = p
    details["reason"] = f"p = {p:.4g} {'<' if ok else '>='} {1 - confidence:.4g}"
    return ("keep", False, details) if ok else ("discard", True, details)
