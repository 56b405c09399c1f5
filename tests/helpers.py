"""Assertions shared by the tests."""

from __future__ import annotations

import torch


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
