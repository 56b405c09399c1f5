"""The gnn kernel family: find() on captured PyG layers, lower() + build equal to eager PyTorch and
to the PyG layer, tuning records applied, and builds for CUDA and Arm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx

pyg = pytest.importorskip("torch_geometric.nn")

from hwaware.capture import capture  # noqa: E402
from hwaware.kernels import gnn, gnn_kernel, unique_name  # noqa: E402
from hwaware.partition import _external_inputs, _kernel_graph  # noqa: E402
from hwaware.program import op_name  # noqa: E402
from hwaware.rewrite import rewrite  # noqa: E402
from hwaware.target import get_target  # noqa: E402
from hwaware.tvm import ir, schedules, setup  # noqa: E402
from hwaware.tvm import vm as tvm_vm  # noqa: E402
from tests.helpers import default_schedule, tune_kernel_module  # noqa: E402


class IndexAdd(torch.nn.Module):
    """Hand-written message passing: zeros_like(x).index_add_(0, dst, x[src])."""

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x).index_add_(0, dst, x.index_select(0, src))


class Scatter(torch.nn.Module):
    """scatter_reduce of x[src] into dst with a given reduce / include_self / index_add alpha."""

    def __init__(self, reduce: str = "sum", include_self: bool = False, alpha: float = 1.0,
                 keep_messages: bool = False):
        super().__init__()
        self.reduce, self.include_self = reduce, include_self
        self.alpha, self.keep_messages = alpha, keep_messages

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> Any:
        msg = x.index_select(0, src)
        if self.alpha != 1.0:
            out = torch.zeros_like(x).index_add_(0, dst, msg, alpha=self.alpha)
        else:
            index = dst.view(-1, *[1] * (x.dim() - 1)).expand_as(msg)
            out = torch.zeros_like(x).scatter_reduce(0, index, msg, self.reduce,
                                                     include_self=self.include_self)
        return (out, msg) if self.keep_messages else out


def graph(n: int, e: int, f: int, isolated: int = 0, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features and edges; the last `isolated` nodes have no edges."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=gen)
    edges = torch.randint(0, max(1, n - isolated), (2, e), generator=gen)
    return x, edges


def layer(kind: str, f: int) -> torch.nn.Module:
    torch.manual_seed(1)
    return {
        "gcn": lambda: pyg.GCNConv(f, 16),
        "sage_mean": lambda: pyg.SAGEConv(f, 12),
        "sage_max": lambda: pyg.SAGEConv(f, 12, aggr="max"),
        "gat": lambda: pyg.GATConv(f, 5, heads=3),
        "gatv2": lambda: pyg.GATv2Conv(f, 5, heads=3),
        "gatv2_shared": lambda: pyg.GATv2Conv(f, 4, heads=2, share_weights=True, concat=False,
                                              negative_slope=0.1),
    }[kind]()


def captured(model: torch.nn.Module, args: tuple[Any, ...]) -> fx.GraphModule:
    c = capture(model, args)
    rewrite(c)
    return c.graph_module


def ops(group: list[fx.Node]) -> set[str]:
    return {op_name(n.target).removeprefix("aten.").split(".")[0] for n in group}


def values(gm: fx.GraphModule, args: tuple[Any, ...]) -> dict[fx.Node, Any]:
    """Every node's eager value."""
    env: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            env[n] = super().run_node(n)
            return env[n]

    Recorder(gm).run(*args)
    return env


class Kernel:
    """One found group, cut as partition does, with its example inputs and eager outputs."""

    def __init__(self, gm: fx.GraphModule, group: list[fx.Node], args: tuple[Any, ...]):
        env = values(gm, args)
        self.gm, self.group = gm, group
        self.inputs = _external_inputs(group, set(group))
        self.outputs = [n for n in group if any(u not in group for u in n.users)]
        self.graph = _kernel_graph(gm, group, self.inputs, self.outputs)
        self.examples = [env[n] for n in self.inputs]
        self.expected = [env[n] for n in self.outputs]

    def lower(self, target_name: str = "host") -> tuple[Any, Any, Any]:
        t = get_target(target_name)
        return t, setup.tvm_target(t.tvm, t.host_tvm), gnn.FAMILY.lower(
            self.graph, self.examples, t, unique_name("gnn"))

    def build(self, db: Any = None, scheduled: bool = True) -> Any:
        t, tgt, mod = self.lower()
        if scheduled:
            mod = default_schedule(mod, tgt)
        exe, applied = schedules.build_executable(mod, tgt, db)
        vm = tvm_vm.make_vm(exe, t.kind)
        return tvm_vm.torch_callable(vm, "main", len(self.outputs)), applied

    def run_model(self, call: Any, args: tuple[Any, ...]) -> Any:
        """The whole captured graph with the group's outputs computed by the kernel."""
        kernel = self
        seen: dict[fx.Node, Any] = {}

        class WithKernel(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                if n in kernel.outputs:
                    got = call(*[seen[i] for i in kernel.inputs])
                    return got[kernel.outputs.index(n)]
                seen[n] = super().run_node(n)
                return seen[n]

        return WithKernel(self.gm).run(*args)


def only_kernel(model: torch.nn.Module, args: tuple[Any, ...]) -> Kernel:
    gm = captured(model, args)
    groups = gnn.find(gm)
    assert len(groups) == 1
    return Kernel(gm, groups[0], args)


# ---------------------------------------------------------------------------------- find
@pytest.mark.parametrize("kind,expected", [
    ("gcn", {"index_select", "mul", "scatter_add", "new_zeros"}),
    ("sage_mean", {"index_select", "scatter_add", "clamp", "div", "new_ones"}),
    ("sage_max", {"index_select", "scatter_reduce", "new_zeros"}),
    ("gat", {"index_select", "leaky_relu", "scatter_reduce", "exp", "scatter_add", "div",
             "mul", "unsqueeze"}),
    ("gatv2", {"index_select", "add", "leaky_relu", "mul", "sum", "scatter_reduce", "exp",
               "scatter_add", "div", "unsqueeze"}),
])
def test_find_recognises_pyg_layers(kind: str, expected: set[str]) -> None:
    x, edges = graph(10, 30, 7)
    gm = captured(layer(kind, 7), (x, edges))
    groups = gnn.find(gm)
    assert len(groups) == 1
    assert expected <= ops(groups[0])
    assert "linear" not in ops(groups[0])  # the dense transform stays an ordinary kernel
    # the contract: outside inputs come first, intermediates stay inside
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    group = set(groups[0])
    first = min(order[n] for n in group)
    assert all(order[i] < first for i in _external_inputs(groups[0], group))
    assert sum(any(u not in group for u in n.users) for n in groups[0]) == 1


def test_find_hand_written_index_add() -> None:
    x, edges = graph(8, 20, 5)
    groups = gnn.find(captured(IndexAdd(), (x, edges[0], edges[1])))
    assert [ops(g) for g in groups] == [{"zeros_like", "index_select", "index_add"}]


@pytest.mark.parametrize("model", [
    Scatter("amax", include_self=True),  # max with the zero base counted: not taken
    Scatter("prod"),  # no such kernel
    Scatter(alpha=2.0),  # index_add with alpha
    Scatter(keep_messages=True),  # the E x F messages are used outside: nothing to save
], ids=["amax_include_self", "prod", "alpha", "messages_used"])
def test_find_skips_unsupported_variants(model: torch.nn.Module,
                                         caplog: pytest.LogCaptureFixture) -> None:
    x, edges = graph(8, 20, 5)
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.gnn"):
        groups = gnn.find(captured(model, (x, edges[0], edges[1])))
    assert groups == []


def test_find_skips_three_dim_plain_scatter() -> None:
    x, edges = graph(8, 20, 6)
    gm = captured(IndexAdd(), (x.view(8, 2, 3), edges[0], edges[1]))
    assert gnn.find(gm) == []


def test_skip_reason_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    x, edges = graph(8, 20, 5)
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.gnn"):
        gnn.find(captured(Scatter(keep_messages=True), (x, edges[0], edges[1])))
    assert "used outside the group" in caplog.text


def test_symbolic_edge_count_has_a_bound() -> None:
    """GCN's self-loop handling makes E data-dependent; the kernel pads to a power of two."""
    x, edges = graph(10, 30, 7)
    kernel = only_kernel(layer("gcn", 7), (x, edges))
    match = gnn._matches(kernel.graph)[0]
    assert not isinstance(gnn.edge_count(match), int)
    assert gnn.edge_bound(match) == 40  # at most the 30 edges (none removed) + 10 self-loops
    assert gnn_kernel.edge_capacity(40) == 64


# ------------------------------------------------------------------------- correctness
SHAPES = [  # (nodes, edges, features, isolated nodes)
    (10, 30, 7, 0),
    (33, 100, 20, 5),
    (1, 1, 7, 0),  # a single node (with a self-loop edge)
]


@pytest.mark.parametrize("kind", ["gcn", "sage_mean", "sage_max", "gat", "gatv2",
                                  "gatv2_shared"])
@pytest.mark.parametrize("n,e,f,isolated", SHAPES)
def test_lowered_kernel_equals_eager_and_pyg(kind: str, n: int, e: int, f: int,
                                             isolated: int) -> None:
    x, edges = graph(n, e, f, isolated)
    model = layer(kind, f)
    kernel = only_kernel(model, (x, edges))
    call, _ = kernel.build()
    for got, want in zip(call(*kernel.examples), kernel.expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    # the whole layer with the kernel in it, against the PyG layer itself, on a new graph of
    # the same size (the kernel reads the edges at run time)
    x2, edges2 = graph(n, e, f, isolated, seed=7)
    with torch.no_grad():
        want = model(x2, edges2)
    got = kernel.run_model(call, (x2, edges2))
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("reduce", ["sum", "mean", "amax"])
def test_empty_graph_and_isolated_nodes_give_zeros(reduce: str) -> None:
    x, edges = graph(9, 16, 7, isolated=4)
    model = Scatter(reduce)
    kernel = only_kernel(model, (x, edges[0], edges[1]))
    call, _ = kernel.build()
    got = call(*kernel.examples)[0]
    torch.testing.assert_close(got, model(x, edges[0], edges[1]), rtol=1e-3, atol=1e-4)
    assert got[-4:].abs().sum() == 0
    empty = torch.zeros(0, dtype=torch.int64)
    kernel = only_kernel(model, (x, empty, empty))
    call, _ = kernel.build()
    assert call(*kernel.examples)[0].abs().sum() == 0


def test_untuned_build_on_the_lead_default_path() -> None:
    """Without gnn.default_schedule, the build's own default rules still give a right kernel."""
    x, edges = graph(10, 30, 7)
    kernel = only_kernel(layer("sage_mean", 7), (x, edges))
    call, _ = kernel.build(scheduled=False)
    torch.testing.assert_close(call(*kernel.examples)[0], kernel.expected[0], rtol=1e-3,
                               atol=1e-4)


def test_fuse_for_tuning_keeps_the_kernel_whole() -> None:
    x, edges = graph(10, 30, 7)
    kernel = only_kernel(layer("gat", 7), (x, edges))
    _, tgt, mod = kernel.lower()
    fused = ir.prim_funcs(ir.fuse_for_tuning(mod, tgt))
    assert set(fused) == set(ir.prim_funcs(mod))  # nothing fused into or out of it
    assert sum(gnn.RULE in ir.schedule_rules(f) for f in fused.values()) == 1


# ------------------------------------------------------------------------------ tuning
def test_tuning_stores_records_and_the_build_applies_them(tmp_path: Path) -> None:
    x, edges = graph(24, 60, 8)
    kernel = only_kernel(layer("sage_max", 8), (x, edges))
    t, tgt, mod = kernel.lower()
    db, adapter, workloads = tune_kernel_module(mod, t, tgt, tmp_path / "t.db", 4)
    whash = ir.workload_hash(next(iter(workloads.values())))
    records = db.top_records(whash, setup.TVM_VERSION, t.key, 10)
    assert records and all(r.mean_us is not None for r in records)
    assert (tmp_path / "t.db").stat().st_size > 0
    exe, applied = schedules.build_executable(mod, tgt, adapter)
    assert whash in applied
    call = tvm_vm.torch_callable(tvm_vm.make_vm(exe, t.kind), "main", 1)
    torch.testing.assert_close(call(*kernel.examples)[0], kernel.expected[0], rtol=1e-3,
                               atol=1e-4)
    db.close()


# ------------------------------------------------------------------------- cross builds
@pytest.mark.parametrize("kind", ["gcn", "gat"])
def test_gpu_candidates_bind_only_rows_to_thread_blocks(kind: str) -> None:
    """Sampled CUDA candidates, as tuning makes them: MetaSchedule's default rules (AutoBind)
    must leave the family's blocks alone. They bound the feature loops inside a row to
    blockIdx.x as well, and a tuned GCN kernel on an H100 computed wrong rows."""
    import re

    from tvm.s_tir import meta_schedule as ms

    x, edges = graph(20, 60, 40)
    kernel = only_kernel(layer(kind, 40), (x, edges))
    _, tgt, mod = kernel.lower("cuda-sm90")
    (workload,) = [ir.workload_of(f) for f in ir.prim_funcs(
        ir.fuse_for_tuning(mod, tgt)).values() if gnn.RULE in ir.schedule_rules(f)]
    setup.import_tensor_intrinsics()
    for seed in range(3):
        ctx = ms.TuneContext(mod=workload, target=tgt, space_generator="post-order-apply",
                             task_name="gpu", rand_state=seed)
        (sch,) = ctx.generate_design_space()
        blocks = set(re.findall(r'thread_binding\((\d+), thread="blockIdx.x"\)',
                                sch.mod.script())) - {"1"}  # 1: the CSR build's own kernel
        assert len(blocks) == 1, (seed, blocks)



@pytest.mark.parametrize("target_name,kind", [("cuda-sm90", "gcn"), ("cuda-sm90", "gat"),
                                              ("cuda-sm90", "gatv2"), ("arm64-neon", "gat")])
def test_builds_for_cuda_and_arm(target_name: str, kind: str) -> None:
    x, edges = graph(10, 30, 20)
    kernel = only_kernel(layer(kind, 20), (x, edges))
    _, tgt, mod = kernel.lower(target_name)
    exe, _ = schedules.build_executable(default_schedule(mod, tgt), tgt, None)
    assert exe is not None
