"""arun.search.stats: the t distribution from the incomplete beta, Welch's test, and the keep/discard gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from arun.search.noise import significance_decider
from arun.search.stats import best_sample, betainc, chi2_cdf, gate, independent, significantly_better, t_cdf, welch


@pytest.mark.parametrize("x", [0.0, 0.1, 0.37, 0.5, 0.9, 1.0])
def test_betainc_closed_forms(x: float) -> None:
    assert betainc(1, 1, x) == pytest.approx(x, abs=1e-12)               # uniform
    assert betainc(3, 1, x) == pytest.approx(x ** 3, abs=1e-12)          # I_x(a, 1) = x^a
    assert betainc(1, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, abs=1e-12)
    assert betainc(2.5, 4, x) == pytest.approx(1 - betainc(4, 2.5, 1 - x), abs=1e-12)  # symmetry


@pytest.mark.parametrize("t", [-30.0, -2.5, -0.7, 0.0, 0.3, 1.0, 4.2])
def test_t_cdf_matches_closed_forms_for_one_and_two_degrees_of_freedom(t: float) -> None:
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)          # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("t,df,p", [(2.228, 10, 0.975), (2.015, 5, 0.95), (4.541, 3, 0.99), (1.96, math.inf, 0.975),
                                    (-2.576, 1e9, 0.005), (2.042, 30, 0.975)])
def test_t_cdf_matches_printed_tables(t: float, df: float, p: float) -> None:
    assert t_cdf(t, df) == pytest.approx(p, abs=2e-5)


def test_welch_statistic_and_degrees_of_freedom_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    t, df = welch(a, b)
    va, vb = 5 / 3, 4.0  # sample variances
    se2 = va / 4 + vb / 3
    assert t == pytest.approx((2.5 - 4.0) / math.sqrt(se2))
    assert df == pytest.approx(se2 ** 2 / ((va / 4) ** 2 / 3 + (vb / 3) ** 2 / 2))


def test_a_clear_win_is_significant_and_a_change_within_the_noise_is_not() -> None:
    best = [1.100, 1.110, 1.090, 1.105]
    ok, p = significantly_better([1.000, 1.010, 0.990], best, 0.95)
    assert ok and p < 1e-4
    ok, p = significantly_better([1.097, 1.101], best, 0.95)  # lower mean, but well inside the spread
    assert not ok and 0.05 < p < 0.5
    ok, p = significantly_better([1.20, 1.21], best, 0.95)   # worse
    assert not ok and p > 0.99


def test_the_measured_noise_is_a_floor_on_the_spread() -> None:
    # Two runs each that happen to agree to 1e-4 would make a 0.002 gain look certain...
    assert significantly_better([1.000, 1.0001], [1.002, 1.0021], 0.95)[0]
    # ...but not against a measured run-to-run noise of 0.01.
    ok, p = significantly_better([1.000, 1.0001], [1.002, 1.0021], 0.95, noise_std=0.01)
    assert not ok and p > 0.3
    # One run each is testable once the noise is known.
    assert significantly_better([1.0], [1.1], 0.95, noise_std=0.01) == (True, pytest.approx(0.0, abs=1e-9))
    assert not significantly_better([1.0], [1.1], 0.95, noise_std=0.2)[0]


def test_one_sided_sample_borrows_the_other_sides_spread() -> None:
    ok, p = significantly_better([0.90], [1.00, 1.01, 0.99, 1.00], 0.95)
    assert ok and p < 0.01


def test_refuses_what_cannot_be_tested() -> None:
    with pytest.raises(ValueError, match="no spread"):
        significantly_better([1.0], [1.1], 0.95)
    with pytest.raises(ValueError, match="between 0 and 1"):
        significantly_better([1.0, 1.1], [1.1, 1.2], 95)
    with pytest.raises(ValueError):
        significantly_better([], [1.0], 0.9)


def test_a_spread_too_small_to_be_seed_noise_is_not_believed() -> None:
    """A train file that ignores its seed repeats its runs exactly (or a hair apart): a spread of 0 would
    make any difference certain (p = 0). Each side's own spread, and a stored one, is floored at 0.05 %
    of val_bpb; a real difference stays certain."""
    ok, p = significantly_better([1.0, 1.0], [1.1, 1.1], 0.99)
    assert ok and 0 < p < 1e-4
    assert significantly_better([1.1, 1.1], [1.1, 1.1], 0.99)[0] is False
    assert not significantly_better([0.99999, 0.99999], [1.0, 1.0], 0.95)[0]
    assert not significantly_better([0.99999, 0.9999901], [1.0, 1.0000001], 0.95)[0]
    assert not significantly_better([0.999], [1.0], 0.95, noise_std=1e-9)[0]   # a stored spread of a hair
    assert not significantly_better([0.999], [1.0], 0.95, noise_std=0.0)[0]
    assert significantly_better([0.99, 0.99], [1.0, 1.0], 0.95)[0]
    decide = significance_decider(0.95, repo_dir=Path("/nonexistent"), log=None)   # --confidence, no noise stored
    assert decide([0.99999, 0.99999], {**BEST, "val_bpb": 1.0, "val_bpb_seeds": [1.0, 1.0]}, []) == ("discard", True)


BEST = {"val_bpb": 1.100, "val_bpb_seeds": [1.100], "train_sha256": "aaa", "tag": "t", "key_id": "k"}


def test_gate_keeps_clear_wins_and_flags_wins_within_the_noise_as_near_misses() -> None:
    noise = {"std": 0.01, "values": [1.09, 1.11, 1.10], "train_sha256": "aaa"}
    assert gate([1.05], None, 0.95)[:2] == ("keep", False)                     # the baseline
    status, near, info = gate([1.05, 1.051], BEST, 0.95, noise)
    assert (status, near) == ("keep", False) and info["p_value"] < 0.05
    status, near, info = gate([1.095], BEST, 0.95, noise)                     # better, not significantly
    assert (status, near) == ("discard", True) and info["p_value"] > 0.05
    assert gate([1.101], BEST, 0.95, noise)[:2] == ("discard", True)         # worse, within 0.002
    assert gate([1.2], BEST, 0.95, noise)[:2] == ("discard", False)          # worse
    assert gate([1.0], BEST, 0.95, None)[:2] == ("keep", False)              # nothing to test with: plain rule


def test_best_sample_includes_noise_runs_of_the_same_train_file_only() -> None:
    assert best_sample(BEST, {"std": 0.01, "values": [1.09, 1.11], "train_sha256": "aaa"}) == [1.1, 1.09, 1.11]
    assert best_sample(BEST, {"std": 0.01, "values": [1.09, 1.11], "train_sha256": "bbb"}) == [1.1]


@pytest.mark.unit
def test_a_noise_run_that_repeats_one_of_the_bests_seeds_counts_once() -> None:
    """The baseline ran at seed 42 and `arun noise` starts at 42 too: the same run twice would halve
    nothing but the spread."""
    best = {**BEST, "seeds": [42], "val_bpb_seeds": [1.1]}
    noise = {"std": 0.01, "values": [1.1, 1.09, 1.11], "seeds": [42, 43, 44], "train_sha256": "aaa"}
    assert best_sample(best, noise) == [1.1, 1.09, 1.11]
    assert best_sample({**best, "seeds": [7]}, noise) == [1.1, 1.1, 1.09, 1.11]          # no seed in common
    assert best_sample(best, {**noise, "seeds": [[42], 43, 44]}) == [1.1, 1.1, 1.09, 1.11]  # not a seed: kept
    assert best_sample({**best, "seeds": [1]}, {**noise, "seeds": [True, 43, 44]}) == [1.1, 1.1, 1.09, 1.11]
    assert best_sample({**best, "seeds": 42}, noise) == [1.1, 1.1, 1.09, 1.11]             # a crafted record
    # A hand-edited noise file: what is not a finite number is not a measurement (and stops nothing).
    odd = {**noise, "values": ["1.0", float("nan"), True], "seeds": [5, 6, 7]}
    assert best_sample(best, odd) == [1.1]
    assert best_sample(best, {**noise, "values": "1.09"}) == [1.1]
    assert gate([1.0], {**best, "val_bpb": 1.1}, 0.95, odd)[0] == "keep"  # (and the gate decides, no ValueError)


def test_decider_reads_the_noise_file_of_the_bests_key(tmp_path: Path) -> None:
    (tmp_path / "bench" / "t").mkdir(parents=True)
    (tmp_path / "bench" / "t" / "noise.json").write_text(json.dumps(
        {"k": {"key_id": "k", "std": 0.05, "values": [1.05, 1.15, 1.1], "train_sha256": "aaa"}}))
    lines: list[str] = []
    decide = significance_decider(0.95, repo_dir=tmp_path, log=lines.append)
    assert decide([1.08], BEST, []) == ("discard", True)       # 0.02 better, noise 0.05: not enough
    assert "noise std 0.05" in lines[-1] and "near miss" in lines[-1]
    assert decide([0.80], BEST, []) == ("keep", False)
    assert significance_decider(0.95, repo_dir=tmp_path, noise_std=0.001, log=None)([1.08], BEST, []) == ("keep", False)
    with pytest.raises(ValueError):
        significance_decider(1.5)


def test_a_key_s_spread_measured_again_may_rise_but_never_fall(tmp_path: Path) -> None:
    """Measured again on a later best that ignores its seed, the spread would be about 0 and the
    confirmation gate would keep anything: the key keeps the largest spread it has measured."""
    from arun.search.noise import load_noise, save_noise
    entry = {"key_id": "k", "tag": "t", "values": [1.0, 1.02, 0.98], "n": 3}
    save_noise(tmp_path, "t", {**entry, "std": 0.02})
    save_noise(tmp_path, "t", {**entry, "std": 0.0})
    stored = load_noise(tmp_path, "t", "k")
    assert stored is not None and (stored["std"], stored["measured_std"]) == (0.02, 0.0)
    save_noise(tmp_path, "t", {**entry, "std": 0.03})
    assert load_noise(tmp_path, "t", "k")["std"] == 0.03
    for bad in (math.inf, -1.0, 1e300, "0.1"):   # not a spread: none stored, rather than a gate turned off or a crash
        (tmp_path / "bench" / "t" / "noise.json").write_text(json.dumps({"k": {**entry, "std": bad}}))
        assert load_noise(tmp_path, "t", "k") is None
        (tmp_path / "bench" / "t" / "noise.json").write_text(json.dumps({"k": {**entry, "std": bad, "std_floor": 0.02}}))
        assert load_noise(tmp_path, "t", "k")["std"] == 0.02    # ... but the floor measured before still holds


@pytest.mark.timeout(20)
@pytest.mark.parametrize("x", [0.0, 0.01, 0.3, 1.0, 4.0, 12.0, 1e12])
def test_chi2_cdf_matches_closed_forms(x: float) -> None:
    assert chi2_cdf(x, 1) == pytest.approx(math.erf(math.sqrt(x / 2)), abs=1e-12)
    assert chi2_cdf(x, 2) == pytest.approx(1 - math.exp(-x / 2), abs=1e-12)
    assert chi2_cdf(x, 4) == pytest.approx(1 - math.exp(-x / 2) * (1 + x / 2), abs=1e-12)


def test_runs_that_agree_too_closely_to_be_seed_noise_count_as_one() -> None:
    assert independent([1.0, 1.0, 1.0], 0.01) == [1.0]
    assert independent([1.0, 1.00001, 0.99999], 0.01) == [pytest.approx(1.0)]   # a hair of noise added
    assert independent([1.0, 1.002, 0.998], 0.01) == [pytest.approx(1.0)]       # a fifth of it: still a copy
    assert independent([1.0, 1.01, 0.99], 0.01) == [1.0, 1.01, 0.99]            # seed noise of that size
    assert independent([1.0, 1.0], None) == [1.0, 1.0]                          # nothing to compare with
    assert independent([1.0, 1.0001, 0.9999], 1e-4) == [1.0, 1.0001, 0.9999]    # a key below the 0.05 % floor
    assert independent([1e308, -1e308], 0.01) == [1e308, -1e308]                # beyond floats: not a copy
    # The significance gate of a multi-seed run: identical seeds are one run, real ones three.
    best = {**BEST, "val_bpb": 1.0, "val_bpb_seeds": [1.0]}
    status, _, details = gate([0.99835] * 3, best, 0.9, {"std": 0.001})
    assert (status, details["candidate_n"], details["counted_as_one"]) == ("discard", 1, 3)
    status, _, details = gate([0.99735, 0.99935, 0.99835], best, 0.9, {"std": 0.001})
    assert (status, details["candidate_n"]) == ("keep", 3) and "counted_as_one" not in details


def test_a_measured_spread_of_zero_is_no_spread_anywhere(tmp_path: Path) -> None:
    """A baseline that ignores its seed measures a std of 0; every reader treats it as nothing measured
    (the loop's --confidence refusal, the gates, the swarm's warning), not as certainty."""
    from types import SimpleNamespace

    from arun.search.loop import spread_missing
    from arun.search.noise import load_noise, measured_spread
    from arun.swarm.driver import measured_noise, spread_warnings
    (tmp_path / "bench" / "t").mkdir(parents=True)
    (tmp_path / "bench" / "t" / "noise.json").write_text(json.dumps({"k": {
        "key_id": "k", "std": 0.0, "std_floor": 0.0, "values": [1.1] * 3, "seeds": [42, 43, 44], "train_sha256": "aaa"}}))
    assert load_noise(tmp_path, "t", "k")["std"] == 0.0 and measured_spread(tmp_path, "t", "k") is None
    assert spread_missing(tmp_path, SimpleNamespace(tag="t", key_id="k"), 1, 0.95)
    assert measured_noise(tmp_path) == {} and spread_warnings({0: {"tag": "t", "key_id": "k"}}, {}, "cuda")
    lines: list[str] = []
    assert significance_decider(0.95, repo_dir=tmp_path, log=lines.append)([1.0999], BEST, []) == ("keep", False)
    assert "no spread known: plain comparison" in lines[-1]  # the plain rule, and it says so


@pytest.mark.parametrize("std", [1e-9, 1e-160, 1e-200])
def test_no_stored_spread_or_noise_value_crashes_or_stalls_a_gate(std: float) -> None:
    """A tiny stored std (load_noise accepts any number in [0, 1e6)) or huge noise values reach the
    gates as numbers: they decide, at once, without an exception that would cost the run its record."""
    from arun.search.policy import ConfirmingDecider
    best = {**BEST, "val_bpb": 1.0, "val_bpb_seeds": [1.0]}
    status, _, _ = ConfirmingDecider(0.9, noise_std=std, log=None)([0.99, 0.994, 0.988], best, [])
    assert status in ("keep", "discard")
    status, _, details = gate([0.99], best, 0.95, {"train_sha256": "aaa", "std": std, "values": [1e308, -1e308, 1e6],
                                                    "seeds": [43, 44, 45]})
    assert status in ("keep", "discard") and details["best_n"] == 1  # none of those is a val_bpb
    # One seed far off (a file that outputs confident nonsense for it) decides at once too.
    assert gate([0.998, 1.0, 700.0], {**best, "val_bpb_seeds": [1.0, 1.001, 0.999]}, 0.9, {"std": std})[0] == "discard"
    assert gate([0.99, 0.98, 0.5], {**best, "val_bpb_seeds": [1.0, 1.001, 0.999]}, 0.9, {"std": std})[0] == "discard"
