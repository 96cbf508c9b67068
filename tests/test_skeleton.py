"""
train_mlx.py and train_cuda.py share one skeleton, so a winner found on one engine ports to the
other by name: the same top-level names (constants, functions, classes) in the same order, the
same hyperparameter block and the same section headings. Parsed with ast; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from arun.core.trainfile import changed_names, constants, top_level

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
FILES = ("train_mlx.py", "train_cuda.py")


def first_difference(a: list[str], b: list[str]) -> str | None:
    """Where two name lists part, in words naming both files' entries there; None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i + 1}: {FILES[0]} has {x!r}, {FILES[1]} has {y!r}"
    if len(a) != len(b):
        longer, extra = (FILES[0], a[len(b):]) if len(a) > len(b) else (FILES[1], b[len(a):])
        return f"only {longer} defines {extra[0]!r} (at position {min(len(a), len(b)) + 1})"
    return None


def sections(text: str) -> list[str]:
    """The `# ----` banner headings (GPT model, Optimizer, Training)."""
    return re.findall(r"^# -{10,}\n# (.+)\n# -{10,}$", text, flags=re.M)


def texts() -> list[str]:
    return [(REPO / f).read_text() for f in FILES]


def test_same_top_level_names_in_the_same_order() -> None:
    mlx, cuda = (list(top_level(t)) for t in texts())
    where = first_difference(mlx, cuda)
    assert where is None, f"the train files' skeletons differ at {where}; define the same names in the same order"


# Where the frameworks differ, and why (anything else must take the same arguments in both files).
SIGNATURE_DIFFERENCES = {
    "rope": "MLX's fused kernel builds the angles itself; torch passes the cos/sin tables",
    "MuonAdamW.__init__": "torch.optim takes tensors (and compiles its steps); the MLX class names them by path",
    "build_optimizer": "torch compiles the optimizer's steps itself; MLX compiles the update with the step",
}


def signatures(text: str) -> dict[str, list[str]]:
    """Argument names of the top-level functions and of each class's __init__."""
    out = {}
    for node in ast.parse(text).body:
        methods = [m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"] \
            if isinstance(node, ast.ClassDef) else [node] if isinstance(node, ast.FunctionDef) else []
        for fn in methods:
            name = node.name if fn is node else f"{node.name}.__init__"
            out[name] = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
    return out


def test_same_signatures_where_the_frameworks_allow() -> None:
    mlx, cuda = (signatures(t) for t in texts())
    differ = sorted(n for n in mlx if n in cuda and mlx[n] != cuda[n])
    unexplained = [f"{n}: {FILES[0]} ({', '.join(mlx[n])}), {FILES[1]} ({', '.join(cuda[n])})"
                   for n in differ if n not in SIGNATURE_DIFFERENCES]
    assert not unexplained, f"arguments differ: {'; '.join(unexplained)}; align them or say why in SIGNATURE_DIFFERENCES"
    assert set(SIGNATURE_DIFFERENCES) <= set(differ), "a listed difference is gone: drop it from SIGNATURE_DIFFERENCES"


def test_same_hyperparameter_block() -> None:
    mlx, cuda = (list(constants(t, keep_source=True)) for t in texts())
    where = first_difference(mlx, cuda)
    assert where is None, f"the hyperparameter blocks differ at {where}; keep the same constants in the same order"
    assert "EVAL_BATCH_SIZE" not in mlx  # the evaluator picks its own batch size


def test_same_sections() -> None:
    mlx, cuda = (sections(t) for t in texts())
    assert mlx == cuda == ["GPT model", "Optimizer: Muon for the block matrices, AdamW for everything else",
                           "Training"], f"sections differ: {FILES[0]} {mlx}, {FILES[1]} {cuda}"


def test_first_difference_names_both_sides() -> None:
    assert first_difference(["a", "b"], ["a", "b"]) is None
    assert first_difference(["a", "rope"], ["a", "apply_rotary_emb"]) == \
        "position 2: train_mlx.py has 'rope', train_cuda.py has 'apply_rotary_emb'"
    assert first_difference(["a"], ["a", "autocast_for"]) == "only train_cuda.py defines 'autocast_for' (at position 2)"


def test_changed_names_ignores_comments_and_imports() -> None:
    before = "import os\nA = 1  # a\n\n\ndef f(x):\n    return x\n\n\nclass C:\n    pass\n"
    after = "import sys\nA = 2  # a\n# a note\n\ndef f(x):\n    return x\n\n\ndef g():\n    pass\n"
    assert changed_names(before, after) == ["A", "g", "C"]


def test_transfer_names_what_a_code_change_touches_and_whether_it_ports_by_name(tmp_path: Path) -> None:
    """A winner on train_cuda.py (two real commits) that edits rope and the step, adds a helper and
    changes a constant: the code names are rope, make_train_step and the helper (the constant goes
    the constants' way), and on train_mlx.py the first two port by name, the helper does not."""
    from arun.core.trainfile import rewrite_constants
    from arun.search.transfer import code_names, describe_port, port_map
    from helpers_repo import empty_repo, git

    repo = empty_repo(tmp_path / "repo")
    text = (REPO / "train_cuda.py").read_text()
    (repo / "train_cuda.py").write_text(text)
    git(repo, "add", "train_cuda.py")
    git(repo, "commit", "-qm", "baseline")
    base = git(repo, "rev-parse", "HEAD").strip()
    won = rewrite_constants(text, {"MATRIX_LR": 0.05})
    won = won.replace("    d = x.shape[-1] // 2\n", "    d = x.shape[-1] // 2  # halves\n    x = x * 1.0\n", 1)
    won = won.replace("def make_train_step(", "def swiglu(x):\n    return x\n\n\ndef make_train_step(", 1)
    won = won.replace("        optimizer.step()\n", "        optimizer.step()\n        swiglu(None)\n", 1)
    (repo / "train_cuda.py").write_text(won)
    git(repo, "commit", "-qam", "the winner")
    best = git(repo, "rev-parse", "HEAD").strip()

    names = code_names(repo, {"commit": base, "train_file": "train_cuda.py"},
                       {"commit": best, "train_file": "train_cuda.py"})
    assert names == ["rope", "swiglu", "make_train_step"]
    ports = port_map(names, (REPO / "train_mlx.py").read_text())
    assert ports == {"rope": True, "swiglu": False, "make_train_step": True}
    assert describe_port(ports, "train_mlx.py") == ("rope, make_train_step (in train_mlx.py too: ports by name); "
                                                    "swiglu (not in train_mlx.py: new code to port)")
    # a commit that is not in this repository: the names are unknown, not empty
    assert code_names(repo, {"commit": "0" * 40, "train_file": "train_cuda.py"},
                      {"commit": best, "train_file": "train_cuda.py"}) is None


def test_arun_transfer_reports_which_names_port(tmp_path: Path, data_env: Path) -> None:
    """Through transfer() itself: a winner whose only change is code (rope edited, a helper added) runs
    nothing here without --agent, and says which names map onto train_mlx.py."""
    from arun.core.ledger import Ledger
    from arun.search.transfer import transfer
    from helpers_repo import git, make_project

    repo = tmp_path / "repo"
    base = make_project(repo, "train_cuda.py")
    text = (repo / "train_cuda.py").read_text()
    text = text.replace("    d = x.shape[-1] // 2\n", "    d = x.shape[-1] // 2  # halves\n    x = x * 1.0\n", 1)
    (repo / "train_cuda.py").write_text(text.replace("def make_train_step(", "def swiglu(x):\n    return x\n\n\n"
                                                                               "def make_train_step(", 1))
    git(repo, "commit", "-qam", "the winner")
    best = git(repo, "rev-parse", "HEAD")
    ledger = Ledger(repo / "bench" / "t" / "ledger.jsonl")
    common = {"tag": "t", "key_id": "k", "train_file": "train_cuda.py", "config": {"DEPTH": 1}}
    ledger.append({**common, "id": "base", "status": "keep", "baseline": True, "val_bpb": 3.0, "commit": base})
    ledger.append({**common, "id": "win", "status": "keep", "val_bpb": 2.9, "commit": best})
    said: list[str] = []
    out = transfer(repo, "t", "mlx", log=said.append)
    assert out.code_map == {"rope": True, "swiglu": False} and out.records == []
    line = "rope (in train_mlx.py too: ports by name); swiglu (not in train_mlx.py: new code to port)"
    assert f"arun transfer: its code change touches {line}" in said, said
    assert out.not_transferred[0].startswith(f"code change outside the constants touching {line}")
