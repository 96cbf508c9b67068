"""Git as the notebook: scope guard, run branches, keep commits, reverts (through gitpython), and the
swarm's worktrees, bundles and branch moves (through the git CLI). The harness's one git layer."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import git

from arun.core import pins
from arun.core.errors import ArunError
from engines.atomic import TMP_SUFFIX, write_atomic

IGNORED_PREFIXES = ("bench/", ".arun/")
IGNORED_FILES = ("run.log",)
# What upstream's program.md leaves in the tree: its agent logs each experiment to an untracked
# results.tsv at the root. Tolerated only as that: untracked, at the root, a plain file (not a link or
# a folder). No train process reads it (engines.sandbox.REPO_HIDDEN) and nothing of arun's does either;
# tracked, staged or committed it counts like any other file.
UPSTREAM_LEFTOVERS = ("results.tsv",)
KEEP_AUTHOR = git.Actor("arun", "arun@localhost")

# Every git the harness runs is sealed from configuration it does not need: a loop agent may write
# under ~/.config, and a `core.hooksPath`, hook, fsmonitor or alias there would run code *unconfined*
# at our next commit. So no global or system config file is read at all, and these settings, given
# through the environment (which outranks even the repo's own .git/config), switch off every way git
# runs a program on its own: hooks (the repo's .git/hooks included: never run), the fsmonitor, a
# pager, credential helpers and terminal prompts. The identity is passed explicitly (commit_identity).
SEALED_CONFIG = {"core.hooksPath": os.devnull, "core.fsmonitor": "false", "core.pager": "cat",
                 "core.attributesFile": os.devnull,  # (~/.config/git/attributes could name a filter)
                 "credential.helper": "", "core.askPass": "", "protocol.ext.allow": "never"}


def sealed_env(base: dict | None = None) -> dict[str, str]:
    """`base` (default: ours) with git's config sealed as above; a caller's GIT_CONFIG_* are replaced."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("GIT_CONFIG", "GIT_EXTERNAL_DIFF", "GIT_PAGER", "GIT_ASKPASS", "GIT_EXEC_PATH"))}
    env.update(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_PARAMETERS="", GIT_TERMINAL_PROMPT="0", GIT_PAGER="cat",
               GIT_CONFIG_COUNT=str(len(SEALED_CONFIG)))
    for i, (key, value) in enumerate(SEALED_CONFIG.items()):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


def _sealed_overrides() -> dict[str, str]:
    """What sealed_env sets, for gitpython (which layers its overrides on our environment)."""
    return sealed_env({})


def commit_identity(repo_dir: Path | str) -> dict[str, str]:
    """Who a keep is committed as: the user's user.name/user.email (repo, global or system config, read
    as two plain values: reading a config file runs nothing), else arun's own. Passed as GIT_AUTHOR_*
    and GIT_COMMITTER_*, since the sealed git that commits reads no global config."""
    def value(key: str) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        proc = subprocess.run(["git", "config", "--get", key], cwd=str(repo_dir), capture_output=True, text=True, env=env)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    name, email = value("user.name"), value("user.email")
    if not (name and email):
        name, email = str(KEEP_AUTHOR.name), str(KEEP_AUTHOR.email)
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}


def open_repo(repo_dir: Path | str) -> git.Repo:
    try:
        repo = git.Repo(repo_dir, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
        try:
            root = git.Repo(repo_dir, search_parent_directories=True).working_tree_dir
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            root = None
        if root:
            raise ArunError(f"{repo_dir} is inside the repository {root}; run arun from its root: cd {root}") from e
        raise ArunError(f"{repo_dir} is not a git repository; run arun inside your clone of the project") from e
    if not repo.head.is_valid():
        raise ArunError(f"{repo_dir} has no commits yet; commit the project first (git add -A && git commit -m init)")
    repo.git.update_environment(**_sealed_overrides())
    return repo


def _ignored(path: str, train_file: str) -> bool:
    # *.arun-tmp (engines.atomic): a write killed between write and rename leaves one; it is ours, not the agent's.
    return (path == train_file or path in IGNORED_FILES or path.startswith(IGNORED_PREFIXES)
            or path.endswith(TMP_SUFFIX))


def _status(repo_dir: Path | str) -> list[tuple[str, str]]:
    """(XY code, path) of every entry `git status` reports; "??" marks an untracked file."""
    out = open_repo(repo_dir).git.status("--porcelain=v1", "-z", "--untracked-files=all", "--no-renames")
    return [(entry[:2], entry[3:]) for entry in out.split("\0") if len(entry) > 3]


def changed_paths(repo_dir: Path | str) -> list[str]:
    """Every path that differs from HEAD (staged, unstaged, deleted, renamed) or is new and not
    ignored. `git status` refreshes stat info, so a touched but unchanged file is not a change."""
    return [path for _, path in _status(repo_dir)]


def _leftover(repo_dir: Path | str, path: str) -> bool:
    """An untracked file upstream's protocol leaves (UPSTREAM_LEFTOVERS), as a plain file at the root."""
    full = Path(repo_dir) / path
    return path in UPSTREAM_LEFTOVERS and not full.is_symlink() and full.is_file()


def offending_files(repo_dir: Path | str, train_file: str, base: str | None = None) -> list[str]:
    """Everything but the train file that differs from `base` (default HEAD): committed since base, staged
    or not, and new files (bench/, .arun/ and run.log are the harness's own and never count, nor is an
    untracked results.tsv left by upstream's protocol: UPSTREAM_LEFTOVERS)."""
    entries = _status(repo_dir)
    paths = {path for _, path in entries}
    tracked = {path for code, path in entries if code != "??"}  # (a path can be both: git rm --cached)
    if base is not None:
        out = open_repo(repo_dir).git.diff("--name-only", "-z", "--no-renames", base, "--")
        tracked |= {p for p in out.split("\0") if p}
        paths |= tracked
    return sorted(p for p in paths if not _ignored(p, train_file)
                  and (p in tracked or not _leftover(repo_dir, p)))


def run_pin(repo_dir: Path | str) -> dict | None:
    """The pin of the branch checked out here (None off a run branch, or before its first run).
    A run branch made before pins existed is pinned where it stands."""
    branch = current_branch(repo_dir)
    if not branch or not branch.startswith("autoresearch/"):
        return None
    return pins.read_pin(repo_dir, branch) or pins.write_pin(repo_dir, branch, head_sha(repo_dir))


def current_branch(repo_dir: Path | str) -> str | None:
    repo = open_repo(repo_dir)
    return None if repo.head.is_detached else repo.active_branch.name


def ensure_run_branch(repo_dir: Path | str, name: str | None = None) -> tuple[str, bool]:
    """The branch experiments are committed on. With a name: switches to autoresearch/<name>
    (made from HEAD if new). With none: stays on an autoresearch/ branch, else makes a fresh
    autoresearch/<date> (or <date>-2, ...) from HEAD, never switching onto an older branch
    under the user's feet. Returns (branch, created)."""
    repo = open_repo(repo_dir)
    here = current_branch(repo_dir)
    if name is None and here and here.startswith("autoresearch/"):
        return here, False
    if name is not None:
        branch = f"autoresearch/{name}"
        if not _valid_branch(repo, branch):
            raise ArunError(f"{branch!r} is not a valid git branch name; pick a name like mar5 or h100-run1")
        if branch in repo.heads:
            if here != branch:
                try:
                    repo.heads[branch].checkout()
                except git.GitCommandError as e:
                    raise ArunError(f"cannot switch to {branch}: {_git_reason(e)}; commit or revert your changes first") from None
            return branch, False
    else:
        stem = f"autoresearch/{time.strftime('%b%d').lower()}"
        branch, n = stem, 1
        while branch in repo.heads:
            n += 1
            branch = f"{stem}-{n}"
    # A new branch at HEAD: the working tree (the experiment's train file included) stays as it is.
    repo.create_head(branch, logmsg="branch: Created from HEAD by arun").checkout()  # (logged: its birth)
    pins.write_pin(repo_dir, branch, repo.head.commit.hexsha)
    return branch, True


def _valid_branch(repo: git.Repo, branch: str) -> bool:
    try:
        repo.git.check_ref_format("--branch", branch)
        return True
    except git.GitCommandError:
        return False


def _git_reason(e: git.GitCommandError) -> str:
    text = (e.stderr or str(e)).strip().replace("stderr:", "").strip(" '\n")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "git refused"


def _object_exists(repo_dir: Path | str, spec: str) -> bool:
    try:
        open_repo(repo_dir).git.cat_file("-e", spec)
        return True
    except git.GitCommandError:
        return False


def commit_exists(repo_dir: Path | str, sha: str) -> bool:
    return _object_exists(repo_dir, f"{sha}^{{commit}}")


def path_in(repo_dir: Path | str, commit: str, path: str) -> bool:
    """Whether `path` exists in `commit`."""
    return _object_exists(repo_dir, f"{commit}:{path}")


def file_at(repo_dir: Path | str, commit: str, path: str) -> bytes:
    repo = open_repo(repo_dir)
    return repo.git.execute(["git", "show", f"{commit}:{path}"], stdout_as_string=False, strip_newline_in_stdout=False)


def restore_train_file(repo_dir: Path | str, train_file: str, commit: str) -> None:
    """Puts the train file back to its content at commit (the best commit for the key), index untouched."""
    data = file_at(repo_dir, commit, train_file)
    write_atomic(Path(repo_dir) / train_file, data)


def diff_against(repo_dir: Path | str, commit: str, train_file: str) -> str:
    repo = open_repo(repo_dir)
    return repo.git.diff(commit, "--", train_file)


def head_sha(repo_dir: Path | str) -> str:
    return open_repo(repo_dir).head.commit.hexsha


# Stage, check and commit in ONE child: if arun dies between the steps (SIGKILL, the OOM killer) the
# child still finishes, so no kill leaves the paths staged without their commit. It runs in its own
# session, so a Ctrl-C meant for arun does not cut it between the two either (it takes milliseconds).
_COMMIT_SCRIPT = ('git add -- "$@" || exit 1; git diff --cached --quiet -- "$@" && exit 0; '
                  'exec git commit -q --no-verify -m "$0" -- "$@"')


def commit_keep(repo_dir: Path | str, paths: list[str], message: str) -> str:
    """Commits these paths (those that exist) on the current branch; returns the new sha (HEAD's if nothing changed).

    The git CLI takes and releases .git/index.lock itself, so a kill of arun mid-commit leaves no stale
    lock, and one child does the whole add-and-commit (_COMMIT_SCRIPT), so it leaves nothing staged."""
    paths = [p for p in paths if (Path(repo_dir) / p).exists()]
    if not paths:  # (an empty pathspec would commit whatever else is staged)
        return head_sha(repo_dir)
    proc = subprocess.run(["sh", "-c", _COMMIT_SCRIPT, message, *paths], cwd=str(repo_dir), capture_output=True,
                          text=True, env=sealed_env({**os.environ, **commit_identity(repo_dir)}),
                          start_new_session=True)
    if proc.returncode != 0:
        run_git(repo_dir, "reset", "-q", "--", *paths, check=False)  # nothing half-made stays staged
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[0] if lines else f"git exited {proc.returncode}"
        hint = ("; another git process holds .git/index.lock (if none is running, delete that file)"
                if "index.lock" in reason or "index.lock" in proc.stderr else "")
        raise ArunError(f"could not commit the keep: {reason}{hint}")
    return head_sha(repo_dir)


def commit_record(repo_dir: Path | str, ledger: Path, rec: dict) -> str | None:
    """Commits the ledger as `arun: record <id> (<status>)`, so the tree is clean after every experiment,
    whatever its verdict. A keep's record names the keep commit, this commit's parent: a commit cannot
    hold its own sha. Returns a one-line problem when git refuses (the line is on disk and sealed either way)."""
    rel = str(Path(ledger).resolve().relative_to(Path(repo_dir).resolve()))
    try:
        commit_keep(repo_dir, [rel], f"arun: record {rec.get('id')} ({rec.get('status')})")
    except ArunError as e:
        return f"arun: the ledger line is written but not committed ({e}); commit {rel} with git when that is fixed"
    return None


# --------------------------------------------------------------------------- the git CLI: worktrees, bundles, branches

def branch_birth(repo_dir: Path | str, branch: str) -> float | None:
    """When this incarnation of the branch was made: the time of the oldest entry of its reflog (deleting a
    branch deletes its reflog, a reset only adds to it). None when it has none (reflogs off or expired, or
    no such branch here)."""
    path = run_git(repo_dir, "rev-parse", "--git-path", f"logs/refs/heads/{branch}", check=False)
    try:
        with open(Path(repo_dir) / path, "rb") as f:
            first = f.readline()
        return float(first.split(b"\t")[0].split()[-2])
    except (OSError, ValueError, IndexError):
        return None


def run_git(cwd: Path | str, *args: str, check: bool = True, env: dict | None = None) -> str:
    """The git CLI itself (worktrees and bundles are simpler and sturdier there than in gitpython);
    ArunError with git's last line when it fails and `check`."""
    proc = subprocess.run(["git", *args], cwd=str(cwd), capture_output=True, text=True, env=sealed_env(env))
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise ArunError(f"git {' '.join(args)} failed in {cwd}: {msg[-1] if msg else proc.returncode}")
    return proc.stdout.strip()


def add_worktree(repo: Path, wt: Path, branch: str, commit: str) -> None:
    """A new worktree at `wt` on `branch` (made or moved to `commit`)."""
    run_git(repo, "worktree", "prune")
    if wt.exists():  # a half-made directory from a crash during `worktree add`
        shutil.rmtree(wt, ignore_errors=True)
    wt.parent.mkdir(parents=True, exist_ok=True)
    run_git(repo, "worktree", "add", "--force", "-B", branch, str(wt), commit)


def _worktree_gitdir(wt: Path) -> Path | None:
    try:
        return Path(run_git(wt, "rev-parse", "--absolute-git-dir"))
    except ArunError:
        return None


def clean_worktree(wt: Path) -> None:
    """Back to a clean tree after a kill: a stale index.lock, half-edited files, stray files all go."""
    gitdir = _worktree_gitdir(wt)
    if gitdir is not None:
        lock = gitdir / "index.lock"
        if lock.exists():
            lock.unlink()
    run_git(wt, "reset", "--hard", "-q")
    run_git(wt, "clean", "-fdq")


def reset_worktree(wt: Path, commit: str) -> None:
    """Adoption: the worker's branch moves onto `commit` (no merge), the tree matches it exactly."""
    run_git(wt, "reset", "--hard", "-q", commit)
    run_git(wt, "clean", "-fdq")


def remove_worktree(repo: Path, wt: Path) -> None:
    """The worktree and its folder go (its branch stays)."""
    if (wt / ".git").exists():
        run_git(repo, "worktree", "remove", "--force", str(wt), check=False)
    if wt.exists():
        shutil.rmtree(wt, ignore_errors=True)
    run_git(repo, "worktree", "prune", check=False)


def make_bundle(repo: Path, commit: str, base: str, ref: str) -> bytes | None:
    """`commit` as a git bundle on top of `base` (which every node has); None when commit is base."""
    if commit == base:
        return None
    run_git(repo, "update-ref", ref, commit)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.bundle"
        run_git(repo, "bundle", "create", "-q", str(path), ref, f"^{base}")
        return path.read_bytes()


def full_bundle(repo: Path, ref: str) -> bytes:
    """The base commit with its history, for a node whose clone lacks it."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "base.bundle"
        run_git(repo, "bundle", "create", "-q", str(path), ref)
        return path.read_bytes()


def load_bundle(repo: Path, data: bytes, ref: str) -> None:
    """Fetches the bundle's `ref` into the same ref here, which also keeps the commit from gc."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.bundle"
        path.write_bytes(data)
        run_git(repo, "fetch", "-q", str(path), f"+{ref}:{ref}")


def move_branch(repo: Path, branch: str, commit: str) -> bool:
    """Points `branch` at `commit` unless it is checked out somewhere (then leaves it alone)."""
    out = run_git(repo, "worktree", "list", "--porcelain", check=False)
    if f"branch refs/heads/{branch}" in out.splitlines():
        return False
    run_git(repo, "branch", "-f", branch, commit)
    return True
