"""
Fixed engine adapters. Each backend is one module here exposing `ENGINE`, an
object that satisfies engines.base.Engine, plus one agent-editable train file.
Modules are imported lazily: MLX and torch are heavy and may be absent.
"""

from __future__ import annotations

import importlib

from engines.base import Engine, EngineUnavailable

BACKENDS: dict[str, str] = {"mlx": "engines.mlx", "cuda": "engines.cuda"}
TRAIN_FILES: dict[str, str] = {"mlx": "train_mlx.py", "cuda": "train_cuda.py"}


def get_engine(name: str) -> Engine:
    if name not in BACKENDS:
        raise EngineUnavailable(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name]).ENGINE


__all__ = ["BACKENDS", "TRAIN_FILES", "Engine", "EngineUnavailable", "get_engine"]
