"""
Downloads for prepare: parallel, retried with backoff, resumable, and atomic.

A file is streamed to `<dest>.part`, fsynced, checked (length, then an optional
validator such as validate_parquet), and only then renamed onto `dest`. So a
file at `dest` is always complete, a rerun skips it, and a killed download
resumes from its .part with an HTTP Range request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import requests

DEFAULT_HF_ENDPOINT = "https://huggingface.co"
HF_ENDPOINT = os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT)  # value at import; hf_dataset_url re-reads the env
CHUNK = 1 << 16      # 64 KiB reads: bounded memory, and little is lost when a transfer breaks mid-read
MAX_BACKOFF = 30.0   # seconds; longer waits only make a flaky run feel hung


class DownloadError(Exception):
    """One line naming the file or URL, the cause, and the fix."""


def hf_endpoint() -> str:
    # read at call time so a test (or a user's shell) can point us at a mirror after import
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_dataset_url(repo: str, filename: str, revision: str = "main") -> str:
    return f"{hf_endpoint()}/datasets/{repo}/resolve/{revision}/{filename}"


def _one_line(s: object, limit: int = 200) -> str:
    # library errors can span lines; ours must not (the CLI prints exactly one line)
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def validate_parquet(path: Path) -> None:
    """Reads the footer and schema and checks for a 'text' column: a truncated or corrupt shard fails here."""
    import pyarrow.parquet as pq
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)  # parses the footer, which sits at the end: truncation breaks it
        names = pf.schema_arrow.names
        pf.metadata.num_rows  # noqa: B018 (touch the row-group metadata too)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for bad files
        raise DownloadError(f"{path}: not a readable parquet file ({type(e).__name__}: {_one_line(e, 120)}); "
                            f"delete it and rerun") from e
    if "text" not in names:
        raise DownloadError(f"{path}: parquet has no 'text' column (columns: {_one_line(names, 120)}); "
                            f"delete it and rerun, or check the dataset URL")


class _Retryable(Exception):
    """A failed attempt worth repeating. `connect` marks "never reached the server"."""

    def __init__(self, reason: str, *, connect: bool = False, retry_after: float | None = None):
        super().__init__(reason)
        self.connect, self.retry_after = connect, retry_after


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/200' -> (100, 200); 'bytes */200' -> (None, 200); unknown parts are None."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    start = span.split("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _retry_after(r: requests.Response) -> float | None:
    try:
        return float(r.headers["Retry-After"])
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: our own backoff is fine


def _fetch_once(url: str, part: Path, timeout: float, progress: Callable[[int], None] | None) -> None:
    """One attempt: leaves the complete file in `part` or raises (_Retryable / DownloadError)."""
    have = part.stat().st_size if part.exists() else 0
    # identity: Content-Length must count the bytes we write, not a gzipped stream
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        r = requests.get(url, stream=True, timeout=timeout, headers=headers)
    except requests.ConnectionError as e:  # refused, DNS, unreachable, connect timeout
        raise _Retryable(type(e).__name__, connect=True) from e
    except requests.Timeout as e:
        raise _Retryable(f"no response within {timeout:g}s") from e
    with r:
        if r.status_code == 404:
            raise DownloadError(f"{url}: not found (HTTP 404); check the dataset name, file name and HF_ENDPOINT")
        if r.status_code == 416:  # our Range starts at or past the end
            _, total = _content_range(r.headers.get("Content-Range"))
            if total == have:
                return  # the .part already holds the whole file
            part.unlink(missing_ok=True)  # larger than the remote file: garbage, start over
            raise _Retryable(f"stale .part ({have} bytes) does not match the remote file ({total} bytes)")
        if r.status_code == 429 or r.status_code >= 500:
            raise _Retryable(f"HTTP {r.status_code}", retry_after=_retry_after(r))
        if r.status_code in (401, 403):
            raise DownloadError(f"{url}: access denied (HTTP {r.status_code}); the dataset may be gated or private, "
                                f"check the URL and HF_ENDPOINT")
        if r.status_code != 200 and r.status_code != 206:
            raise DownloadError(f"{url}: unexpected HTTP {r.status_code}; check the URL and HF_ENDPOINT")

        said = r.headers.get("Content-Length")
        length = int(said) if said and said.isdigit() and not r.headers.get("Content-Encoding") else None
        if r.status_code == 206:
            start, total = _content_range(r.headers.get("Content-Range"))
            if start != have:  # a server that resumes somewhere else would splice garbage
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, not {have}")
            mode = "ab"
            expected = total if total is not None else (have + length if length is not None else None)
        else:  # 200: no Range support (or no .part): restart from scratch
            mode = "wb"
            expected = length
        try:
            with open(part, mode) as f:
                for chunk in r.iter_content(CHUNK):
                    f.write(chunk)
                    if progress:
                        progress(len(chunk))
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before anything trusts or renames them
        except requests.exceptions.ChunkedEncodingError as e:  # urllib3 saw fewer bytes than Content-Length
            raise _Retryable(f"truncated transfer: the connection closed after {part.stat().st_size} bytes") from e
        except (requests.ConnectionError, requests.Timeout) as e:  # reset or stalled mid-body
            raise _Retryable(f"transfer interrupted ({type(e).__name__})") from e
    got = part.stat().st_size
    if expected is not None and got != expected:
        if got > expected:
            part.unlink(missing_ok=True)  # cannot be resumed into a correct file
        raise _Retryable(f"truncated transfer: {got} of {expected} bytes")


def _fsync_dir(path: Path) -> None:
    # makes the rename itself durable; not possible (nor needed) on every platform
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def download_file(url: str, dest: Path, *, attempts: int = 5, backoff: float = 1.0, timeout: float = 30.0,
                  validate: Callable[[Path], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> Path:
    """
    Downloads url to dest unless a valid dest is already there; returns dest.
    validate(path) raises DownloadError for a bad file; progress(n) is called with each chunk's byte count
    (from worker threads under download_many, so it must be thread-safe).
    """
    dest = Path(dest)
    if dest.exists():
        try:
            if validate:
                validate(dest)
            return dest  # resume of a partial cache: complete files are not fetched again
        except DownloadError:
            dest.unlink()  # a bad file in the cache is replaced, not trusted
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    last, delay = "no attempts made", 0.0
    reached = False  # did any attempt get an HTTP response? if not, it is the network, not the server
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(delay)
        delay = min(backoff * 2 ** attempt, MAX_BACKOFF)
        resumed = part.exists() and part.stat().st_size > 0
        try:
            _fetch_once(url, part, timeout, progress)
        except _Retryable as e:
            last, reached = str(e), reached or not e.connect
            if e.retry_after is not None:  # 429/503 told us how long to wait; honor it, within reason
                delay = min(max(delay, e.retry_after), MAX_BACKOFF)
            continue
        reached = True
        if validate:
            try:
                validate(part)
            except DownloadError as e:
                part.unlink(missing_ok=True)  # corrupt: never resume on top of it
                if not resumed:  # a fresh, full-length download is bad: the source is bad, retrying won't help
                    raise DownloadError(f"{url}: the downloaded file is invalid ({_one_line(e)}); "
                                        f"check the dataset and HF_ENDPOINT, then rerun") from e
                last = f"resumed file was invalid, restarting from scratch ({_one_line(e)})"
                delay = 0.0  # nothing to wait out: the server answered fine
                continue
        os.replace(part, dest)  # atomic: dest is either absent or complete
        _fsync_dir(dest.parent)
        return dest
    if not reached:
        host = urlsplit(url).netloc or url
        raise DownloadError(f"{url}: cannot connect, no network to {host} ({last}); check your network or "
                            f"HF_ENDPOINT, or use the offline dataset: arun prepare --dataset pystdlib")
    if part.exists() and part.stat().st_size == 0:
        part.unlink()  # nothing worth resuming
    kept = f" ({part.stat().st_size} bytes kept in {part.name})" if part.exists() else ""
    raise DownloadError(f"{url}: failed after {attempts} attempts ({_one_line(last)}){kept}; "
                        f"check your network or HF_ENDPOINT, then rerun to resume")


def download_many(jobs: list[tuple[str, Path]], *, workers: int = 8, attempts: int = 5, backoff: float = 1.0,
                  validate: Callable[[Path], None] | None = None, progress: Callable[[int], None] | None = None,
                  timeout: float = 30.0) -> list[Path]:
    """
    Downloads (url, dest) jobs in parallel and returns the dests in job order. Every job runs to the end before
    the first error (in job order) is raised, so files that completed stay complete for the rerun.
    """
    if not jobs:
        return []
    unique: dict[Path, str] = {}
    for url, dest in jobs:  # one worker per dest: two writers on one .part would corrupt it
        unique.setdefault(Path(dest), url)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(unique)))) as pool:
        futures = [pool.submit(download_file, url, dest, attempts=attempts, backoff=backoff, timeout=timeout,
                               validate=validate, progress=progress) for dest, url in unique.items()]
        errors = [f.exception() for f in futures]  # waits for all of them
    for e in errors:
        if e is not None:
            raise e
    return [Path(dest) for _, dest in jobs]
