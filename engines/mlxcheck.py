"""
Checks an imported .mlxfn before anything of it runs: every primitive of every trace
(one per batch size of the contract) must be on the allow-list in engines.opsets.
MLX's importer only builds primitives its own serializer knows, none of which reads
files; the allow-list also keeps out random draws, custom kernels and distributed
communication, and names what it refuses.

The graph is read with MLX's own tools: calling the imported function builds the lazy
graph of that trace without evaluating it, and mx.export_to_dot lists its primitives.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Sequence
from typing import Any

from engines.opsets import FORWARD_RULES, MLX_PRIMITIVES
from engines.pt2check import ArtifactError

_LABEL = re.compile(r'label\s*=\s*"([^"]*)"')


def primitives(outputs: Sequence[Any]) -> set[str]:
    """The primitive names of the lazy graph that computes `outputs` (nothing is evaluated)."""
    import mlx.core as mx
    buf = io.StringIO()
    mx.export_to_dot(buf, *outputs)
    return {label.split(" ")[0] for label in _LABEL.findall(buf.getvalue())}


def check_mlx_graph(imported: Callable, batch_sizes: Sequence[int], seq_len: int) -> None:
    """Raises ArtifactError naming the first primitive of any trace that is not a pure tensor operation."""
    import mlx.core as mx
    for b in batch_sizes:
        try:
            outputs = imported(mx.zeros((int(b), int(seq_len)), dtype=mx.int32))
        except (RuntimeError, ValueError) as e:
            raise ArtifactError(f"INVALID: the .mlxfn has no trace for batch size {b} "
                                f"({str(e).splitlines()[0][:120]}); re-export with export_forward") from e
        refused = sorted(primitives(outputs) - MLX_PRIMITIVES)
        if refused:
            raise ArtifactError(f"INVALID: the exported forward uses the MLX primitive {refused[0]}, which is not on "
                                f"the allow-list of pure tensor operations (random draws, custom kernels and "
                                f"communication are refused); change the forward in the train file to avoid it "
                                f"({FORWARD_RULES})")
