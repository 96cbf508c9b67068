"""
Machine identities: the Ed25519 key pair that signs this machine's ledger lines, and the public keys
a repo trusts, so a record verifies on every machine of a lab and not only where it was written.

- This machine's private key: $ARUN_HOME/identity.key (default ~/.config/arun/identity.key), made on
  first use, mode 0600, in the folder that confined train and agent processes cannot read (confine.py
  hides it, like the legacy ledger.key beside it).
- The repo's trusted keys: bench/trusted_keys, a tracked file ("ed25519:<base64> <name>" per line), so
  a lab shares them by git. It lives under bench/, which a confined agent may read but never write.
  This machine's own key is always trusted; a swarm worker also trusts its head's key for the run.
- A key is named by its id: sha256 of its 32 raw bytes, 16 hex digits (what a ledger line carries).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from arun.core.errors import ArunError

TRUST_FILE = Path("bench") / "trusted_keys"
PREFIX = "ed25519:"
_DOMAIN = b"arun-ledger-line:"      # what is signed is never mistaken for another use of the key
_session: dict[str, Known] = {}   # keys trusted for this process only (a swarm worker: its head)


@dataclass(frozen=True)
class Known:
    key_id: str
    name: str
    public: Ed25519PublicKey


def home() -> Path:
    """$ARUN_HOME, default ~/.config/arun: outside every repo."""
    env = os.environ.get("ARUN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".config" / "arun"


def identity_path() -> Path:
    return home() / "identity.key"


def raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw(public)).hexdigest()[:16]


def public_text(public: Ed25519PublicKey) -> str:
    return PREFIX + base64.b64encode(raw(public)).decode()


def create_secret(path: Path, text: str) -> None:
    """Writes a machine secret (mode 0600) unless one is there: linked into place, so when two aruns
    race to make it, the first one's wins and both read the same."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def signing_key() -> Ed25519PrivateKey:
    """This machine's private key, made on first use (0600, linked into place so two aruns agree on one)."""
    path = identity_path()
    try:
        return _load_private(path)
    except FileNotFoundError:
        pass
    create_secret(path, Ed25519PrivateKey.generate().private_bytes_raw().hex() + "\n")
    return _load_private(path)


def _load_private(path: Path) -> Ed25519PrivateKey:
    text = path.read_text().strip()
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))
    except ValueError:
        raise ArunError(f"{path} is not an arun identity key (64 hex digits); move it away and rerun to make a new one") from None


def own_public() -> Ed25519PublicKey:
    return signing_key().public_key()


def sign(chain: str) -> tuple[str, str]:
    """(signature hex, key id) of a line's chain value under this machine's key."""
    key = signing_key()
    return key.sign(_DOMAIN + chain.encode()).hex(), key_id(key.public_key())


def verify(public: Ed25519PublicKey, chain: str, signature: str) -> bool:
    try:
        public.verify(bytes.fromhex(signature), _DOMAIN + chain.encode())
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def parse_public(text: str) -> Ed25519PublicKey:
    """A public key from "ed25519:<base64>" (what `arun trust show` prints) or a file holding that."""
    text = text.strip()
    if not text.startswith(PREFIX) and Path(text).is_file():
        text = Path(text).read_text().split()[0] if Path(text).read_text().split() else ""
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    try:
        data = base64.b64decode(body, validate=True)
        if len(data) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(data)
    except (binascii.Error, ValueError):
        raise ArunError(f"{text[:60]!r} is not an arun public key; pass what `arun trust show` prints on that "
                        "machine (ed25519:<base64>) or a file holding it") from None


def trust_file(repo_dir: Path | str) -> Path:
    return Path(repo_dir) / TRUST_FILE


def repo_keys(repo_dir: Path | str) -> list[Known]:
    """The keys bench/trusted_keys lists (unreadable lines are skipped: they trust nothing)."""
    for p in (trust_file(repo_dir), trust_file(repo_dir).parent):
        if p.is_symlink():  # a link would let any folder (a merged branch's) vouch for its own keys
            raise ArunError(f"{p} is a symlink; arun trusts only the repo's own bench/trusted_keys: "
                            f"replace it with a real file or folder")
    try:
        lines = trust_file(repo_dir).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for line in lines:
        parts = line.split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        try:
            public = parse_public(parts[0])
        except ArunError:
            continue
        out.append(Known(key_id(public), parts[1].strip() if len(parts) > 1 else "", public))
    return out


def own_key_id() -> str | None:
    """This machine's key id, or None where it has no key yet (a reader never makes one)."""
    try:
        return key_id(_load_private(identity_path()).public_key())
    except (FileNotFoundError, ArunError):
        return None


def trusted(repo_dir: Path | str | None) -> dict[str, Known]:
    """key id -> key, for every key whose signatures this machine believes in `repo_dir`: the repo's
    list, the session's (a swarm's head), and this machine's own key (when it has one: a reader
    never makes one)."""
    out = {k.key_id: k for k in (repo_keys(repo_dir) if repo_dir is not None else [])}
    out.update(_session)
    try:
        me = _load_private(identity_path()).public_key()
        out[key_id(me)] = Known(key_id(me), "this machine", me)
    except (FileNotFoundError, ArunError):
        pass
    return out


def trust_for_session(text: str, name: str) -> str:
    """Trusts a key in this process only (a swarm worker trusts its head's key); returns its id."""
    public = parse_public(text)
    _session[key_id(public)] = Known(key_id(public), name, public)
    return key_id(public)


def add(repo_dir: Path | str, text: str, name: str = "") -> Known:
    """Adds a key to bench/trusted_keys (commit it to share it); adding a listed key again renames it."""
    public = parse_public(text)
    kid = key_id(public)
    name = " ".join(name.split()) or kid
    path = trust_file(repo_dir)
    kept = [line for line in (path.read_text(encoding="utf-8").splitlines() if path.exists() else [])
            if not _is(line, kid)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*kept, f"{public_text(public)} {name}"]) + "\n", encoding="utf-8")
    return Known(kid, name, public)


def remove(repo_dir: Path | str, which: str) -> list[Known]:
    """Removes the keys whose id (or a prefix of 6+ digits) or name is `which`; returns them."""
    path = trust_file(repo_dir)
    gone = [k for k in repo_keys(repo_dir) if k.name == which or (len(which) >= 6 and k.key_id.startswith(which))]
    if not gone:
        raise ArunError(f"no key {which!r} in {TRUST_FILE}; `arun trust list` shows the ids and names")
    ids = {k.key_id for k in gone}
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if not any(_is(line, i) for i in ids)]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return gone


def _is(line: str, kid: str) -> bool:
    parts = line.split(None, 1)
    if not parts or parts[0].startswith("#"):
        return False
    try:
        return key_id(parse_public(parts[0])) == kid
    except ArunError:
        return False
