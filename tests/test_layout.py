"""The import graph of the repo's own modules, read with ast: the fixed part never imports
the harness, and no module imports itself back through others (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("arun", "arun_data", "engines")
FIXED = ("prepare", "arun_data", "engines")  # and every train_*.py


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_files() -> dict[str, Path]:
    files = [REPO / "prepare.py", *sorted(REPO.glob("train_*.py"))]
    for pkg in PACKAGES:
        files += sorted(p for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return {_module_name(p): p for p in files}


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":` runs only as a script, so its imports are not part of the graph."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _imported_names(name: str, path: Path) -> set[str]:
    """Every module named by an import anywhere in the file (top level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    body = [n for n in tree.body if not _is_main_block(n)]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in (n for top in body for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    files = _project_files()
    return {m: {t for t in _imported_names(m, p) if t in files and t != m} for m, p in files.items()}, files


def _is_fixed(module: str) -> bool:
    return module.split(".")[0] in FIXED or module.startswith("train_")


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _describe(cycle: list[str], files: dict[str, Path]) -> str:
    return " -> ".join(str(files[m].relative_to(REPO)) for m in cycle)


def test_fixed_part_never_imports_the_harness() -> None:
    files = _project_files()
    bad = []
    for m, p in files.items():
        names = _imported_names(m, p)
        harness = {t for t in names if t == "arun" or t.startswith("arun.")}
        # `from arun.x import y` also yields arun.x.y: name only the module the line imports from
        bad += [f"{p.relative_to(REPO)} imports {t}" for t in sorted(harness)
                if _is_fixed(m) and t.rpartition(".")[0] not in harness]
    assert not bad, "the fixed part imports the harness: " + "; ".join(bad)


def test_fixed_part_has_no_import_cycle() -> None:
    graph, files = _graph()
    fixed = {m: {t for t in ts if _is_fixed(t)} for m, ts in graph.items() if _is_fixed(m)}
    cycle = _find_cycle(fixed)
    assert cycle is None, f"import cycle: {_describe(cycle, files)}"


def test_project_has_no_import_cycle() -> None:
    graph, files = _graph()
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle: {_describe(cycle, files)}"
