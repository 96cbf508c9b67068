"""prepare.py on real files: sources, tokenizer, packing, fixed val rows, manifest, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from arun_data import build
from prepare import BestFitPacker, PrepareError, PreparedData, Tokenizer

REPO = Path(__file__).resolve().parents[1]


def _corpus_text(n_docs: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "über", "naïve", "日本", "code", "def", "return", "42", "π≈3.14"]
    return [" ".join(rng.choice(words, size=rng.integers(5, 60))) + "." for _ in range(n_docs)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ARUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ARUN_DATA_DIR", raising=False)
    return tmp_path / "cache"


def test_tokenizer_round_trip_and_token_bytes(tiny_data: Path) -> None:
    tok = Tokenizer.from_directory(tiny_data)
    for text in ["plain ASCII text, with digits 12345!", "Grüße, naïve café — 日本語 🙂", "def f(x):\n    return x\n"]:
        assert tok.decode(tok.encode(text)) == text
    tb = PreparedData(tiny_data).token_bytes()
    assert tb.shape == (tok.vocab_size,)
    # special tokens are excluded from the metric by a byte length of 0
    assert tb[tok.bos_token_id] == 0 and (tb[tb > 0] >= 1).all()
    # byte lengths add up to the UTF-8 length of what they encode
    text = "Grüße aus 日本"
    assert sum(int(tb[i]) for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_val_rows_are_fixed_and_bos_aligned(tiny_data: Path, cache: Path) -> None:
    data = PreparedData(tiny_data)
    rows = data.val_rows()
    assert rows.dtype == np.int32 and rows.shape == (8192 // 64, 65)
    bos = Tokenizer.from_directory(tiny_data).bos_token_id
    assert (rows[:, 0] == bos).all()
    # a second, independent prepare of the same data gives byte-identical rows
    again = build.prepare("pystdlib", "tiny", log=lambda s: None)
    assert np.array_equal(PreparedData(again).val_rows(), rows)
    assert PreparedData(again).manifest["val_rows_sha256"] == data.manifest["val_rows_sha256"]


def test_packer_invariants() -> None:
    rng = np.random.default_rng(1)
    bos = 9999
    docs = [np.concatenate([[bos], rng.integers(0, 100, size=rng.integers(1, 90))]).astype(np.int32) for _ in range(3000)]
    packer = BestFitPacker(iter(docs), row_len=65, buffer_size=50)
    rows = np.empty((200, 65), dtype=np.int32)
    for r in range(len(rows)):
        assert packer.fill(rows[r])
    assert (rows[:, 0] == bos).all()  # every row starts with BOS, so with a document
    assert (rows >= 0).all()          # no padding value anywhere
    # every row is a concatenation of document prefixes, each in order
    by_first = {}
    for d in docs:
        by_first.setdefault(tuple(d[:3]), []).append(d)
    for row in rows:
        starts = np.flatnonzero(row == bos)
        for a, b in zip(starts, list(starts[1:]) + [len(row)]):
            piece = row[a:b]
            assert any(len(d) >= len(piece) and np.array_equal(d[:len(piece)], piece) for d in docs), "piece not from a document"


def test_packer_prefers_largest_fitting_doc() -> None:
    docs = [np.array([0] + [1] * (n - 1), dtype=np.int32) for n in (3, 5, 8)]
    row = np.empty(10, dtype=np.int32)
    BestFitPacker(iter(docs), row_len=10).fill(row)
    assert list(np.flatnonzero(row == 0)) == [0, 8]  # 8 fits first, then only 2 slots: crop the shortest (3)


def test_dataloader_deterministic_and_shaped(tiny_data: Path) -> None:
    a = prepare.make_dataloader(4, 64, seed=3, data_dir=tiny_data)
    b = prepare.make_dataloader(4, 64, seed=3, data_dir=tiny_data, prefetch=0)
    for _ in range(5):
        xa, ya, ea = next(a)
        xb, yb, _ = next(b)
        assert xa.shape == (4, 64) and xa.dtype == np.int32
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])
        assert ea == 1
    c = prepare.make_dataloader(4, 64, seed=4, data_dir=tiny_data, prefetch=0)
    assert not np.array_equal(next(c)[0], next(prepare.make_dataloader(4, 64, seed=3, data_dir=tiny_data, prefetch=0))[0])


def test_dataloader_counts_epochs(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _corpus_text(3000)))
    path = build.prepare(f"files:{tmp_path / 'docs.jsonl'}", "tiny", log=lambda s: None)
    train_tokens = PreparedData(path).manifest["train_tokens"]
    loader = prepare.make_dataloader(16, 64, data_dir=path, prefetch=0)
    epochs = [next(loader)[2] for _ in range(2 * train_tokens // (16 * 65) + 20)]
    assert epochs[0] == 1 and max(epochs) >= 2 and epochs == sorted(epochs)


@pytest.mark.parametrize("fmt", ["txt-dir", "txt-blank", "jsonl", "parquet", "glob"])
def test_files_dataset_formats(fmt: str, tmp_path: Path, cache: Path) -> None:
    docs = _corpus_text(3000)
    src = tmp_path / "src"
    src.mkdir()
    if fmt == "txt-dir":
        for i, d in enumerate(docs):
            (src / f"{i:04d}.txt").write_text(d * 3)
        spec = str(src)
    elif fmt == "txt-blank":
        (src / "book.txt").write_text("\n\n".join(docs))
        spec = str(src / "book.txt")
    elif fmt == "jsonl":
        (src / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
        spec = str(src / "d.jsonl")
    elif fmt == "parquet":
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), src / "d.parquet", row_group_size=300)
        spec = str(src / "d.parquet")
    else:
        for i in range(3):
            (src / f"part{i}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[i::3]))
        spec = str(src / "part*.jsonl")
    path = build.prepare(f"files:{spec}", "tiny", log=lambda s: None)
    m = PreparedData(path).manifest
    assert m["train_docs"] > m["val_docs"] > 0
    assert m["train_docs"] + m["val_docs"] == (len(docs) if fmt != "txt-dir" else len(docs))
    assert json.loads((cache / "current.json").read_text())["data_dir"] == str(path)


def _fails(spec: str, profile: str = "tiny", match: str = "") -> str:
    with pytest.raises(PrepareError) as e:
        build.prepare(spec, profile, log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and match in msg
    return msg


def test_bad_input_one_line_errors(tmp_path: Path, cache: Path) -> None:
    _fails(f"files:{tmp_path / 'nope'}", match="no such file")
    (tmp_path / "empty.txt").write_text("")
    _fails(f"files:{tmp_path / 'empty.txt'}", match="empty")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    _fails(f"files:{tmp_path / 'latin.txt'}", match="not UTF-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    _fails(f"files:{tmp_path / 'bad.jsonl'}", match="'text'")
    (tmp_path / "small.txt").write_text("\n\n".join(_corpus_text(30)))
    _fails(f"files:{tmp_path / 'small.txt'}", match="validation split too small")
    _fails("wikipedia", match="unknown dataset")
    _fails("pystdlib", profile="huge", match="unknown profile")
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    _fails(f"files:{tmp_path / 'trunc.parquet'}", match="unreadable parquet")
    # nothing half-written is left behind by any failure
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in cache.glob("*")) if cache.exists() else True


def test_no_data_names_the_prepare_command(cache: Path) -> None:
    with pytest.raises(PrepareError, match="arun prepare --dataset pystdlib"):
        PreparedData.open()


def test_corrupt_cache_is_detected(tiny_data: Path, tmp_path: Path) -> None:
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    rows = np.load(copy / "val_rows.npy")
    rows[0, 1] += 1
    np.save(copy / "val_rows.npy", rows)
    with pytest.raises(PrepareError, match="does not match the manifest"):
        PreparedData(copy).val_rows()
    (copy / "token_bytes.npy").unlink()
    with pytest.raises(PrepareError, match="missing"):
        PreparedData(copy).token_bytes()


def test_cli_prepare_and_doctor(tmp_path: Path) -> None:
    env = {"ARUN_CACHE": str(tmp_path / "c"), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "arun.cli", "prepare", "--dataset", "pystdlib", "--profile", "tiny"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "c" / "pystdlib-tiny" / "manifest.json").exists()
    bad = subprocess.run([sys.executable, "-m", "arun.cli", "prepare", "--dataset", "files:/does/not/exist"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no such file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    doc = subprocess.run([sys.executable, "-m", "arun.cli", "doctor"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert doc.returncode == 0 and "mlx" in doc.stdout and "cuda" in doc.stdout


def test_uniform_bound_arithmetic() -> None:
    """A uniform model scores log2(V) * tokens / bytes exactly."""
    from engines.evaluator import bpb_from_sums
    V, tokens, nbytes = 512, 1000, 3700
    assert math.isclose(bpb_from_sums(tokens * math.log(V), nbytes), math.log2(V) * tokens / nbytes)
