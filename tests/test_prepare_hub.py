"""climbmix and tinystories through the real download path, served by a local HTTP server."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arun_data import build, sources
from prepare import PreparedData, PrepareError, Tokenizer


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünï", "文字", "story", "the", "and", "1234"]
    return [" ".join(rng.choice(words, size=rng.integers(20, 80))) for _ in range(n)]


def _origins(path: Path, split: str, docs_by_origin: dict[str, list[str]]) -> set[str]:
    """Which document sets the pieces of the split's rows (or, for 'train', the train documents)
    come from, matched by bytes: a piece is a prefix of its document, cropped at most. Pieces under
    16 tokens are skipped: a few random words may start documents of any set."""
    data, tok = PreparedData(path), Tokenizer.from_directory(path)
    if split == "train":
        pieces = [t[o[i]:o[i + 1]] for t, o in data.train_shards() for i in range(len(o) - 1)]
    else:
        pieces = []
        for row in getattr(data, f"{split}_rows")():
            starts = list(np.flatnonzero(row == tok.bos_token_id)) + [len(row)]
            pieces += [row[a:b] for a, b in zip(starts, starts[1:])]
    by_start: dict[bytes, list[tuple[str, bytes]]] = {}  # an index on the first 8 bytes keeps this fast
    for name, docs in docs_by_origin.items():
        for d in docs:
            by_start.setdefault(d.encode()[:8], []).append((name, d.encode()))
    found = set()
    for piece in (p for p in pieces if len(p) >= 16):
        head = tok.enc.decode_bytes([int(t) for t in piece[1:]])
        hits = {name for name, doc in by_start.get(head[:8], []) if doc.startswith(head)}
        assert hits, f"a {split} piece matches no source document"
        found |= hits
    return found


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "hub"
    climb = root / "datasets" / sources.CLIMBMIX_REPO / "resolve" / "main"
    climb.mkdir(parents=True)
    for i in [0, 1, sources.CLIMBMIX_TEST_SHARD, sources.CLIMBMIX_VAL_SHARD]:
        pq.write_table(pa.table({"text": _docs(1500, i)}), climb / f"shard_{i:05d}.parquet", row_group_size=400)
    stories = root / "datasets" / sources.TINYSTORIES_REPO / "resolve" / "main"
    stories.mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(sources, "DOWNLOAD_BACKOFF", 0.01)
    monkeypatch.setenv("ARUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ARUN_DATA_DIR", raising=False)
    yield root
    server.shutdown()


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
def test_climbmix_downloads_shards_and_pins_val_and_test(hub: Path, tmp_path: Path) -> None:
    path = build.prepare("climbmix", "tiny", num_shards=2, workers=3, log=lambda s: None)
    m = PreparedData(path).manifest
    raw = tmp_path / "cache" / "raw" / "climbmix"
    assert sorted(p.name for p in raw.glob("*.parquet")) == [
        "shard_00000.parquet", "shard_00001.parquet", "shard_06541.parquet", "shard_06542.parquet"]
    assert not list(raw.glob("*.part"))
    assert m["train_docs"] == 3000 and m["val_docs"] > 0 and m["test_docs"] > 0
    shards = {name: _docs(1500, i) for name, i in
              [("train", 0), ("train1", 1), ("test", sources.CLIMBMIX_TEST_SHARD), ("val", sources.CLIMBMIX_VAL_SHARD)]}
    assert _origins(path, "test", shards) == {"test"}
    assert _origins(path, "val", shards) == {"val"}
    assert _origins(path, "train", shards) == {"train", "train1"}
    # however many shards are asked for, training never reaches the pinned test and val shards
    names = sources.climbmix_train_shards(10**6)
    assert len(names) == sources.CLIMBMIX_TEST_SHARD and "shard_06541.parquet" not in names
    # the cache resumes: a rerun with --force re-tokenizes without re-downloading
    for p in hub.rglob("shard_*.parquet"):
        p.unlink()
    again = build.prepare("climbmix", "tiny", num_shards=2, force=True, log=lambda s: None)
    assert PreparedData(again).manifest["val_rows_sha256"] == m["val_rows_sha256"]


def test_tinystories_split_is_pinned(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "TINYSTORIES_VAL_DOCS", 300)
    monkeypatch.setattr(sources, "TINYSTORIES_TEST_DOCS", 400)
    stories = hub / "datasets" / sources.TINYSTORIES_REPO / "resolve" / "main" / sources.TINYSTORIES_FILE
    docs = _docs(3000, 7)
    pq.write_table(pa.table({"text": docs}), stories)
    path = build.prepare("tinystories", "tiny", log=lambda s: None)
    m = PreparedData(path).manifest
    assert (m["train_docs"], m["val_docs"], m["test_docs"]) == (2300, 300, 400)
    blocks = {"val": docs[:300], "test": docs[300:700], "train": docs[700:]}
    assert _origins(path, "test", blocks) == {"test"}
    assert _origins(path, "val", blocks) == {"val"}
    assert _origins(path, "train", blocks) == {"train"}


def test_truncated_shard_is_refused_and_nothing_is_left(hub: Path, tmp_path: Path) -> None:
    shard = hub / "datasets" / sources.CLIMBMIX_REPO / "resolve" / "main" / "shard_00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-200])
    with pytest.raises(PrepareError) as e:
        build.prepare("climbmix", "tiny", num_shards=2, workers=2, log=lambda s: None)
    assert "\n" not in str(e.value) and "shard_00001" in str(e.value)
    cache = tmp_path / "cache"
    assert not (cache / "climbmix-tiny").exists()
    assert not (cache / "raw" / "climbmix" / "shard_00001.parquet").exists()


def test_no_network_names_the_offline_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ARUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "DOWNLOAD_ATTEMPTS", 2)
    monkeypatch.setattr(sources, "DOWNLOAD_BACKOFF", 0.01)
    with pytest.raises(PrepareError) as e:
        build.prepare("climbmix", "tiny", num_shards=1, log=lambda s: None)
    assert "pystdlib" in str(e.value) and "\n" not in str(e.value)
