"""
Document sources for the builder: each dataset is a Source whose train_docs(), val_docs()
and test_docs() yield the text of three disjoint sets of documents, split the same way on
every machine.

    climbmix      upstream's parquet shards from the Hugging Face hub, pinned val and test shards
    tinystories   one parquet file from the hub; the first stories are validation, the next test
    pystdlib      offline: the running Python's standard-library sources, split by path hash
    files:PATH    the user's .txt / .jsonl / .parquet documents, split by a stable hash
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from arun_data.download import DownloadError, download_many, hf_dataset_url, validate_parquet
from prepare import PrepareError, cache_root

CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_MAX_SHARD = 6542                      # shard_06542.parquet is the last one
CLIMBMIX_VAL_SHARD = CLIMBMIX_MAX_SHARD        # pinned validation shard, as upstream
CLIMBMIX_TEST_SHARD = CLIMBMIX_VAL_SHARD - 1   # pinned test shard; training stops below it
TINYSTORIES_REPO = "karpathy/tinystories-gpt4-clean"
TINYSTORIES_FILE = "tinystories_gpt4_clean.parquet"
TINYSTORIES_VAL_DOCS = 120_000                 # the first stories are validation, pinned
TINYSTORIES_TEST_DOCS = 120_000                # the next block of stories is test; training starts after it
DOWNLOAD_ATTEMPTS = 5                          # per file, with exponential backoff between tries
DOWNLOAD_BACKOFF = 1.0                         # seconds before the second try
VAL_EVERY = 8                  # hash-split datasets send 1 in VAL_EVERY documents to validation,
                               # and another, disjoint 1 in VAL_EVERY to test
PYSTDLIB_DOC_CHARS = 1500      # pystdlib files are cut into documents of about this size
# The standard library is small and splits by whole files, so one bucket's share is lumpy: in
# Python 3.11 the test bucket holds 1.0M characters, 364 of the 512 rows --profile small needs.
# Two buckets go to test there; the packer takes only the rows it needs from them.
PYSTDLIB_TEST_BUCKETS = 2


def _stable_bucket(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def hash_split(key: str, test_buckets: int = 1) -> str:
    """'val', 'test' or 'train' for a document's stable key, in buckets of 1 in VAL_EVERY. Bucket 0 is
    validation, as before the test split existed, so adding it moved documents only out of training."""
    bucket = _stable_bucket(key) % VAL_EVERY
    return "val" if bucket == 0 else "test" if bucket <= test_buckets else "train"


@dataclass
class Source:
    """A dataset as three disjoint document streams; `describe` is the one line prepare logs and the
    manifest keeps; `small_hint` is the fix to suggest when a held-out split is too small to pack."""

    name: str
    describe: str
    train_docs: Callable[[], Iterator[str]]
    val_docs: Callable[[], Iterator[str]]
    test_docs: Callable[[], Iterator[str]]
    small_hint: str = ""
    held_out: bool = True   # False: the train process can read the val/test text (arun_data.NOT_HELD_OUT)


def _parquet_texts(paths: Iterable[Path], start: int = 0, stop: int | None = None) -> Iterator[str]:
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
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [(hf_dataset_url(repo, f), dest / f) for f in files]
    try:
        return download_many(jobs, workers=workers, validate=validate_parquet,
                             attempts=DOWNLOAD_ATTEMPTS, backoff=DOWNLOAD_BACKOFF)
    except DownloadError as e:
        raise PrepareError(str(e)) from e


def _climbmix_name(shard: int) -> str:
    return f"shard_{shard:05d}.parquet"


def climbmix_train_shards(num_shards: int) -> list[str]:
    """The first num_shards shards, never the pinned test or val shard (they sit at the end)."""
    return [_climbmix_name(i) for i in range(min(num_shards, CLIMBMIX_TEST_SHARD))]


def climbmix_source(num_shards: int, workers: int) -> Source:
    raw = cache_root() / "raw" / "climbmix"
    val_name, test_name = _climbmix_name(CLIMBMIX_VAL_SHARD), _climbmix_name(CLIMBMIX_TEST_SHARD)
    paths = _hub_files(CLIMBMIX_REPO, climbmix_train_shards(num_shards) + [val_name, test_name], raw, workers)
    train, val, test = paths[:-2], paths[-2:-1], paths[-1:]
    return Source("climbmix", f"climbmix: {len(train)} train shards + pinned val shard {val_name} + pinned test shard {test_name}",
                  lambda: _parquet_texts(train), lambda: _parquet_texts(val), lambda: _parquet_texts(test))


def tinystories_source(workers: int) -> Source:
    raw = cache_root() / "raw" / "tinystories"
    (path,) = _hub_files(TINYSTORIES_REPO, [TINYSTORIES_FILE], raw, workers)
    # The module constants are read when the streams run, not now, so a test can shrink the blocks.
    return Source("tinystories", f"tinystories: first {TINYSTORIES_VAL_DOCS} stories are validation, "
                                 f"the next {TINYSTORIES_TEST_DOCS} test",
                  lambda: _parquet_texts([path], start=TINYSTORIES_VAL_DOCS + TINYSTORIES_TEST_DOCS),
                  lambda: _parquet_texts([path], stop=TINYSTORIES_VAL_DOCS),
                  lambda: _parquet_texts([path], start=TINYSTORIES_VAL_DOCS, stop=TINYSTORIES_VAL_DOCS + TINYSTORIES_TEST_DOCS))


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
    # A row holds at most one document's start, so few long .txt documents fill few rows, whatever their size.
    hint = ("each .txt file is one document and a row starts at most one, so rerun with --txt-split blank "
            "to split them on blank lines, or add files") if txt_split == "file" and any(f.suffix == ".txt" for f in files) else ""

    def split(want: str) -> Iterator[str]:
        for key, text in _file_documents(files, root, txt_split):
            if hash_split(key) == want:
                yield text

    return Source(f"files:{os.path.abspath(pattern)}", describe,
                  lambda: split("train"), lambda: split("val"), lambda: split("test"), hint)


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

    def split(want: str) -> Iterator[str]:
        # Split by file, before chunking: chunks of one file (and its near-copies of itself) stay together.
        for path in files:
            if hash_split(path.relative_to(root).as_posix(), PYSTDLIB_TEST_BUCKETS) == want:
                yield from _chunks(path.read_text(encoding="utf-8", errors="replace"), PYSTDLIB_DOC_CHARS)

    version = ".".join(map(str, sys.version_info[:3]))
    return Source("pystdlib", f"pystdlib: {len(files)} source files of Python {version} at {root}",
                  lambda: split("train"), lambda: split("val"), lambda: split("test"), held_out=False)


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
