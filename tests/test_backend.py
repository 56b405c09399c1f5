"""The torch.compile backend: found by name through the entry point, correct, configurable."""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

from hwaware.partition import UnsupportedOpWarning
from hwaware.zoo import ZOO, get_model
from tests.helpers import assert_close_to_eager


@pytest.fixture(autouse=True)
def _reset_dynamo() -> None:
    torch._dynamo.reset()


def test_backend_is_registered_without_importing_hwaware() -> None:
    code = ("import torch, sys; from torch._dynamo import list_backends; "
            "ok = 'hwaware' in list_backends(exclude_tags=()); "
            "print(ok, 'hwaware' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_torch_compile_with_hwaware_matches_eager(name: str, tmp_path) -> None:
    model, inputs = get_model(name, small=True)
    compiled = torch.compile(model, backend="hwaware",
                             options={"db": str(tmp_path / "b.db"), "trials": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        assert_close_to_eager(model, compiled, *inputs)


def test_graph_breaks_are_compiled_piece_by_piece(tmp_path) -> None:
    class WithBreak(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            print("", end="")  # a graph break
            return self.b(y).sigmoid()

    model = WithBreak().eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": None})
    assert_close_to_eager(model, compiled, torch.randn(2, 8))


def test_unknown_option_is_an_error_listing_valid_options() -> None:
    from hwaware.backend import hwaware_backend

    gm = torch.fx.symbolic_trace(nn.ReLU())
    with pytest.raises(ValueError, match="valid options: .*trials"):
        hwaware_backend(gm, [torch.randn(2)], options={"trails": 3})


def test_fallback_runs_eagerly_with_a_warning() -> None:
    from hwaware.backend import hwaware_backend

    gm = torch.fx.symbolic_trace(nn.ReLU())
    with pytest.warns(UserWarning, match="running it eagerly"):
        run = hwaware_backend(gm, [torch.randn(2)], options={"target": "no-such-target"})
    x = torch.randn(2)
    torch.testing.assert_close(run(x), torch.relu(x))
    with pytest.raises(ValueError, match="valid targets"), warnings.catch_warnings():
        hwaware_backend(gm, [torch.randn(2)], options={"target": "no-such-target",
                                                       "fallback": False})


def test_dynamic_shapes_compile_once_per_shape_up_to_max_shapes(monkeypatch) -> None:
    """A second batch size makes Dynamo hand over a graph with SymInt sizes: each new size is
    compiled to its own static graph once, reused after; past max_shapes it runs eagerly."""
    from hwaware import backend

    compiles: list[list[tuple[int, ...]]] = []
    compile_graph = backend._compile_graph

    def counting(gm: torch.fx.GraphModule, inputs: list[Any], opts: dict[str, Any]) -> Any:
        compiles.append([tuple(x.shape) for x in inputs
                         if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter)])
        return compile_graph(gm, inputs, opts)

    monkeypatch.setattr(backend, "_compile_graph", counting)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)).eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": None, "max_shapes": 2})
    for batch in (2, 3, 5, 3, 5):
        assert_close_to_eager(model, compiled, torch.randn(batch, 16))
    assert compiles == [[(2, 16)], [(3, 16)], [(5, 16)]]
    with pytest.warns(UserWarning, match=r"compiled for 2 input shapes \(max_shapes\); running"):
        assert_close_to_eager(model, compiled, torch.randn(7, 16))
    assert len(compiles) == 3
