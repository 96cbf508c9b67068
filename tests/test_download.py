"""arun.download against real local HTTP servers: retries, truncation, corruption, resume."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arun.download import DownloadError, download_file, download_many, validate_parquet


def _parquet_bytes(tmp: Path, n: int = 500) -> bytes:
    path = tmp / "src.parquet"
    pq.write_table(pa.table({"text": [f"document number {i} " * 5 for i in range(n)]}), path)
    return path.read_bytes()


class Server:
    """A tiny HTTP server whose behaviour per request is scripted by the test."""

    def __init__(self, body: bytes, script: list[str] | None = None, honor_range: bool = True):
        self.body, self.script, self.honor_range = body, list(script or []), honor_range
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append(dict(self.headers))
                action = outer.script.pop(0) if outer.script else "ok"
                if action == "503":
                    self.send_response(503)
                    self.end_headers()
                    return
                if action == "404":
                    self.send_response(404)
                    self.end_headers()
                    return
                body, start = outer.body, 0
                rng = self.headers.get("Range")
                if rng and outer.honor_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if action == "truncate":
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shard.parquet"

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def body(tmp_path: Path) -> bytes:
    return _parquet_bytes(tmp_path)


def test_parallel_download_identical_bytes(tmp_path: Path, body: bytes) -> None:
    s = Server(body)
    try:
        paths = download_many([(s.url, tmp_path / f"out{i}.parquet") for i in range(3)], workers=3, validate=validate_parquet)
        assert all(p.read_bytes() == body for p in paths)
        assert not list(tmp_path.glob("*.part"))
    finally:
        s.close()


def test_fails_twice_then_succeeds(tmp_path: Path, body: bytes) -> None:
    s = Server(body, script=["503", "503", "ok"])
    try:
        out = download_file(s.url, tmp_path / "a.parquet", backoff=0.01, validate=validate_parquet)
        assert out.read_bytes() == body and len(s.requests) == 3
    finally:
        s.close()


def test_truncated_every_time_leaves_nothing(tmp_path: Path, body: bytes) -> None:
    s = Server(body, script=["truncate"] * 10, honor_range=False)
    try:
        with pytest.raises(DownloadError) as e:
            download_file(s.url, tmp_path / "a.parquet", attempts=3, backoff=0.01, validate=validate_parquet)
        assert "truncated" in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "a.parquet").exists()
    finally:
        s.close()


def test_corrupt_parquet_is_rejected(tmp_path: Path) -> None:
    s = Server(b"PAR1" + b"x" * 5000)
    try:
        with pytest.raises(DownloadError, match="not a readable parquet"):
            download_file(s.url, tmp_path / "a.parquet", attempts=2, backoff=0.01, validate=validate_parquet)
        assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "a.parquet.part").exists()
    finally:
        s.close()


def test_404_fails_at_once(tmp_path: Path, body: bytes) -> None:
    s = Server(body, script=["404"] * 5)
    try:
        with pytest.raises(DownloadError, match="404"):
            download_file(s.url, tmp_path / "a.parquet", backoff=0.01)
        assert len(s.requests) == 1
    finally:
        s.close()


def test_resume_with_range(tmp_path: Path, body: bytes) -> None:
    s = Server(body)
    try:
        (tmp_path / "a.parquet.part").write_bytes(body[: len(body) // 2])
        out = download_file(s.url, tmp_path / "a.parquet", validate=validate_parquet)
        assert out.read_bytes() == body
        assert s.requests[0].get("Range") == f"bytes={len(body) // 2}-"
    finally:
        s.close()


def test_complete_file_makes_no_request(tmp_path: Path, body: bytes) -> None:
    s = Server(body)
    try:
        (tmp_path / "a.parquet").write_bytes(body)
        download_file(s.url, tmp_path / "a.parquet", validate=validate_parquet)
        assert s.requests == []
    finally:
        s.close()


def test_unreachable_host_says_network(tmp_path: Path) -> None:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError, match="cannot connect"):
        download_file(f"http://127.0.0.1:{port}/x.parquet", tmp_path / "x.parquet", attempts=2, backoff=0.01)
