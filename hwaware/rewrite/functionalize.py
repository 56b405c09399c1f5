"""Replace in-place ATen ops (`index_add_`, `add_`, ...) with their out-of-place forms.

A kernel's outputs may live in buffers TVM owns (a folded constant is returned by every call), so
an in-place op on the host could corrupt them across calls. After this pass every later use of
the mutated value reads the op's result instead, which is what the in-place op meant.
"""

from __future__ import annotations

import torch
from torch import fx


def functionalize(gm: fx.GraphModule) -> int:
    """Rewrite each in-place op whose first argument is not a graph input. Returns the count."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        functional = _functional_variant(node)
        if functional is None:
            continue
        mutated = node.args[0]
        if not isinstance(mutated, fx.Node) or mutated.op == "placeholder":
            continue
        node.target = functional
        later_users = [u for u in mutated.users if order.get(u, -1) > order[node]]
        for user in later_users:
            user.replace_input_with(mutated, node)
        changed += 1
    return changed


def _functional_variant(node: fx.Node) -> object | None:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    if packet is None:
        return None
    wanted = _argument_types(target)
    for overload in packet.overloads():
        candidate = getattr(packet, overload)
        if _argument_types(candidate) == wanted:
            return candidate
    return None


def _argument_types(op: torch._ops.OpOverload) -> list[tuple[str, str]]:
    """(name, type) of each argument: overload names differ between in-place and functional
    forms (`pow_.Scalar` is `pow.Tensor_Scalar`), the argument lists do not."""
    return [(a.name, str(a.type)) for a in op._schema.arguments]
