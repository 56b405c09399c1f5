"""Constant folding: evaluate every node whose inputs are all weights, once, at compile time."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hwaware.rewrite.fold_batchnorm import _getattr_path

_NEVER_FOLD = {torch.ops.aten.dropout.default}


def fold_constants(gm: fx.GraphModule) -> int:
    """Replace weight-only subexpressions (e.g. a transposed weight) with new constants."""
    folded = 0
    for node in list(gm.graph.nodes):
        if not _foldable(node):
            continue
        args, kwargs = fx.node.map_aggregate(
            (node.args, node.kwargs), lambda a: _value(gm, a) if isinstance(a, fx.Node) else a
        )
        with torch.no_grad():
            value = node.target(*args, **kwargs)  # type: ignore[operator]
        if not isinstance(value, torch.Tensor):
            continue
        const = insert_constant(gm, node, "_folded", value.detach().contiguous())
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    return folded


def _foldable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target in _NEVER_FOLD:
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(n.op == "get_attr" for n in inputs)


def _value(gm: fx.GraphModule, node: fx.Node) -> Any:
    return _getattr_path(gm, str(node.target))


def insert_constant(gm: fx.GraphModule, before: fx.Node, prefix: str, value: torch.Tensor
                    ) -> fx.Node:
    """`value` as a new buffer of `gm` (named `<prefix>_<n>`, the first n free), read by a new
    get_attr node inserted before `before`."""
    n = 0
    while hasattr(gm, f"{prefix}_{n}"):
        n += 1
    gm.register_buffer(f"{prefix}_{n}", value)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(f"{prefix}_{n}")
    node.meta["val"] = value
    return node
