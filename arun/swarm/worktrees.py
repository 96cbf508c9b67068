"""Where a swarm worker works: its worktree `.arun/swarm/<run>-w<k>`, its branch, its hidden refs."""

from __future__ import annotations

import shutil
from pathlib import Path

from arun.core import gitops
from arun.swarm.procs import kill_processes_in

SWARM_DIR = Path(".arun") / "swarm"


def branch_name(run: str, k: int) -> str:
    return f"autoresearch/{run}-w{k}"


def worktree_path(repo: Path, run: str, k: int) -> Path:
    return Path(repo).resolve() / SWARM_DIR / f"{run}-w{k}"


def temp_path(repo: Path, run: str, k: int) -> Path:
    """The worker's TMPDIR, beside its worktree: the scorer's scratch folders (and the scorer, which works
    there) are found and removed with the worker even when it was killed mid-scoring."""
    return Path(repo).resolve() / SWARM_DIR / f"{run}-w{k}.tmp"


def base_ref(run: str) -> str:
    # A hidden ref keeps the swarm's base commit alive and gives bundles a name to travel under.
    return f"refs/arun/swarm/{run}/base"


def _ignore_swarm_dir(repo: Path) -> None:
    """Worktrees live inside the repo; a `*` .gitignore keeps them out of the main tree's status."""
    d = Path(repo) / SWARM_DIR.parent
    d.mkdir(parents=True, exist_ok=True)
    gi = d / ".gitignore"
    if not gi.exists():
        gi.write_text("*\n")


def commit_ref(run: str, commit: str) -> str:
    # One hidden ref per bundled commit: unique, so fetching it never clashes, and it keeps the commit from gc.
    return f"refs/arun/swarm/{run}/c/{commit}"


def ensure_worktree(repo: Path, run: str, k: int, commit: str) -> Path:
    """The worker's worktree on its own branch at `commit`; a leftover one is cleaned and reused."""
    repo = Path(repo).resolve()
    _ignore_swarm_dir(repo)
    wt = worktree_path(repo, run, k)
    gitops.run_git(repo, "worktree", "prune")
    if (wt / ".git").exists():
        gitops.clean_worktree(wt)
        gitops.reset_worktree(wt, commit)
        return wt
    gitops.add_worktree(repo, wt, branch_name(run, k), commit)
    return wt


def remove_worktree(repo: Path, wt: Path) -> None:
    """What still runs in the worktree is stopped first (it would hold the GPU), then the worktree goes."""
    kill_processes_in(wt)
    gitops.remove_worktree(repo, wt)


def cleanup_worker(repo: str, run: str, k: int, best_runs: list[str] | None = None) -> None:
    """On the worker's machine: stop leftovers, keep its runs, remove its worktree; the branch stays."""
    repo_p = Path(repo)
    wt = worktree_path(repo_p, run, k)
    kill_processes_in(wt)
    # Result JSONs (records name them as .arun/runs/<id>) move into this machine's clone, where
    # `arun verify` and friends look for them; weights only for the swarm's best runs, as the harness
    # keeps weights for the best run of each key only (a worker cannot see the others' best).
    runs = wt / ".arun" / "runs"
    if runs.is_dir():
        dest = repo_p / ".arun" / "runs"
        dest.mkdir(parents=True, exist_ok=True)
        for d in runs.iterdir():
            if best_runs is not None and d.name not in best_runs:
                for w in d.glob("weights*"):
                    w.unlink(missing_ok=True)
            if not (dest / d.name).exists():
                d.rename(dest / d.name)
    remove_worktree(repo_p, wt)
    tmp = temp_path(repo_p, run, k)
    kill_processes_in(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
