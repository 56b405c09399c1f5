"""Make PyTorch's implicit dtype promotions explicit, so TVM computes in the dtype PyTorch does.

- Ops that promote their input's dtype (`cumsum` of a bool mask is int64) get that dtype as
  their `dtype` argument. PyTorch accumulates bool and integer inputs of `cumsum`/`cumprod` in
  int64 unless told otherwise; TVM's importer keeps the input's dtype when no `dtype` is given,
  and a bool cumsum (GPT-2's and Llama's position ids: `mask.cumsum(-1)`) then fails in LLVM
  codegen.
- Element-wise ops with a floating result and an integer or bool tensor input (true division of
  positions, `idx * 0.5`, `mask * 1.5`) get that input cast to the result's dtype first, which is
  what PyTorch's type promotion computes. TVM's importer kept the integer dtype, and the kernel
  then failed to import (DeBERTa's log-bucketed relative positions: `log(int_positions / mid)`
  made its embedding kernel run in PyTorch).
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def explicit_dtypes(gm: fx.GraphModule) -> int:
    """Set `dtype` on each op that takes one, was given none, and returns another dtype than its
    first input's. Returns the count."""
    changed = 0
    for node in gm.graph.nodes:
        if _promotes(node):
            node.kwargs = {**node.kwargs, "dtype": node.meta["val"].dtype}
            changed += 1
    return changed


# Arguments of element-wise ops that are meant to be bool (never cast): `where`'s condition,
# `masked_fill`'s mask
_BOOL_ARGUMENTS = ("condition", "mask")


def explicit_promotions(gm: fx.GraphModule) -> int:
    """Cast each integer or bool tensor input of an element-wise op whose result is floating to
    the result's dtype (a plain `aten.to.dtype` before the op). Returns how many casts."""
    casts = 0
    for node in list(gm.graph.nodes):
        for position, source in _promoted_inputs(node):
            dtype = node.meta["val"].dtype
            with gm.graph.inserting_before(node):
                cast = gm.graph.call_function(aten.to.dtype, (source, dtype))
            cast.meta["val"] = source.meta["val"].to(dtype)
            args = list(node.args)
            args[position] = cast
            node.args = tuple(args)
            casts += 1
    return casts


def _promoted_inputs(node: fx.Node) -> list[tuple[int, fx.Node]]:
    """(position, input) of each integer or bool tensor argument of an element-wise op with a
    floating result."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or \
            torch.Tag.pointwise not in target.tags:
        return []
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
        return []
    names = [a.name for a in target._schema.arguments]
    return [(i, arg) for i, arg in enumerate(node.args)
            if isinstance(arg, fx.Node) and i < len(names) and names[i] not in _BOOL_ARGUMENTS
            and _is_integral(arg.meta.get("val"))]


def _is_integral(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and \
        not value.dtype.is_complex


def _promotes(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    names = [a.name for a in target._schema.arguments]
    if "dtype" not in names or node.kwargs.get("dtype") is not None or \
            len(node.args) > names.index("dtype"):
        return False
    first = node.args[0] if node.args else None
    source = first.meta.get("val") if isinstance(first, fx.Node) else None
    out = node.meta.get("val")
    return isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and \
        source.dtype != out.dtype
