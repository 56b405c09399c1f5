"""The host's FP32 peak, measured: what "% of FP32 peak" in the kernel tables is a share of.

A peak from the data sheet formula (cores x FMA pipes x lanes x 2 x clock) needs the clock the
cores really run at, and a VM's /proc/cpuinfo gives the nominal one: on an AMD EPYC (Zen 4)
host it says 2.6 GHz while one core runs 512-bit FMAs at 115 GFLOP/s (~3.6 GHz). The formula
gave 333 GFLOP/s for its 2 cores counting two 512-bit FMA pipes, and 166 counting right (two
256-bit pipes), less than the 199 GFLOP/s the fused ResNet basic block reached. So the host's
peak is measured once per machine: a C loop of independent vector FMAs (12 accumulators, more
than pipes x latency, so the pipes never wait), built with the system C compiler, runs on one
core; the peak is the best of a few runs times the cores. One core, because on a shared 2-core
VM a loop on both cores measures what the neighbours leave it (while a benchmark ran: 121
GFLOP/s for both cores, 115 for one alone); the best run, because load only ever slows it.
The result is cached in hwaware's cache folder per CPU, core count and ISA; where it cannot be
measured (no compiler, an unwritable cache), detection keeps the formula.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil

from hwaware.threads import build_c_library, cache_dir

log = logging.getLogger(__name__)

ACCUMULATORS = 12
SOURCE = r"""
#include <time.h>
typedef float vec __attribute__((vector_size(VECTOR_BYTES)));

/* `iters` rounds of ACC independent vector FMAs acc = acc * mul + add; returns the seconds
   they took. The values come in as arguments, so the compiler can fold none of them. */
double hwaware_fma_seconds(long iters, float seed, float mul_by, float add_to, float *sink) {
  vec acc[ACC];
  vec mul = (vec){} + mul_by, add = (vec){} + add_to;
  for (int j = 0; j < ACC; j++) acc[j] = (vec){} + (seed + (float)j);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < iters; i++) {
    #pragma GCC unroll 32  /* every accumulator in a register */
    for (int j = 0; j < ACC; j++) acc[j] = acc[j] * mul + add;  /* contracted to FMAs */
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  vec total = acc[0];
  for (int j = 1; j < ACC; j++) total += acc[j];
  *sink = total[0];
  return (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
}
"""
ISA_FLAGS = {512: ["-mavx512f", "-mfma"], 256: ["-mavx2", "-mfma"], 128: []}


def measured_peak_gflops(cores: int, vector_bits: int, cpu: str, runs: int = 5) -> float | None:
    """FP32 GFLOP/s of `cores` cores running vector FMAs of `vector_bits` (cached per `cpu`, a
    string naming the processor); None where it cannot be measured."""
    key = hashlib.sha256(f"{SOURCE}{cpu}{cores}{vector_bits}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"fp32_peak_{key}.json"
    try:
        return float(json.loads(cached.read_text())["gflops"])
    except (OSError, ValueError, KeyError):
        pass
    library = _fma_library(vector_bits, key)
    if library is None:
        return None
    gflops = cores * max(_one_core_gflops(library, vector_bits) for _ in range(runs))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps({"gflops": gflops, "cpu": cpu, "cores": cores,
                                      "vector_bits": vector_bits}))
    except OSError as err:
        log.debug("FP32 peak not cached: %s", err)
    return gflops


def _fma_library(vector_bits: int, key: str) -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or vector_bits not in ISA_FLAGS:
        return None
    path = cache_dir() / f"fma_loop_{key}.so"
    flags = ["-O3", *ISA_FLAGS[vector_bits], f"-DVECTOR_BYTES={vector_bits // 8}",
             f"-DACC={ACCUMULATORS}"]
    try:
        if not path.exists() and not build_c_library(compiler, SOURCE, flags, [], path):
            return None
        library = ctypes.CDLL(str(path))
    except OSError as err:  # an unwritable cache folder, a library that does not load
        log.debug("FP32 peak not measured: %s", err)
        return None
    library.hwaware_fma_seconds.restype = ctypes.c_double
    library.hwaware_fma_seconds.argtypes = [ctypes.c_long, ctypes.c_float, ctypes.c_float,
                                            ctypes.c_float, ctypes.POINTER(ctypes.c_float)]
    return library


def _one_core_gflops(library: ctypes.CDLL, vector_bits: int, iters: int = 4_000_000) -> float:
    sink = ctypes.c_float()
    seconds = library.hwaware_fma_seconds(iters, 1.0, 0.999999, 1e-6, ctypes.byref(sink))
    return iters * ACCUMULATORS * (vector_bits // 32) * 2 / max(seconds, 1e-9) / 1e9
