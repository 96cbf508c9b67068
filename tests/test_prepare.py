"""prepare.py on real files: sources, tokenizer, packing, fixed val and test rows, manifest, bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from arun_data import build, sources
from prepare import BestFitPacker, PreparedData, PrepareError, Tokenizer

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
    assert np.array_equal(PreparedData(again).test_rows(), data.test_rows())
    assert PreparedData(again).key() == data.key()


def _row_pieces(rows: np.ndarray, bos: int) -> list[np.ndarray]:
    """The document pieces of packed rows: each starts at a BOS."""
    out = []
    for row in rows:
        starts = list(np.flatnonzero(row == bos)) + [len(row)]
        out += [row[a:b] for a, b in zip(starts, starts[1:])]
    return out


def test_test_rows_are_held_out(tiny_data: Path) -> None:
    data = PreparedData(tiny_data)
    val, test = data.val_rows(), data.test_rows()
    assert test.dtype == np.int32 and test.shape == val.shape == tuple(data.manifest["test_rows_shape"])
    bos = Tokenizer.from_directory(tiny_data).bos_token_id
    assert (test[:, 0] == bos).all()
    assert not np.array_equal(test, val)
    m = data.manifest
    assert m["version"] == build.MANIFEST_VERSION and m["test_docs"] > 0
    assert data.key()["test_rows_sha256"] == m["test_rows_sha256"] == prepare.sha256_file(tiny_data / "test_rows.npy")
    data.verify()
    # pystdlib splits by file; the stdlib itself has byte-identical chunks in different files, which are
    # the only texts allowed in two splits
    root, files = sources.pystdlib_files()
    owners: dict[str, set[Path]] = {}
    for f in files:
        for chunk in sources._chunks(f.read_text(encoding="utf-8", errors="replace"), sources.PYSTDLIB_DOC_CHARS):
            owners.setdefault(chunk, set()).add(f)
    src = sources.pystdlib_source()
    train, val_docs, test_docs = set(src.train_docs()), set(src.val_docs()), set(src.test_docs())
    assert len(test_docs) > 100
    assert all(len(owners[t]) > 1 for t in test_docs & (train | val_docs))


def test_files_test_split_is_disjoint_by_document(tmp_path: Path, cache: Path) -> None:
    words = _corpus_text(3000)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"id{i:05d} {w}"}) for i, w in enumerate(words)))
    path = build.prepare(f"files:{tmp_path / 'd.jsonl'}", "tiny", log=lambda s: None)
    data = PreparedData(path)
    tok = Tokenizer.from_directory(path)

    def ids(pieces: list) -> set[int]:
        found = (re.match(r"id(\d{5}) ", tok.decode([int(t) for t in p[1:]])) for p in pieces)
        return {int(f.group(1)) for f in found if f}

    train = ids([tokens[offsets[i]:offsets[i + 1]] for tokens, offsets in data.train_shards() for i in range(len(offsets) - 1)])
    val = ids(_row_pieces(data.val_rows(), tok.bos_token_id))
    test = ids(_row_pieces(data.test_rows(), tok.bos_token_id))
    assert len(train) == data.manifest["train_docs"] and len(test) > 50 and len(val) > 50
    assert not test & val and not test & train and not val & train
    # the val selection is the one from before the test split existed: 1 in VAL_EVERY by hash bucket 0
    assert all(sources._stable_bucket(f"d.jsonl#{i}") % sources.VAL_EVERY == 0 for i in val)


@pytest.mark.unit
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_dataloader_counts_epochs(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _corpus_text(3000)))
    path = build.prepare(f"files:{tmp_path / 'docs.jsonl'}", "tiny", log=lambda s: None)
    train_tokens = PreparedData(path).manifest["train_tokens"]
    loader = prepare.make_dataloader(16, 64, data_dir=path, prefetch=0)
    epochs = [next(loader)[2] for _ in range(2 * train_tokens // (16 * 65) + 20)]
    assert epochs[0] == 1 and max(epochs) >= 2 and epochs == sorted(epochs)


@pytest.mark.e2e
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
    assert m["train_docs"] > m["val_docs"] > 0 and m["test_docs"] > 0
    assert m["train_docs"] + m["val_docs"] + m["test_docs"] == len(docs)
    assert json.loads((cache / "current.json").read_text())["data_dir"] == str(path)


def _fails(spec: str, profile: str = "tiny", match: str = "") -> str:
    with pytest.raises(PrepareError) as e:
        build.prepare(spec, profile, log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and match in msg
    return msg


@pytest.mark.unit
def test_bad_input_one_line_errors(tmp_path: Path, cache: Path) -> None:
    _fails(f"files:{tmp_path / 'nope'}", match="no such file")
    (tmp_path / "empty.txt").write_text("")
    _fails(f"files:{tmp_path / 'empty.txt'}", match="empty")
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    _fails(f"files:{tmp_path / 'latin.txt'}", match="not UTF-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    _fails(f"files:{tmp_path / 'bad.jsonl'}", match="'text'")
    (tmp_path / "small.txt").write_text("\n\n".join(_corpus_text(30)))
    msg = _fails(f"files:{tmp_path / 'small.txt'}", match="validation split too small")
    assert "add data" in msg and "--profile" not in msg  # tiny is already the smallest profile
    assert "--profile tiny" in _fails(f"files:{tmp_path / 'small.txt'}", profile="small", match="too small")
    _fails("wikipedia", match="unknown dataset")
    _fails("pystdlib", profile="huge", match="unknown profile")
    (tmp_path / "trunc.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    _fails(f"files:{tmp_path / 'trunc.parquet'}", match="unreadable parquet")
    # nothing half-written is left behind by any failure
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in cache.glob("*")) if cache.exists() else True


@pytest.mark.unit
def test_too_small_splits_name_the_fix_that_works(tmp_path: Path, cache: Path) -> None:
    # many .txt files are one document each, and a row starts at most one: few rows however long they are
    books = tmp_path / "books"
    books.mkdir()
    for i in range(60):
        (books / f"{i:03d}.txt").write_text("\n\n".join(_corpus_text(60, seed=i)))
    msg = _fails(f"files:{books}", match="split too small")
    assert "--txt-split blank" in msg and "--profile" not in msg
    path = build.prepare(f"files:{books}", "tiny", txt_split="blank", log=lambda s: None)
    assert PreparedData(path).test_rows().shape == PreparedData(path).val_rows().shape
    # a test split too small on its own is named as such
    lines = [json.dumps({"text": "" if sources.hash_split(f"d.jsonl#{i}") == "test" else t})
             for i, t in enumerate(_corpus_text(3000))]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    _fails(f"files:{tmp_path / 'd.jsonl'}", match="test split too small: 0 of 128 rows")


@pytest.mark.unit
def test_data_without_test_rows_is_refused(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in _corpus_text(3000)))
    dataset = f"files:{tmp_path / 'd.jsonl'}"
    path = build.prepare(dataset, "tiny", log=lambda s: None)
    old = json.loads((path / "manifest.json").read_text())
    old["version"] = 1
    for k in ("test_rows_sha256", "test_rows_shape", "test_docs"):
        del old[k]
    (path / "manifest.json").write_text(json.dumps(old))
    (path / "test_rows.npy").unlink()
    want = f"{path}: prepared before test rows existed; rerun: arun prepare --dataset {dataset} --profile tiny --force"
    monkeypatch.setenv("ARUN_DATA_DIR", str(path))
    for opening in (lambda: PreparedData(path), PreparedData.open, Tokenizer.from_directory,
                    lambda: next(prepare.make_dataloader(2, 64, prefetch=0))):
        with pytest.raises(PrepareError) as e:
            opening()
        assert str(e.value) == want
    # prepare itself does not reuse such a folder: it rebuilds it
    again = build.prepare(dataset, "tiny", log=lambda s: None)
    assert PreparedData(again).test_rows().shape == PreparedData(again).val_rows().shape


@pytest.mark.unit
def test_no_data_names_the_prepare_command(cache: Path) -> None:
    with pytest.raises(PrepareError, match="arun prepare --dataset pystdlib"):
        PreparedData.open()


@pytest.mark.parametrize("split", ["val", "test"])
def test_corrupt_cache_is_detected(split: str, tiny_data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    rows = np.load(copy / f"{split}_rows.npy")
    rows[0, 1] += 1
    np.save(copy / f"{split}_rows.npy", rows)
    with pytest.raises(PrepareError, match="does not match the manifest"):
        getattr(PreparedData(copy), f"{split}_rows")()
    with pytest.raises(PrepareError, match=f"{split}_rows.npy"):
        PreparedData(copy).verify()
    # a manifest edited to match a reshaped array is caught by the shape check
    np.save(copy / f"{split}_rows.npy", rows[:-1])
    m = json.loads((copy / "manifest.json").read_text())
    m[f"{split}_rows_sha256"] = prepare.sha256_file(copy / f"{split}_rows.npy")
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PrepareError, match="manifest says int32"):
        PreparedData(copy).verify()
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


@pytest.mark.unit
def test_uniform_bound_arithmetic() -> None:
    """A uniform model scores log2(V) * tokens / bytes exactly."""
    from engines.evaluator import bpb_from_sums
    V, tokens, nbytes = 512, 1000, 3700
    assert math.isclose(bpb_from_sums(tokens * math.log(V), nbytes), math.log2(V) * tokens / nbytes)
