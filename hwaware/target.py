"""Hardware targets: one frozen dataclass per device, loaded from the data files in `targets/`.

Goes in: a target name (`host`, `x86-avx512`, `cuda-sm90`, ...) or a path to a target JSON file.
Comes out: a `Target` carrying the TVM target dict plus the hardware facts that tuning, latency
prediction and architecture search need (cores, vector width, peak FP32 GFLOP/s, memory bandwidth,
cache sizes). `host` is detected from this machine's CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from hwaware.peak import measured_peak_gflops

TARGET_SCHEMA_VERSION = 1
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"


class UnknownTargetError(ValueError):
    """A target name that no file in targets/ defines."""


@dataclass(frozen=True)
class Target:
    """A hardware target: how TVM compiles for it and what the hardware can do."""

    name: str
    description: str
    kind: str  # "cpu" or "cuda"
    tvm: dict[str, Any] = field(hash=False)
    cores: int
    vector_bits: int
    fma_units: int
    clock_ghz: float
    peak_fp32_gflops: float
    mem_bandwidth_gbs: float
    l1d_kib: int
    l2_kib: int
    l3_kib: int
    runnable_on_host_arch: str | None = None
    host_tvm: dict[str, Any] | None = field(default=None, hash=False)
    schema_version: int = TARGET_SCHEMA_VERSION

    @functools.cached_property
    def key(self) -> str:
        """The database key: the TVM target dict, canonicalised. Same code generation, same key."""
        canon = json.dumps(self.tvm, sort_keys=True)
        readable = "-".join(
            str(self.tvm.get(k)) for k in ("kind", "mcpu", "arch") if self.tvm.get(k)
        )
        return f"{readable}-{self.cores}c-{hashlib.sha256(canon.encode()).hexdigest()[:8]}"

    @property
    def can_run_here(self) -> bool:
        """Whether kernels built for this target can execute on this machine (else: build only)."""
        if self.kind == "cuda":
            return _cuda_available()
        return self.runnable_on_host_arch == platform.machine() and _host_supports(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2)

    @staticmethod
    def from_json(text: str) -> Target:
        return Target(**json.loads(text))


def list_targets() -> list[str]:
    """Names of every target defined in targets/."""
    return sorted(p.stem for p in TARGETS_DIR.glob("*.json"))


def get_target(name_or_path: str | os.PathLike[str] | Target) -> Target:
    """Load a target by name (see `list_targets()`) or from a JSON file path."""
    if isinstance(name_or_path, Target):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise UnknownTargetError(
            f"a target is a name or the path of a target JSON file, not {name_or_path!r}; "
            f"valid targets: {', '.join(list_targets())}")
    path = Path(name_or_path)
    if path.suffix == ".json" and path.exists():
        return load_target_file(path)
    file = TARGETS_DIR / f"{name_or_path}.json"
    if not file.exists():
        raise UnknownTargetError(
            f"unknown target {str(name_or_path)!r}; valid targets: {', '.join(list_targets())}"
        )
    return load_target_file(file)


def load_target_file(path: Path) -> Target:
    """A target JSON file, refused with its name and the reason if it is not JSON, lacks
    fields or has fields a `Target` does not know."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"target file {path}: not readable JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"target file {path}: must hold a JSON object, not {type(data).__name__}")
    if data.get("detect"):
        return detect_host()
    data = {k: v for k, v in data.items() if k != "detect"}
    fields = {f.name: f for f in dataclasses.fields(Target)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    unknown = sorted(set(data) - set(fields))
    if missing or unknown:
        raise ValueError(f"target file {path}: " + "; ".join(
            part for part in (f"missing fields {missing}" if missing else "",
                              f"unknown fields {unknown}" if unknown else "") if part)
            + f" (a target has {sorted(fields)})")
    return Target(**data)


@lru_cache(maxsize=1)
def detect_host() -> Target:
    """Describe this machine's CPU as a Target (x86 with AVX-512 or AVX2, or aarch64)."""
    arch = platform.machine()
    info, flags = _cpuinfo(), _cpu_flags()
    cores = len(os.sched_getaffinity(0))
    clock = _cpu_ghz()
    if arch == "aarch64":
        mcpu, vector_bits, tvm = "generic", 128, {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                   "mattr": ["+neon"], "num-cores": cores}
    else:
        mcpu, vector_bits = _x86_mcpu(flags, info)
        tvm = {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}
    fma_units = full_width_fmas_per_cycle(info, vector_bits)
    flops_per_cycle = cores * fma_units * (vector_bits // 32) * 2
    cpu = " ".join(info.get(k, "") for k in ("vendor_id", "cpu family", "model", "model name"))
    measured = measured_peak_gflops(cores, vector_bits, f"{arch} {cpu} {sorted(flags)}")
    if measured is not None:  # the clock the cores really ran the FMA loop at
        clock = round(measured / flops_per_cycle, 2)
    peak = measured if measured is not None else flops_per_cycle * clock
    caches = _cache_kib()
    model = info.get("model name", arch)
    how = "measured" if measured is not None else "from the nominal clock"
    return Target(
        name="host",
        description=f"this machine: {model} ({arch}, {mcpu} code), {cores} cores, "
                    f"FP32 peak {how}",
        kind="cpu",
        tvm=tvm,
        cores=cores,
        vector_bits=vector_bits,
        fma_units=fma_units,
        clock_ghz=clock,
        peak_fp32_gflops=round(peak, 1),
        mem_bandwidth_gbs=10.0,  # not measured at load time; see STACK_NOTES.md
        l1d_kib=caches.get("L1d", 32),
        l2_kib=caches.get("L2", 1024),
        l3_kib=caches.get("L3", 0),
        runnable_on_host_arch=arch,
    )


def _x86_mcpu(flags: set[str], cpuinfo: dict[str, str]) -> tuple[str, int]:
    """LLVM's name for this x86 core (its scheduling model, and the tuning database's key) and
    its vector width in bits."""
    if cpuinfo.get("vendor_id") == "AuthenticAMD" and "avx2" in flags:
        family = int(cpuinfo.get("cpu family", "0"))
        if family >= 26 and "avx512f" in flags:
            return "znver5", 512
        if family == 25:
            return ("znver4", 512) if "avx512f" in flags else ("znver3", 256)
    if "amx_tile" in flags and "avx512_fp16" in flags:
        return "sapphirerapids", 512
    if "avx512_vnni" in flags:
        return "cascadelake", 512
    if "avx512f" in flags:
        return "skylake-avx512", 512
    if "avx2" in flags:
        return "haswell", 256
    return "x86-64", 128


def full_width_fmas_per_cycle(cpuinfo: dict[str, str], vector_bits: int) -> int:
    """FP32 FMAs of the full vector width a core starts per cycle (the peak's `fma_units`): two
    on Intel's AVX-512 and AVX2 cores and AMD's AVX2 ones; one on AMD Zen 4 (family 25), which
    runs each 512-bit op on its two 256-bit FMA pipes. (Zen 5, family 26, has 512-bit pipes.)"""
    amd_zen4 = cpuinfo.get("vendor_id") == "AuthenticAMD" and cpuinfo.get("cpu family") == "25"
    return 1 if amd_zen4 and vector_bits == 512 else 2


def _host_supports(target: Target) -> bool:
    needs = {"cascadelake": "avx512_vnni", "skylake-avx512": "avx512f", "haswell": "avx2",
             "sapphirerapids": "amx_tile", "znver3": "avx2", "znver4": "avx512f",
             "znver5": "avx512f"}.get(str(target.tvm.get("mcpu")))
    return needs is None or needs in _cpu_flags()


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_flags() -> set[str]:
    info = _cpuinfo()
    return set(info.get("flags", info.get("Features", "")).split())


def _cpu_ghz() -> float:
    try:
        return round(float(_cpuinfo()["cpu MHz"]) / 1000.0, 2)
    except (KeyError, ValueError):
        return 2.5


def _cache_kib() -> dict[str, int]:
    out: dict[str, int] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            ctype = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        name = f"L{level}" + ("d" if ctype == "Data" else "" if ctype == "Unified" else "i")
        out[name] = int(size.rstrip("K")) if size.endswith("K") else int(size.rstrip("M")) * 1024
    return out


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
