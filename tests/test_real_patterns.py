"""Conv blocks as real models write them: an explicit zero pad (F.pad, TF-style "same") before
a `padding=0` convolution. `rewrite.fold_padding` on the graph; the conv_block family claiming
the padded blocks (symmetric, TF-same asymmetric at stride 1 and 2) and refusing a non-zero
pad; compiled outputs against eager PyTorch on inputs other than the compile-time ones, with
weights changed between calls; and transformers' MobileNetV2 (tf_padding, random weights from
a tiny config) with its inverted-residual blocks claimed by the fused family."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import hwaware
from hwaware.capture import capture
from hwaware.decompose import decompose
from hwaware.rewrite import rewrite
from hwaware.rewrite.fold_padding import fold_padding
from tests.helpers import assert_close_to_eager

aten = torch.ops.aten
PAD_OPS = (aten.pad.default, aten.constant_pad_nd.default)


class PadBlock(nn.Module):
    """An inverted-residual block whose depthwise conv (padding 0) reads `F.pad(y, pad, value)`:
    expand 1x1 + relu6 -> pad -> kxk depthwise (stride) + relu6 -> project 1x1 [+ input]."""

    def __init__(self, pad: tuple[int, int, int, int], stride: int = 1, k: int = 3,
                 value: float = 0.0, channels: int = 8, expand: int = 4, mode: str = "constant"):
        super().__init__()
        hidden = channels * expand
        self.pad, self.value, self.mode = pad, value, mode
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, k, stride, 0, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.residual = stride == 1 and pad[0] + pad[1] == k - 1 and pad[2] + pad[3] == k - 1
        with torch.no_grad():
            for conv in (self.expand, self.dw, self.project):
                conv.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand(x))
        if self.mode == "constant":
            y = F.pad(y, self.pad, value=self.value)
        else:
            y = F.pad(y, self.pad, mode=self.mode)
        y = self.project(F.relu6(self.dw(y)))
        return x + y if self.residual else y


# (left, right, top, bottom) as F.pad takes them, stride, kernel
PADDED = {
    "symmetric": ((1, 1, 1, 1), 1, 3),
    "symmetric_k5_stride2": ((2, 2, 2, 2), 2, 5),
    "tf_same_stride2": ((0, 1, 0, 1), 2, 3),  # TF-same, even input: bottom/right one more
    "tf_same_stride2_k5": ((1, 2, 1, 2), 2, 5),
    "asymmetric_stride1": ((0, 2, 1, 1), 1, 3),  # one-sided columns, 'same' output size
    "asymmetric_stride1_top": ((1, 1, 2, 0), 1, 3),
}


def _graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    captured = capture(model.eval(), (x,))
    rewrite(captured)
    return captured.graph_module


def _pads(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in PAD_OPS]


def _convs(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is aten.conv2d.default]


# ------------------------------------------------------------------------- rewrite
def test_symmetric_zero_pad_becomes_the_convs_padding() -> None:
    gm = _graph(PadBlock((1, 1, 1, 1)), torch.randn(1, 8, 10, 10))
    assert _pads(gm) == []
    dw = _convs(gm)[1]
    assert list(dw.args[4]) == [1, 1]


def test_asymmetric_pad_keeps_only_its_one_sided_part() -> None:
    """(left 1, right 2, top 1, bottom 2): (1, 1) moves into the conv, (0, 1, 0, 1) stays."""
    gm = _graph(PadBlock((1, 2, 1, 2), stride=2, k=5), torch.randn(1, 8, 10, 10))
    (pad,) = _pads(gm)
    assert list(pad.args[1]) == [0, 1, 0, 1]
    assert list(_convs(gm)[1].args[4]) == [1, 1]


def test_tf_same_stride2_pad_is_left_to_the_family() -> None:
    gm = _graph(PadBlock((0, 1, 0, 1), stride=2), torch.randn(1, 8, 10, 10))
    (pad,) = _pads(gm)
    assert list(pad.args[1]) == [0, 1, 0, 1]
    assert list(_convs(gm)[1].args[4]) == [0, 0]


@pytest.mark.parametrize("kwargs", [{"value": 1.0}, {"mode": "reflect"}, {"mode": "replicate"}],
                         ids=["value_1", "reflect", "replicate"])
def test_pad_that_is_not_zeros_is_not_folded(kwargs: dict[str, Any]) -> None:
    torch.manual_seed(4)
    model = PadBlock((1, 1, 1, 1), **kwargs).eval()
    x = torch.randn(1, 8, 10, 10)
    gm = _graph(model, x)
    (pad,) = _pads(gm)
    assert list(pad.args[1]) == [1, 1, 1, 1] and _convs(gm)[1].args[0] is pad
    assert list(_convs(gm)[1].args[4]) == [0, 0]
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    assert_close_to_eager(model, compiled, 2.0 * torch.randn(1, 8, 10, 10))


class PadUsedTwice(nn.Module):
    """A zero pad read by a conv and by an add: the add needs the padded tensor itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.pad(x, (1, 1, 1, 1))
        return self.conv(p) + p


class PadIntoChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 1, 1, 1, 1)))


@pytest.mark.parametrize("model", [PadUsedTwice, PadIntoChannels])
def test_pad_with_another_user_or_on_channels_is_kept(model: type[nn.Module]) -> None:
    torch.manual_seed(0)
    m = model().eval()
    x = torch.randn(1, 4, 9, 9)
    captured = capture(m, (x,))
    assert fold_padding(captured.graph_module) == 0
    compiled = hwaware.compile(m, (x,), db=None, show_progress=False)
    assert_close_to_eager(m, compiled, torch.randn(1, 4, 9, 9))


# ------------------------------------------------------------------ family + compile
@pytest.mark.parametrize("name", sorted(PADDED))
def test_padded_block_is_one_fused_kernel_matching_eager(name: str) -> None:
    pad, stride, k = PADDED[name]
    torch.manual_seed(1)
    model = PadBlock(pad, stride, k).eval()
    x = torch.randn(1, 8, 12, 12)
    (kernel,) = decompose(model, (x,)).kernels
    assert kernel.family == "conv_block" and sum("conv2d" in op for op in kernel.ops) == 3
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    assert "conv_block  tvm" in compiled.report()  # type: ignore[union-attr]
    for scale in (1.0, 4.0):
        assert_close_to_eager(model, compiled, scale * torch.randn(1, 8, 12, 12))


def test_non_zero_pad_stays_outside_the_fused_kernel() -> None:
    """F.pad(value=1): the pad is not zeros, so the depthwise conv sees padding 0 and the pad
    (with the expand conv before it) runs outside the fused kernel; outputs stay exact."""
    torch.manual_seed(2)
    model = PadBlock((0, 1, 0, 1), stride=2, value=1.0).eval()
    x = torch.randn(1, 8, 12, 12)
    kernels = decompose(model, (x,)).kernels
    fused = [k for k in kernels if k.family == "conv_block"]
    assert len(fused) == 1 and not any("pad" in op for op in fused[0].ops)
    assert any("pad" in op for k in kernels if k.family != "conv_block" for op in k.ops)
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    assert_close_to_eager(model, compiled, 3.0 * torch.randn(1, 8, 12, 12))


def test_padded_blocks_with_weights_changed_between_calls() -> None:
    """Through torch.compile: new weights (in place) reach the fused TF-same kernel."""
    torch.manual_seed(3)
    model = nn.Sequential(PadBlock((0, 1, 0, 1), stride=2), PadBlock((1, 1, 1, 1))).eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": None})
    assert_close_to_eager(model, compiled, torch.randn(1, 8, 12, 12))
    with torch.no_grad():
        model[0].dw.weight.mul_(-1.5)
        model[1].expand.bias.add_(0.5)
        model[1].project.weight.add_(0.1)
    assert_close_to_eager(model, compiled, torch.randn(1, 8, 12, 12))


# -------------------------------------------------------------- transformers MobileNetV2
def _mobilenet_v2(size: int) -> tuple[nn.Module, int]:
    """transformers' MobileNetV2 (tf_padding=True, its default) from a tiny config with random
    weights and BatchNorm statistics; and how many depthwise convs it has."""
    transformers = pytest.importorskip("transformers")
    from tests.conformance.models import randomize

    torch.manual_seed(0)
    config = transformers.MobileNetV2Config(image_size=size, depth_multiplier=0.35)
    assert config.tf_padding
    model = randomize(transformers.MobileNetV2Model(config).eval())
    depthwise = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    return model, depthwise


def test_transformers_mobilenet_v2_blocks_are_fused_and_match_eager() -> None:
    """Every depthwise conv (the stem's and the 16 inverted-residual blocks') is the middle of
    one conv_block kernel: 40 px has TF-same stride-2 pads both asymmetric (even sizes) and
    symmetric (odd sizes); only the stem conv and the last 1x1 conv stay plain."""
    model, depthwise = _mobilenet_v2(40)
    x = torch.randn(1, 3, 40, 40)
    kernels = decompose(model, (x,)).kernels
    fused = [k for k in kernels if k.family == "conv_block"]
    assert len(fused) == depthwise == 17
    assert sum(any("pad" in op for op in k.ops) for k in fused) >= 2  # asymmetric stride 2
    plain_convs = sum("conv2d" in op for k in kernels if k.family != "conv_block" for op in k.ops)
    assert plain_convs == 2
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    for scale in (1.0, 2.0):
        assert_close_to_eager(model, compiled, scale * torch.randn(1, 3, 40, 40))


def test_transformers_efficientnet_blocks_are_fused_and_match_eager() -> None:
    """EfficientNet (ZeroPad2d before its 'valid' stride-2 depthwise convs, squeeze-excite
    pooled with adaptive_avg_pool2d): every block is one conv_block kernel."""
    transformers = pytest.importorskip("transformers")
    from tests.conformance.models import randomize

    torch.manual_seed(0)
    config = transformers.EfficientNetConfig(image_size=64, width_coefficient=0.1,
                                             depth_coefficient=0.1, hidden_dim=128)
    model = randomize(transformers.EfficientNetModel(config).eval())
    depthwise = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    x = torch.randn(1, 3, 64, 64)
    fused = [k for k in decompose(model, (x,)).kernels if k.family == "conv_block"]
    assert len(fused) == depthwise == 7
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    assert_close_to_eager(model, compiled, 2.0 * torch.randn(1, 3, 64, 64))
