"""The import rules of the project, in one table, checked against the source read with ast: the fixed
part never imports the harness, each harness layer imports only downwards, and nothing imports itself
back through others (no cycles)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("arun", "arun_data", "engines")
LAYERS = ("core", "report", "search", "swarm")  # arun's layers, lowest first

# Which groups each group's modules may import (a group always may import itself). "fixed" is the
# code an agent never edits: prepare.py, arun_data, engines and every train_*.py; "arun" is the top of
# the harness (cli), which may import anything.
MAY_IMPORT = {
    "fixed": set(),
    "arun.core": {"fixed"},
    "arun.report": {"fixed", "arun.core"},
    "arun.search": {"fixed", "arun.core", "arun.report"},
    "arun.swarm": {"fixed", "arun.core", "arun.report", "arun.search"},
    "arun": {"fixed", *(f"arun.{layer}" for layer in LAYERS)},
}


def group(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("prepare", "arun_data", "engines") or parts[0].startswith("train_"):
        return "fixed"
    return f"arun.{parts[1]}" if len(parts) > 1 and parts[1] in LAYERS else "arun"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
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


def imported_names(name: str, path: Path) -> set[str]:
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


def import_graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    files = project_files()
    return {m: {t for t in imported_names(m, p) if t in files and t != m} for m, p in files.items()}, files


def broken_rules(graph: dict[str, set[str]], files: dict[str, Path]) -> list[str]:
    """One line per import that MAY_IMPORT forbids. `from pkg.mod import x` also yields pkg.mod.x when x
    is a module: name only the module the line imports from."""
    bad = []
    for m, targets in sorted(graph.items()):
        mine = group(m)
        for t in sorted(targets):
            theirs = group(t)
            if theirs != mine and theirs not in MAY_IMPORT[mine] and t.rpartition(".")[0] not in targets:
                bad.append(f"{files[m].relative_to(REPO)} imports {t}: {mine} may not import {theirs}")
    return bad


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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


def test_every_module_has_a_group() -> None:
    assert set(map(group, project_files())) <= set(MAY_IMPORT)
    assert group("engines.score") == "fixed" and group("train_mlx") == "fixed"
    assert group("arun.search.loop") == "arun.search" and group("arun.cli") == "arun"


def test_imports_follow_the_rules() -> None:
    graph, files = import_graph()
    bad = broken_rules(graph, files)
    assert not bad, "imports against the rules in tests/test_imports.py:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    graph, files = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(str(files[m].relative_to(REPO)) for m in cycle)
