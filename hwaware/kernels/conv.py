"""conv_block: a MobileNetV2/V3 inverted-residual block as ONE depth-first TIR kernel.

Pattern in (rewritten ATen graph, NCHW, fp32, batch 1, BatchNorm already folded into the convs):
    [1x1 conv (expand) -> act] -> [zero pad] -> kxk depthwise conv (k 3 or 5, stride 1 or 2)
    -> [act] -> [squeeze-excite] -> 1x1 conv (project) -> [+ block input (residual)]
with act one of relu, hardtanh/clamp/relu6, hardswish, silu; the squeeze-excite is
mean over (H, W) (or adaptive_avg_pool2d to 1x1) -> 1x1 conv -> act -> 1x1 conv ->
hardsigmoid or sigmoid -> channel scale.
The depthwise conv's padding is (top, left, bottom, right), each 0..k-1: its own symmetric
padding plus an optional zero `constant_pad_nd` read only by it (what `rewrite.fold_padding`
leaves of TF-style "same" padding: one more row and column at the bottom and right).
Anything else (dilation, grouped convs, other paddings or activations, batch > 1, non-fp32,
...) is skipped with a debug log line and stays on the unfused path.
Grouped convs with 1 < groups < channels (RegNet, ResNeXt) are not taken: the dw stage is one
vector lane per channel with no reduction, and a group width g > 1 adds a g-term reduction
whose inputs (channels of the same group) are not the output's lane, so it needs its own
layout and schedule; RegNet's block also differs around it (adaptive_avg_pool2d squeeze-excite,
relu after the residual add, strided 1x1 shortcut). Today each such conv is a plain
contraction kernel (on PyTorch untuned) with its epilogue on TVM.

This module is the TVM-free half (`find` and the `Block` it matches). Kernel out: one
depth-first PrimFunc, built and scheduled by `conv_kernel`, the lowering half, imported when a
kernel is lowered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily
from hwaware.rewrite.fold_padding import zero_pad_widths

log = logging.getLogger(__name__)

RULE = "hw_conv_block"
CONV = torch.ops.aten.conv2d.default
ADD = torch.ops.aten.add.Tensor
MEAN = torch.ops.aten.mean.dim
POOL = torch.ops.aten.adaptive_avg_pool2d.default  # to 1x1: the same global mean
MUL = torch.ops.aten.mul.Tensor
GATES: dict[Any, str] = {torch.ops.aten.hardsigmoid.default: "hardsigmoid",
                         torch.ops.aten.sigmoid.default: "sigmoid"}
ACTIVATIONS: dict[Any, str] = {
    torch.ops.aten.relu.default: "relu",
    torch.ops.aten.hardtanh.default: "clamp",
    torch.ops.aten.relu6.default: "clamp",  # F.relu6 (nn.ReLU6 is hardtanh)
    torch.ops.aten.clamp.default: "clamp",
    torch.ops.aten.hardswish.default: "hardswish",
    torch.ops.aten.silu.default: "silu",
}
DW_KERNELS = (3, 5)
DW_STRIDES = (1, 2)


# ------------------------------------------------------------------------------- pattern
@dataclass(frozen=True)
class Act:
    """An activation: its kind and, for clamp, its bounds."""

    kind: str
    lo: float = 0.0
    hi: float = 6.0


@dataclass
class Conv:
    """A convolution node with its constant weight (and bias, or None)."""

    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class SqueezeExcite:
    """A squeeze-excite between the depthwise and the project conv."""

    nodes: list[fx.Node]
    reduce: Conv
    act: Act
    expand: Conv
    gate: str
    scale: fx.Node  # mul(depthwise output, gate)


@dataclass
class Block:
    """One matched inverted-residual block."""

    nodes: list[fx.Node]
    expand: Conv | None
    expand_act: Act | None
    dw: Conv
    dw_act: Act | None
    project: Conv
    residual: bool
    se: SqueezeExcite | None = None
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)  # of the depthwise conv: top, left, bottom, right

    @property
    def stride(self) -> int:
        return int(_conv_attrs(self.dw.node)[0][0])


class NoMatch(Exception):
    """The depthwise conv at hand is not the middle of a block this family can lower."""


def _conv_attrs(node: fx.Node) -> tuple[list[int], list[int], list[int], int]:
    """(stride, padding, dilation, groups) of an aten.conv2d node, defaults filled in."""
    args: list[Any] = list(node.args) + [None] * (7 - len(node.args))
    stride = args[3] or node.kwargs.get("stride", [1, 1])
    padding = args[4] or node.kwargs.get("padding", [0, 0])
    dilation = args[5] or node.kwargs.get("dilation", [1, 1])
    groups: Any = args[6] or node.kwargs.get("groups", 1)
    return _pair(stride), _pair(padding), _pair(dilation), int(groups)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind a get_attr node; None for a missing argument; NoMatch otherwise."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise NoMatch("weight or bias is not a constant")
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value.detach()


def _conv(gm: fx.GraphModule, node: Any, kind: str, kernels: tuple[int, ...] = DW_KERNELS,
          strides: tuple[int, ...] = DW_STRIDES, any_padding: bool = False) -> Conv:
    """`node` as a supported conv of `kind` ("pointwise" or "depthwise", the latter with a
    square kernel in `kernels`, a stride in `strides` and padding k//2, or with `any_padding`
    any padding the caller checks itself), else NoMatch."""
    if not isinstance(node, fx.Node) or node.target is not CONV:
        raise NoMatch(f"{kind}: not an aten.conv2d")
    stride, padding, dilation, groups = _conv_attrs(node)
    weight = _constant(gm, node.args[1])
    bias = _constant(gm, node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    assert weight is not None
    if weight.dtype != torch.float32 or _val(node).dtype != torch.float32:
        raise NoMatch(f"{kind}: dtype {weight.dtype} (only float32)")
    if dilation != [1, 1]:
        raise NoMatch(f"{kind}: dilation {dilation}")
    k = int(weight.shape[-1])
    if kind == "pointwise":
        if groups != 1 or weight.shape[-2:] != (1, 1) or stride != [1, 1] or padding != [0, 0]:
            raise NoMatch(f"pointwise: groups {groups} kernel {tuple(weight.shape[-2:])} "
                          f"stride {stride} padding {padding}")
    else:
        channels = int(weight.shape[0])
        if groups != channels or weight.shape[1] != 1:
            raise NoMatch(f"depthwise: groups {groups} for {channels} channels")
        if tuple(weight.shape[-2:]) != (k, k) or k not in kernels:
            raise NoMatch(f"depthwise: kernel {tuple(weight.shape[-2:])}")
        if stride[0] != stride[1] or stride[0] not in strides or \
                not any_padding and padding != [k // 2] * 2:
            raise NoMatch(f"depthwise: stride {stride} padding {padding}")
    return Conv(node, weight, bias)


def _val(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise NoMatch(f"{node.name} has no tensor value")
    return val


def _act(node: Any) -> Act | None:
    """The activation `node` computes, or None if it is not a supported activation."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    kind = ACTIVATIONS.get(node.target)
    if kind is None:
        return None
    if kind == "clamp":
        lo, hi = (list(node.args[1:3]) + [None, None])[:2]
        if node.target is torch.ops.aten.relu6.default:
            lo, hi = 0.0, 6.0
        elif node.target is torch.ops.aten.hardtanh.default:
            lo = -1.0 if lo is None else lo
            hi = 1.0 if hi is None else hi
        if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
            return None
        return Act(kind, float(lo), float(hi))
    return Act(kind)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _match(gm: fx.GraphModule, dw_node: fx.Node) -> Block:
    """The block around depthwise conv `dw_node`, or NoMatch naming why not."""
    dw = _conv(gm, dw_node, "depthwise", any_padding=True)
    if _val(dw_node).shape[0] != 1:
        raise NoMatch(f"batch {_val(dw_node).shape[0]} (only batch 1)")
    pad_node, pad = _padding(dw_node, int(dw.weight.shape[-1]))
    nodes = [dw_node] if pad_node is None else [pad_node, dw_node]
    expand, expand_act = _expand_of(gm, nodes[0].args[0])
    if expand is not None:
        nodes = [expand.node, nodes[0].args[0], *nodes]  # type: ignore[list-item]
    after = _only_user(dw_node)
    dw_act = _act(after)
    if dw_act is not None and after is not None:
        nodes.append(after)
    se = _squeeze_excite(gm, nodes[-1]) if len(nodes[-1].users) == 2 else None
    if se is not None:
        nodes += se.nodes
    last = se.scale if se is not None else nodes[-1]
    after = _only_user(last)
    if after is None or after.target is not CONV or after.args[0] is not last:
        raise NoMatch(f"depthwise {dw_node.name} is not followed (only) by a 1x1 conv "
                      f"(or a squeeze-excite and a 1x1 conv)")
    project = _conv(gm, after, "pointwise")
    nodes.append(after)
    residual = _residual(project.node, nodes[0].args[0])
    if residual is not None:
        nodes.append(residual)
    return Block(nodes, expand, expand_act, dw, dw_act, project, residual is not None, se, pad)


def _padding(dw_node: fx.Node, k: int) -> tuple[fx.Node | None, tuple[int, int, int, int]]:
    """The depthwise conv's (top, left, bottom, right) padding: its own plus that of a zero
    pad node read by it alone (returned too, else None), each 0..k-1, else NoMatch."""
    ph, pw = _conv_attrs(dw_node)[1]
    source = dw_node.args[0]
    widths = zero_pad_widths(source)
    pad_node = None
    extra = [0, 0, 0, 0]  # left, right, top, bottom (constant_pad_nd order)
    if widths is not None and isinstance(source, fx.Node) and _only_user(source) is dw_node \
            and len(widths) <= 4:
        pad_node, extra = source, widths + [0] * (4 - len(widths))
    pad = (ph + extra[2], pw + extra[0], ph + extra[3], pw + extra[1])
    if not all(0 <= p < k for p in pad):
        raise NoMatch(f"depthwise {dw_node.name}: padding {pad} (top, left, bottom, right) "
                      f"outside 0..{k - 1}")
    return pad_node, pad


def _int_list(value: Any) -> list[int]:
    return [int(v) for v in value]


def _squeeze_excite(gm: fx.GraphModule, x: fx.Node) -> SqueezeExcite:
    """The squeeze-excite reading `x` (the depthwise output, used by the pool and the scale),
    else NoMatch."""
    pool = next((u for u in x.users if u.target in (MEAN, POOL)), None)
    scale = next((u for u in x.users if u.target is MUL), None)
    if pool is None or scale is None:
        raise NoMatch(f"{x.name} feeds {[str(u.target) for u in x.users]}, not a squeeze-excite")
    if pool.target is POOL:
        if _int_list(pool.args[1]) != [1, 1]:
            raise NoMatch(f"{pool.name}: adaptive_avg_pool2d to {pool.args[1]}, not 1x1")
    else:
        dims = sorted(int(d) % 4 for d in _int_list(pool.args[1]))
        keepdim = pool.args[2] if len(pool.args) > 2 else pool.kwargs.get("keepdim", False)
        if dims != [2, 3] or not keepdim or pool.kwargs.get("dtype") is not None:
            raise NoMatch(f"{pool.name}: mean over {dims} (keepdim {keepdim}), not a global "
                          "pool")
    reduce = _conv(gm, _only_user(pool), "pointwise")
    act_node = _only_user(reduce.node)
    act = _act(act_node)
    if act is None or act_node is None:
        raise NoMatch(f"squeeze-excite of {x.name}: unsupported activation after the reduce")
    expand = _conv(gm, _only_user(act_node), "pointwise")
    gate = _only_user(expand.node)
    if gate is None or gate.target not in GATES or _only_user(gate) is not scale or \
            set(scale.args[:2]) != {x, gate}:
        raise NoMatch(f"squeeze-excite of {x.name}: no hardsigmoid/sigmoid gate scaling it")
    return SqueezeExcite([pool, reduce.node, act_node, expand.node, gate, scale], reduce, act,
                         expand, GATES[gate.target], scale)


def _expand_of(gm: fx.GraphModule, node: Any) -> tuple[Conv | None, Act | None]:
    """The expand conv + act feeding the depthwise conv, or (None, None) if there is none
    this family can take (then the depthwise conv's input is the block's input)."""
    act = _act(node)
    if act is None or _only_user(node) is None:
        return None, None
    conv = node.args[0]
    if not isinstance(conv, fx.Node) or conv.target is not CONV or _only_user(conv) is None:
        return None, None
    try:
        return _conv(gm, conv, "pointwise"), act
    except NoMatch as why:
        log.debug("conv_block: expand %s left out: %s", conv.name, why)
        return None, None


def _residual(project: fx.Node, block_input: Any) -> fx.Node | None:
    """The `add(block_input, project)` after the project conv, if there is one."""
    add = _only_user(project)
    if add is None or add.target is not ADD or add.kwargs.get("alpha", 1) != 1:
        return None
    operands = list(add.args[:2])
    if len(operands) != 2 or project not in operands:
        return None
    other = operands[1 - operands.index(project)]
    if other is not block_input or not isinstance(other, fx.Node):
        return None
    return add if tuple(_val(other).shape) == tuple(_val(project).shape) else None


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Every inverted-residual block of `gm` this family can lower, as node groups."""
    groups: list[list[fx.Node]] = []
    taken: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not CONV or node in taken:
            continue
        weight = node.args[1]
        if not isinstance(weight, fx.Node) or _conv_attrs(node)[3] == 1:
            continue  # not grouped: not the middle of a block
        try:
            block = _match(gm, node)
        except NoMatch as why:
            log.debug("conv_block: %s not fused: %s", node.name, why)
            continue
        if taken.intersection(block.nodes):
            log.debug("conv_block: %s overlaps a block already taken", node.name)
            continue
        taken.update(block.nodes)
        groups.append(block.nodes)
    return groups


FAMILY = KernelFamily(name="conv_block", rule=RULE, find=find,
                      lowering="hwaware.kernels.conv_kernel")
