"""The one test for "a figure someone wrote down is a usable number".

Records, noise files and claims come from JSON that a train file, an agent or an older arun may have
written, so a figure may be missing, a string, NaN, infinite or a bool (JSON's true is Python's 1).
Every reader asks `finite` instead of repeating the isinstance-and-isfinite chain.
"""

from __future__ import annotations

import math


def finite(v: object) -> float | None:
    """v as a float when it is a finite int or float (not a bool), else None. (An int too large for a
    float, which JSON allows, is not a usable figure either.)"""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v) if math.isfinite(v) else None
    except OverflowError:
        return None
