"""Give ops that promote their input's dtype (`cumsum` of a bool mask is int64) that dtype
explicitly, as their `dtype` argument.

PyTorch accumulates bool and integer inputs of `cumsum`/`cumprod` in int64 unless told
otherwise; TVM's importer keeps the input's dtype when no `dtype` is given, and a bool cumsum
(GPT-2's and Llama's position ids: `mask.cumsum(-1)`) then fails in LLVM codegen. With the
result's dtype written out, both compute what PyTorch does.
"""

from __future__ import annotations

import torch
from torch import fx


def explicit_dtypes(gm: fx.GraphModule) -> int:
    """Set `dtype` on each op that takes one, was given none, and returns another dtype than its
    first input's. Returns the count."""
    changed = 0
    for node in gm.graph.nodes:
        if _promotes(node):
            node.kwargs = {**node.kwargs, "dtype": node.meta["val"].dtype}
            changed += 1
    return changed


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
