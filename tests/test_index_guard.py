"""Out-of-range indices: a compiled model does what eager PyTorch does (raises IndexError, or
wraps a negative `x[idx]`), through both entry points and after save/load, and never crashes
the process or returns a result where PyTorch raises (`hwaware/index_guard.py`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hwaware
from hwaware.capture import capture
from hwaware.decompose import as_inputs, rewrite_and_partition
from tests.helpers import on_tvm
from tests.test_kernels_gnn import IndexAdd, graph

ROOT = Path(__file__).resolve().parents[1]


class EmbedProject(nn.Module):
    """Token ids -> embedding -> linear: the ids index the embedding table."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.embed, self.project = nn.Embedding(vocab, dim), nn.Linear(dim, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.project(self.embed(ids)))


class GatherRows(nn.Module):
    """`x[idx]` (aten.index.Tensor, which wraps negative indices) then a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.project(x[idx] * 2.0))


class Bipartite(nn.Module):
    """Messages from 30 source nodes summed into 10 destination nodes."""

    def forward(self, x_src: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        out = x_src.new_zeros(10, x_src.shape[1])
        return out.index_add(0, edges[1], x_src.index_select(0, edges[0]))


def _on_tvm(compiled: Any) -> Any:
    """`compiled` with its checked kernels on TVM: the guards under test are on the TVM side."""
    on_tvm(compiled)
    assert any(k.impl == "tvm" and k.index_checks for k in compiled.program.kernels.values())
    return compiled


def _raises_as_eager(model: nn.Module, compiled: object, *inputs: torch.Tensor) -> None:
    """Eager PyTorch raises on `inputs` (IndexError or RuntimeError, by op), and so does the
    compiled model, with the same type."""
    with pytest.raises((IndexError, RuntimeError)) as eager:
        model(*inputs)
    with pytest.raises(type(eager.value)):
        compiled(*inputs)  # type: ignore[operator]


def print_index_errors(compiled: Any, ids: torch.Tensor, values: tuple[int, ...]) -> None:
    """For the child process below: call `compiled` with one id set to each of `values`,
    printing "IndexError <value>" or "no error for <value>"."""
    for bad in values:
        ids[1, 3] = bad
        try:
            compiled(ids)
            print("no error for", bad)
        except IndexError:
            print("IndexError", bad)


def test_an_embedding_id_beyond_the_vocabulary_raises_indexerror_and_the_process_lives(
        tmp_path: Path) -> None:
    # in a child process: before the guard, TVM's "fast" take read past the table and the
    # process died (SIGSEGV), which would take the test run with it
    script = textwrap.dedent("""
        import torch, hwaware
        from tests.test_index_guard import EmbedProject, _on_tvm, print_index_errors
        torch.manual_seed(0)
        model = EmbedProject().eval()
        compiled = _on_tvm(hwaware.compile(model, (torch.randint(0, 50, (2, 7)),),
                                           target="host", db=None))
        ids = torch.randint(0, 50, (2, 7))
        assert torch.allclose(compiled(ids), model(ids), atol=1e-5)
        print_index_errors(compiled, ids, (10**9, 50, -1))
        ids = torch.randint(0, 50, (2, 7))
        torch.onnx.export(model, (ids,), "{onnx}", dynamo=False)
        from_onnx = hwaware.compile("{onnx}", target="host", db=None)
        assert torch.allclose(from_onnx(ids), model(ids), atol=1e-5)
        print_index_errors(from_onnx, ids, (10**9, 50, -51))
        print("alive")
    """).replace("{onnx}", str(tmp_path / "embed.onnx"))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    torch_ids, onnx_ids = ["1000000000", "50", "-1"], ["1000000000", "50", "-51"]  # ONNX
    # counts negative indices from the back: -1..-50 are in range there
    expected = [w for i in torch_ids + onnx_ids for w in ("IndexError", i)] + ["alive"]
    assert done.stdout.split() == expected, done.stdout + done.stderr[-2000:]


def test_negative_indices_wrap_as_in_pytorch_and_past_the_end_raises() -> None:
    torch.manual_seed(1)
    model = GatherRows().eval()
    x = torch.randn(9, 12)
    compiled = _on_tvm(hwaware.compile(model, (x, torch.tensor([0, 3, 8, 2])), target="host",
                                       db=None))
    for idx in ([1, 2, 3, 4], [-1, -9, 0, 5], [8, -2, -3, 7]):
        index = torch.tensor(idx)
        other = torch.randn(9, 12)  # other values than compiled with
        torch.testing.assert_close(compiled(other, index), model(other, index))
    _raises_as_eager(model, compiled, x, torch.tensor([0, 1, 9, 2]))


def test_a_node_id_beyond_the_graph_raises_through_the_fused_gnn_kernel() -> None:
    # the fused gather-scatter kernel indexed x by src unchecked: a silently wrong result
    model = IndexAdd().eval()
    x, edges = graph(20, 60, 8)
    compiled = _on_tvm(hwaware.compile(model, (x, edges[0], edges[1]), target="host", db=None))
    bad = edges.clone()
    bad[0, 5] = 20
    _raises_as_eager(model, compiled, x, bad[0], bad[1])
    bad = edges.clone()
    bad[1, 7] = 1000  # a destination past the end: scatter_add's index
    _raises_as_eager(model, compiled, x, bad[0], bad[1])
    x2, edges2 = graph(20, 60, 8, seed=3)
    torch.testing.assert_close(compiled(x2, edges2[0], edges2[1]),
                               model(x2, edges2[0], edges2[1]))


def test_torch_compile_entry_raises_where_eager_raises(tmp_path: Path) -> None:
    torch._dynamo.reset()
    model = IndexAdd().eval()
    x, edges = graph(20, 60, 8)
    compiled = torch.compile(model, backend="hwaware", options={"db": str(tmp_path / "t.db")})
    torch.testing.assert_close(compiled(x, edges[0], edges[1]), model(x, edges[0], edges[1]))
    bad = edges.clone()
    bad[0, 2] = 25
    _raises_as_eager(model, compiled, x, bad[0], bad[1])


def test_saved_model_keeps_its_guards(tmp_path: Path) -> None:
    model = IndexAdd().eval()
    x, edges = graph(20, 60, 8)
    compiled = _on_tvm(hwaware.compile(model, (x, edges[0], edges[1]), target="host", db=None))
    compiled.save(tmp_path / "m")
    loaded = hwaware.load(tmp_path / "m")
    assert {k.name: k.index_checks for k in loaded.program.kernels.values()} == \
        {k.name: k.index_checks for k in compiled.program.kernels.values()}
    torch.testing.assert_close(loaded(x, edges[0], edges[1]), model(x, edges[0], edges[1]))
    bad = edges.clone()
    bad[0, 9] = 20
    _raises_as_eager(model, loaded, x, bad[0], bad[1])


def test_rows_of_an_edge_index_are_checked_against_their_own_sizes() -> None:
    x_src, edges = torch.randn(30, 4), torch.stack([torch.randint(0, 30, (40,)),
                                                    torch.randint(0, 10, (40,))])
    captured = capture(Bipartite(), as_inputs((x_src, edges)))
    _, part = rewrite_and_partition(captured, True)
    checks = [c for k in part.program.kernels.values() for c in k.index_checks]
    edge_input = [c for c in checks if c[1]]
    assert sorted(map(tuple, (tuple(c[1][0]) + (c[2],) for c in edge_input))) == \
        [(0, 0, 30), (0, 1, 10)], checks
    compiled = _on_tvm(hwaware.compile(Bipartite(), (x_src, edges), target="host", db=None))
    edges[0, 0] = 29  # in range for the source row, past the end of the destinations
    torch.testing.assert_close(compiled(x_src, edges), Bipartite()(x_src, edges))
    edges[1, 0] = 10
    _raises_as_eager(Bipartite(), compiled, x_src, edges)
