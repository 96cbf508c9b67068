"""arun_data.download against real local HTTP servers and real parquet files: retries, truncation, corruption, resume."""

from __future__ import annotations

import http.server
import os
import socket
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arun_data.download import CHUNK, DownloadError, download_file, download_many, hf_dataset_url, validate_parquet


def _parquet_bytes(tmp: Path, seed: int = 0, n: int = 500, big: bool = False) -> bytes:
    path = tmp / f"src{seed}.parquet"
    # big: random hex text, so the file stays several download chunks long after compression
    texts = [os.urandom(512).hex() if big else f"document {seed}/{i} " * 5 for i in range(n)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=100)
    return path.read_bytes()


class Server:
    """
    A real HTTP server on 127.0.0.1 serving `files` (path -> bytes). Each request pops the next scripted
    action: "ok", "503", "429", "404", or "truncate" (a full Content-Length, half the body, then close).
    """

    def __init__(self, files: dict[str, bytes], script: list[str] | None = None, honor_range: bool = True):
        self.files, self.script, self.honor_range = files, list(script or []), honor_range
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with outer.lock:
                    outer.requests.append((self.path, dict(self.headers)))
                    action = outer.script.pop(0) if outer.script else "ok"
                body = outer.files.get(self.path)
                if action in ("503", "429", "404") or body is None:
                    self.send_response(404 if body is None else int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and outer.honor_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if action == "truncate":  # promise everything, deliver half, hang up
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str = "/shard.parquet") -> str:
        return self.base + name

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def body(tmp_path: Path) -> bytes:
    return _parquet_bytes(tmp_path)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(files: dict[str, bytes], **kw: object) -> Server:
        servers.append(Server(files, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket closes


def test_parallel_download_identical_bytes(tmp_path: Path, serve) -> None:
    shards = {f"/shard_{i:05d}.parquet": _parquet_bytes(tmp_path, seed=i) for i in range(3)}
    s = serve(shards)
    out = tmp_path / "out"
    seen, lock = [0], threading.Lock()

    def progress(n: int) -> None:
        with lock:
            seen[0] += n

    jobs = [(s.url(name), out / name.lstrip("/")) for name in shards]
    paths = download_many(jobs, workers=3, validate=validate_parquet, progress=progress, backoff=0.01)
    assert paths == [dest for _, dest in jobs]  # job order
    assert [p.read_bytes() for p in paths] == list(shards.values())
    assert seen[0] == sum(len(b) for b in shards.values())
    assert not list(out.glob("*.part"))
    for p in paths:
        validate_parquet(p)


def test_fails_twice_with_503_then_succeeds(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body}, script=["503", "503", "ok"])
    out = download_file(s.url(), tmp_path / "a.parquet", backoff=0.01, validate=validate_parquet)
    assert out.read_bytes() == body and len(s.requests) == 3


def test_429_is_retried(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body}, script=["429", "ok"])
    assert download_file(s.url(), tmp_path / "a.parquet", backoff=0.01).read_bytes() == body
    assert len(s.requests) == 2


def test_truncated_every_time_leaves_no_dest(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body}, script=["truncate"] * 10, honor_range=False)
    dest = tmp_path / "a.parquet"
    with pytest.raises(DownloadError) as e:
        download_file(s.url(), dest, attempts=3, backoff=0.01, validate=validate_parquet)
    msg = str(e.value)
    assert "truncated" in msg and s.url() in msg and "rerun" in msg and "\n" not in msg
    assert not dest.exists() and len(s.requests) == 3


def test_truncated_once_then_resumed(tmp_path: Path, serve) -> None:
    body = _parquet_bytes(tmp_path, big=True)
    assert len(body) > 4 * CHUNK
    s = serve({"/shard.parquet": body}, script=["truncate", "ok"])
    out = download_file(s.url(), tmp_path / "a.parquet", backoff=0.01, validate=validate_parquet)
    assert out.read_bytes() == body
    # the second try picked up where the first broke off (whole chunks only: the last partial read is lost)
    kept = int(s.requests[1][1]["Range"].split("=")[1].rstrip("-"))
    assert len(body) // 2 - CHUNK <= kept <= len(body) // 2 and kept > 0


def test_corrupt_parquet_is_rejected(tmp_path: Path, body: bytes, serve) -> None:
    corrupt = body[:-208] + b"\xff" * 200 + body[-8:]  # right length and magic, garbled footer
    s = serve({"/shard.parquet": corrupt})
    dest = tmp_path / "a.parquet"
    with pytest.raises(DownloadError) as e:
        download_file(s.url(), dest, attempts=3, backoff=0.01, validate=validate_parquet)
    assert "invalid" in str(e.value) and s.url() in str(e.value) and "\n" not in str(e.value)
    assert not dest.exists() and not (tmp_path / "a.parquet.part").exists()
    assert len(s.requests) == 1  # a full-length bad file is the source's fault: not fetched again and again
    # and the validator on its own, on the same bytes
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(corrupt)
    with pytest.raises(DownloadError) as e:
        validate_parquet(bad)
    assert str(bad) in str(e.value) and "delete it and rerun" in str(e.value) and "\n" not in str(e.value)


def test_parquet_without_text_column(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(DownloadError, match="no 'text' column"):
        validate_parquet(path)


def test_404_fails_at_once(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body}, script=["404"] * 5)
    with pytest.raises(DownloadError) as e:
        download_file(s.url(), tmp_path / "a.parquet", backoff=0.01)
    assert "404" in str(e.value) and s.url() in str(e.value) and "\n" not in str(e.value)
    assert len(s.requests) == 1 and not (tmp_path / "a.parquet").exists()


def test_resume_with_range(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body})
    half = len(body) // 2
    (tmp_path / "a.parquet.part").write_bytes(body[:half])
    out = download_file(s.url(), tmp_path / "a.parquet", backoff=0.01, validate=validate_parquet)
    assert out.read_bytes() == body
    assert [h.get("Range") for _, h in s.requests] == [f"bytes={half}-"]
    assert not (tmp_path / "a.parquet.part").exists()


def test_resume_without_range_support_restarts(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body}, honor_range=False)
    (tmp_path / "a.parquet.part").write_bytes(body[:100])
    out = download_file(s.url(), tmp_path / "a.parquet", backoff=0.01, validate=validate_parquet)
    assert out.read_bytes() == body and len(s.requests) == 1


def test_complete_file_makes_no_request(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body})
    (tmp_path / "a.parquet").write_bytes(body)
    download_many([(s.url(), tmp_path / "a.parquet")], validate=validate_parquet, backoff=0.01)
    assert s.requests == []


def test_bad_cached_file_is_replaced(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/shard.parquet": body})
    (tmp_path / "a.parquet").write_bytes(body[:-50])  # e.g. copied in by hand, truncated
    assert download_file(s.url(), tmp_path / "a.parquet", validate=validate_parquet).read_bytes() == body


def test_many_raises_after_the_others_finish(tmp_path: Path, body: bytes, serve) -> None:
    s = serve({"/a.parquet": body, "/c.parquet": body})
    jobs = [(s.url(f"/{n}.parquet"), tmp_path / f"{n}.parquet") for n in "abc"]  # b is missing on the server
    with pytest.raises(DownloadError, match="404"):
        download_many(jobs, workers=3, validate=validate_parquet, backoff=0.01)
    assert (tmp_path / "a.parquet").read_bytes() == body and (tmp_path / "c.parquet").read_bytes() == body
    assert not (tmp_path / "b.parquet").exists()


def test_unreachable_host_says_network(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/x.parquet"
    with pytest.raises(DownloadError) as e:
        download_file(url, tmp_path / "x.parquet", attempts=2, backoff=0.01)
    msg = str(e.value)
    assert "network" in msg and "--dataset pystdlib" in msg and url in msg and "\n" not in msg


def test_hf_dataset_url_reads_env_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    assert hf_dataset_url("me/data", "shard_00000.parquet") == "http://127.0.0.1:9/datasets/me/data/resolve/main/shard_00000.parquet"
    monkeypatch.delenv("HF_ENDPOINT")
    assert hf_dataset_url("me/data", "f.parquet", "v1") == "https://huggingface.co/datasets/me/data/resolve/v1/f.parquet"
