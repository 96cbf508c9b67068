"""Reading and rewriting a train file's hyperparameter block (ALL_CAPS literals between the markers)."""

from __future__ import annotations

import ast
import operator
from typing import Any

BEGIN, END = "# --- hyperparameters ---", "# --- end hyperparameters ---"


def block_span(text: str) -> tuple[int, int]:
    """(start, end) character offsets of the block's body; ValueError when the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"train file has no '{BEGIN}' ... '{END}' block")
    start = text.index("\n", start) + 1
    return start, end


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def safe_eval(node: ast.AST) -> Any:
    """Literals, tuples and plain arithmetic on numbers (2**19, 3 * 1024); anything else is ValueError.
    No code of the train file ever runs."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = safe_eval(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = safe_eval(node.left), safe_eval(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            try:
                if isinstance(node.op, ast.Pow) and abs(b) <= 64:
                    return a ** b
                if type(node.op) in _BINOPS:
                    return _BINOPS[type(node.op)](a, b)
            except ArithmeticError:
                pass
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(safe_eval(e) for e in node.elts)
    raise ValueError(ast.dump(node)[:80])


def constants(text: str, keep_source: bool = False) -> dict:
    """The ALL_CAPS assignments of the block in order, evaluated by safe_eval (2**19 -> 524288).
    A value that is not plain arithmetic is skipped, or kept as its source text with keep_source
    (so a change to it still shows in the record)."""
    try:
        start, end = block_span(text)
        body = text[start:end]
        tree = ast.parse(body)
    except (ValueError, SyntaxError):
        return {}
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                try:
                    out[name] = safe_eval(node.value)
                except ValueError:
                    if keep_source:
                        out[name] = ast.get_source_segment(body, node.value)
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
