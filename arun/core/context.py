"""
What an experiment runs against, worked out once: the engine (checked to run here), the
prepared data, the train file, the budget, the device, and the comparability key they make.

`arun run`, `arun loop`, `arun noise` and every swarm worker get their key from here, so two
results are compared only when this one function gave them the same key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prepare
from arun.core.errors import ArunError
from arun.core.keys import comparability_key, key_id
from arun.core.ledger import ledger_path
from engines import BACKENDS, TRAIN_FILES, EngineUnavailable, get_engine
from engines.fingerprint import fixed_code_sha256

DEVICE_BACKENDS = ("cuda",)  # engines that read ARUN_DEVICE (the torch engine)


@dataclass(frozen=True)
class ExperimentContext:
    repo_dir: Path
    backend: str
    engine: Any              # engines.<backend>'s engine object
    hardware_info: Any       # its Hardware (tag, name, memory, ...)
    data: Any                # prepare.PreparedData
    train_file: str
    budget: float            # training seconds
    device: str | None       # torch device ("cuda" / "cpu"); None for engines that pick their own
    key: dict
    key_id: str
    seq_len: int | None

    @property
    def tag(self) -> str:
        return self.hardware_info.tag

    @property
    def hardware(self) -> dict:
        return self.hardware_info.to_dict()

    @property
    def train_path(self) -> Path:
        return self.repo_dir / self.train_file

    @property
    def ledger_path(self) -> Path:
        return ledger_path(self.repo_dir, self.tag)

    def info(self) -> dict:
        """The plain fields (no engine or data objects): what crosses to another process, e.g. a Ray actor."""
        return {"key": self.key, "key_id": self.key_id, "tag": self.tag, "backend": self.backend,
                "hardware": self.hardware, "train_file": self.train_file, "seq_len": self.seq_len,
                "device": self.device, "budget": self.budget}


def default_budget(budget: float | None) -> float:
    return float(budget if budget is not None else prepare.DEFAULT_TIME_BUDGET)


def default_device(backend: str, device: str | None) -> str | None:
    return device or (os.environ.get("ARUN_DEVICE") if backend in DEVICE_BACKENDS else None)


def open_data(verify: bool = False) -> prepare.PreparedData:
    """The prepared data (checked against its manifest when `verify`); ArunError naming the fix."""
    try:
        data = prepare.PreparedData.open()
        if verify:
            data.verify()
    except prepare.PrepareError as e:
        raise ArunError(str(e)) from None
    return data


def experiment_context(repo_dir: Path | str, backend: str, budget: float | None, device: str | None,
                       data: Any = None, verify_data: bool = False) -> ExperimentContext:
    """The context of this repo's experiments; ArunError when the engine or the data are missing
    (the engine is checked first: its refusal names the more basic problem)."""
    device = default_device(backend, device)
    seconds = default_budget(budget)
    engine, hardware = resolve_engine(backend, device)
    data = data if data is not None else open_data(verify=verify_data)
    key = comparability_key(backend, hardware.tag, data.key(), seconds, fixed_code_sha256(Path(repo_dir)))
    seq_len = getattr(getattr(data, "profile", None), "max_seq_len", None) or key.get("max_seq_len")
    return ExperimentContext(repo_dir=Path(repo_dir).resolve(), backend=backend, engine=engine, hardware_info=hardware,
                             data=data, train_file=TRAIN_FILES.get(backend) or engine.train_file, budget=seconds,
                             device=device, key=key, key_id=key_id(key), seq_len=seq_len)


_CACHE: dict[tuple, ExperimentContext] = {}


def cached_context(repo_dir: Path | str, backend: str, budget: float | None, device: str | None) -> ExperimentContext:
    """experiment_context, probed once per (backend, device, budget, data) in this process: the loop
    asks every iteration, and probing the hardware is not free."""
    device = default_device(backend, device)
    data = open_data()
    cache_key = (str(Path(repo_dir).resolve()), backend, device, default_budget(budget), str(data.dir))
    if cache_key not in _CACHE:
        _CACHE[cache_key] = experiment_context(repo_dir, backend, budget, device, data=data)
    return _CACHE[cache_key]


# --------------------------------------------------------------------------- the engine, checked to run here

def _engine_works(name: str, device: str | None) -> bool:
    try:
        with scoped_env(ARUN_DEVICE=device):
            return bool(get_engine(name).available()[0])
    except Exception:  # an engine failing to import simply does not work here
        return False


def _alternative(backend: str) -> str:
    for name in BACKENDS:
        if name == backend:
            continue
        if _engine_works(name, None):
            return f"use --backend {name}"
        if name in DEVICE_BACKENDS and _engine_works(name, "cpu"):
            return f"use --backend {name} --device cpu (the torch CPU engine)"
    return "no other engine works here either (see arun doctor)"


def resolve_engine(backend: str, device: str | None) -> tuple[Any, Any]:
    """The engine for `backend`, checked to run here, and its hardware; ArunError naming what was
    found and what would work."""
    if not isinstance(backend, str) or not backend:
        raise ArunError(f"no backend given; use --backend {' or --backend '.join(BACKENDS)}")
    try:
        engine = get_engine(backend)
    except EngineUnavailable as e:
        raise ArunError(str(e)) from None
    except ImportError as e:
        raise ArunError(f"the {backend} engine does not import ({e}); reinstall arun with its extra: "
                        f"pip install -e '.[{backend}]'") from None
    if device is not None and backend not in DEVICE_BACKENDS:
        raise ArunError(f"--device is for the torch engine (--backend cuda); {backend} runs on its own default device")
    with scoped_env(ARUN_DEVICE=device if backend in DEVICE_BACKENDS else None):
        try:
            ok, why = engine.available()
        except ValueError as e:  # e.g. ARUN_DEVICE=tpu
            raise ArunError(f"{backend}: {e}") from None
        if not ok:
            hint = "" if "--backend" in why else f"; {_alternative(backend)}"
            raise ArunError(f"{backend}: {why}{hint}")
        hardware = engine.hardware()
    return engine, hardware


def _set_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def scoped_env(**values: str | None) -> Iterator[None]:
    """Environment variables set (or, for None, removed) for the duration of the block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(old)
