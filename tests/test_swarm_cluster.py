"""arun swarm on real Ray clusters, through the CLI as a user runs it.

- Two nodes on one box (loopback addresses 127.0.0.2 and 127.0.0.3, token auth on), started with
  `ray start` exactly as the README's multi-node steps say; the second node's raylet is killed
  mid-experiment: its experiment is recorded once, the swarm finishes on the head, the lost
  worker's worktree is removed, and every record is accounted for.
- One box: while a local swarm runs, every socket its Ray processes listen on is on loopback.

Linux only (127.0.0.2 and .3 are loopback there, not on macOS). Deselect with `-m "not swarm"`.
Ray's processes are found by their own temp folder and ended by pid (never `ray stop`, which ends
every Ray instance of this user on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from arun.swarm.procs import _processes_with_cwd_under
from helpers_repo import make_project

REPO = Path(__file__).resolve().parents[1]
ARUN = [sys.executable, "-m", "arun.cli"]

pytestmark = [pytest.mark.swarm,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2/.3 are loopback on Linux")]


def _needs_ray() -> None:
    for mod in ("ray", "torch", "arun.search.loop"):
        pytest.importorskip(mod)
    import ray  # noqa: F401  (psutil comes with Ray: imported after it)


def _procs_with(text: str) -> list:
    import ray  # noqa: F401
    import psutil
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            pass
    return found


def _end(procs: list) -> None:
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass


def _env(tiny_data: Path, tiny_cache: Path, **extra: str) -> dict:
    env = dict(os.environ, ARUN_CACHE=str(tiny_cache), ARUN_DATA_DIR=str(tiny_data), ARUN_DEVICE="cpu",
               OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict, cwd: Path) -> None:
    out = subprocess.run(["ray", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def _records(repo: Path, run: str) -> list[dict]:
    lines = [line for p in (repo / "bench").glob("*/ledger.jsonl") for line in p.read_text().splitlines() if line.strip()]
    return [r for r in map(json.loads, lines) if (r.get("swarm") or {}).get("run") == run]


def test_two_nodes_with_auth_a_lost_node_is_accounted_for(tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> None:
    _needs_ray()
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    repo.mkdir()
    make_project(repo, "train_cuda.py")
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    # Ray's unix sockets live under its temp folder: a short path, and it names this test's processes.
    temp = Path(tempfile.mkdtemp(prefix="arT", dir="/tmp"))
    token = temp / "auth_token"  # the README's ~/.ray/auth_token, here shared by both nodes of this box
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port("127.0.0.2")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
            # Not in the README: the head notices a lost node within seconds instead of half a minute.
            "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3"}
    env = _env(tiny_data, tiny_cache, **auth)
    run = "two"
    try:
        _ray(["start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--include-dashboard", "false",
              "--num-cpus", "1", "--temp-dir", str(temp / "ray"), "--disable-usage-stats"],
             dict(env, ARUN_SWARM_REPO=str(repo)), repo)
        _ray(["start", "--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3", "--num-cpus", "1"],
             dict(env, ARUN_SWARM_REPO=str(clone)), clone)
        log = (tmp_path / "swarm.out").open("w")
        swarm = subprocess.Popen([*ARUN, "swarm", "--backend", "cuda", "--device", "cpu", "--address",
                                  f"127.0.0.2:{port}", "--agent", "sweep", "--budget", "2", "--iterations", "5",
                                  "--max-crashes", "0", "--run", run], cwd=repo, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        # Once the second node's worker has been training for a second, its machine goes: the raylet dies.
        worktrees = clone / ".arun" / "swarm"
        killed, seen = None, {}
        t_end = time.time() + 150
        while killed is None and swarm.poll() is None and time.time() < t_end:
            for wt in (p for p in worktrees.glob(f"{run}-w*") if p.is_dir()):
                if _processes_with_cwd_under(wt):
                    seen.setdefault(wt, time.time())
                    if time.time() - seen[wt] > 1.0:
                        raylet = [p for p in _procs_with("127.0.0.3") if "raylet" in p.name()]
                        assert raylet, "no raylet for the second node"
                        raylet[0].send_signal(signal.SIGKILL)
                        killed = wt
                else:
                    seen.pop(wt, None)
            time.sleep(0.1)
        assert killed is not None, (tmp_path / "swarm.out").read_text()[-3000:]
        rc = swarm.wait(timeout=240)
        out = (tmp_path / "swarm.out").read_text()
        assert rc == 0, out[-3000:]
    finally:
        if "swarm" in locals() and swarm.poll() is None:
            swarm.kill()
        _end(_procs_with(str(temp)))
    k = int(killed.name.rsplit("-w", 1)[1])
    records = _records(repo, run)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    lost = [r for r in records if r["swarm"]["worker"] == k and r["status"] == "crash"]
    assert len(lost) == 1 and "left the Ray cluster" in lost[0]["error"] and "Ray restarted it" not in lost[0]["error"]
    later = records[records.index(lost[0]) + 1:]
    assert later and all(r["swarm"]["worker"] != k for r in later)  # the swarm went on with the head's worker
    assert re.search(rf"swarm {run}: {len(records)} experiment\(s\)", out), out[-2000:]  # every record accounted for
    assert f"w{k} stopped early" in out and "Ray's logs: " + str(temp / "ray") in out
    assert not killed.exists() and not _processes_with_cwd_under(killed)  # on this box's disk: removed
    assert "Traceback" not in out and "(raylet" not in out and "gcs_client" not in out
    time.sleep(0.5)
    assert not _procs_with(str(temp)), "a Ray process of this test is still running"
    shutil.rmtree(temp, ignore_errors=True)


def test_join_failures_are_one_line_and_leave_no_ref(tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> None:
    _needs_ray()
    repo = tmp_path / "repo"
    repo.mkdir()
    make_project(repo, "train_cuda.py")
    port = _free_port("127.0.0.2")  # nothing listens there
    out = subprocess.run([*ARUN, "swarm", "--backend", "cuda", "--device", "cpu", "--address", f"127.0.0.2:{port}",
                          "--run", "nope"], cwd=repo, env=_env(tiny_data, tiny_cache), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    text = (out.stdout + out.stderr).strip()
    assert len(text.splitlines()) == 1 and "nothing answers at" in text and "ray start --head" in text, text
    refs = subprocess.run(["git", "-C", str(repo), "for-each-ref", "refs/arun"], capture_output=True, text=True)
    assert refs.stdout == ""


def _listening(procs: list) -> set[str]:
    import psutil
    found = set()
    for p in procs:
        try:
            found |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return found


def test_one_box_ray_listens_on_loopback_only(tmp_path: Path, tiny_data: Path, tiny_cache: Path) -> None:
    _needs_ray()
    import psutil
    from arun.swarm.cluster import is_loopback
    repo = tmp_path / "repo"
    repo.mkdir()
    make_project(repo, "train_cuda.py")
    log = (tmp_path / "swarm.out").open("w")
    swarm = subprocess.Popen([*ARUN, "swarm", "--backend", "cuda", "--device", "cpu", "--workers", "1", "--agent",
                              "sweep", "--budget", "2", "--iterations", "1", "--run", "lo"], cwd=repo,
                             env=_env(tiny_data, tiny_cache), stdout=log, stderr=subprocess.STDOUT)
    addresses: set[str] = set()
    session = None
    try:
        me = psutil.Process(swarm.pid)
        while swarm.poll() is None:
            text = (tmp_path / "swarm.out").read_text()
            m = re.search(r"Ray's logs \(workers, raylets\): (\S+)/logs", text)
            session = session or (m and m.group(1))
            try:
                tree = [me, *me.children(recursive=True)]
            except psutil.Error:
                break
            addresses |= _listening(tree + (_procs_with(session) if session else []))
            time.sleep(0.2)
        assert swarm.wait(timeout=180) == 0, (tmp_path / "swarm.out").read_text()[-3000:]
    finally:
        if swarm.poll() is None:
            swarm.kill()
    assert session, (tmp_path / "swarm.out").read_text()[-2000:]
    assert addresses and all(is_loopback(a) for a in addresses), addresses
    time.sleep(0.5)
    left = _procs_with(session)
    _end(left)
    assert not left, "Ray processes outlived the swarm"
