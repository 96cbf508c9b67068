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
