"""Output comparison for the conformance harness: compiled outputs against eager PyTorch's.

Imports only torch, so the fresh process that checks `hwaware.load` can use it without the
user's model code. Outputs may be tensors, tuples/lists, dicts or Hugging Face `ModelOutput`s
(ordered dicts): they are compared leaf by leaf in flattening order (None fields skipped, as
`ModelOutput` skips them), and, where asked, by container structure too (type names and keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

RTOL, ATOL = 1e-3, 1e-4


def leaves(out: Any) -> list[Any]:
    """Every leaf of a (nested) output in order: tensors and plain values, Nones left out."""
    if out is None:
        return []
    if isinstance(out, Mapping):
        return [x for v in out.values() for x in leaves(v)]
    if isinstance(out, (tuple, list)):
        return [x for v in out for x in leaves(v)]
    return [out]


def structure(out: Any) -> str:
    """The container structure of an output, e.g. `BaseModelOutput{last_hidden_state:T}`."""
    if out is None:
        return "None"
    if isinstance(out, Mapping):
        inner = ",".join(f"{k}:{structure(v)}" for k, v in out.items() if v is not None)
        return f"{type(out).__name__}{{{inner}}}"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__}({','.join(structure(v) for v in out)})"
    return "T" if isinstance(out, torch.Tensor) else type(out).__name__


@dataclass
class Reference:
    """Eager PyTorch's output on one input, kept as its leaves and its container structure
    (what `torch.save(..., weights_only=True)` can carry to another process)."""

    leaves: list[Any]
    structure: str

    @classmethod
    def of(cls, out: Any) -> Reference:
        return cls([x.clone() if isinstance(x, torch.Tensor) else x for x in leaves(out)],
                   structure(out))


def mismatch(got: Any, expected: Reference, *, containers: bool = True) -> str | None:
    """None when `got` matches `expected` (rtol 1e-3, atol 1e-4 on every leaf; with
    `containers`, the same container structure); else what differs first, in one line."""
    if containers and structure(got) != expected.structure:
        return f"output container {_short(structure(got))} != eager {_short(expected.structure)}"
    return leaf_mismatch(leaves(got), expected.leaves)


def leaf_mismatch(got: list[Any], expected: list[Any]) -> str | None:
    """Compare two flat lists of output leaves; None when they match."""
    if len(got) != len(expected):
        return f"{len(got)} output leaves, eager has {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if isinstance(e, torch.Tensor):
            problem = tensor_mismatch(g, e)
        else:
            problem = None if g == e else f"{g!r} != eager {e!r}"
        if problem:
            return f"leaf {i}: {problem}"
    return None


def tensor_mismatch(got: Any, expected: torch.Tensor) -> str | None:
    if not isinstance(got, torch.Tensor):
        return f"{type(got).__name__}, eager has a tensor"
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return (f"{_dtype(got)}{list(got.shape)}, eager has "
                f"{_dtype(expected)}{list(expected.shape)}")
    if torch.allclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True):
        return None
    if not expected.is_floating_point():
        return f"{int((got != expected).sum())} of {expected.numel()} values differ"
    err = (got.double() - expected.double()).abs()
    bad = err > ATOL + RTOL * expected.double().abs()
    return (f"max abs error {err.nan_to_num(float('inf')).max().item():.3g} "
            f"({int(bad.sum())} of {expected.numel()} values out of tolerance)")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."
