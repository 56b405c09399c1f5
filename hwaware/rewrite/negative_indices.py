"""Negative indices counted from the start, where TVM's importer takes them as out of range.

`select(x, dim, -i)` and `index` with a constant index tensor holding negative entries get
`size - i` instead: TVM's take/gather reads an index of -2 out of bounds and the kernel
computed wrong values (Falcon's `qkv[:, :, :, [-2]]` key split, which verification caught and
kept in PyTorch). Runs after constant folding, which makes the index tensors constants.

An index tensor computed at run time (`hidden[rows, mask.sum(-1) - 1]` on an all-padding row)
can only be wrapped at run time: `runtime_indices_wrapped` gives the graph TVM imports a
`remainder(i, size)` on each such index, as PyTorch counts it. It runs on the graph handed to
TVM's importer, after partitioning, so the fused families still see the ops they match.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

from hwaware.rewrite.constants import insert_constant

aten = torch.ops.aten


def indices_from_start(gm: fx.GraphModule) -> int:
    """Rewrite each negative `select` index and constant `index` tensor; returns the count."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.select.int:
            changed += _index_from_start(node)
        elif node.target == aten.index.Tensor:
            changed += _constant_indices_from_start(gm, node)
    return changed


def _index_from_start(node: fx.Node) -> int:
    """`select(x, dim, -i)` -> `select(x, dim, size - i)` where the size is static; 1 if
    rewritten."""
    source, dim, index = node.args
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(index, int) or index >= 0 or not isinstance(value, torch.Tensor) or \
            not isinstance(dim, int):
        return 0
    size = value.shape[dim]
    if not isinstance(size, int):
        return 0
    node.args = (source, dim, index + size)
    return 1


def _constant_indices_from_start(gm: fx.GraphModule, node: fx.Node) -> int:
    """`index(x, [..., constant with negative entries, ...])` -> the same with each negative
    entry plus its dim's size (a new constant); how many index tensors were rewritten."""
    source, indices = node.args[0], node.args[1]
    value = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(indices, (list, tuple)):
        return 0
    rewritten, new_indices = 0, list(indices)
    for dim, index in enumerate(indices):
        constant = getattr(gm, str(index.target), None) if isinstance(index, fx.Node) and \
            index.op == "get_attr" else None
        size = value.shape[dim] if dim < value.dim() else None
        if not isinstance(constant, torch.Tensor) or constant.dtype.is_floating_point or \
                constant.dtype == torch.bool or not isinstance(size, int) or \
                not bool((constant < 0).any()):
            continue
        new_indices[dim] = insert_constant(gm, node, "_index_from_start",
                                           torch.where(constant < 0, constant + size, constant))
        rewritten += 1
    if rewritten:
        node.args = (source, new_indices, *node.args[2:])
    return rewritten


_INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default)


def runtime_indices_wrapped(graph: fx.GraphModule) -> fx.GraphModule:
    """`graph`, or a copy of it sharing its weights, in which every integer index tensor of an
    `index` / `index_put` that is not a constant is `remainder(index, size)`: PyTorch counts a
    negative index from the end, TVM's take reads it out of bounds (a wrong value, or a
    segfault). Index lists with a bool mask (which spans several dims) are left as they are."""
    wraps = [(node, dim, index, size) for node in graph.graph.nodes
             if node.op == "call_function" and node.target in _INDEXING
             for dim, index, size in _runtime_indices(node)]
    if not wraps:
        return graph
    copied = fx.GraphModule(graph, copy.deepcopy(graph.graph))
    by_name = {node.name: node for node in copied.graph.nodes}
    for node, dim, index, size in wraps:
        target, source = by_name[node.name], by_name[index.name]
        with copied.graph.inserting_before(target):
            wrapped = copied.graph.call_function(aten.remainder.Scalar, (source, size))
        indices = list(target.args[1])
        indices[dim] = wrapped
        target.args = (target.args[0], indices, *target.args[2:])
    copied.recompile()
    return copied


def _runtime_indices(node: fx.Node) -> list[tuple[int, fx.Node, int]]:
    """(dim, index node, dim's size) of each integer index of `node` computed at run time."""
    value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    indices = node.args[1]
    if not isinstance(value, torch.Tensor) or not isinstance(indices, (list, tuple)):
        return []
    dtypes = [_dtype(index) for index in indices if index is not None]
    if any(dtype is None or dtype == torch.bool or dtype == torch.uint8 for dtype in dtypes):
        return []
    return [(dim, index, value.shape[dim]) for dim, index in enumerate(indices)
            if isinstance(index, fx.Node) and index.op != "get_attr" and
            isinstance(value.shape[dim], int)]


def _dtype(index: object) -> torch.dtype | None:
    value = index.meta.get("val") if isinstance(index, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None
