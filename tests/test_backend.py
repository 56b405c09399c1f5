"""The torch.compile backend: found by name through the entry point, correct, configurable."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
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


def test_fallback_runs_eagerly_with_a_warning(monkeypatch) -> None:  # type: ignore
    """A graph that fails to compile runs eagerly (one warning), or raises with fallback=False;
    a bad option is a configuration error and always raises (tests/test_options.py)."""
    from hwaware import backend

    def failing(*args: Any) -> Any:
        raise RuntimeError("this graph does not compile")

    monkeypatch.setattr(backend, "_compile_graph", failing)
    gm = torch.fx.symbolic_trace(nn.ReLU())
    with pytest.warns(UserWarning, match="running it eagerly"):
        run = backend.hwaware_backend(gm, [torch.randn(2)], options={"db": None})
    x = torch.randn(2)
    torch.testing.assert_close(run(x), torch.relu(x))
    with pytest.raises(RuntimeError, match="does not compile"), warnings.catch_warnings():
        backend.hwaware_backend(gm, [torch.randn(2)], options={"db": None, "fallback": False})


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


class _GatedBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1))
        self.gate = nn.Linear(c, 1)

    def decide(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(h.mean((2, 3)))) > 0.5


class _SkipNet(nn.Module):
    """SkipNet-style: identical gated blocks in a ModuleList; each gate is a graph break, so
    Dynamo calls ONE gate graph and ONE body graph with every block's own parameters."""

    def __init__(self, c: int = 8, n: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(_GatedBlock(c) for _ in range(n))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for blk in self.blocks:
            if blk.decide(h):
                h = torch.relu(h + blk.body(h))
        return self.head(h.mean((2, 3)))


class _ExitLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)
        self.exit = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.ff(x))

    def confident(self, x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
        probs = self.exit(x.mean(1)).softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-9).log()).sum(-1)
        return probs, bool(entropy.max() < threshold)


class _EarlyExitEncoder(nn.Module):
    """Identical layers, each with an exit head; leaves when the exit's entropy is low (the
    `bool()` is a graph break after every layer)."""

    def __init__(self, d: int = 16, n: int = 4, threshold: float = 1.2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_ExitLayer(d) for _ in range(n))
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
            probs, done = layer.confident(x, self.threshold)
            if done:
                return probs
        return probs


def _skipnet() -> nn.Module:
    torch.manual_seed(1)
    model = _SkipNet().eval()
    with torch.no_grad():
        for blk in model.blocks:  # gates that differ between blocks and between inputs
            nn.init.normal_(blk.gate.weight, std=2.0)
            nn.init.normal_(blk.gate.bias, std=1.0)
            nn.init.normal_(blk.body[1].running_mean)
    return model


def _gate_counts(model: nn.Module, inputs: list[torch.Tensor]) -> set[tuple[bool, ...]]:
    with torch.no_grad():
        paths = set()
        for x in inputs:
            h, taken = model.stem(x), []
            for blk in model.blocks:
                taken.append(bool(blk.decide(h)))
                if taken[-1]:
                    h = torch.relu(h + blk.body(h))
            paths.add(tuple(taken))
    return paths


def test_repeated_blocks_behind_graph_breaks_use_their_own_weights() -> None:
    """Dynamo calls one gate graph with each block's parameters: every block must decide with
    its own gate (a build that froze block 1's weights gave errors of 0.04-0.09)."""
    model = _skipnet()
    inputs = [torch.randn(1, 3, 12, 12) * scale + shift
              for scale, shift in [(1, 0), (1, -2), (0.5, -1), (2, 3), (4, -3)]]
    assert len(_gate_counts(model, inputs)) > 1  # the inputs take several paths
    compiled = torch.compile(model, backend="hwaware", options={"db": None})
    for x in inputs:
        assert_close_to_eager(model, compiled, x)


def test_early_exit_layers_with_identical_heads_match_eager() -> None:
    torch.manual_seed(3)
    model = _EarlyExitEncoder().eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": None})
    for scale in (0.1, 1.0, 3.0, 10.0, 0.5, 30.0):
        assert_close_to_eager(model, compiled, scale * torch.randn(2, 5, 16))


def test_weights_changed_or_replaced_between_calls_are_used() -> None:
    model = _skipnet()
    compiled = torch.compile(model, backend="hwaware", options={"db": None})
    x = torch.randn(1, 3, 12, 12)
    assert_close_to_eager(model, compiled, x)
    with torch.no_grad():  # in place: same tensors, new version counters
        model.head.weight.mul_(-2.0)
        model.blocks[0].gate.bias.add_(5.0)
        model.blocks[1].body[0].weight.add_(0.5)
    assert_close_to_eager(model, compiled, x)
    model.head.weight = nn.Parameter(torch.randn_like(model.head.weight))  # a new tensor
    assert_close_to_eager(model, compiled, torch.randn(1, 3, 12, 12))


def test_weight_sets_past_the_limit_run_eagerly_with_one_warning() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="hwaware",
                             options={"db": None, "max_weight_sets": 1})
    x = torch.randn(2, 8)
    assert_close_to_eager(model, compiled, x)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.warns(UserWarning, match=r"max_weight_sets"):
        assert_close_to_eager(model, compiled, x)


def test_data_dependent_sizes_in_one_dynamo_graph_compile_and_match_eager() -> None:
    """With Dynamo told to capture data-dependent shapes (PyG's self-loop removal is a
    `nonzero`), a GCN reaches the backend as one graph whose sizes are summed by
    `torch.sym_sum`; it compiles (no eager fallback) and matches eager on other graphs."""
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    model = pyg.models.GCN(8, 16, num_layers=2, out_channels=4).eval()

    def graph(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(12, 8, generator=generator), \
            torch.randint(0, 12, (2, 40), generator=generator)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True,
                                    capture_scalar_outputs=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        warnings.filterwarnings("error", message="hwaware: could not compile")
        compiled = torch.compile(model, backend="hwaware", options={"db": None})
        for seed in (0, 1, 2):
            assert_close_to_eager(model, compiled, *graph(seed))


def test_pyg_gcn_is_one_dynamo_graph_and_matches_eager(tmp_path: Path) -> None:
    """PyG's GCNConv drops self loops with a boolean mask (`nonzero`): Dynamo broke the graph
    there (9 graphs for 2 layers, eager ops between them) until the backend let it capture
    data-dependent output shapes; other graphs, other weights: still eager's numbers."""
    pytest.importorskip("torch_geometric")
    from torch._dynamo.utils import counters

    from tests.conformance.models import GNNS

    torch._dynamo.reset()
    counters.clear()
    case = GNNS["gcn"].build()
    model = case.model.eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": str(tmp_path / "g.db")})
    with torch.no_grad():
        for inputs in case.inputs:
            torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
        model.convs[0].lin.weight.mul_(-0.5)
        torch.testing.assert_close(compiled(*case.inputs[1]), model(*case.inputs[1]),
                                   rtol=1e-4, atol=1e-5)
