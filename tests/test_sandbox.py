"""
OS confinement: real processes launched through engines.sandbox try to read and write
what a train file must not touch, and must fail with an error naming the path; an
honest process (numpy, torch, MLX, compilers, temp files, children) must not notice.
The Seatbelt profile cannot run here, so its text is checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engines import sandbox
from engines.sandbox import Policy, confined_command, seatbelt_profile, training_policy
from helpers_repo import empty_repo

CONFINED, WHY = sandbox.available()
linux = pytest.mark.skipif(not (CONFINED and sys.platform.startswith("linux")),
                           reason=f"no Landlock confinement here: {WHY}")


@pytest.fixture
def project(tmp_path: Path) -> dict[str, Path]:
    """A repo with ledgers, runs and git history, and a data cache with val and test rows beside the shards."""
    repo = empty_repo(tmp_path / "repo")
    (repo / "prepare.py").write_text("X = 1\n")
    (repo / "engines").mkdir()
    (repo / "engines" / "__init__.py").write_text("")
    (repo / "train_cuda.py").write_text("print('training')\n")
    (repo / "run.log").write_text("val_bpb: 1.0\n")
    (repo / "bench" / "cpu-test").mkdir(parents=True)
    (repo / "bench" / "cpu-test" / "ledger.jsonl").write_text('{"val_bpb": 1.0}\n')
    other, run = repo / ".arun" / "runs" / "other", repo / ".arun" / "runs" / "me"
    other.mkdir(parents=True)
    run.mkdir()  # the harness makes the run folder before it launches the run
    (other / "weights0.npz").write_bytes(b"weights")
    data = tmp_path / "cache" / "pystdlib-tiny"
    data.mkdir(parents=True)
    for name in ("tokenizer.pkl", "token_bytes.npy", "manifest.json", "train_00000.bin", "train_00000.idx.npy",
                 "val_rows.npy", "test_rows.npy"):
        (data / name).write_bytes(name.encode())
    (tmp_path / "cache" / "raw").mkdir()
    (tmp_path / "cache" / "raw" / "val_shard.parquet").write_bytes(b"raw val")
    return {"repo": repo, "data": data, "run": run, "temp": tmp_path / "tmp", "other": other,
            "policy": training_policy(repo, data, run, tmp_path / "tmp")}


def confined(project: dict[str, Path], code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = confined_command(project["policy"], [sys.executable, "-c", textwrap.dedent(code)])
    return subprocess.run(cmd, cwd=project["repo"], capture_output=True, text=True, timeout=timeout)


def denied(proc: subprocess.CompletedProcess, path: Path) -> bool:
    return proc.returncode != 0 and f"PermissionError: [Errno 13] Permission denied: '{path}'" in proc.stderr


@pytest.mark.unit
def test_available_says_what_or_why():
    ok, text = sandbox.available()
    assert isinstance(ok, bool) and text


@linux
def test_allowed_files_read(project):
    d, repo = project["data"], project["repo"]
    proc = confined(project, f"""
        for p in {[str(d / n) for n in ("tokenizer.pkl", "manifest.json", "train_00000.bin")]!r}:
            open(p).read()
        import os, prepare
        print(prepare.X, sorted(os.listdir({str(d)!r}))[0], open({str(repo / 'train_cuda.py')!r}).read().strip())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "manifest.json", "print('training')"]


@linux
@pytest.mark.parametrize("target", ["val_rows", "test_rows", "raw_val", "other_weights", "ledger", "git", "run_log"])
def test_secret_reads_denied(project, target):
    repo, d = project["repo"], project["data"]
    path = {"val_rows": d / "val_rows.npy", "test_rows": d / "test_rows.npy",
            "raw_val": d.parent / "raw" / "val_shard.parquet", "other_weights": project["other"] / "weights0.npz",
            "ledger": repo / "bench" / "cpu-test" / "ledger.jsonl", "git": repo / ".git" / "HEAD",
            "run_log": repo / "run.log"}[target]
    proc = confined(project, f"open({str(path)!r}, 'rb').read()")
    assert denied(proc, path), proc.stderr


@linux
def test_cache_listing_denied(project):
    """Other datasets and the raw downloads stay unlisted; the repo's names are listable (imports need it)."""
    cache = project["data"].parent
    proc = confined(project, f"import os; os.listdir({str(cache)!r})")
    assert denied(proc, cache), proc.stderr


@linux
@pytest.mark.parametrize("target", ["repo", "train_file", "bench", "other_run", "site_packages"])
def test_writes_outside_the_run_denied(project, target):
    repo = project["repo"]
    path = {"repo": repo / "new.py", "train_file": repo / "train_cuda.py",
            "bench": repo / "bench" / "cpu-test" / "ledger.jsonl", "other_run": project["other"] / "weights0.npz",
            "site_packages": Path(sandbox.sysconfig.get_paths()["purelib"]) / "sitecustomize.py"}[target]
    before = path.read_bytes() if path.exists() else None
    proc = confined(project, f"open({str(path)!r}, 'a').write('x')")
    assert denied(proc, path), proc.stderr
    assert (path.read_bytes() if path.exists() else None) == before


@linux
def test_run_folder_and_temp_writable(project):
    run = project["run"]
    proc = confined(project, f"""
        import os, tempfile
        os.makedirs({str(run / 'a')!r}); os.makedirs({str(run / 'b')!r})
        open({str(run / 'a' / 'w.npz')!r}, 'w').write('x')
        os.replace({str(run / 'a' / 'w.npz')!r}, {str(run / 'b' / 'w.npz')!r})  # across folders (REFER)
        with tempfile.NamedTemporaryFile() as f:
            f.write(b'x'); f.flush()
            print(os.path.dirname(f.name))
    """)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == project["temp"].resolve()
    assert (run / "b" / "w.npz").read_text() == "x"


@linux
def test_children_inherit_confinement(project):
    val = project["data"] / "val_rows.npy"
    proc = confined(project, f"""
        import subprocess, sys
        child = subprocess.run(["sh", "-c", "cat {val}"], capture_output=True, text=True)
        print(child.returncode, child.stderr.strip())
        subprocess.run([sys.executable, "-c", "open({str(val)!r})"], check=True)
    """)
    assert "Permission denied" in proc.stdout and not proc.stdout.startswith("0")
    assert denied(proc, val), proc.stderr


@linux
@pytest.mark.skipif(sandbox.landlock_abi() < 6, reason="signal scoping needs Landlock ABI 6")
def test_cannot_signal_the_harness(project):
    proc = confined(project, "import os; os.kill(os.getppid(), 0)")
    assert "PermissionError: [Errno 1] Operation not permitted" in proc.stderr


@linux
def test_frameworks_work_confined(project):
    """torch (inductor writes its cache and runs the C++ compiler) and MLX (CPU JIT kernels) under confinement."""
    pytest.importorskip("torch")
    pytest.importorskip("mlx.core")
    proc = confined(project, """
        import numpy as np, torch, mlx.core as mx
        a = torch.randn(8, 8)
        f = torch.compile(lambda x: torch.relu(x @ x) + 1)
        assert torch.allclose(f(a), torch.relu(a @ a) + 1)
        x = mx.random.normal((8, 8))
        g = mx.compile(lambda x: mx.exp(x @ x) * 2)
        assert np.allclose(np.array(g(x)), np.exp(np.array(x @ x)) * 2, rtol=1e-4)
        print("ok")
    """, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert (project["temp"] / "mlx").is_dir() and (project["temp"] / "torchinductor").is_dir()


@pytest.mark.unit
@pytest.mark.parametrize("grant", ["folder", "file"])
def test_hidden_area_under_a_grant_is_refused(tmp_path, grant):
    val = tmp_path / "val_rows.npy"
    val.write_text("x")
    with pytest.raises(ValueError, match="val_rows.npy would be readable through"):
        Policy(read=[tmp_path if grant == "folder" else val], hide=[val], system=False).check()


def test_rules_fit_the_abi(project):
    rules = dict(sandbox.landlock_rules(project["policy"], abi=1))
    tokenizer = (project["data"] / "tokenizer.pkl").resolve()
    assert rules[tokenizer] == sandbox.READ_FILE | sandbox.EXECUTE  # a file rule carries file rights only
    assert (project["data"] / "val_rows.npy").resolve() not in rules
    assert project["repo"].resolve() not in rules or rules[project["repo"].resolve()] == sandbox.READ_DIR
    newer = sandbox.REFER | sandbox.TRUNCATE | sandbox.IOCTL_DEV
    assert all(r & newer == 0 for r in rules.values())
    assert rules[project["run"].resolve()] & newer == 0
    assert dict(sandbox.landlock_rules(project["policy"], abi=7))[project["run"].resolve()] & newer == newer


def test_launcher_needs_a_command():
    proc = subprocess.run([sys.executable, sandbox.__file__, "--read", "/usr"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no command given" in proc.stderr


def _clause(profile: str, op: str) -> str:
    return next(line for line in profile.splitlines() if line.startswith(f"(deny {op}"))


def test_seatbelt_profile(project):
    project["temp"].mkdir()
    profile = seatbelt_profile(project["policy"])
    repo, d = project["repo"].resolve(), project["data"].resolve()
    assert profile.startswith("(version 1)\n(allow default)\n")
    reads, writes = _clause(profile, "file-read-data"), _clause(profile, "file-write*")
    hidden, reopened = reads.split("(require-not", 1)
    for area in (repo / "bench", repo / ".arun", repo / ".git", repo / "run.log", d.parent):
        assert f'(subpath "{area}")' in hidden
    for secret in ("val_rows.npy", "test_rows.npy"):
        assert str(d / secret) not in profile
    assert f'(literal "{d / "tokenizer.pkl"}")' in reopened and f'(subpath "{project["run"].resolve()}")' in reopened
    assert str(project["other"].resolve()) not in profile
    allowed = re.findall(r'\((?:subpath|literal) "([^"]+)"\)', writes)
    assert str(project["run"].resolve()) in allowed and str(project["temp"].resolve()) in allowed
    assert not any(Path(p) == repo or repo in Path(p).parents and Path(p) != project["run"].resolve() for p in allowed)
    depth = 0
    for ch in profile:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0


@pytest.mark.unit
def test_seatbelt_quotes_paths(tmp_path):
    odd = tmp_path / 'a "quoted" \\ folder'
    odd.mkdir()
    profile = seatbelt_profile(Policy(write=[odd], system=False))
    assert '(subpath "' + str(odd).replace("\\", "\\\\").replace('"', '\\"') + '")' in profile
