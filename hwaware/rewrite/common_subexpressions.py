"""Common subexpressions computed once: a node equal to an earlier one (same op, same inputs,
same arguments) is replaced by it.

Real models recompute: PyTorch Geometric's `GCNConv` normalises the same edge list in every
layer (self loops, degrees, `deg^-1/2`), GAT adds the same self loops per layer, and a
transformer may rebuild one mask per block. Where those ops are data-dependent they run on the
host, one PyTorch call each, so a two-layer GCN ran its 18 host ops twice. Ops whose result
can differ between two calls with the same inputs (random ones) or that write into an input
are never merged. Views are compared but not merged: they cost nothing, and a fused kernel
family claims the views of its own pattern (a view shared by two layers' message passing kept
both on the host), so an equal view is kept and only what is computed from it is merged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

_ASSERT = torch.ops.aten._assert_scalar.default


def merge_common_subexpressions(gm: fx.GraphModule) -> int:
    """Replace every pure node equal to an earlier one by that one (views: compare as that
    one); returns how many nodes were removed."""
    seen: dict[Any, fx.Node] = {}
    equal_to: dict[fx.Node, fx.Node] = {}  # a view -> the earlier view it equals
    merged = 0
    for node in list(gm.graph.nodes):
        key = _key(node, equal_to)
        if key is None:
            continue
        first = seen.setdefault(key, node)
        if first is node:
            continue
        if _is_view(node.target):
            equal_to[node] = first
            continue
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        merged += 1
    if merged:
        gm.graph.eliminate_dead_code()
    return merged


def _key(node: fx.Node, equal_to: dict[fx.Node, fx.Node]) -> Any:
    """What makes `node` equal to another: its op and arguments (nodes by identity, a view by
    the view it equals); None for a node that must stay (impure, or an argument that cannot
    be compared)."""
    if node.op not in ("call_function", "get_attr") or not _pure(node.target):
        return None
    args = node.args[:1] if node.target is _ASSERT else node.args  # the message names a node
    try:
        key = (node.op, node.target, _hashable(args, equal_to), _hashable(node.kwargs, equal_to))
        hash(key)
    except TypeError:
        return None
    return key


def _hashable(value: Any, equal_to: dict[fx.Node, fx.Node]) -> Any:
    if isinstance(value, fx.Node):
        return equal_to.get(value, value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_hashable(v, equal_to) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _hashable(v, equal_to)) for k, v in sorted(value.items())))
    if isinstance(value, torch.Tensor):
        raise TypeError("a tensor argument")
    if isinstance(value, float):  # -0.0 == 0.0 and nan != nan: compare the float itself
        return ("float", repr(value))
    return value


def _pure(target: Any) -> bool:
    """A deterministic op that writes into none of its inputs (attribute reads are pure)."""
    if isinstance(target, str):
        return True
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and \
            torch.Tag.nondeterministic_seeded not in target.tags
    return getattr(target, "__module__", None) in ("_operator", "operator")


def _is_view(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.is_view
