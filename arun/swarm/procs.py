"""Finding and stopping the processes a worker leaves behind in its worktree (train runs, agents)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def _processes_with_cwd_under(root: Path) -> list[int]:
    """Processes whose working directory is inside `root`: the train runs and agent commands a
    killed worker leaves behind (they outlive it, and would hold its GPU)."""
    root_s = str(Path(root).resolve())
    me = os.getpid()
    found: list[int] = []
    if Path("/proc").is_dir():
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == root_s or cwd.startswith(root_s + os.sep):
                found.append(int(entry))
        return found
    try:  # macOS and other systems without /proc: lsof lists every process's cwd
        out = subprocess.run(["lsof", "-a", "-d", "cwd", "-Fpn"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return found
    pid = None
    for line in out.splitlines():
        if line.startswith("p"):
            pid = int(line[1:])
        elif line.startswith("n") and pid is not None and pid != me:
            cwd = line[1:]
            if cwd == root_s or cwd.startswith(root_s + os.sep):
                found.append(pid)
    return found


def kill_processes_in(root: Path, grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace` seconds, for every process working inside `root`."""
    return stop_pids(_processes_with_cwd_under(root), grace)


def ray_processes(temp_dir: Path) -> list[int]:
    """This machine's processes of the Ray cluster started with `ray start --temp-dir temp_dir`: each
    names that folder on its command line (a node joining the cluster takes the head's), so another
    Ray instance of the same user is never among them."""
    import ray  # noqa: F401  (Ray brings psutil: imported after it, as Ray's own modules do)
    # isort: split
    import psutil
    root, me = str(Path(temp_dir).expanduser().resolve()), os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            args = proc.info["cmdline"] or []
        except psutil.Error:
            continue
        if proc.pid != me and any(a == root or root + os.sep in a or a.endswith("=" + root) for a in args):
            found.append(proc.pid)
    return found


def stop_pids(pids: list[int], grace: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the pids signalled last."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if not alive or sig == signal.SIGKILL:
            break
        t_end = time.time() + grace
        while time.time() < t_end and any(_alive(p) for p in alive):
            time.sleep(0.1)
        pids = [p for p in alive if _alive(p)]
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (dead, not yet reaped by its parent) is gone for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True
