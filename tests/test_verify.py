"""Verification mode: eager beside the first N calls, raising on the first kernel, region or
graph that differs; correct models pass untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import hwaware
from hwaware.dynamic.model import DynamicModel
from hwaware.dynamic_zoo import get_dynamic_case
from hwaware.runtime import CompiledModel
from hwaware.verify import VerificationError, difference
from tests.test_backend import _skipnet


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.Sigmoid()).eval()


def _every_built_kernel_on_tvm(cm: CompiledModel) -> int:
    """Run every kernel that was built and checked on TVM (whatever the timing chose)."""
    built = [k for k in cm.program.kernels.values() if k.tvm_us is not None or k.impl == "tvm"]
    for k in built:
        k.impl = "tvm"
    cm._run = None
    return len(built)


def _calls_counted(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_correct_model_is_checked_for_n_calls_then_runs_alone() -> None:
    model = _mlp()
    cm = hwaware.compile(model, (torch.randn(2, 8),), db=None, verify=2)
    eager_calls = _calls_counted(model)
    for _ in range(4):
        x = torch.randn(2, 8)
        torch.testing.assert_close(cm(x), model(x).detach(), rtol=1e-3, atol=1e-4)
    assert eager_calls[0] == 4 + 2  # four by the test, two by the verifier


def test_a_kernel_that_differs_is_named() -> None:
    """A TVM kernel that computes something else than its PyTorch ops (here: built with other
    weights than the program's, which match the module's): verify names the kernel, not just
    the model."""
    model = _mlp()
    cm = hwaware.compile(model, (torch.randn(2, 8),), db=None, verify=3)
    assert isinstance(cm, CompiledModel) and _every_built_kernel_on_tvm(cm) > 0
    cm(torch.randn(2, 8))
    with torch.no_grad():
        model[2].weight.add_(0.5)
        cm.program.constants["2.weight"].add_(0.5)
    with pytest.raises(VerificationError, match=r"call 2 of model Sequential differs from "
                                                r"eager.*first differing kernel: k_"):
        cm(torch.randn(2, 8))


def test_a_region_of_a_dynamic_network_that_differs_is_named() -> None:
    case = get_dynamic_case("gated_early_exit_mlp")
    cm = hwaware.compile(case.model, case.example_inputs, db=None, verify=10)
    assert isinstance(cm, DynamicModel)
    assert sum(_every_built_kernel_on_tvm(spec) for runner in cm.runners.values()
               for spec in runner.compiled.values()) > 0
    for inputs in case.branch_inputs.values():
        cm(*inputs)
    with torch.no_grad():
        for p in case.model.parameters():
            p.mul_(1.5)
    with pytest.raises(VerificationError, match=r"first differing region: region_\d+ \(.*:\d+\)"):
        for inputs in case.branch_inputs.values():
            cm(*inputs)


def test_torch_compile_verify_names_the_graph_when_a_build_is_stale(monkeypatch) -> None:
    """If variant selection ever ignored the weights (the bug that let repeated gated blocks
    run block 1's gate), `verify` catches it and names the graph."""
    from hwaware import backend

    torch._dynamo.reset()
    monkeypatch.setattr(backend.GraphVariants, "_key", lambda self, args: ((), ()))
    model = _skipnet()
    compiled = torch.compile(model, backend="hwaware", options={"db": None, "verify": 5})
    with pytest.raises(VerificationError, match=r"the torch.compile graph starting at File"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scale, shift in [(1, 0), (1, -2), (0.5, -1), (2, 3), (4, -3)]:
            compiled(torch.randn(1, 3, 12, 12) * scale + shift)
    torch._dynamo.reset()


def test_torch_compile_verify_passes_a_correct_model() -> None:
    torch._dynamo.reset()
    model = _skipnet()
    compiled = torch.compile(model, backend="hwaware", options={"db": None, "verify": 3})
    for scale, shift in [(1, 0), (1, -2), (0.5, -1), (2, 3)]:
        x = torch.randn(1, 3, 12, 12) * scale + shift
        torch.testing.assert_close(compiled(x), model(x).detach(), rtol=1e-3, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("bad", [-1, "2", 1.5, True])
def test_verify_must_be_a_number_of_calls(bad: object) -> None:
    with pytest.raises(ValueError, match="verify must be a number of calls"):
        hwaware.compile(_mlp(), (torch.randn(2, 8),), db=None, verify=bad)  # type: ignore
    # Dynamo wraps a backend's error in its own BackendCompilerFailed
    with pytest.raises(Exception, match="verify must be a number of calls"):  # noqa: B017
        torch.compile(_mlp(), backend="hwaware", options={"verify": bad})(torch.randn(2, 8))


def test_difference_scales_atol_with_the_output_and_names_what_differs() -> None:
    big = torch.full((4,), 1000.0)
    assert difference(big + 0.05, big) is None  # reordering-sized error on large values
    assert "max abs error" in str(difference(big + 5.0, big))
    assert "outputs where eager gives" in str(difference((big, big), (big,)))
    assert "int64" in str(difference(torch.zeros(2), torch.zeros(2, dtype=torch.int64)))


def test_a_compiled_model_is_a_snapshot_of_the_weights() -> None:
    """Weights changed in place after `hwaware.compile` change neither its PyTorch kernels nor
    its TVM kernels (before, the PyTorch ones shared the module's storage: a mix of old and
    new weights); `verify` is what tells a user the module has drifted from the build."""
    model = _mlp()
    cm = hwaware.compile(model, (torch.randn(2, 8),), db=None)
    x = torch.randn(2, 8)
    before = cm(x).clone()
    for impl in ("tvm", "torch"):
        for k in cm.program.kernels.values():
            k.impl = impl if k.tvm_us is not None or impl == "torch" else k.impl
        cm._run = None
        with torch.no_grad():
            model[0].weight.add_(1.0)
        torch.testing.assert_close(cm(x), before)
