"""The suite's own scheduling: each test file runs whole on one xdist worker, and the Ray files (and the
files that compile MLX kernels) on one worker together. When this breaks, nothing fails loudly: module
fixtures are built twice (minutes of training each), two Ray clusters fight over the cores, and MLX
kernels are compiled twice from a cold cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import os, pathlib, time, pytest

@pytest.mark.parametrize("i", range({count}))
def test_probe(i):
    out = pathlib.Path(os.environ["PROBE_OUT"])
    out.joinpath(f"{{__name__}}-{{i}}").write_text(os.environ.get("PYTEST_XDIST_WORKER", "none") + f" {{time.monotonic_ns()}}")
    time.sleep({sleep})
'''


def throwaway_suite(proj: Path) -> None:
    """A project holding only the real conftest.py and pyproject's pytest settings (two workers)."""
    (proj / "tests").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", proj / "tests" / "conftest.py")
    pyproject = (REPO / "pyproject.toml").read_text()
    (proj / "pyproject.toml").write_text(pyproject[pyproject.index("[tool.pytest.ini_options]"):]
                                         .split("\n[tool.", 1)[0].replace("-n auto", "-n 2"))


def pytest_in(proj: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_AUTO_NUM_WORKERS", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "tests"], cwd=proj,
                          env=env, capture_output=True, text=True, timeout=300)


def test_each_file_runs_on_one_worker_and_the_ray_files_on_one_worker_together(tmp_path: Path) -> None:
    proj, out = tmp_path / "proj", tmp_path / "out"
    throwaway_suite(proj)
    out.mkdir()
    # Real file names from the suite's tier table: two Ray files and four others, three of them with more
    # tests than the Ray unit (xdist's own order, by test count, would hand those out first).
    counts = {"test_swarm.py": 4, "test_swarm_cluster.py": 4, "test_stats.py": 12, "test_sweep.py": 12,
              "test_chain.py": 12, "test_atomic.py": 4, "test_mlx.py": 2, "test_conformance.py": 2}
    names = list(counts)
    # test_mlx.py is slow, so the other worker takes the units after it: test_conformance.py would land
    # there if the two were not one unit.
    for name, count in counts.items():
        (proj / "tests" / name).write_text(PROBE.format(count=count, sleep=1.0 if name == "test_mlx.py" else 0))
    r = pytest_in(proj, PROBE_OUT=str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    seen: dict[str, set[str]] = {}
    started: list[tuple[int, str, str]] = []  # (when, worker, file)
    for f in out.iterdir():
        worker, when = f.read_text().split()
        seen.setdefault(f.name.rsplit("-", 1)[0], set()).add(worker)
        started.append((int(when), worker, f.name.rsplit("-", 1)[0]))
    assert sorted(seen) == sorted(n[:-3] for n in names), json.dumps(sorted(seen))
    assert all(len(w) == 1 and "none" not in w for w in seen.values()), seen
    assert seen["test_swarm"] == seen["test_swarm_cluster"], seen
    assert seen["test_mlx"] == seen["test_conformance"], seen      # the MLX kernel cache is per worker
    assert len(set().union(*seen.values())) == 2, seen  # both workers had work
    # The slowest tier first: on its worker, the Ray unit ran before anything else.
    (ray_worker,) = seen["test_swarm"]
    first = min(t for t in started if t[1] == ray_worker)
    assert first[2] in ("test_swarm", "test_swarm_cluster"), sorted(started)


def test_a_test_without_exactly_one_tier_fails_in_one_line_with_or_without_workers(tmp_path: Path) -> None:
    """A new file missing from the tier table, or a test marked with two tiers, fails by name with the fix;
    the rest of the suite still runs, and no -m selection hides it."""
    proj = tmp_path / "proj"
    throwaway_suite(proj)
    (proj / "tests" / "test_chain.py").write_text("def test_tiered():\n    pass\n")
    (proj / "tests" / "test_brand_new.py").write_text("def test_untiered():\n    pass\n")
    (proj / "tests" / "test_sweep.py").write_text("import pytest\n\n\n@pytest.mark.e2e\n@pytest.mark.unit\ndef test_twice():\n    pass\n")
    for args in ((), ("-n", "0"), ("-m", "e2e"), ("-n", "0", "-m", "unit")):
        r = pytest_in(proj, *args, COLUMNS="300")
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "INTERNALERROR" not in out, (args, out[-3000:])
        assert "test_brand_new.py has no tier: add it to TIER_OF_FILE in tests/conftest.py" in out, (args, out[-3000:])
        assert "test_sweep.py::test_twice has two tiers (e2e, unit): keep one" in out, (args, out[-3000:])
        assert ("1 passed, 2 errors" if args in ((), ("-n", "0"), ("-n", "0", "-m", "unit")) else "2 errors") in out, \
            (args, out[-3000:])
