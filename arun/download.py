"""
Downloads for prepare: parallel, retried with backoff, resumable, and atomic.

A file is streamed to `<dest>.part`, checked (length, then an optional
validator such as validate_parquet), and only then renamed onto `dest`; so a
file at `dest` is always complete, and a killed download resumes from its
.part with an HTTP Range request.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import requests

CHUNK = 1 << 20
MAX_BACKOFF = 30.0


class DownloadError(Exception):
    """One line naming the file or URL, the cause, and the fix."""


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hf_dataset_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{hf_endpoint()}/datasets/{repo}/resolve/{revision}/{filename}"


def validate_parquet(path: Path) -> None:
    """Opens the footer and checks for a 'text' column: a truncated or corrupt shard fails here."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:
        raise DownloadError(f"{path.name}: not a readable parquet file ({type(e).__name__}); delete it and rerun") from e
    if "text" not in names:
        raise DownloadError(f"{path.name}: parquet has no 'text' column (has {names}); check the dataset URL")


class _Retryable(Exception):
    pass


def _fetch_once(url: str, part: Path, timeout: float, progress: Callable[[int], None] | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with requests.get(url, stream=True, timeout=timeout, headers=headers) as r:
            if r.status_code == 404:
                raise DownloadError(f"{url}: not found (HTTP 404); check the dataset name and shard range")
            if r.status_code == 416:  # our .part is already the whole file
                return
            if r.status_code == 429 or r.status_code >= 500:
                raise _Retryable(f"HTTP {r.status_code}")
            if r.status_code >= 400:
                raise DownloadError(f"{url}: HTTP {r.status_code}; check access to the dataset")
            resumed = r.status_code == 206
            expected = r.headers.get("Content-Length")
            expected_total = (have if resumed else 0) + int(expected) if expected is not None else None
            with open(part, "ab" if resumed else "wb") as f:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    if progress:
                        progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    except requests.exceptions.ChunkedEncodingError as e:
        raise _Retryable("truncated transfer: the connection closed before Content-Length bytes") from e
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Retryable(type(e).__name__) from e
    got = part.stat().st_size
    if expected_total is not None and got != expected_total:
        raise _Retryable(f"truncated transfer: {got} of {expected_total} bytes")


def download_file(url: str, dest: Path, *, attempts: int = 5, backoff: float = 1.0, timeout: float = 30.0,
                  validate: Callable[[Path], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> Path:
    """Downloads url to dest unless a valid dest is already there; returns dest."""
    dest = Path(dest)
    if dest.exists():
        try:
            if validate:
                validate(dest)
            return dest
        except DownloadError:
            dest.unlink()  # a bad file in the cache is replaced, not trusted
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last = "unknown error"
    unreachable = True
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), MAX_BACKOFF))
        try:
            _fetch_once(url, part, timeout, progress)
            unreachable = False
            if validate:
                try:
                    validate(part)
                except DownloadError as e:
                    part.unlink(missing_ok=True)  # corrupt: start over rather than resume garbage
                    last = str(e)
                    continue
            os.replace(part, dest)
            return dest
        except _Retryable as e:
            last = str(e)
            if "ConnectionError" not in last:
                unreachable = False
    if unreachable:
        raise DownloadError(f"{url}: cannot connect (no network to {url.split('/')[2]}?); check your network or HF_ENDPOINT, "
                            f"or use the offline dataset: arun prepare --dataset pystdlib")
    raise DownloadError(f"{url}: failed after {attempts} attempts ({last}); rerun to resume, or check your network")


def download_many(jobs: list[tuple[str, Path]], *, workers: int = 8, attempts: int = 5, backoff: float = 1.0,
                  validate: Callable[[Path], None] | None = None, progress: Callable[[int], None] | None = None,
                  timeout: float = 30.0) -> list[Path]:
    """Downloads in parallel; files that complete stay complete even when another fails."""
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        futures = [pool.submit(download_file, url, Path(dest), attempts=attempts, backoff=backoff, timeout=timeout,
                               validate=validate, progress=progress) for url, dest in jobs]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e
    return [Path(dest) for _, dest in jobs]
