"""Reading and rewriting a train file's hyperparameter block (ALL_CAPS literals between the markers)."""

from __future__ import annotations

import ast

BEGIN, END = "# --- hyperparameters ---", "# --- end hyperparameters ---"


def block_span(text: str) -> tuple[int, int]:
    """(start, end) character offsets of the block's body; ValueError when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"train file has no '{BEGIN}' ... '{END}' block")
    start = text.index("\n", start) + 1
    return start, end


def constants(text: str) -> dict:
    """The literal ALL_CAPS assignments of the block, evaluated safely (no code runs)."""
    try:
        start, end = block_span(text)
        tree = ast.parse(text[start:end])
    except (ValueError, SyntaxError):
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    out[name] = ast.literal_eval(node.value)
                except ValueError:
                    continue
    return out


def _source_value(value: object) -> str:
    return repr(value)


def rewrite_constants(text: str, overrides: dict) -> str:
    """Replaces the values of the named constants in place, keeping comments and layout."""
    start, end = block_span(text)
    body = text[start:end]
    tree = ast.parse(body)
    lines = body.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    edits = []
    missing = set(overrides)
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in overrides:
                v = node.value
                a = offsets[v.lineno - 1] + v.col_offset
                b = offsets[v.end_lineno - 1] + v.end_col_offset
                edits.append((a, b, _source_value(overrides[name])))
                missing.discard(name)
    if missing:
        raise KeyError(f"constants not in the hyperparameter block: {sorted(missing)}")
    for a, b, new in sorted(edits, reverse=True):
        body = body[:a] + new + body[b:]
    return text[:start] + body + text[end:]
