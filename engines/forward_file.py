"""
The model crosses the boundary as data. A train file's output that counts is its
forward exported by the framework's own exporter, a pure function with its weights:

    int32 token ids (B, T)  ->  logits (B, T, V)

MLX: mx.export_function -> .mlxfn (a graph of MLX primitives and constant arrays).
PyTorch: torch.export -> .pt2 (an ATen graph, weights stored as raw tensor bytes).

Export traces the forward once per input shape, so whatever Python state the train
file keeps is frozen into the graph at export time: the function the evaluator's
causality probe sees is the function it scores.

Which shapes an artifact accepts. T is fixed (the prepared data's sequence length).
The batch size belongs to the evaluator: it picks one from BATCH_LADDER by memory and
uses it for the probe and the evaluation alike, so the artifact must accept every size
on the ladder.
- torch: one graph with a dynamic batch Dim (1..max of the ladder).
- MLX: one trace per ladder size (mx.exporter), weights stored once. shapeless=True
  is no option: the GPT's reshapes and the attention slices are traced with constant
  sizes, so a shapeless import fails ("Slice cannot infer output shapes") or, worse,
  could silently compute with the traced sizes. Each trace is its own graph, so a
  forward could behave differently per batch size; the evaluator therefore probes the
  very trace it scores with.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.opsets import FORWARD_RULES
from engines.pt2check import CONTRACT_FILE, ArtifactError, check_pt2

FORMAT = "arun-forward/1"
BATCH_LADDER: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
SUFFIX: dict[str, str] = {"mlx": ".mlxfn", "cuda": ".pt2"}
# The largest forward that crosses the boundary: far above any model a run trains in its budget
# (a 1.5B-parameter fp32 model), small enough that a copy cannot fill the disk.
MAX_ARTIFACT_BYTES = 6 * 2**30


def read_artifact(path: Path) -> bytes:
    """The bytes of a regular file, opened without following a symlink and without blocking on a fifo,
    at most MAX_ARTIFACT_BYTES; ArtifactError (one line) for anything else."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror or e}); it must be a regular file the "
                            f"run exported (not a symlink)") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path}: the artifact is not a regular file; export it with export_forward")
        if st.st_size > MAX_ARTIFACT_BYTES:
            raise ArtifactError(f"{path}: the artifact has {st.st_size} bytes, more than the limit "
                                f"{MAX_ARTIFACT_BYTES} (engines.forward_file.MAX_ARTIFACT_BYTES)")
        data = f.read(MAX_ARTIFACT_BYTES + 1)
    if len(data) > MAX_ARTIFACT_BYTES:
        raise ArtifactError(f"{path}: the artifact grew past {MAX_ARTIFACT_BYTES} bytes while it was read")
    return data


@dataclass
class LoadedForward:
    """An imported artifact: call it with a device int32 array (B, T), get logits (B, T, V)."""
    fn: Callable[[Any], Any]
    contract: dict
    sha256: str
    bytes: int
    batch_sizes: tuple[int, ...] = field(default=())

    def __call__(self, idx: Any) -> Any:
        return self.fn(idx)


def _contract(backend: str, seq_len: int, batch_sizes: Sequence[int]) -> dict:
    return {"format": FORMAT, "backend": backend, "input": {"dtype": "int32", "shape": ["B", seq_len]},
            "output": {"dtype": "float", "shape": ["B", seq_len, "V"]}, "seq_len": seq_len,
            "batch_sizes": sorted(set(int(b) for b in batch_sizes))}


def _sha256(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def export_forward(backend: str, forward: Callable, model: Any, path: Path, *, seq_len: int,
                   batch_sizes: Sequence[int] = BATCH_LADDER) -> dict:
    """
    Writes `forward` (token ids -> logits) with the weights it uses to `path`, by the framework's
    exporter, and returns its metadata: sha256, bytes, seconds and the input shape contract.
    `model` owns the weights (an mlx.nn.Module or torch.nn.Module; torch lifts its parameters
    into the program's state dict). The file is written next to `path` and renamed into place.
    """
    if backend not in SUFFIX:
        raise ArtifactError(f"unknown backend {backend!r}; choose one of: {', '.join(SUFFIX)}")
    if seq_len < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ArtifactError(f"seq_len={seq_len}, batch_sizes={list(batch_sizes)}: need a positive length and batch sizes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contract = _contract(backend, seq_len, batch_sizes)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # keeps the suffix torch.export.save checks for
    t0 = time.perf_counter()
    try:
        if backend == "mlx":
            _export_mlx(forward, model, tmp, contract)
        else:
            _export_torch(forward, model, tmp, contract)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    data = path.read_bytes()
    return {"path": str(path), "sha256": _sha256(data), "bytes": len(data), "seconds": seconds, "contract": contract}


def first_output(out: Any) -> Any:
    """The tuple rule, the same for both engines: a forward may return (logits, ...) and the
    first element is what is exported; anything else that is not one array is refused."""
    if isinstance(out, (tuple, list)):
        if not out:
            raise ArtifactError("INVALID: the forward returns an empty tuple; return the logits (B, T, V) "
                                f"({FORWARD_RULES})")
        out = out[0]
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ArtifactError(f"INVALID: the forward returns {type(out).__name__}, not an array of logits; "
                            f"return the logits (B, T, V) or a tuple whose first element they are ({FORWARD_RULES})")
    return out


def _contiguous_arrays(model: Any) -> None:
    """MLX writes a constant's raw buffer as if it were row-contiguous, so a constant that is a strided
    view (a transposed weight, an mx.array of a sliced numpy array) would be read back scrambled. Every
    array the model holds, parameters or plain attributes, is replaced by a contiguous copy first."""
    import mlx.core as mx
    held = []
    for module in model.modules():
        for name, value in list(module.items()):      # parameters and other arrays, "_"-names included
            if isinstance(value, mx.array):
                module[name] = mx.contiguous(value)
                held.append(module[name])
        for name, value in list(vars(module).items()):  # arrays kept as plain attributes
            if isinstance(value, mx.array):
                setattr(module, name, mx.contiguous(value))
                held.append(getattr(module, name))
    mx.eval(held)


def _export_mlx(forward: Callable, model: Any, path: Path, contract: dict) -> None:
    import mlx.core as mx

    from engines.mlxcheck import check_mlx_graph
    training = bool(getattr(model, "training", False))
    if model is not None and hasattr(model, "parameters"):
        _contiguous_arrays(model)   # also evaluates: no lazy graph of the init crosses over
        model.train(False)          # dropout off, as torch's model.eval(): the export is what is scored

    def pure(idx):
        return first_output(forward(idx))

    try:
        with mx.exporter(str(path), pure, metadata=json.dumps(contract)) as trace:
            for b in contract["batch_sizes"]:
                trace(mx.zeros((b, contract["seq_len"]), dtype=mx.int32))
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(f"FAIL: mx.export_function cannot export this forward ({_first_line(e)}); change the "
                            f"forward in the train file: plain MLX ops only, no mx.custom_function, streams or "
                            f"mx.contiguous ({FORWARD_RULES})") from e
    finally:
        if model is not None and hasattr(model, "train"):
            model.train(training)
    check_mlx_graph(mx.import_function(str(path)), contract["batch_sizes"], contract["seq_len"])


def _export_torch(forward: Callable, model: Any, path: Path, contract: dict) -> None:
    import torch
    from torch.export import Dim

    from engines.torch_attention import exporting


    class Forward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model                   # registers the weights: they become the program's state
            object.__setattr__(self, "_fn", forward)  # the callable itself is traced, never stored

        def forward(self, idx):
            return first_output(self._fn(idx))

    params = list(model.parameters()) if model is not None else []
    device = params[0].device if params else torch.device("cpu")
    # an example batch of 2: torch specializes sizes 0 and 1, so a batch of 1 would pin the Dim
    example = torch.zeros((2, contract["seq_len"]), dtype=torch.int32, device=device)
    batch = Dim("batch", min=1, max=max(contract["batch_sizes"]))
    try:
        with torch.no_grad(), exporting():
            program = torch.export.export(Forward(), (example,), dynamic_shapes={"idx": {0: batch}}, strict=False)
            # functional form: in-place ops on intermediates become pure ones, and a write to a buffer
            # or to the input becomes a graph output pt2check can see and refuse
            program = program.run_decompositions({})
        torch.export.save(program, str(path), extra_files={CONTRACT_FILE: json.dumps(contract)})
    except Exception as e:  # torch.export raises many types; the first line says which op or guard
        if "Constraints violated (batch)" in str(e):
            raise ArtifactError(f"FAIL: torch.export: the forward's Python depends on the batch size (the artifact "
                                f"must accept every batch of 1..{max(contract['batch_sizes'])}); change the forward in "
                                f"the train file to treat the batch as one dimension: no chunk, split, slice or loop "
                                f"over dim 0 ({FORWARD_RULES})") from e
        raise ArtifactError(f"FAIL: torch.export cannot export this forward ({type(e).__name__}: "
                            f"{_first_line(e)}); change the forward in the train file: no data-dependent "
                            f"Python control flow, no custom kernels, attention through "
                            f"engines.torch_attention or SDPA ({FORWARD_RULES})") from e
    check_pt2(path.read_bytes())  # the evaluator refuses what this refuses: say so now, in the train process


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def load_forward(backend: str, path: Path, device: str | None = None, data: bytes | None = None) -> LoadedForward:
    """
    Imports an artifact without running any code from it: the file is read once (its sha256 is
    of exactly the bytes loaded), checked, and handed to the framework's importer. `device`:
    torch 'cpu' or 'cuda' (the program is moved there); MLX 'cpu' or 'gpu' (None: MLX's default).
    data: the artifact's bytes, already read (the evaluator reads them before it seals itself).
    """
    path = Path(path)
    if data is None:
        data = read_artifact(path)
    if not data:
        raise ArtifactError(f"{path}: empty artifact file; the run's export did not finish")
    if backend == "mlx":
        fn, contract = _load_mlx(data, device)
    elif backend == "cuda":
        fn, contract = _load_torch(data, device)
    else:
        raise ArtifactError(f"unknown backend {backend!r}; choose one of: {', '.join(SUFFIX)}")
    if contract.get("format") != FORMAT or contract.get("backend") != backend:
        raise ArtifactError(f"{path}: not an {FORMAT} artifact for the {backend} engine "
                            f"(says format={contract.get('format')!r}, backend={contract.get('backend')!r})")
    sizes = tuple(int(b) for b in contract.get("batch_sizes", ()))
    return LoadedForward(fn, contract, _sha256(data), len(data), sizes)


def _load_mlx(data: bytes, device: str | None) -> tuple[Callable, dict]:
    # .mlxfn is a graph of MLX primitives and constant arrays, read by MLX's C++ importer:
    # there is no Python in it to run. import_function takes a path, so the bytes we hashed are
    # written to a private in-memory file first (the artifact on disk may change under us; this
    # copy cannot). A memfd lies outside every folder, so a sealed evaluator (engines.sandbox.
    # seal_self, which denies every path) still opens it through /proc/self/fd.
    import mlx.core as mx
    if device is not None:
        mx.set_default_device(mx.gpu if device in ("gpu", "cuda") else mx.cpu)
    with _private_file(data) as private:
        try:
            imported, metadata = mx.import_function(private, return_metadata=True)
        except (RuntimeError, ValueError) as e:
            raise ArtifactError(f"not a readable .mlxfn ({str(e).splitlines()[0][:160]}); re-export the forward") from e
    try:
        contract = json.loads(metadata or "{}")
    except json.JSONDecodeError as e:
        raise ArtifactError(f"the .mlxfn metadata is not the contract JSON ({e.msg}); re-export with export_forward") from e

    from engines.mlxcheck import check_mlx_graph
    check_mlx_graph(imported, contract.get("batch_sizes") or (), int(contract.get("seq_len") or 0))

    def fn(idx):
        return imported(idx)[0]
    return fn, contract


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path to a private copy of `data`: a memfd where the OS has them, else a file in a private folder."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("forward.mlxfn", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="arun-artifact-") as tmp:
        private = Path(tmp) / "forward.mlxfn"
        private.write_bytes(data)
        yield str(private)


def _load_torch(data: bytes, device: str | None) -> tuple[Callable, dict]:
    # What torch.export.load (torch 2.13) would execute on load, and why check_pt2 runs first:
    # load_pt2 unpickles tensor payloads marked use_pickle (torch.load(weights_only=False)), opaque
    # constants (pickle.loads) and torchbind objects; the sample inputs go through torch.load with a
    # fallback to weights_only=False; symbolic shape strings go through sympy.sympify, which calls
    # eval(); and ExportedProgram.module() exec()s the program's guards_code and resolves node
    # targets by getattr from `torch`, `math` or `operator` (so "torch.os.system" would be called).
    # check_pt2 allows only raw tensor payloads, ATen ops, plain shape guards and plain symbol
    # expressions, and makes sure the weights_only sample-input load succeeds (no fallback), so the
    # remaining load path deserializes JSON and raw tensor bytes only.
    import torch


    contract = check_pt2(data)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # a malformed archive can raise anything; one line says what
        raise ArtifactError(f"not a loadable .pt2 ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]}); "
                            f"re-export the forward") from e
    weights = list(program.state_dict.values()) + list(program.constants.values())
    if device is not None and any(w.device.type != torch.device(device).type for w in weights):
        from torch.export.passes import move_to_device_pass
        program = move_to_device_pass(program, device)
    module = program.module()

    def fn(idx):
        with torch.no_grad():
            return module(idx)
    return fn, contract
