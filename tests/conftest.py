"""Shared fixtures: a fresh on-disk tuning database per test and deterministic torch settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hwaware.db import TuningDatabase


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
