"""The channels-last to NCHW converter (`hwaware.layout`): the same values and layout as
PyTorch's `contiguous()` on every shape (partial tiles of pixels and channels, batches), other
strided tensors left to PyTorch, and a compiled model fed channels-last inputs equal to eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hwaware
from hwaware import layout, threads
from tests.helpers import assert_close_to_eager


@pytest.mark.parametrize("shape", [(1, 32, 112, 112), (2, 24, 30, 31), (1, 3, 224, 224),
                                   (3, 2048, 7, 7), (1, 13, 101, 37)])
def test_channels_last_becomes_the_same_contiguous_tensor(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    got = layout.to_contiguous(x)
    assert got.is_contiguous() and got.shape == x.shape
    assert torch.equal(got, x.contiguous())


@pytest.mark.skipif(threads.openmp_library("probe", "int hwaware_probe(void) { return 0; }")
                    is None, reason="no C compiler or libgomp: conversions stay PyTorch's")
def test_the_converter_is_built_where_native_helpers_build() -> None:
    """Where the thread launcher's toolchain is (every test host so far), the fast path is
    what runs: the tests above then check the converter, not PyTorch's copy."""
    assert layout._converter() is not None


def test_other_tensors_are_left_to_pytorch() -> None:
    contiguous = torch.randn(1, 16, 64, 64)
    assert layout.to_contiguous(contiguous) is contiguous
    for strided in (torch.randn(1, 64, 64, 16).permute(0, 3, 2, 1),  # neither layout
                    torch.randn(1, 16, 64, 64, dtype=torch.float64).contiguous(
                        memory_format=torch.channels_last),
                    torch.randn(64, 64, 16).permute(2, 0, 1)):  # 3-D
        got = layout.to_contiguous(strided)
        assert got.is_contiguous() and torch.equal(got, strided)


def test_a_compiled_model_takes_channels_last_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 16, 40, 40)
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    other = torch.randn_like(x).contiguous(memory_format=torch.channels_last)
    assert_close_to_eager(model, compiled, other)
