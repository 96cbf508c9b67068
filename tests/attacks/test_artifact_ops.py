"""
Attacks on what the artifact may do, through the real harness (tiny models, 2 s budgets):
the evaluator reads the val rows, so a forward that could read a file there could read
them. torch.from_file cannot even be traced by torch.export (it has no fake kernel), so
the closest an agent gets is to write the node into the archive by hand after
finish_run; and an MLX forward can only reach primitives MLX's importer knows, of which
it tries the one that is not pure (a random draw). Each ends invalid, nothing kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from arun.core.experiment import run_experiment
from arun.core.ledger import Ledger
from arun.core.ratchet import best_record
from helpers_repo import inject, make_project

BUDGET = 2.0

# After the real export: every embedding node of the archive now calls aten.from_file, and the
# archive is zipped back in place, as a train file paid to read the val rows would do it.
REWRITE_TO_FROM_FILE = '''
import os as _os, zipfile as _zf, io as _io
_path = _os.environ["ARUN_ARTIFACT"]
_src, _buf = _zf.ZipFile(_io.BytesIO(open(_path, "rb").read())), _io.BytesIO()
with _zf.ZipFile(_buf, "w") as _dst:
    for _n in _src.namelist():
        _c = _src.read(_n)
        if _n.endswith("models/model.json"):
            _c = _c.replace(b'"torch.ops.aten.embedding.default"', b'"torch.ops.aten.from_file.default"')
        _dst.writestr(_n, _c)
open(_path, "wb").write(_buf.getvalue())
'''


class Project:
    def __init__(self, root: Path, train_file: str, backend: str):
        self.repo, self.train_file, self.backend = root, train_file, backend
        self.clean = (root / train_file).read_text()
        self.baseline = self.run(None)
        assert self.baseline["status"] == "keep", self.baseline

    def run(self, text: str | None) -> dict:
        if text is not None:
            (self.repo / self.train_file).write_text(text)
        return run_experiment(self.repo, self.backend, "attack", budget=BUDGET, show_progress=False,
                              log=lambda s: None, device="cpu" if self.backend == "cuda" else None)

    def assert_refused(self, rec: dict, named: str) -> None:
        assert rec["status"] == "invalid", rec
        assert named in (rec.get("error") or ""), rec.get("error")
        records = [r for p in sorted((self.repo / "bench").glob("*/ledger.jsonl")) for r in Ledger(p).records()]
        assert best_record(records, rec["key_id"])["id"] == self.baseline["id"]
        assert (self.repo / self.train_file).read_text() == self.clean
        assert not list((self.repo / rec["run_dir"]).glob("forward*")), "a refused forward was left on disk"


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> Iterator[dict]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in dict(ARUN_CACHE=str(tiny_cache), ARUN_DATA_DIR=str(tiny_data), ARUN_DEVICE="cpu",
                                OMP_NUM_THREADS="1").items():
            mp.setenv(name, value)
        made = {}
        for train_file, backend in (("train_cuda.py", "cuda"), ("train_mlx.py", "mlx")):
            root = tmp_path_factory.mktemp(f"ops-{backend}") / "repo"
            make_project(root, train_file, overrides={"COMPILE": False})
            made[backend] = Project(root, train_file, backend)
        yield made


def test_a_torch_artifact_rewritten_to_read_a_file_is_refused_before_scoring(projects: dict) -> None:
    project = projects["cuda"]
    rec = project.run(inject(project.clean, "    train()", REWRITE_TO_FROM_FILE))
    project.assert_refused(rec, "aten.from_file")
    assert rec.get("val_bpb") is None


def test_an_mlx_forward_that_draws_random_numbers_stops_at_the_pre_flight(projects: dict) -> None:
    project = projects["mlx"]
    text = project.clean.replace("def train() -> None:", "_REAL_CALL = GPT.__call__\n"
                                 "GPT.__call__ = lambda self, idx: _REAL_CALL(self, idx) + 0.1 * mx.random.normal((1,))\n\n\n"
                                 "def train() -> None:", 1)
    rec = project.run(text)
    project.assert_refused(rec, "RandomBits")
    log = (project.repo / "run.log").read_text()
    assert "Export check" not in log and not re.search(r"^step \d+", log, re.M), \
        "the refusal came after training, not at the pre-flight"
