"""
The harness's use of OS confinement (engines.sandbox): which process gets which policy, whether
confinement is required, and the one line that says how a run was confined.

Three kinds of process run code or data the harness does not trust, each confined when the OS can:
- the train process: the repo (not bench/, .arun/, .git), the training shards; writes its run folder;
- the scorer (`python -m engines.score`): the data folder, the artifact; writes its output folder;
- under `arun loop`, the agent command: the repo (.git included: agents run `git diff`) and its own
  config; writes the train file, its exchange folder and AGENT_WRITABLE, never the val/test rows.

Where no confinement exists the processes still run, unconfined, and every record says so, unless
confinement is required (`--require-confinement` or ARUN_REQUIRE_CONFINEMENT=1).
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
from dataclasses import dataclass
from pathlib import Path

import prepare
from arun.core.errors import ArunError
from engines import jail, sandbox

# Where coding-agent CLIs keep their settings, sessions and caches: the agent may write these (those
# that exist when it starts). Extend with ARUN_AGENT_EXTRA_WRITE (colon-separated paths). Grants on a
# folder holding something hidden (the data cache under ~/.cache, the ledger key under ~/.config)
# become grants on its other entries.
AGENT_WRITABLE = ["~/.claude", "~/.claude.json", "~/.codex", "~/.config", "~/.cache", "~/.npm", "~/.local/state"]


@dataclass(frozen=True)
class Launch:
    """A command as it will run: confined or not, and how (or why not)."""
    cmd: list[str]
    env: dict
    confined: bool
    how: str

    def fields(self) -> dict:
        return {"confined": self.confined, "confinement": self.how}


def state() -> tuple[bool, str]:
    """(True, how) or (False, why not), for this machine."""
    return sandbox.available()


def banner() -> str:
    ok, how = state()
    return f"arun: confined ({how})" if ok else f"arun: NOT confined: {how}"


def doctor_line() -> str:
    ok, how = state()
    if ok:
        return f"confinement: confined ({how}): train process, scorer and the loop's agent"
    return f"confinement: NOT confined: {how} (runs are recorded confined: false; --require-confinement refuses them)"


def jail_lines() -> list[str]:
    """The jail's rules, for `arun doctor`: what each untrusted process may read, write and reach.
    The lists themselves live in engines.sandbox (SYSTEM_READ, FRAMEWORK_WRITABLE, DEV_HIDDEN,
    ENV_ALLOWED) and in the three policies below; this only shows them."""
    abi = sandbox.landlock_abi()
    net = "no TCP (Landlock ABI >= 4)" if abi >= 4 else "OPEN (this kernel's Landlock has no TCP rules: ABI < 4)"
    scope = ("no signals out, no abstract unix sockets (ABI >= 6)" if abi >= 6
             else "signals and abstract unix sockets NOT scoped (Landlock ABI < 6)")
    reaper = "child subreaper: every descendant is killed when the command ends" if jail.supported() \
        else "process group only (no subreaper on this OS)"
    extra_w = [str(p) for p in sandbox._env_paths("ARUN_SANDBOX_EXTRA_WRITE")]
    return [
        f"jail: process tree: {reaper}; harness non-dumpable, root powers dropped in the command",
        f"jail: train process: reads the repo (not {', '.join(sorted(sandbox.REPO_HIDDEN))}), the data folder's "
        f"{', '.join(sandbox.DATA_READABLE)}, system and Python locations ({' '.join(sandbox.SYSTEM_READ)}), /dev "
        f"(not {' '.join(sandbox.DEV_HIDDEN)}); writes ONLY its run folder and <run folder>/tmp (TMPDIR)"
        + (f" + ARUN_SANDBOX_EXTRA_WRITE {extra_w}" if extra_w else ""),
        "jail: evaluator: reads the fixed code, the data folder, the artifact; writes only its output and temp folders",
        "jail: agent: reads the repo and home (not .arun/, the data cache, the ledger key); writes the train file, "
        f".arun/agent/ and {' '.join(AGENT_WRITABLE)} (never {' '.join(HARNESS_CONFIG)}); network and environment kept",
        f"jail: network (train, evaluator): {net}; {scope}",
        f"jail: environment (train, evaluator): only {' '.join(sandbox.ENV_ALLOWED)} and "
        f"{'* '.join(sandbox.ENV_ALLOWED_PREFIXES)}*, never a name holding {'/'.join(sandbox.ENV_SECRET_WORDS)}",
        "jail: the harness's git: no global/system config, no hooks (repo hooks included), fsmonitor, pager or "
        "credential helper (arun.core.gitops.sealed_env)",
    ]


def required() -> bool:
    return os.environ.get("ARUN_REQUIRE_CONFINEMENT", "").strip().lower() in ("1", "true", "yes")


def require(flag: bool | None = None) -> None:
    """Refuses (ArunError) when confinement is required here but the OS cannot provide it."""
    ok, why = state()
    if (flag or (flag is None and required())) and not ok:
        raise ArunError(f"confinement is required (--require-confinement / ARUN_REQUIRE_CONFINEMENT) but {why}; "
                        "run on a kernel with Landlock (Linux >= 5.13) or macOS, or drop the requirement")


def wrap(policy: sandbox.Policy, cmd: list[str], env: dict, confine: bool = True) -> Launch:
    """`cmd` under `policy` where the OS can confine it, else as it is (refused when required). Either
    way it runs in the process jail (engines.jail: nothing it starts outlives it), and a process
    without network (the train process, the evaluator) gets only the allow-listed environment."""
    jail.make_undumpable()  # before anything untrusted runs: our /proc/<pid>/environ is ours
    if not policy.network:
        env = sandbox.scrub_env(env)
    ok, how = state()
    if not confine:
        return Launch(sandbox.jailed_command(cmd), env, False, "confinement turned off for this process")
    if not ok:
        require()
        return Launch(sandbox.jailed_command(cmd), env, False, how)
    return Launch(sandbox.confined_command(policy, cmd), {**env, **sandbox.sandbox_env(policy)}, True, how)


# --------------------------------------------------------------------------- the three policies

def train_policy(repo: Path, data_dir: Path, run_dir: Path) -> sandbox.Policy:
    """The train process: sandbox.training_policy with its temp folder inside the run folder."""
    return sandbox.training_policy(repo, data_dir, run_dir, Path(run_dir) / "tmp")


def installed_code() -> list[Path]:
    """The harness's own code as installed (engines/, prepare.py, arun_data/, arun/): public, and
    what the scorer and a script-driven agent import, wherever the project itself lives."""
    code = [Path(sandbox.__file__).resolve().parent, Path(prepare.__file__).resolve(), Path(__file__).resolve().parents[1]]
    spec = importlib.util.find_spec("arun_data")
    return code + ([Path(spec.origin).resolve().parent] if spec and spec.origin else [])


def isolated_module(module: str, args: list[str], first: Path | None = None) -> list[str]:
    """`python -m module args` that runs nothing a train process could have written, even where the
    OS cannot confine: -I (no PYTHON* variables, no user site, neither the working folder nor a
    script's folder on sys.path) and -S (site is not run: no .pth file and no sitecustomize from any
    site-packages). sys.path is then built explicitly: `first` (a private copy of the fixed files),
    the installed harness code, and the installation's site-packages as plain folders."""
    code_root = Path(sandbox.__file__).resolve().parents[1]
    roots = ([str(first)] if first is not None else []) + [str(code_root)]
    # Ours, not the child's: without site a venv's python does not know its own site-packages.
    packages = [p for p in site.getsitepackages() if p not in roots]
    boot = (f"import runpy, sys; sys.path[:0] = {roots!r}; sys.path += {packages!r}; "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-I", "-S", "-c", boot, *args]


def scorer_policy(data_dir: Path, artifact: Path, out_dir: Path, temp: Path) -> sandbox.Policy:
    """The evaluator: fixed code, the whole data folder (val and test rows), the artifact; writes only
    its output folder and its temp folder."""
    return sandbox.Policy(read=[*installed_code(), Path(data_dir), Path(artifact)], write=[Path(out_dir)],
                          temp=Path(temp))


# Configuration that steers the harness's own tools: never writable by the agent, even under a
# writable ~/.config (the harness's git reads none of it anyway: gitops.sealed_env; two locks).
HARNESS_CONFIG = ["~/.gitconfig", "~/.config/git"]


def agent_writable() -> list[Path]:
    return [Path(p).expanduser() for p in AGENT_WRITABLE] + sandbox._env_paths("ARUN_AGENT_EXTRA_WRITE")


def agent_hidden(repo: Path, data_dir: Path | None = None) -> list[Path]:
    """What an agent never reads: the repo's runs and kept forwards, the data cache (val and test rows),
    the machine's ledger key. The ledgers are readable (never writable): they are tracked files that
    `git diff` must hash, and what they hold is in the agent's prompt anyway."""
    from arun.core.chain import key_path
    hide = [Path(repo) / ".arun", prepare.cache_root(), key_path().parent]
    return hide + ([Path(data_dir).parent] if data_dir else [])


def agent_policy(repo: Path, train_file: str, exchange: Path, data_dir: Path | None = None,
                 cmd: list[str] | None = None) -> sandbox.Policy:
    """The loop's agent: reads the repo (git history included, never .arun/; bench/ read-only) and the home
    folder (its CLI and settings; not the data cache or the ledger key); writes the train file (in
    place: a single-file grant does not cover save-to-temp-and-rename), its exchange folder (prompt,
    description, TMPDIR) and AGENT_WRITABLE. The harness's code and any file named on `cmd` are
    readable too."""
    repo, exchange = Path(repo).resolve(), Path(exchange).resolve()
    hide = agent_hidden(repo, data_dir)
    home = sandbox.spread(Path.home(), hide)
    own = [Path(a) for a in cmd or [] if os.path.isfile(a)]  # a script named on the agent's command line
    read = sandbox.spread(repo, hide) + home + [p for c in installed_code() + own for p in sandbox.spread(c, hide)]
    steer = hide + [Path(p).expanduser() for p in HARNESS_CONFIG]
    write = [repo / train_file, exchange] + [p for w in agent_writable() for p in sandbox.spread(w, steer)]
    # Names (never contents) under the repo and the home folder stay listable: agents and shells list them.
    return sandbox.Policy(read=read, write=write, listable=[repo, Path.home()], temp=exchange / "tmp", hide=hide,
                          network=True)  # its own API; it keeps its environment (its key) for the same reason


def rename_hint(error: str, train_file: str) -> str:
    """A denied write next to the train file is most likely an editor saving through a temp file and a
    rename, which a single-file grant refuses: say so."""
    if "Permission denied" in error or "Operation not permitted" in error:
        return (f"{error} (under confinement the agent may write {train_file} in place only, not save a "
                "temp file beside it and rename it over; add paths with ARUN_AGENT_EXTRA_WRITE)")
    return error
