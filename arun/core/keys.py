"""The comparability key: results are ratcheted only against results with an identical key."""

from __future__ import annotations

import hashlib
import json


def comparability_key(backend: str, hardware_tag: str, data_key: dict, time_budget: float,
                      fixed_code_sha256: str) -> dict:
    return {
        "backend": backend,
        "hardware": hardware_tag,
        **data_key,  # dataset, profile, fingerprints, val-rows sha256, MAX_SEQ_LEN, EVAL_TOKENS
        "time_budget": float(time_budget),
        "fixed_code_sha256": str(fixed_code_sha256),  # the code that scores: a change to it is a new key
    }


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
