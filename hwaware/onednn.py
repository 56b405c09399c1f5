"""Convolutions and linear layers left in PyTorch, run by oneDNN with their weights reordered
once and their element-wise epilogue fused.

Stage: 3 (partition) asks which ops after a convolution oneDNN fuses (`post_op_count`), 5
(build) offers it, 6 (run) runs it. Goes in: a kernel that runs in PyTorch holding a 2-D
convolution (`aten.conv2d.default`) or a linear layer (`aten.linear.default`, or `addmm`,
`mm`, `matmul` of a constant (in, out) weight as GPT-2's Conv1D writes it) of a constant
float32 weight, optionally a zero pad before the convolution, and oneDNN's post-ops after it:
one binary op with another tensor (add, sub, mul), then one activation (relu, hardtanh/clamp,
silu, gelu, hardswish, hardsigmoid, sigmoid, tanh, leaky_relu); a linear layer takes one or
the other. Comes out: a host-program action running the kernel's PyTorch steps before the
layer, one oneDNN call (`torch.ops.mkldnn._convolution_pointwise`, `_linear_pointwise`) with
the weight reordered into oneDNN's blocked layout once (per input shape), the epilogue applied
as it writes its output (but for the activations oneDNN applies slower after a linear layer
than a pass of their own: `SLOW_AFTER_LINEAR`), then the kernel's PyTorch steps after it (a
view into heads, a LayerNorm), as Inductor does when it freezes a model. PyTorch eager's
`conv2d` reorders the weight on every call, and writes each epilogue op's result in a pass
of its own. The partition leaves an untuned convolution with its post-ops alone in its
kernel; a linear layer's kernel is the partition's whole kernel (its contraction and the ops
up to the next).

oneDNN's convolution computes in channels-last (NHWC) and returns channels-last tensors:
converting each result back to NCHW costs a pass over it, and the next oneDNN convolution
would convert it again. So a convolution's result stays channels-last where only oneDNN
convolutions read it (`channels_last_inputs`), and is made contiguous once (`hwaware.layout`:
PyTorch's own copy is 5-10x slower) where PyTorch ops, TVM kernels or the caller read it (a
view needs contiguous memory; a TVM kernel takes compact tensors).

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
from hwaware.program import KernelSpec, OpStep, slots_read

IMPL = "onednn"  # KernelSpec.impl of a kernel run this way
CONV = "aten.conv2d.default"
LINEAR = "aten.linear.default"
# Activations a linear layer leaves to PyTorch: oneDNN applies them slower than a pass of
# their own (AVX2 Zen 3, 2 threads, 128x768 -> 3072: the layer 4.8 ms, with GELU fused 5.8,
# then F.gelu 5.0; SiLU 5.8 vs 4.9; tanh 6.3 vs 5.4; ReLU fused costs nothing).
SLOW_AFTER_LINEAR = {"gelu", "swish", "tanh", "sigmoid"}
# a linear layer's op -> the positions of its input, weight and bias arguments, and whether
# the weight is stored (in, out) as a matmul's right operand (GPT-2's Conv1D is an addmm, some
# models write x @ W) rather than (out, in) as in nn.Linear
LINEAR_OPS: dict[str, tuple[int, int, int | None, bool]] = {
    LINEAR: (0, 1, 2, False), "aten.addmm.default": (1, 2, 0, True),
    "aten.mm.default": (0, 1, None, True), "aten.matmul.default": (0, 1, None, True)}
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
class Chain:
    """A kernel as oneDNN runs it: PyTorch's `head` steps, then one oneDNN call (the input in
    slot `source`, a zero `pad` before a convolution: F.pad's left, right, top, bottom, () for
    none; the `contraction` step and its `post` ops) writing slot `out`, then PyTorch's `tail`
    steps. A convolution kernel of the partition's cut (`post_op_count`) is the call alone."""

    head: tuple[OpStep, ...]
    source: int
    pad: tuple[int, ...]
    contraction: OpStep
    post: PostOps
    out: int
    tail: tuple[OpStep, ...]

    @property
    def is_conv(self) -> bool:
        return self.contraction.op == CONV


def takes(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> bool:
    """Whether oneDNN can run `spec` (see the module docstring) on this build of PyTorch."""
    return torch.backends.mkldnn.is_available() and chain_of(spec, constants) is not None


def channels_last_inputs(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> set[int]:
    """The input slots that `spec`, where it runs on oneDNN, takes channels-last as they come:
    those its convolution alone reads (its PyTorch steps may need contiguous memory)."""
    chain = chain_of(spec, constants) if spec.impl == IMPL else None
    if chain is None or not chain.is_conv:
        return set()
    by_pytorch = {slot for step in chain.head + chain.tail for slot in slots_read(step)}
    return {s for s in (chain.source, chain.post.other) if s is not None} - by_pytorch


def chain_of(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> Chain | None:
    """`spec`'s steps as a `Chain`, or None where they hold no convolution or linear layer of
    a constant float32 CPU weight."""
    steps = list(spec.steps)
    at = next((i for i, s in enumerate(steps) if _of_constant_weight(s, constants)), None)
    if at is None:
        return None
    readers = _reader_counts(spec)
    source, start = _operands(steps[at])[0]["v"], at
    pad: tuple[int, ...] = ()
    if at and steps[at - 1].op in PADS and steps[at - 1].out == source and \
            readers[source] == 1 and steps[at].op == CONV:
        zero_pad = _zero_pad(steps[at - 1])
        if zero_pad is not None:
            source, pad, start = steps[at - 1].args[0]["v"], zero_pad, at - 1
    post, value, end = PostOps(), steps[at].out, at + 1
    for step in steps[at + 1:]:
        extended = _extended(post, step, value, steps[at].op == CONV)
        if extended is None or readers[value] != 1:
            break
        post, value, end = extended, step.out, end + 1
    return Chain(tuple(steps[:start]), source, pad, steps[at], post, value,
                 tuple(steps[end:]))


def _reader_counts(spec: KernelSpec) -> dict[int, int]:
    """How many times each slot is read by `spec`'s steps, or from outside (its outputs)."""
    counts: dict[int, int] = {slot: 1 for slot in spec.outputs}
    for step in spec.steps:
        for slot in slots_read(step):
            counts[slot] = counts.get(slot, 0) + 1
    return counts


def _zero_pad(step: OpStep) -> tuple[int, ...] | None:
    """F.pad's (left, right, top, bottom) of a constant zero pad of the last two dims."""
    names = ("self", "pad", "mode", "value") if step.op == PADS[0] else ("self", "pad", "value")
    bound = dict(zip(names, step.args, strict=False)) | step.kwargs
    pad, mode, value = bound.get("pad"), bound.get("mode", "constant"), bound.get("value", 0)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, list) or \
            len(pad) != 4 or any(not isinstance(p, int) or p < 0 for p in pad):
        return None
    return tuple(pad)


def _of_constant_weight(step: OpStep, constants: dict[str, torch.Tensor]) -> bool:
    """Whether `step` is a convolution or linear layer of a computed input and a constant
    float32 CPU weight (and bias)."""
    if step.op != CONV and step.op not in LINEAR_OPS or step.kwargs:
        return False
    source, weight_arg, bias_arg = _operands(step)
    weight, bias = _constant(weight_arg, constants), _constant(bias_arg, constants)
    return isinstance(source, dict) and "v" in source and weight is not None and \
        weight.dim() == (4 if step.op == CONV else 2) and weight.dtype == torch.float32 and \
        not weight.is_cuda and (bias_arg is None or bias is not None and bias.dim() == 1)


def _operands(step: OpStep) -> tuple[Any, Any, Any]:
    """A convolution's or linear layer's (input, weight, bias) arguments (bias None if none)."""
    if step.op == CONV:
        return step.args[0], step.args[1] if len(step.args) > 1 else None, _conv_args(step)[0]
    at_input, at_weight, at_bias, _ = LINEAR_OPS[step.op]
    args = step.args + [None] * 3
    return args[at_input], args[at_weight], None if at_bias is None else args[at_bias]


def _extended(post: PostOps, step: OpStep, value: int, conv: bool) -> PostOps | None:
    """`post` with `step` (reading the chain's `value`) added, None where oneDNN cannot: a
    binary op with another tensor only before the activation (a linear layer takes one or the
    other, and no `SLOW_AFTER_LINEAR` activation); one activation."""
    mine = {"v": value}
    binary = binary_post_op(step.op, step.kwargs)
    if binary is not None and post.binary is None and post.unary == "none" and \
            len(step.args) == 2 and mine in step.args:
        other = step.args[1] if step.args[0] == mine else step.args[0]
        if binary == "sub" and step.args[0] != mine or not isinstance(other, dict) or \
                "v" not in other or other == mine:
            return None
        return PostOps(binary, other["v"])
    unary = unary_post_op(step.op, step.args[1:], step.kwargs) if step.args[:1] == [mine] \
        else None
    if unary is None or post.unary != "none" or not conv and (
            post.binary is not None or unary[0] in SLOW_AFTER_LINEAR):
        return None
    attr, scalars, algorithm = unary
    return PostOps(post.binary, post.other, attr, tuple(scalars), algorithm)


# ------------------------------------------------------------------------ running (stage 6)
def kernel_function(spec: KernelSpec, constants: dict[str, torch.Tensor],
                    keep_channels_last: bool) -> Callable[..., list[torch.Tensor]]:
    """`spec` (see `takes`) through oneDNN as a call on its inputs, in `spec.inputs` order,
    returning its outputs as `action` leaves them: how the build checks and times it."""
    run = action(spec, constants, keep_channels_last)

    def call(*inputs: torch.Tensor) -> list[torch.Tensor]:
        slots = dict(zip(spec.inputs, inputs, strict=True))
        run(slots)  # type: ignore[arg-type]
        return [slots[i] for i in spec.outputs]

    return call


def action(spec: KernelSpec, constants: dict[str, torch.Tensor], keep_channels_last: bool
           ) -> Callable[[list[Any]], None]:
    """A host-program action running `spec` (see `takes`); a convolution's result is left
    channels-last only where `keep_channels_last` (only oneDNN convolutions read it)."""
    from hwaware.runtime import torch_steps_action

    chain = chain_of(spec, constants)
    assert chain is not None, f"oneDNN does not take kernel {spec.name}"
    call = convolution(chain, constants) if chain.is_conv else linear(chain, constants)
    if chain.is_conv and not (keep_channels_last and not chain.tail):
        conv = call
        call = lambda x, other: to_contiguous(conv(x, other))  # noqa: E731
    source, other, out = chain.source, chain.post.other, chain.out
    head, tail = torch_steps_action(chain.head, constants), torch_steps_action(chain.tail,
                                                                               constants)

    def action(slots: list[Any]) -> None:
        head(slots)
        slots[out] = call(slots[source], None if other is None else slots[other])
        tail(slots)

    return action


def convolution(chain: Chain, constants: dict[str, torch.Tensor]
                ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """`chain`'s convolution as a function of its input (and the binary op's other operand),
    through oneDNN with the reordered weight cached per input shape."""
    bias_arg, stride, padding, dilation, groups = _conv_args(chain.contraction)
    weight = constants[chain.contraction.args[1]["c"]]
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


def linear(chain: Chain, constants: dict[str, torch.Tensor]
           ) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """`chain`'s linear layer as a function of its input (and the binary op's other operand),
    through oneDNN with the weight reordered once per number of rows."""
    _, weight_arg, bias_arg = _operands(chain.contraction)
    weight = constants[weight_arg["c"]]
    if LINEAR_OPS[chain.contraction.op][3]:  # stored (in, out)
        weight = weight.t().contiguous()
    bias = None if bias_arg is None else constants[bias_arg["c"]]
    post = chain.post
    packed: dict[int, torch.Tensor] = {}

    def run(x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        x = x.contiguous()
        rows = x.numel() // x.shape[-1]
        if rows not in packed:
            packed[rows] = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        if post.binary is None:
            return torch.ops.mkldnn._linear_pointwise(  # type: ignore[no-any-return]
                x, packed[rows], bias, post.unary, list(post.scalars), post.algorithm)
        assert other is not None
        return torch.ops.mkldnn._linear_pointwise.binary(  # type: ignore[no-any-return]
            x, other.contiguous(), packed[rows], bias, post.binary)

    return run


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
