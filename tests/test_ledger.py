"""The ledger on a real filesystem and real git: appends, torn tails, garbage, concurrency, refs; keys."""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from arun.core.chain import SEAL_FIELDS
from arun.core.errors import ArunError
from arun.core.keys import comparability_key, key_id
from arun.core.ledger import Ledger, all_records, ledger_path, written
from arun.core.ratchet import baseline_record, best_record, decide, running_best
from arun.core.record import Record
from helpers_repo import empty_repo, git


@pytest.mark.unit
def test_append_adds_id_and_time_and_reads_back(tmp_path: Path) -> None:
    led = Ledger(ledger_path(tmp_path, "cuda-nvidia-h100-80gb-hbm3"))
    assert led.path == tmp_path / "bench" / "cuda-nvidia-h100-80gb-hbm3" / "ledger.jsonl"
    assert led.records() == []
    a = led.append({"status": "keep", "val_bpb": 1.0, "description": "tab\there, newline\nthere, ünïcode"})
    b = led.append({"id": "fixed", "time": "2026-01-01T00:00:00+0000", "status": "crash"})
    assert a["id"] and a["time"] and b["id"] == "fixed"
    back = led.records()
    assert [r["_trust"] for r in back] == ["ok", "ok"]  # sealed by this machine
    assert [written(r) for r in back] == [a, b]
    assert "_trust" not in led.path.read_text()  # the trust mark lives in memory only
    assert len(led.path.read_text().splitlines()) == 2  # one line per record, whatever the text holds


@pytest.mark.unit
def test_garbage_lines_are_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"n": 1})
    with open(led.path, "a") as f:
        f.write("not json\n[1, 2]\n\n")
    led.append({"n": 2})
    assert [r["n"] for r in led.records()] == [1, 2]
    assert "skipped 2 unreadable line(s)" in capsys.readouterr().err


def test_a_torn_last_line_is_repaired_before_the_next_append(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"n": 1})
    # What a writer killed mid-write leaves: part of a line, no newline. A real kill -9 of a process
    # blocked after writing half a record.
    script = (f"import os, time; fd = os.open({str(led.path)!r}, os.O_WRONLY | os.O_APPEND); "
              "os.write(fd, b'{\"n\": 2, \"status\": \"ke'); print('written', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [r["n"] for r in led.records()] == [1]            # readers skip the torn tail
    capsys.readouterr()
    led.append({"n": 3})
    assert [r["n"] for r in led.records()] == [1, 3]
    assert "repaired a torn last line" in capsys.readouterr().err
    assert led.path.read_text().endswith("}\n")
    assert '"status": "ke' in (tmp_path / "ledger.jsonl.torn").read_text()  # the bytes are kept aside


def _writer(path: str, worker: int, n: int) -> None:
    led = Ledger(path)
    for i in range(n):
        led.append({"worker": worker, "i": i, "pad": "x" * (100 + 37 * i)})


def test_concurrent_appends_from_processes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 160
    recs = [json.loads(line) for line in lines]
    for w in range(4):
        assert [r["i"] for r in recs if r["worker"] == w] == list(range(40))


def test_a_failed_write_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    """A file-size limit (as a full disk would) stops the write mid-record: no half line stays behind."""
    led = Ledger(tmp_path / "ledger.jsonl")
    led.append({"n": 1})
    size = led.path.stat().st_size
    script = (
        "import resource, signal, sys\n"
        "from arun.core.ledger import Ledger\n"
        "from arun.core.errors import ArunError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size + 100}, resource.RLIM_INFINITY))\n"
        "try:\n"
        f"    Ledger({str(led.path)!r}).append({{'n': 2, 'pad': 'x' * 5000}})\n"
        "except ArunError as e:\n"
        "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "the ledger is unchanged" in out.stdout, out.stderr
    assert led.path.stat().st_size == size
    assert [r["n"] for r in led.records()] == [1]


@pytest.mark.unit
def test_all_records_reads_bench_and_git_refs(tmp_path: Path) -> None:
    repo = empty_repo(tmp_path / "repo")
    # Another machine's run branch: its ledger is committed there, not in this working tree.
    git(repo, "checkout", "-qb", "autoresearch/h100")
    other = Ledger(ledger_path(repo, "cuda-nvidia-h100-80gb-hbm3"))
    r1 = other.append({"id": "h100-1", "time": "2026-01-01T00:00:00+0000", "status": "keep", "val_bpb": 0.99})
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "h100 results")
    git(repo, "checkout", "-q", "main")
    assert not other.path.exists()
    here = Ledger(ledger_path(repo, "mlx-apple-m4-max-64gb")).append(
        {"id": "m4-1", "time": "2026-01-02T00:00:00+0000", "status": "keep", "val_bpb": 1.3})
    assert [r["id"] for r in all_records(repo)] == ["m4-1"]
    assert [r["id"] for r in all_records(repo, ["autoresearch/h100"])] == ["h100-1", "m4-1"]
    # A ref that also holds a record this tree has is read once.
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "m4")
    assert [r["id"] for r in all_records(repo, ["main", "autoresearch/h100"])] == [r1["id"], here["id"]]
    with pytest.raises(ArunError, match="git ref 'nope' not found"):
        all_records(repo, ["nope"])


@pytest.mark.unit
def test_comparability_key_and_its_id() -> None:
    data = {"dataset": "pystdlib", "profile": "tiny", "dataset_fingerprint": "f", "tokenizer_sha256": "t",
            "val_rows_sha256": "v", "max_seq_len": 64, "eval_tokens": 8192}
    k = comparability_key("mlx", "mlx-apple-m4-max-64gb", data, 300, 1)
    assert k["backend"] == "mlx" and k["hardware"] == "mlx-apple-m4-max-64gb" and k["time_budget"] == 300.0
    assert key_id(k) == key_id(dict(reversed(list(k.items()))))          # order does not matter
    assert len(key_id(k)) == 12 and int(key_id(k), 16) >= 0
    for change in ({"time_budget": 301.0}, {"hardware": "mlx-apple-m4-max-128gb"}, {"profile": "small"},
                   {"evaluator_version": 2}, {"val_rows_sha256": "w"}):
        assert key_id({**k, **change}) != key_id(k)


@pytest.mark.unit
def test_ratchet_rules() -> None:
    recs = [
        {"key_id": "a", "status": "crash", "baseline": True, "val_bpb": None},
        {"key_id": "a", "status": "keep", "baseline": True, "val_bpb": 1.5, "id": "a1"},
        {"key_id": "b", "status": "keep", "baseline": True, "val_bpb": 0.5, "id": "b1"},
        {"key_id": "a", "status": "discard", "val_bpb": 1.2, "id": "a2"},   # (a discard is never a best)
        {"key_id": "a", "status": "keep", "val_bpb": 1.4, "id": "a3"},
    ]
    assert best_record(recs, "a")["id"] == "a3" and best_record(recs, "b")["id"] == "b1"
    assert best_record(recs, "c") is None
    assert baseline_record(recs, "a")["id"] == "a1"   # the crashed first attempt is not the baseline
    assert decide(1.0, None) == ("keep", False)
    assert decide(1.39, best_record(recs, "a")) == ("keep", False)
    assert decide(1.4, best_record(recs, "a")) == ("discard", True)     # equal is not better
    assert decide(1.401, best_record(recs, "a"), near_miss=0.002) == ("discard", True)
    assert decide(1.41, best_record(recs, "a"), near_miss=0.002) == ("discard", False)
    assert running_best([r for r in recs if r["key_id"] == "a"]) == [None, 1.5, 1.5, 1.4]


@pytest.mark.unit
@pytest.mark.parametrize("written", [True, False, float("nan"), float("inf"), pytest.param(10**400, id="int-past-float"),
                                     "0.5", None, [0.5]])
def test_a_figure_that_is_not_a_finite_number_never_scores(written: object) -> None:
    """JSON's true is Python's 1 and NaN compares false with everything: neither may become a best, a
    baseline, a held-out score or a measured spread."""
    from arun.core.numbers import finite
    from arun.core.timing import reference_of
    from arun.report.val_vs_test import heldout_bpb
    from arun.search.noise import _std
    assert finite(written) is None and finite(0.5) == 0.5 and finite(2) == 2.0
    recs = [{"key_id": "a", "status": "keep", "baseline": True, "val_bpb": written, "id": "w",
             "test_bpb": written, "non_training_seconds": written},
            {"key_id": "a", "status": "keep", "baseline": True, "val_bpb": 1.4, "id": "a1"}]
    assert best_record(recs, "a")["id"] == "a1" and baseline_record(recs, "a")["id"] == "a1"
    assert heldout_bpb(recs[0]) is None and reference_of(recs[0]) is None and _std({"std": written}) is None


@pytest.mark.unit
def test_record_round_trips_and_keeps_fields_it_does_not_know(tmp_path: Path) -> None:
    line = {"id": "x", "time": "t", "key_id": "k", "status": "keep", "val_bpb": 1.5, "from_the_future": {"a": 1}}
    rec = Record.from_json(line)
    assert rec.val_bpb == 1.5 and rec.extra == {"from_the_future": {"a": 1}}
    out = rec.to_json()
    assert {k: out[k] for k in line} == line  # every field it read comes back unchanged
    Ledger(ledger_path(tmp_path, "t")).append(out)
    back = Record.from_json(Ledger(ledger_path(tmp_path, "t")).records()[0]).to_json()
    assert "_trust" not in back  # the reader's mark never becomes a field
    assert {k: v for k, v in back.items() if k not in SEAL_FIELDS} == out
