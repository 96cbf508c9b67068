"""Shared fixtures: one tiny prepared corpus per test session, built by the real prepare path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# MLX's CPU backend compiles kernels into $TMPDIR/mlx/ and writes each library in place, so two
# workers compiling the same kernel at once could load a half-written one: a cache per worker
# (kept across sessions, like the shared one it replaces).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile
    _own_tmp = Path(tempfile.gettempdir()) / f"arun-tests-{os.environ['PYTEST_XDIST_WORKER']}"
    _own_tmp.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(_own_tmp)
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arun-cache")


@pytest.fixture(scope="session")
def tiny_data(tiny_cache: Path) -> Path:
    """pystdlib at the `tiny` profile (64-token rows, 8K eval tokens, vocab 512): offline and a few seconds."""
    from arun_data import build
    old = os.environ.get("ARUN_CACHE")
    os.environ["ARUN_CACHE"] = str(tiny_cache)
    try:
        return build.prepare("pystdlib", "tiny", log=lambda s: None)
    finally:
        if old is None:
            os.environ.pop("ARUN_CACHE", None)
        else:
            os.environ["ARUN_CACHE"] = old


@pytest.fixture
def data_env(tiny_data: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points this test (and subprocesses it starts) at the tiny corpus."""
    monkeypatch.setenv("ARUN_CACHE", str(tiny_cache))
    monkeypatch.setenv("ARUN_DATA_DIR", str(tiny_data))
    return tiny_data


@pytest.fixture(autouse=True, scope="session")
def ledger_key_home(tmp_path_factory: pytest.TempPathFactory):
    """The machine's ledger key lives in a test folder, never in the user's ~/.config/arun."""
    old = os.environ.get("ARUN_HOME")
    os.environ["ARUN_HOME"] = str(tmp_path_factory.mktemp("arun-home"))
    yield
    if old is None:
        os.environ.pop("ARUN_HOME", None)
    else:
        os.environ["ARUN_HOME"] = old


# Every test belongs to exactly one tier, so `pytest -m unit` is a quick, honest first check:
#   unit    pure functions, small real MLX/torch tensors, small git repos, about a second each: no
#           training run, no `arun` subprocess, no Ray, no browser (the whole tier runs in about a minute)
#   e2e     the real `arun` CLI, a real training run in a subprocess, or seconds of real compute
#           (a whole model exported, probed or stepped)
#   faults  injected failures (kills, full disks, broken pipes) through the real harness
#   swarm   a real Ray cluster
#   browser headless Chromium
# A file's tier comes from this table; a test in a mixed file says its own with @pytest.mark.<tier>.
TIERS = ("unit", "e2e", "faults", "swarm", "browser")
TIER_OF_FILE = {
    "test_stats.py": "unit", "test_download.py": "unit", "test_sweep.py": "unit", "test_prepare_hub.py": "unit",
    "test_conformance.py": "unit", "test_probe.py": "unit", "test_forward_rules.py": "unit",
    "test_imports.py": "unit", "test_suite.py": "unit", "test_chain.py": "unit", "test_atomic.py": "unit", "test_steplines.py": "unit",
    "test_faults.py": "faults",
    "test_swarm.py": "swarm", "test_swarm_cluster.py": "swarm",
    "test_artifact.py": "e2e", "test_calibrate.py": "e2e", "test_compare.py": "e2e", "test_cuda.py": "e2e",
    "test_early.py": "e2e", "test_gpu_check.py": "e2e", "test_harness.py": "e2e", "test_heldout.py": "e2e",
    "test_integrity.py": "e2e", "test_ledger.py": "e2e", "test_loop.py": "e2e", "test_mlx.py": "e2e",
    "test_prepare.py": "e2e", "test_report.py": "e2e", "test_retention.py": "e2e", "test_rough_edges.py": "e2e",
    "test_sandbox.py": "e2e", "test_score.py": "e2e", "test_first_hour.py": "e2e",
    "attacks/test_artifact_ops.py": "e2e", "attacks/test_boundary.py": "e2e", "attacks/test_carry.py": "e2e",
    "attacks/test_confinement.py": "e2e", "attacks/test_evaluator.py": "e2e", "attacks/test_jail.py": "e2e",
    "attacks/test_ledger.py": "e2e", "attacks/test_time.py": "e2e",
}


# The suite runs on several cores (pytest-xdist, `-n auto --dist loadfile` in pyproject.toml). A test
# file goes to one worker whole, so its module fixtures are built once; the Ray files share one unit
# of work (one cluster at a time on the box); the slowest tiers are handed out first, so no worker is
# left with a long file at the end while the other idles. The grouping is this file's own scheduler
# (pytest_xdist_make_scheduler below), not xdist_group markers: xdist's loadgroup renames node ids
# through a pytest internal that pytest 9.2 no longer reads, and then silently spreads every test alone.
MAX_WORKERS = 4          # beyond this, more workers only fight over memory and the disk
# One worker more than the cores: a test spends part of its time waiting (a subprocess starting, git, a
# poll), and the extra worker fills it. The whole suite on an idle 2-core box: 765 s with 3 workers and
# 798 s with 4 (one session, same tree), 874 s with 2 (the same tests, the session before).
EXTRA_WORKERS = 1
FIRST = ("swarm", "faults", "e2e", "browser", "unit")
# pyproject's 600 s timeout is a hang guard. A whole swarm scenario (a module fixture, timed with the
# first test that uses it) takes about 3 minutes on an idle 2-core box and three times that beside
# busy loops; a slow box is not a hang.
SLOW_TIERS = {"swarm": 1800, "faults": 1200}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: the cores plus EXTRA_WORKERS, at most MAX_WORKERS (PYTEST_XDIST_AUTO_NUM_WORKERS overrides)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").isdigit():
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores + EXTRA_WORKERS, MAX_WORKERS))


# Files that compile MLX kernels on the CPU run on one worker: kernels are cached per worker (TMPDIR
# above), so on a fresh machine (CI) the second file reuses most of the first's. Measured from a cold
# cache, one after the other: 32 s, then 9 s instead of about 30 s.
SHARED_UNITS = {"test_conformance.py": "mlx-compile", "test_mlx.py": "mlx-compile"}


def unit_of_work(nodeid: str) -> str:
    """The part of the suite one worker runs whole: a test file, "swarm" for all the Ray files, or a
    SHARED_UNITS name."""
    path = nodeid.split("::", 1)[0]
    rel = path.split("tests/", 1)[-1]
    return "swarm" if TIER_OF_FILE.get(rel) == "swarm" else SHARED_UNITS.get(rel, path)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadfile`, with the Ray files as one unit (other --dist modes are xdist's own)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByUnit(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_work(nodeid)

    return ByUnit(config, log)


# A test without exactly one tier fails with a one-line reason, under xdist as without it (a UsageError
# raised on a worker reaches the user as an INTERNALERROR traceback that never shows the message). It
# carries every tier, so no -m selection leaves it out.
NO_TIER = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        own = {m.name for m in item.iter_markers() if m.name in TIERS}
        key = Path(item.path).resolve().relative_to(tests_dir).as_posix()
        if len(own) > 1:
            item.stash[NO_TIER] = f"{item.nodeid} has two tiers ({', '.join(sorted(own))}): keep one"
        elif not own and key not in TIER_OF_FILE:
            item.stash[NO_TIER] = (f"{key} has no tier: add it to TIER_OF_FILE in tests/conftest.py "
                                   f"(or mark the test @pytest.mark.<tier>, one of {', '.join(TIERS)})")
        if NO_TIER in item.stash:
            for tier in TIERS:
                if tier not in own:
                    item.add_marker(tier)
            continue
        if not own:
            item.add_marker(TIER_OF_FILE[key])
        tier = next(m.name for m in item.iter_markers() if m.name in TIERS)
        if tier in SLOW_TIERS:
            item.add_marker(pytest.mark.timeout(SLOW_TIERS[tier]))  # (a test's own timeout marker comes first)
    # A file's place is its slowest tier's; within a file, the order the file gives.
    rank = {}
    for item in items:
        key = item.path
        tier = next(m.name for m in item.iter_markers() if m.name in TIERS)
        rank[key] = min(rank.get(key, len(FIRST)), FIRST.index(tier))
    items.sort(key=lambda item: rank[item.path])


def pytest_runtest_setup(item: pytest.Item) -> None:
    if NO_TIER in item.stash:
        pytest.fail(item.stash[NO_TIER], pytrace=False)
