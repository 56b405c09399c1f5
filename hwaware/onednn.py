"""Convolutions left in PyTorch, run by oneDNN with their weights reordered once and their
element-wise epilogue fused.

Stage: 3 (partition) asks which ops after a convolution oneDNN fuses (`post_op_count`), 5
(build) offers it, 6 (run) runs it. Goes in: a kernel that runs in PyTorch made of a 2-D
convolution (`aten.conv2d.default`) of a constant float32 weight, optionally after a zero pad
and before oneDNN's post-ops: one binary op with a tensor of the output's shape (add, sub,
mul), then one activation (relu, hardtanh/clamp, silu, gelu, hardswish, hardsigmoid, sigmoid,
tanh, leaky_relu). Comes out: a host-program action calling oneDNN's convolution
(`torch.ops.mkldnn._convolution_pointwise`) with the weight reordered into oneDNN's blocked
layout once, for the input's shape, and the epilogue applied as the convolution writes its
output, as Inductor does when it freezes a model. PyTorch eager's `conv2d` reorders the weight
on every call, and writes each epilogue op's result in a pass of its own.

oneDNN computes in channels-last (NHWC) and returns channels-last tensors: converting each
result back to NCHW costs a pass over it, and the next oneDNN convolution would convert it
again. So a result stays channels-last where only oneDNN kernels read it, and is made
contiguous once (`hwaware.layout`: PyTorch's own copy is 5-10x slower) where PyTorch ops, TVM
kernels or the caller read it (a view needs contiguous memory; a TVM kernel takes compact
tensors).

The build checks it against the kernel's PyTorch ops, times both and keeps it where it is
clearly faster (`KernelSpec.impl` is then `IMPL`; `torch_us` holds the PyTorch ops' time,
`tvm_us` stays None: no TVM code runs). The kernel's PyTorch steps stay its reference and
fallback. A oneDNN tensor is not saved: a loaded model reorders the weight again on its first
call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hwaware.layout import to_contiguous
from hwaware.program import KernelSpec, OpStep

IMPL = "onednn"  # KernelSpec.impl of a kernel run this way
CONV = "aten.conv2d.default"
PADS = ("aten.pad.default", "aten.constant_pad_nd.default")
_DEFAULTS = [None, [1, 1], [0, 0], [1, 1], 1]  # conv2d's bias, stride, padding, dilation, groups
BINARY_POST_OPS = {"aten.add.Tensor": "add", "aten.sub.Tensor": "sub", "aten.mul.Tensor": "mul"}
# activation op -> oneDNN's attribute name, the scalars it takes from the op's arguments
UNARY_POST_OPS: dict[str, tuple[str, Callable[[Sequence[Any]], list[float]]]] = {
    "aten.relu.default": ("relu", lambda a: []),
    "aten.sigmoid.default": ("sigmoid", lambda a: []),
    "aten.tanh.default": ("tanh", lambda a: []),
    "aten.silu.default": ("swish", lambda a: []),
    "aten.hardswish.default": ("hardswish", lambda a: []),
    "aten.hardsigmoid.default": ("hardsigmoid", lambda a: []),
    "aten.gelu.default": ("gelu", lambda a: []),
    "aten.leaky_relu.default": ("leaky_relu", lambda a: [float(a[0]) if a else 0.01]),
    "aten.hardtanh.default": ("hardtanh", lambda a: [float(a[0]) if a else -1.0,
                                                     float(a[1]) if len(a) > 1 else 1.0]),
    "aten.clamp.default": ("hardtanh", lambda a: [float(a[0]), float(a[1])]),
    "aten.relu6.default": ("hardtanh", lambda a: [0.0, 6.0]),
}


@dataclass(frozen=True)
class PostOps:
    """What oneDNN applies as it writes a convolution's output: `binary` with the tensor in
    slot `other` (an input of the kernel), then the activation `unary`."""

    binary: str | None = None
    other: int | None = None
    unary: str = "none"
    scalars: tuple[float, ...] = ()
    algorithm: str = ""


# ------------------------------------------------------------------ which ops fuse (stage 3)
def unary_post_op(op: str, args: Sequence[Any], kwargs: dict[str, Any]
                  ) -> tuple[str, list[float], str] | None:
    """oneDNN's (attribute, scalars, algorithm) for the activation `op` applied with the
    arguments `args` after its input (and `kwargs`), or None where oneDNN has none."""
    if op not in UNARY_POST_OPS or any(not isinstance(v, int | float) for v in args) or \
            (op == "aten.clamp.default" and len(args) != 2):  # clamp(x, None, 6): not hardtanh
        return None
    attr, scalars = UNARY_POST_OPS[op]
    algorithm = str(kwargs.get("approximate", "none")) if attr == "gelu" else ""
    rest = {k: v for k, v in kwargs.items() if k != "approximate" or attr != "gelu"}
    return None if rest else (attr, scalars(args), algorithm)


def binary_post_op(op: str, kwargs: dict[str, Any]) -> str | None:
    """oneDNN's binary attribute for `op` (a tensor with a tensor), None where it has none."""
    alpha = kwargs.get("alpha", 1)
    if op not in BINARY_POST_OPS or set(kwargs) - {"alpha"} or alpha != 1:
        return None
    return BINARY_POST_OPS[op]


# ---------------------------------------------------------------- which kernels (stage 5)
@dataclass(frozen=True)
class ConvChain:
    """A kernel oneDNN runs: the input in slot `source`, a zero `pad` before the convolution
    (F.pad's left, right, top, bottom; () for none), the `conv` step and its `post` ops; the
    result goes to slot `out`."""

    source: int
    pad: tuple[int, ...]
    conv: OpStep
    post: PostOps
    out: int


def takes(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> bool:
    """Whether oneDNN can run `spec` (see the module docstring) on this build of PyTorch."""
    return torch.backends.mkldnn.is_available() and chain_of(spec, constants) is not None


def chain_of(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> ConvChain | None:
    """`spec`'s steps as a `ConvChain`, or None where they are not one: other ops, a weight
    that is not a constant float32 CPU tensor, a value of the chain read elsewhere."""
    steps = list(spec.steps)
    pad: tuple[int, ...] = ()
    if steps and steps[0].op in PADS:
        zero_pad = _zero_pad(steps[0])
        if zero_pad is None or len(steps) < 2 or steps[1].args[:1] != [{"v": steps[0].out}]:
            return None
        pad, steps[1] = zero_pad, _reading(steps[1], steps[0].args[0])
        steps.pop(0)
    if not steps or steps[0].op != CONV or steps[0].kwargs or not _constant_weight(
            steps[0], constants) or not (isinstance(steps[0].args[0], dict)
                                         and "v" in steps[0].args[0]):
        return None
    conv, post, value = steps[0], PostOps(), steps[0].out
    for step in steps[1:]:
        extended = _extended(post, step, value, spec.inputs)
        if extended is None:
            return None
        post, value = extended, step.out
    if spec.outputs != [value]:
        return None
    return ConvChain(conv.args[0]["v"], pad, conv, post, value)


def _reading(step: OpStep, source: Any) -> OpStep:
    """`step` with its first argument replaced by `source` (the pad folded into the chain)."""
    return OpStep(step.op, [source, *step.args[1:]], step.kwargs, step.out)


def _zero_pad(step: OpStep) -> tuple[int, ...] | None:
    """F.pad's (left, right, top, bottom) of a constant zero pad of the last two dims."""
    names = ("self", "pad", "mode", "value") if step.op == PADS[0] else ("self", "pad", "value")
    bound = dict(zip(names, step.args, strict=False)) | step.kwargs
    pad, mode, value = bound.get("pad"), bound.get("mode", "constant"), bound.get("value", 0)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, list) or \
            len(pad) != 4 or any(not isinstance(p, int) or p < 0 for p in pad):
        return None
    return tuple(pad)


def _constant_weight(conv: OpStep, constants: dict[str, torch.Tensor]) -> bool:
    weight = _constant(conv.args[1], constants) if len(conv.args) > 1 else None
    bias = _conv_args(conv)[0]
    return weight is not None and weight.dim() == 4 and weight.dtype == torch.float32 and \
        not weight.is_cuda and (bias is None or _constant(bias, constants) is not None)


def _extended(post: PostOps, step: OpStep, value: int, inputs: list[int]) -> PostOps | None:
    """`post` with `step` (reading the chain's `value`) added, None where oneDNN cannot: a
    binary op only before the activation, its other operand a kernel input; one activation."""
    mine = {"v": value}
    binary = binary_post_op(step.op, step.kwargs)
    if binary is not None and post.binary is None and post.unary == "none" and \
            len(step.args) == 2 and mine in step.args:
        other = step.args[1] if step.args[0] == mine else step.args[0]
        if binary == "sub" and step.args[0] != mine or not isinstance(other, dict) or \
                other.get("v") not in inputs:
            return None
        return PostOps(binary, other["v"])
    unary = unary_post_op(step.op, step.args[1:], step.kwargs) if step.args[:1] == [mine] \
        else None
    if unary is None or post.unary != "none":
        return None
    attr, scalars, algorithm = unary
    return PostOps(post.binary, post.other, attr, tuple(scalars), algorithm)


# ------------------------------------------------------------------------ running (stage 6)
def kernel_function(spec: KernelSpec, constants: dict[str, torch.Tensor],
                    keep_channels_last: bool) -> Callable[..., list[torch.Tensor]]:
    """`spec` (see `takes`) through oneDNN as a call on its inputs, in `spec.inputs` order,
    returning [its output] as `action` leaves it: how the build checks and times it."""
    chain, run = _finished(spec, constants, keep_channels_last)
    at = spec.inputs.index(chain.source)
    other = None if chain.post.other is None else spec.inputs.index(chain.post.other)

    def call(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return [run(inputs[at], None if other is None else inputs[other])]

    return call


def action(spec: KernelSpec, constants: dict[str, torch.Tensor], keep_channels_last: bool
           ) -> Callable[[list[Any]], None]:
    """A host-program action running `spec` (see `takes`); its result is left channels-last
    only where `keep_channels_last` (only oneDNN kernels read it)."""
    chain, run = _finished(spec, constants, keep_channels_last)
    source, other, out = chain.source, chain.post.other, chain.out

    def action(slots: list[Any]) -> None:
        slots[out] = run(slots[source], None if other is None else slots[other])

    return action


def _finished(spec: KernelSpec, constants: dict[str, torch.Tensor], keep_channels_last: bool
              ) -> tuple[ConvChain, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]]:
    """`spec`'s chain and its `convolution`, the result made contiguous unless kept."""
    chain = chain_of(spec, constants)
    assert chain is not None, f"oneDNN does not take kernel {spec.name}"
    conv = convolution(chain, constants)
    if keep_channels_last:
        return chain, conv
    return chain, lambda x, other: to_contiguous(conv(x, other))


def convolution(chain: ConvChain, constants: dict[str, torch.Tensor]
                ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """`chain` as a function of its input (and the binary op's other operand), through
    oneDNN with the reordered weight cached per input shape."""
    bias_arg, stride, padding, dilation, groups = _conv_args(chain.conv)
    weight = constants[chain.conv.args[1]["c"]]
    bias = None if bias_arg is None else constants[bias_arg["c"]]
    pad, padding = _padding(chain.pad, list(padding))
    post = chain.post
    packed: dict[tuple[int, ...], torch.Tensor] = {}

    def conv(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        x = torch.nn.functional.pad(_dense(x), pad) if pad else _dense(x)
        shape = tuple(x.shape)
        if shape not in packed:
            packed[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
                weight.to_mkldnn(), padding, stride, dilation, groups, list(shape))
        if post.binary is None:
            return torch.ops.mkldnn._convolution_pointwise(  # type: ignore[no-any-return]
                x, packed[shape], bias, padding, stride, dilation, groups, post.unary,
                list(post.scalars), post.algorithm)
        assert other is not None
        return torch.ops.mkldnn._convolution_pointwise.binary(  # type: ignore[no-any-return]
            x, _dense(other), packed[shape], bias, padding, stride, dilation, groups,
            post.binary, None, None if post.unary == "none" else post.unary,
            list(post.scalars), post.algorithm or None)

    return conv


def _padding(pad: tuple[int, ...], padding: list[int]) -> tuple[tuple[int, ...], list[int]]:
    """A symmetric zero pad folded into the convolution's own padding; an asymmetric one
    (TF-style "same" at stride 2) kept, applied before."""
    if not pad:
        return pad, padding
    left, right, top, bottom = pad
    if left == right and top == bottom:
        return (), [padding[0] + top, padding[1] + left]
    return pad, padding


def _dense(x: torch.Tensor) -> torch.Tensor:
    """`x` in a layout oneDNN reads directly: contiguous or channels-last."""
    if x.is_contiguous() or x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _conv_args(step: OpStep) -> list[Any]:
    """conv2d's (bias, stride, padding, dilation, groups), defaults filled in."""
    given = list(step.args[2:])
    return given + _DEFAULTS[len(given):]


def _constant(arg: Any, constants: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if isinstance(arg, dict) and "c" in arg:
        return constants.get(arg["c"])
    return None
