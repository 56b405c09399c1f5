"""convnext_block: find() on ConvNeXt and ConvFirst blocks (and the variants it must leave
alone), lower() + build against eager PyTorch, tuning records that apply, GELU without libm
calls, and build-only checks for cuda and arm64."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hwaware import partition
from hwaware.kernels import convnext
from hwaware.target import get_target
from hwaware.tvm import ir, schedules, setup
from tests.helpers import default_schedule, tune_kernel_module
from tests.test_kernels_conv import _graph, _kernel_graph, _ops, _run

RTOL, ATOL = 1e-3, 1e-4


# ------------------------------------------------------------------ reference modules
class ConvNeXtBlock(nn.Module):
    """ConvNeXt block (channels-last MLP). `norm_shape` lets a test normalize over other dims."""

    def __init__(self, dim: int, k: int = 7, gelu: str = "none", gamma: bool = True,
                 norm: bool = True, stride: int = 1, dilation: int = 1,
                 norm_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, k, stride, padding=dilation * (k // 2),
                                dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(norm_shape or dim, eps=1e-6) if norm else nn.Identity()
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU(approximate=gelu)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) * 0.5 + 0.5) if gamma else None
        for m in (self.norm,):  # non-trivial LayerNorm affine
            if isinstance(m, nn.LayerNorm):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        y = y.permute(0, 3, 1, 2)
        return x + y if y.shape == x.shape else y


class ConvFirstBlock(nn.Module):
    """ConvFirst block (Lavin 2024): depthwise kxk + BN first, then 1x1 expand + BN + act,
    1x1 project + BN, residual; NCHW throughout."""

    def __init__(self, dim: int, expand: int = 4, k: int = 3,
                 act: type[nn.Module] = nn.ReLU):
        super().__init__()
        hidden = dim * expand
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.BatchNorm2d(dim),
            nn.Conv2d(dim, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act(),
            nn.Conv2d(hidden, dim, 1, bias=False), nn.BatchNorm2d(dim))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Leaky(nn.Module):
    """A block whose hidden activation is also an output: not fusable."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = ConvNeXtBlock(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.block
        y = b.dwconv(x).permute(0, 2, 3, 1)
        h = b.act(b.pwconv1(b.norm(y)))
        assert b.gamma is not None
        return x + (b.gamma * b.pwconv2(h)).permute(0, 3, 1, 2), h


def _lowered(model: nn.Module, x: torch.Tensor, name: str) -> Any:
    gm = _graph(model, x)
    (group,) = convnext.find(gm)
    return convnext.FAMILY.lower(_kernel_graph(gm, group), [x], get_target("host"), name)


@pytest.fixture(scope="module")
def host() -> tuple[Any, Any]:
    t = get_target("host")
    return t, setup.tvm_target(t.tvm, t.host_tvm)


# ---------------------------------------------------------------------------- find
def test_find_convnext_block() -> None:
    gm = _graph(ConvNeXtBlock(16), torch.randn(1, 16, 8, 8))
    (group,) = convnext.find(gm)
    assert _ops(group) == ["conv2d", "permute", "layer_norm", "linear", "gelu", "linear",
                           "mul", "permute", "add"]


def test_convfirst_block_goes_to_convnext_not_conv_block() -> None:
    """A ConvFirst block with a 3x3 depthwise conv would also start a (shorter) conv_block
    match; the families' order gives it whole to convnext_block."""
    gm = _graph(ConvFirstBlock(8), torch.randn(1, 8, 9, 9))
    (group,) = partition.find_fused_groups(gm)
    assert _ops(group) == ["conv2d", "conv2d", "relu", "conv2d", "add"]
    assert {n.meta[partition.FUSED_META] for n in group} == {"convnext_block"}


SKIPPED = {
    "norm_over_two_dims": lambda: ConvNeXtBlock(8, norm_shape=(9, 8)),
    "kernel_9": lambda: ConvNeXtBlock(8, k=9),
    "stride_2": lambda: ConvNeXtBlock(8, stride=2),
    "dilation_2": lambda: ConvNeXtBlock(8, dilation=2),
    "tanh_between": lambda: ConvFirstBlock(8, act=nn.Tanh),
    "hidden_used_outside": lambda: Leaky(8),
}


@pytest.mark.parametrize("variant", sorted(SKIPPED))
def test_find_skips_unsupported(variant: str, caplog: pytest.LogCaptureFixture) -> None:
    gm = _graph(SKIPPED[variant](), torch.randn(1, 8, 9, 9))
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.convnext"):
        assert convnext.find(gm) == []
    assert "not fused" in caplog.text


@pytest.mark.parametrize("dtype, batch", [(torch.float64, 1), (torch.float32, 2)])
def test_find_skips_float64_and_batch(dtype: torch.dtype, batch: int,
                                      caplog: pytest.LogCaptureFixture) -> None:
    model = ConvNeXtBlock(8).to(dtype)
    gm = _graph(model, torch.randn(batch, 8, 9, 9, dtype=dtype))
    with caplog.at_level(logging.DEBUG, logger="hwaware.kernels.convnext"):
        assert convnext.find(gm) == []
    assert "float32" in caplog.text or "batch" in caplog.text


# ------------------------------------------------------------------ lower + build
CASES = {  # name: (model factory, channels, size)
    "convnext-16-8": (lambda: ConvNeXtBlock(16), 16, 8),
    "convnext-20-15": (lambda: ConvNeXtBlock(20), 20, 15),
    "convnext-12-7-tanh": (lambda: ConvNeXtBlock(12, gelu="tanh"), 12, 7),
    "convnext-12-1": (lambda: ConvNeXtBlock(12), 12, 1),
    "convnext-k5-no-norm-no-gamma": (lambda: ConvNeXtBlock(12, k=5, gamma=False, norm=False),
                                     12, 7),
    "convfirst-20-15-gelu": (lambda: ConvFirstBlock(20, 4, 3, nn.GELU), 20, 15),
    "convfirst-12-7-k5-hardswish": (lambda: ConvFirstBlock(12, 3, 5, nn.Hardswish), 12, 7),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_default_schedule_matches_eager(case: str, host: tuple[Any, Any]) -> None:
    factory, channels, size = CASES[case]
    torch.manual_seed(1)
    model = factory().eval()
    x = torch.randn(1, channels, size, size)
    mod = default_schedule(_lowered(model, x, f"hw_convnext_test_{size}"), host[1])
    funcs = ir.prim_funcs(mod)
    assert len(funcs) == 1 and all(convnext.RULE in ir.schedule_rules(f) for f in funcs.values())
    exe, _ = schedules.build_executable(mod, host[1], None)
    with torch.no_grad():
        torch.testing.assert_close(_run(exe, x), model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_has_no_libm_calls(approximate: str, host: tuple[Any, Any]) -> None:
    """GELU's erf/tanh must not lower to a scalar libm call per element."""
    mod = default_schedule(_lowered(ConvNeXtBlock(16, gelu=approximate),
                                    torch.randn(1, 16, 8, 8), "hw_convnext_libm"), host[1])
    ll = schedules.build_executable(mod, host[1], None)[0].mod.imports[0].inspect_source("ll")
    calls = {line.split("@")[1].split("(")[0] for line in ll.splitlines()
             if "call " in line and "@" in line}
    assert not {c for c in calls if c.rstrip("f").endswith(("erf", "tanh"))}, calls


def test_searched_schedules_split_perfectly_and_compute_the_block(host: tuple[Any, Any]) -> None:
    """Schedules as the search makes them (sampled, tile sizes mutated) split every loop
    perfectly and compute the block on this machine's threads (see conv_block's test)."""
    from tests.helpers import assert_searched_schedules_split_perfectly

    torch.manual_seed(3)
    mod = ir.fuse_for_tuning(_lowered(ConvNeXtBlock(24), torch.randn(1, 24, 10, 10),
                                      "hw_convnext_searched"), host[1])
    workload = ir.workload_of(next(iter(ir.prim_funcs(mod).values())))
    assert_searched_schedules_split_perfectly(workload, host[1])


def test_zoo_convnext_block_compiles_to_one_checked_kernel() -> None:
    """The whole pipeline (capture, partition, lower, untuned build, check against eager)."""
    import hwaware
    from hwaware.zoo import get_model
    from tests.helpers import assert_close_to_eager, kernels_built

    model, inputs = get_model("convnext_block", small=True)
    compiled = hwaware.compile(model, inputs, db=None)
    kernels = kernels_built(compiled)
    fused = [k for k in kernels if k.family == "convnext_block"]
    assert len(fused) == 1 and fused[0].tvm_us is not None, compiled.report()
    assert_close_to_eager(model, compiled, *inputs)


# ------------------------------------------------------------------------- tuning
TRIALS = 4


def test_tuning_stores_records_that_apply(host: tuple[Any, Any], tmp_path: Path) -> None:
    t, tgt = host
    torch.manual_seed(2)
    model = ConvNeXtBlock(12).eval()
    x = torch.randn(1, 12, 7, 7)
    mod = _lowered(model, x, "hw_convnext_tuned")
    db, adapter, workloads = tune_kernel_module(mod, t, tgt, tmp_path / "t.db", TRIALS,
                                                population=64)
    (workload,) = workloads.values()
    whash = ir.workload_hash(workload)
    assert db.count_records(whash, setup.TVM_VERSION, t.key) > 0
    exe, applied = schedules.build_executable(mod, tgt, adapter)
    assert whash in applied
    with torch.no_grad():
        torch.testing.assert_close(_run(exe, x), model(x), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------- other targets (build)
@pytest.mark.parametrize("target_name", ["cuda-sm90", "arm64-neon"])
def test_builds_for_other_targets(target_name: str) -> None:
    t = get_target(target_name)
    tgt = setup.tvm_target(t.tvm, t.host_tvm)
    for model, channels, size in [(ConvNeXtBlock(20), 20, 15), (ConvFirstBlock(12), 12, 7)]:
        x = torch.randn(1, channels, size, size)
        mod = default_schedule(_lowered(model, x, f"hw_convnext_{t.kind}"), tgt)
        exe, _ = schedules.build_executable(mod, tgt, None)
        assert exe is not None


@pytest.mark.parametrize("target_name", ["cuda-sm90", "host"])
def test_schedule_space_is_generated(target_name: str) -> None:
    """MetaSchedule finds the custom rule through the block annotation and samples it."""
    from tvm.s_tir import meta_schedule as ms

    t = get_target(target_name)
    tgt = setup.tvm_target(t.tvm, t.host_tvm)
    mod = ir.fuse_for_tuning(_lowered(ConvNeXtBlock(8), torch.randn(1, 8, 9, 9),
                                              "hw_convnext_space"), tgt)
    (func,) = ir.prim_funcs(mod).values()
    setup.import_tensor_intrinsics()  # else TuneContext imports them slowly (~55 s)
    ctx = ms.TuneContext(mod=ir.workload_of(func), target=tgt,
                         space_generator="post-order-apply", task_name="space")
    (space,) = ctx.generate_design_space()
    kinds = {str(inst.kind.name) for inst in space.trace.insts}
    assert {"SamplePerfectTile", "SampleCategorical", "ComputeAt"} <= kinds
