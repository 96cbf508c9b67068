"""The suite's own scheduling: each test file runs whole on one xdist worker, and the Ray files on one
worker together. When this breaks, nothing fails loudly: module fixtures are built twice (minutes of
training each) and two Ray clusters fight over the cores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = '''
import json, os, pathlib, pytest

@pytest.mark.parametrize("i", range(4))
def test_probe(i):
    out = pathlib.Path(os.environ["PROBE_OUT"])
    out.joinpath(f"{__name__}-{i}").write_text(os.environ.get("PYTEST_XDIST_WORKER", "none"))
'''


def test_each_file_runs_on_one_worker_and_the_ray_files_on_one_worker_together(tmp_path: Path) -> None:
    proj, out = tmp_path / "proj", tmp_path / "out"
    (proj / "tests").mkdir(parents=True)
    out.mkdir()
    shutil.copy(REPO / "tests" / "conftest.py", proj / "tests" / "conftest.py")
    # Real file names from the suite's tier table: two Ray files and four others.
    names = ["test_swarm.py", "test_swarm_cluster.py", "test_stats.py", "test_sweep.py", "test_chain.py",
             "test_atomic.py"]
    for name in names:
        (proj / "tests" / name).write_text(PROBE)
    pyproject = (REPO / "pyproject.toml").read_text()
    (proj / "pyproject.toml").write_text(pyproject[pyproject.index("[tool.pytest.ini_options]"):]
                                         .split("\n[tool.", 1)[0].replace("-n auto", "-n 2"))
    env = dict(os.environ, PROBE_OUT=str(out))
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_AUTO_NUM_WORKERS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=proj,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    seen: dict[str, set[str]] = {}
    for f in out.iterdir():
        seen.setdefault(f.name.rsplit("-", 1)[0], set()).add(f.read_text())
    assert sorted(seen) == sorted(n[:-3] for n in names), json.dumps(sorted(seen))
    assert all(len(w) == 1 and "none" not in w for w in seen.values()), seen
    assert seen["test_swarm"] == seen["test_swarm_cluster"], seen
    assert len(set().union(*seen.values())) == 2, seen  # both workers had work
