"""convnext_block: a ConvNeXt (or ConvFirst) block as ONE depth-first TIR kernel.

Pattern in (rewritten ATen graph, fp32, batch 1, input NCHW), "depthwise first, then a
pointwise MLP":
    kxk depthwise conv (k 3, 5 or 7, stride 1, padding k//2, bias)
    -> either channels-last: permute(0, 2, 3, 1) -> [layer_norm over channels] -> linear C->E
       or NCHW: 1x1 conv C->E                      (ConvFirst, BatchNorm folded into the convs)
    -> act (gelu, exact erf or tanh approximation; or relu, relu6, hardswish, silu)
    -> linear / 1x1 conv E->C' -> [* gamma (layer scale)] -> [permute(0, 3, 1, 2)]
    -> [+ block input (residual)]
The ConvNeXt block is the channels-last form with LayerNorm, GELU and gamma. The ConvFirst
block of Lavin, "On the Efficiency of Convolutional Neural Networks" (2024) puts the depthwise
conv first too, with 1x1 convs and BatchNorm (folded before this family sees it): the NCHW
form. Anything else (LayerNorm over other dims, other kernels or strides, a node used outside
the block, batch > 1, non-fp32, ...) is skipped with a debug log line (unfused path).

This module is the TVM-free half (`find` and the `Block` it matches). Kernel out: one
depth-first PrimFunc, built and scheduled by `convnext_kernel`, the lowering half, imported when
a kernel is lowered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily
from hwaware.kernels.conv import (
    ACTIVATIONS,
    CONV,
    Act,
    Conv,
    NoMatch,
    _act,
    _constant,
    _conv,
    _conv_attrs,
    _only_user,
    _residual,
    _val,
)

log = logging.getLogger(__name__)

RULE = "hw_convnext"
DW_KERNELS = (3, 5, 7)
PERMUTE = torch.ops.aten.permute.default
LAYER_NORM = torch.ops.aten.layer_norm.default
LINEAR = torch.ops.aten.linear.default
GELU = torch.ops.aten.gelu.default
MUL = torch.ops.aten.mul.Tensor
TO_CHANNELS_LAST, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


# ------------------------------------------------------------------------------- pattern
@dataclass
class Dense:
    """A pointwise layer (linear or 1x1 conv): weight [out, in], bias [out]."""

    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class Norm:
    """A LayerNorm over the channels: weight, bias, eps."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


@dataclass
class Block:
    """One matched depthwise-first block."""

    nodes: list[fx.Node]
    dw: Conv
    norm: Norm | None
    fc1: Dense
    act: Act
    fc2: Dense
    gamma: torch.Tensor | None
    residual: bool


def _ints(value: Any) -> list[int]:
    return [int(v) for v in value]


def _is(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _next(node: fx.Node, what: str) -> fx.Node:
    """The only user of `node`, else NoMatch."""
    user = _only_user(node)
    if user is None:
        raise NoMatch(f"{node.name} has {len(node.users)} users where {what} should follow")
    return user


def _dense(gm: fx.GraphModule, node: fx.Node, channels_last: bool, c_in: int) -> Dense:
    """`node` as linear (channels-last) or 1x1 conv (NCHW) over `c_in` channels, else NoMatch."""
    if channels_last:
        if not _is(node, LINEAR):
            raise NoMatch(f"{node.name}: {node.target} where a linear should be")
        weight = _constant(gm, node.args[1])
        bias = _constant(gm, node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        assert weight is not None
        if weight.dtype != torch.float32 or _val(node).dtype != torch.float32:
            raise NoMatch(f"{node.name}: dtype {weight.dtype} (only float32)")
    else:
        conv = _conv(gm, node, "pointwise")
        weight, bias = conv.weight.flatten(1), conv.bias
    if weight.dim() != 2 or weight.shape[1] != c_in:
        raise NoMatch(f"{node.name}: weight {tuple(weight.shape)} for {c_in} channels")
    return Dense(node, weight, bias if bias is not None else torch.zeros(weight.shape[0]))


def _layer_norm(gm: fx.GraphModule, node: fx.Node, channels: int) -> Norm:
    args: list[Any] = list(node.args) + [None] * (5 - len(node.args))
    shape = _ints(args[1])
    if shape != [channels]:
        raise NoMatch(f"{node.name}: LayerNorm over {shape}, not the {channels} channels")
    weight = _constant(gm, args[2] if args[2] is not None else node.kwargs.get("weight"))
    bias = _constant(gm, args[3] if args[3] is not None else node.kwargs.get("bias"))
    eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
    assert isinstance(eps, (int, float))
    return Norm(weight if weight is not None else torch.ones(channels),
                bias if bias is not None else torch.zeros(channels), float(eps))


def _activation(node: fx.Node) -> Act:
    if _is(node, GELU):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else
                                      "none")
        return Act("gelu_tanh" if approximate == "tanh" else "gelu")
    act = _act(node) if node.target in ACTIVATIONS else None
    if act is not None:
        return act
    raise NoMatch(f"{node.name}: {node.target} is not a supported activation")


def _gamma(gm: fx.GraphModule, mul: fx.Node, value: fx.Node, channels_last: bool,
           channels: int) -> torch.Tensor | None:
    """The per-channel layer scale of `mul(gamma, value)`, or None if `mul` is not one."""
    if not _is(mul, MUL) or len(mul.args) != 2 or value not in mul.args:
        return None
    other = mul.args[1 - mul.args.index(value)]
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None
    gamma = _constant(gm, other)
    assert gamma is not None
    dims = list(gamma.shape)
    want = [channels] if channels_last else [channels, 1, 1]
    while len(dims) > len(want) and dims[0] == 1:
        dims.pop(0)
    if dims != want or gamma.dtype != torch.float32:
        raise NoMatch(f"{mul.name}: scale of shape {tuple(gamma.shape)} is not per channel")
    return gamma.reshape(channels)


def _match(gm: fx.GraphModule, dw_node: fx.Node) -> Block:
    """The block starting at depthwise conv `dw_node`, or NoMatch naming why not."""
    dw = _conv(gm, dw_node, "depthwise", kernels=DW_KERNELS, strides=(1,))
    channels = int(dw.weight.shape[0])
    if _val(dw_node).shape[0] != 1:
        raise NoMatch(f"batch {_val(dw_node).shape[0]} (only batch 1)")
    nodes = [dw_node]
    node = _next(dw_node, "the MLP")
    channels_last = _is(node, PERMUTE) and _ints(node.args[1]) == TO_CHANNELS_LAST
    norm = None
    if channels_last:
        nodes.append(node)
        node = _next(node, "a LayerNorm or linear")
        if _is(node, LAYER_NORM):
            norm = _layer_norm(gm, node, channels)
            nodes.append(node)
            node = _next(node, "a linear")
    fc1 = _dense(gm, node, channels_last, channels)
    act_node = _next(fc1.node, "an activation")
    act = _activation(act_node)
    fc2 = _dense(gm, _next(act_node, "the second pointwise layer"), channels_last,
                 int(fc1.weight.shape[0]))
    nodes += [fc1.node, act_node, fc2.node]
    last = fc2.node
    user = _only_user(last)
    gamma = _gamma(gm, user, last, channels_last, int(fc2.weight.shape[0])) if user else None
    if gamma is not None and user is not None:
        nodes.append(user)
        last = user
    if channels_last:
        back = _next(last, "permute(0, 3, 1, 2)")
        if not _is(back, PERMUTE) or _ints(back.args[1]) != TO_NCHW:
            raise NoMatch(f"{back.name}: channels-last MLP not permuted back to NCHW")
        nodes.append(back)
        last = back
    add = _residual(last, dw_node.args[0])
    if add is not None:
        nodes.append(add)
    return Block(nodes, dw, norm, fc1, act, fc2, gamma, add is not None)


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Every depthwise-first MLP block of `gm` this family can lower, as node groups."""
    groups: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        if not _is(node, CONV) or not isinstance(node.args[1], fx.Node) or \
                _conv_attrs(node)[3] == 1:
            continue  # not grouped: not the start of a block
        try:
            groups.append(_match(gm, node).nodes)
        except NoMatch as why:
            log.debug("convnext_block: %s not fused: %s", node.name, why)
    return groups


FAMILY = KernelFamily(name="convnext_block", rule=RULE, find=find,
                      lowering="hwaware.kernels.convnext_kernel")
