"""The vector unit a CPU target's schedules fill: fp32 lanes per register, and registers.

Goes in: a TVM target. Comes out: its `VectorUnit`, read from the target's CPU features: x86
with AVX-512 has 32 registers of 16 lanes, x86 with AVX (AVX2) 16 of 8, older x86 16 of 4,
AArch64 (NEON) 32 of 4. The register-tiled schedules size their accumulator tiles by it: a
tile of more accumulators than registers spills every FMA's accumulator to the stack.

Not TVM's `llvm_get_vector_width`: in TVM 0.27 it answers 512 for every x86 CPU (znver3,
haswell, even the generic x86-64: measured), and schedules that took 16 lanes and 24
accumulators from it on a 16-register AVX2 machine (Zen 3) ran element-wise kernels 2-8x
slower than 8 lanes, and Linear layers 0.5-0.6x of PyTorch against about 1.0x.

The sampled schedule spaces MetaSchedule calls get no target: they read the target in scope
(`with target:`, which the tuning sessions enter), else AVX-512's unit, the one the spaces
were first written for.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import tvm


@dataclass(frozen=True)
class VectorUnit:
    """A CPU's vector registers: `lanes` fp32 values each, `registers` of them."""

    lanes: int
    registers: int

    @property
    def accumulators(self) -> int:
        """The accumulators a register tile may hold: three quarters of the registers, the
        rest for the operands loaded and broadcast beside them (24 on AVX-512, 12 on AVX2)."""
        return self.registers * 3 // 4


AVX512 = VectorUnit(16, 32)
AVX2 = VectorUnit(8, 16)
SSE = VectorUnit(4, 16)
NEON = VectorUnit(4, 32)


def vector_unit(target: Any) -> VectorUnit:
    """The vector unit of TVM `target` (an LLVM target; any other kind gets AVX-512's, the
    value its callers never use on a GPU)."""
    return _vector_unit_of(str(target)) if target.kind.name == "llvm" else AVX512


@functools.lru_cache(maxsize=64)
def _vector_unit_of(target_json: str) -> VectorUnit:
    from tvm.target.codegen import llvm_cpu_has_features, llvm_get_system_triple

    target = tvm.target.Target(target_json)
    triple = str(target.attrs.get("mtriple", "")) or str(llvm_get_system_triple())
    if triple.startswith(("aarch64", "arm64")):
        return NEON
    if not triple.startswith(("x86_64", "i686", "i386")):
        return SSE  # an ISA the schedules were not written for: narrow vectors, no spills
    if llvm_cpu_has_features("avx512f", target):
        return AVX512
    return AVX2 if llvm_cpu_has_features("avx", target) else SSE


def current_vector_unit() -> VectorUnit:
    """The vector unit of the target in scope (`with target:`), else AVX-512's: for the
    sampled schedule spaces, which MetaSchedule calls without the target."""
    target = tvm.target.Target.current(allow_none=True)
    return AVX512 if target is None else vector_unit(target)
