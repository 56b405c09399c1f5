"""conv_block: find() on captured MobileNet-style blocks, lower() + build against eager PyTorch,
tuning records that apply, and build-only checks for cuda and arm64."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn

from hwaware import partition
from hwaware.capture import capture
from hwaware.db import TuningDatabase
from hwaware.kernels import conv
from hwaware.rewrite import rewrite
from hwaware.target import get_target
from hwaware.tvm import database, ir, schedules, search, setup
from hwaware.tvm import vm as tvm_vm
from tests.helpers import default_schedule, tune_kernel_module

RTOL, ATOL = 1e-3, 1e-4


# ------------------------------------------------------------------ reference modules
class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block: [1x1 expand + act] -> kxk depthwise + act -> [SE] -> 1x1 project
    [+ residual]. `dw_conv` lets a test swap in an unsupported depthwise variant."""

    def __init__(self, cin: int, cout: int, expand: int = 6, k: int = 3, stride: int = 1,
                 act: type[nn.Module] = nn.ReLU6, se: bool = False,
                 dw_conv: nn.Conv2d | None = None, dw_act: type[nn.Module] | None = None,
                 se_gate: Any = nn.functional.hardsigmoid):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [dw_conv or nn.Conv2d(hidden, hidden, k, stride, k // 2, groups=hidden,
                                        bias=False),
                   nn.BatchNorm2d(hidden), (dw_act or act)()]
        if se:
            layers.append(SqueezeExcite(hidden, se_gate))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        for m in self.modules():  # non-trivial folded BatchNorm
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, gate: Any = nn.functional.hardsigmoid):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // 4, 1)
        self.fc2 = nn.Conv2d(channels // 4, channels, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(torch.relu(self.fc1(s))))


class TwoBlocks(nn.Module):
    """A stem conv, then a stride-2 block and a residual block (expand ratio 1 first)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.b1 = InvertedResidual(8, 12, expand=1, stride=2, act=nn.ReLU)
        self.b2 = InvertedResidual(12, 12, expand=4, k=5, act=nn.Hardswish)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.b1(torch.relu(self.stem(x))))


def _graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    captured = capture(model.eval(), (x,))
    rewrite(captured)
    return captured.graph_module


def _ops(group: list[fx.Node]) -> list[str]:
    return [str(n.target).split(".")[-2] for n in group]


def _kernel_graph(gm: fx.GraphModule, group: list[fx.Node]) -> fx.GraphModule:
    members = set(group)
    inputs = partition._external_inputs(group, members)
    outputs = [n for n in group if partition._used_outside(n, members)]
    kg = partition._kernel_graph(gm, group, inputs, outputs)
    assert kg is not None
    return kg


def _lowered(model: nn.Module, x: torch.Tensor, name: str, target: str = "host") -> Any:
    gm = _graph(model, x)
    (group,) = conv.find(gm)
    return conv.FAMILY.lower(_kernel_graph(gm, group), [x], get_target(target), name)


def _run(exe: Any, x: torch.Tensor) -> torch.Tensor:
    call = tvm_vm.torch_callable(tvm_vm.make_vm(exe, "cpu"), "main", 1)
    return call(x)[0]


@pytest.fixture(scope="module")
def host() -> tuple[Any, Any]:
    t = get_target("host")
    return t, setup.tvm_target(t.tvm, t.host_tvm)


# ---------------------------------------------------------------------------- find
def test_find_mobilenet_blocks() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = _graph(TwoBlocks(), x)
    groups = conv.find(gm)
    assert [_ops(g) for g in groups] == [
        ["conv2d", "relu", "conv2d"],  # expand ratio 1, stride 2: no expand, no residual
        ["conv2d", "hardswish", "conv2d", "hardswish", "conv2d", "add"],
    ]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for group in groups:
        members = set(group)
        for inp in partition._external_inputs(group, members):
            assert order[inp] < order[group[0]]
        assert all(u in members for n in group[:-1] for u in n.users)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU])
def test_find_activations(act: type[nn.Module]) -> None:
    gm = _graph(InvertedResidual(8, 8, act=act), torch.randn(1, 8, 9, 9))
    (group,) = conv.find(gm)
    assert len(group) == 6 and _ops(group)[-1] == "add"


SKIPPED = {
    "dilation": lambda: InvertedResidual(
        8, 8, dw_conv=nn.Conv2d(48, 48, 3, 1, 2, dilation=2, groups=48, bias=False)),
    "grouped": lambda: InvertedResidual(
        8, 8, dw_conv=nn.Conv2d(48, 48, 3, 1, 1, groups=2, bias=False)),
    "kernel_7": lambda: InvertedResidual(8, 8, k=7),
    "squeeze_excite_tanh_gate": lambda: InvertedResidual(8, 8, se=True, se_gate=torch.tanh),
    "gelu_after_depthwise": lambda: InvertedResidual(8, 8, dw_act=nn.GELU),
}


@pytest.mark.parametrize("variant", sorted(SKIPPED))
def test_find_skips_unsupported(variant: str, caplog: pytest.LogCaptureFixture) -> None:
    gm = _graph(SKIPPED[variant](), torch.randn(1, 8, 9, 9))
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.conv"):
        assert conv.find(gm) == []
    assert "not fused" in caplog.text


def test_find_skips_float64(caplog: pytest.LogCaptureFixture) -> None:
    gm = _graph(InvertedResidual(8, 8).double(), torch.randn(1, 8, 9, 9, dtype=torch.float64))
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.conv"):
        assert conv.find(gm) == []
    assert "float32" in caplog.text


def test_find_squeeze_excite_block() -> None:
    """The squeeze-excite between depthwise and project conv is part of the block's group."""
    gm = _graph(InvertedResidual(8, 8, act=nn.Hardswish, se=True), torch.randn(1, 8, 9, 9))
    (group,) = conv.find(gm)
    assert _ops(group) == ["conv2d", "hardswish", "conv2d", "hardswish", "mean", "conv2d",
                           "relu", "conv2d", "hardsigmoid", "mul", "conv2d", "add"]


def test_find_leaves_unsupported_expand_outside() -> None:
    """An expand with an activation the kernel does not take stays unfused; the rest of the
    block is still one group."""
    gm = _graph(InvertedResidual(8, 8, act=nn.GELU, dw_act=nn.ReLU6), torch.randn(1, 8, 9, 9))
    (group,) = conv.find(gm)
    assert _ops(group) == ["conv2d", "hardtanh", "conv2d"]  # no residual: input is the gelu
    gelu = next(n for n in gm.graph.nodes if "gelu" in str(n.target))
    assert group[0].args[0] is gelu


def test_find_leaves_reflect_padding_outside() -> None:
    """A reflect-padded depthwise conv is an explicit reflect pad then an unpadded conv: the
    pad (not zeros) stays outside the group, which starts at the depthwise conv."""
    model = InvertedResidual(
        8, 8, dw_conv=nn.Conv2d(48, 48, 3, 1, 1, groups=48, bias=False, padding_mode="reflect"))
    gm = _graph(model, torch.randn(1, 8, 9, 9))
    (group,) = conv.find(gm)
    assert _ops(group) == ["conv2d", "hardtanh", "conv2d"]
    assert "pad" in str(group[0].args[0].target) and group[0].args[0] not in group


@pytest.mark.parametrize("unit", ["avx512", "avx2"])
def test_register_hints_fill_the_registers_with_dividing_columns(unit: str) -> None:
    """The fixed register tile's columns divide the output width (fixed tile decisions are
    divisors) and its accumulators fit the registers: on AVX-512, 64 channels over 14 columns
    get 2 vectors x 7 columns (14 accumulators), not the 4 x 2 that fixing 4 vectors first
    left; 40 channels keep 5 x 4. AVX2's 12 accumulators hold vectors of 8 lanes."""
    from hwaware.kernels.conv_kernel import register_hints
    from hwaware.tvm import isa

    vector_unit = {"avx512": isa.AVX512, "avx2": isa.AVX2}[unit]
    if vector_unit == isa.AVX512:
        assert register_hints(64, 14, vector_unit) == (32, 7)
        assert register_hints(40, 0, vector_unit) == (40, 4)
        assert register_hints(40, 28, vector_unit) == (40, 4)
    else:
        assert register_hints(64, 14, vector_unit) == (32, 2)  # 4 x 2: 2 x 7 would spill
    for channels, width in [(64, 14), (160, 7), (96, 14), (24, 56), (320, 7), (48, 5)]:
        tile, columns = register_hints(channels, width, vector_unit)
        lanes = max(v for v in (16, 8, 4, 2, 1) if channels % v == 0 and v <= vector_unit.lanes)
        assert width % columns == 0 and channels % tile == 0
        assert (tile // lanes) * columns <= vector_unit.accumulators


# ------------------------------------------------------------------ lower + build
SHAPES = [  # cin, cout, expand, k, stride, size, act[, squeeze-excite gate]
    (12, 12, 6, 3, 1, 15, nn.ReLU6),
    (12, 12, 6, 5, 1, 15, nn.Hardswish, nn.functional.hardsigmoid),
    (12, 20, 3, 3, 2, 7, nn.ReLU, torch.sigmoid),
    (20, 20, 1, 3, 1, 1, nn.Hardswish, nn.functional.hardsigmoid),
    (16, 24, 6, 3, 2, 15, nn.ReLU6),
    (12, 12, 6, 5, 1, 7, nn.Hardswish),
    (12, 12, 6, 3, 1, 1, nn.ReLU),
    (16, 16, 1, 3, 1, 15, nn.ReLU6),
    (12, 20, 3, 5, 2, 7, nn.SiLU),
]


@pytest.mark.parametrize("shape", SHAPES,
                         ids=lambda s: "-".join(map(str, s[:6])) + ("-se" if len(s) > 7 else ""))
def test_default_schedule_matches_eager(shape: tuple[Any, ...], host: tuple[Any, Any]) -> None:
    cin, cout, expand, k, stride, size, act = shape[:7]
    torch.manual_seed(1)
    gate = {"se": True, "se_gate": shape[7]} if len(shape) > 7 else {}
    model = InvertedResidual(cin, cout, expand, k, stride, act, **gate).eval()
    x = torch.randn(1, cin, size, size)
    mod = default_schedule(_lowered(model, x, f"hw_conv_test_{size}"), host[1])
    funcs = ir.prim_funcs(mod)
    assert len(funcs) == 1 and all(conv.RULE in ir.schedule_rules(f) for f in funcs.values())
    exe, _ = schedules.build_executable(mod, host[1], None)
    with torch.no_grad():
        torch.testing.assert_close(_run(exe, x), model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", [(12, 12, 6, 3, 1, 7), (16, 24, 6, 3, 2, 16)],
                         ids=["whole_map", "depth_first"])
def test_searched_schedules_split_perfectly_and_compute_the_block(
        shape: tuple[int, ...], host: tuple[Any, Any]) -> None:
    """Schedules as the search makes them (sampled, tile sizes mutated) split every loop
    perfectly and compute the block on this machine's threads. A lane count kept while a
    mutation shrank its tile once left predicated splits whose copy-out stages wrote other
    parallel tiles' outputs: a race, wrong results in 23 of 128 tuned records (session 34)."""
    from tests.helpers import assert_searched_schedules_split_perfectly

    cin, cout, expand, k, stride, size = shape
    torch.manual_seed(3)
    model = InvertedResidual(cin, cout, expand, k, stride).eval()
    mod = ir.fuse_for_tuning(_lowered(model, torch.randn(1, cin, size, size), "hw_conv_searched"),
                             host[1])
    workload = ir.workload_of(next(iter(ir.prim_funcs(mod).values())))
    assert_searched_schedules_split_perfectly(workload, host[1])


def test_lower_is_one_call_kept_whole_by_fusion(host: tuple[Any, Any]) -> None:
    model = InvertedResidual(12, 12)
    x = torch.randn(1, 12, 7, 7)
    mod = _lowered(model, x, "hw_conv_whole")
    assert list(ir.prim_funcs(mod)) == ["hw_conv_whole"]
    fused = ir.fuse_for_tuning(mod, host[1])
    (func,) = ir.prim_funcs(fused).values()
    assert conv.RULE in ir.schedule_rules(func)


def test_zoo_mobilenetv3_block_se_compiles_to_one_checked_kernel(tvm_wins: None) -> None:
    """The whole pipeline (capture, partition, lower, untuned build, check against eager)."""
    import hwaware
    from hwaware.zoo import get_model
    from tests.helpers import assert_close_to_eager, kernels_built

    model, inputs = get_model("mobilenetv3_block_se", small=True)
    compiled = hwaware.compile(model, inputs, db=None)
    kernels = kernels_built(compiled)
    fused = [k for k in kernels if k.family == "conv_block"]
    assert len(fused) == 1 and fused[0].tvm_us is not None, compiled.report()
    assert_close_to_eager(model, compiled, *inputs)


# ------------------------------------------------------------------------- tuning
TRIALS = 4
@pytest.fixture(scope="module")
def tuned(host: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[nn.Module, torch.Tensor, Any, TuningDatabase, Any]:
    t, tgt = host
    torch.manual_seed(2)
    model = InvertedResidual(12, 12, 6, 3, 1).eval()
    x = torch.randn(1, 12, 7, 7)
    mod = _lowered(model, x, "hw_conv_tuned")
    work = tmp_path_factory.mktemp("conv_tune")
    db, adapter, _ = tune_kernel_module(mod, t, tgt, Path(work) / "t.db", TRIALS, population=64)
    return model, x, mod, db, adapter


def test_tuning_stores_records_that_apply(tuned: Any, host: tuple[Any, Any]) -> None:
    model, x, mod, db, adapter = tuned
    (func,) = ir.prim_funcs(ir.fuse_for_tuning(mod, host[1])).values()
    whash = ir.workload_hash(ir.workload_of(func))
    assert db.count_records(whash, setup.TVM_VERSION, host[0].key) > 0
    assert db.top_records(whash, setup.TVM_VERSION, host[0].key, 1)
    exe, applied = schedules.build_executable(mod, host[1], adapter)
    assert whash in applied
    with torch.no_grad():
        torch.testing.assert_close(_run(exe, x), model(x), rtol=RTOL, atol=ATOL)


def test_tuning_measures_the_fixed_schedule_first(tuned: Any, host: tuple[Any, Any]) -> None:
    """The family's untuned default is the session's first measured candidate, as sampling
    instructions with its decisions: tuning cannot end slower than untuned, and the search
    mutates from it."""
    _, _, mod, db, _ = tuned
    (func,) = ir.prim_funcs(ir.fuse_for_tuning(mod, host[1])).values()
    workload = ir.workload_of(func)
    (first,) = db.db.execute(
        "SELECT trace_json FROM records WHERE workload_hash = ? ORDER BY id LIMIT 1",
        [ir.workload_hash(workload)]).fetchone()
    insts, decisions = ir.plain_json(
        conv.FAMILY.schedule_fixed(workload["main"], host[1]).trace.as_json())
    measured_insts, measured_decisions = json.loads(first)[:2]
    assert any(inst[0] == "SamplePerfectTile" for inst in insts)
    assert measured_insts[:len(insts)] == insts
    assert [d for d in measured_decisions if d[0] < len(insts)] == decisions


def test_remeasure_replaces_a_lucky_runner_time(tuned: Any, host: tuple[Any, Any]) -> None:
    """remeasure_top_records rebuilds the stored best records and times them in-process: a
    record whose stored time is implausibly fast gets its real (re-timed) one."""
    _, _, mod, db, adapter = tuned
    (func,) = ir.prim_funcs(ir.fuse_for_tuning(mod, host[1])).values()
    workload = ir.workload_of(func)
    whash, version, key = ir.workload_hash(workload), setup.TVM_VERSION, host[0].key
    lucky = db.top_records(whash, version, key, 2)[-1]
    db.remeasure(lucky, [1e-9])
    pair = {r.trace_json for r in db.top_records(whash, version, key, 2)}
    assert lucky.trace_json in pair
    search.remeasure_top_records(workload, adapter, k=2, rounds=3)
    rows = [r for r in db.top_records(whash, version, key, 100) if r.trace_json in pair]
    assert len(rows) == 2
    for row in rows:
        assert len(row.run_secs) == 3 and row.mean_us is not None and row.mean_us > 0.1


def test_remeasure_stores_and_times_the_fixed_schedule(tuned: Any, host: tuple[Any, Any],
                                                        tmp_path: Path) -> None:
    """The default joins the re-timed group even when the database lacks it (tuned before it
    was measured first): it is stored with its in-process timing, next to the best record."""
    from hwaware.kernels import fixed_schedules

    _, _, mod, db, _ = tuned
    (func,) = ir.prim_funcs(ir.fuse_for_tuning(mod, host[1])).values()
    workload = ir.workload_of(func)
    whash, version, key = ir.workload_hash(workload), setup.TVM_VERSION, host[0].key
    with sqlite3.connect(tmp_path / "copy.db") as dst:
        db.db.conn.backup(dst)
    copy = TuningDatabase(tmp_path / "copy.db")
    (fixed_id, fixed_trace) = copy.db.execute(
        "SELECT id, trace_json FROM records WHERE workload_hash = ? ORDER BY id LIMIT 1",
        [whash]).fetchone()
    with copy.db.conn:
        copy.db.execute("DELETE FROM records WHERE id = ?", [fixed_id])
    assert not copy.has_candidate(whash, version, key, fixed_trace)
    adapter = database.SqliteDatabase(copy, host[1], key)
    search.remeasure_top_records(workload, adapter, k=1, rounds=3,
                                     fixed_schedules=fixed_schedules())
    (row,) = [r for r in copy.top_records(whash, version, key, 100)
              if r.trace_json == fixed_trace]
    assert len(row.run_secs) == 3 and row.mean_us is not None and row.mean_us > 0.1


# ------------------------------------------------------------- other targets (build)
@pytest.mark.parametrize("target_name", ["cuda-sm90", "arm64-neon"])
def test_builds_for_other_targets(target_name: str) -> None:
    t = get_target(target_name)
    tgt = setup.tvm_target(t.tvm, t.host_tvm)
    for model, size in [(InvertedResidual(16, 24, 6, 5, 2), 15), (InvertedResidual(8, 8, 1), 7),
                        (InvertedResidual(8, 8, 3, se=True), 7)]:
        x = torch.randn(1, int(model.body[0].in_channels), size, size)
        mod = default_schedule(_lowered(model, x, f"hw_conv_{t.kind}", target_name), tgt)
        exe, _ = schedules.build_executable(mod, tgt, None)
        assert exe is not None
    # TF-same at stride 2: a (0, 1, 0, 1) zero pad before the depthwise conv, in the kernel
    from tests.test_real_patterns import PadBlock
    x = torch.randn(1, 8, 12, 12)
    mod = default_schedule(_lowered(PadBlock((0, 1, 0, 1), stride=2), x, f"hw_conv_tf_{t.kind}",
                                    target_name), tgt)
    assert schedules.build_executable(mod, tgt, None)[0] is not None


@pytest.mark.parametrize("se", [False, True], ids=["plain", "squeeze_excite"])
@pytest.mark.parametrize("target_name", ["cuda-sm90", "host"])
def test_schedule_space_is_generated(target_name: str, se: bool) -> None:
    """MetaSchedule finds the custom rule through the block annotation and samples it."""
    from tvm.s_tir import meta_schedule as ms

    t = get_target(target_name)
    tgt = setup.tvm_target(t.tvm, t.host_tvm)
    mod = ir.fuse_for_tuning(_lowered(InvertedResidual(8, 8, se=se), torch.randn(1, 8, 9, 9),
                                      "hw_conv_space", target_name), tgt)
    (func,) = ir.prim_funcs(mod).values()
    setup.import_tensor_intrinsics()  # else TuneContext imports them slowly (~55 s)
    ctx = ms.TuneContext(mod=ir.workload_of(func), target=tgt,
                         space_generator="post-order-apply", task_name="space")
    (space,) = ctx.generate_design_space()
    kinds = {str(inst.kind.name) for inst in space.trace.insts}
    assert {"SamplePerfectTile", "SampleCategorical", "ComputeAt"} <= kinds
