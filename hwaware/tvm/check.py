"""Build, guard: does a tuned record's schedule compute what its workload computes?

Goes in: a workload (the fused TIR function, unscheduled: its definition as the importer
produced it from PyTorch's ops), a tuning record of it (a trace) and a CPU target. Comes out:
None when the scheduled kernel, built and run on random inputs, gives the same outputs as the
workload built without any schedule, else why not.

A schedule is meant to preserve its workload's meaning, but a record can compute wrong numbers:
a buggy schedule rule or postproc, an unsafe primitive (`unsafe_set_dtype`), a record imported
from another database. The runner times candidates and never looks at their outputs, so such a
record can be the fastest (doing less work is fast). The build (`SqliteDatabase(verify=True)`)
checks the best record of each workload with `record_mismatch` before applying it.

Tolerance: rtol 1e-3, atol 1e-4 scaled by the reference's largest magnitude when above 1 (as
`hwaware.verify`: summation order alone moves large float32 sums by more than a fixed atol);
rtol 1e-2, atol 1e-3 for float16. Integer outputs must be equal.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import tvm

log = logging.getLogger(__name__)

TOLERANCES = {"float32": (1e-3, 1e-4), "float64": (1e-3, 1e-4), "float16": (1e-2, 1e-3)}
SEED = 0


def record_mismatch(workload: tvm.IRModule, record: Any, target: tvm.target.Target
                    ) -> str | None:
    """None when `record` (a MetaSchedule `TuningRecord` of `workload`) computes the
    workload's outputs within the tolerance on random inputs, else what differs (or how its
    kernel fails to build or run). A workload this check cannot feed (symbolic shapes, a dtype
    numpy lacks) passes unchecked."""
    from hwaware.tvm.setup import fast_build

    args = _random_args(workload)
    if args is None:
        log.debug("record check skipped: a parameter of the workload has no static shape or "
                  "numpy dtype")
        return None
    expected = _run(tvm.compile(workload, target=target), args)
    try:
        sch = tvm.s_tir.Schedule(workload)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        got = _run(fast_build(sch.mod, target, None), args)
    except Exception as err:  # TVM's schedule, build and run raise many error types
        return f"its kernel fails to build or run: {type(err).__name__}: " + \
            (str(err).strip().splitlines() or [""])[-1][:200]
    names = [p.name for p in workload["main"].params]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        why = _difference(g, e)
        if why:
            return f"parameter {i} ({names[i]}): {why}"
    return None


def _random_args(workload: tvm.IRModule) -> list[np.ndarray] | None:
    """One array per parameter of the workload: floats normal, integers zero (valid as
    indices); None if a parameter is not a tensor of static shape and a numpy dtype."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(SEED)
    arrays = []
    for info in ArgInfo.from_entry_func(workload, remove_preproc=True):
        kind, dtype_name, shape = info.as_json()
        try:
            shape = [int(d) for d in shape]
            dtype = np.dtype(str(dtype_name))
        except (TypeError, ValueError):
            return None
        if kind != "TENSOR":
            return None
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(np.zeros(shape, dtype))
    return arrays


def _run(lib: Any, args: list[np.ndarray]) -> list[np.ndarray]:
    """`lib`'s main on copies of `args`, every buffer after the call (outputs and inputs)."""
    device = tvm.cpu()
    tensors = [tvm.runtime.tensor(a.copy(), device) for a in args]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors]


def _difference(got: np.ndarray, expected: np.ndarray) -> str | None:
    if expected.dtype.kind != "f":
        return None if np.array_equal(got, expected) else "integer values differ"
    rtol, atol = TOLERANCES.get(str(expected.dtype), TOLERANCES["float32"])
    finite = np.isfinite(expected)
    scale = max(1.0, float(np.abs(expected[finite]).max())) if finite.any() else 1.0
    if np.allclose(got, expected, rtol=rtol, atol=atol * scale, equal_nan=True):
        return None
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    err = np.where(np.isnan(err), np.inf, err)  # a NaN where the reference has a number
    return (f"max abs error {float(err.max()):.3g} where the "
            f"tolerance is rtol {rtol:g}, atol {atol:g} x {scale:.3g}")
