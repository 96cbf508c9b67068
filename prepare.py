"""
The fixed runtime data API that train files read: the time budget, the active data's
constants, the prepared tokenizer, the fixed val and test rows and the training dataloader.
The research agent never edits this file: everything that defines *what* is measured
is fixed. Building the data (sources, tokenizer training, downloads) is arun_data's job:

    arun prepare --dataset pystdlib --profile small     # offline, works anywhere
    python prepare.py --dataset files:~/notes --profile small
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import pickle
import queue
import runpy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

# ---------------------------------------------------------------------------
# Constants (fixed)
# ---------------------------------------------------------------------------

DEFAULT_TIME_BUDGET = 300  # seconds of training per experiment (5 minutes)
# The harness passes a shorter budget for smoke runs and tests; it is part of the comparability key.
TIME_BUDGET = float(os.environ.get("ARUN_TIME_BUDGET", DEFAULT_TIME_BUDGET))

SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]  # every document starts with it, so every packed row does too


@dataclass(frozen=True)
class Profile:
    max_seq_len: int      # context length of training and of the fixed val and test rows
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


# ---------------------------------------------------------------------------
# Tokenizer (training it is arun_data.tokenizer's job)
# ---------------------------------------------------------------------------

class Tokenizer:
    """The prepared tokenizer. Loading checks the pickle's sha256 before unpickling it."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id: int = enc.encode_single_token(BOS_TOKEN)
        self.vocab_size: int = enc.n_vocab

    @classmethod
    def from_directory(cls, data_dir: Path | str | None = None) -> Tokenizer:
        data = PreparedData.open(data_dir)
        path = data.dir / "tokenizer.pkl"
        data.verify_file("tokenizer.pkl", data.manifest["tokenizer_sha256"])
        with open(path, "rb") as f:
            return cls(pickle.load(f))

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    @overload
    def encode(self, text: str, prepend: int | None = None) -> list[int]: ...
    @overload
    def encode(self, text: list[str], prepend: int | None = None) -> list[list[int]]: ...
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
        if "test_rows_sha256" not in self.manifest:
            # Never scored without a held-out test split: the key of such data could not name one.
            raise PrepareError(f"{self.dir}: prepared before test rows existed; rerun: {self.prepare_command()}")
        self.profile = Profile(**self.manifest["profile_values"])

    def prepare_command(self) -> str:
        """The command that rebuilds this folder."""
        return f"arun prepare --dataset {self.manifest['dataset']} --profile {self.manifest['profile']} --force"

    @classmethod
    def open(cls, path: Path | str | None = None) -> PreparedData:
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
            raise PrepareError(f"{path}: missing; rerun {self.prepare_command()}")
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
        self.test_rows()

    @staticmethod
    def _load_array(path: Path) -> np.ndarray:
        try:
            return np.load(path)  # allow_pickle stays False: an object array is refused, never unpickled
        except (ValueError, OSError, EOFError) as e:
            raise PrepareError(f"{path}: unreadable array ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                               f"rerun prepare with --force") from e

    def _rows(self, split: str) -> np.ndarray:
        path = self.verify_file(f"{split}_rows.npy", self.manifest[f"{split}_rows_sha256"])
        rows = self._load_array(path)
        want = tuple(self.manifest[f"{split}_rows_shape"])
        if rows.shape != want or rows.dtype != np.int32:
            raise PrepareError(f"{path}: {split} rows are {rows.dtype}{rows.shape}, manifest says int32{want}; rerun prepare with --force")
        return rows

    def val_rows(self) -> np.ndarray:
        """The fixed validation rows the ratchet scores, verified against the manifest."""
        return self._rows("val")

    def test_rows(self) -> np.ndarray:
        """The fixed test rows (held out from training and validation), verified against the manifest."""
        return self._rows("test")

    def token_bytes(self) -> np.ndarray:
        path = self.verify_file("token_bytes.npy", self.manifest["token_bytes_sha256"])
        tb = self._load_array(path)
        if tb.shape != (self.manifest["vocab_size"],):
            raise PrepareError(f"{path}: shape {tb.shape}, vocab is {self.manifest['vocab_size']}; rerun prepare with --force")
        return tb

    def train_shards(self) -> list[tuple[np.ndarray, np.ndarray]]:
        shards: list[tuple[np.ndarray, np.ndarray]] = []
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
            "val_rows_sha256": m["val_rows_sha256"], "test_rows_sha256": m["test_rows_sha256"],
            "max_seq_len": m["max_seq_len"], "eval_tokens": m["eval_tokens"],
        }


def _active() -> PreparedData | None:
    try:
        return PreparedData.open()
    except PrepareError:
        return None


# Read from the active data at import, on purpose: train files import these names, as upstream's train.py does.
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
        raise ValueError("the validation and test splits are fixed rows: use PreparedData.val_rows() / test_rows()")
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


if __name__ == "__main__":
    # `python prepare.py ...` is the builder's command line, run as a program rather than imported:
    # the builder depends on this module, never the other way round.
    runpy.run_module("arun_data.build", run_name="__main__", alter_sys=True)
