"""The untuned direct-convolution schedule (`hwaware.tvm.direct_conv`): what it takes, that it
computes what PyTorch does (strides, padding, groups, maps narrower or wider than a vector), and
that a small CNN's convolutions run on TVM without tuning."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import hwaware
from hwaware.tvm import direct_conv, ir, schedules
from hwaware.tvm.isa import AVX512
from tests.helpers import (
    assert_close_to_eager,
    built_callable,
    checked_on_tvm,
    fused_kernels,
    on_tvm,
)


def test_pixel_vectors_never_cross_a_row_part_way() -> None:
    """A vector holds part of one row or whole rows: TVM's vectorizer got vectors that cross a
    row boundary part-way wrong (56-wide rows in 16-lane vectors)."""
    assert direct_conv.vector_of_pixels(56, 56, 16) == 14
    assert direct_conv.vector_of_pixels(8, 8, 16) == 16  # two whole rows
    assert direct_conv.vector_of_pixels(7, 7, 16) == 7
    assert direct_conv.vector_of_pixels(4, 4, 16) == 16
    assert direct_conv.vector_of_pixels(24, 24, 8) == 8


# (in, out, map, kernel, stride, padding, groups): a RegNet stem, a strided grouped conv, a
# TF-style 7x7/4 patch embedding, a 1x1, rows of 14 and 12 pixels (not whole vectors), 2x2 maps,
# a depthwise conv, a parallel one (over PARALLEL_MACS)
CONVS = [(3, 16, 32, 3, 2, 1, 1), (16, 16, 16, 3, 2, 1, 2), (3, 8, 32, 7, 4, 2, 1),
         (16, 24, 8, 1, 1, 0, 1), (8, 8, 14, 3, 1, 1, 1), (6, 12, 24, 5, 1, 2, 3),
         (16, 32, 4, 3, 2, 1, 4), (8, 8, 16, 3, 1, 1, 8), (32, 32, 16, 3, 1, 1, 1)]


@pytest.mark.parametrize("conv", CONVS, ids=[str(c) for c in CONVS])
def test_direct_conv_matches_pytorch(conv: tuple[int, ...], llvm_host: Any) -> None:
    """Conv (+ bias + ReLU) kernels scheduled by the rule compute PyTorch's outputs on inputs
    other than the ones they were lowered with."""
    cin, cout, size, k, stride, pad, groups = conv
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, groups=groups), nn.ReLU()).eval()
    x = torch.randn(1, cin, size, size)
    mod = fused_kernels(model, x, llvm_host)
    taken = [name for name, f in ir.prim_funcs(mod).items()
             if direct_conv.schedule_direct_conv(f, AVX512) is not None]
    assert any("conv" in name for name in taken), list(ir.prim_funcs(mod))
    call = built_callable(mod, llvm_host)  # DirectConv among its rules
    other = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(call(other)[0], model(other), rtol=1e-4, atol=1e-5)


def _run_into_garbage(func: Any, inputs: list[Any], tgt: Any) -> Any:
    """One TIR function built alone and run on `inputs`, its output buffer filled with NaN
    first (a VM reuses buffers: a value the function never writes is garbage there)."""
    import numpy as np
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=tgt)
    out = func.params[-1]
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in inputs] + [tvm.runtime.tensor(
        np.full([int(d) for d in out.shape], np.nan, dtype="float32"), tvm.cpu())]
    lib["main"](*args)
    return args[-1].numpy()


def test_a_padding_epilogue_is_written_whole(llvm_host: Any) -> None:
    """Conv + ReLU + a padding for the next layer, fused into one kernel (as torch.export and
    ONNX graphs of TF-style models give it): the padded border, which no register tile covers,
    is written too (per tile it was left unwritten, garbage in a VM's reused buffer: wrong
    outputs through the ONNX entry point)."""
    import numpy as np

    model = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)))
    (func,) = ir.prim_funcs(fused_kernels(model, torch.randn(1, 8, 8, 8), llvm_host)).values()
    scheduled = direct_conv.schedule_direct_conv(func, AVX512)
    assert scheduled is not None
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal([int(d) for d in p.shape]).astype("float32")
              for p in func.params[:-1]]
    expected = _run_into_garbage(func, inputs, llvm_host)
    got = _run_into_garbage(scheduled.mod["main"], inputs, llvm_host)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_what_is_not_a_small_conv_is_declined(llvm_host: Any) -> None:
    """A Linear layer (a matmul, not a conv) and a conv over `MAX_MACS` multiply-adds (where
    oneDNN's blocked kernels win): the rule declines them."""
    import tvm

    big = nn.Conv2d(64, 64, 3, padding=1)  # 64 x 64 x 9 x 28 x 28 = 29 M multiply-adds
    for model, x in [(nn.Linear(48, 32), torch.randn(1, 16, 48)),
                     (big, torch.randn(1, 64, 28, 28))]:
        funcs = ir.prim_funcs(fused_kernels(model, x, llvm_host))
        assert funcs and not any(direct_conv.takes(f, AVX512) for f in funcs.values())
    (conv,) = funcs.values()
    assert not schedules.has_default_schedule(tvm.IRModule({"main": conv}), llvm_host)


def test_untuned_small_cnn_convs_are_built_on_tvm() -> None:
    """A small CNN written the way RegNet and ResNet stems are (a strided stem, a grouped
    strided conv, a 1x1) compiled without a database: it runs on TVM alone (here as one whole-
    model call, which only an untuned schedule for every conv allows), and computes eager's
    outputs on other inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 1), nn.ReLU()).eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = hwaware.compile(model, (x,), db=None)
    kernels = list(compiled.program.kernels.values())
    assert kernels and all(checked_on_tvm(k) for k in kernels), compiled.report()
    assert_close_to_eager(model, on_tvm(compiled), torch.randn(1, 3, 32, 32))
