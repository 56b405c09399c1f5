"""The rgcn kernel family: find() on PyG's RGCNConv / FastRGCNConv and a hand-written relational
layer, lower() + build equal to eager PyTorch and to the PyG layer (odd sizes, a single node, no
edges, isolated nodes), partition giving the layer to rgcn rather than gnn, unsupported variants
left unfused, tuning records applied, and builds for CUDA and Arm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

pyg = pytest.importorskip("torch_geometric.nn")


from hwaware.kernels import rgcn, unique_name  # noqa: E402
from hwaware.partition import FUSED_META, find_fused_groups  # noqa: E402
from hwaware.target import get_target  # noqa: E402
from hwaware.tvm import ir, schedules, setup  # noqa: E402
from hwaware.tvm import vm as tvm_vm  # noqa: E402
from tests.helpers import default_schedule, tune_kernel_module  # noqa: E402
from tests.test_kernels_gnn import Kernel, captured, ops  # noqa: E402


class HandRGCN(torch.nn.Module):
    """out = x @ root + sum_r mean_{j -> i, type r} x_j @ W_r + b, written with edge masks,
    index_select and scatter_reduce(mean)."""

    def __init__(self, f_in: int, f_out: int, relations: int, keep_first: bool = False):
        super().__init__()
        torch.manual_seed(2)
        self.weight = torch.nn.Parameter(torch.randn(relations, f_in, f_out) * 0.3)
        self.root = torch.nn.Parameter(torch.randn(f_in, f_out) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(f_out) * 0.1)
        self.keep_first = keep_first

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor
                ) -> Any:
        out = x @ self.root
        first = None
        for r in range(self.weight.shape[0]):
            edges = edge_index[:, edge_type == r]
            msg = x.index_select(0, edges[0])
            index = edges[1].view(-1, 1).expand_as(msg)
            agg = torch.zeros_like(x).scatter_reduce(0, index, msg, "mean", include_self=False)
            first = agg if first is None else first
            out = out + agg @ self.weight[r]
        out = out + self.bias
        return (out, first) if self.keep_first else out


def graph(n: int, e: int, f: int, relations: int, isolated: int = 0, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features, edges and edge types; the last `isolated` nodes have no edges."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=gen)
    edges = torch.randint(0, max(1, n - isolated), (2, e), generator=gen)
    return x, edges, torch.randint(0, relations, (e,), generator=gen)


def layer(f_in: int, f_out: int, relations: int, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(1)
    return pyg.RGCNConv(f_in, f_out, relations, **kwargs).eval()


class RgcnKernel(Kernel):
    """The found group, cut as partition does, lowered by the rgcn family."""

    def lower(self, target_name: str = "host") -> tuple[Any, Any, Any]:
        t = get_target(target_name)
        return t, setup.tvm_target(t.tvm, t.host_tvm), rgcn.FAMILY.lower(
            self.graph, self.examples, t, unique_name("rgcn"))


def only_kernel(model: torch.nn.Module, args: tuple[Any, ...]) -> RgcnKernel:
    gm = captured(model, args)
    groups = rgcn.find(gm)
    assert len(groups) == 1
    return RgcnKernel(gm, groups[0], args)


# ---------------------------------------------------------------------------------- find
def test_partition_gives_the_whole_pyg_layer_to_rgcn() -> None:
    """PyG's default (`backend.use_segment_matmul` None) guards on data; capture takes the
    per-relation loop without changing the user's setting."""
    import torch_geometric.backend

    assert torch_geometric.backend.use_segment_matmul is None
    args = graph(10, 30, 7, 3)
    gm = captured(layer(7, 5, 3), args)
    assert torch_geometric.backend.use_segment_matmul is None
    groups = find_fused_groups(gm)
    assert len(groups) == 1 and {n.meta[FUSED_META] for n in groups[0]} == {"rgcn"}
    assert {"index", "eq", "index_select", "scatter_add", "div", "matmul", "add"} <= \
        ops(groups[0])
    # everything but the inputs: one kernel reads x, edge_index, edge_type
    left = [n for n in gm.graph.nodes if n.op == "call_function" and n not in groups[0]]
    assert left == []


@pytest.mark.parametrize("kwargs", [{}, {"root_weight": False}, {"bias": False},
                                    {"num_bases": 2}, {"aggr": "add"}])
def test_rgcn_variants_are_found_and_equal_pyg(kwargs: dict[str, Any]) -> None:
    args = graph(10, 30, 7, 3)
    model = layer(7, 5, 3, **kwargs)
    kernel = only_kernel(model, args)
    found = rgcn._layers(kernel.graph)[0]
    assert len(found.weights) == 3
    assert (found.root is None) == (kwargs.get("root_weight") is False)
    assert (found.bias is None) == (kwargs.get("bias") is False)
    call, _ = kernel.build()
    with torch.no_grad():
        torch.testing.assert_close(call(*kernel.examples)[0], model(*args), rtol=1e-3,
                                   atol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, {"aggr": "add"}])
def test_fast_rgcn_is_the_same_kernel_without_weight_copies(kwargs: dict[str, Any]) -> None:
    """FastRGCNConv gathers W[edge_type] (E x F_in x F_out); the kernel reads W once."""
    args = graph(10, 30, 7, 3, isolated=2)
    torch.manual_seed(1)
    model = pyg.FastRGCNConv(7, 5, 3, **kwargs).eval()
    kernel = only_kernel(model, args)
    assert {"bmm", "index"} <= ops(kernel.group)
    assert len(kernel.group) == sum(n.op == "call_function" for n in kernel.gm.graph.nodes)
    call, _ = kernel.build()
    new = graph(10, 30, 7, 3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(kernel.run_model(call, new), model(*new), rtol=1e-3,
                                   atol=1e-4)


def test_find_hand_written_relational_layer() -> None:
    args = graph(10, 30, 7, 3)
    gm = captured(HandRGCN(7, 5, 3), args)
    groups = rgcn.find(gm)
    assert len(groups) == 1 and "scatter_reduce" in ops(groups[0])


@pytest.mark.parametrize("model", [
    layer(7, 5, 3, aggr="max"),  # max per relation: not a mean or sum
    HandRGCN(7, 5, 3, keep_first=True),  # one relation's mean is also an output
], ids=["max_aggr", "mean_used_outside"])
def test_find_skips_unsupported_variants(model: torch.nn.Module,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.rgcn"):
        assert rgcn.find(captured(model, graph(10, 30, 7, 3))) == []


# ------------------------------------------------------------------------- correctness
SHAPES = [  # (nodes, edges, in features, out features, relations, isolated nodes)
    (10, 30, 7, 5, 3, 0),
    (33, 100, 20, 13, 4, 5),
    (1, 1, 7, 3, 2, 0),  # a single node (with a self-loop edge)
    (9, 0, 6, 4, 3, 0),  # no edges: root and bias only
]



@pytest.mark.parametrize("n,e,f_in,f_out,relations,isolated", SHAPES)
def test_lowered_kernel_equals_eager_and_pyg(n: int, e: int, f_in: int, f_out: int,
                                             relations: int, isolated: int) -> None:
    args = graph(n, e, f_in, relations, isolated)
    model = layer(f_in, f_out, relations)
    kernel = only_kernel(model, args)
    assert e or args[1].stride() == (1, 1)  # torch's strides for 2 x 0: TVM's are (0, 1)
    call, _ = kernel.build()
    got = call(*kernel.examples)[0]
    torch.testing.assert_close(got, kernel.expected[0], rtol=1e-3, atol=1e-4)
    # the kernel reads the edges at run time: a new graph of the same size, against PyG
    new = graph(n, e, f_in, relations, isolated, seed=7)
    with torch.no_grad():
        want = model(*new)
    torch.testing.assert_close(kernel.run_model(call, new), want, rtol=1e-3, atol=1e-4)
    if e == 0:  # no relation has an edge: the root term and the bias
        torch.testing.assert_close(got, args[0] @ model.root + model.bias)


def test_hand_written_layer_and_isolated_nodes() -> None:
    args = graph(12, 40, 6, 3, isolated=4)
    model = HandRGCN(6, 5, 3)
    kernel = only_kernel(model, args)
    call, _ = kernel.build(scheduled=False)  # the build's own path to the fixed schedule
    got = call(*kernel.examples)[0]
    torch.testing.assert_close(got, model(*args), rtol=1e-3, atol=1e-4)
    # isolated nodes: every relation's mean is 0, only the root term and the bias are left
    torch.testing.assert_close(got[-4:], args[0][-4:] @ model.root + model.bias)


def test_edge_types_out_of_range_are_dropped_like_the_reference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    x, edges, types = graph(10, 30, 7, 3)
    kernel = only_kernel(layer(7, 5, 3), (x, edges, types))
    call, _ = kernel.build()
    bad = types.clone()
    bad[::4] = 5  # no relation 5: the relation loop never selects these edges
    # (PyG's default heuristic would raise on them; its per-relation loop is the reference)
    monkeypatch.setattr("torch_geometric.backend.use_segment_matmul", False)
    with torch.no_grad():
        want = layer(7, 5, 3)(x, edges, bad)
    torch.testing.assert_close(kernel.run_model(call, (x, edges, bad)), want, rtol=1e-3,
                               atol=1e-4)


# ------------------------------------------------------------------------------ tuning
def test_tuning_stores_records_and_the_build_applies_them(tmp_path: Path) -> None:
    kernel = only_kernel(layer(8, 16, 3), graph(24, 60, 8, 3))
    t, tgt, mod = kernel.lower()
    db, adapter, workloads = tune_kernel_module(mod, t, tgt, tmp_path / "t.db", 4)
    assert len(workloads) == 1
    whash = ir.workload_hash(next(iter(workloads.values())))
    records = db.top_records(whash, setup.TVM_VERSION, t.key, 10)
    assert records and all(r.mean_us is not None for r in records)
    exe, applied = schedules.build_executable(mod, tgt, adapter)
    assert whash in applied
    call = tvm_vm.torch_callable(tvm_vm.make_vm(exe, t.kind), "main", 1)
    torch.testing.assert_close(call(*kernel.examples)[0], kernel.expected[0], rtol=1e-3,
                               atol=1e-4)
    db.close()


# ------------------------------------------------------------------------- cross builds
@pytest.mark.parametrize("target_name,f_in,f_out", [
    ("cuda-sm90", 16, 32), ("cuda-sm90", 7, 5), ("cuda-sm90", 64, 64), ("arm64-neon", 16, 32)])
def test_builds_for_cuda_and_arm(target_name: str, f_in: int, f_out: int) -> None:
    """With the family's own schedule for the target (on CUDA: a thread per feature of H)."""
    kernel = only_kernel(layer(f_in, f_out, 3), graph(16, 40, f_in, 3))
    _, tgt, mod = kernel.lower(target_name)
    exe, _ = schedules.build_executable(default_schedule(mod, tgt), tgt, None)
    assert exe is not None
