"""
The harness's side of the boundary: it hands an exported forward to the fixed evaluator process
(`python -m engines.score`) and reads back the verdict. The number of record comes from here,
never from the train process: what crosses is a regular-file copy the harness made (copy_artifact)
and the verdict line on the evaluator's stdout, never a file in the run folder.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from arun.core import confine
from arun.core.process import child_env, end_tree, last_error_line
from engines import __file__ as _engines_init
from engines.atomic import write_json
from engines.fingerprint import fixed_files
from engines.forward_file import SUFFIX, ArtifactError, read_artifact
from engines.score import VERDICT_MARKER

SCORE_TIMEOUT_FLOOR = 300.0  # a cold compile of the evaluator's graph on a slow machine


class BoundaryError(Exception):
    """What the run left as its artifact cannot cross the boundary (one line: what and how to fix it)."""


def copy_artifact(src: Path, dest: Path) -> None:
    """Copies the run's artifact to `dest` (a folder only the harness can write) if it is a plain regular
    file of its own: no symlink, fifo or device, no second hard link (a name for a file the train process
    could not read, or one it still writes through), at most MAX_ARTIFACT_BYTES. Called once the train
    process and all it started are gone."""
    try:
        st = os.lstat(src)
    except OSError as e:
        raise BoundaryError(f"{src.name}: no exported forward ({e.strerror}); did the run call finish_run?") from e
    if not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a fifo" if stat.S_ISFIFO(st.st_mode) else "not a file"
        raise BoundaryError(f"{src.name} is {kind}, not a regular file: only the forward export_forward wrote "
                            f"crosses to the evaluator")
    if st.st_nlink != 1:
        raise BoundaryError(f"{src.name} has {st.st_nlink} hard links: only a file of its own crosses to the evaluator")
    try:
        data = read_artifact(src)   # O_NOFOLLOW, non-blocking, bounded; and the same file as lstat saw
    except ArtifactError as e:
        raise BoundaryError(str(e)) from e
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def read_verdict(stdout: str, nonce: str) -> dict | None:
    """The one verdict line carrying our nonce, or None (the evaluator failed before it printed one)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(f"{VERDICT_MARKER} {nonce} ")]
    if len(lines) != 1:
        return None
    try:
        verdict = json.loads(lines[0][len(VERDICT_MARKER) + len(nonce) + 2:])
    except json.JSONDecodeError:
        return None
    return verdict if isinstance(verdict, dict) else None


def fixed_code_root() -> Path:
    """The folder holding the installed prepare.py, engines/ and arun_data/."""
    return Path(_engines_init).resolve().parents[1]


def score_artifact(backend: str, artifact: Path, data_dir: Path, out: Path | None = None, *, device: str | None = None,
                   split: str = "val", expect_fixed_sha: str | None = None,
                   timeout: float = SCORE_TIMEOUT_FLOOR, fixed_from: Path | None = None,
                   test_below: float | None = None) -> dict:
    """Scores `artifact` on the fixed rows of `split`; returns the verdict (with `error` and no score
    when it could not be scored) and adds `wall_seconds`, the harness's view of the process, and
    `confined`/`confinement`.
    The artifact is copied (copy_artifact) into a fresh folder only the harness can write, and the
    evaluator sees only that copy; the verdict comes back on the evaluator's stdout, marked with a
    nonce sent on its stdin. `out`: the harness also writes the verdict there, for people (it never
    reads it back). test_below: also score the test rows in the same process when val_bpb is below it.
    fixed_from: a project whose fixed code (engines.fingerprint.fixed_files, nothing else) the
    evaluator runs, copied into its private folder; else the installed arun's (copied the same way)."""
    nonce = secrets.token_hex(16)
    t0 = time.perf_counter()
    # The working directory is a fresh folder (mode 0700, outside the repo) the harness alone writes:
    # nothing the agent left in the repo can shadow a module the evaluator imports (-I keeps the
    # working folder off sys.path as well), and the artifact's copy lives there. It is removed
    # however scoring ends (an interrupt or a timeout ends the evaluator's whole tree first).
    with tempfile.TemporaryDirectory(prefix="arun-score-") as cwd:
        copy = Path(cwd) / f"forward{SUFFIX.get(backend, '')}"
        try:
            copy_artifact(Path(artifact), copy)
        except BoundaryError as e:
            return {"error": f"INVALID: {e}", "wall_seconds": time.perf_counter() - t0}
        args = ["--backend", backend, "--artifact", str(copy), "--data-dir", str(data_dir), "--split", split,
                "--nonce-stdin"]
        if device:
            args += ["--device", device]
        if expect_fixed_sha:
            args += ["--expect-fixed-sha", expect_fixed_sha]
        if test_below is not None:
            args += ["--test-below", repr(float(test_below))]
        env = child_env(data_dir, device)
        env.pop("PYTHONPATH", None)
        # (The installed code's fixed files by default: under -I -S the evaluator finds nothing else,
        # and the confined process reads these copies, not the project folder around them.)
        # Only the fixed files cross over: the key's fixed_code_sha256 is their hash, and no other
        # file of the project (an agent's numpy.py, a stale .pyc) can shadow a module.
        source = Path(fixed_from) if fixed_from is not None else fixed_code_root()
        for rel in fixed_files(source):
            (Path(cwd) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, Path(cwd) / rel)
        # Isolated (-I -S): no PYTHON* variable, user site, .pth or sitecustomize, confined or not.
        cmd = confine.isolated_module("engines.score", args, first=Path(cwd))
        # Confined where the OS can: it reads the data, fixed code and its copy, writes its own folder
        # only; then it seals itself before loading the artifact (engines.score).
        policy = confine.scorer_policy(data_dir, copy, Path(cwd), Path(cwd) / "tmp")
        policy.read.append(Path(cwd))
        run = confine.wrap(policy, cmd, env)
        proc = subprocess.Popen(run.cmd, cwd=cwd, env=run.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(nonce + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            end_tree(proc)  # SIGTERM first: the jail's supervisor reaps the detached part of the tree
            proc.communicate()
            return {"error": f"the evaluator did not finish in {timeout:.0f}s", "wall_seconds": timeout, **run.fields()}
        except BaseException:
            end_tree(proc)
            raise
    wall = time.perf_counter() - t0
    verdict = read_verdict(stdout, nonce)
    if verdict is None:
        tail = last_error_line(stderr.splitlines() + stdout.splitlines())
        verdict = {"error": f"the evaluator failed (exit {proc.returncode}): {tail}"}
    if proc.returncode != 0 and "error" not in verdict:
        verdict["error"] = f"the evaluator exited {proc.returncode}"
    verdict.update(wall_seconds=wall, **run.fields())
    if out is not None:
        write_json(out, verdict)   # (replaces whatever is there, a planted symlink included)
    return verdict
