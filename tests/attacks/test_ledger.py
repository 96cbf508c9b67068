"""Attacks on the ledger and the fixed code, by an agent between runs: forged, edited, deleted and
inserted lines; a committed evaluator edit; a swapped artifact. Real ledgers, real git repos, the
real `arun` CLI and the real evaluator process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from arun.core import chain, forward_store
from arun.core.keys import comparability_key, key_id
from arun.core.ledger import Ledger, ledger_path
from arun.core.ratchet import best_record
from engines.fingerprint import fixed_code_sha256
from helpers_repo import arun_env, empty_repo, git, make_project, run_arun

TAG = "cuda-cpu-test"
KEY = "k1"


def keep(val: float, **extra) -> dict:
    return {"status": "keep", "val_bpb": val, "key_id": KEY, "key": {"time_budget": 2.0}, "tag": TAG,
            "backend": "cuda", "description": f"run at {val}", **extra}


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A repo whose ledger has an honest history: baseline 2.0, a discard, an improvement to 1.9."""
    repo = empty_repo(tmp_path / "repo")
    led = Ledger(ledger_path(repo, TAG))
    led.append(keep(2.0, baseline=True))
    led.append({**keep(2.1), "status": "discard"})
    led.append(keep(1.9))
    return repo


def append_line(repo: Path, record: dict) -> None:
    with open(ledger_path(repo, TAG), "a") as f:
        f.write(json.dumps(record) + "\n")


def lines(repo: Path) -> list[dict]:
    return [json.loads(x) for x in ledger_path(repo, TAG).read_text().splitlines()]


def best(repo: Path) -> float:
    return best_record(Ledger(ledger_path(repo, TAG)).records(), KEY)["val_bpb"]


def reports(repo: Path) -> dict[str, subprocess.CompletedProcess]:
    env = arun_env(repo / "nodata", repo / "nocache")
    return {cmd: run_arun(repo, env, cmd) for cmd in ("log", "compare", "summary")}


def forged_keep(repo: Path, how: str) -> dict:
    tail = lines(repo)[-1]["chain"]
    fake = {**keep(0.1), "id": "fake-1", "time": "2099-01-01T00:00:00+0000"}
    if how == "unsealed":
        return fake
    if how == "other key":
        return chain.seal(fake, tail, b"guessed" * 5)
    sealed = chain.seal(fake, tail, b"x" * 32)  # the chain is right; only the mac needs the key
    if how == "no key":
        sealed.update(mac="", mac_key="")
    else:  # claims to be ours
        sealed["mac_key"] = chain.key_id(chain.machine_key())
    return sealed


@pytest.mark.parametrize("how,mark", [("unsealed", "forged"), ("other key", "foreign"), ("no key", "forged"),
                                      ("our key's name", "forged")])
def test_a_forged_keep_never_becomes_the_best_and_is_marked(repo: Path, how: str, mark: str) -> None:
    append_line(repo, forged_keep(repo, how))
    recs = Ledger(ledger_path(repo, TAG)).records()
    assert recs[-1]["_trust"].startswith(mark)
    assert best(repo) == 1.9
    out = reports(repo)
    assert all(p.returncode == 0 for p in out.values()), {k: p.stderr for k, p in out.items()}
    assert f"[{mark}]" in out["log"].stdout and "0.100000" in out["log"].stdout  # shown, marked
    assert "not believed" in out["compare"].stdout and "1.900000" in out["compare"].stdout
    assert "not believed" in out["summary"].stdout and "best val_bpb: 1.900000" in out["summary"].stdout
    if mark == "forged":
        assert "ledger.jsonl line 4 (id fake-1):" in out["log"].stderr and "; ignored" in out["log"].stderr
    # An honest append after the forgery still chains and is believed.
    led = Ledger(ledger_path(repo, TAG))
    led.append(keep(1.8))
    assert best(repo) == 1.8 and led.records()[-1]["_trust"] == "ok"


def test_an_edited_keep_is_named_and_excluded(repo: Path) -> None:
    recs = lines(repo)
    recs[2]["val_bpb"] = 0.5
    ledger_path(repo, TAG).write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert best(repo) == 2.0  # the edited keep is out; the baseline remains
    out = reports(repo)
    warning = f"ledger.jsonl line 3 (id {recs[2]['id']}): edited after it was written"
    assert warning in out["log"].stderr and "[edited]" in out["log"].stdout
    assert "best val_bpb: 2.000000" in out["summary"].stdout


@pytest.mark.parametrize("change", ["delete", "insert"])
def test_a_deleted_or_inserted_line_is_detected_and_named(repo: Path, change: str) -> None:
    recs = lines(repo)
    if change == "delete":
        del recs[1]
    else:
        recs.insert(1, chain.seal(keep(0.2, id="ins"), recs[0]["chain"], b"z" * 32))
    ledger_path(repo, TAG).write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = reports(repo)["log"]
    # Either way the break shows at the line after the gap, named by number and id.
    n = 2 if change == "delete" else 3
    assert f"line {n} (id {recs[n - 1]['id']}): does not follow the line before it" in out.stderr
    trust = [r["_trust"] for r in Ledger(ledger_path(repo, TAG)).records()]
    assert trust[n - 1].startswith("forged") and (change == "delete" or trust[1] == "foreign")
    # The inserted keep is not believed, nor the line the gap precedes (after a delete: the 1.9 keep).
    assert best(repo) == (2.0 if change == "delete" else 1.9)


def test_a_committed_evaluator_edit_is_refused_and_never_shares_a_key(tmp_path: Path, data_env: Path,
                                                                      tiny_cache: Path) -> None:
    repo = tmp_path / "proj"
    make_project(repo)
    env = arun_env(data_env, tiny_cache)
    assert run_arun(repo, env, "start", "night").returncode == 0
    pin = json.loads((repo / ".arun" / "pins" / "autoresearch" / "night.json").read_text())
    base, before = pin["base"], fixed_code_sha256(repo)
    assert pin["fixed_code_sha256"] == before
    evaluator = repo / "engines" / "evaluator.py"
    evaluator.write_text(evaluator.read_text() + "\nBPB_SCALE = 0.5  # a friendlier metric\n")
    git(repo, "commit", "-qam", "tweak the evaluator")
    proc = run_arun(repo, env, "--budget", "2")
    assert proc.returncode != 0
    assert f"may differ from the run's base ({base[:10]})" in proc.stderr
    assert f"git checkout {base[:10]} -- engines/evaluator.py" in proc.stderr
    assert "commit them" not in proc.stderr and "arun start NAME" in proc.stderr
    assert not list((repo / "bench").glob("*/ledger.jsonl"))  # nothing recorded
    # Had the guard been bypassed: the key pins the fixed code, so the old best is not this key's.
    after = fixed_code_sha256(repo)
    assert after != before
    k_old = key_id(comparability_key("cuda", TAG, {"dataset": "d"}, 2.0, before))
    k_new = key_id(comparability_key("cuda", TAG, {"dataset": "d"}, 2.0, after))
    assert k_old != k_new
    old_best = [{"key_id": k_old, "status": "keep", "val_bpb": 1.0}]
    assert best_record(old_best, k_new) is None


# --------------------------------------------------------------------------- arun audit

def _export_bigram(path: Path, vocab: int, seq_len: int, seed: int) -> dict:
    import torch

    from engines.forward_file import export_forward

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab)).eval()
    return export_forward("cuda", lambda idx: model(idx.long()), model, path, seq_len=seq_len, batch_sizes=(1, 8, 32))


@pytest.fixture()
def scored_keep(tmp_path: Path, data_env: Path) -> tuple[Path, dict]:
    """A repo whose ledger holds a real keep: a forward scored by the evaluator process, stored by sha."""
    from arun.core.context import experiment_context, open_data
    from arun.core.scoring import score_artifact

    repo = tmp_path / "proj"
    make_project(repo)
    data = open_data()
    meta = _export_bigram(tmp_path / "fwd.pt2", data.manifest["vocab_size"], data.key()["max_seq_len"], 0)
    verdict = score_artifact("cuda", Path(meta["path"]), data.dir, tmp_path / "v.json", device="cpu")
    assert "error" not in verdict, verdict
    sha, _ = forward_store.store(repo, "cuda", Path(meta["path"]))
    ctx = experiment_context(repo, "cuda", 2.0, "cpu", data=data)
    rec = Ledger(ctx.ledger_path).append({"status": "keep", "baseline": True, "val_bpb": verdict["val_bpb"],
                                          "key": ctx.key, "key_id": ctx.key_id, "tag": ctx.tag, "backend": "cuda",
                                          "device": "cpu", "artifact_sha256": sha})
    return repo, rec


def test_audit_passes_an_honest_ledger_and_fails_a_swapped_artifact(scored_keep, data_env: Path, tiny_cache: Path,
                                                                    tmp_path: Path) -> None:
    repo, rec = scored_keep
    env = arun_env(data_env, tiny_cache)
    proc = run_arun(repo, env, "audit", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    audit = json.loads((repo / "bench" / rec["tag"] / "audit.json").read_text())
    assert audit == {rec["id"]: "ok"}

    # The agent swaps the stored forward for another one (a different model under the keep's name).
    from arun.core.context import open_data
    data = open_data()
    other = _export_bigram(tmp_path / "other.pt2", data.manifest["vocab_size"], data.key()["max_seq_len"], 1)
    stored = forward_store.path_for(repo, "cuda", rec["artifact_sha256"])
    stored.write_bytes(Path(other["path"]).read_bytes())
    proc = run_arun(repo, env, "audit", "--tag", rec["tag"], timeout=300)
    assert proc.returncode == 1
    assert rec["id"] in proc.stdout and "failed" in proc.stdout
    audit = json.loads((repo / "bench" / rec["tag"] / "audit.json").read_text())
    assert audit[rec["id"]].startswith("failed")
    recs = Ledger(ledger_path(repo, rec["tag"])).records()
    assert recs[0]["_trust"].startswith("audit failed") and best_record(recs, rec["key_id"]) is None
    log = run_arun(repo, env, "log")
    assert "[audit failed]" in log.stdout

    # Its forward is gone: nothing can re-score it, so the audit fails it (unverified), and it is never a best.
    stored.unlink()
    proc = run_arun(repo, env, "audit", timeout=300)
    assert proc.returncode == 1 and "unverified" in proc.stdout
    assert best_record(Ledger(ledger_path(repo, rec["tag"])).records(), rec["key_id"]) is None


def test_an_audit_of_a_ref_never_writes_the_working_trees_verdicts(repo: Path, data_env: Path) -> None:
    """Attack (redteam-trust audit_ref): `arun audit --ref` on an untrusted ref whose line carries the
    honest best's id. The working tree's audit.json (here holding a real failure) is left as it was."""
    from arun.core.audit import audit
    victim = lines(repo)[-1]
    folder = ledger_path(repo, TAG).parent
    (folder / "audit.json").write_text(json.dumps({"earlier-failure": "failed: re-scored 2.5"}) + "\n")
    before = (folder / "audit.json").read_text()
    git(repo, "add", "bench")
    git(repo, "commit", "-qm", "honest history")
    git(repo, "checkout", "-qb", "evil-audit")
    ledger_path(repo, TAG).write_text(json.dumps({**keep(1.0), "id": victim["id"], "artifact_sha256": "0" * 64}) + "\n")
    git(repo, "commit", "-qam", "untrusted contribution")
    git(repo, "checkout", "-q", "main")
    rows = audit(repo, TAG, ref="evil-audit")
    assert any(r.id == victim["id"] for r in rows)           # shown on screen
    assert (folder / "audit.json").read_text() == before     # never written
    assert best(repo) == 1.9


@pytest.mark.unit
def test_an_untrusted_line_reusing_an_id_never_writes_its_verdict(repo: Path) -> None:
    from arun.core.audit import audit
    victim = lines(repo)[-1]
    append_line(repo, {**keep(0.5), "id": victim["id"]})      # unsealed, carrying the best's id
    assert Ledger(ledger_path(repo, TAG)).records()[-1]["_trust"].startswith("forged")
    audit(repo, TAG)
    verdicts = json.loads((ledger_path(repo, TAG).parent / "audit.json").read_text())
    assert verdicts[victim["id"]].startswith("skipped")      # its own verdict, not the forged line's
    assert best(repo) == 1.9


def test_a_believed_line_reusing_a_failed_keeps_id_is_not_trusted(repo: Path, data_env: Path) -> None:
    """Attack (redteam-trust audit_idcollide): a keep that fails its audit, then a discard signed by a
    believed key reusing its id. The later line is flagged, the failure sticks, the keep is never a best."""
    from arun.core.audit import audit
    fake = Ledger(ledger_path(repo, TAG)).append(keep(1.0, artifact_sha256="0" * 64))  # its forward: not stored
    append_line(repo, chain.seal({**fake, "status": "discard", "val_bpb": 9.9, "prev": None, "chain": None,
                                  "sig": None, "sig_key": None}, fake["chain"]))
    recs = Ledger(ledger_path(repo, TAG)).records()
    assert recs[-1]["_trust"].startswith("forged") and "reuses the id" in recs[-1]["_trust"]
    audit(repo, TAG)
    verdicts = json.loads((ledger_path(repo, TAG).parent / "audit.json").read_text())
    assert verdicts[fake["id"]].startswith("failed")
    assert best(repo) == 1.9


@pytest.mark.unit
def test_a_sent_id_that_is_taken_gets_a_fresh_one(repo: Path) -> None:
    """A swarm worker's record keeps the id it sends unless a line already has it: the head re-ids it."""
    from arun.swarm.actors import LedgerWriter
    taken = lines(repo)[-1]["id"]
    got = LedgerWriter(str(repo)).append({**keep(1.5), "id": taken})
    assert got["id"] != taken and got["sent_id"] == taken
    assert [r["_trust"] for r in Ledger(ledger_path(repo, TAG)).records()] == ["ok"] * 4
    assert best(repo) == 1.5


def test_audit_rescores_every_seed_of_a_multi_seed_keep_and_its_mean(tmp_path: Path, data_env: Path,
                                                                     tiny_cache: Path) -> None:
    """The red team's forge: a keep with its real first seed's score and forward but a made-up val_bpb
    (audit re-scored seeds[0] only). Now val_bpb must be the seeds' mean and each seed's forward its score."""
    from arun.core.context import experiment_context, open_data
    from arun.core.scoring import score_artifact

    repo = tmp_path / "proj"
    make_project(repo)
    data = open_data()
    shas, vals = [], []
    for seed in (0, 1):
        meta = _export_bigram(tmp_path / f"fwd{seed}.pt2", data.manifest["vocab_size"], data.key()["max_seq_len"], seed)
        verdict = score_artifact("cuda", Path(meta["path"]), data.dir, tmp_path / f"v{seed}.json", device="cpu")
        assert "error" not in verdict, verdict
        shas.append(forward_store.store(repo, "cuda", Path(meta["path"]))[0])
        vals.append(verdict["val_bpb"])
    ctx = experiment_context(repo, "cuda", 2.0, "cpu", data=data)
    ledger = Ledger(ctx.ledger_path)
    common = {"status": "keep", "baseline": True, "key": ctx.key, "key_id": ctx.key_id, "tag": ctx.tag,
              "backend": "cuda", "device": "cpu", "artifact_sha256": shas[0], "artifact_sha256_seeds": shas}
    mean = (vals[0] + vals[1]) / 2
    honest = ledger.append({**common, "val_bpb": mean, "val_bpb_seeds": vals})
    forged = ledger.append({**common, "val_bpb": 1.234567, "val_bpb_seeds": vals})
    second = [vals[0], vals[1] - 0.5]  # the second seed's score made up, the mean consistent with it
    lied = ledger.append({**common, "val_bpb": (second[0] + second[1]) / 2, "val_bpb_seeds": second})
    proc = run_arun(repo, arun_env(data_env, tiny_cache), "audit", timeout=300)
    audit = json.loads((repo / "bench" / ctx.tag / "audit.json").read_text())
    assert audit[honest["id"]] == "ok", proc.stdout
    assert audit[forged["id"]].startswith("failed: recorded val_bpb 1.234567 is not the mean"), audit
    assert audit[lied["id"]].startswith("failed: re-scored") and "(seed 2/2)" in audit[lied["id"]], audit
    assert proc.returncode == 1
