"""The harness's layers, read off the source: which arun modules each module imports (at any depth
in the file), no loops, and no arrow back up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each layer may import besides itself (cli, at the top, imports anything).
ALLOWED = {"core": set(), "report": {"core"}, "search": {"core", "report"}, "swarm": {"core", "search", "report"}}


def arun_imports(path: Path) -> set[str]:
    """The arun modules a file imports, as arun.<layer>.<module> (or arun.<module> at the top)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "arun":
            parts = node.module.split(".")
            out.update(node.module if len(parts) == 3 else f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "arun")
    return out


def graph() -> dict[str, set[str]]:
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in (ROOT / "arun").rglob("*.py")
            if p.name != "__init__.py"}
    return {m: {d for d in arun_imports(p) if d in mods and d != m} for m, p in mods.items()}


def test_layers_import_only_downwards() -> None:
    for mod, deps in graph().items():
        layer = mod.split(".")[1]
        if layer not in ALLOWED:
            continue
        for dep in deps:
            other = dep.split(".")[1]
            assert other == layer or other in ALLOWED[layer], f"{mod} imports {dep}: {layer} may not import {other}"


def test_no_import_loops() -> None:
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in g[m]:
            assert state.get(d) != 1, "import loop: " + " -> ".join(path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in g:
        if m not in state:
            visit(m, [m])

