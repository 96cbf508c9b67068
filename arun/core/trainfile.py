"""Reading and rewriting a train file's hyperparameter block (ALL_CAPS literals between the markers)."""

from __future__ import annotations

import ast
import math
import operator
import re
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


def check_value(name: str, old: object, new: object) -> str | None:
    """Why `new` cannot replace `old` as NAME's value (None when it can): the type stays the type,
    sizes and counts are positive integers (steps and seeds may be 0), rates are positive and finite,
    ratios and fractions lie in [0, 1]. The one-line reason names a value that would work."""
    if isinstance(old, bool) or isinstance(new, bool):
        return None if isinstance(old, bool) and isinstance(new, bool) else f"{name} is True or False, got {new!r}"
    if isinstance(old, int):
        if not isinstance(new, int):
            return f"{name} is a whole number, got {new!r}; write e.g. {name}={old}"
        low = 0 if name.endswith(("_STEPS", "SEED")) else 1
        return None if new >= low else f"{name} must be at least {low}, got {new}; write e.g. {name}={old}"
    if isinstance(old, float):
        if not isinstance(new, (int, float)) or isinstance(new, bool) or not math.isfinite(new):
            return f"{name} is a number, got {new!r}; write e.g. {name}={old}"
        if name.endswith(("_RATIO", "_FRAC")) and not 0.0 <= new <= 1.0:
            return f"{name} is a fraction between 0 and 1, got {new}; write e.g. {name}={old}"
        if name.endswith("_LR") and not 0.0 < new <= 10.0:
            return f"{name} is a learning rate above 0 and at most 10, got {new}; write e.g. {name}={old}"
        return None if new >= 0 else f"{name} must not be negative, got {new}; write e.g. {name}={old}"
    if isinstance(old, tuple):
        if not isinstance(new, tuple) or len(new) != len(old):
            return f"{name} is a tuple of {len(old)}, got {new!r}; write e.g. {name}=\"{old!r}\""
        bad = [why for o, n in zip(old, new) if (why := check_value(name, o, n))]
        return bad[0] if bad else None
    if isinstance(old, str) and not isinstance(new, str):
        return f"{name} is text, got {new!r}; write e.g. {name}={old}"
    return None


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
                b = offsets[(v.end_lineno or v.lineno) - 1] + (v.end_col_offset or 0)  # always set by ast.parse
                edits.append((a, b, _source_value(overrides[name])))
                missing.discard(name)
    if missing:
        raise KeyError(f"constants not in the hyperparameter block: {sorted(missing)}")
    for a, b, new in sorted(edits, reverse=True):
        # Keep the `# comment` column where it was: the padding before it absorbs the value's change in length.
        line_end = body.find("\n", b)
        pad = re.match(r"[ \t]+(?=#)", body[b:line_end if line_end >= 0 else len(body)])
        tail = b
        if pad:
            width = len(pad.group())
            new += " " * max(width - (len(new) - (b - a)), min(width, 2))
            tail = b + width
        body = body[:a] + new + body[tail:]
    return text[:start] + body + text[end:]


def top_level(text: str) -> dict[str, str]:
    """A train file's top-level definitions in file order: name -> its source (functions, classes,
    assigned names; imports and the `if __name__` guard are not definitions). ValueError on a syntax error."""
    try:
        tree = ast.parse(text)
    except SyntaxError as e:
        raise ValueError(f"train file does not parse (line {e.lineno}: {e.msg})") from e
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
        else:
            continue
        source = "".join(ast.get_source_segment(text, d) or "" for d in getattr(node, "decorator_list", []))
        for name in names:
            out[name] = source + (ast.get_source_segment(text, node) or "")
    return out


def changed_names(before: str, after: str) -> list[str]:
    """The top-level names whose definition differs between two versions of a train file (changed,
    added or removed), in the order of `after` then the removed ones. Comments between definitions,
    blank lines and imports do not count."""
    a, b = top_level(before), top_level(after)
    return [n for n in b if a.get(n) != b[n]] + [n for n in a if n not in b]
