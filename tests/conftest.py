"""Shared fixtures: one tiny prepared corpus per test session, built by the real prepare path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arun-cache")


@pytest.fixture(scope="session")
def tiny_data(tiny_cache: Path) -> Path:
    """pystdlib at the `tiny` profile (64-token rows, 8K eval tokens, vocab 512): offline and a few seconds."""
    from arun_data import build
    old = os.environ.get("ARUN_CACHE")
    os.environ["ARUN_CACHE"] = str(tiny_cache)
    try:
        return build.prepare("pystdlib", "tiny", log=lambda s: None)
    finally:
        if old is None:
            os.environ.pop("ARUN_CACHE", None)
        else:
            os.environ["ARUN_CACHE"] = old


@pytest.fixture
def data_env(tiny_data: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points this test (and subprocesses it starts) at the tiny corpus."""
    monkeypatch.setenv("ARUN_CACHE", str(tiny_cache))
    monkeypatch.setenv("ARUN_DATA_DIR", str(tiny_data))
    return tiny_data


@pytest.fixture(autouse=True, scope="session")
def ledger_key_home(tmp_path_factory: pytest.TempPathFactory):
    """The machine's ledger key lives in a test folder, never in the user's ~/.config/arun."""
    old = os.environ.get("ARUN_HOME")
    os.environ["ARUN_HOME"] = str(tmp_path_factory.mktemp("arun-home"))
    yield
    if old is None:
        os.environ.pop("ARUN_HOME", None)
    else:
        os.environ["ARUN_HOME"] = old
