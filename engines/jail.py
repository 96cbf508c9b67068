"""
The process jail: nothing a confined command starts outlives it.

A process group is not enough: a child that calls setsid() (or double-forks and lets its parent
exit) leaves the group, survives `killpg` and can keep training off the clock, hand weights to the
next run or rewrite files the harness reads later. So `python -m engines.sandbox` does not exec the
command itself: it stays as a small supervisor that

  1. marks itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux >= 3.4, no privileges), so
     every orphan of the tree, however it detached, is reparented to it rather than to init;
  2. forks the command (which then confines itself and execs);
  3. when the command exits, or the harness sends SIGTERM/SIGINT/SIGHUP, or the harness dies (its
     parent-death signal), SIGKILLs every process beneath it, round after round, until none is left;
  4. exits with the command's status (a death by signal is passed on as the same signal).

Why not a PID namespace or a cgroup: a PID namespace needs CLONE_NEWUSER when unprivileged, which
many distributions switch off (Debian's and Ubuntu's AppArmor userns restriction, hardened
kernels), and cgroup v2 needs a delegated subtree (systemd --user) that containers and CI rarely
have. The subreaper works unprivileged on every Linux, inside containers too. Its limit: the
supervisor must stay alive, so the command must not be able to kill it. Under Landlock ABI >= 6
the command may not signal (or ptrace) anything outside its sandbox, the supervisor included; on
older kernels and where the run is unconfined a hostile command could SIGKILL its supervisor first
(SECURITY.md, not defended). macOS has no subreaper: there the process group is all there is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER = 1, 4, 24, 28, 36
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def supported() -> bool:
    return sys.platform.startswith("linux")


def _prctl(option: int, value: int) -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def make_undumpable() -> None:
    """Other processes of the same user can no longer read our /proc/<pid>/environ, mem or fds (unless
    they hold CAP_SYS_PTRACE, which drop_root_powers takes from the confined command). Core dumps
    and debuggers attaching are off for this process too; nothing else changes for it."""
    if supported():
        _prctl(PR_SET_DUMPABLE, 0)


def drop_root_powers() -> None:
    """Where the harness runs as root (containers, CI): the command keeps uid 0 but no capability,
    now or after exec (no CAP_SYS_PTRACE to read other processes' /proc entries, no CAP_DAC_OVERRIDE,
    no CAP_NET_RAW...). Landlock confines root all the same; this closes what capabilities open
    beside it. For a normal user every call fails with EPERM, and there is nothing to drop."""
    for option, value in ((PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL),
                          (PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)):
        with contextlib.suppress(OSError):
            _prctl(option, value)
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != 1:  # EINVAL: past the last capability this kernel knows
                break


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # gone between the listing and the read
        return None
    # The name (field 2) may hold spaces and parentheses: the fields after the last ')' are fixed.
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def descendants(root: int) -> list[int]:
    """Every living process beneath `root`, found through /proc (children before their own children)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _parent_of(name)
            if parent is not None:
                children.setdefault(parent, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all_beneath() -> None:
    """SIGKILLs every process beneath this one and reaps it, until no child is left. A process that
    forks between our listing and our kill has a dead parent, so its child is reparented here (we are
    the subreaper) and is found in the next round."""
    me = os.getpid()
    while True:
        for pid in descendants(me):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return
        except InterruptedError:
            continue


def _exit_like(status: int) -> NoReturn:
    """Ends this process the way the command ended: the same exit code, or the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


class _Stopped(Exception):
    pass


def supervise(start: Callable[[], NoReturn]) -> NoReturn:
    """Runs `start` (which confines and execs the command) in a child and reaps the whole tree."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    make_undumpable()
    stop: list[int] = []

    def on_stop(sig: int, _frame: object) -> None:
        stop.append(sig)
        raise _Stopped  # (a handler that returns would let waitpid resume: PEP 475)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_stop)
    # The harness dying (even by SIGKILL) reaches us as SIGTERM, and we take the tree with us.
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # it died before the line above
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the command never outlives its supervisor
            drop_root_powers()
            start()
        finally:
            os._exit(126)
    status = None
    try:
        while status is None and not stop:
            try:
                waited, st = os.waitpid(-1, 0)  # reaps orphans that exit on their own as well
            except ChildProcessError:
                break
            if waited == pid:
                status = st
    except _Stopped:
        pass
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # now nothing interrupts the sweep
    kill_all_beneath()  # the command's leftovers, or everything when we were told to stop
    if status is None:
        status = signal.SIGKILL if not stop else stop[0]  # a raw signal number: WIFSIGNALED
    _exit_like(status)
