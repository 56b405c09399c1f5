"""Targets are data files; unknown names get an error listing the valid ones."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from hwaware.peak import measured_peak_gflops
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
                                                  rel=0.01)


@pytest.mark.parametrize("vendor,family,flags,mcpu", [
    ("AuthenticAMD", "25", "avx2 avx512f avx512_vnni", ("znver4", 512)),
    ("AuthenticAMD", "25", "avx2", ("znver3", 256)),
    ("AuthenticAMD", "26", "avx2 avx512f", ("znver5", 512)),
    ("GenuineIntel", "6", "avx2 avx512f avx512_vnni", ("cascadelake", 512)),
    ("GenuineIntel", "6", "avx2 avx512f avx512_vnni amx_tile avx512_fp16",
     ("sapphirerapids", 512)),
    ("GenuineIntel", "6", "avx2", ("haswell", 256)),
])
def test_host_code_is_generated_for_its_own_core(vendor: str, family: str, flags: str,
                                                 mcpu: tuple[str, int]) -> None:
    """The host's LLVM CPU names its core (its scheduling model, and a database key of its own:
    records tuned on a Xeon are not taken for timings on an EPYC)."""
    from hwaware.target import _x86_mcpu

    assert _x86_mcpu(set(flags.split()), {"vendor_id": vendor, "cpu family": family}) == mcpu


def test_fp32_peak_is_measured_once_per_machine_and_cached(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A real FMA loop built with the system compiler, run on the cores; the second call reads
    the cache (with no compiler left it could not measure again)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bits = detect_host().vector_bits
    first = measured_peak_gflops(2, bits, "test cpu", runs=1)
    assert first is not None and first > 0
    assert len(list((tmp_path / "hwaware").glob("fp32_peak_*.json"))) == 1
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert measured_peak_gflops(2, bits, "test cpu", runs=1) == first
    assert measured_peak_gflops(2, bits, "another cpu", runs=1) is None  # not measurable


def test_host_peak_is_measured_where_a_compiler_is_at_hand() -> None:
    host = detect_host()
    assert host.description.endswith("FP32 peak measured"), host.description


def test_a_target_is_resolved_for_tvm_once() -> None:
    from hwaware.tvm.setup import resolve

    target = get_target("host")
    resolved = resolve(target)
    assert resolve(get_target("host")) is resolved
    assert resolved.key == target.key and resolved.tvm.kind.name == "llvm"
    assert str(resolved.tvm.attrs["mcpu"]) == target.tvm["mcpu"]
