"""Zero padding written as its own op before a convolution (`F.pad`, TF-style "same" as
Hugging Face's MobileNetV2/EfficientNet and timm's `*_same` layers write it) becomes the
convolution's own padding, as far as a convolution can hold it.

A zero `constant_pad_nd` (or `aten.pad`, mode "constant") whose every user is a convolution
reading it as its input: per spatial dim, the part padded on both sides (min(before, after))
moves into each convolution's `padding`; what is left (the extra row/column of an asymmetric
pad, TF-same at stride 2 pads (0, 1)) stays as a smaller pad, which the conv families take
as (top, left, bottom, right) padding. A pad left with nothing to pad is removed (TF-same
pads a 1x1 conv by 0 everywhere). Pads with another value, another mode, negative widths
(crops), widths on the batch or channel dims, or any user that is not such a convolution
are left as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
PADS = (aten.constant_pad_nd.default, aten.pad.default)
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)  # input, weight, bias, stride, padding, ...


def fold_padding(gm: fx.GraphModule) -> int:
    """Fold each zero pad feeding only convolutions (see the module docstring). Returns how
    many pads were folded or removed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in PADS and _fold(gm.graph, node):
            changed += 1
    return changed


def zero_pad_widths(node: Any) -> list[int] | None:
    """The widths of a zero, constant-mode pad node (constant_pad_nd order: last dim first,
    (before, after) per dim), or None when `node` is not such a pad."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in PADS:
        return None
    args = list(node.args) + [None] * 4
    if node.target is aten.pad.default:
        mode = node.kwargs.get("mode", args[2] if args[2] is not None else "constant")
        value = node.kwargs.get("value", args[3])
        if mode != "constant":
            return None
    else:
        value = node.kwargs.get("value", args[2])
    pad = args[1]
    if value not in (None, 0, 0.0) or not isinstance(pad, (list, tuple)) or \
            not all(isinstance(p, int) for p in pad) or len(pad) % 2:
        return None
    return [int(p) for p in pad]


def _fold(graph: fx.Graph, pad_node: fx.Node) -> bool:
    widths = zero_pad_widths(pad_node)
    users = list(pad_node.users)
    if widths is None or not users or any(w < 0 for w in widths) or \
            not all(_reads_as_input(u, pad_node) for u in users):
        return False
    try:
        dims = {len(_val(u.args[1]).shape) - 2 for u in users}
    except ValueError:
        return False
    if len(dims) != 1:
        return False
    (ndim,) = dims
    widths = widths + [0] * max(0, 2 * ndim - len(widths))
    if any(widths[2 * ndim:]):
        return False  # pads the channel or batch dim
    # spatial dim d (first to last) is widths[2 * (ndim - 1 - d)], [... + 1]
    pairs = [(widths[2 * (ndim - 1 - d)], widths[2 * (ndim - 1 - d) + 1]) for d in range(ndim)]
    common = [min(before, after) for before, after in pairs]
    rest = [(before - c, after - c) for (before, after), c in zip(pairs, common, strict=True)]
    if not any(common) and any(b or a for b, a in rest):
        return False  # nothing a convolution can hold
    for conv in users:
        _add_padding(conv, common)
    if not any(b or a for b, a in rest):
        pad_node.replace_all_uses_with(pad_node.args[0])  # type: ignore[arg-type]
        graph.erase_node(pad_node)
        return True
    left = [n for b, a in reversed(rest) for n in (b, a)]
    with graph.inserting_before(pad_node):
        smaller = graph.call_function(aten.constant_pad_nd.default, (pad_node.args[0], left, 0.0))
    val = _val(pad_node.args[0])
    with val.fake_mode if hasattr(val, "fake_mode") else torch.no_grad():
        smaller.meta["val"] = aten.constant_pad_nd.default(val, left, 0.0)
    pad_node.replace_all_uses_with(smaller)
    graph.erase_node(pad_node)
    return True


def _reads_as_input(user: fx.Node, pad_node: fx.Node) -> bool:
    """Is `user` a convolution (zero padding, numeric padding) reading `pad_node` as its input
    only (not as its weight or bias)?"""
    if user.op != "call_function" or user.target not in CONVS or user.args[0] is not pad_node:
        return False
    if any(a is pad_node for a in list(user.args[1:]) + list(user.kwargs.values())):
        return False
    return not isinstance(_conv_args(user)[4], str) and isinstance(user.args[1], fx.Node)


def _conv_args(conv: fx.Node) -> list[Any]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = list(conv.args) + list(_CONV_DEFAULTS[len(conv.args):])
    return [conv.kwargs.get(name, a) for name, a in zip(names, args, strict=True)]


def _add_padding(conv: fx.Node, extra: list[int]) -> None:
    args = _conv_args(conv)
    padding = args[4]
    ndim = len(extra)
    current = [int(p) for p in padding] * (ndim if len(padding) == 1 else 1) \
        if isinstance(padding, (list, tuple)) else [int(padding)] * ndim
    args[4] = [c + e for c, e in zip(current, extra, strict=True)]
    for i in (3, 5):  # stride, dilation: SymInt[] in the schema, a default filled in as int
        if isinstance(args[i], int):
            args[i] = [args[i]] * ndim
    conv.args = tuple(args)
    conv.kwargs = {}


def _val(node: Any) -> torch.Tensor:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"{node} has no tensor value")
    return val
