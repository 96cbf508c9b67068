"""
Fixed data preparation and runtime data utilities for arun. The research agent
never edits this file: everything that defines *what* is measured lives here.

    arun prepare --dataset pystdlib --profile small     # offline, works anywhere
    arun prepare --dataset climbmix --num-shards 10     # upstream's data
    python prepare.py --dataset files:~/notes --profile small

What it makes, under $ARUN_CACHE (default ~/.cache/arun), one folder per dataset+profile:
    tokenizer.pkl       BPE trained with rustbpe, saved as a tiktoken Encoding
    token_bytes.npy     int32 UTF-8 byte length of every token (0 for special tokens)
    train_XXXXX.bin     uint16 token stream of BOS-prefixed training documents
    train_XXXXX.idx.npy int64 document offsets into that stream
    val_rows.npy        int32 (rows, MAX_SEQ_LEN+1): the fixed validation rows
    manifest.json       fingerprints and sha256s that make results comparable
"""

from __future__ import annotations

import bisect
import glob as globlib
import hashlib
import json
import os
import pickle
import queue
import shutil
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

# ---------------------------------------------------------------------------
# Constants (fixed)
# ---------------------------------------------------------------------------

DEFAULT_TIME_BUDGET = 300  # seconds of training per experiment (5 minutes)
# The harness passes a shorter budget for smoke runs and tests; it is part of the comparability key.
TIME_BUDGET = float(os.environ.get("ARUN_TIME_BUDGET", DEFAULT_TIME_BUDGET))

MANIFEST_VERSION = 1
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4 style split with \p{N}{1,2} instead of {1,3}, as upstream.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
DOC_CHAR_CAP = 10_000          # documents are capped at this many chars for tokenizer training only
TRAIN_SHARD_TOKENS = 50_000_000  # tokens per training shard file
VAL_EVERY = 8                  # hash-split datasets send 1 in VAL_EVERY documents to validation
PYSTDLIB_DOC_CHARS = 1500      # pystdlib files are cut into documents of about this size


@dataclass(frozen=True)
class Profile:
    max_seq_len: int      # context length of training and of the fixed val rows
    eval_tokens: int      # tokens scored by the evaluator
    vocab_size: int       # BPE vocabulary including special tokens
    tokenizer_chars: int  # characters of training text the tokenizer learns from


PROFILES: dict[str, Profile] = {
    # Upstream's numbers, so an H100 run lines up with karpathy/autoresearch.
    "upstream": Profile(max_seq_len=2048, eval_tokens=40 * 524288, vocab_size=8192, tokenizer_chars=1_000_000_000),
    # Laptops, Mac Minis and CPU boxes: short context, quick eval, smaller vocab.
    "small": Profile(max_seq_len=512, eval_tokens=2**18, vocab_size=4096, tokenizer_chars=100_000_000),
    # Tests and smoke runs only: seconds end to end.
    "tiny": Profile(max_seq_len=64, eval_tokens=2**13, vocab_size=512, tokenizer_chars=2_000_000),
}

CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_MAX_SHARD = 6542                      # shard_06542.parquet is the last one
CLIMBMIX_VAL_SHARD = CLIMBMIX_MAX_SHARD        # pinned validation shard, as upstream
TINYSTORIES_REPO = "karpathy/tinystories-gpt4-clean"
TINYSTORIES_FILE = "tinystories_gpt4_clean.parquet"
TINYSTORIES_VAL_DOCS = 120_000                 # the first stories are validation, pinned
DOWNLOAD_ATTEMPTS = 5                          # per file, with exponential backoff between tries
DOWNLOAD_BACKOFF = 1.0                         # seconds before the second try


class PrepareError(Exception):
    """A one-line, user-facing problem with the data, naming the cause and the fix."""


def cache_root() -> Path:
    return Path(os.environ.get("ARUN_CACHE", Path.home() / ".cache" / "arun")).expanduser()


def dataset_slug(dataset: str) -> str:
    if dataset.startswith("files:"):
        path = os.path.abspath(os.path.expanduser(dataset[len("files:"):]))
        base = "".join(c if c.isalnum() else "-" for c in Path(path.rstrip("/*")).name)[:32] or "files"
        return f"files-{base}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
    return dataset


def data_dir_for(dataset: str, profile: str) -> Path:
    return cache_root() / f"{dataset_slug(dataset)}-{profile}"


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stable_bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


# ---------------------------------------------------------------------------
# Document sources: each yields (train_docs, val_docs) as iterators of str
# ---------------------------------------------------------------------------

@dataclass
class Source:
    name: str
    describe: str
    train_docs: Callable[[], Iterator[str]]
    val_docs: Callable[[], Iterator[str]]


def _parquet_texts(paths: Iterable[Path], start: int = 0, stop: int | None = None) -> Iterator[str]:
    import pyarrow.parquet as pq
    seen = 0
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise PrepareError(f"{path}: parquet has no 'text' column (columns: {pf.schema_arrow.names}); give documents in a 'text' column")
            for rg in range(pf.num_row_groups):
                texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
                for t in texts:
                    if stop is not None and seen >= stop:
                        return
                    if seen >= start and t:
                        yield t
                    seen += 1
        except PrepareError:
            raise
        except Exception as e:  # pyarrow raises several types for truncated/corrupt files
            raise PrepareError(f"{path}: unreadable parquet ({type(e).__name__}: {str(e).splitlines()[0][:120]}); delete it and rerun prepare") from e


def _hub_files(repo: str, files: list[str], dest: Path, workers: int) -> list[Path]:
    from arun_data.download import DownloadError, download_many, hf_dataset_url, validate_parquet
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [(hf_dataset_url(repo, f), dest / f) for f in files]
    try:
        return download_many(jobs, workers=workers, validate=validate_parquet,
                             attempts=DOWNLOAD_ATTEMPTS, backoff=DOWNLOAD_BACKOFF)
    except DownloadError as e:
        raise PrepareError(str(e)) from e


def climbmix_source(num_shards: int, workers: int) -> Source:
    raw = cache_root() / "raw" / "climbmix"
    names = [f"shard_{i:05d}.parquet" for i in range(min(num_shards, CLIMBMIX_MAX_SHARD))]
    val_name = f"shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"
    paths = _hub_files(CLIMBMIX_REPO, names + [val_name], raw, workers)
    train, val = paths[:-1], paths[-1:]
    return Source("climbmix", f"climbmix: {len(train)} train shards + pinned val shard {val_name}",
                  lambda: _parquet_texts(train), lambda: _parquet_texts(val))


def tinystories_source(workers: int) -> Source:
    raw = cache_root() / "raw" / "tinystories"
    (path,) = _hub_files(TINYSTORIES_REPO, [TINYSTORIES_FILE], raw, workers)
    return Source("tinystories", f"tinystories: first {TINYSTORIES_VAL_DOCS} stories are validation",
                  lambda: _parquet_texts([path], start=TINYSTORIES_VAL_DOCS),
                  lambda: _parquet_texts([path], stop=TINYSTORIES_VAL_DOCS))


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 (byte {e.start}); convert it, e.g. iconv -f latin1 -t utf-8, or remove it") from e


def _file_documents(files: list[Path], root: Path, txt_split: str) -> Iterator[tuple[str, str]]:
    """Yields (stable key, document text) for every document in the user's files."""
    for path in files:
        rel = str(path.relative_to(root)) if path != root else path.name
        if path.suffix == ".txt":
            text = _read_utf8(path)
            if txt_split == "blank":
                for i, part in enumerate(p for p in text.split("\n\n") if p.strip()):
                    yield f"{rel}#{i}", part
            elif text.strip():
                yield rel, text
        elif path.suffix == ".jsonl":
            for i, line in enumerate(_read_utf8(path).splitlines()):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{path}:{i + 1}: invalid JSON ({e.msg}); fix or remove that line") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise PrepareError(f"{path}:{i + 1}: no string 'text' field; each line must be {{\"text\": ...}}")
                if obj["text"]:
                    yield f"{rel}#{i}", obj["text"]
        elif path.suffix == ".parquet":
            for i, text in enumerate(_parquet_texts([path])):
                yield f"{rel}#{i}", text


def files_source(spec: str, txt_split: str = "auto") -> Source:
    pattern = os.path.expanduser(spec)
    suffixes = (".txt", ".jsonl", ".parquet")
    if any(c in pattern for c in "*?["):
        files = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")
    elif os.path.isdir(pattern):
        root = Path(pattern)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    elif os.path.isfile(pattern):
        root, files = Path(pattern).parent, [Path(pattern)]
        if os.path.getsize(pattern) == 0:
            raise PrepareError(f"{pattern}: file is empty; give a file with text in it")
    else:
        raise PrepareError(f"{pattern}: no such file or directory; give files:PATH with a file, a directory or a glob")
    files = [f for f in files if f.suffix in suffixes]
    if not files:
        raise PrepareError(f"{pattern}: no .txt, .jsonl or .parquet files found; point files: at your documents")
    if txt_split == "auto":
        # One big text file is a corpus of paragraphs; many text files are one document each.
        txt_split = "blank" if sum(f.suffix == ".txt" for f in files) == 1 else "file"
    describe = f"files: {len(files)} files under {root} (.txt: {'split on blank lines' if txt_split == 'blank' else 'one document per file'})"

    def split(want_val: bool) -> Iterator[str]:
        for key, text in _file_documents(files, root, txt_split):
            if (_stable_bucket(key) % VAL_EVERY == 0) == want_val:
                yield text

    return Source(f"files:{os.path.abspath(pattern)}", describe, lambda: split(False), lambda: split(True))


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    """Splits a long source file at blank lines into documents of about max_chars.
    Best-fit packing crops a document longer than a row and drops the rest, so
    whole source files would waste most of their tokens at short contexts."""
    piece: list[str] = []
    size = 0
    for block in text.split("\n\n"):
        if size and size + len(block) > max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(block)
        size += len(block) + 2
    if piece and "".join(piece).strip():
        yield "\n\n".join(piece)


def pystdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("test_"))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test_")]
    return root, files


def pystdlib_source() -> Source:
    root, files = pystdlib_files()

    def split(want_val: bool) -> Iterator[str]:
        for path in files:
            rel = path.relative_to(root).as_posix()
            if (_stable_bucket(rel) % VAL_EVERY == 0) == want_val:
                yield from _chunks(path.read_text(encoding="utf-8", errors="replace"), PYSTDLIB_DOC_CHARS)

    version = ".".join(map(str, sys.version_info[:3]))
    return Source("pystdlib", f"pystdlib: {len(files)} source files of Python {version} at {root}",
                  lambda: split(False), lambda: split(True))


def get_source(dataset: str, num_shards: int = 10, workers: int = 8, txt_split: str = "auto") -> Source:
    if dataset == "climbmix":
        return climbmix_source(num_shards, workers)
    if dataset == "tinystories":
        return tinystories_source(workers)
    if dataset == "pystdlib":
        return pystdlib_source()
    if dataset.startswith("files:"):
        return files_source(dataset[len("files:"):], txt_split)
    raise PrepareError(f"unknown dataset {dataset!r}; use climbmix, tinystories, pystdlib or files:PATH")


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

def train_tokenizer(docs: Iterable[str], vocab_size: int, max_chars: int):
    """BPE with rustbpe, returned as a tiktoken Encoding with our special tokens appended."""
    import rustbpe
    import tiktoken

    def capped() -> Iterator[str]:
        n = 0
        for doc in docs:
            doc = doc[:DOC_CHAR_CAP]
            n += len(doc)
            yield doc
            if n >= max_chars:
                return

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(capped(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="arun-bpe", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)


def token_byte_lengths(enc) -> np.ndarray:
    """UTF-8 byte length of each token; 0 for special tokens so the metric skips them."""
    out = np.zeros(enc.n_vocab, dtype=np.int32)
    special = set(enc.special_tokens_set)
    for i in range(enc.n_vocab):
        b = enc.decode_single_token_bytes(i)
        out[i] = 0 if b.decode("utf-8", errors="replace") in special else len(b)
    return out


class Tokenizer:
    """The prepared tokenizer. Loading checks the pickle's sha256 before unpickling it."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id: int = enc.encode_single_token(BOS_TOKEN)
        self.vocab_size: int = enc.n_vocab

    @classmethod
    def from_directory(cls, data_dir: Path | str | None = None) -> "Tokenizer":
        data = PreparedData.open(data_dir)
        path = data.dir / "tokenizer.pkl"
        data.verify_file("tokenizer.pkl", data.manifest["tokenizer_sha256"])
        with open(path, "rb") as f:
            return cls(pickle.load(f))

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode(self, text: str | list[str], prepend: int | None = None) -> list[int] | list[list[int]]:
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ([prepend] if prepend is not None else []) + ids
        rows = self.enc.encode_ordinary_batch(text, num_threads=os.cpu_count() or 1)
        return [([prepend] if prepend is not None else []) + r for r in rows]

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


# ---------------------------------------------------------------------------
# Best-fit packing (shared by the training loader and the val rows)
# ---------------------------------------------------------------------------

class BestFitPacker:
    """
    Packs BOS-prefixed documents into rows of exactly `row_len` tokens, no padding.
    Each row starts at a document boundary (so with BOS). The largest buffered
    document that fits the remaining space goes in next; when none fits, the
    shortest is cropped to fill the row. Same algorithm as upstream, but the
    buffer is kept sorted by length, so a placement is a bisect, not a scan.
    """

    def __init__(self, docs: Iterator[np.ndarray], row_len: int, buffer_size: int = 1000):
        self.docs, self.row_len, self.buffer_size = docs, row_len, buffer_size
        self.lens: list[int] = []          # ascending
        self.items: list[np.ndarray] = []  # parallel to lens
        self.exhausted = False

    def _refill(self) -> None:
        while not self.exhausted and len(self.lens) < self.buffer_size:
            doc = next(self.docs, None)
            if doc is None:
                self.exhausted = True
                return
            n = len(doc)
            if n == 0:
                continue
            i = bisect.bisect_right(self.lens, n)
            self.lens.insert(i, n)
            self.items.insert(i, doc)

    def fill(self, row: np.ndarray) -> bool:
        """Fills one row in place; False when the documents ran out first."""
        pos = 0
        while pos < self.row_len:
            self._refill()
            if not self.lens:
                return False
            remaining = self.row_len - pos
            i = bisect.bisect_right(self.lens, remaining) - 1
            if i >= 0:
                n = self.lens.pop(i)
                row[pos:pos + n] = self.items.pop(i)
                pos += n
            else:
                self.lens.pop(0)
                row[pos:] = self.items.pop(0)[:remaining]
                pos = self.row_len
        return True


# ---------------------------------------------------------------------------
# The prepared data on disk
# ---------------------------------------------------------------------------

class PreparedData:
    """A prepared dataset+profile folder and its manifest; the one way engines and trainers find data."""

    def __init__(self, path: Path):
        self.dir = Path(path)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.exists():
            raise PrepareError(f"no prepared data at {self.dir}; run: arun prepare --dataset pystdlib --profile small")
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise PrepareError(f"{manifest_path}: corrupt manifest ({e.msg}); rerun arun prepare with --force") from e
        self.profile = Profile(**self.manifest["profile_values"])

    @classmethod
    def open(cls, path: Path | str | None = None) -> "PreparedData":
        """Explicit path > $ARUN_DATA_DIR > the folder the last `arun prepare` made current."""
        if path is None:
            path = os.environ.get("ARUN_DATA_DIR")
        if path is None:
            current = cache_root() / "current.json"
            if not current.exists():
                raise PrepareError("no prepared data; run: arun prepare --dataset pystdlib --profile small")
            path = json.loads(current.read_text())["data_dir"]
        return cls(Path(path))

    def verify_file(self, name: str, expected: str) -> Path:
        path = self.dir / name
        if not path.exists():
            raise PrepareError(f"{path}: missing; rerun arun prepare --dataset {self.manifest['dataset']} --profile {self.manifest['profile']} --force")
        got = sha256_file(path)
        if got != expected:
            raise PrepareError(f"{path}: sha256 {got[:12]} does not match the manifest ({expected[:12]}); the cache was modified, rerun prepare with --force")
        return path

    def verify(self) -> None:
        """Checks every file the metric depends on against the manifest: hashes, and the shapes the
        evaluator relies on (a manifest edited to match swapped files is caught here, before a run,
        not at its end)."""
        self.verify_file("tokenizer.pkl", self.manifest["tokenizer_sha256"])
        self.token_bytes()
        self.val_rows()

    @staticmethod
    def _load_array(path: Path) -> np.ndarray:
        try:
            return np.load(path)  # allow_pickle stays False: an object array is refused, never unpickled
        except (ValueError, OSError, EOFError) as e:
            raise PrepareError(f"{path}: unreadable array ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                               f"rerun prepare with --force") from e

    def val_rows(self) -> np.ndarray:
        path = self.verify_file("val_rows.npy", self.manifest["val_rows_sha256"])
        rows = self._load_array(path)
        want = tuple(self.manifest["val_rows_shape"])
        if rows.shape != want or rows.dtype != np.int32:
            raise PrepareError(f"{path}: val rows are {rows.dtype}{rows.shape}, manifest says int32{want}; rerun prepare with --force")
        return rows

    def token_bytes(self) -> np.ndarray:
        path = self.verify_file("token_bytes.npy", self.manifest["token_bytes_sha256"])
        tb = self._load_array(path)
        if tb.shape != (self.manifest["vocab_size"],):
            raise PrepareError(f"{path}: shape {tb.shape}, vocab is {self.manifest['vocab_size']}; rerun prepare with --force")
        return tb

    def train_shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        shards = []
        for s in self.manifest["train_shards"]:
            tokens = np.memmap(self.dir / s["tokens"], dtype=np.uint16, mode="r")
            offsets = np.load(self.dir / s["offsets"])
            if offsets[-1] != len(tokens):
                raise PrepareError(f"{self.dir / s['tokens']}: truncated shard; rerun prepare with --force")
            shards.append((tokens, offsets))
        return shards

    def key(self) -> dict:
        """The data half of the comparability key."""
        m = self.manifest
        return {
            "dataset": m["dataset"], "profile": m["profile"],
            "dataset_fingerprint": m["dataset_fingerprint"], "tokenizer_sha256": m["tokenizer_sha256"],
            "val_rows_sha256": m["val_rows_sha256"], "max_seq_len": m["max_seq_len"], "eval_tokens": m["eval_tokens"],
        }


def _active() -> PreparedData | None:
    try:
        return PreparedData.open()
    except PrepareError:
        return None


# Module-level constants of the active data (upstream's train.py imports these names).
_ACTIVE = _active()
_PROFILE = _ACTIVE.profile if _ACTIVE else PROFILES["upstream"]
MAX_SEQ_LEN: int = _PROFILE.max_seq_len
EVAL_TOKENS: int = _PROFILE.eval_tokens
VOCAB_SIZE: int = _PROFILE.vocab_size


# ---------------------------------------------------------------------------
# Training dataloader
# ---------------------------------------------------------------------------

def _train_documents(shards: list[tuple[np.ndarray, np.ndarray]], seed: int, epoch_box: list[int]) -> Iterator[np.ndarray]:
    """Every training document once per epoch, in an order fixed by (seed, epoch), forever."""
    while True:
        rng = np.random.default_rng([seed, epoch_box[0]])
        for si in rng.permutation(len(shards)):
            tokens, offsets = shards[si]
            for di in rng.permutation(len(offsets) - 1):
                yield tokens[offsets[di]:offsets[di + 1]]
        epoch_box[0] += 1


def make_dataloader(batch_size: int, seq_len: int, split: str = "train", seed: int = 0,
                    data_dir: Path | str | None = None, prefetch: int = 4,
                    buffer_size: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """
    Infinite iterator of (x, y, epoch): int32 numpy arrays of shape (batch_size, seq_len),
    y shifted by one, every row BOS-aligned best-fit packed. Deterministic for a seed.
    A background thread packs ahead so the trainer never waits on data.
    """
    if split != "train":
        raise ValueError("the validation split is the fixed val rows: use PreparedData.val_rows()")
    data = PreparedData.open(data_dir)
    epoch_box = [1]
    packer = BestFitPacker(_train_documents(data.train_shards(), seed, epoch_box), seq_len + 1, buffer_size)

    def batch() -> tuple[np.ndarray, np.ndarray, int]:
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int32)
        for r in range(batch_size):
            packer.fill(rows[r])
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]), epoch_box[0]

    if prefetch <= 0:
        while True:
            yield batch()

    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                item = batch()
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # surface loader failures in the trainer, not silently in a thread
            q.put(e)

    threading.Thread(target=worker, daemon=True, name="arun-dataloader").start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ---------------------------------------------------------------------------
# Prepare: sources -> tokenizer -> train shards + fixed val rows -> manifest
# ---------------------------------------------------------------------------

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


def pack_val_rows(tok: Tokenizer, docs: Iterable[str], profile: Profile) -> np.ndarray:
    """The fixed validation rows: the val documents in order, best-fit packed, once."""
    n_rows = max(1, profile.eval_tokens // profile.max_seq_len)

    def encoded() -> Iterator[np.ndarray]:
        for batch in _batched(docs, 256):
            for ids in tok.encode(batch, prepend=tok.bos_token_id):
                yield np.asarray(ids, dtype=np.int32)

    packer = BestFitPacker(encoded(), profile.max_seq_len + 1)
    rows = np.empty((n_rows, profile.max_seq_len + 1), dtype=np.int32)
    for r in range(n_rows):
        if not packer.fill(rows[r]):
            raise PrepareError(f"validation split too small: {r} of {n_rows} rows of {profile.max_seq_len + 1} tokens "
                               f"(the profile scores {profile.eval_tokens} tokens); add data or use a smaller --profile")
    return rows


def prepare(dataset: str, profile_name: str = "small", *, num_shards: int = 10, workers: int = 8,
            txt_split: str = "auto", force: bool = False, log: Callable[[str], None] = print,
            progress: Callable[[str, int, int | None], None] | None = None) -> Path:
    """Builds (or reuses) the prepared folder for dataset+profile and makes it current. Returns its path."""
    if profile_name not in PROFILES:
        raise PrepareError(f"unknown profile {profile_name!r}; use one of: {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]
    final = data_dir_for(dataset, profile_name)
    if (final / "manifest.json").exists() and not force:
        log(f"Data: already prepared at {final}")
        _make_current(final)
        return final

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

        train_hash, val_hash = _Hasher(), _Hasher()
        done = [0]

        def on_tokens(n: int) -> None:
            done[0] += n
            report("tokenize", done[0], None)

        shards = _write_train_shards(tmp, tok, train_hash.wrap(source.train_docs()), on_tokens)
        if not shards:
            raise PrepareError(f"{dataset}: no training documents; add data")
        rows = pack_val_rows(tok, val_hash.wrap(source.val_docs()), profile)
        np.save(tmp / "val_rows.npy", rows)
        train_tokens = sum(s["num_tokens"] for s in shards)
        log(f"Tokens: {train_tokens:,} train in {train_hash.docs:,} docs; val rows {rows.shape} from {val_hash.docs:,} docs")

        fingerprint = hashlib.sha256(f"{source.name}|{train_hash.h.hexdigest()}|{val_hash.h.hexdigest()}".encode()).hexdigest()
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
            "train_shards": shards,
            "train_tokens": train_tokens,
            "train_docs": train_hash.docs,
            "val_docs": val_hash.docs,
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


def _make_current(path: Path) -> None:
    current = cache_root() / "current.json"
    tmp = current.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"data_dir": str(path)}))
    os.replace(tmp, current)


if __name__ == "__main__":
    from arun.cli import main
    sys.argv[1:1] = ["prepare"]
    main()
