"""The store of kept forwards (arun.core.forward_store) against every branch's ledgers: retention never
depends on the branch checked out, a keep whose forward is gone is unverified and never a best, and
`arun doctor` shows what is kept. Real git repos and real ledgers; the forwards are stand-in bytes
(retention reads names, never contents)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from arun.cli import cli
from arun.core import forward_store
from arun.core.ledger import Ledger, ledger_path
from arun.core.ratchet import best_record
from helpers_repo import empty_repo, git

TAG = "cuda-cpu-test"
_clock = iter(range(10, 60))  # one record a second: "newest" is by time, across branches


def stored_keep(repo: Path, key: str, val: float, name: str) -> dict:
    """A keep of `key` whose stand-in forward is in the store, appended to the checked-out ledger."""
    data = f"forward {name}".encode()
    sha = hashlib.sha256(data).hexdigest()
    path = forward_store.path_for(repo, "cuda", sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return Ledger(ledger_path(repo, TAG)).append({"status": "keep", "val_bpb": val, "key_id": key, "tag": TAG,
                                                  "backend": "cuda", "artifact_sha256": sha, "description": name,
                                                  "time": f"2026-01-01T00:00:{next(_clock)}+0000"})


def commit_ledger(repo: Path, message: str) -> None:
    git(repo, "add", "bench")
    git(repo, "commit", "-qm", message)


@pytest.fixture()
def two_branches(tmp_path: Path) -> tuple[Path, dict, dict]:
    """Branch a: a keep (the best of key ka); branch b (checked out, from main): keeps of key kb."""
    repo = empty_repo(tmp_path / "repo")
    git(repo, "checkout", "-qb", "autoresearch/a")
    a = stored_keep(repo, "ka", 1.5, "a-best")
    commit_ledger(repo, "a keep")
    git(repo, "checkout", "-q", "main")
    git(repo, "checkout", "-qb", "autoresearch/b")
    b = stored_keep(repo, "kb", 2.0, "b-1")
    commit_ledger(repo, "b keep")
    return repo, a, b


@pytest.mark.unit
def test_retention_keeps_another_branchs_keeps(two_branches: tuple[Path, dict, dict]) -> None:
    repo, a, b = two_branches
    # b keeps twice more; only the newest keep is retained besides each key's best
    later = [stored_keep(repo, "kb", v, f"b-{i}") for i, v in ((2, 1.9), (3, 1.95))]
    forward_store.retain(repo, forward_store.every_record(repo), keep_recent=1, grace=0)
    assert forward_store.path_for(repo, "cuda", a["artifact_sha256"]).is_file()      # branch a's best, not checked out
    assert forward_store.path_for(repo, "cuda", later[0]["artifact_sha256"]).is_file()  # kb's best
    assert forward_store.path_for(repo, "cuda", later[1]["artifact_sha256"]).is_file()  # the newest keep
    assert not forward_store.path_for(repo, "cuda", b["artifact_sha256"]).exists()      # neither: deleted


@pytest.mark.unit
def test_a_keep_whose_forward_is_gone_is_never_a_best(two_branches: tuple[Path, dict, dict]) -> None:
    repo, _, b = two_branches
    better = stored_keep(repo, "kb", 1.0, "b-better")
    forward_store.path_for(repo, "cuda", better["artifact_sha256"]).unlink()
    records = Ledger(ledger_path(repo, TAG)).records()
    assert best_record(records, "kb")["id"] == better["id"]   # (the plain rule, which reports use)
    assert best_record(records, "kb", stored=forward_store.stored_check(repo))["id"] == b["id"]


@pytest.mark.unit
def test_the_store_is_shared_by_a_clones_worktrees(two_branches: tuple[Path, dict, dict], tmp_path: Path) -> None:
    repo, a, _ = two_branches
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", str(wt), "autoresearch/a")
    assert forward_store.store_dir(wt) == forward_store.store_dir(repo)
    assert forward_store.stored_check(wt)(a)


def test_doctor_shows_retention(two_branches: tuple[Path, dict, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    repo, a, _ = two_branches
    forward_store.path_for(repo, "cuda", a["artifact_sha256"]).unlink()   # branch a's best is gone
    monkeypatch.chdir(repo)
    out = CliRunner().invoke(cli, ["doctor"])
    assert out.exit_code == 0, out.output
    line = next(ln for ln in out.output.splitlines() if ln.startswith("retention:"))
    assert "2 keep(s) on all branches" in line and "the best of 2 key(s)" in line
    assert "1 wanted forward(s) missing" in line and "unverified" in line


@pytest.mark.unit
def test_retention_in_a_worktree_keeps_the_main_checkouts_unsaved_keeps(two_branches: tuple[Path, dict, dict],
                                                                          tmp_path: Path) -> None:
    # the swarm's ledger is the main checkout's working copy (not committed): a worker's keep in its
    # own worktree must not delete the forwards that ledger names
    repo, _, _ = two_branches
    main_keep = stored_keep(repo, "kb", 1.7, "b-uncommitted")
    wt = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", str(wt), "-b", "autoresearch/w1", "main")
    forward_store.retain(wt, forward_store.every_record(wt), keep_recent=0, grace=0)
    assert forward_store.path_for(repo, "cuda", main_keep["artifact_sha256"]).is_file()


@pytest.mark.unit
@pytest.mark.parametrize("when", ["2099-12-31", "2026-06-01"])   # in the future; newer than every real keep
def test_unsigned_keeps_on_another_branch_never_steer_retention(two_branches: tuple[Path, dict, dict],
                                                                 when: str) -> None:
    """Attack (redteam-trust retention_wipe): unsigned keeps, dated after every real one and better than the
    real best, on a branch never merged. Retention reads only trusted records: the real forwards stay stored."""
    import json
    repo, a, b = two_branches
    git(repo, "checkout", "-qb", "contrib-untrusted")
    forged = [{"id": f"20991231-0000{i:02d}-beef", "time": f"{when}T00:00:{i:02d}+0000", "status": "keep",
               "key_id": "kb", "val_bpb": 0.5 + i * 0.001, "backend": "cuda", "artifact_sha256": f"{i:064x}"}
              for i in range(3)]
    (repo / "bench" / "contrib").mkdir()
    (repo / "bench" / "contrib" / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forged))
    commit_ledger(repo, "contrib ledger")
    git(repo, "checkout", "-q", "autoresearch/b")
    newest = stored_keep(repo, "kb", 2.1, "b-newest")
    forward_store.retain(repo, forward_store.every_record(repo), keep_recent=2, grace=0)
    for rec in (a, b, newest):   # each key's best and the newest real keeps
        assert forward_store.path_for(repo, "cuda", rec["artifact_sha256"]).is_file(), rec["description"]
    records = Ledger(ledger_path(repo, TAG)).records()
    assert best_record(records, "kb", stored=forward_store.stored_check(repo))["id"] == b["id"]


@pytest.mark.unit
def test_a_future_dated_trusted_keep_never_takes_the_recent_slots(two_branches: tuple[Path, dict, dict]) -> None:
    repo, _, _ = two_branches
    best = stored_keep(repo, "kb", 1.9, "b-best")
    newest = stored_keep(repo, "kb", 1.95, "b-newest")
    data = b"forward b-future"
    sha = hashlib.sha256(data).hexdigest()
    forward_store.path_for(repo, "cuda", sha).write_bytes(data)
    Ledger(ledger_path(repo, TAG)).append({"status": "keep", "val_bpb": 2.5, "key_id": "kb", "tag": TAG,
                                           "backend": "cuda", "artifact_sha256": sha,
                                           "time": "2099-12-31T00:00:00+0000"})
    forward_store.retain(repo, forward_store.every_record(repo), keep_recent=1, grace=0)
    assert forward_store.path_for(repo, "cuda", best["artifact_sha256"]).is_file()
    assert forward_store.path_for(repo, "cuda", newest["artifact_sha256"]).is_file()
    assert not forward_store.path_for(repo, "cuda", sha).exists()


@pytest.mark.unit
def test_forwards_travel_between_clones_only_under_their_own_names(tmp_path: Path) -> None:
    """A swarm keep made in one clone brings its forwards to another (arun.swarm): every seed's forward
    is read, and bytes that do not hash to the name they arrive under are never stored."""
    here, there = empty_repo(tmp_path / "here"), empty_repo(tmp_path / "there")
    seeds = [f"forward seed {i}".encode() for i in range(2)]
    shas = [hashlib.sha256(d).hexdigest() for d in seeds]
    for sha, data in zip(shas, seeds):
        forward_store.path_for(here, "cuda", sha).parent.mkdir(parents=True, exist_ok=True)
        forward_store.path_for(here, "cuda", sha).write_bytes(data)
    keep = {"status": "keep", "backend": "cuda", "artifact_sha256": shas[0], "artifact_sha256_seeds": shas}
    assert forward_store.shas_of(keep) == shas
    sent = forward_store.read_forwards(here, keep)
    assert sent == dict(zip(shas, seeds))
    assert forward_store.read_forwards(here, {**keep, "status": "discard"}) == {}
    forged = {"0" * 64: b"not these bytes", shas[1]: b"tampered on the way"}
    assert forward_store.put_forwards(there, "cuda", {shas[0]: seeds[0], **forged}) == [shas[0]]
    assert sorted(p.name for p in forward_store.store_dir(there).iterdir()) == [f"{shas[0]}.pt2"]
    assert forward_store.put_forwards(there, "cuda", sent) == shas  # (again: already there, stored once)
    assert all(forward_store.path_for(there, "cuda", s).read_bytes() == d for s, d in zip(shas, seeds))
    assert forward_store.stored_check(there)(keep)


@pytest.mark.unit
def test_a_forward_stored_before_its_record_lands_is_not_pruned(two_branches: tuple[Path, dict, dict],
                                                                 tmp_path: Path) -> None:
    """A swarm's coordinator stores a keep's forwards, then appends its record: a worker pruning the shared
    store in between must not delete them (the keep would be unverified). Old strays still go."""
    repo, _, _ = two_branches
    src = tmp_path / "fresh.pt2"
    src.write_bytes(b"a keep whose record is on its way")
    os.utime(src, (1e9, 1e9))                      # written long ago: the grace counts from when it was stored
    sha, fresh = forward_store.store(repo, "cuda", src)
    stray = forward_store.path_for(repo, "cuda", hashlib.sha256(b"old stray").hexdigest())
    stray.write_bytes(b"old stray")
    os.utime(stray, (time.time() - 2 * forward_store.RETAIN_GRACE,) * 2)
    again = forward_store.path_for(repo, "cuda", hashlib.sha256(b"stored long ago, again now").hexdigest())
    again.write_bytes(b"stored long ago, again now")
    os.utime(again, (1e9, 1e9))
    forward_store.put_forwards(repo, "cuda", {again.name.split(".")[0]: again.read_bytes()})  # arrives again
    removed = forward_store.retain(repo, forward_store.every_record(repo), keep_recent=0)
    assert fresh.is_file() and again.is_file() and not stray.exists() and removed == [stray]
    os.utime(fresh, (1e9, 1e9))
    src.write_bytes(b"a keep whose record is on its way")
    forward_store.store(repo, "cuda", src)                                   # the same forward stored again
    assert forward_store.retain(repo, forward_store.every_record(repo), keep_recent=0) == []


@pytest.mark.unit
def test_a_record_names_forwards_only_by_sha256(tmp_path: Path) -> None:
    """What a record names becomes a file name in the store: anything but a sha256 is no forward."""
    outside = tmp_path / "victim.pt2"
    outside.write_bytes(b"not the store's")
    good = hashlib.sha256(b"x").hexdigest()
    rec = {"status": "keep", "backend": "cuda", "artifact_sha256": "../../../victim",
           "artifact_sha256_seeds": [good, good.upper(), None, str(outside.with_suffix(""))]}
    assert forward_store.shas_of(rec) == [good]
    assert forward_store.read_forwards(tmp_path / "repo", rec) == {}
