"""arun.search.sweep: minimal edits of the hyperparameter block, ladders, deduplication, and TPE learning."""

from __future__ import annotations

import difflib
import hashlib
import math
from pathlib import Path

import pytest

from arun.core.trainfile import constants
from arun.search.sweep import Sweep, SweepError, make_dims, parse_block, plausible, safe_eval, scored_shas

REPO = Path(__file__).resolve().parents[1]

TEXT = '''"""A train file."""
import os

# --- hyperparameters ---
# Model
DEPTH = 4                # layers
ASPECT_RATIO = 64        # width per layer
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"  # S = half, L = full
TOTAL_BATCH_SIZE = 2**16 # tokens per step
DEVICE_BATCH_SIZE = 16
MATRIX_LR = 0.04         # Muon
EMBEDDING_LR = 0.6
WEIGHT_DECAY = 0.2
ADAM_BETAS = (0.8, 0.95) # Adam betas
WARMDOWN_RATIO = 0.5
FINAL_LR_FRAC = 0.0
SEED = 42
WARMUP_STEPS = 3
EVAL_BATCH_SIZE = 16
COMPILE = True
# --- end hyperparameters ---

def train():
    DEPTH = 99  # not in the block: never touched
'''


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def changed_lines(a: str, b: str) -> list[tuple[str, str]]:
    sm = difflib.SequenceMatcher(None, a.splitlines(), b.splitlines())
    out = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op != "equal":
            out += list(zip(a.splitlines()[i1:i2], b.splitlines()[j1:j2]))
    return out


def test_parse_block_finds_values_and_their_exact_source_spans() -> None:
    cs = parse_block(TEXT)
    assert cs["TOTAL_BATCH_SIZE"].value == 65536 and cs["TOTAL_BATCH_SIZE"].pow_form
    assert [lit.source for lit in cs["ADAM_BETAS"].literals] == ["0.8", "0.95"]
    for c in cs.values():
        for lit in c.literals:
            assert TEXT[lit.start:lit.end] == lit.source
    assert "train" not in cs and cs["DEPTH"].value == 4
    assert safe_eval(__import__("ast").parse("3 * 2**10", mode="eval").body) == 3072


def test_the_sweep_leaves_the_timer_seed_eval_and_compile_alone() -> None:
    keys = {d.key for d in make_dims(parse_block(TEXT))}
    assert not keys & {"SEED", "WARMUP_STEPS", "EVAL_BATCH_SIZE", "COMPILE"}
    assert {"DEPTH", "MATRIX_LR", "ADAM_BETAS[0]", "ADAM_BETAS[1]", "WINDOW_PATTERN", "TOTAL_BATCH_SIZE"} <= keys


def test_every_ladder_respects_its_kind() -> None:
    dims = {d.key: d for d in make_dims(parse_block(TEXT))}
    def values(d):
        return list(d.grid) if d.kind == "choice" else [d.value(x) for x in range(d.lo, d.hi + 1)]
    for key in ("ASPECT_RATIO", "HEAD_DIM", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"):
        assert all(v >= 1 and v & (v - 1) == 0 for v in values(dims[key])), key   # powers of two stay so
    assert set(values(dims["WINDOW_PATTERN"])) == {"L", "SL", "SSL", "SSSL"}
    assert values(dims["DEPTH"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(0 < v < 1 for v in values(dims["ADAM_BETAS[1]"]))
    assert all(0 <= v <= 0.9 for v in values(dims["FINAL_LR_FRAC"]))
    lr = values(dims["MATRIX_LR"])
    assert lr == sorted(lr) and 0.04 in lr and all(math.isclose(b / a, 2 ** 0.5, rel_tol=0.02) for a, b in zip(lr, lr[1:]))
    for d in dims.values():  # every value maps back onto its own coordinate
        for v in values(d):
            assert d.value(d.coord(v)) == v, (d.key, v)


def test_proposals_are_minimal_edits_with_a_readable_description() -> None:
    sweep = Sweep(seed=3)
    seen = set()
    for i in range(25):
        new, desc = sweep.propose_text(TEXT, [{"status": "keep"}] * i)  # different history -> different draws
        assert desc.startswith("sweep: ")
        notes = desc[len("sweep: "):].split(", ")
        assert 1 <= len(notes) <= 2
        lines = changed_lines(TEXT, new)
        assert 1 <= len(lines) <= 2
        for old, line in lines:
            # Only the value changed: the name, the comment and the column layout before it are intact.
            name = old.split("=")[0]
            assert line.startswith(name) and line.split("#")[1:] == old.split("#")[1:]
        c = constants(new)
        assert c["SEED"] == 42 and c["COMPILE"] is True and c["EVAL_BATCH_SIZE"] == 16
        assert c["WINDOW_PATTERN"] in {"L", "SL", "SSL", "SSSL"}
        new_total = parse_block(new)["TOTAL_BATCH_SIZE"]
        assert new_total.pow_form and new_total.literals[0].source.startswith("2**")
        for n in notes:
            seen.add(n.split(" ")[0])
        compile(new, "train.py", "exec")
    assert len(seen) >= 5  # it explores many constants, not one


def test_a_tuple_is_edited_element_wise() -> None:
    sweep = Sweep(seed=0)
    text = TEXT.replace("(0.8, 0.95) # Adam betas", "(0.8,  0.95) # Adam betas")
    for i in range(60):
        new, desc = sweep.propose_text(text, [{"status": "keep"}] * i)
        if "ADAM_BETAS" in desc:
            line = next(line for line in new.splitlines() if line.startswith("ADAM_BETAS"))
            assert line.endswith(") # Adam betas") and ",  " in line  # the odd spacing survives
            assert len(parse_block(new)["ADAM_BETAS"].value) == 2
            return
    pytest.fail("ADAM_BETAS was never proposed in 60 draws")


def _variant(window: str) -> str:
    return "# --- hyperparameters ---\nWINDOW_PATTERN = \"" + window + "\"\n# --- end hyperparameters ---\n"


def test_a_train_file_already_scored_is_never_proposed_again() -> None:
    text = _variant("L")
    records = [{"status": s, "train_sha256": sha(_variant(w)), "config": {"WINDOW_PATTERN": w}, "val_bpb": v}
               for s, w, v in (("discard", "SL", 1.2), ("crash", "SSL", None))]
    records.append({"status": "invalid", "train_sha256": sha(_variant("SSSL"))})  # never ran: may be proposed
    sweep = Sweep(seed=1, max_tries=40)
    for i in range(5):
        new, desc = sweep.propose_text(text, records + [{"status": "keep"}] * i)
        assert new == _variant("SSSL") and desc == 'sweep: WINDOW_PATTERN "L" -> "SSSL"'
    records[-1]["status"] = "discard"
    assert scored_shas(records) == {sha(_variant(w)) for w in ("SL", "SSL", "SSSL")}
    with pytest.raises(SweepError, match="no unscored configuration"):
        sweep.propose_text(text, records)


def test_batch_sizes_that_cannot_run_are_not_proposed() -> None:
    assert plausible({"TOTAL_BATCH_SIZE": 512, "DEVICE_BATCH_SIZE": 16}, 64)
    assert plausible({"TOTAL_BATCH_SIZE": 1024, "DEVICE_BATCH_SIZE": 16}, 64) is None
    text = ("# --- hyperparameters ---\nTOTAL_BATCH_SIZE = 512\nDEVICE_BATCH_SIZE = 8\n"
            "# --- end hyperparameters ---\n")
    sweep = Sweep(seed=2)
    for i in range(20):
        new, _ = sweep.propose_text(text, [{"status": "keep"}] * i, seq_len=64)
        c = constants(new)
        assert c["TOTAL_BATCH_SIZE"] % (c["DEVICE_BATCH_SIZE"] * 64) == 0


def test_tpe_learns_the_direction_that_helped_from_the_ledger() -> None:
    """A ledger where a higher MATRIX_LR scored better: TPE's proposals go up, not down."""
    text = "# --- hyperparameters ---\nMATRIX_LR = 0.04\n# --- end hyperparameters ---\n"
    dim = make_dims(parse_block(text))[0]
    records = []
    for rep in range(3):
        for k in range(dim.lo, dim.hi + 1):
            v = dim.value(k)
            records.append({"status": "discard", "val_bpb": 1.0 - 0.01 * k + 0.001 * rep,
                            "config": {"MATRIX_LR": v}, "train_sha256": f"{k}-{rep}"})
    up = down = 0
    for seed in range(20):
        new, _ = Sweep(seed=seed).propose_text(text, records)
        v = constants(new)["MATRIX_LR"]
        up += v > 0.04
        down += v < 0.04
    assert up >= 15 and up > 3 * down, (up, down)


def test_the_projects_train_files_can_be_swept() -> None:
    for name in ("train_cuda.py", "train_mlx.py"):
        path = REPO / name
        if not path.exists():
            continue
        text = path.read_text()
        new, desc = Sweep(seed=0).propose_text(text, [])
        compile(new, name, "exec")
        assert desc.startswith("sweep: ") and len(changed_lines(text, new)) in (1, 2)
