"""
The model crosses the boundary as data: a trained forward exported by the framework's own
exporter (.mlxfn / .pt2) is scored by `python -m engines.score`, a process that never runs
the train file.

Round trips: the artifact's logits equal the in-process forward, and the scorer's val_bpb
equals engines.evaluator.evaluate_bpb on the same weights, for both engines.
Attacks on the artifact: a model that looks ahead, a stateful model, broken files, and
.pt2 archives that would run code inside torch.export.load.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
LEAK = 5.0   # logits added to the next token: a cheat worth far more than any real gain
ENGINES = ["mlx", "cuda"]


def load_train_file(name: str):
    """The model class as the train file defines it, loaded by path (the scorer never does this)."""
    spec = importlib.util.spec_from_file_location(f"train_under_test_{name.split('.')[0]}", REPO / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while GPTConfig is built
    spec.loader.exec_module(module)
    return module


class Built:
    """A tiny GPT from a train file with trained-looking weights, and its forward."""

    def __init__(self, backend: str):
        self.backend = backend
        if backend == "cuda":
            import torch
            mod = load_train_file("train_cuda.py")
            torch.manual_seed(0)
            self.model = mod.GPT(mod.GPTConfig(**SMALL))
            self.model.init_weights()
            with torch.no_grad():   # init zeroes the output projections, which would hide an attention leak
                for p in self.model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            self.model.eval()
        else:
            import mlx.core as mx
            from mlx.utils import tree_map
            mod = load_train_file("train_mlx.py")
            # The CPU-only matmul tricks (cpu_linear: a custom function over several streams, and
            # mx.contiguous) cannot be exported; the Apple-GPU code path is plain MLX and exports.
            mod.ON_CPU = False
            mx.random.seed(0)
            self.model = mod.GPT(mod.GPTConfig(**SMALL))
            self.model.init_weights()
            self.model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), self.model.parameters()))
            mx.eval(self.model.parameters())

    def honest(self, idx):
        return self.model(idx)

    def lookahead(self, idx):
        """Adds LEAK to the logit of the token that comes next: the target, read from the input."""
        logits = self.model(idx)
        V = logits.shape[-1]
        if self.backend == "cuda":
            import torch
            nxt = torch.roll(idx, -1, dims=1).long()
            return logits + LEAK * torch.nn.functional.one_hot(nxt, V).to(logits.dtype)
        import mlx.core as mx
        nxt = mx.roll(idx, -1, axis=1)
        return logits + LEAK * (mx.arange(V)[None, None, :] == nxt[..., None]).astype(logits.dtype)

    def export(self, path: Path, forward=None, **kw) -> dict:
        from engines.forward_file import export_forward
        return export_forward(self.backend, forward or self.honest, self.model, path, seq_len=SMALL["sequence_len"], **kw)

    def to_device(self, x: np.ndarray):
        from engines import get_engine
        return get_engine(self.backend).to_device(x)

    def numpy(self, a) -> np.ndarray:
        from engines import get_engine
        return get_engine(self.backend).to_numpy(a)


class Stateful:
    """Causal for its first `honest_calls` calls (a probe's), looking ahead afterwards."""

    def __init__(self, built: Built, honest_calls: int = 2):
        self.built, self.calls, self.honest_calls = built, 0, honest_calls

    def __call__(self, idx):
        self.calls += 1
        return self.built.honest(idx) if self.calls <= self.honest_calls else self.built.lookahead(idx)


@pytest.fixture
def env(data_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    return data_env


def val_data(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from prepare import PreparedData
    data = PreparedData(data_dir)
    return data.val_rows(), data.token_bytes()


def in_process_bpb(built: Built, forward, data_dir: Path) -> float:
    from engines import get_engine
    from engines.evaluator import evaluate_bpb
    rows, token_bytes = val_data(data_dir)
    return evaluate_bpb(get_engine(built.backend), forward, 16, rows, token_bytes).val_bpb


def run_scorer(backend: str, artifact: Path, data_dir: Path, out: Path, *extra: str) -> tuple[int, dict, str]:
    """`python -m engines.score` in a real subprocess, from outside the repo."""
    cmd = [sys.executable, "-m", "engines.score", "--backend", backend, "--artifact", str(artifact),
           "--data-dir", str(data_dir), "--out", str(out), "--device", "cpu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out.parent)
    verdict = json.loads(out.read_text()) if out.exists() else {}
    return proc.returncode, verdict, proc.stdout + proc.stderr


# =========================================================================== round trips


@pytest.mark.parametrize("backend", ENGINES)
def test_artifact_matches_the_in_process_forward_and_score(backend: str, env: Path, tmp_path: Path) -> None:
    from engines.fingerprint import fixed_code_sha256
    from engines.forward_file import BATCH_LADDER, load_forward
    built = Built(backend)
    path = tmp_path / f"forward{'.mlxfn' if backend == 'mlx' else '.pt2'}"
    meta = built.export(path)
    assert meta["bytes"] == path.stat().st_size and len(meta["sha256"]) == 64
    assert meta["contract"]["batch_sizes"] == list(BATCH_LADDER) and meta["contract"]["seq_len"] == 64

    loaded = load_forward(backend, path, "cpu")
    assert loaded.sha256 == meta["sha256"]
    rows, _ = val_data(env)
    for b in (1, 3 if backend == "cuda" else 4):   # torch: any batch up to the ladder's top; MLX: ladder sizes
        x = built.to_device(rows[:b, :-1])
        np.testing.assert_allclose(built.numpy(loaded(x)), built.numpy(built.honest(x)), rtol=1e-5, atol=1e-5)

    rc, verdict, out = run_scorer(backend, path, env, tmp_path / "verdict.json")
    assert rc == 0, out
    expected = in_process_bpb(built, built.honest, env)
    assert abs(verdict["val_bpb"] - expected) <= 1e-4 * expected, (verdict["val_bpb"], expected)
    assert verdict["causality"]["ok"] and verdict["causality"]["max_diff"] <= verdict["causality"]["tolerance"]
    assert verdict["causality"]["rows"] >= len(rows) and verdict["causality"]["cuts_sha256"]   # every scored row probed
    assert verdict["sealed"], verdict.get("seal")   # (this machine has Landlock: the artifact ran sealed)
    assert verdict["artifact_sha256"] == meta["sha256"]
    assert verdict["fixed_code_sha256"] == fixed_code_sha256(REPO)
    assert verdict["tokens"] > 0 and verdict["bytes"] > 0 and verdict["split"] == "val"
    assert set(verdict["seconds"]) == {"load", "probe", "eval"}


# =========================================================================== attacks on the artifact


@pytest.mark.parametrize("backend", ENGINES)
def test_a_model_that_looks_ahead_is_refused(backend: str, env: Path, tmp_path: Path) -> None:
    built = Built(backend)
    assert in_process_bpb(built, built.lookahead, env) < 0.9 * in_process_bpb(built, built.honest, env)  # a real cheat
    path = tmp_path / "cheat.bin"
    built.export(path, built.lookahead)
    rc, verdict, out = run_scorer(backend, path, env, tmp_path / "verdict.json")
    assert rc != 0, out
    assert "looks ahead" in verdict["error"] and "\n" not in verdict["error"]
    assert "val_bpb" not in verdict and verdict["causality"]["ok"] is False


@pytest.mark.parametrize("backend", ENGINES)
def test_a_stateful_model_is_frozen_by_export(backend: str, env: Path, tmp_path: Path) -> None:
    """
    Export traces the forward: the Python counter runs at trace time and the graph keeps
    whichever branch it took, with no state left. So the artifact either always looks ahead
    (and the probe, which runs the same graph the evaluation runs, catches it) or never does
    (and it scores exactly as the honest model). Both are shown:
    - `warmed`: the model first passes an in-process probe (its two honest calls, the hole
      this design closes), then is exported looking ahead -> the scorer refuses it;
    - `fresh`: exported at once -> torch traces it once, honestly; MLX traces once per
      batch size on the ladder, the first ones honestly and the rest looking ahead, and the
      scorer probes and scores one and the same trace, so it is either refused or honest.
    """
    built = Built(backend)
    honest_bpb = in_process_bpb(built, built.honest, env)
    rows, _ = val_data(env)

    warmed = Stateful(built)
    for _ in range(2):   # the two calls of an in-process probe (the old hole: it passed them)
        warmed(built.to_device(rows[:4, :-1].astype(np.int32)))
    built.export(tmp_path / "warmed.bin", warmed)
    rc, verdict, out = run_scorer(backend, tmp_path / "warmed.bin", env, tmp_path / "warmed.json")
    assert rc != 0 and "looks ahead" in verdict["error"], out

    built.export(tmp_path / "fresh.bin", Stateful(built))
    rc, verdict, out = run_scorer(backend, tmp_path / "fresh.bin", env, tmp_path / "fresh.json")
    if rc == 0:
        assert abs(verdict["val_bpb"] - honest_bpb) <= 1e-4 * honest_bpb, (verdict["val_bpb"], honest_bpb)
    else:
        assert "looks ahead" in verdict["error"], out
    if backend == "cuda":
        assert rc == 0, out   # one trace, taken on the first (honest) call


@pytest.mark.parametrize("backend", ENGINES)
def test_broken_artifacts_get_a_one_line_error(backend: str, env: Path, tmp_path: Path) -> None:
    from engines.score import main
    good = tmp_path / "good.bin"
    Built(backend).export(good)
    data = good.read_bytes()
    cases = {"truncated": data[: len(data) // 2], "garbage": b"not an artifact\n" * 64, "empty": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for name in [*cases, "missing"]:
        out = tmp_path / f"{name}.json"
        rc = main(["--backend", backend, "--artifact", str(tmp_path / name), "--data-dir", str(env),
                   "--out", str(out), "--device", "cpu"])
        verdict = json.loads(out.read_text())
        assert rc != 0, name
        assert verdict["error"] and "\n" not in verdict["error"] and "val_bpb" not in verdict, (name, verdict)


@pytest.mark.parametrize("backend", ENGINES)
def test_the_test_split_is_scored_like_val(backend: str, env: Path, tmp_path: Path) -> None:
    """One artifact, both splits: each verdict equals the in-process evaluation of its own rows."""
    from engines import get_engine
    from engines.evaluator import evaluate_bpb
    from prepare import PreparedData
    built = Built(backend)
    path = tmp_path / f"forward{'.mlxfn' if backend == 'mlx' else '.pt2'}"
    built.export(path)
    data = PreparedData(env)
    got = {}
    for split, rows in (("val", data.val_rows()), ("test", data.test_rows())):
        rc, verdict, out = run_scorer(backend, path, env, tmp_path / f"{split}.json", "--split", split)
        assert rc == 0, out
        assert verdict["split"] == split and verdict["causality"]["ok"]
        other = "test" if split == "val" else "val"
        assert f"{other}_bpb" not in verdict and f"{split}_bpb {verdict[f'{split}_bpb']:.6f}" in out
        expected = evaluate_bpb(get_engine(backend), built.honest, 16, rows, data.token_bytes()).val_bpb
        assert abs(verdict[f"{split}_bpb"] - expected) <= 1e-4 * expected, (split, verdict, expected)
        got[split] = verdict[f"{split}_bpb"]
    assert abs(got["val"] - got["test"]) > 1e-4, got   # different documents, a different number


def test_an_unknown_split_is_not_scored(env: Path, tmp_path: Path) -> None:
    from engines.score import main
    out = tmp_path / "v.json"
    assert main(["--backend", "cuda", "--artifact", str(tmp_path / "x.pt2"), "--data-dir", str(env),
                 "--out", str(out), "--split", "train"]) == 1
    error = json.loads(out.read_text())["error"]
    assert "--split val or --split test" in error and "\n" not in error


# =========================================================================== .pt2 archives that would run code


def _rewrite(pt2: bytes, edit) -> bytes:
    """A copy of the archive with edit(name, bytes) -> bytes | None applied to every member (None drops it)."""
    src, buf = zipfile.ZipFile(io.BytesIO(pt2)), io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            content = edit(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
    return buf.getvalue()


def _edit_json(suffix: str, change):
    def edit(name: str, content: bytes):
        if not name.endswith(suffix):
            return content
        doc = json.loads(content)
        change(doc)
        return json.dumps(doc).encode()
    return edit


def _first_node(doc: dict) -> dict:
    return doc["graph_module"]["graph"]["nodes"][0]


def test_pt2_archives_that_would_run_code_are_refused(env: Path, tmp_path: Path) -> None:
    from engines.forward_file import ArtifactError
    from engines.pt2check import check_pt2
    path = tmp_path / "good.pt2"
    Built("cuda").export(path)
    good = path.read_bytes()
    assert check_pt2(good)["format"] == "arun-forward/1"

    def add_member(name: str, payload: bytes) -> bytes:
        buf = io.BytesIO(good)
        with zipfile.ZipFile(buf, "a") as z:
            root = z.namelist()[0].split("/")[0]
            z.writestr(f"{root}/{name}", payload)
        return buf.getvalue()

    attacks = {
        # ExportedProgram.module() exec()s guards_code
        "guard code": _rewrite(good, _edit_json("models/model.json",
                                                lambda d: d.__setitem__("guards_code", ["__import__('os').getpid() > 0"]))),
        # node targets resolve by getattr from `torch`: torch.os.system would be called
        "non-ATen op": _rewrite(good, _edit_json("models/model.json",
                                                 lambda d: _first_node(d).__setitem__("target", "torch.os.system"))),
        # shape expressions go through sympy.sympify, i.e. eval()
        "sympify": _rewrite(good, _edit_json("models/model.json", lambda d: d.__setitem__(
            "range_constraints", {"__import__('os').getpid()": {"min_val": 1, "max_val": 2}}))),
        # payloads marked use_pickle are read with torch.load(weights_only=False)
        "pickled weight": _rewrite(good, _edit_json("model_weights_config.json", lambda d: [
            m.__setitem__("use_pickle", True) for m in d["config"].values()])),
        # opaque constants are read with pickle.loads
        "opaque object": add_member("data/constants/opaque_obj_0", b"cos\nsystem\n."),
        # the pre-2.8 format is a set of torch.load pickles
        "legacy member": add_member("serialized_state_dict.pt", b"x"),
    }
    for name, archive in attacks.items():
        with pytest.raises(ArtifactError) as e:
            check_pt2(archive)
        assert "\n" not in str(e.value), name


@pytest.mark.unit
def test_fixed_code_fingerprint(tmp_path: Path) -> None:
    from engines.fingerprint import fixed_code_sha256, fixed_files
    (tmp_path / "engines").mkdir()
    (tmp_path / "prepare.py").write_text("x = 1\n")
    (tmp_path / "engines" / "a.py").write_text("a = 1\n")
    (tmp_path / "engines" / "notes.md").write_text("not code\n")
    (tmp_path / "train_mlx.py").write_text("agent code\n")
    assert fixed_files(tmp_path) == ["engines/a.py", "prepare.py"]   # arun_data/ is absent: skipped
    first = fixed_code_sha256(tmp_path)
    (tmp_path / "train_mlx.py").write_text("other agent code\n")
    (tmp_path / "engines" / "notes.md").write_text("edited\n")
    assert fixed_code_sha256(tmp_path) == first
    seen = {first}
    for change in (lambda: (tmp_path / "engines" / "a.py").write_text("a = 2\n"),
                   lambda: (tmp_path / "arun_data").mkdir(),
                   lambda: (tmp_path / "arun_data" / "build.py").write_text(""),
                   lambda: (tmp_path / "engines" / "a.py").rename(tmp_path / "engines" / "b.py")):
        change()
        seen.add(fixed_code_sha256(tmp_path))
    assert len(seen) == 4   # the empty folder alone adds no file and no change
    assert fixed_files(tmp_path) == ["arun_data/build.py", "engines/b.py", "prepare.py"]
