"""Verification mode: eager PyTorch beside the first N calls of a compiled model.

Goes in: a compiled model (`CompiledModel`, `DynamicModel`, or one graph of a torch.compile'd
model), the eager callable it must agree with, and N. Comes out: the compiled model's own
results, unchanged; on the first output that differs from eager, `VerificationError`, naming
the narrowest culprit found: the first TVM kernel whose output differs from its own PyTorch ops
on the same values, else the region of a dynamic network, else the graph.

Users turn it on with `hwaware.compile(..., verify=N)` or `torch.compile(model,
backend="hwaware", options={"verify": N})`. Outputs are compared leaf by leaf with the build's
tolerances (rtol 1e-3, atol 1e-4), atol scaled by the reference's largest magnitude when above
1, since float reordering alone exceeds a fixed atol on large activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-3, 1e-4


class VerificationError(RuntimeError):
    """A compiled model's output differed from eager PyTorch's during verification."""


def difference(got: Any, expected: Any) -> str | None:
    """None when `got` matches `expected` leaf by leaf, else what differs first."""
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    if len(got_leaves) != len(want_leaves):
        return f"{len(got_leaves)} outputs where eager gives {len(want_leaves)}"
    for i, (g, e) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        why = leaf_difference(g, e)
        if why:
            return f"output {i}: {why}"
    return None


def leaf_difference(g: Any, e: Any) -> str | None:
    """Why output `g` is not eager's `e` (None: it is, within rtol 1e-3 and an absolute 1e-4
    times the largest eager value: float32 sums of another order differ by the values' scale,
    and a deep network's activations reach the thousands)."""
    if not isinstance(e, torch.Tensor):
        return None if g == e else f"{g!r} where eager gives {e!r}"
    if not isinstance(g, torch.Tensor):
        return f"{type(g).__name__} where eager gives a tensor"
    if g.shape != e.shape or g.dtype != e.dtype:
        return f"{g.dtype}{list(g.shape)} where eager gives {e.dtype}{list(e.shape)}"
    if not e.dtype.is_floating_point:
        return None if torch.equal(g, e) else "integer values differ"
    g, e = g.detach().cpu(), e.detach().cpu()
    scale = max(1.0, float(e.abs().max())) if e.numel() and e.isfinite().all() else 1.0
    if torch.allclose(g, e, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
        return None
    return f"max abs error {float((g - e).abs().max()):.3g} (largest eager value {scale:.3g})"


def check_calls(calls: Any) -> int:
    """The `verify` option, validated: a number of calls >= 0."""
    if type(calls) is not int or calls < 0:
        raise ValueError(f"verify must be a number of calls >= 0, got {calls!r}")
    return calls


class Verifier:
    """Checks the first `calls` calls of a compiled model against `reference`."""

    def __init__(self, reference: Callable[..., Any], calls: int, what: str):
        self.reference, self.remaining, self.what = reference, check_calls(calls), what
        self.calls = 0

    def check(self, run: Callable[..., Any], args: Sequence[Any],
              culprit: Callable[[], str | None]) -> Any:
        """Run the compiled `run(*args)` and, while calls remain, eager beside it; raise on a
        difference, naming `culprit()` (the narrowest part found to differ) or the model."""
        got = run(*args)
        if self.remaining <= 0:
            return got
        self.remaining -= 1
        self.calls += 1
        with torch.no_grad():
            expected = self.reference(*args)
        why = difference(got, expected)
        if why is None:
            return got
        found = culprit() or ("no kernel differs from its own PyTorch ops on the same values: "
                              "the graph as a whole does")
        raise VerificationError(f"hwaware verify: call {self.calls} of {self.what} differs "
                                f"from eager PyTorch ({why}); {found}")

    @staticmethod
    def differing_kernel(model: Any, flat: list[Any]) -> str | None:
        """`differing_kernel`, for a model that holds a verifier (it imports nothing here)."""
        return differing_kernel(model, flat)


def differing_kernel(model: Any, flat: list[Any]) -> str | None:
    """The first TVM kernel of a `CompiledModel` whose outputs, on the values its PyTorch
    program computes from `flat`, differ from its own PyTorch ops; None if none does."""
    for spec, got, expected in _kernel_results(model, flat):
        why = difference(got, expected)
        if why:
            return (f"first differing kernel: {spec.name} ({spec.family}, signature "
                    f"{spec.signature}), against its own PyTorch ops: {why}")
    return None


def _kernel_results(model: Any, flat: list[Any]) -> Iterator[tuple[Any, list[Any], list[Any]]]:
    from hwaware.program import KernelStep
    from hwaware.runtime import run_kernel_in_torch, step_through

    for step, slots in step_through(model.program, flat):
        if not isinstance(step, KernelStep):
            continue
        spec = model.program.kernels[step.kernel]
        if spec.impl != "tvm":
            continue
        inputs = [slots[i] for i in spec.inputs]
        expected = run_kernel_in_torch(model.program, spec.name, inputs)
        yield spec, model.kernel_callable(spec.name)(*inputs), expected


def verify_compiled(model: Any, reference: Callable[..., Any], calls: int) -> Any:
    """Turn verification on for the first `calls` calls of a `CompiledModel` or
    `DynamicModel` (returned as is)."""
    if calls:
        model.verifier = Verifier(reference, calls, f"model {type(reference).__name__}")
    return model


def describe_graph(gm: Any) -> str:
    """A Dynamo graph, named by where its first op is in the user's source."""
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace") if node.op == "call_function" else None
        if trace:
            lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
            frames = [ln for ln in lines if ln.startswith("File ")]
            if frames:
                return f"the torch.compile graph starting at {frames[-1]}"
    return "a torch.compile graph"
