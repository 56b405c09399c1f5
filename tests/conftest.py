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


def assert_close_to_eager(model: torch.nn.Module, compiled: object, *inputs: torch.Tensor) -> None:
    """Compiled outputs equal eager PyTorch's (rtol 1e-3, atol 1e-4), whatever their nesting."""
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        expected = pytree.tree_leaves(model(*inputs))
        got = pytree.tree_leaves(compiled(*inputs))  # type: ignore[operator]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)
