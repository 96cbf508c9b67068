"""The comparability key: results are ratcheted only against results with an identical key."""

from __future__ import annotations

import hashlib
import json


def comparability_key(backend: str, hardware_tag: str, data_key: dict, time_budget: float,
                      fixed_code_sha256: str) -> dict:
    """Old ledgers' keys carry `evaluator_version` instead of `fixed_code_sha256`: they load as they
    are and never share a key (so never ratchet) with records scored by pinned fixed code."""
    return {
        "backend": backend,
        "hardware": hardware_tag,
        **data_key,  # dataset, profile, fingerprints, val-rows sha256, MAX_SEQ_LEN, EVAL_TOKENS
        "time_budget": float(time_budget),
        "fixed_code_sha256": str(fixed_code_sha256),  # the evaluator that scored it, by content
    }


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def key_difference(old: dict, new: dict) -> str:
    """How key `new` differs from `old`, in the words a user changed it by: budget, data, fixed code,
    device. E.g. "budget 300s -> 30s"; "" when the keys are the same."""
    parts = []
    if old.get("time_budget") != new.get("time_budget"):
        parts.append(f"budget {old.get('time_budget', 0):g}s -> {new.get('time_budget', 0):g}s")
    data = [f for f in ("dataset", "profile") if old.get(f) != new.get(f)]
    if data:
        parts.append("data (" + ", ".join(f"{f} {old.get(f)} -> {new.get(f)}" for f in data) + ")")
    elif any(old.get(f) != new.get(f) for f in ("dataset_fingerprint", "tokenizer_sha256", "val_rows_sha256",
                                                  "test_rows_sha256", "max_seq_len", "eval_tokens")):
        parts.append("data (the prepared corpus was rebuilt)")
    if old.get("fixed_code_sha256") != new.get("fixed_code_sha256"):
        parts.append("fixed code (prepare.py, arun_data/ or engines/ changed)")
    if old.get("backend") != new.get("backend") or old.get("hardware") != new.get("hardware"):
        parts.append(f"device {old.get('hardware')} -> {new.get('hardware')}")
    return "; ".join(parts)
