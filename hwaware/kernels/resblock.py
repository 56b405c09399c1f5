"""ResNet residual blocks (basic and bottleneck) as ONE fused, depth-first tiled TIR kernel.

Pattern in (the rewritten ATen graph, NCHW, fp32, batch 1, BatchNorm already folded):
- basic block: conv3x3(stride s) -> relu -> conv3x3 -> add(residual) -> relu;
- bottleneck: conv1x1 -> relu -> conv3x3(stride s) -> relu -> conv1x1 -> add(residual) -> relu;
the residual being the block input itself or a 1x1 (strided) conv of it ("downsample"). Convs
may carry a bias; dilation must be 1 and groups 1, or the block is left to the unfused path.
This module is the TVM-free half (`find` and the `Match` it makes); kernel out: one blocked,
depth-first PrimFunc (direct or Winograd convs), built and scheduled by `resblock_kernel`, the
lowering half, imported when a kernel is lowered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily

log = logging.getLogger(__name__)

RULE = "res_block"
CONV_OPS = ("aten.conv2d.default", "aten.convolution.default")
RELU_OPS = ("aten.relu.default", "aten.relu_.default")
ADD_OPS = ("aten.add.Tensor", "aten.add_.Tensor")
MAIN_KERNELS = ((3, 3), (1, 3, 1))  # basic, bottleneck


# ------------------------------------------------------------------------ pattern
@dataclass(frozen=True)
class Conv:
    """One convolution of the block (as found in the graph)."""

    node: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: int
    padding: int
    kernel: int


@dataclass(frozen=True)
class Match:
    """One residual block: main-path convs (with a relu after all but the last), the optional
    downsample conv, and the nodes from the first conv to the final relu."""

    source: fx.Node
    main: tuple[Conv, ...]
    downsample: Conv | None
    nodes: tuple[fx.Node, ...]


class NoMatch(Exception):
    """Why a candidate add node is not a block this family can lower."""


def _op(node: Any) -> str:
    """The ATen op name of a call_function node ("" for anything else)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return ""
    return str(node.target)


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    items = [int(v) for v in value]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def _conv_args(node: fx.Node) -> tuple[Any, ...]:
    """(input, weight, bias, stride, padding, dilation, groups) of a conv node."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation")
    if _op(node) == "aten.convolution.default":
        args = list(node.args) + [None] * (9 - len(node.args))
        if args[6]:
            raise NoMatch(f"{node.name} is a transposed convolution")
        return (*args[:6], args[8])
    args = list(node.args)
    defaults = [None, None, None, 1, 0, 1, 1]
    values = [args[i] if i < len(args) else node.kwargs.get(
        (*names, "groups")[i], defaults[i]) for i in range(7)]
    return tuple(values)


def _tensor_meta(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"{node.name} has no tensor metadata")
    return val


def _conv(node: Any) -> Conv:
    if _op(node) not in CONV_OPS:
        raise NoMatch(f"{getattr(node, 'name', node)} is not a conv2d")
    x, weight, bias, stride, padding, dilation, groups = _conv_args(node)
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or \
            bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr"):
        raise NoMatch(f"{node.name}: weights are not constants")
    if isinstance(padding, str):
        raise NoMatch(f"{node.name}: string padding {padding!r}")
    if _pair(dilation, 1) != (1, 1):
        raise NoMatch(f"{node.name}: dilation {dilation} unsupported")
    if int(groups or 1) != 1:
        raise NoMatch(f"{node.name}: groups={groups} unsupported")
    w = _tensor_meta(weight)
    sh, sw = _pair(stride, 1)
    ph, pw = _pair(padding, 0)
    kh, kw = int(w.shape[2]), int(w.shape[3])
    if sh != sw or ph != pw or kh != kw or ph != kh // 2:
        raise NoMatch(f"{node.name}: kernel {kh}x{kw} stride {stride} padding {padding} is "
                      "not a square 'same'-padded conv")
    for t in (_tensor_meta(node), _tensor_meta(x), w):
        if t.dtype != torch.float32:
            raise NoMatch(f"{node.name}: dtype {t.dtype} unsupported (fp32 only)")
    if _tensor_meta(x).shape[0] != 1:
        raise NoMatch(f"{node.name}: batch {_tensor_meta(x).shape[0]} unsupported (batch 1)")
    return Conv(node, weight, bias, sh, ph, kh)


def _sole_user(node: fx.Node, user: fx.Node) -> None:
    if list(node.users) != [user]:
        raise NoMatch(f"{node.name} is used outside the block")


def _main_path(last: fx.Node) -> tuple[fx.Node, list[Conv], list[fx.Node]]:
    """Walk back conv <- relu <- conv ... from the block's last conv; returns the block input,
    the convs (first to last) and the relu nodes between them."""
    convs = [_conv(last)]
    relus: list[fx.Node] = []
    while len(convs) < 3:
        src = _conv_args(convs[0].node)[0]
        prev = src.args[0] if _op(src) in RELU_OPS else None
        if not isinstance(prev, fx.Node) or _op(prev) not in CONV_OPS or \
                list(src.users) != [convs[0].node] or list(prev.users) != [src]:
            break  # `src` is the block input
        convs.insert(0, _conv(prev))
        relus.insert(0, src)
    return _conv_args(convs[0].node)[0], convs, relus


def _match_add(add: fx.Node) -> Match:
    """The block ending at `add` (then relu), or NoMatch with the reason."""
    if _op(add) not in ADD_OPS or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        raise NoMatch(f"{add.name} is not a plain add")
    users = list(add.users)
    if len(users) != 1 or _op(users[0]) not in RELU_OPS:
        acts = ", ".join(_op(u) or u.op for u in users)
        raise NoMatch(f"{add.name}: block ends in {acts or 'nothing'}, not a single relu")
    relu = users[0]
    reasons = []
    for last, residual in (add.args, add.args[::-1]):
        try:
            return _match_sides(last, residual, add, relu)
        except NoMatch as err:
            reasons.append(str(err))
    raise NoMatch("; ".join(reasons))


def _match_sides(last: Any, residual: Any, add: fx.Node, relu: fx.Node) -> Match:
    if not isinstance(last, fx.Node) or not isinstance(residual, fx.Node):
        raise NoMatch(f"{add.name} adds a non-tensor")
    _sole_user(last, add)
    source, convs, relus = _main_path(last)
    kernels = tuple(c.kernel for c in convs)
    if kernels not in MAIN_KERNELS:
        raise NoMatch(f"main path kernels {kernels} are neither basic (3, 3) nor bottleneck "
                      "(1, 3, 1)")
    downsample = None
    if residual is not source:
        downsample = _conv(residual)
        if downsample.kernel != 1 or _conv_args(residual)[0] is not source:
            raise NoMatch(f"residual {residual.name} is neither the block input nor a 1x1 conv "
                          "of it")
        _sole_user(residual, add)
    if _tensor_meta(residual).shape != _tensor_meta(last).shape:
        raise NoMatch(f"{add.name}: residual shape differs (broadcast add)")
    nodes = [c.node for c in convs] + relus + [add, relu]
    nodes += [downsample.node] if downsample else []
    order = {n: i for i, n in enumerate(add.graph.nodes)}
    return Match(source, tuple(convs), downsample, tuple(sorted(nodes, key=order.__getitem__)))


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Every basic/bottleneck residual block of `gm` this family can lower."""
    groups: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        if _op(node) not in ADD_OPS or not any(_op(a) in CONV_OPS for a in node.args):
            continue
        try:
            groups.append(list(_match_add(node).nodes))
        except NoMatch as err:
            log.debug("res_block: %s not fused: %s", node.name, err)
    return groups


FAMILY = KernelFamily(name=RULE, rule=RULE, find=find, lowering="hwaware.kernels.resblock_kernel")
