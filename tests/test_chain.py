"""Ledger seals: every way to change a sealed ledger by hand is detected and named."""

import json

import pytest

from arun.core import chain


@pytest.fixture()
def key(tmp_path, monkeypatch):
    monkeypatch.setenv("ARUN_HOME", str(tmp_path / "home"))
    return chain.machine_key()


def sealed(key, n=4):
    out, prev = [], ""
    for i in range(n):
        rec = chain.seal({"id": f"r{i}", "status": "discard", "val_bpb": 2.0 - i / 100}, prev, key)
        out.append(rec)
        prev = rec["chain"]
    return [json.loads(json.dumps(r)) for r in out]  # as read back from the file


def test_machine_key_is_stable_and_private(key, tmp_path):
    assert chain.machine_key() == key
    assert (chain.key_path().stat().st_mode & 0o777) == 0o600
    assert str(tmp_path / "home") in str(chain.key_path())


def test_an_untouched_ledger_verifies(key):
    v = chain.check(sealed(key), key)
    assert v.problems == [] and v.bad == set() and v.foreign == set()


def test_an_edited_line_is_named(key):
    recs = sealed(key)
    recs[2]["val_bpb"] = 0.5
    v = chain.check(recs, key)
    assert v.bad == {2}
    assert "edited" in str(v.problems[0]) and "r2" in str(v.problems[0])


def test_a_deleted_line_is_detected_at_the_next(key):
    recs = sealed(key)
    del recs[1]
    v = chain.check(recs, key)
    assert v.bad == {1} and "deleted" in v.problems[0].what


def test_an_inserted_unsealed_line_is_forged(key):
    recs = sealed(key)
    recs.insert(2, {"id": "fake", "status": "keep", "val_bpb": 0.1})
    v = chain.check(recs, key)
    assert 2 in v.bad and "unsealed" in v.problems[0].what
    assert 3 in v.bad  # the next line no longer follows its predecessor


def test_a_resealed_chain_without_the_key_is_forged(key):
    recs = sealed(key)
    # The forger recomputes the whole chain correctly but cannot make our mac.
    forged = chain.seal({"id": "fake", "status": "keep", "val_bpb": 0.1}, recs[-1]["chain"], b"x" * 32)
    forged["mac_key"] = chain.key_id(key)
    v = chain.check(recs + [forged], key)
    assert v.bad == {4} and "forged" in v.problems[0].what


def test_another_machines_key_is_foreign_not_trusted(key):
    other = sealed(b"y" * 32, 2)
    v = chain.check(other, key)
    assert v.problems == [] and v.foreign == {0, 1}


def test_legacy_prefix_is_accepted_and_chained(key):
    legacy = [{"id": "old0", "status": "keep", "val_bpb": 2.5}]
    prev = chain.tail_chain(legacy[0])
    new = chain.seal({"id": "n0", "status": "discard", "val_bpb": 2.6}, prev, key)
    v = chain.check(legacy + [json.loads(json.dumps(new))], key)
    assert v.problems == [] and v.legacy == {0}


# --------------------------------------------------------------------------- Ed25519 identities

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from arun.core import trust  # noqa: E402
from arun.core.ledger import Ledger, all_records, trusted  # noqa: E402


def signed_by(priv: Ed25519PrivateKey, records: list[dict], prev: str = "") -> list[dict]:
    """Lines as another machine writes them: chained, signed with its own identity."""
    out = []
    for rec in records:
        body = json.loads(json.dumps(rec))
        c = chain.chain_of(prev, body)
        body.update(prev=prev, chain=c, sig=priv.sign(b"arun-ledger-line:" + c.encode()).hex(),
                    sig_key=trust.key_id(priv.public_key()))
        out.append(body)
        prev = c
    return out


def test_identity_key_is_private_stable_and_signs_new_lines(key, tmp_path):
    pub = trust.own_public()
    assert trust.own_public() == pub or trust.key_id(trust.own_public()) == trust.key_id(pub)
    assert (trust.identity_path().stat().st_mode & 0o777) == 0o600
    assert trust.identity_path().parent == chain.key_path().parent  # the folder confinement hides
    led = Ledger(tmp_path / "repo" / "bench" / "t" / "ledger.jsonl")
    rec = led.append({"status": "keep", "val_bpb": 2.0, "key_id": "k"})
    assert rec["sig_key"] == trust.key_id(pub) and "mac" not in rec
    got = led.records()[0]
    assert got["_trust"] == "ok" and got["_signer"] == "this machine"


def test_a_trusted_machines_lines_verify_and_an_unknown_ones_are_foreign(key, tmp_path):
    other = Ed25519PrivateKey.generate()
    repo = tmp_path / "repo"
    path = repo / "bench" / "t" / "ledger.jsonl"
    path.parent.mkdir(parents=True)
    lines = signed_by(other, [{"id": "a", "status": "keep", "val_bpb": 2.0, "key_id": "k"}])
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rec = Ledger(path).records()[0]
    assert rec["_trust"] == "foreign" and rec["_signer"] == f"key {trust.key_id(other.public_key())}"
    trust.add(repo, trust.public_text(other.public_key()), "gpu box")
    rec = Ledger(path).records()[0]
    assert rec["_trust"] == "ok" and rec["_signer"] == "gpu box" and trusted(rec)
    assert [k.name for k in trust.repo_keys(repo)] == ["gpu box"]
    trust.remove(repo, "gpu box")
    assert Ledger(path).records()[0]["_trust"] == "foreign"


def test_a_bad_signature_under_a_trusted_key_is_forged(key, tmp_path):
    lab = Ed25519PrivateKey.generate()
    forger = Ed25519PrivateKey.generate()
    honest = signed_by(lab, [{"id": "a", "status": "keep", "val_bpb": 2.0}])
    # The forger chains correctly and names the lab's key, but signs with its own.
    fake = signed_by(forger, [{"id": "fake", "status": "keep", "val_bpb": 0.1}], honest[-1]["chain"])[0]
    fake["sig_key"] = trust.key_id(lab.public_key())
    keys = {trust.key_id(lab.public_key()): trust.Known(trust.key_id(lab.public_key()), "lab", lab.public_key())}
    v = chain.check(honest + [fake], None, keys=keys)
    assert v.bad == {1} and "does not verify under the trusted key" in v.problems[0].what
    assert v.signer == {0: "lab"}


def test_legacy_hmac_lines_verify_here_only(key):
    recs = sealed(key, 2)
    mine = chain.check(recs, key)
    assert mine.bad == set() and mine.foreign == set() and "legacy HMAC" in mine.signer[0]
    elsewhere = chain.check(recs, b"q" * 32)
    assert elsewhere.foreign == {0, 1}


def test_trust_file_lines_that_are_not_keys_trust_nothing(key, tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "trusted_keys").write_text("# lab keys\nnot-a-key name\ned25519:AAAA short\n")
    assert trust.repo_keys(tmp_path) == []
    with pytest.raises(Exception, match="not an arun public key"):
        trust.add(tmp_path, "ed25519:AAAA")


def test_a_ref_is_judged_by_the_working_trees_trust_not_its_own(key, tmp_path):
    """A fetched branch that adds its own key to bench/trusted_keys does not make its lines verified."""
    import subprocess
    other = Ed25519PrivateKey.generate()
    repo = tmp_path / "r"
    (repo / "bench" / "t").mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q", "-b", "main")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (repo / "README").write_text("x\n")
    git("add", "-A")
    git("commit", "-qm", "base")
    git("checkout", "-qb", "theirs")
    (repo / "bench" / "t" / "ledger.jsonl").write_text(
        json.dumps(signed_by(other, [{"id": "x", "status": "keep", "val_bpb": 0.5, "time": "1"}])[0]) + "\n")
    trust.add(repo, trust.public_text(other.public_key()), "self-vouched")
    git("add", "-A")
    git("commit", "-qm", "their records and their trust")
    git("checkout", "-q", "main")
    recs = all_records(repo, ["theirs"])
    assert [r["_trust"] for r in recs] == ["foreign"]


def _symlinked_ledger(tmp_path, what: str):
    """Attack (redteam-trust symlink_trust / symlink_ratchet): a ledger (or bench/ or trusted_keys) that is a
    symlink into a folder whose own bench/trusted_keys vouches for a forger's key."""
    import os
    forger = Ed25519PrivateKey.generate()
    evil = tmp_path / "evil"
    (evil / "bench" / "t").mkdir(parents=True)
    (evil / "bench" / "t" / "ledger.jsonl").write_text(
        json.dumps(signed_by(forger, [{"id": "f", "status": "keep", "val_bpb": 0.1, "key_id": "k"}])[0]) + "\n")
    trust.add(evil, trust.public_text(forger.public_key()), "lab-head")
    repo = tmp_path / "repo"
    if what == "bench":
        repo.mkdir()
        os.symlink(evil / "bench", repo / "bench")
    else:
        (repo / "bench" / "t").mkdir(parents=True)
        if what == "ledger":
            os.symlink(evil / "bench" / "t" / "ledger.jsonl", repo / "bench" / "t" / "ledger.jsonl")
        else:  # trusted_keys
            os.symlink(evil / "bench" / "trusted_keys", repo / "bench" / "trusted_keys")
            (repo / "bench" / "t" / "ledger.jsonl").write_text((evil / "bench" / "t" / "ledger.jsonl").read_text())
    return repo / "bench" / "t" / "ledger.jsonl", evil / "bench" / "t" / "ledger.jsonl"


@pytest.mark.parametrize("what", ["ledger", "bench", "trusted_keys"])
def test_a_symlinked_ledger_bench_or_trust_file_is_refused(key, tmp_path, what):
    from arun.core.errors import ArunError
    path, target = _symlinked_ledger(tmp_path, what)
    before = target.read_text()
    with pytest.raises(ArunError, match="is a symlink"):
        Ledger(path).records()
    with pytest.raises(ArunError, match="is a symlink"):
        Ledger(path).append({"status": "keep", "val_bpb": 2.0, "key_id": "k"})
    assert target.read_text() == before   # nothing appended through the link
    if what == "trusted_keys":              # `arun trust list` and every trust read refuse it too
        with pytest.raises(ArunError, match="is a symlink"):
            trust.trusted(tmp_path / "repo")


# --------------------------------------------------------------------------- transfer: whose record wins

def _transfer_ledger(tmp_path, key) -> tuple:
    """This machine's baseline and keep at commit C, then another machine's keep claiming C (later, other
    constants), as a ledger merged from elsewhere would hold it."""
    repo = tmp_path / "repo"
    path = repo / "bench" / "t" / "ledger.jsonl"
    led = Ledger(path)
    commit = "c0ffee" * 6 + "abcd"
    common = {"tag": "t", "key_id": "k", "train_file": "train_cuda.py"}
    led.append({**common, "id": "base", "status": "keep", "baseline": True, "val_bpb": 3.0, "commit": "b" * 40,
                "config": {"LR": 1.0}})
    led.append({**common, "id": "mine", "status": "keep", "val_bpb": 2.9, "commit": commit, "config": {"LR": 2.0}})
    other = Ed25519PrivateKey.generate()
    last = json.loads(path.read_text().splitlines()[-1])
    forged = signed_by(other, [{**common, "id": "theirs", "status": "keep", "val_bpb": 0.5, "commit": commit,
                                "time": "2999-01-01T00:00:00+0000", "config": {"LR": 0.0}}], prev=last["chain"])
    with path.open("a") as f:
        f.write(json.dumps(forged[0]) + "\n")
    return repo, commit, other


def test_transfer_from_a_commit_takes_this_machines_keep_over_another_machines_claim(key, tmp_path):
    from arun.search.transfer import find_winner
    repo, commit, _ = _transfer_ledger(tmp_path, key)
    win = find_winner(repo, commit[:10])
    assert win.record["id"] == "mine" and win.constants == {"LR": 2.0} and "this machine" in win.source


def test_a_trusted_key_named_like_this_machine_is_not_this_machine(key, tmp_path):
    from arun.search.transfer import find_winner, own
    repo, commit, other = _transfer_ledger(tmp_path, key)
    trust.add(repo, trust.public_text(other.public_key()), "this machine")  # a display name is anyone's to choose
    recs = {r["id"]: r for r in all_records(repo)}
    from arun.search.transfer import believable
    mine, theirs = ({r["id"]: r for r in believable(list(recs.values()))}[i] for i in ("mine", "theirs"))
    assert own(mine) and not own(theirs)
    assert find_winner(repo, commit[:10]).record["id"] == "mine"
