"""arun swarm on real Ray clusters, through the CLI as a user runs it.

- Two nodes on one box (loopback addresses 127.0.0.2 and 127.0.0.3, token auth on), started with
  `ray start` exactly as the README's multi-node steps say; the second node's raylet is killed
  mid-experiment: its experiment is recorded once, the swarm finishes on the head, the lost
  worker's worktree is removed, and every record is accounted for.
- Two nodes, two HOMEs (two identity keys): the remote worker ratchets on the head's signed best, the
  records land on autoresearch/<run>, and a third clone verifies them once it trusts the two keys.
- One box: while a local swarm runs, every socket its Ray processes listen on is on loopback.

Linux only (127.0.0.2 and .3 are loopback there, not on macOS). Tier `swarm` (tests/conftest.py): deselect with `-m "not swarm"`.
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
from helpers_repo import make_project, misjudged_runs

# The swarm is the same for both engines; an MLX run costs a third of a torch one on this CPU.
TRAIN = "train_mlx.py"

REPO = Path(__file__).resolve().parents[1]
ARUN = [sys.executable, "-m", "arun.cli"]

pytestmark = [pytest.mark.swarm,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.2/.3 are loopback on Linux")]


def _needs_ray() -> None:
    for mod in ("ray", "mlx.core", "arun.search.loop"):
        pytest.importorskip(mod)
    import ray  # noqa: F401  (psutil comes with Ray: imported after it)


def _procs_with(text: str) -> list:
    import ray  # noqa: F401
    # isort: split
    import psutil
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in a for a in (p.info["cmdline"] or [])) and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            pass
    return found


def _training_under(wt: Path) -> list[int]:
    """Pids of train processes (TRAIN on the command line) working inside the worktree wt."""
    found = []
    for pid in _processes_with_cwd_under(wt):
        try:
            if TRAIN.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
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
    make_project(repo, TRAIN)
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
        swarm = subprocess.Popen([*ARUN, "swarm", "--backend", "mlx", "--address",
                                  f"127.0.0.2:{port}", "--agent", "sweep", "--budget", "2", "--iterations", "5",
                                  "--max-crashes", "0", "--run", run], cwd=repo, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        # Once the second node's worker has been training for a second, its machine goes: the raylet dies.
        # (Its train process, not any process in the worktree: on a busy box the worker's start-up probe
        # runs there for seconds, and a machine lost before its worker started is another story.)
        worktrees = clone / ".arun" / "swarm"
        killed, seen = None, {}
        t_end = time.time() + 150
        while killed is None and swarm.poll() is None and time.time() < t_end:
            for wt in (p for p in worktrees.glob(f"{run}-w*") if p.is_dir()):
                if _training_under(wt):
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
        rc = swarm.wait(timeout=600)  # (a hang guard: about a minute idle, several beside busy loops)
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
    make_project(repo, TRAIN)
    port = _free_port("127.0.0.2")  # nothing listens there
    out = subprocess.run([*ARUN, "swarm", "--backend", "mlx", "--address", f"127.0.0.2:{port}",
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
    make_project(repo, TRAIN)
    log = (tmp_path / "swarm.out").open("w")
    swarm = subprocess.Popen([*ARUN, "swarm", "--backend", "mlx", "--workers", "1", "--agent",
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
    assert "WARNING" not in (tmp_path / "swarm.out").read_text()  # Ray's start-up warnings stay in its logs
    assert addresses and all(is_loopback(a) for a in addresses), addresses
    time.sleep(0.5)
    left = _procs_with(session)
    _end(left)
    assert not left, "Ray processes outlived the swarm"


def _arun(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([*ARUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_homes_remote_ratchet_on_the_verified_best_records_on_a_branch(tmp_path: Path, tiny_data: Path,
                                                                           tiny_cache: Path) -> None:
    """Two nodes, two HOMEs (two identity keys), as two real machines: the remote worker judges against
    the best the head signed, no keep is worse than the best written before it, the records are committed
    on autoresearch/<run>, and a third clone verifies them only once it trusts the lab's keys."""
    _needs_ray()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from arun.core import chain, trust
    repo, clone, third = tmp_path / "repo", tmp_path / "clone", tmp_path / "third"
    repo.mkdir()
    make_project(repo, TRAIN)
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    homes = {n: tmp_path / f"home-{n}" for n in ("head", "node", "third")}
    temp = Path(tempfile.mkdtemp(prefix="arK", dir="/tmp"))
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port("127.0.0.2")
    env = _env(tiny_data, tiny_cache, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    head_env = dict(env, ARUN_HOME=str(homes["head"]))
    run = "trusty"
    try:
        _ray(["start", "--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--include-dashboard", "false",
              "--num-cpus", "1", "--temp-dir", str(temp / "ray"), "--disable-usage-stats"],
             dict(head_env, ARUN_SWARM_REPO=str(repo)), repo)
        _ray(["start", "--address", f"127.0.0.2:{port}", "--node-ip-address", "127.0.0.3", "--num-cpus", "1"],
             dict(env, ARUN_HOME=str(homes["node"]), ARUN_SWARM_REPO=str(clone)), clone)
        out = _arun(["swarm", "--backend", "mlx", "--address", f"127.0.0.2:{port}", "--agent",
                     "sweep", "--budget", "1", "--iterations", "4", "--max-crashes", "0", "--run", run], repo, head_env)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        # The README's teardown: this cluster's processes only, by its --temp-dir (both nodes are on this box).
        down = _arun(["swarm-down", "--temp-dir", str(temp / "ray")], repo, env)
        assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
        time.sleep(0.5)
        assert not _procs_with(str(temp / "ray")), "a Ray process of this cluster outlived swarm-down"
    finally:
        _end(_procs_with(str(temp)))
    text = out.stdout + out.stderr
    print(text)  # shown with -s or on failure
    records = _records(repo, run)
    assert len(records) == 4, text[-2000:]
    # Which worker ran on the second node: its log sits in the clone's .arun/swarm/.
    remote = {int(p.stem.rsplit("-w", 1)[1]) for p in (clone / ".arun" / "swarm").glob(f"{run}-w*.log")}
    assert len(remote) == 1, text[-2000:]
    # (any record: on a busy box the loop's early stop may discard a remote run before it is scored)
    remote_recs = [r for r in records if r["swarm"]["worker"] in remote]
    assert remote_recs, text[-2000:]
    # The ratchet, in ledger order: every keep strictly below the verified best written before it.
    best = None
    for r in records:
        if r["status"] == "keep":
            assert best is None or r["val_bpb"] < best, (r["val_bpb"], best, r["swarm"])
            best = r["val_bpb"]
    assert sum(1 for r in records if r.get("baseline") and r["status"] == "keep") == 1
    # The other workers wait for the baseline, so no other run claims to be one. A worker that cannot verify
    # the best it adopts would: the remote one if it could not verify the head's signed lines, the head's
    # own if the forward of a keep made on the other node never came home (the coordinator corrects each
    # claim and keeps it under `rejudged`; the log check below is exact).
    claims = [r for r in records if (r.get("rejudged") or {}).get("baseline")]
    assert not claims, text[-2000:]
    logs = [(home / ".arun" / "swarm" / f"{run}-w{k}.log").read_text()
            for home in (repo, clone) for k in range(2) if (home / ".arun" / "swarm" / f"{run}-w{k}.log").exists()]
    assert len(logs) == 2 and all("starts from" in log for log in logs), logs
    for log in logs:
        # Each worker's harness judged each run against the best the worker adopted for it.
        assert not misjudged_runs(log), log
    # Committed: a clean tree on the head, the records on the run's branch, no base ref left.
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    refs = subprocess.run(["git", "for-each-ref", f"refs/arun/swarm/{run}/base"], cwd=repo, capture_output=True,
                          text=True).stdout
    assert refs == "" and f"autoresearch/{run} carries the run's records" in text, text[-2000:]
    # A third machine: before trusting the lab's keys the records are foreign, after they verify.
    subprocess.run(["git", "clone", "-q", str(clone), str(third)], check=True)
    subprocess.run(["git", "-C", str(third), "fetch", "-q", str(repo), f"autoresearch/{run}:autoresearch/{run}"],
                   check=True)
    t_env = dict(env, ARUN_HOME=str(homes["third"]))
    before = _arun(["compare", "--ref", f"autoresearch/{run}"], third, t_env)
    assert before.returncode == 0 and "foreign: 4 record(s)" in before.stdout, before.stdout + before.stderr
    for name in ("head", "node"):
        key = _arun(["trust", "show"], third, dict(env, ARUN_HOME=str(homes[name]))).stdout.split()[0]
        assert _arun(["trust", "add", key, "--name", f"lab-{name}"], third, t_env).returncode == 0
    after = _arun(["compare", "--ref", f"autoresearch/{run}"], third, t_env)
    assert "verified: 4 signed by lab-head" in after.stdout and "foreign" not in after.stdout, after.stdout
    # A forged line, chained right but signed by a key nobody trusts: named, never the best.
    subprocess.run(["git", "-C", str(third), "checkout", "-q", f"autoresearch/{run}"], check=True)
    path = next((third / "bench").glob("*/ledger.jsonl"))
    last = json.loads(path.read_text().splitlines()[-1])
    forger = Ed25519PrivateKey.generate()
    fake = {**{k: v for k, v in last.items() if k not in chain.SEAL_FIELDS}, "id": "forged-1", "status": "keep",
            "val_bpb": 0.01, "baseline": False}
    c = chain.chain_of(last["chain"], fake)
    fake.update(prev=last["chain"], chain=c, sig=forger.sign(b"arun-ledger-line:" + c.encode()).hex(),
                sig_key=trust.key_id(forger.public_key()))
    with path.open("a") as f:
        f.write(json.dumps(fake) + "\n")
    forged = _arun(["compare"], third, t_env)
    assert f"signed by key {trust.key_id(forger.public_key())}" in forged.stdout, forged.stdout
    os.environ["ARUN_HOME"], saved = str(homes["third"]), os.environ.get("ARUN_HOME")
    try:
        from arun.core.ledger import Ledger
        from arun.core.ratchet import best_record
        recs = Ledger(path).records()
        assert recs[-1]["_trust"] == "foreign" and best_record(recs, last["key_id"])["id"] != "forged-1"
    finally:
        os.environ.pop("ARUN_HOME") if saved is None else os.environ.update(ARUN_HOME=saved)
    shown = _arun(["log"], third, t_env)
    assert "forged-1" in shown.stdout and "[foreign]" in shown.stdout
    shutil.rmtree(temp, ignore_errors=True)
