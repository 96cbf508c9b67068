"""
Seals for ledger lines, so an edited, deleted, inserted or forged record is detected and named.

Every line carries three fields besides the record itself:

    prev    the `chain` value of the line before it ("" for the first line)
    chain   sha256(prev + the record's canonical JSON): anyone can recompute it, so an edit,
            a deletion or an insertion breaks the chain wherever the ledger is read
    sig     Ed25519 signature of `chain` under the writing machine's identity key (arun/core/trust.py,
            kept outside the repo where confined train and agent processes cannot read it);
            `sig_key` names the key. A writer that recomputes the whole chain still cannot sign it,
            and any machine holding the public key can check it: a line verifies wherever its key
            is trusted (bench/trusted_keys, or this machine's own), and is `foreign` elsewhere.

Lines written before identities existed carry `mac` / `mac_key` instead: HMAC-SHA256 of `chain` under
this machine's secret ledger.key. They verify (as legacy HMAC seals) on the machine that made them
only; every other machine sees them as foreign.

Lines from before sealing existed (no `chain`) are accepted only as a prefix of the file: an
unsealed line after a sealed one is reported like any other forgery.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from arun.core import trust

SEAL_FIELDS = ("prev", "chain", "mac", "mac_key", "sig", "sig_key")


OWN_LEGACY_SIGNER = "this machine (legacy HMAC seal)"  # a legacy HMAC seal verifies only where it was made

def key_path() -> Path:
    """$ARUN_HOME/ledger.key, default ~/.config/arun/ledger.key: outside every repo."""
    return trust.home() / "ledger.key"


def machine_key() -> bytes:
    """This machine's legacy HMAC sealing key (new lines are signed, see trust.py), made on first use (0600, written atomically so two aruns agree)."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    trust.create_secret(path, secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text().strip())


def existing_key() -> bytes | None:
    """The machine key if one was made, else None (a reader never creates one: with no key nothing
    here can have been sealed by this machine)."""
    try:
        return bytes.fromhex(key_path().read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"arun-ledger-key:" + key).hexdigest()[:12]


def _canonical(record: dict) -> bytes:
    body = {k: v for k, v in record.items() if k not in SEAL_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_of(prev: str, record: dict) -> str:
    return hashlib.sha256(prev.encode() + b"\n" + _canonical(record)).hexdigest()


def seal(record: dict, prev: str, key: bytes | None = None) -> dict:
    """The record with its seal fields set, ready to be written after a line whose chain is `prev`:
    signed with this machine's identity, or (given `key`) HMAC-sealed as before identities existed."""
    out = {k: v for k, v in record.items() if k not in SEAL_FIELDS}
    # The JSON round trip first: what is sealed must be exactly what a reader will parse back.
    out = json.loads(json.dumps(out, default=str))
    chain = chain_of(prev, out)
    out.update(prev=prev, chain=chain)
    if key is not None:
        out.update(mac=hmac.new(key, chain.encode(), hashlib.sha256).hexdigest(), mac_key=key_id(key))
    else:
        sig, kid = trust.sign(chain)
        out.update(sig=sig, sig_key=kid)
    return out


def tail_chain(record: dict | None, prev: str = "") -> str:
    """The chain value that the next line must name as its prev (legacy lines get one computed)."""
    if record is None:
        return ""
    return record.get("chain") or chain_of(prev, record)


def head(records: list[dict]) -> str:
    """The chain value the next line must name as its prev: the last line's, walking the file as
    check() does (an unsealed or broken line still moves the chain on, so honest lines after it hold)."""
    prev = ""
    for rec in records:
        chain = rec.get("chain")
        prev = chain if isinstance(chain, str) else chain_of(prev, rec)
    return prev


@dataclass
class Problem:
    line: int          # 1-based line number in the file (among the parsed records when not given)
    record_id: str
    what: str

    def __str__(self) -> str:
        return f"line {self.line} (id {self.record_id}): {self.what}"


@dataclass
class Verdict:
    problems: list[Problem]
    bad: set[int]        # indexes of records that fail their seal: never believed
    foreign: set[int]    # sealed under a key not trusted here: only their chain could be checked
    legacy: set[int]     # written before sealing existed
    signer: dict[int, str]   # index -> who vouches for it: a trusted key's name, or the legacy HMAC seal


def check(records: list[dict], key: bytes | None, lines: list[int] | None = None,
          keys: dict[str, trust.Known] | None = None) -> Verdict:
    """Checks the seals of one ledger file's records, in file order. A record is trusted when its
    own chain holds, its prev names the line before it, and its signature verifies under a trusted
    key (`keys`: id -> key, see trust.trusted) or its legacy mac under our ledger key. A record
    signed by a key not trusted here is shown, marked foreign (with its key's id), but a decision
    never rests on it; one whose signature fails under a trusted key is forged."""
    problems: list[Problem] = []
    bad: set[int] = set()
    foreign: set[int] = set()
    legacy: set[int] = set()
    signer: dict[int, str] = {}
    keys = keys or {}
    ours = key_id(key) if key is not None else None
    prev, sealed_seen = "", False
    for i, rec in enumerate(records):
        rid, n = str(rec.get("id", "?")), lines[i] if lines else i + 1
        if "chain" not in rec:
            if sealed_seen:
                problems.append(Problem(n, rid, "unsealed line after sealed ones: not written by arun"))
                bad.add(i)
            else:
                legacy.add(i)
            prev = chain_of(prev, rec)
            continue
        sealed_seen = True
        if not isinstance(rec.get("chain"), str):
            problems.append(Problem(n, rid, "forged: its seal is not a hash"))
            bad.add(i)
            prev = chain_of(prev, rec)
            continue
        if rec.get("prev") != prev:
            problems.append(Problem(n, rid, "does not follow the line before it: a line was deleted, "
                                                "inserted or moved here"))
            bad.add(i)
        if chain_of(str(rec.get("prev", "")), rec) != rec["chain"]:
            problems.append(Problem(n, rid, "edited after it was written (its content no longer matches its seal)"))
            bad.add(i)
        elif "sig" in rec or "sig_key" in rec:
            known = keys.get(str(rec.get("sig_key")))
            if known is None:
                foreign.add(i)
            elif trust.verify(known.public, rec["chain"], str(rec.get("sig", ""))):
                signer[i] = known.name or known.key_id
            else:
                problems.append(Problem(n, rid, f"forged: its signature does not verify under the trusted key "
                                                f"{known.key_id} ({known.name})"))
                bad.add(i)
        elif key is not None and rec.get("mac_key") == ours:
            want = hmac.new(key, str(rec["chain"]).encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, str(rec.get("mac", ""))):
                problems.append(Problem(n, rid, "forged: its seal was not made with this machine's ledger key"))
                bad.add(i)
            else:
                signer[i] = OWN_LEGACY_SIGNER
        elif not rec.get("mac_key") or not rec.get("mac"):
            problems.append(Problem(n, rid, "forged: sealed without a key"))
            bad.add(i)
        else:
            foreign.add(i)
        prev = rec["chain"]
    return Verdict(problems, bad, foreign, legacy, signer)


def trust_label(what: str) -> str:
    """A problem's text as a record's trust mark: "edited: ..." or "forged: ..."."""
    if what.startswith("edited"):
        return "edited: " + what[len("edited"):].strip()
    return what if what.startswith("forged") else "forged: " + what
