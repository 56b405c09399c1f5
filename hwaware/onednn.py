"""Convolutions left in PyTorch, run by oneDNN with their weights reordered once.

Stage: 5 (build) offers it, 6 (run) runs it. Goes in: a kernel that runs in PyTorch whose one
op is a 2-D convolution (`aten.conv2d.default`) of a constant float32 weight: a contraction
with no tuned TVM schedule, or a conv of a fused block taken apart. Comes out: a host-program
action calling oneDNN's convolution (`torch.ops.mkldnn._convolution_pointwise`) with the weight
reordered into oneDNN's blocked layout once, for the input's shape, as Inductor does when it
freezes a model. PyTorch eager's `conv2d` reorders the weight on every call, which on small
maps with many channels costs more than the convolution.

The build checks it against the eager op, times both and keeps it where it is clearly faster
(`KernelSpec.impl` is then `IMPL`; `torch_us` holds the eager op's time, `tvm_us` stays None:
no TVM code runs). The kernel's PyTorch steps stay its reference and fallback. A oneDNN
tensor is not saved: a loaded model reorders the weight again on its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hwaware.program import KernelSpec, OpStep

IMPL = "onednn"  # KernelSpec.impl of a kernel run this way
CONV = "aten.conv2d.default"
_DEFAULTS = [None, [1, 1], [0, 0], [1, 1], 1]  # conv2d's bias, stride, padding, dilation, groups


def takes(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> bool:
    """Whether `spec` is one 2-D convolution of a constant float32 weight on a CPU build with
    oneDNN."""
    if len(spec.steps) != 1 or spec.steps[0].op != CONV or spec.steps[0].kwargs or \
            not torch.backends.mkldnn.is_available():
        return False
    weight = _constant(spec.steps[0].args[1], constants)
    bias = _conv_args(spec.steps[0])[0]
    return weight is not None and weight.dim() == 4 and weight.dtype == torch.float32 and \
        not weight.is_cuda and (bias is None or _constant(bias, constants) is not None)


def action(spec: KernelSpec, constants: dict[str, torch.Tensor]) -> Callable[[list[Any]], None]:
    """A host-program action running `spec` (see `takes`) with the weight reordered for the
    first input shape it meets (again for another shape)."""
    step = spec.steps[0]
    call = convolution(step, constants)
    source, out = step.args[0]["v"], step.out

    def run(slots: list[Any]) -> None:
        slots[out] = call(slots[source])

    return run


def convolution(step: OpStep, constants: dict[str, torch.Tensor]
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`step`'s convolution as a function of its input, through oneDNN with the reordered
    weight cached per input shape."""
    bias_arg, stride, padding, dilation, groups = _conv_args(step)
    weight = constants[step.args[1]["c"]]
    bias = None if bias_arg is None else constants[bias_arg["c"]]
    packed: dict[tuple[int, ...], torch.Tensor] = {}

    def conv(x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in packed:
            packed[shape] = torch._C._nn.mkldnn_reorder_conv2d_weight(  # type: ignore[call-arg]
                weight.to_mkldnn(), padding, stride, dilation, groups, list(shape))
        return torch.ops.mkldnn._convolution_pointwise(  # type: ignore[no-any-return]
            x.contiguous(), packed[shape], bias, padding, stride, dilation, groups, "none",
            [], "")

    return conv


def _conv_args(step: OpStep) -> list[Any]:
    """conv2d's (bias, stride, padding, dilation, groups), defaults filled in."""
    given = list(step.args[2:])
    return given + _DEFAULTS[len(given):]


def _constant(arg: Any, constants: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if isinstance(arg, dict) and "c" in arg:
        return constants.get(arg["c"])
    return None
