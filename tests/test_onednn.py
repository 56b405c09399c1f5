"""Convolutions left in PyTorch run by oneDNN with their weights reordered once and their
epilogue fused (`hwaware.onednn`): what the partition leaves with a convolution, what oneDNN
takes, that it computes the kernel's PyTorch ops, that results stay channels-last only where
every reader takes any layout, and that a compiled model running its convolutions this way
equals eager on other inputs, after a save and with its weights changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hwaware
from hwaware import onednn
from hwaware.runtime import channels_last_slots, kernel_inputs, run_kernel_in_torch
from tests.helpers import assert_close_to_eager


def _big_convs() -> tuple[nn.Module, torch.Tensor]:
    """Three convs too large for the untuned TVM conv schedule (they stay in PyTorch): a 3x3
    with bias, a strided 1x1 without, a grouped dilated 3x3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 256, 1, stride=2, bias=False), nn.ReLU(),
                          nn.Conv2d(256, 256, 3, padding=2, dilation=2, groups=4)).eval()
    return model, torch.randn(1, 48, 40, 40)


class Epilogues(nn.Module):
    """Convolutions as real models write them, each followed by what oneDNN fuses: a TF-style
    asymmetric zero pad before a stride-2 conv and ReLU6 after it (MobileNet stems), a
    residual add then ReLU (ResNet), GELU (tanh), SiLU, clamp, leaky ReLU, a subtraction of
    another tensor, and a conv whose output is read twice (so nothing is fused after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 48, 3, stride=2)
        self.convs = nn.ModuleList(nn.Conv2d(48, 48, 3, padding=1) for _ in range(7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.convs
        y = F.relu6(self.stem(F.pad(x, (0, 1, 0, 1))))
        y = F.relu(c[0](y) + y)
        y = F.gelu(c[1](y), approximate="tanh")
        y = F.silu(c[2](y))
        y = torch.clamp(c[3](y), -1.0, 2.0)
        y = F.leaky_relu(c[4](y), 0.2)
        y = c[5](y) - y
        twice = c[6](y)
        return torch.sigmoid(twice) * twice


def _epilogues() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Epilogues().eval(), torch.randn(1, 3, 128, 128)  # a stem over MAX_MACS


def _compiled_on_onednn(model: nn.Module, x: torch.Tensor) -> Any:
    """`model` compiled, every kernel oneDNN takes forced onto it (whatever the timing chose)."""
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    compiled = compiled.kernel_plan or compiled
    for kernel in _taken(compiled):
        kernel.impl = onednn.IMPL
    compiled._run = None
    return compiled


def _taken(compiled: Any) -> list[Any]:
    program = compiled.program
    return [k for k in program.kernels.values()
            if k.impl in ("torch", onednn.IMPL) and onednn.takes(k, program.constants)]


def test_each_conv_left_in_pytorch_is_taken_with_its_activation() -> None:
    model, x = _big_convs()
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    convs = _taken(compiled)
    assert [[s.op for s in k.steps] for k in convs] == [
        [onednn.CONV, "aten.relu.default"]] * 2 + [[onednn.CONV]], compiled.report()
    assert not [k for k in compiled.program.kernels.values() if k not in convs]


def test_every_epilogue_is_fused_and_computes_the_kernels_pytorch_ops() -> None:
    """Each kernel oneDNN takes gives its PyTorch ops' result on inputs of another batch and
    map size (the weight is reordered again), whether its result stays channels-last or not."""
    model, x = _epilogues()
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    compiled = compiled.kernel_plan or compiled
    program = compiled.program
    fused = {tuple(s.op for s in k.steps if s.op != onednn.CONV) for k in _taken(compiled)}
    assert fused >= {("aten.pad.default", "aten.relu6.default"),
                     ("aten.add.Tensor", "aten.relu.default"), ("aten.gelu.default",),
                     ("aten.silu.default",), ("aten.clamp.default",),
                     ("aten.leaky_relu.default",), ("aten.sub.Tensor",), ()}, compiled.report()
    read_twice = [k for k in program.kernels.values() if "aten.sigmoid.default" in
                  [s.op for s in k.steps]]
    assert read_twice and all(onednn.CONV not in [s.op for s in k.steps] for k in read_twice)
    inputs = kernel_inputs(program, [torch.randn(2, 3, 134, 130)])
    with torch.no_grad():
        for kernel in _taken(compiled):
            expected = run_kernel_in_torch(program, kernel.name, inputs[kernel.name])
            for keep in (True, False):
                call = onednn.kernel_function(kernel, program.constants, keep)
                got = call(*inputs[kernel.name])
                torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
                assert got[0].is_contiguous() or keep


def test_results_stay_channels_last_only_where_only_onednn_reads_them() -> None:
    model, x = _epilogues()
    compiled = _compiled_on_onednn(model, x)
    program = compiled.program
    kept = channels_last_slots(program)
    onednn_out = {o for k in _taken(compiled) for o in k.outputs}
    assert onednn_out & kept, "consecutive oneDNN kernels pass channels-last results"
    assert not set(program.output_slots) & kept
    other_readers = {slot for k in program.kernels.values() if k.impl != onednn.IMPL
                     for slot in k.inputs}
    assert other_readers & onednn_out and not other_readers & kept


def test_a_view_after_a_onednn_conv_reads_a_contiguous_result() -> None:
    """A host view (a flatten that PyTorch writes as `view`) needs contiguous memory."""

    class ConvThenView(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(48, 64, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            return y.view(y.shape[0], -1)[:, :100] * 2

    torch.manual_seed(0)
    model, x = ConvThenView().eval(), torch.randn(1, 48, 40, 40)
    compiled = _compiled_on_onednn(model, x)
    assert _taken(compiled)
    assert_close_to_eager(model, compiled, torch.randn_like(x))


@pytest.mark.parametrize("build", [_big_convs, _epilogues])
def test_a_model_running_its_convs_on_onednn_equals_eager_and_survives_save_load(
        tmp_path: Path, build: Any) -> None:
    """Whatever the timing chose, the convs forced onto oneDNN: the model equals eager on
    other inputs, loaded from disk (a oneDNN tensor is not saved: the weights are reordered
    again), and compiled again with the weights changed."""
    model, x = build()
    compiled = _compiled_on_onednn(model, x)
    count = len(_taken(compiled))
    assert count >= 3
    assert_close_to_eager(model, compiled, torch.randn_like(x))
    loaded = hwaware.load(compiled.save(tmp_path / "saved"))
    assert [k.impl for k in _taken(loaded)] == [onednn.IMPL] * count
    assert_close_to_eager(model, loaded, torch.randn_like(x))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-0.5)
    assert_close_to_eager(model, _compiled_on_onednn(model, x), torch.randn_like(x))


def test_a_conv_whose_weight_is_an_input_is_not_taken() -> None:
    """The weight changes between calls: nothing to reorder once, the conv stays PyTorch's."""

    class WeightIn(nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.relu(F.conv2d(x, w, padding=1))

    model = WeightIn().eval()
    inputs = (torch.randn(1, 48, 24, 24), torch.randn(48, 48, 3, 3))
    compiled = hwaware.compile(model, inputs, db=None, show_progress=False)
    assert not _taken(compiled), compiled.report()
    assert_close_to_eager(model, compiled, *(torch.randn_like(t) for t in inputs))


def test_repeated_convs_are_timed_once_per_layout_and_each_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three convs of one shape with their own weights, each chosen onto oneDNN: the two whose
    results only oneDNN reads share one timing, the last (its result is the model's output,
    made contiguous) has its own; each is checked against its own PyTorch ops, and the model
    equals eager."""
    from hwaware import build

    timed: list[str] = []
    checked: list[str] = []
    real_timed, real_check = build._timed_against_pytorch, build._matches_pytorch

    def timing(program: Any, name: str, *args: Any) -> Any:
        timed.append(name)
        return real_timed(program, name, *args)

    def check(program: Any, name: str, *args: Any) -> bool:
        checked.append(name)
        return real_check(program, name, *args)

    monkeypatch.setattr(build, "_timed_against_pytorch", timing)
    monkeypatch.setattr(build, "_matches_pytorch", check)
    monkeypatch.setattr(build, "_faster", lambda ours_us, torch_us: True)  # each on oneDNN
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(3) for m in (nn.Conv2d(64, 64, 3, padding=1),
                                                           nn.ReLU()))).eval()
    x = torch.randn(1, 64, 40, 40)
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    compiled = compiled.kernel_plan or compiled
    convs = _taken(compiled)
    assert len(convs) == 3 and set(checked) >= {k.name for k in convs}, compiled.report()
    assert len([n for n in timed if n in {k.name for k in convs}]) == 2
    assert all(k.torch_us is not None for k in convs)
    assert_close_to_eager(model, compiled, torch.randn_like(x))


class Encoder(nn.Module):
    """Linear layers as transformer encoders write them: a projection of a scaled input split
    into heads (a multiplication before it, a view and a transpose after it), GELU, a residual
    add then LayerNorm, a pooler reading the first token with ReLU, and a linear layer whose
    result is read twice (nothing fused after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.pool, self.twice = (nn.Linear(64, 64) for _ in range(3))
        self.up, self.down = nn.Linear(64, 256), nn.Linear(256, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heads = self.query(x * 0.5).view(x.shape[0], x.shape[1], 4, 16).transpose(1, 2)
        y = self.norm(self.down(F.gelu(self.up(x))) + x)
        pooled = torch.relu(self.pool(y[:, 0]))
        twice = self.twice(y)
        return heads, torch.sigmoid(twice) * twice, pooled


def _linear_kernels(compiled: Any) -> list[Any]:
    program = compiled.program
    return [k for k in program.kernels.values() if onednn.takes(k, program.constants)
            and onednn.LINEAR in [s.op for s in k.steps]]


def test_linear_layers_run_on_onednn_with_their_epilogue_and_equal_their_pytorch_ops() -> None:
    """Each kernel holding a linear layer runs as PyTorch's steps before it, one oneDNN call
    of the layer with its activation or residual add, and PyTorch's steps after it; on
    other inputs it gives its PyTorch ops' results."""
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 24, 64)
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    compiled = compiled.kernel_plan or compiled
    program = compiled.program
    kernels = _linear_kernels(compiled)
    chains = [onednn.chain_of(k, program.constants) for k in kernels]
    posts = {(c.post.binary, c.post.unary) for c in chains if c is not None}
    assert len(kernels) == 5 and posts >= {("add", "none"), (None, "relu"), (None, "none")}, \
        compiled.report()
    assert [s.op for c in chains if c is not None for s in c.tail if "gelu" in s.op], \
        "GELU runs after the layer, in PyTorch: oneDNN applies it slower"
    assert any(c is not None and c.head and c.tail for c in chains)
    inputs = kernel_inputs(program, [torch.randn(2, 24, 64)])
    with torch.no_grad():
        for kernel in kernels:
            expected = run_kernel_in_torch(program, kernel.name, inputs[kernel.name])
            got = onednn.kernel_function(kernel, program.constants, False)(*inputs[kernel.name])
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_a_model_running_its_linear_layers_on_onednn_equals_eager_after_save_load(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 24, 64)
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    compiled = compiled.kernel_plan or compiled
    for kernel in _linear_kernels(compiled):
        kernel.impl = onednn.IMPL
    compiled._run = None
    assert_close_to_eager(model, compiled, torch.randn_like(x))
    loaded = hwaware.load(compiled.save(tmp_path / "saved"))
    assert len([k for k in _linear_kernels(loaded) if k.impl == onednn.IMPL]) == 5
    assert_close_to_eager(model, loaded, torch.randn_like(x))


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5", "llama", "vit"])
def test_third_party_models_forced_onto_onednn_equal_eager(name: str) -> None:
    """Real transformers models (random weights from small configs; GPT-2 writes its linear
    layers as `addmm` of an (in, out) weight, T5 and Llama without bias): every kernel oneDNN
    takes, whatever the timing chose (TVM, PyTorch or oneDNN), forced onto oneDNN; the model
    equals eager on its other inputs."""
    from tests.conformance.models import CASES

    case = CASES[name]()
    first, *others = case.inputs
    compiled = hwaware.compile(case.model, first, db=None, show_progress=False)
    compiled = compiled.kernel_plan or compiled
    program = compiled.program
    forced = [k for k in program.kernels.values() if onednn.takes(k, program.constants)]
    assert any(set(onednn.LINEAR_OPS) & {s.op for s in k.steps} for k in forced), \
        compiled.report()
    for kernel in forced:
        kernel.impl = onednn.IMPL
    compiled._run = None
    for inputs in others:
        assert_close_to_eager(case.model, compiled, *inputs)
