"""
`arun audit`: checks every ledger line's seal and re-scores every keep whose forward is still in
the artifact store, with the fixed evaluator process, on the same data. The verdicts go to
bench/<tag>/audit.json (record id -> verdict), which every later read honours: a keep whose
number could not be reproduced is marked and never a best again.

Verdicts: "ok", "failed: unverified" (its forward is no longer stored: a number nobody can check again
is not believed, and is never a best),
"skipped: <why>" (it cannot be re-scored here: other data, other hardware, other fixed code),
"failed: <why>", and the seal's own "forged: ..." / "edited: ...". A record this machine wrote on the
checked-out branch (its journal, arun.core.journal) that the ledger lacks fails as "failed: missing from the ledger".
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from arun.core import forward_store
from arun.core.context import open_data, resolve_engine
from arun.core.errors import ArunError
from arun.core.gitops import run_git
from arun.core.ledger import AUDIT_FILE, TRUST, Ledger, annotate, ledger_path, ledgers_in, parse_lines
from arun.core.numbers import finite
from arun.core.ratchet import scored
from arun.core.scoring import score_artifact
from engines.atomic import write_json
from engines.fingerprint import fixed_code_sha256
from prepare import PreparedData, sha256_file

# The re-score runs the same fixed code on the same artifact, rows and device as the score of record,
# and sums in float64: an honest keep reproduces to the last few bits (1e-9 and below in practice).
# 1e-6 relative leaves room for a nondeterministic reduction order on a GPU and is still a hundred times
# finer than any gain the ratchet cares about (NEAR_MISS is 2e-3 absolute).
RTOL = 1e-6
FAILING = ("failed", "forged", "edited")


@dataclass
class Row:
    tag: str
    id: str
    status: str
    recorded: float | None
    rescored: float | None
    verdict: str

    @property
    def fails(self) -> bool:
        return self.verdict.startswith(FAILING)


def _ledgers(repo_dir: Path, tag: str | None, ref: str | None) -> list[tuple[str, str, list[dict]]]:
    """(tag, source, records with their seal trust but no earlier audit) for each ledger to audit."""
    out = []
    if ref is None:
        paths = [ledger_path(repo_dir, tag)] if tag else ledgers_in(repo_dir)
        for path in paths:
            if not path.exists():
                known = ", ".join(p.parent.name for p in ledgers_in(repo_dir)) or "none yet"
                raise ArunError(f"no ledger for tag {tag!r} at {path}; tags here: {known}")
            out.append((path.parent.name, str(path), Ledger(path).records(audit=False)))
        return out
    names = run_git(repo_dir, "ls-tree", "-r", "--name-only", ref, "--", "bench").split()
    for name in names:
        t = Path(name).parent.name
        if name.endswith("/ledger.jsonl") and (tag is None or t == tag):
            lines: list[int] = []
            recs = parse_lines(run_git(repo_dir, "show", f"{ref}:{name}"), f"{ref}:{name}", lines)
            out.append((t, f"{ref}:{name}", annotate(recs, lines, f"{ref}:{name}", {})))
    return out


def _rescore(repo_dir: Path, rec: dict, data: PreparedData, tags: dict) -> tuple[float | None, str]:
    """(re-scored val_bpb, verdict) of one keep."""
    backend, sha = str(rec.get("backend")), str(rec["artifact_sha256"])
    if backend not in forward_store.SUFFIX:
        return None, f"skipped: unknown backend {backend!r}"
    path = forward_store.path_for(repo_dir, backend, sha)
    if not path.is_file():  # nothing to re-score: the number cannot be checked, so it is not believed
        return None, "failed: unverified (its stored forward is gone; it can never be re-scored)"
    key = rec.get("key") or {}
    here = data.key()
    if any(key.get(k) != v for k, v in here.items()):
        return None, f"skipped: recorded on other data ({key.get('dataset')}/{key.get('profile')}); prepare that data to audit it"
    device = rec.get("device")
    if (backend, device) not in tags:
        try:
            tags[(backend, device)] = resolve_engine(backend, device)[1].tag
        except ArunError as e:
            tags[(backend, device)] = f"unavailable ({e})"
    if tags[(backend, device)] != rec.get("tag"):
        return None, f"skipped: recorded on {rec.get('tag')}, this machine is {tags[(backend, device)]}"
    if key.get("fixed_code_sha256") and key["fixed_code_sha256"] != fixed_code_sha256(repo_dir):
        return None, "skipped: scored by other fixed code (another run's pin); check out that commit to audit it"
    # A multi-seed keep: val_bpb is the mean of its seeds' scores, and every seed's forward is stored
    # (artifact_sha256_seeds, keep_artifacts) and re-scored against its own seed's score.
    seeds = rec.get("val_bpb_seeds") or []
    pairs: list[tuple[str, float]] = [(sha, float(rec["val_bpb"]))]
    if len(seeds) > 1:
        shas = rec.get("artifact_sha256_seeds") or []
        if not all(finite(v) is not None for v in seeds) or len(shas) != len(seeds) \
                or shas[0] != sha:
            return None, "failed: unverified (a multi-seed keep without one stored forward per seed score)"
        mean = statistics.fmean(float(v) for v in seeds)
        if not math.isclose(float(rec["val_bpb"]), mean, rel_tol=1e-9, abs_tol=0.0):
            return None, f"failed: recorded val_bpb {float(rec['val_bpb']):.6f} is not the mean {mean:.6f} of its seeds"
        pairs = [(str(s), float(v)) for s, v in zip(shas, seeds)]
    scores: list[float] = []
    for i, (seed_sha, want) in enumerate(pairs):
        seed_path = forward_store.path_for(repo_dir, backend, seed_sha)
        which = f" (seed {i + 1}/{len(pairs)})" if len(pairs) > 1 else ""
        if not seed_path.is_file():
            return None, f"failed: unverified (its stored forward{which} is gone; it can never be re-scored)"
        with tempfile.TemporaryDirectory(prefix="arun-audit-") as d:
            verdict = score_artifact(backend, seed_path, data.dir, Path(d) / "verdict.json", device=device,
                                     expect_fixed_sha=key.get("fixed_code_sha256"), fixed_from=repo_dir)
        v = verdict.get("val_bpb")
        if "error" in verdict or not isinstance(v, (int, float)):
            return None, f"failed: the evaluator refused its forward{which} ({verdict.get('error', 'no val_bpb')})"
        scores.append(float(v))
        if sha256_file(seed_path) != seed_sha:
            return v, f"failed: the stored forward's bytes{which} no longer match the record's sha256 (swapped)"
        if not math.isclose(v, want, rel_tol=RTOL, abs_tol=0.0):
            return v, f"failed: re-scored {v:.6f}{which}, recorded {want:.6f} (beyond {RTOL:g} relative)"
    return statistics.fmean(scores), "ok"


def audit(repo_dir: Path | str, tag: str | None = None, ref: str | None = None) -> list[Row]:
    """Audits the ledgers (one tag's, or all; from a git ref when given) and writes each tag's audit.json
    (not for a ref: its verdicts are printed only)."""
    repo_dir = Path(repo_dir).resolve()
    ledgers = _ledgers(repo_dir, tag, ref)
    data = None
    tags: dict = {}
    rows: list[Row] = []
    # The records this machine wrote on the checked-out branch that its ledger lost for good (arun.core.journal).
    branch = run_git(repo_dir, "symbolic-ref", "-q", "--short", "HEAD", check=False) if ref is None else ""
    for t, source, records in ledgers:
        verdicts: dict[str, str] = {}
        for rec in records:
            rid, trust = str(rec.get("id", "?")), str(rec.get(TRUST, "ok"))
            recorded = rec["val_bpb"] if scored(rec) else None
            rescored, verdict = None, trust if trust != "ok" else "ok"
            if trust.startswith(("forged", "edited")):
                pass
            elif rec.get("status") == "keep" and rec.get("artifact_sha256") and recorded is not None:
                data = data if data is not None else open_data(verify=True)
                rescored, verdict = _rescore(repo_dir, rec, data, tags)
                if trust != "ok" and not verdict.startswith(FAILING):
                    verdict = f"{verdict} ({trust})"
            elif rec.get("status") == "keep" and trust in ("ok", "foreign"):
                verdict = "skipped: no artifact recorded (kept before artifacts existed)"
            # Only a believed line's verdict is recorded (an untrusted line carrying another's id must not
            # fail it), and a failure sticks: no later line with the same id turns it back to "ok".
            if trust == "ok" and not verdicts.get(rid, "").startswith(FAILING):
                verdicts[rid] = verdict
            if rec.get("status") == "keep" or verdict != "ok":
                rows.append(Row(t, rid, str(rec.get("status")), recorded, rescored, verdict))
        for rec in Ledger(Path(source)).missing(branch) if branch else []:
            rows.append(Row(t, str(rec.get("id")), str(rec.get("status")), rec["val_bpb"] if scored(rec) else None,
                            None, "failed: missing from the ledger (this machine's journal holds it: a line edited "
                            "or cut out, or a reset past a pruned commit)"))
        if ref is None:  # a ref's verdicts are shown only: they must never replace the working tree's
            _write(repo_dir / "bench" / t / AUDIT_FILE, verdicts)
    return rows


def _write(path: Path, verdicts: dict[str, str]) -> None:
    write_json(path, verdicts, indent=1, sort_keys=True)
