"""The untuned dense-matmul schedule (`hwaware.tvm.dense`): what it takes, that it computes
what PyTorch does, and that a compiled model's Linear layers get it without tuning."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import hwaware
from hwaware.tvm import dense, ir, schedules
from hwaware.tvm.isa import AVX2, AVX512, vector_unit
from tests.helpers import (
    assert_close_to_eager,
    built_callable,
    checked_on_tvm,
    fused_kernels,
    on_tvm,
)


@pytest.mark.parametrize("unit", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_micro_tile_divides_and_fills_the_registers(unit: Any) -> None:
    for m, n in [(128, 768), (196, 3072), (12, 48), (5, 80)]:
        rows, vectors = dense.micro_tile(m, n, unit)
        assert m % rows == 0 and (n // unit.lanes) % vectors == 0
        assert rows * vectors <= unit.accumulators
    assert dense.micro_tile(8, 36, unit) == (0, 0)  # not whole vectors: not this rule's


def test_micro_tile_follows_the_register_file() -> None:
    """AVX-512's 32 registers take a 4 x 4 tile of 16-lane vectors (6 rows do not divide 128);
    AVX2's 16 registers a 4 x 3 tile of 8-lane vectors: 16 accumulators there spill."""
    assert dense.micro_tile(128, 768, AVX512) == (4, 4)
    assert dense.micro_tile(128, 768, AVX2) == (4, 3)


def test_rows_without_a_filling_divisor_get_a_guarded_last_tile() -> None:
    """17 or 197 rows (a ViT's patches and class token: primes) have no divisor of 4-6 rows:
    the tile takes rows that do not divide, the fewest padded in the last tile."""
    assert dense.micro_tile(17, 64, AVX512) == (6, 4)  # 18 rows: one padded
    assert dense.micro_tile(197, 768, AVX512) == (6, 4)  # 198 rows: one padded
    assert dense.micro_tile(7, 64, AVX512) == (4, 4)  # 8 rows (6 would pad five)


@pytest.mark.parametrize("shape", [(12, 40, 48, True), (16, 64, 96, False), (2, 8, 32, 64, True),
                                   (17, 64, 32, False), (197, 96, 64, True)],
                         ids=["gelu", "plain", "batched", "17_rows", "197_rows"])
def test_dense_schedule_matches_pytorch(shape: tuple[Any, ...], llvm_host: Any) -> None:
    """Linear (+ GELU) kernels scheduled by the rule compute PyTorch's outputs, the bias and
    activation on each micro-tile; leading batch dims run in the parallel loop."""
    *lead, k, n, gelu = shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n), *([nn.GELU()] if gelu else [])).eval()
    x = torch.randn(1, *lead, k)
    mod = fused_kernels(model, x, llvm_host)
    scheduled = [name for name, f in ir.prim_funcs(mod).items()
                 if dense.schedule_dense(f, AVX512) is not None]
    assert any("matmul" in name for name in scheduled), list(ir.prim_funcs(mod))
    call = built_callable(mod, llvm_host)  # DenseMatmul among its rules
    other = torch.randn_like(x)  # not the inputs it was lowered with
    with torch.no_grad():
        torch.testing.assert_close(call(other)[0], model(other), rtol=1e-4, atol=1e-5)


def test_what_is_not_a_vectorizable_matmul_is_declined(llvm_host: Any) -> None:
    """A reduction that is not a matmul (a row sum) and a matmul whose output columns are not
    whole vectors (38: not of 4, 8 or 16 lanes): the rule declines, and the next rule
    schedules them."""
    class RowSum(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(-1)

    import tvm

    for model, x in [(RowSum(), torch.randn(1, 32, 48)),
                     (nn.Linear(48, 38), torch.randn(1, 32, 48))]:
        funcs = ir.prim_funcs(fused_kernels(model, x, llvm_host))
        assert funcs and all(dense.schedule_dense(f, AVX512) is None for f in funcs.values())
    (linear,) = [f for name, f in funcs.items() if "matmul" in name]
    assert not schedules.has_default_schedule(tvm.IRModule({"main": linear}), llvm_host)


def test_untuned_linear_layers_are_built_on_tvm() -> None:
    """A compiled MLP over 16 tokens without a database: its Linear layers run on TVM (built,
    checked against PyTorch and timed against it; here the whole MLP as one call, which only
    an untuned schedule for every contraction allows), and the model computes eager's outputs
    on other inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(1, 16, 64)
    compiled = hwaware.compile(model, (x,), db=None)
    kernels = list(compiled.program.kernels.values())
    assert kernels and all(checked_on_tvm(k) for k in kernels), compiled.report()
    assert_close_to_eager(model, on_tvm(compiled), torch.randn(1, 16, 64))


def test_gelu_epilogue_uses_a_vectorizable_erf(llvm_host: Any) -> None:
    """GELU legalizes with TVM's polynomial `fast_erf` (LLVM makes `erf` a scalar libm call per
    element, which cost a 196x192x768 Linear + GELU more than its matmul), and still computes
    PyTorch's GELU across the clamp at |x| = 4 and beyond."""
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU()).eval()
    x = torch.randn(1, 24, 16)
    mod = fused_kernels(model, x, llvm_host)
    scripts = [f.script() for f in ir.prim_funcs(mod).values()]
    assert scripts and not any("T.erf(" in s for s in scripts)
    call = built_callable(mod, llvm_host)
    wide = torch.linspace(-12, 12, 24 * 16).reshape(1, 24, 16)
    with torch.no_grad():
        torch.testing.assert_close(call(wide)[0], model(wide), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("activation", [nn.GELU(approximate="tanh"), nn.Tanh()],
                         ids=["gelu_tanh", "tanh"])
def test_tanh_epilogues_use_a_vectorizable_tanh(activation: nn.Module, llvm_host: Any) -> None:
    """`tanh` (GPT-2's GELU writes it out; `nn.GELU(approximate="tanh")` and `nn.Tanh`) legalizes
    with TVM's rational `fast_tanh` for float32 (a scalar libm call per element cost an 8x128
    GELU epilogue twice its matmul), and stays within 5 ulp of PyTorch's, saturation included."""
    model = nn.Sequential(nn.Linear(16, 64), activation).eval()
    x = torch.randn(1, 24, 16)
    mod = fused_kernels(model, x, llvm_host)
    scripts = [f.script() for f in ir.prim_funcs(mod).values()]
    assert scripts and not any("T.tanh(" in s for s in scripts), scripts
    call = built_callable(mod, llvm_host)
    wide = torch.linspace(-12, 12, 24 * 16).reshape(1, 24, 16)
    with torch.no_grad():
        torch.testing.assert_close(call(wide)[0], model(wide), rtol=1e-5, atol=2e-5)


def test_small_linear_layers_get_the_register_blocked_schedule(llvm_host: Any) -> None:
    """A batch-1 Linear too small for worker threads (8 tokens, 128 -> 32: GPT-2's MLP output
    at a small width) is the dense rule's, run on the calling thread, not the small-kernel
    rule's scalar loops (17.5 us instead of 2.2 us here)."""
    import tvm
    import tvm_ffi

    model = nn.Linear(128, 32).eval()
    x = torch.randn(1, 8, 128)
    fused = fused_kernels(model, x, llvm_host)
    (unscheduled,) = [f for name, f in ir.prim_funcs(fused).items() if "matmul" in name]
    assert schedules.is_small(tvm.IRModule({"main": unscheduled}))
    with llvm_host:
        mod = schedules.default_schedule(fused, llvm_host)
    (matmul,) = [f for name, f in ir.prim_funcs(mod).items() if "matmul" in name]
    dense_schedule = dense.schedule_dense(unscheduled, vector_unit(llvm_host))
    assert tvm_ffi.structural_equal(matmul.body, dense_schedule.mod["main"].body)
    assert "T.parallel" not in matmul.script()
    call = built_callable(fused_kernels(model, x, llvm_host), llvm_host)
    other = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(call(other)[0], model(other), rtol=1e-4, atol=1e-5)
