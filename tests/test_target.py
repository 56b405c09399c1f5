"""Targets are data files; unknown names get an error listing the valid ones."""

from __future__ import annotations

import platform

import pytest

from hwaware.target import Target, UnknownTargetError, detect_host, get_target, list_targets


def test_required_targets_exist() -> None:
    names = set(list_targets())
    assert {"host", "x86-avx512", "x86-avx2", "arm64-neon", "cuda-sm80", "cuda-sm90"} <= names


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(UnknownTargetError, match="x86-avx512") as err:
        get_target("tpu-v9")
    assert "tpu-v9" in str(err.value)


@pytest.mark.parametrize("name", ["x86-avx512", "x86-avx2", "arm64-neon", "cuda-sm80", "cuda-sm90"])
def test_target_files_carry_hardware_facts(name: str) -> None:
    t = get_target(name)
    assert t.cores > 0 and t.vector_bits > 0 and t.peak_fp32_gflops > 0
    assert t.mem_bandwidth_gbs > 0 and t.l2_kib > 0
    assert Target.from_json(t.to_json()) == t


def test_keys_differ_between_targets() -> None:
    keys = {get_target(n).key for n in list_targets() if n != "host"}
    assert len(keys) == len(list_targets()) - 1


def test_host_is_detected() -> None:
    host = detect_host()
    assert host.runnable_on_host_arch == platform.machine()
    assert host.can_run_here
    assert host.tvm["kind"] == "llvm"


def test_cross_targets_are_build_only_here() -> None:
    if platform.machine() == "x86_64":
        assert not get_target("arm64-neon").can_run_here


@pytest.mark.parametrize("vendor,family,vector_bits,fmas", [
    ("GenuineIntel", "6", 512, 2),    # Xeon (Skylake-SP .. Sapphire Rapids): two 512-bit FMA units
    ("GenuineIntel", "6", 256, 2),    # AVX2 cores
    ("AuthenticAMD", "25", 512, 1),   # Zen 4: AVX-512 on two 256-bit pipes
    ("AuthenticAMD", "25", 256, 2),   # Zen 3 (no AVX-512)
    ("AuthenticAMD", "26", 512, 2),   # Zen 5: 512-bit pipes
])
def test_peak_counts_the_fmas_the_core_issues_per_cycle(vendor: str, family: str,
                                                        vector_bits: int, fmas: int) -> None:
    from hwaware.target import full_width_fmas_per_cycle

    info = {"vendor_id": vendor, "cpu family": family}
    assert full_width_fmas_per_cycle(info, vector_bits) == fmas


def test_host_peak_is_cores_times_fmas_times_lanes_times_clock() -> None:
    host = detect_host()
    flops_per_cycle = host.fma_units * (host.vector_bits // 32) * 2
    assert host.peak_fp32_gflops == pytest.approx(host.cores * flops_per_cycle * host.clock_ghz,
                                                  abs=0.1)
