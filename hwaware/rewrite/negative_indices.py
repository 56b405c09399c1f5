"""Negative indices counted from the start, where TVM's importer takes them as out of range.

`select(x, dim, -i)` and `index` with a constant index tensor holding negative entries get
`size - i` instead: TVM's take/gather reads an index of -2 out of bounds and the kernel
computed wrong values (Falcon's `qkv[:, :, :, [-2]]` key split, which verification caught and
kept in PyTorch). Runs after constant folding, which makes the index tensors constants. An
index tensor computed at run time is left as it is (PyTorch wraps its negative entries; TVM
does not).
"""

from __future__ import annotations

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
