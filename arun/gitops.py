"""Git as the notebook: scope guard, run branches, keep commits, reverts (through gitpython)."""

from __future__ import annotations

import time
from pathlib import Path

import git

from arun.errors import ArunError

IGNORED_PREFIXES = ("bench/", ".arun/")
IGNORED_FILES = ("run.log",)
KEEP_AUTHOR = git.Actor("arun", "arun@localhost")


def open_repo(repo_dir: Path | str) -> git.Repo:
    try:
        repo = git.Repo(repo_dir, search_parent_directories=False)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as e:
        raise ArunError(f"{repo_dir} is not a git repository; run arun inside your clone of the project") from e
    if not repo.head.is_valid():
        raise ArunError(f"{repo_dir} has no commits yet; commit the project first (git add -A && git commit -m init)")
    return repo


def _ignored(path: str, train_file: str) -> bool:
    return path == train_file or path in IGNORED_FILES or path.startswith(IGNORED_PREFIXES)


def offending_files(repo_dir: Path | str, train_file: str) -> list[str]:
    """Everything but the train file that differs from HEAD: tracked changes, staged or not, and new files."""
    repo = open_repo(repo_dir)
    changed = {d.a_path for d in repo.index.diff(None)} | {d.b_path or d.a_path for d in repo.index.diff("HEAD")}
    changed |= set(repo.untracked_files)
    return sorted(p for p in changed if p and not _ignored(p, train_file))


def current_branch(repo_dir: Path | str) -> str | None:
    repo = open_repo(repo_dir)
    return None if repo.head.is_detached else repo.active_branch.name


def ensure_run_branch(repo_dir: Path | str, name: str | None = None) -> tuple[str, bool]:
    """Switches to autoresearch/<name> (made from HEAD if new). With no name, stays on an autoresearch/
    branch, else makes autoresearch/<date>. Returns (branch, created)."""
    repo = open_repo(repo_dir)
    here = current_branch(repo_dir)
    if name is None and here and here.startswith("autoresearch/"):
        return here, False
    branch = f"autoresearch/{name or time.strftime('%b%d').lower()}"
    if branch in repo.heads:
        if here != branch:
            repo.heads[branch].checkout()
        return branch, False
    repo.create_head(branch).checkout()
    return branch, True


def file_at(repo_dir: Path | str, commit: str, path: str) -> bytes:
    repo = open_repo(repo_dir)
    return repo.git.execute(["git", "show", f"{commit}:{path}"], stdout_as_string=False, strip_newline_in_stdout=False)


def restore_train_file(repo_dir: Path | str, train_file: str, commit: str) -> None:
    """Puts the train file back to its content at commit (the best commit for the key), index untouched."""
    data = file_at(repo_dir, commit, train_file)
    target = Path(repo_dir) / train_file
    tmp = target.with_name(f".{target.name}.arun-tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def diff_against(repo_dir: Path | str, commit: str, train_file: str) -> str:
    repo = open_repo(repo_dir)
    return repo.git.diff(commit, "--", train_file)


def head_sha(repo_dir: Path | str) -> str:
    return open_repo(repo_dir).head.commit.hexsha


def commit_keep(repo_dir: Path | str, paths: list[str], message: str) -> str:
    """Commits exactly these paths; returns the new sha (HEAD's if nothing changed)."""
    repo = open_repo(repo_dir)
    repo.index.add(paths)
    if not repo.index.diff("HEAD"):
        return repo.head.commit.hexsha
    reader = repo.config_reader()
    has_identity = reader.has_option("user", "name") and reader.has_option("user", "email")
    actor = None if has_identity else KEEP_AUTHOR
    commit = repo.index.commit(message, author=actor, committer=actor)
    return commit.hexsha
