"""The res_block kernel family: ResNet basic/bottleneck blocks found in the rewritten graph and
lowered to one fused, depth-first tiled TIR kernel (hwaware/kernels/resblock.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from hwaware.capture import capture
from hwaware.db import TuningDatabase
from hwaware.kernels import resblock, resblock_kernel
from hwaware.partition import _external_inputs, _kernel_graph
from hwaware.rewrite import rewrite
from hwaware.target import get_target
from hwaware.tvm import database, ir, schedules, search, setup
from hwaware.tvm import vm as tvm_vm
from tests.helpers import default_schedule


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, dilation: int = 1,
             groups: int = 1) -> nn.Sequential:
    bn = nn.BatchNorm2d(cout)
    with torch.no_grad():  # non-trivial statistics, so the folded weights and biases matter
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False), bn)


class Basic(nn.Module):
    """ResNet basic block; `dilation`, `groups` and `act` make the unsupported variants."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, act: Any = torch.relu):
        super().__init__()
        self.c1 = _conv_bn(cin, cout, 3, stride)
        self.c2 = _conv_bn(cout, cout, 3, 1, dilation, groups)
        self.down = None if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.down is None else self.down(x)
        return self.act(self.c2(torch.relu(self.c1(x))) + residual)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1):
        super().__init__()
        self.c1 = _conv_bn(cin, mid, 1)
        self.c2 = _conv_bn(mid, mid, 3, stride)
        self.c3 = _conv_bn(mid, cout, 1)
        self.down = None if stride == 1 and cin == cout else _conv_bn(cin, cout, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.down is None else self.down(x)
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return torch.relu(self.c3(y) + residual)


class Stem(nn.Module):
    """Two basic blocks in a row after a stem conv: two groups, the second reading the first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.b1 = Basic(12, 12)
        self.b2 = Basic(12, 20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(torch.relu(self.stem(x))))


HOST = get_target("host")


def _graph(model: nn.Module, x: torch.Tensor) -> Any:
    captured = capture(model.eval(), (x,))
    rewrite(captured)
    return captured.graph_module


def _ops(group: list[Any]) -> list[str]:
    return [str(n.target).removeprefix("aten.").removesuffix(".default") for n in group]


def _kernel(model: nn.Module, x: torch.Tensor) -> Any:
    """The standalone kernel graph partition would cut from the model's (only) block."""
    gm = _graph(model, x)
    (group,) = resblock.find(gm)
    members = set(group)
    outputs = [n for n in group if any(u not in members for u in n.users)]
    return _kernel_graph(gm, group, _external_inputs(group, members), outputs)


def _callable(module: Any, target: Any, database: Any = None) -> tuple[Any, set[str]]:
    tgt = setup.tvm_target(target.tvm, target.host_tvm)
    exe, applied = schedules.build_executable(module, tgt, database)
    vm = tvm_vm.make_vm(exe, target.kind)
    return tvm_vm.torch_callable(vm, "main", 1), applied


def _with_default_schedule(module: Any, target: Any) -> Any:
    """A copy of `module` whose kernel carries the rule's untuned default schedule."""
    import tvm

    copy = tvm.IRModule(dict(module.functions.items()), attrs=module.attrs)
    return default_schedule(copy, setup.tvm_target(target.tvm, target.host_tvm))


# --------------------------------------------------------------------------- find
def test_find_basic_block_identity() -> None:
    (group,) = resblock.find(_graph(Basic(12, 12), torch.randn(1, 12, 9, 9)))
    assert _ops(group) == ["conv2d", "relu", "conv2d", "add.Tensor", "relu"]


def test_find_basic_block_downsample_and_chained_blocks() -> None:
    groups = resblock.find(_graph(Stem(), torch.randn(1, 3, 9, 9)))
    assert [sorted(_ops(g)) for g in groups] == [
        sorted(["conv2d", "relu", "conv2d", "add.Tensor", "relu"]),
        sorted(["conv2d", "conv2d", "relu", "conv2d", "add.Tensor", "relu"]),
    ]
    stem = next(n for n in groups[0][0].graph.nodes if n.op == "call_function")
    assert all(stem not in g for g in groups)  # the stem conv stays on the ordinary path


def test_find_bottleneck() -> None:
    (group,) = resblock.find(_graph(Bottleneck(12, 8, 20, 2), torch.randn(1, 12, 9, 9)))
    assert sorted(_ops(group)) == sorted(["conv2d"] * 4 + ["relu"] * 3 + ["add.Tensor"])


@pytest.mark.parametrize("model, dtype, reason", [
    (Basic(8, 8, dilation=2), torch.float32, "dilation"),
    (Basic(8, 8, groups=2), torch.float32, "groups"),
    (Basic(8, 8, act=torch.nn.functional.gelu), torch.float32, "not a single relu"),
    (Basic(8, 8), torch.float64, "dtype"),
], ids=["dilation", "groups", "gelu", "float64"])
def test_find_skips_unsupported_variants(model: nn.Module, dtype: torch.dtype, reason: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    model = model.to(dtype)
    with caplog.at_level(logging.DEBUG, logger=resblock.__name__):
        assert resblock.find(_graph(model, torch.randn(1, 8, 7, 7, dtype=dtype))) == []
    assert reason in caplog.text


# ---------------------------------------------------------------- lower and build
CASES = {
    "basic_12_identity_9x9": (Basic(12, 12), (1, 12, 9, 9)),
    "basic_12_20_stride2_downsample_9x9": (Basic(12, 20, 2), (1, 12, 9, 9)),
    "basic_16_identity_7x7": (Basic(16, 16), (1, 16, 7, 7)),
    "basic_8_identity_1x1": (Basic(8, 8), (1, 8, 1, 1)),
    "bottleneck_20_identity_7x7": (Bottleneck(20, 6, 20), (1, 20, 7, 7)),
    "bottleneck_12_20_stride2_9x9": (Bottleneck(12, 8, 20, 2), (1, 12, 9, 9)),
}


@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_matrices_compute_a_3x3_correlation(tile: int) -> None:
    """A^T [(G g G^T) * (B^T d B)] A is the tile x tile output of g slid over d."""
    a, b, g = resblock_kernel.winograd_matrices(tile)
    rng = np.random.default_rng(tile)
    d, w = rng.standard_normal((tile + 2, tile + 2)), rng.standard_normal((3, 3))
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * w) for j in range(tile)]
                       for i in range(tile)])
    np.testing.assert_allclose(a.T @ ((g @ w @ g.T) * (b.T @ d @ b)) @ a, direct, atol=1e-9)


def test_a_basic_blocks_stride_1_convs_are_winograd_convs_on_cpu() -> None:
    """On a CPU target the 3 x 3 stride-1 convs of a basic block lower to Winograd stages; a
    strided conv, a bottleneck's and every cuda conv stay direct."""
    def convs(case: str, target: Any) -> list[int]:
        model, shape = CASES[case]
        x = torch.randn(*shape)
        winograd = 0 if target.kind == "cuda" else resblock_kernel.WINOGRAD_TILE
        block = resblock_kernel.block_def(_kernel(model, x), resblock_kernel.lanes_for(target),
                                          winograd)
        return [layer.winograd for layer in block.main]

    tile = resblock_kernel.WINOGRAD_TILE
    assert convs("basic_12_identity_9x9", HOST) == [tile, tile]
    assert convs("basic_12_20_stride2_downsample_9x9", HOST) == [0, tile]
    assert convs("bottleneck_20_identity_7x7", HOST) == [0, 0, 0]
    assert convs("basic_12_identity_9x9", get_target("cuda-sm90")) == [0, 0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_schedule_matches_eager(case: str) -> None:
    model, shape = CASES[case]
    x = torch.randn(*shape)
    module = resblock.FAMILY.lower(_kernel(model, x), [x], HOST, f"hw_res_block_t{len(case)}")
    assert len(ir.prim_funcs(module)) == 1
    call, _ = _callable(_with_default_schedule(module, HOST), HOST)
    with torch.no_grad():
        torch.testing.assert_close(call(x)[0], model(x), rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small block tuned for 8 trials into a real sqlite database."""
    model, shape = CASES["basic_12_20_stride2_downsample_9x9"]
    x = torch.randn(*shape)
    work = tmp_path_factory.mktemp("resblock_tune")
    module = resblock.FAMILY.lower(_kernel(model, x), [x], HOST, "hw_res_block_tuned")
    tgt = setup.tvm_target(HOST.tvm, HOST.host_tvm)
    fused = ir.fuse_for_tuning(module, tgt)
    workloads = {n: ir.workload_of(f) for n, f in ir.prim_funcs(fused).items()}
    db = TuningDatabase(work / "tuning.db")
    db.start_session("sess", HOST.key, "resblock", 8)
    adapter = database.SqliteDatabase(db, tgt, HOST.key)
    search.tune_workloads(workloads, {n: 8 for n in workloads}, tgt, adapter, "sess",
                              lambda *a: None, str(work))
    yield {"model": model, "x": x, "module": module, "workloads": workloads, "db": db,
           "adapter": adapter, "path": Path(work / "tuning.db")}
    db.close()


def test_fuse_for_tuning_keeps_the_kernel_whole(tuned: dict[str, Any]) -> None:
    (name,) = tuned["workloads"]
    assert name.startswith("hw_res_block_tuned")
    blocks = str(tuned["workloads"][name].script())
    assert '"schedule_rule": "res_block"' in blocks


def test_tuning_stores_records_that_the_build_applies(tuned: dict[str, Any]) -> None:
    (workload,) = tuned["workloads"].values()
    whash = ir.workload_hash(workload)
    assert tuned["path"].stat().st_size > 0
    assert tuned["db"].count_records(whash, setup.TVM_VERSION, HOST.key) == 8
    assert tuned["db"].top_records(whash, setup.TVM_VERSION, HOST.key, 1)
    call, applied = _callable(tuned["module"], HOST, tuned["adapter"])
    assert whash in applied
    with torch.no_grad():
        torch.testing.assert_close(call(tuned["x"])[0], tuned["model"](tuned["x"]),
                                   rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------- cross targets
@pytest.mark.parametrize("target_name", ["cuda-sm90", "arm64-neon"])
@pytest.mark.parametrize("case", ["bottleneck_12_20_stride2_9x9", "basic_16_identity_7x7"])
def test_builds_for_cross_targets(target_name: str, case: str) -> None:
    """Build only: the default schedule, and a sample of the registered schedule space (a
    basic block's convs are Winograd convs on arm64, direct ones on cuda)."""
    import tvm
    from tvm import s_tir

    target = get_target(target_name)
    model, shape = CASES[case]
    x = torch.randn(*shape)
    module = resblock.FAMILY.lower(_kernel(model, x), [x], target, "hw_res_block_cross")
    tgt = setup.tvm_target(target.tvm, target.host_tvm)
    exe, _ = schedules.build_executable(_with_default_schedule(module, target), tgt, None)
    assert exe is not None
    ((_, func),) = ir.prim_funcs(module).items()
    kind = "cuda" if target.kind == "cuda" else "cpu"
    rule = tvm.get_global_func(f"s_tir.meta_schedule.{kind}.{resblock.RULE}")
    sch = s_tir.Schedule(ir.workload_of(func), seed=7)
    last = "conv2" if case.startswith("bottleneck") else "conv1"
    winograd = kind == "cpu" and case.startswith("basic")
    anchor = f"{last}_m" if winograd else last
    assert sch.get(sch.get_sblock(anchor)).annotations["schedule_rule"] == resblock.RULE
    (space,) = rule(sch, sch.get_sblock(anchor))
    assert "sample_" in str(space.trace)
    with tgt:
        tvm.compile(space.mod, target=tgt)
