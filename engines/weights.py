"""
A train file's model as fixed code sees it: its weights as a dict of float32 numpy
arrays under the model's own parameter names (upstream's PyTorch names, torch Linear
layout (out, in), in both engines), a checkpoint on disk, and an inference function.

The train file owns the model; this module only reads and writes its parameters, so
the same code serves every train file of a framework. torch and MLX are imported
lazily: either may be absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np


def is_torch(model: Any) -> bool:
    return any(c.__module__.startswith("torch.") for c in type(model).__mro__)


def export_weights(model: Any) -> dict[str, np.ndarray]:
    """float32 copies of every parameter, by name."""
    if is_torch(model):
        import torch
        # a copy: on the CPU, .numpy() would otherwise alias the live parameters
        return {name: p.detach().to("cpu", torch.float32, copy=True).numpy() for name, p in model.named_parameters()}
    import mlx.core as mx
    from mlx.utils import tree_flatten
    return {name: np.array(p.astype(mx.float32)) for name, p in tree_flatten(model.parameters())}


def _check_match(have: dict[str, tuple[int, ...]], weights: dict[str, np.ndarray]) -> None:
    missing, extra = sorted(set(have) - set(weights)), sorted(set(weights) - set(have))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}; "
                         f"was the checkpoint made with another config?")
    for name, shape in have.items():
        if tuple(np.shape(weights[name])) != tuple(shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(np.shape(weights[name]))} != model shape {tuple(shape)}")


def import_weights(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Loads export_weights' dict into a model of the same config, each parameter keeping its dtype and device."""
    if is_torch(model):
        import torch
        have = dict(model.named_parameters())
        _check_match({k: tuple(p.shape) for k, p in have.items()}, weights)
        with torch.no_grad():
            for name, p in have.items():
                p.copy_(torch.from_numpy(np.asarray(weights[name], dtype=np.float32)).to(p.device, p.dtype))
        return
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map_with_path
    have = dict(tree_flatten(model.parameters()))
    _check_match({k: tuple(p.shape) for k, p in have.items()}, weights)
    model.update(tree_map_with_path(lambda path, p: mx.array(np.asarray(weights[path], dtype=np.float32)).astype(p.dtype),
                                    model.parameters()))
    mx.eval(model.parameters())


def count_params(model: Any) -> int:
    if is_torch(model):
        return sum(p.numel() for p in model.parameters())
    from mlx.utils import tree_flatten
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def model_config(model: Any) -> dict:
    """The model's `config` dataclass as a dict (what rebuilds it), or {} for a model without one."""
    config = getattr(model, "config", None)
    return asdict(config) if is_dataclass(config) and not isinstance(config, type) else {}


def save_checkpoint(model: Any, path: Path | str) -> None:
    """npz of the float32 weights plus a sidecar JSON {"config": model_config(model)} beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object, so numpy does not append a second .npz
        np.savez(f, **export_weights(model))  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    path.with_suffix(".json").write_text(json.dumps({"config": model_config(model)}, indent=2))


def inference(engine: Any, model: Any, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """tokens -> logits for evaluation: on torch, eval mode, no autograd, bf16 autocast on a GPU (as in training)."""
    if not is_torch(model):
        return forward
    import torch
    model.eval()
    device = engine.device()
    autocast = torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def logits_fn(idx: Any) -> Any:
        with torch.no_grad(), autocast:
            return forward(idx)
    return logits_fn
