"""
What an exported forward may compute (engines.opsets, engines.pt2check, engines.mlxcheck):
honest graphs and common research edits export and pass, real exports on the CPU; anything
beyond pure tensor operators is refused with one line naming the operator.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from test_artifact import SMALL, Built

T = 8   # sequence length of the small hand-written models


def _targets(pt2: Path) -> set[str]:
    zf = zipfile.ZipFile(pt2)
    doc = zf.read(next(n for n in zf.namelist() if n.endswith("models/model.json"))).decode()
    return {part.split('"', 1)[0] for part in doc.split('"target": "')[1:]}


def _retarget(pt2: bytes, old: str, new: str) -> bytes:
    """The archive with every node calling `old` calling `new` instead (what a hostile train file can write)."""
    src, buf = zipfile.ZipFile(io.BytesIO(pt2)), io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            content = src.read(name)
            if name.endswith("models/model.json"):
                content = content.replace(f'"target": "{old}"'.encode(), f'"target": "{new}"'.encode())
            dst.writestr(name, content)
    return buf.getvalue()


# =========================================================================== torch


def torch_model(kind: str):
    """A tiny LM whose forward is one research edit (or one forbidden trick)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    V, C, E = 32, 16, 4

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head, self.router = nn.Embedding(V, C), nn.Linear(C, V), nn.Linear(C, E)
            self.experts = nn.ModuleList(nn.Linear(C, C) for _ in range(E))
            self.drop = nn.Dropout(0.5)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, idx):
            x = self.drop(self.emb(idx))
            B, T_, _ = x.shape
            if kind == "moe":             # top-2 routing, index_add back
                flat = x.reshape(-1, C)
                w, ix = torch.topk(F.softmax(self.router(flat), -1), 2, dim=-1)
                out = torch.zeros_like(flat)
                for e, ex in enumerate(self.experts):
                    out = out + (w * (ix == e)).sum(-1, keepdim=True) * ex(flat)
                x = torch.zeros_like(flat).index_add(0, torch.arange(flat.shape[0]), out).view(B, T_, C)
            elif kind == "flat_head":     # view(B*T, C) head
                return self.head(x.view(B * T_, C)).view(B, T_, V)
            elif kind == "scatter":       # argmax routing with gather/scatter_add
                flat = x.reshape(-1, C)
                ix = torch.argmax(self.router(flat), -1)
                g = torch.gather(self.router(flat), 1, ix[:, None])
                rows = torch.arange(flat.shape[0])[:, None].expand(-1, C)
                x = torch.zeros_like(flat).scatter_add(0, rows, flat * g).view(B, T_, C)
            elif kind == "inplace":       # in-place ops on intermediates are fine
                x = x.clone()
                x.mul_(2.0)
            elif kind == "batch_split":   # Python that depends on the batch size cannot be one graph
                return torch.cat([self.head(c) for c in x.chunk(2, 0)], 0)
            elif kind == "tuple":
                return self.head(x), None
            elif kind == "buffer":        # state carried from call to call
                self.calls.add_(1)
                x = x + self.calls
            elif kind == "random":
                x = x + torch.rand_like(x)
            elif kind == "empty":         # uninitialized memory: whatever the evaluator freed
                x = x + 0 * torch.empty_like(x)
            return self.head(x)
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
@pytest.mark.parametrize("kind", ["moe", "flat_head", "scatter", "inplace", "tuple"])
def test_torch_research_edits_export_pass_and_match(kind: str, tmp_path: Path) -> None:
    import torch

    from engines.forward_file import export_forward, load_forward
    model = torch_model(kind)
    export_forward("cuda", model, model, tmp_path / "f.pt2", seq_len=T, batch_sizes=(1, 2, 4))
    loaded = load_forward("cuda", tmp_path / "f.pt2", "cpu")
    idx = torch.randint(0, 32, (4, T), dtype=torch.int32)
    with torch.no_grad():
        want = model(idx)
    want = want[0] if isinstance(want, tuple) else want
    assert torch.allclose(loaded(idx), want, atol=1e-5)


@pytest.mark.parametrize("kind, named", [("random", "aten.rand_like"), ("empty", "aten.empty_like"),
                                         ("buffer", "writes state")])
def test_torch_forwards_beyond_pure_compute_are_refused_by_name(kind: str, named: str, tmp_path: Path) -> None:
    from engines.forward_file import ArtifactError, export_forward
    model = torch_model(kind)
    with pytest.raises(ArtifactError) as e:
        export_forward("cuda", model, model, tmp_path / "f.pt2", seq_len=T)
    message = str(e.value)
    assert named in message and message.startswith("INVALID:") and "train file" in message and "\n" not in message
    assert not (tmp_path / "f.pt2").exists()


def test_a_batch_dependent_forward_gets_a_one_line_fail(tmp_path: Path) -> None:
    from engines.forward_file import ArtifactError, export_forward
    model = torch_model("batch_split")
    with pytest.raises(ArtifactError) as e:
        export_forward("cuda", model, model, tmp_path / "f.pt2", seq_len=T)
    assert str(e.value).startswith("FAIL:") and "batch size" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
def test_pt2check_refuses_file_reading_and_in_place_ops_written_into_an_archive(tmp_path: Path) -> None:
    from engines.pt2check import ArtifactError, check_pt2
    path = tmp_path / "good.pt2"
    Built("cuda").export(path)
    good = path.read_bytes()
    assert check_pt2(good)
    for op in ("from_file", "_assert_async", "add_", "save", "bernoulli", "as_strided"):
        with pytest.raises(ArtifactError) as e:
            check_pt2(_retarget(good, "torch.ops.aten.embedding.default", f"torch.ops.aten.{op}.default"))
        assert f"aten.{op}," in str(e.value) and "\n" not in str(e.value), op
    with pytest.raises(ArtifactError, match="not an ATen op"):
        check_pt2(_retarget(good, "torch.ops.aten.embedding.default", "torch.ops.higher_order.flex_attention"))


def test_shape_expressions_allow_arithmetic_only() -> None:
    from engines.pt2check import ArtifactError, check_expression
    s = "Symbol('s95', positive=True, integer=True)"
    for ok in (f"Mul(Integer(8), {s})", f"Add(Mul(Integer(-1), {s}), Integer(3))", f"FloorDiv({s}, 2)"):
        check_expression(ok)
    for bad in ("__import__('os').system('x')", f"Mul({s}, exec)", "Function('f')(1)", "os.getpid()"):
        with pytest.raises(ArtifactError):
            check_expression(bad)


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
def test_sliding_window_layers_export_with_sdpa_when_the_kernel_is_flex(tmp_path: Path) -> None:
    """On a GPU without FA3 the engine picks FlexAttention for the short-window layers; the artifact
    must still export (flex fails in torch.export.save, and the allow-list refuses its HOP)."""
    import torch

    from engines import torch_attention
    from engines.forward_file import load_forward
    cpu = torch.device("cpu")
    built = Built("cuda")   # window_pattern "SL": one sliding-window layer
    try:
        assert torch_attention.prepare_attention(SMALL["sequence_len"], [SMALL["sequence_len"] // 2], cpu,
                                                 kernel="flex") == "flex"
        idx = torch.randint(0, SMALL["vocab_size"], (2, SMALL["sequence_len"]), dtype=torch.int32)
        with torch.no_grad():
            eager = built.model(idx)   # the flex path itself
        built.export(tmp_path / "f.pt2")
        assert not any("flex" in t for t in _targets(tmp_path / "f.pt2"))
        got = load_forward("cuda", tmp_path / "f.pt2", "cpu")(idx)
        assert torch.allclose(got, eager, atol=1e-4), (got - eager).abs().max()
    finally:
        torch_attention.prepare_attention(SMALL["sequence_len"], [], cpu, kernel="sdpa")


# =========================================================================== MLX


def mlx_model(kind: str, seq_len: int = T):
    import mlx.core as mx
    import mlx.nn as nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head, self.drop = nn.Embedding(32, 16), nn.Linear(16, 32), nn.Dropout(0.5)
            # constants that are strided views: a transposed table, an array of a sliced numpy array
            self.table = mx.array(np.arange(16 * seq_len, dtype=np.float32).reshape(16, seq_len) / 100).T
            self.other = mx.array(np.arange(seq_len * 32, dtype=np.float32).reshape(seq_len, 32)[:, ::2] / 100)

        def __call__(self, idx):
            x = self.drop(self.emb(idx)) + self.table + self.other
            if kind == "random":
                x = x + mx.random.normal(x.shape)
            out = self.head(x)
            return (out, None) if kind == "tuple" else out
    mx.random.seed(0)
    model = Tiny()
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("kind", ["plain", "tuple"])
def test_mlx_export_is_the_eval_mode_forward_with_its_constants_intact(kind: str, tmp_path: Path) -> None:
    import mlx.core as mx

    from engines.forward_file import export_forward, load_forward
    model = mlx_model(kind)
    model.train(True)
    export_forward("mlx", model, model, tmp_path / "f.mlxfn", seq_len=T, batch_sizes=(1, 2))
    assert model.training   # the caller's mode is restored
    model.train(False)
    idx = mx.array(np.random.default_rng(0).integers(0, 32, (2, T)), dtype=mx.int32)
    want = model(idx)
    want = want[0] if isinstance(want, tuple) else want
    got = load_forward("mlx", tmp_path / "f.mlxfn")(idx)
    assert np.allclose(np.array(got), np.array(want), atol=1e-5)


def test_mlx_random_draws_are_refused_by_primitive_name(tmp_path: Path) -> None:
    from engines.forward_file import ArtifactError, export_forward
    model = mlx_model("random")
    with pytest.raises(ArtifactError) as e:
        export_forward("mlx", model, model, tmp_path / "f.mlxfn", seq_len=T, batch_sizes=(1,))
    assert "RandomBits" in str(e.value) and str(e.value).startswith("INVALID:") and "\n" not in str(e.value)


def test_mlx_allow_list_reads_every_primitive_of_an_honest_gpt(tmp_path: Path) -> None:
    import mlx.core as mx

    from engines.mlxcheck import check_mlx_graph, primitives
    from engines.opsets import MLX_PRIMITIVES
    built = Built("mlx")
    built.export(tmp_path / "f.mlxfn", batch_sizes=(1, 2))
    imported = mx.import_function(str(tmp_path / "f.mlxfn"))
    names = primitives(imported(mx.zeros((1, SMALL["sequence_len"]), dtype=mx.int32)))
    assert {"Matmul", "Softmax", "Load", "Gather"} <= names <= MLX_PRIMITIVES
    check_mlx_graph(imported, (1, 2), SMALL["sequence_len"])


def test_mlx_custom_function_exports_or_gets_a_one_line_refusal(tmp_path: Path) -> None:
    """MLX versions differ on whether a custom function (with its own vjp) exports; either way the
    train file sees one line, never a traceback, and what exports computes the same."""
    import mlx.core as mx

    from engines.forward_file import ArtifactError, export_forward, load_forward

    @mx.custom_function
    def double(x):
        return 2 * x

    @double.vjp
    def double_vjp(primals, cotangent, output):
        return 2 * cotangent

    model = mlx_model("plain")
    model.train(False)
    forward = lambda idx: double(model(idx))  # noqa: E731
    try:
        export_forward("mlx", forward, model, tmp_path / "f.mlxfn", seq_len=T, batch_sizes=(1,))
    except ArtifactError as e:
        assert str(e).startswith("FAIL:") and "custom_function" in str(e) and "\n" not in str(e)
        return
    idx = mx.zeros((1, T), dtype=mx.int32)
    assert np.allclose(np.array(load_forward("mlx", tmp_path / "f.mlxfn")(idx)), np.array(forward(idx)), atol=1e-5)


# =========================================================================== the pre-flight


@pytest.mark.e2e  # seconds of real compute: kept out of the quick unit tier
@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_check_export_passes_an_honest_model_and_stops_a_bad_one_in_one_line(backend: str, data_env: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from engines import get_engine
    from engines.run import check_export
    monkeypatch.setenv("ARUN_DEVICE", "cpu")
    engine = get_engine(backend)
    built = Built(backend)
    built.model.train(True)
    assert check_export(engine, built.model) >= 0
    assert built.model.training
    bad = mlx_model("random", SMALL["sequence_len"]) if backend == "mlx" else torch_model("random")
    with pytest.raises(SystemExit) as e:
        check_export(engine, bad)
    assert str(e.value.code).startswith("INVALID:") and "\n" not in str(e.value.code)
