"""Shared fixtures: a fresh on-disk tuning database per test, deterministic torch settings, the
host's TVM target (`llvm_host`), and the search cost models tuning sessions keep
(`hwaware.tvm.cost_model`) in a temporary folder instead of the repository's `cost_models/`, and
a latency profiler that checks once for a calm machine instead of waiting for one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hwaware.db import TuningDatabase


@pytest.fixture(autouse=True, scope="session")
def _search_models_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    with pytest.MonkeyPatch.context() as mp:  # session-wide: module fixtures tune too
        mp.setenv("HWAWARE_SEARCH_MODELS_DIR", str(tmp_path_factory.mktemp("cost_models")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _profile_without_waiting() -> None:
    """The latency profiler measures for real in tests, but checks once, without waiting, that
    the machine runs at its usual speed (it waits `CALM_WAIT_S`, 2 s, up to `CALM_TRIES`, 30
    times, before each model): on a noisy machine the profiling tests spent minutes waiting
    (141 s for two tiny models on a Zen 3 VM). The waiting has its own test, on scripted
    references (`test_profiling_waits_while_the_machine_runs_slow`)."""
    from hwaware.predict import profile

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profile, "CALM_TRIES", 1)
        yield


@pytest.fixture
def tvm_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kernel that matches PyTorch counts as faster on TVM, so no fused kernel is
    dissolved for losing its timing: for tests of what a fused or TVM kernel computes, whose
    subject is not the choice. The timings still run and are stored; a busy machine (the other
    test worker) tipped a tuned fused attention kernel and a fused ResNet block to PyTorch."""
    from hwaware import build

    monkeypatch.setattr(build, "_tvm_wins", lambda tvm_us, torch_us: True)


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "tuning.db"


@pytest.fixture
def db(db_path: Path) -> TuningDatabase:
    database = TuningDatabase(db_path)
    yield database
    database.close()


@pytest.fixture(scope="module")
def llvm_host() -> Any:
    """The TVM target of this machine's CPU (with its host)."""
    from hwaware.target import get_target
    from hwaware.tvm import setup

    t = get_target("host")
    return setup.tvm_target(t.tvm, t.host_tvm)
