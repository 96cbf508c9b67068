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
