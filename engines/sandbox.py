"""
OS confinement for processes that run code the harness does not trust: the train
file, and under `arun loop` the coding agent. The kernel enforces what such a process
may read and write, so a train file cannot train on the val rows, read another run's
weights or a ledger, or write anywhere but its run folder and a private temp folder.

    python -m engines.sandbox --read PATH ... --write PATH ... --temp DIR -- CMD ARGS...

applies the policy to itself and then execs CMD, so any command can be confined (the
confinement is inherited across exec and fork). From Python: `available()`, `Policy`,
`training_policy()`, `confined_command()`, `sandbox_env()`, `seatbelt_profile()`.

Linux: Landlock (kernel >= 5.13, no privileges needed). Landlock is an allow-list of
path hierarchies and single files: reads are granted on the system and Python
locations, on each allowed file of the data folder (so val_rows.npy beside the train
shards stays unreadable) and on each allowed top-level entry of the repo; writes on
the run folder, the temp folder and FRAMEWORK_WRITABLE. Anything else fails with
`PermissionError: [Errno 13] Permission denied: '<path>'`. Two limits of an allow-list
of hierarchies: Python's import system must list the repo folder (to find prepare.py
and engines/), and a listing grant covers every folder beneath, so names under
bench/, .arun/ and .git can be listed though never read; and files created after
launch in a read-only place stay unreadable. On ABI >= 6 the process also may not
signal processes outside its sandbox (the harness, its jail) nor reach abstract unix sockets made
outside it; on ABI >= 4 a policy without `network` (the train process, the evaluator) may not bind
or connect any TCP socket (no rule = denied). The launcher does not exec the command itself: it stays
as the jail's supervisor (engines/jail.py), so nothing the command starts outlives it, and it runs
`-I -S` (no .pth or sitecustomize). The environment a process without network gets is ENV_ALLOWED.

Why our own ~150 lines of ctypes (Landlock) and prctl (the jail) rather than bubblewrap or nsjail:
those build on mount and PID namespaces, which need unprivileged user namespaces (off by default on
Debian/Ubuntu with AppArmor's restriction, on hardened kernels, in many containers) or a setuid
binary, and they are one more program to install and keep current; a machine without them would
fall back to no confinement at all. Landlock needs no privilege and no binary, and together with a
child subreaper it gives the same guarantees here: file allow-list, no TCP, no signals or abstract
sockets out, nothing outliving the run. What it cannot give (a private /dev/shm, hiding /proc) we
avoid needing: /dev/shm is not granted, /proc of other processes is closed by non-dumpability and,
under root, by dropping every capability.
We call the three Landlock syscalls through ctypes (about 60 lines below) rather than
the PyPI `landlock` package: that package is an alpha pre-release (1.0.0.devN, which
pip does not pick without --pre), it grants the same rights to files and folders (the
kernel refuses folder rights on a file rule, and file rules are what keep val_rows.npy
out), and it does not know signal scoping (ABI 6).

macOS: Seatbelt via `sandbox-exec -p PROFILE`. Python and Metal need many system
locations that are impractical to enumerate, so the profile allows reads by default,
denies reading the contents of the hidden areas (the data cache, bench/, .arun/, .git,
run.log) except the files the policy lists, and denies every write outside the
writable folders (plus the per-user cache folder, where Metal keeps compiled shaders).

What torch and MLX need: TMPDIR points at the private temp folder, which is where MLX's
CPU backend writes its JIT kernels (<tmp>/mlx/<version>/cpu) and where gcc writes its
scratch files; torch inductor, Triton and the CUDA JIT caches are pointed into it by
FRAMEWORK_ENV. Python's own packages are read-only (a .pth dropped into site-packages
would run inside the evaluator; .pyc files are then simply not written). /dev is open
for device ioctls (GPU drivers), except /dev/shm and /dev/mqueue (storage shared by every run).
Add locations with ARUN_SANDBOX_EXTRA_READ and ARUN_SANDBOX_EXTRA_WRITE (colon-separated
paths), read by the launcher when it applies the policy.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Locations every confined process may read (hierarchies; missing ones are skipped).
SYSTEM_READ = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc", "/proc", "/sys",
               "/run/systemd/resolve"]
# Writable besides the run folder and the temp folder: nothing. /dev/shm was here (torch tensors
# shared with DataLoader workers, multiprocessing semaphores) but it is one folder shared by every
# run, so run N could leave weights there for run N+1; neither torch on the CPU or GPU in a single
# process nor MLX needs it. It stays out of the /dev grant too (DEV_HIDDEN). A machine that needs it
# back: ARUN_SANDBOX_EXTRA_WRITE=/dev/shm (and accept that runs can then talk to each other).
FRAMEWORK_WRITABLE: list[str] = []
# Parts of /dev that are shared storage or channels between processes, not devices.
DEV_HIDDEN = ["/dev/shm", "/dev/mqueue"]
# Caches the frameworks would otherwise write in the home folder or /tmp, relative to the temp folder.
FRAMEWORK_ENV = {"TMPDIR": "", "TMP": "", "TEMP": "", "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
                 "TRITON_CACHE_DIR": "triton", "CUDA_CACHE_PATH": "nv"}
# Top-level entries of the repo a train file never reads: ledgers, run folders, history, and the
# untracked results.tsv upstream's agents keep (tolerated beside a run: arun.core.gitops.UPSTREAM_LEFTOVERS).
REPO_HIDDEN = {".git", "bench", ".arun", "run.log", "results.tsv"}
# Files of a prepared data folder a train file needs; everything else (val and test rows) stays out.
DATA_READABLE = ("tokenizer.pkl", "token_bytes.npy", "manifest.json", "train_*")

# The environment of a train process and of the evaluator: these names and prefixes only (what the
# frameworks, the C runtime and the train-file contract read), and never a name that looks like a
# secret, whatever its prefix. Everything else the harness inherited (the user's API keys, tokens,
# SSH agent socket, cloud credentials) stays behind. The loop's agent keeps its environment: it
# needs its own API key.
ENV_ALLOWED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TERM", "SHELL", "PWD",
               "TMPDIR", "TMP", "TEMP", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SYSTEMROOT", "COLUMNS", "NO_COLOR")
ENV_ALLOWED_PREFIXES = ("LC_", "ARUN_", "PYTHON", "CUDA_", "NVIDIA_", "NCCL_", "CUBLAS_", "CUDNN_", "TORCH",
                        "PYTORCH_", "TRITON_", "INDUCTOR_", "MLX_", "METAL_", "MTL_", "OMP_", "KMP_", "MKL_",
                        "OPENBLAS_", "VECLIB_", "GOTO_", "BLIS_", "HIP_", "ROCM_", "HSA_", "ROCR_")
ENV_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSW", "CREDENTIAL", "AUTH", "COOKIE", "SESSION")


def scrub_env(env: dict[str, str]) -> dict[str, str]:
    """`env` reduced to ENV_ALLOWED: the frameworks' variables in, secrets and everything else out."""
    def allowed(name: str) -> bool:
        upper = name.upper()
        if any(word in upper for word in ENV_SECRET_WORDS):
            return False
        return upper in ENV_ALLOWED or upper.startswith(ENV_ALLOWED_PREFIXES)
    return {k: v for k, v in env.items() if allowed(k)}


# ---------------------------------------------------------------------------
# Landlock (Linux)
# ---------------------------------------------------------------------------

# The Landlock syscalls have the same numbers on every architecture but alpha.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
SCOPE_ABSTRACT_UNIX = 1 << 0  # ABI 6: no connecting to abstract unix sockets made outside the sandbox
SCOPE_SIGNAL = 1 << 1  # ABI 6: no signals to processes outside the sandbox (the harness, the jail)
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4: handled with no rule = every TCP bind/connect denied

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
ALL_V1 = (1 << 13) - 1  # bits 0..12: execute, write, read, read_dir, remove and make_* rights
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the only rights a file rule may carry
READ = READ_FILE | READ_DIR | EXECUTE
DEV = READ | WRITE_FILE | IOCTL_DEV


def handled_rights(abi: int) -> int:
    """Every filesystem right this kernel knows; rights of newer ABIs are dropped."""
    rights = ALL_V1
    if abi >= 2:
        rights |= REFER  # without it (ABI 1) renames across folders are always denied
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where Landlock is missing or disabled."""
    if platform.system() != "Linux":
        return 0
    try:
        return max(0, _libc().syscall(ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0),
                                      ctypes.c_uint32(CREATE_RULESET_VERSION)))
    except (OSError, AttributeError):
        return 0


def available() -> tuple[bool, str]:
    """(True, what confines) or (False, why not)."""
    system = platform.system()
    if system == "Linux":
        abi = landlock_abi()
        if abi <= 0:
            return False, (f"Landlock is not available on kernel {platform.release()} (it needs Linux >= 5.13 "
                           "with landlock in the lsm= boot list)")
        return True, f"landlock ABI {abi}"
    if system == "Darwin":
        if shutil.which("sandbox-exec") is None:
            return False, "sandbox-exec not found (macOS Seatbelt)"
        return True, "seatbelt (sandbox-exec)"
    return False, f"no confinement on {system}: runs are unconfined"


# ---------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------

def _env_paths(name: str) -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(name, "").split(os.pathsep) if p]


def python_paths() -> list[Path]:
    """The running Python: its installation, venv and site-packages (read-only)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(sysconfig.get_paths().get(k, "") for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    paths.update(site.getsitepackages())
    paths.add(site.getusersitepackages())
    # Under -S (confine.isolated_module) a venv's prefix is not set up: its site-packages is only on sys.path.
    paths.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    return [Path(p) for p in sorted(paths) if p]


def _darwin_cache() -> list[Path]:
    """macOS: the per-user cache folder, where Metal keeps compiled shaders (MLX on the GPU)."""
    if platform.system() != "Darwin":
        return []
    out = subprocess.run(["getconf", "DARWIN_USER_CACHE_DIR"], capture_output=True, text=True)
    return [Path(out.stdout.strip())] if out.returncode == 0 and out.stdout.strip() else []


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class Policy:
    """What a confined process may touch. Paths are files or folders (a folder covers everything
    beneath it). `hide` lists areas that stay unreadable: the Seatbelt profile denies them, and
    on Linux, where nothing is readable unless granted, `check()` refuses a grant that covers one."""
    read: list[Path] = field(default_factory=list)
    write: list[Path] = field(default_factory=list)
    listable: list[Path] = field(default_factory=list)  # folders whose names (not contents) may be listed
    temp: Path | None = None
    hide: list[Path] = field(default_factory=list)
    system: bool = True  # add SYSTEM_READ, the Python installation, /dev and FRAMEWORK_WRITABLE
    network: bool = False  # False: no TCP bind/connect, no abstract unix sockets (Landlock ABI >= 4 / 6)

    def readable(self) -> list[Path]:
        extra = [Path(p) for p in SYSTEM_READ] + python_paths() if self.system else []
        return _existing([*self.read, *extra, *_env_paths("ARUN_SANDBOX_EXTRA_READ")])

    def writable(self) -> list[Path]:
        extra = [Path(p) for p in FRAMEWORK_WRITABLE] + _darwin_cache() if self.system else []
        temp = [self.temp] if self.temp else []
        return _existing([*self.write, *temp, *extra, *_env_paths("ARUN_SANDBOX_EXTRA_WRITE")])

    def check(self) -> None:
        """Refuses a policy whose grants would make a hidden area readable."""
        for granted in self.readable() + self.writable():
            for hidden in self.hide:
                if _under(hidden.resolve(), granted):
                    raise ValueError(f"sandbox: {hidden} would be readable through the grant on {granted}; "
                                     "move it out of that folder or drop the grant")


def _existing(paths: list[Path]) -> list[Path]:
    """Resolved, deduplicated, existing paths: Landlock rules bind to inodes, Seatbelt to real paths."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if p.exists():
            p = p.resolve()
            if p not in out:
                out.append(p)
    return out


def spread(root: Path, hidden: list[Path]) -> list[Path]:
    """`root` as grants that leave out every hidden path beneath it: root itself when nothing hidden
    lies beneath, else its entries, split the same way (an allow-list cannot subtract, so a grant on
    a home folder that holds the data cache becomes grants on the cache's siblings)."""
    root = Path(root).expanduser().resolve()
    inside = [h for h in (Path(p).expanduser().resolve() for p in hidden) if _under(h, root)]
    if not inside:
        return [root] if root.exists() else []
    if root in inside or not root.is_dir():
        return []
    return [p for child in sorted(root.iterdir()) for p in spread(child, inside)]


def training_policy(repo: Path, data_dir: Path, run_dir: Path, temp: Path) -> Policy:
    """A train process: reads the repo (not bench/, .arun/, .git, run.log) and the data folder's
    tokenizer, token bytes, manifest and train shards; writes only its run folder and its temp
    folder. The process needs ARUN_DATA_DIR set: the cache's current.json is not readable."""
    repo, data_dir = Path(repo).resolve(), Path(data_dir).resolve()
    hide = [repo / name for name in sorted(REPO_HIDDEN)] + [data_dir.parent]
    read = spread(repo, hide)  # (a data cache inside the repo stays out too)
    read += [p for pattern in DATA_READABLE for p in sorted(data_dir.glob(pattern)) if p.is_file()]
    # Python's import system lists the script's folder to find prepare.py and engines/. Landlock
    # grants are hierarchical, so this lets names (never contents) beneath the repo be listed.
    return Policy(read=read, write=[Path(run_dir)], listable=[repo, data_dir], temp=Path(temp), hide=hide)


def sandbox_env(policy: Policy) -> dict[str, str]:
    """Environment for the confined process: temp files and framework caches in the temp folder."""
    if policy.temp is None:
        return {}
    temp = Path(policy.temp).resolve()
    return {name: str(temp / sub) for name, sub in FRAMEWORK_ENV.items()}


def landlock_rules(policy: Policy, abi: int) -> list[tuple[Path, int]]:
    """(path, rights) pairs: reads, then /dev, then writes; file rules carry file rights only."""
    handled = handled_rights(abi)
    rules = [(p, READ) for p in policy.readable()] + [(p, READ_DIR) for p in _existing(policy.listable)]
    if policy.system and Path("/dev").exists():
        rules += [(p, DEV) for p in spread(Path("/dev"), [Path(h) for h in DEV_HIDDEN])]
    rules += [(p, handled) for p in policy.writable()]
    return [(p, (rights if p.is_dir() else rights & FILE_RIGHTS) & handled) for p, rights in rules]


def _make_writable_folders(policy: Policy) -> None:
    """Missing write paths and the temp folder are created as folders: rules bind to what exists."""
    for path in [policy.temp, *policy.write]:
        if path is not None and not Path(path).exists():
            Path(path).mkdir(parents=True)


def restrict_self(policy: Policy) -> int:
    """Confines this process and every process it starts from now on. Returns the ABI used."""
    abi = landlock_abi()
    if abi <= 0:
        raise OSError(f"sandbox: {available()[1]}")
    policy.check()
    _make_writable_folders(policy)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 and not policy.network else 0
    scoped = (SCOPE_SIGNAL | (0 if policy.network else SCOPE_ABSTRACT_UNIX)) if abi >= 6 else 0
    _enforce(abi, landlock_rules(policy, abi), net, scoped)
    return abi


def _enforce(abi: int, rules: list[tuple[Path, int]], net: int, scoped: int) -> None:
    """One Landlock ruleset: the handled rights of `abi`, the path rules, the network and scope
    restrictions; then no_new_privs and restrict_self."""
    libc = _libc()
    attr = _RulesetAttr(handled_rights(abi), net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # older kernels reject fields they do not know
    ruleset = _check(libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                                  ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        for path, rights in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneathAttr(rights, fd)
                _check(libc.syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH),
                                    ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        # Without no_new_privs an unprivileged process may not restrict itself (a setuid program could be fooled).
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
        _check(libc.syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)


# ---------------------------------------------------------------------------
# Seatbelt (macOS)
# ---------------------------------------------------------------------------

def _sb_string(path: Path) -> str:
    text = str(path)
    if "\n" in text or "\0" in text:
        raise ValueError(f"sandbox: path {text!r} has a newline or NUL; rename it")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sb_filters(paths: list[Path], subpath: bool = False) -> str:
    return " ".join(f"({'subpath' if subpath or p.is_dir() else 'literal'} {_sb_string(p)})" for p in paths)


def seatbelt_profile(policy: Policy) -> str:
    """A Seatbelt profile: reads allowed except the contents of hidden areas (minus the policy's own
    reads and writes), writes denied outside the writable folders. Each operation has one rule with
    require-not filters, so the result does not depend on rule order."""
    writable = policy.writable() + ([Path("/dev")] if policy.system else [])
    reopened = policy.readable() + writable
    # Hidden areas may not exist yet (bench/ before the first record): they are denied all the same.
    hidden = [Path(p).expanduser().resolve() for p in policy.hide]
    lines = [
        "(version 1)",
        "(allow default)",
        "; writes: only the run folder, the temp folder and the framework locations",
        f"(deny file-write* (require-not (require-any {_sb_filters(writable)})))",
    ]
    if hidden:
        # file-read-data is contents and listings; stat stays allowed, as under Landlock.
        lines += ["; reads: not the data cache, ledgers, other runs or git history, except what the policy lists",
                  f"(deny file-read-data (require-all (require-any {_sb_filters(hidden, subpath=True)}) "
                  f"(require-not (require-any {_sb_filters(reopened)}))))"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------

def confined_command(policy: Policy, cmd: list[str]) -> list[str]:
    """The command line that runs `cmd` under `policy`: this module as a launcher on Linux,
    sandbox-exec on macOS. Raises OSError where no confinement is available."""
    ok, reason = available()
    if not ok:
        raise OSError(f"sandbox: {reason}")
    if platform.system() == "Darwin":
        _make_writable_folders(policy)
        env = [f"{k}={v}" for k, v in sandbox_env(policy).items()]
        return ["sandbox-exec", "-p", seatbelt_profile(policy), "/usr/bin/env", *env, *cmd]
    # -I -S: the launcher (which stays as the jail's unconfined supervisor) runs no .pth and no
    # sitecustomize from any site-packages; without site it cannot find a venv's own locations,
    # so ours are passed in as reads.
    args = [sys.executable, "-I", "-S", os.path.abspath(__file__)]
    reads = policy.read + (python_paths() if policy.system else [])
    args += [a for p in reads for a in ("--read", str(p))]
    args += [a for p in policy.write for a in ("--write", str(p))]
    args += [a for p in policy.listable for a in ("--list", str(p))]
    args += [a for p in policy.hide for a in ("--hide", str(p))]
    args += ["--temp", str(policy.temp)] if policy.temp else []
    args += [] if policy.system else ["--no-system"]
    args += ["--network"] if policy.network else []
    return [*args, "--", *cmd]


def jailed_command(cmd: list[str]) -> list[str]:
    """`cmd` in the process jail only (engines.jail), for a run the OS cannot confine: no file rules,
    but still nothing it starts outlives it. As it is where there is no jail (macOS)."""
    if not _jail().supported():
        return list(cmd)
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), "--jail-only", "--", *cmd]


def _jail():  # (a module)
    """engines.jail, also when this file runs as a script (`python -I .../sandbox.py`, no package path)."""
    if __package__:
        from engines import jail
        return jail
    import importlib.util
    spec = importlib.util.spec_from_file_location("_arun_jail", Path(__file__).with_name("jail.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engines.sandbox",
                                     description="Run a command confined to the paths given (Landlock).")
    parser.add_argument("--read", action="append", default=[], metavar="PATH", help="readable file or folder")
    parser.add_argument("--write", action="append", default=[], metavar="PATH", help="writable file or folder")
    parser.add_argument("--list", action="append", default=[], metavar="DIR", help="folder whose names may be listed")
    parser.add_argument("--hide", action="append", default=[], metavar="PATH", help="must stay unreadable")
    parser.add_argument("--temp", metavar="DIR", help="private temp folder (TMPDIR and framework caches)")
    parser.add_argument("--no-system", action="store_true", help="do not add system and Python locations")
    parser.add_argument("--network", action="store_true", help="allow TCP and abstract unix sockets")
    parser.add_argument("--jail-only", action="store_true", help="no file rules: only reap the whole process tree")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given: python -m engines.sandbox [options] -- CMD ARGS...")
    policy = Policy(read=[Path(p) for p in args.read], write=[Path(p) for p in args.write],
                    listable=[Path(p) for p in args.list], temp=Path(args.temp) if args.temp else None,
                    hide=[Path(p) for p in args.hide],
                    system=not args.no_system, network=args.network)
    if not args.jail_only:
        try:  # checked here, before the jail forks, so a bad policy is one clear line and exit 1
            policy.check()
            _make_writable_folders(policy)
        except (OSError, ValueError) as e:
            sys.exit(str(e))

    def start() -> None:
        if not args.jail_only:
            try:
                restrict_self(policy)
            except (OSError, ValueError) as e:
                print(str(e), file=sys.stderr, flush=True)
                os._exit(1)
            os.environ.update(sandbox_env(policy))
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"sandbox: cannot run {cmd[0]}: {e}", file=sys.stderr, flush=True)
            os._exit(127)

    jail = _jail()
    if jail.supported():
        jail.supervise(start)
    start()


if __name__ == "__main__":
    main()


# ---------------------------------------------------------------------------
# Sealing a running process (the evaluator, once it holds its inputs)
# ---------------------------------------------------------------------------

NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1   # ABI 4: with no net rule, every TCP bind/connect is denied
SCOPE_ABSTRACT_UNIX = 1 << 0                     # ABI 6: no abstract unix sockets outside the sandbox


def seal_self(read: list[Path], write: list[Path], devices: bool = False) -> int:
    """Restricts this process for the rest of its life (Landlock stacks on any policy it already has):
    it may open only what lies under `read` (read, list, execute) and `write` (every right), no TCP
    bind or connect (ABI >= 4), no abstract unix socket or signal outside (ABI >= 6). devices: /dev
    too, for GPU drivers that open device files lazily. Files already open stay usable. Returns the ABI; raises OSError where Landlock is missing."""
    abi = landlock_abi()
    if abi <= 0:
        raise OSError(f"sandbox: {available()[1]}")
    handled = handled_rights(abi)
    rules = [(Path(p), READ) for p in read] + [(Path(p), handled) for p in write]
    rules += [(Path("/dev"), DEV)] if devices else []
    rules = [(path, (rights if path.is_dir() else rights & FILE_RIGHTS) & handled) for path, rights in rules
             if path.exists()]
    _enforce(abi, rules, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
             SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0)
    return abi
