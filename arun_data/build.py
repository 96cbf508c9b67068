"""
The builder behind `arun prepare`: sources -> tokenizer -> train shards + fixed val and
test rows -> manifest, in a scratch folder renamed into place, then made the current data.

    arun prepare --dataset pystdlib --profile small     # offline, works anywhere
    arun prepare --dataset climbmix --num-shards 10     # upstream's data
    python prepare.py --dataset files:~/notes --profile small

What it makes, under $ARUN_CACHE (default ~/.cache/arun), one folder per dataset+profile:
    tokenizer.pkl       BPE trained with rustbpe, saved as a tiktoken Encoding
    token_bytes.npy     int32 UTF-8 byte length of every token (0 for special tokens)
    train_XXXXX.bin     uint16 token stream of BOS-prefixed training documents
    train_XXXXX.idx.npy int64 document offsets into that stream
    val_rows.npy        int32 (rows, MAX_SEQ_LEN+1): the fixed validation rows
    test_rows.npy       int32, same shape: the fixed test rows, from documents in neither train nor val
    manifest.json       fingerprints and sha256s that make results comparable
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from arun_data.sources import get_source
from arun_data.tokenizer import token_byte_lengths, train_tokenizer
from engines.atomic import write_json
from prepare import PROFILES, BestFitPacker, PrepareError, Profile, Tokenizer, cache_root, data_dir_for, sha256_file

MANIFEST_VERSION = 2  # 2: test rows
TRAIN_SHARD_TOKENS = 50_000_000  # tokens per training shard file


class _Hasher:
    """sha256 over a document stream, as it passes through."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.docs = 0

    def wrap(self, docs: Iterable[str]) -> Iterator[str]:
        for d in docs:
            b = d.encode("utf-8", errors="surrogatepass")
            self.h.update(len(b).to_bytes(8, "little"))
            self.h.update(b)
            self.docs += 1
            yield d


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_train_shards(out: Path, tok: Tokenizer, docs: Iterable[str], on_tokens: Callable[[int], None]) -> list[dict]:
    shards: list[dict] = []
    buf: list[np.ndarray] = []
    count = 0

    def flush() -> None:
        nonlocal buf, count
        if not buf:
            return
        i = len(shards)
        lens = np.fromiter((len(d) for d in buf), dtype=np.int64, count=len(buf))
        offsets = np.zeros(len(buf) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        name = f"train_{i:05d}.bin"
        np.concatenate(buf).astype(np.uint16).tofile(out / name)
        np.save(out / f"train_{i:05d}.idx.npy", offsets)
        shards.append({"tokens": name, "offsets": f"train_{i:05d}.idx.npy", "docs": len(buf), "num_tokens": int(offsets[-1])})
        buf, count = [], 0

    for batch in _batched(docs, 256):
        for ids in tok.encode(batch, prepend=tok.bos_token_id):
            buf.append(np.asarray(ids, dtype=np.uint16))
            count += len(ids)
        on_tokens(sum(len(b) for b in buf[-len(batch):]))
        if count >= TRAIN_SHARD_TOKENS:
            flush()
    flush()
    return shards


def _too_small_fix(profile: Profile, hint: str) -> str:
    """The advice that works: the source's own hint, else a smaller profile where one exists, else more data."""
    if hint:
        return hint
    smaller = sorted((p.eval_tokens, name) for name, p in PROFILES.items() if p.eval_tokens < profile.eval_tokens)
    return f"add data or use --profile {smaller[0][1]}" if smaller else "add data"


def pack_rows(tok: Tokenizer, docs: Iterable[str], profile: Profile, split: str = "validation",
              hint: str = "") -> np.ndarray:
    """Fixed eval rows (validation or test): the split's documents in order, best-fit packed, once."""
    n_rows = max(1, profile.eval_tokens // profile.max_seq_len)

    def encoded() -> Iterator[np.ndarray]:
        for batch in _batched(docs, 256):
            for ids in tok.encode(batch, prepend=tok.bos_token_id):
                yield np.asarray(ids, dtype=np.int32)

    packer = BestFitPacker(encoded(), profile.max_seq_len + 1)
    rows = np.empty((n_rows, profile.max_seq_len + 1), dtype=np.int32)
    for r in range(n_rows):
        if not packer.fill(rows[r]):
            raise PrepareError(f"{split} split too small: {r} of {n_rows} rows of {profile.max_seq_len + 1} tokens "
                               f"(the profile scores {profile.eval_tokens} tokens); {_too_small_fix(profile, hint)}")
    return rows


def is_stale(manifest: dict) -> bool:
    """True for a folder prepared before test rows existed."""
    return manifest.get("version", 1) < MANIFEST_VERSION or "test_rows_sha256" not in manifest


def prepare(dataset: str, profile_name: str = "small", *, num_shards: int = 10, workers: int = 8,
            txt_split: str = "auto", force: bool = False, log: Callable[[str], None] = print,
            progress: Callable[[str, int, int | None], None] | None = None) -> Path:
    """Builds (or reuses) the prepared folder for dataset+profile and makes it current. Returns its path."""
    if profile_name not in PROFILES:
        raise PrepareError(f"unknown profile {profile_name!r}; use one of: {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]
    final = data_dir_for(dataset, profile_name)
    if (final / "manifest.json").exists() and not force:
        if not is_stale(_read_manifest(final)):
            log(f"Data: already prepared at {final}")
            _make_current(final)
            return final
        log(f"Data: {final} was prepared before test rows existed; rebuilding it")

    source = get_source(dataset, num_shards=num_shards, workers=workers, txt_split=txt_split)
    log(f"Data: {source.describe}")
    # Build in a scratch folder and rename at the end, so a killed prepare leaves no half-written cache.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.time()
        report = progress or (lambda stage, done, total: None)
        report("tokenizer", 0, None)
        enc = train_tokenizer(source.train_docs(), profile.vocab_size, profile.tokenizer_chars)
        with open(tmp / "tokenizer.pkl", "wb") as f:
            pickle.dump(enc, f)
        tok = Tokenizer(enc)
        sample = "Hello world! Numbers: 123. Unicode: 你好 ü"
        assert tok.decode(tok.encode(sample)) == sample, "tokenizer round trip failed"
        np.save(tmp / "token_bytes.npy", token_byte_lengths(enc))
        log(f"Tokenizer: vocab {enc.n_vocab} trained in {time.time() - t0:.1f}s")

        train_hash, val_hash, test_hash = _Hasher(), _Hasher(), _Hasher()
        done = [0]

        def on_tokens(n: int) -> None:
            done[0] += n
            report("tokenize", done[0], None)

        shards = _write_train_shards(tmp, tok, train_hash.wrap(source.train_docs()), on_tokens)
        if not shards:
            raise PrepareError(f"{dataset}: no training documents; add data")
        rows = pack_rows(tok, val_hash.wrap(source.val_docs()), profile, "validation", source.small_hint)
        np.save(tmp / "val_rows.npy", rows)
        test = pack_rows(tok, test_hash.wrap(source.test_docs()), profile, "test", source.small_hint)
        np.save(tmp / "test_rows.npy", test)
        train_tokens = sum(s["num_tokens"] for s in shards)
        log(f"Tokens: {train_tokens:,} train in {train_hash.docs:,} docs; val rows {rows.shape} from "
            f"{val_hash.docs:,} docs; test rows {test.shape} from {test_hash.docs:,} docs")

        # Any change to any split (which documents, their order, their text) changes the fingerprint.
        digests = "|".join(h.h.hexdigest() for h in (train_hash, val_hash, test_hash))
        fingerprint = hashlib.sha256(f"{source.name}|{digests}".encode()).hexdigest()
        manifest = {
            "version": MANIFEST_VERSION,
            "dataset": dataset if not dataset.startswith("files:") else source.name,
            "profile": profile_name,
            "profile_values": asdict(profile),
            "max_seq_len": profile.max_seq_len,
            "eval_tokens": int(rows.shape[0] * profile.max_seq_len),
            "vocab_size": enc.n_vocab,
            "describe": source.describe,
            "dataset_fingerprint": fingerprint,
            "tokenizer_sha256": sha256_file(tmp / "tokenizer.pkl"),
            "token_bytes_sha256": sha256_file(tmp / "token_bytes.npy"),
            "val_rows_sha256": sha256_file(tmp / "val_rows.npy"),
            "val_rows_shape": list(rows.shape),
            "test_rows_sha256": sha256_file(tmp / "test_rows.npy"),
            "test_rows_shape": list(test.shape),
            "train_shards": shards,
            "train_tokens": train_tokens,
            "train_docs": train_hash.docs,
            "val_docs": val_hash.docs,
            "test_docs": test_hash.docs,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _make_current(final)
    log(f"Done: {final} ({time.time() - t0:.1f}s)")
    return final


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable counts as stale: rebuilt


def _make_current(path: Path) -> None:
    write_json(cache_root() / "current.json", {"data_dir": str(path)}, indent=None)


def main(argv: list[str] | None = None) -> int:
    """`python prepare.py ...`: the flags of `arun prepare`, without the progress bar."""
    p = argparse.ArgumentParser(prog="prepare.py", description="Download data, train the tokenizer, pack the fixed validation and test rows.")
    p.add_argument("--dataset", default="pystdlib", help="climbmix | tinystories | pystdlib | files:PATH (a file, directory or glob)")
    p.add_argument("--profile", default="small", help="upstream | small | tiny")
    p.add_argument("--num-shards", type=int, default=10, help="climbmix training shards to download")
    p.add_argument("--download-workers", type=int, default=8)
    p.add_argument("--txt-split", choices=["auto", "file", "blank"], default="auto",
                   help="files: .txt as one document per file, or split on blank lines (auto: one file -> blank)")
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = p.parse_args(argv)
    try:
        path = prepare(args.dataset, args.profile, num_shards=args.num_shards, workers=args.download_workers,
                       txt_split=args.txt_split, force=args.force)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
