"""
The swarm's records on a branch: at the end of a swarm the ledger lines its writer appended are
committed, so the head's tree is clean and another machine sees the run's work with `git fetch` and
`arun compare --ref` / `arun report --ref`, as it sees a single run's record commits.

- On the head's current branch: one commit `arun: swarm <run> records` of the ledgers it wrote.
- On the run's branch: `autoresearch/<run>` (one per key when the run has several bests) is that
  best's commit plus the same ledgers on top; when nothing beat the start, the branch is the
  records commit itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from arun.core import gitops
from arun.core.errors import ArunError


def changed_ledgers(repo: Path) -> list[str]:
    """bench/<tag>/ledger.jsonl files that differ from HEAD (modified or new)."""
    changed = gitops.run_git(repo, "diff", "--name-only", "HEAD", "--", "bench")
    new = gitops.run_git(repo, "ls-files", "--others", "--exclude-standard", "--", "bench")
    paths = [line.strip() for line in (changed + "\n" + new).splitlines() if line.strip()]
    return sorted(p for p in paths if p.endswith("/ledger.jsonl"))


def on_top(repo: Path, parent: str, source: str, paths: list[str], message: str) -> str:
    """A commit whose parent is `parent` and whose tree is parent's with `paths` as `source` has them,
    made without touching any worktree (a temporary index)."""
    with tempfile.TemporaryDirectory(prefix="arun-records-") as tmp:
        env = dict(os.environ, GIT_INDEX_FILE=str(Path(tmp) / "index"))
        gitops.run_git(repo, "read-tree", parent, env=env)
        for path in paths:
            blob = gitops.run_git(repo, "rev-parse", f"{source}:{path}")
            gitops.run_git(repo, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", env=env)
        tree = gitops.run_git(repo, "write-tree", env=env)
    named = gitops.run_git(repo, "config", "user.email", check=False)
    identity = [] if named else ["-c", f"user.name={gitops.KEEP_AUTHOR.name}",
                                 "-c", f"user.email={gitops.KEEP_AUTHOR.email}"]
    return gitops.run_git(repo, *identity, "commit-tree", tree, "-p", parent, "-m", message)


def commit_records(repo: Path, run: str, branches: dict[str, str], base: str) -> dict:
    """Commits the swarm's ledgers on the current branch and on the run's branch(es): each of `branches`
    (branch -> best commit) moves to a records commit whose parent is that best, as a single run's record
    commit follows its keep. Returns {"lines": what to tell the user, "commit": the head's records commit}."""
    paths = changed_ledgers(repo)
    if not paths:
        return {"lines": []}
    message = f"arun: swarm {run} records"
    try:
        head = gitops.commit_keep(repo, paths, message)
    except ArunError as e:
        return {"lines": [f"the swarm's records are written but not committed ({e}); "
                          f"commit {' '.join(paths)} with git when that is fixed"]}
    targets = dict(branches) or {f"autoresearch/{run}": ""}
    lines = []
    for branch, best in targets.items():
        tip = on_top(repo, best, head, paths, message) if best else head
        if gitops.move_branch(repo, branch, tip):
            lines.append(f"{branch} carries the run's records: elsewhere, git fetch origin {branch} && "
                         f"arun compare --ref origin/{branch}")
    return {"lines": lines, "commit": head}
