"""Conversions that stay on one device: the ones that change nothing are removed, the ones that
change only the dtype become a plain cast (`aten.to.dtype`, which TVM imports).

Hugging Face models move their masks "to the input's device" on every call, often casting them
at once (`mask.to(device, torch.bool)`: `aten.to.device`, `aten.to.dtype_layout`,
`aten._to_copy`). TVM's importer has no conversion for those forms, so each one was a host op
splitting the graph between PyTorch and TVM (24 models of the conformance corpus). After
`functionalize` nothing writes into a tensor in place, so a conversion that changes nothing can
be its input. Kept as they are: a no-op whose result is a graph output (the caller gets a new
tensor, as in eager), one asking for a copy or a memory format, and any that changes the device
or the layout.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten
CONVERSIONS = (aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default)


def simplify_conversions(gm: fx.GraphModule) -> int:
    """Remove each same-device conversion that changes nothing; make each that changes only the
    dtype a plain cast. Returns the count."""
    changed = 0
    for node in list(gm.graph.nodes):
        kind = _kind(node)
        if kind == "no-op":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif kind == "cast":
            node.target, node.kwargs = aten.to.dtype, {}
            node.args = (node.args[0], node.meta["val"].dtype)
        changed += kind != ""
    return changed


def _kind(node: fx.Node) -> str:
    """"no-op", "cast" (only the dtype changes), or "" (left alone)."""
    if node.op != "call_function" or node.target not in CONVERSIONS or \
            _argument(node, "copy") or \
            _argument(node, "memory_format") not in (None, torch.preserve_format):
        return ""
    unchanged = _unchanged(node)
    if unchanged is None:
        return ""
    if unchanged:
        return "" if any(u.op == "output" for u in node.users) else "no-op"
    plain = node.target == aten.to.dtype and len(node.args) == 2 and not node.kwargs
    return "" if plain else "cast"


def _argument(node: fx.Node, name: str) -> object:
    """The value of argument `name`, given by keyword or position (None when absent)."""
    if name in node.kwargs:
        return node.kwargs[name]
    names = [a.name for a in node.target._schema.arguments]  # type: ignore[union-attr]
    i = names.index(name) if name in names else len(node.args)
    return node.args[i] if i < len(node.args) else None


def _unchanged(node: fx.Node) -> bool | None:
    """True: same dtype, device, layout; False: only the dtype differs; None: else."""
    source = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) \
        else None
    out = node.meta.get("val")
    if not (isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor)) or \
            (source.device, source.layout) != (out.device, out.layout):
        return None
    return source.dtype == out.dtype
