"""Convolutions left in PyTorch run by oneDNN with their weights reordered once
(`hwaware.onednn`): what it takes, that it computes PyTorch's convolution, and that a compiled
model running its convolutions this way equals eager on other inputs and after a save."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import hwaware
from hwaware import onednn
from tests.helpers import assert_close_to_eager


def _big_convs() -> tuple[nn.Module, torch.Tensor]:
    """Three convs too large for the untuned TVM conv schedule (they stay in PyTorch): a 3x3
    with bias, a strided 1x1 without, a grouped dilated 3x3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 256, 1, stride=2, bias=False), nn.ReLU(),
                          nn.Conv2d(256, 256, 3, padding=2, dilation=2, groups=4)).eval()
    return model, torch.randn(1, 48, 40, 40)


def _convs_in_torch(compiled: object) -> list[object]:
    program = compiled.program  # type: ignore[attr-defined]
    return [k for k in program.kernels.values()
            if k.impl in ("torch", onednn.IMPL) and onednn.takes(k, program.constants)]


def test_each_conv_left_in_pytorch_is_taken_and_computes_pytorchs_conv() -> None:
    model, x = _big_convs()
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    convs = _convs_in_torch(compiled)
    assert len(convs) == 3, compiled.report()
    program = compiled.program
    other = torch.randn(2, 48, 20, 20)  # another batch and map size: reordered again
    with torch.no_grad():
        y = other
        for layer, kernel in zip([model[0], model[2], model[4]], convs, strict=True):
            conv = onednn.convolution(kernel.steps[0], program.constants)  # type: ignore[attr-defined]
            got = conv(y)
            torch.testing.assert_close(got, layer(y), rtol=1e-4, atol=1e-4)
            y = torch.relu(layer(y))


def test_a_model_running_its_convs_on_onednn_equals_eager_and_survives_save_load(
        tmp_path: Path) -> None:
    """Whatever the timing chose, the convs forced onto oneDNN: the model equals eager on
    other inputs, with the weights changed and the model compiled again, and loaded from disk
    (a oneDNN tensor is not saved: the weights are reordered again)."""
    model, x = _big_convs()
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    for kernel in _convs_in_torch(compiled):
        kernel.impl = onednn.IMPL  # type: ignore[attr-defined]
    compiled._run = None
    assert_close_to_eager(model, compiled, torch.randn_like(x))
    loaded = hwaware.load(compiled.save(tmp_path / "saved"))
    assert [k.impl for k in _convs_in_torch(loaded)] == [onednn.IMPL] * 3
    assert_close_to_eager(model, loaded, torch.randn_like(x))
    with torch.no_grad():
        model[0].weight.mul_(-0.5)
    again = hwaware.compile(model, (x,), db=None, show_progress=False)
    for kernel in _convs_in_torch(again):
        kernel.impl = onednn.IMPL  # type: ignore[attr-defined]
    again._run = None
    assert_close_to_eager(model, again, torch.randn_like(x))


def test_a_conv_whose_weight_is_an_input_is_not_taken() -> None:
    """The weight changes between calls: nothing to reorder once, the conv stays PyTorch's."""

    class WeightIn(nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, w, padding=1)

    model = WeightIn().eval()
    inputs = (torch.randn(1, 48, 24, 24), torch.randn(48, 48, 3, 3))
    compiled = hwaware.compile(model, inputs, db=None, show_progress=False)
    assert not _convs_in_torch(compiled), compiled.report()
    assert_close_to_eager(model, compiled, *(torch.randn_like(t) for t in inputs))
