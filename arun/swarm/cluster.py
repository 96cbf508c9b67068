"""
Starting or joining the swarm's Ray cluster, safely by default.

- One box (no --address): a private Ray instance bound to loopback only (node IP 127.0.0.1, every
  server on 127.0.0.1), dashboard off. Ray's `ray.init` passes `_node_ip_address` through
  `services.resolve_ip_for_localhost`, which turns 127.0.0.1 into this machine's outward address
  (`get_node_ip_address`) unless `ray_constants.ENABLE_RAY_CLUSTER` is false (the macOS and Windows
  default); that flag is turned off for the duration of ray.init, so the node keeps 127.0.0.1.
- Across machines (--address HOST:PORT): token authentication on (RAY_AUTH_MODE=token unless the
  user set RAY_AUTH_MODE), the token read as Ray reads it (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
  ~/.ray/auth_token). A failure to connect is one line naming the problem and the fix: Ray's own
  retry messages go to a temporary file, not the console.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from arun.core.errors import ArunError

LOOPBACK = "127.0.0.1"

AUTH_FIX = ("set RAY_AUTH_MODE=token on every node and give every node the head's token "
            "(`ray get-auth-token` on the head prints it) in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")


def start_local(num_cpus: int, object_store_mb: int) -> None:
    """A private Ray instance on this machine, bound to loopback, dashboard off."""
    import ray  # Ray is an optional dependency (the [swarm] extra): imported where it is used
    from ray._private import ray_constants
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # why: see the module docstring
    try:
        # address="local": always a fresh private instance, never one a stale /tmp/ray file points at.
        # ERROR: Ray's start-up warnings (e.g. "Token authentication is enabled ...") are about Ray's own
        # defaults, not this run; they stay in Ray's logs and the console keeps the swarm's lines.
        ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=object_store_mb * 2**20, logging_level="ERROR", log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def join(address: str) -> None:
    """Connects to the cluster at HOST:PORT with token authentication unless RAY_AUTH_MODE says otherwise."""
    import ray
    from ray.exceptions import AuthenticationError
    host, port = _split(address)
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        _reload_ray_config()
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise ArunError(f"nothing answers at {address} ({e.strerror or e}): start the head there with "
                        f"`ray start --head --port {port}`, or check the address and that port {port} is open from here") from e
    with tempfile.TemporaryDirectory(prefix="arun-ray-") as tmp:
        errors = Path(tmp) / "stderr"
        try:
            with _stderr_to(errors):
                ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except AuthenticationError:
            raise ArunError(f"token authentication is on but this machine has no Ray token: {AUTH_FIX}") from None
        except (ConnectionError, RuntimeError) as e:
            said = errors.read_text(errors="replace") if errors.exists() else ""
            if "InvalidAuthToken" in said or "Unauthenticated" in said:
                mode = os.environ.get("RAY_AUTH_MODE")
                raise ArunError(f"the Ray cluster at {address} refused this connection's token "
                                f"(RAY_AUTH_MODE={mode}): {AUTH_FIX}") from e
            raise ArunError(f"could not join the Ray cluster at {address} ({str(e).splitlines()[0][:200]}): "
                            "check that `ray status --address {address}` works on this machine, with the same "
                            "Ray version as the cluster".replace("{address}", address)) from e


def token_path() -> Path | None:
    """The token file Ray reads here (RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token), if one exists;
    None when the token comes from RAY_AUTH_TOKEN or there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    return path if path.is_file() else None


def private_token() -> str | None:
    """Ray writes ~/.ray/auth_token readable by every user of the machine (0644); anyone who reads it can
    join the cluster and run code on every node. Made 0600 here; returns what was done, or None."""
    path = token_path()
    if path is None or not path.stat().st_mode & 0o077:
        return None
    try:
        path.chmod(0o600)
    except OSError as e:
        return f"warning: {path} is readable by other users and could not be made private ({e.strerror}); chmod 600 it"
    return f"note: {path} was readable by other users; made it private (mode 600)"


def log_dir() -> str:
    """Where Ray keeps this session's logs (raylet, workers, the driver's core worker)."""
    try:
        from ray._private.worker import _global_node
        return str(Path(_global_node.get_session_dir_path()) / "logs")
    except Exception:  # a Ray whose internals moved: its documented default
        return str(Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs")


def keep_ray_messages_in_logs() -> Path:
    """Ray's driver prints the cluster's error messages (a raylet's death, with the last lines of
    its log) to stdout whatever log_to_driver says; they go to a file in Ray's log folder instead,
    and the console keeps the swarm's own lines. Returns that file."""
    path = Path(log_dir()) / "arun-driver-messages.log"
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return path

    def to_file(data: dict, ignore_prefix: bool = False) -> None:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(f"({data.get('pid')}) {line}\n" for line in data.get("lines") or []))
        except OSError:
            pass

    ray_worker.print_to_stdstream = to_file
    return path


def node_ip() -> str:
    import ray
    return ray.util.get_node_ip_address()


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "localhost") or ip.startswith("::ffff:127.")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ArunError(f"--address {address!r} is not HOST:PORT; pass the head's address and its "
                        "`ray start --head --port` (e.g. 10.0.0.1:6379)")
    return host.strip("[]"), int(port)


def _reload_ray_config() -> None:
    """Ray caches its config (auth mode included) when it loads; re-read it, as Ray does itself
    when it turns token auth on for a local cluster."""
    try:
        from ray._raylet import Config
        Config.initialize("")
    except Exception:
        pass


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Ray's C++ client writes its retries to file descriptor 2; they land in `path` instead."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
