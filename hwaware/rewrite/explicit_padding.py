"""Convolutions with `padding="same"` or `"valid"` (`aten.conv2d.padding`, EfficientNet's
depthwise convs) become convolutions with explicit padding, which the conv kernels cover.

TVM's importer has no conversion for the string form, so each such conv ran in PyTorch
(EfficientNet: 0% of its FLOPs on TVM). What PyTorch computes is kept exactly: "valid" pads
nothing; "same" pads `dilation * (kernel - 1)` per spatial dim, half on each side, and where
that is odd the extra row or column goes on the right (bottom), as a zero `constant_pad_nd`
before the conv.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten
STRING_PADDED: dict[Any, Any] = {aten.conv1d.padding: aten.conv1d.default,
                                  aten.conv2d.padding: aten.conv2d.default,
                                  aten.conv3d.padding: aten.conv3d.default}
_DEFAULTS = (None, 1, "valid", 1, 1)  # bias, stride, padding, dilation, groups


def explicit_padding(gm: fx.GraphModule) -> int:
    """Rewrite each string-padded convolution. Returns the count."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in STRING_PADDED:
            _rewrite(gm.graph, node)
            changed += 1
    return changed


def _rewrite(graph: fx.Graph, node: fx.Node) -> None:
    x, weight, bias, stride, padding, dilation, groups = _arguments(node)
    dims = len(weight.meta["val"].shape) - 2
    dilation = _per_dim(dilation, dims)
    kernel = weight.meta["val"].shape[2:]
    total = [0] * dims if padding == "valid" else \
        [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    left = [t // 2 for t in total]
    extra = [t - 2 * lt for t, lt in zip(total, left, strict=True)]
    with graph.inserting_before(node):
        if any(extra):
            x = _pad_right(graph, x, extra)
        conv = graph.call_function(STRING_PADDED[node.target],
                                   (x, weight, bias, _per_dim(stride, dims), left, dilation,
                                    groups))
    conv.meta = dict(node.meta)
    node.replace_all_uses_with(conv)
    graph.erase_node(node)


def _arguments(node: fx.Node) -> list[Any]:
    args = list(node.args) + list(_DEFAULTS[len(node.args) - 2:])
    for i, name in enumerate(("bias", "stride", "padding", "dilation", "groups"), start=2):
        args[i] = node.kwargs.get(name, args[i])
    return args


def _per_dim(value: Any, dims: int) -> list[int]:
    return [int(v) for v in value] * (dims if len(value) == 1 else 1) \
        if isinstance(value, (list, tuple)) else [int(value)] * dims


def _pad_right(graph: fx.Graph, x: fx.Node, extra: list[int]) -> fx.Node:
    """`x` with `extra[i]` zeros after spatial dim i (constant_pad_nd lists the last dim first)."""
    pad = [n for e in reversed(extra) for n in (0, e)]
    padded = graph.call_function(aten.constant_pad_nd.default, (x, pad, 0.0))
    val = x.meta["val"]
    with val.fake_mode if hasattr(val, "fake_mode") else torch.no_grad():
        padded.meta["val"] = aten.constant_pad_nd.default(val, pad, 0.0)
    return padded
