"""
Attacks on the boundary: real train files run through the harness (run_experiment, tiny models,
2 s budgets). The number of record comes from the evaluator process scoring the exported forward,
so whatever the train file does to itself, its claims or its output, the record holds the
evaluator's number, nothing is kept that should not be, and the best is unchanged.

The tests of each engine share one project (a module fixture) and run in file order: the honest
baseline first, then one attack per test, each restored to the baseline by the harness.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from arun.core import confine
from arun.core.experiment import run_experiment
from arun.core.forward_store import path_for
from arun.core.ledger import Ledger
from arun.core.ratchet import best_record
from helpers_repo import inject, load_module, make_project

BUDGET = 2.0
FAST = {"COMPILE": False}
FROZEN = {"EMBEDDING_LR": 0.0, "UNEMBEDDING_LR": 0.0, "MATRIX_LR": 0.0, "SCALAR_LR": 0.0}  # an untrained model
SAVE_WEIGHTS = '''
import os as _os
from pathlib import Path as _Path
from engines.weights import save_checkpoint as _save
_run = _Path(_os.environ["ARUN_RESULT_JSON"]).parent.name
(_Path(_os.environ["ARUN_TEST_WEIGHTS_DIR"]) / _run).mkdir(parents=True, exist_ok=True)
_save(model, _Path(_os.environ["ARUN_TEST_WEIGHTS_DIR"]) / _run / "weights.npz")
'''


class Project:
    """A user's project on one engine, with its honest baseline's record."""

    def __init__(self, root: Path, train_file: str, backend: str):
        self.repo, self.train_file, self.backend = root, train_file, backend
        self.clean = (root / train_file).read_text()
        self.baseline: dict | None = None

    def run(self, text: str | None = None, **kw) -> dict:
        """The train file (edited to `text`) through the harness; the record."""
        if text is not None:
            (self.repo / self.train_file).write_text(text)
        kw.setdefault("device", "cpu" if self.backend == "cuda" else None)
        return run_experiment(self.repo, self.backend, "attack", budget=BUDGET, show_progress=False,
                              log=lambda s: None, **kw)

    def with_constants(self, values: dict) -> str:
        from arun.core.trainfile import rewrite_constants
        return rewrite_constants(self.clean, values)

    def records(self) -> list[dict]:
        return [r for p in sorted((self.repo / "bench").glob("*/ledger.jsonl")) for r in Ledger(p).records()]

    def assert_not_kept(self, rec: dict) -> None:
        """Nothing kept, the best unchanged, the train file back at the best commit, no fake summary."""
        assert rec["status"] != "keep", rec
        best = best_record(self.records(), rec["key_id"])
        assert best is not None and best["id"] == self.baseline["id"]
        assert (self.repo / self.train_file).read_text() == self.clean
        assert rec["train_sha256"] and (self.repo / ".arun" / "attempts" / f"{rec['train_sha256']}.py").exists()
        assert not list((self.repo / rec["run_dir"]).glob("forward*")), "a non-kept forward was left on disk"
        assert_summary_is_the_harness(self.repo / "run.log", rec)


def assert_summary_is_the_harness(log: Path, rec: dict) -> None:
    """Every `^val_bpb:` line in run.log is the harness's, with the evaluator's number; none after a failure."""
    lines = [ln for ln in log.read_text().splitlines() if re.match(r"^val_bpb:", ln)]
    if rec.get("val_bpb") is None:
        assert lines == [], lines
    else:
        assert lines == [f"val_bpb:          {rec['val_bpb']:.6f}"], lines


def in_process_bpb(project: Project, rec: dict) -> float:
    """engines.evaluator on the model itself, rebuilt here from the run's saved weights (no patches)."""
    from engines import get_engine
    from engines.evaluator import evaluate_bpb
    from engines.weights import import_weights, inference
    from prepare import PreparedData
    weights_path = Path(os.environ["ARUN_TEST_WEIGHTS_DIR"]) / Path(rec["run_dir"]).name / "weights.npz"
    config = json.loads(weights_path.with_suffix(".json").read_text())["config"]
    with np.load(weights_path) as npz:
        weights = {k: npz[k] for k in npz.files}
    mod = load_module(project.repo / project.train_file, f"attack_train_{project.backend}_{rec['id'][-4:]}")
    engine = get_engine(project.backend)
    model = mod.GPT(mod.GPTConfig(**config))
    model.init_weights()
    import_weights(model, weights)
    data = PreparedData.open()
    return evaluate_bpb(engine, inference(engine, model, model), 16, data.val_rows(), data.token_bytes()).val_bpb


def make(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path, train_file: str,
         backend: str, mp: pytest.MonkeyPatch) -> Project:
    for name, value in dict(ARUN_CACHE=str(tiny_cache), ARUN_DATA_DIR=str(tiny_data), ARUN_DEVICE="cpu",
                            OMP_NUM_THREADS="1").items():
        mp.setenv(name, value)  # for this module's tests only
    # The honest baseline saves its weights for the in-process comparison outside its run folder, which
    # the harness prunes to its own names after every run: a folder granted to the run explicitly.
    weights = tmp_path_factory.mktemp(f"weights-{backend}")
    mp.setenv("ARUN_TEST_WEIGHTS_DIR", str(weights))
    mp.setenv("ARUN_SANDBOX_EXTRA_WRITE", str(weights))
    root = tmp_path_factory.mktemp(f"attack-{backend}") / "repo"
    make_project(root, train_file, overrides=FAST)
    project = Project(root, train_file, backend)
    rec = project.run(inject(project.clean, "finish_run(ENGINE", SAVE_WEIGHTS, before=True))
    project.baseline = rec
    project.clean = (root / train_file).read_text()   # the kept file: every attack starts from it
    return project


@pytest.fixture(scope="module")
def mlx_project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> Iterator[Project]:
    with pytest.MonkeyPatch.context() as mp:
        yield make(tmp_path_factory, tiny_data, tiny_cache, "train_mlx.py", "mlx", mp)


@pytest.fixture(scope="module")
def torch_project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> Iterator[Project]:
    with pytest.MonkeyPatch.context() as mp:
        yield make(tmp_path_factory, tiny_data, tiny_cache, "train_cuda.py", "cuda", mp)


# =========================================================================== honest controls

@pytest.mark.parametrize("engine", ["mlx", "torch"])
def test_an_honest_run_is_kept_and_scored_like_the_model_itself(engine: str, request: pytest.FixtureRequest) -> None:
    project: Project = request.getfixturevalue(f"{engine}_project")
    rec = project.baseline
    assert rec["status"] == "keep" and rec["baseline"] and not rec.get("error"), rec
    assert path_for(project.repo, project.backend, rec["artifact_sha256"]).exists()
    assert "claimed_val_bpb" not in rec   # an honest run claims nothing
    assert rec["charged_seconds"] is not None and rec["allowance_seconds"] == 60.0
    expected = in_process_bpb(project, rec)
    assert abs(rec["val_bpb"] - expected) <= 1e-4 * expected, (rec["val_bpb"], expected)
    assert_summary_is_the_harness(project.repo / "run.log", rec)


# =========================================================================== patching at import

def test_patching_the_engine_adapter_at_import_changes_nothing(mlx_project: Project) -> None:
    text = inject(mlx_project.with_constants(FROZEN), "from engines.mlx import ENGINE",
                  "ENGINE.token_nats = (lambda f: (lambda logits, y: 0.01 * f(logits, y)))(ENGINE.token_nats)")
    assert_scored_honestly(mlx_project, mlx_project.run(text))


def test_patching_a_framework_function_at_import_changes_nothing(torch_project: Project) -> None:
    text = inject(torch_project.with_constants(FROZEN), "from engines.cuda import ENGINE",
                  "import torch.nn.functional as _F\n"
                  "_F.cross_entropy = (lambda f: (lambda *a, **k: 0.01 * f(*a, **k)))(_F.cross_entropy)")
    assert_scored_honestly(torch_project, torch_project.run(text))


def assert_scored_honestly(project: Project, rec: dict) -> None:
    """The patch never reached the evaluator: the record holds the honest score of the run's weights."""
    assert rec["status"] == "discard", rec
    honest = in_process_bpb(project, rec)
    assert abs(rec["val_bpb"] - honest) <= 1e-4 * honest
    project.assert_not_kept(rec)


# =========================================================================== models that look ahead

LOOKAHEAD = '''
_honest = forward
def forward(idx):
    logits = _honest(idx)
    nxt = mx.roll(idx, -1, axis=1)
    return logits + 5.0 * (mx.arange(logits.shape[-1])[None, None, :] == nxt[..., None]).astype(logits.dtype)
'''

STATEFUL = '''
_honest, _calls = forward, [0]
def forward(idx):
    _calls[0] += 1
    logits = _honest(idx)
    if _calls[0] <= 2:
        return logits
    nxt = mx.roll(idx, -1, axis=1)
    return logits + 5.0 * (mx.arange(logits.shape[-1])[None, None, :] == nxt[..., None]).astype(logits.dtype)
'''


@pytest.mark.parametrize("cheat", [LOOKAHEAD, STATEFUL], ids=["one-token-lookahead", "causal-for-its-first-calls"])
def test_a_forward_that_looks_ahead_is_invalid(mlx_project: Project, cheat: str) -> None:
    rec = mlx_project.run(inject(mlx_project.clean, "finish_run(ENGINE", cheat, before=True))
    assert rec["status"] == "invalid" and "the evaluator refused" in rec["error"], rec["error"]
    assert rec["val_bpb"] is None
    mlx_project.assert_not_kept(rec)


# =========================================================================== claims

FAKE_CLAIM = '''
_train = train
def train():
    _train()
    import json as _json
    _path = os.environ["ARUN_RESULT_JSON"]
    _result = _json.load(open(_path))
    _result["val_bpb"] = 0.1
    _json.dump(_result, open(_path, "w"))
    print("val_bpb: 0.100000")
'''


def test_a_written_result_json_and_printed_summary_are_only_claims(mlx_project: Project) -> None:
    text = inject(mlx_project.with_constants(FROZEN), 'if __name__ == "__main__":', FAKE_CLAIM, before=True)
    rec = mlx_project.run(inject(text, "import time", "import os"))
    assert rec["status"] == "discard" and rec["claimed_val_bpb"] == 0.1 and rec["val_bpb"] > 1.0, rec
    assert "train| val_bpb: 0.100000" in (mlx_project.repo / "run.log").read_text()
    mlx_project.assert_not_kept(rec)


REEXPORT_BEST = '''
_train = train
def train():
    _train()
    import json as _json, shutil as _shutil
    _best = sorted(Path(".arun/artifacts").glob("*.mlxfn"))[0]
    _shutil.copyfile(_best, os.environ["ARUN_ARTIFACT"])
    _path = os.environ["ARUN_RESULT_JSON"]
    _result = _json.load(open(_path))
    _result["val_bpb"] = 0.5
    _json.dump(_result, open(_path, "w"))
'''


def test_reloading_the_best_forward_with_a_lower_claim_is_not_an_improvement(mlx_project: Project,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    text = inject(mlx_project.with_constants(FROZEN), 'if __name__ == "__main__":', REEXPORT_BEST, before=True)
    text = inject(text, "import time", "import os\nfrom pathlib import Path")
    if confine.state()[0]:  # confined: the stored forwards are out of reach
        rec = mlx_project.run(text)
        assert rec["status"] == "crash" and "Permission denied" in rec["error"] and ".arun" in rec["error"], rec
        mlx_project.assert_not_kept(rec)
    # and where nothing confines the run, the evaluator's number still decides
    monkeypatch.setattr(confine, "state", lambda: (False, "turned off for this test"))
    rec = mlx_project.run(text)
    assert rec["status"] == "discard" and rec["claimed_val_bpb"] == 0.5, rec
    assert rec["val_bpb"] == pytest.approx(mlx_project.baseline["val_bpb"], rel=1e-9)  # the harness's number
    mlx_project.assert_not_kept(rec)


# =========================================================================== time

def test_training_booked_as_warmup_is_charged(mlx_project: Project) -> None:
    # four extra seconds inside the first (uncounted) step: training past the budget, booked as warm-up
    text = inject(mlx_project.clean, "budget.start_step()", "time.sleep(4.0) if budget.step == 0 else None")
    rec = mlx_project.run(text, allowance=1.0)
    assert rec["status"] == "invalid" and "charged" in rec["error"], rec
    assert re.search(r"charged \d+\.\d+s", rec["error"])
    mlx_project.assert_not_kept(rec)


# =========================================================================== fake summary lines

def test_a_printed_summary_then_exit_leaves_no_val_bpb_line(mlx_project: Project) -> None:
    text = inject(mlx_project.clean, "def train(", "print('val_bpb:          0.100000')\nraise SystemExit(0)", body=True)
    rec = mlx_project.run(text)
    assert rec["status"] == "crash" and rec["val_bpb"] is None, rec
    assert rec["claimed_val_bpb"] == 0.1
    mlx_project.assert_not_kept(rec)
