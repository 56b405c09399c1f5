"""Build, guard: does a tuned record's schedule compute what its workload computes?

Goes in: a workload (the fused TIR function, unscheduled: its definition as the importer
produced it from PyTorch's ops), a tuning record of it (a trace) and a CPU target. Comes out:
None when the scheduled kernel, built and run on random inputs, gives the same outputs as the
workload built without any schedule, else why not (wrong numbers, or a kernel that fails to
build, segfaults or hangs: the check runs in a worker process, stopped after `TIMEOUT_S`).

A schedule is meant to preserve its workload's meaning, but a record can compute wrong numbers:
a buggy schedule rule or postproc, an unsafe primitive (`unsafe_set_dtype`), a record imported
from another database. The runner times candidates and never looks at their outputs, so such a
record can be the fastest (doing less work is fast). The build (`SqliteDatabase(verify=True)`)
checks the best record of each workload with `contained_mismatch` before applying it.

On a device farm (`farm_mismatch`): the records a tuning session measured on a farm device are
checked there, for a target this machine may not run: the reference and the record are built
here for the farm's target, uploaded to one of its devices, run on the same random inputs, and
their outputs compared here.

Tolerance: rtol 1e-3, atol 1e-4 scaled by the reference's largest magnitude when above 1 (as
`hwaware.verify`: summation order alone moves large float32 sums by more than a fixed atol);
rtol 1e-2, atol 1e-3 for float16. Integer outputs must be equal.
"""

from __future__ import annotations

import atexit
import json
import logging
from typing import Any

import numpy as np
import tvm

log = logging.getLogger(__name__)

TOLERANCES = {"float32": (1e-3, 1e-4), "float64": (1e-3, 1e-4), "float16": (1e-2, 1e-3)}
SEED = 0
# a check runs in a worker process stopped after this long (per stage): the unscheduled
# reference of a large workload takes seconds, a hanging kernel forever
TIMEOUT_S = 120.0
_WORKER: Any = None  # the worker process checks run in, started on first use


def contained_mismatch(workload: tvm.IRModule, trace_json: str, target: tvm.target.Target
                       ) -> str | None:
    """`record_mismatch` of the record with trace `trace_json`, in a worker process (TVM's
    `PopenWorker`, kept for later checks), so that a record whose kernel segfaults or hangs is
    excluded instead of killing or hanging the build: its verdict then says so, and the worker
    is replaced. If the reference itself fails, the record passes unchecked (logged)."""
    from tvm.support.popen_pool import PopenWorker

    global _WORKER
    if _WORKER is None:
        _WORKER = PopenWorker()
        atexit.register(_WORKER.kill)
    mod_json, target_json = tvm.ir.save_json(workload), target.export()
    for stage, fn, args in (("reference", _reference_in_worker, (mod_json, target_json)),
                            ("record", _record_in_worker, (mod_json, trace_json, target_json))):
        try:
            _WORKER.send(fn, args, timeout=TIMEOUT_S)
            verdict = _WORKER.recv()
            if stage == "record":
                return verdict  # type: ignore[no-any-return]
            continue
        except TimeoutError:
            why = f"its kernel did not finish within {TIMEOUT_S:g} s"
        except ChildProcessError:
            why = "its kernel crashed the process running it"
        except Exception as err:  # the check itself failed (it catches the kernel's errors)
            log.warning("could not check a tuning record (%s stage): %s: %s", stage,
                        type(err).__name__, str(err).strip()[-200:])
            return None
        if stage == "record":
            return why
        log.warning("could not check a tuning record: the reference failed (%s)", why)
        return None
    return None


_EXPECTED: dict[str, list[np.ndarray] | None] = {}  # in the worker: workload JSON -> outputs


def _reference_in_worker(mod_json: str, target_json: Any) -> None:
    workload = tvm.ir.load_json(mod_json)
    args = _random_args(workload)
    _EXPECTED.clear()
    _EXPECTED[mod_json] = None if args is None else \
        _run(tvm.compile(workload, target=tvm.target.Target(target_json)), args)


def _record_in_worker(mod_json: str, trace_json: str, target_json: Any) -> str | None:
    workload = tvm.ir.load_json(mod_json)
    expected = _EXPECTED[mod_json]
    if expected is None:
        return None  # nothing to feed it: unchecked
    return _compare(workload, _trace_applier(trace_json), tvm.target.Target(target_json),
                    expected)


def _trace_applier(trace_json: str) -> Any:
    """A function applying the record's trace (JSON) to a schedule of its workload."""
    return lambda sch: tvm.s_tir.schedule.Trace.apply_json_to_schedule(json.loads(trace_json),
                                                                       sch)


_FARM_EXPECTED: dict[tuple[str, str, str], list[np.ndarray]] = {}  # workload, farm, target


def farm_mismatch(workload: tvm.IRModule, trace_json: str, target: tvm.target.Target,
                  farm: Any) -> str | None:
    """`contained_mismatch` on a device of `farm` (a CPU target): the unscheduled reference
    (built and run once per workload, farm and target) and the record with trace `trace_json`
    are built here, each run there in a session of its own (`rpc.remote_outputs`) and
    compared here. A record whose kernel
    fails there or breaks the device's session (a crash; a hang past the farm's session
    timeout) gets a verdict saying so; if the reference cannot be built or run there, or the
    farm cannot be reached, the record passes unchecked (logged)."""
    from hwaware.tvm import rpc
    from hwaware.tvm.ir import workload_hash

    args = _random_args(workload)
    if args is None:
        return None
    key = (workload_hash(workload), farm.tracker + "/" + farm.key, str(target))
    try:
        if key not in _FARM_EXPECTED:
            _FARM_EXPECTED[key] = rpc.remote_outputs(
                farm, tvm.compile(workload, target=target), args)
    except Exception as err:  # the build, the farm, the session: TVM raises many types
        log.warning("could not check a tuning record on the farm %s (the reference): %s: %s",
                    farm.tracker, type(err).__name__, _last_line(err))
        return None

    def run(lib: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return rpc.remote_outputs(farm, lib, arrays)

    return _compare(workload, _trace_applier(trace_json), target, _FARM_EXPECTED[key], run,
                    "(on the farm device)")


def record_mismatch(workload: tvm.IRModule, record: Any, target: tvm.target.Target
                    ) -> str | None:
    """None when `record` (a MetaSchedule `TuningRecord` of `workload`) computes the
    workload's outputs within the tolerance on random inputs, else what differs (or how its
    kernel fails to build or run). A workload this check cannot feed (symbolic shapes, a dtype
    numpy lacks) passes unchecked. In this process: see `contained_mismatch`."""
    return records_mismatch(workload, [record], target)[0]


def records_mismatch(workload: tvm.IRModule, records: list[Any], target: tvm.target.Target
                     ) -> list[str | None]:
    """`record_mismatch` of each record, the unscheduled reference built and run once."""
    args = _random_args(workload)
    if args is None:
        log.debug("record check skipped: a parameter of the workload has no static shape or "
                  "numpy dtype")
        return [None] * len(records)
    expected = _run(tvm.compile(workload, target=target), args)

    def applier(record: Any) -> Any:
        return lambda sch: record.trace.apply_to_schedule(sch, remove_postproc=False)

    return [_compare(workload, applier(record), target, expected) for record in records]


def _compare(workload: tvm.IRModule, apply: Any, target: tvm.target.Target,
             expected: list[np.ndarray], run: Any = None, where: str = "") -> str | None:
    """The workload scheduled by `apply`, built and run (by `run`, default `_run`: here) on
    the random inputs: None if its buffers after the call match `expected`, else the first
    that differs."""
    from hwaware.tvm.setup import fast_build

    args = _random_args(workload)
    if args is None:  # as for `expected`: not reached
        return None
    try:
        sch = tvm.s_tir.Schedule(workload)
        apply(sch)
        got = (run or _run)(fast_build(sch.mod, target, None), args)
    except Exception as err:  # TVM's schedule, build and run raise many error types
        return (f"its kernel fails to build or run{' ' + where if where else ''}: "
                f"{type(err).__name__}: {_last_line(err)}")
    names = [p.name for p in workload["main"].params]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        why = _difference(g, e)
        if why:
            return f"parameter {i} ({names[i]}): {why}"
    return None


def _last_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[-1][:200]


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
