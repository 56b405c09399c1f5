"""The vector unit each target's schedules fill (`hwaware.tvm.isa`), read from its CPU
features: TVM 0.27's own vector width says 512 bits for every x86 CPU."""

from __future__ import annotations

import pytest
import tvm

from hwaware.build import _tvm_target
from hwaware.target import get_target
from hwaware.tvm.isa import AVX2, AVX512, NEON, SSE, current_vector_unit, vector_unit


@pytest.mark.parametrize(("name", "unit"), [("x86-avx512", AVX512), ("x86-avx2", AVX2),
                                            ("arm64-neon", NEON)])
def test_each_target_file_gets_its_registers(name: str, unit: object) -> None:
    assert vector_unit(_tvm_target(get_target(name))) == unit


@pytest.mark.parametrize(("mcpu", "unit"), [("znver3", AVX2), ("haswell", AVX2),
                                            ("znver4", AVX512), ("sapphirerapids", AVX512),
                                            ("x86-64", SSE)])
def test_x86_cpus_by_their_features(mcpu: str, unit: object) -> None:
    assert vector_unit(tvm.target.Target({"kind": "llvm", "mcpu": mcpu})) == unit


def test_accumulators_leave_registers_for_the_operands() -> None:
    assert (AVX512.accumulators, AVX2.accumulators, NEON.accumulators) == (24, 12, 24)


def test_the_sampled_spaces_read_the_target_in_scope() -> None:
    """MetaSchedule calls a family's sampled space without the target: it reads the target
    the tuning session entered, else AVX-512's unit (the spaces' original assumption)."""
    assert tvm.target.Target.current(allow_none=True) is None
    assert current_vector_unit() == AVX512
    with tvm.target.Target({"kind": "llvm", "mcpu": "znver3"}):
        assert current_vector_unit() == AVX2
    assert vector_unit(tvm.target.Target({"kind": "cuda", "arch": "sm_90"})) == AVX512


@pytest.mark.parametrize(("mcpu", "widths"), [("cascadelake", (64, 32, 16, 8, 4)),
                                              ("znver3", (16, 8, 4))])
def test_attention_keeps_the_p_v_tiles_its_registers_hold(mcpu: str, widths: tuple[int, ...]
                                                          ) -> None:
    """4 query rows x 64 head dims are 16 AVX-512 accumulators but 32 of AVX2's 16 registers:
    on AVX2 the p.v tile keeps the widths of at most 12 accumulators."""
    from hwaware.kernels.attention_kernel import PV_TILES, _fitting_widths

    with tvm.target.Target({"kind": "llvm", "mcpu": mcpu}):
        assert _fitting_widths(PV_TILES) == (PV_TILES[0], widths)
