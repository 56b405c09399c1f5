"""The only module that imports TVM: version pins, patches and adapters for TVM 0.27.

Everything else in hwaware talks to TVM through the functions here, so a TVM upgrade touches one
file. What it provides, in pipeline order:
- `import_torch_program`: a torch ExportedProgram -> a Relax function.
- `import_onnx`: an ONNX ModelProto -> a Relax module (weights bound as constants).
- `fuse_for_tuning`: the exact passes MetaSchedule's `compile_relax` runs before looking a
  kernel up in the database: the target's library dispatch (sort and scan ops), then the five
  legalize-and-fuse passes (tuning anything else gives records that silently never apply).
- `SqliteDatabase`: MetaSchedule's database role, backed by hwaware's sqlite file.
- `RecordingCallback`: commits each candidate as it is measured; drives the progress bar.
- `fast_build`: a builder function that skips the 55-second tensor-intrinsics import in workers.
- `build_executable`: tuned records -> a Relax VM executable, with a rule-based default schedule
  for kernels that have no record (never an unscheduled kernel).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# TVM's thread pool otherwise starts one thread on this machine (it counts "physical" cores
# wrongly under KVM): kernels then run 2x slower than the MetaSchedule runner measured them.
# Set before TVM starts its pool; builder and runner worker processes inherit it.
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
# TVM's idle workers spin; next to PyTorch's spinning OpenMP threads on few cores that turned a
# 25 us element-wise kernel into 3.8 ms now and then. Idle TVM workers sleep instead.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import tvm  # noqa: E402
import tvm_ffi
from tvm import relax
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.dlight.base import ScheduleRule

from hwaware.db import FAILED_RUN_SECS, RecordRow, TuningDatabase

log = logging.getLogger(__name__)

TVM_VERSION = str(tvm.__version__)
REQUIRED_TVM = "0.27.0"
_BAD_FFI_PREFIX = "0.1.15"


def check_versions() -> None:
    """Refuse the combinations known to crash (see STACK_NOTES.md)."""
    import tvm_ffi

    ffi_version = str(getattr(tvm_ffi, "__version__", ""))
    if ffi_version.startswith(_BAD_FFI_PREFIX):
        raise RuntimeError(
            f"apache-tvm-ffi {ffi_version} segfaults inside MetaSchedule's TuneContext; "
            "install apache-tvm-ffi==0.1.14.post0"
        )
    if not TVM_VERSION.startswith(REQUIRED_TVM):
        log.warning("hwaware is tested with TVM %s, found %s", REQUIRED_TVM, TVM_VERSION)


# ---------------------------------------------------------------- import-time patch
def _frames_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    """`inspect.stack()` without reading source files: TVMScript only needs the frames."""
    frame: Any = sys._getframe(1)
    frames = []
    while frame is not None:
        frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                        frame.f_code.co_name, None, None))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` in ~9 s instead of ~55 s (TuneContext needs it)."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _frames_without_source  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def fast_build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> Any:
    """MetaSchedule builder function: the default one minus the tensor-intrinsics import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


# ------------------------------------------------------------------------- targets
def tvm_target(tvm_dict: dict[str, Any], host: dict[str, Any] | None = None) -> tvm.target.Target:
    """A TVM target from the dict form (target strings are rejected by TVM 0.27)."""
    if host is not None:
        return tvm.target.Target(tvm_dict, host=tvm.target.Target(host))
    return tvm.target.Target(tvm_dict)


# ------------------------------------------------------------------------- import
def import_torch_program(exported: Any) -> relax.Function:
    """A torch.export ExportedProgram -> a Relax function with weights bound as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(exported, keep_params_as_input=False)
    return mod["main"]


def import_onnx(model: Any, shapes: dict[str, list[int]], dtypes: dict[str, str],
                name: str = "main") -> tvm.IRModule:
    """An ONNX ModelProto -> a Relax module whose entry function is `name`, weights bound as
    constants. The module may also hold TIR functions the importer emitted for some ops."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    functions = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    functions[tvm.ir.GlobalVar(name)] = mod["main"].with_attr("global_symbol", name)
    return tvm.IRModule(functions)


@functools.lru_cache(maxsize=1)
def supported_aten_ops() -> frozenset[str]:
    """The aten op names ("add.Tensor", ...) TVM's exported-program importer can translate."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map().keys())


def _region_buffer(region: Any) -> str:
    """The name of the buffer a block read/write region touches."""
    return str(region.source.name)


def module_of_functions(functions: dict[str, relax.Function],
                        prims: dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] | None = None
                        ) -> tvm.IRModule:
    """One IRModule holding each kernel as its own public Relax function (each with fresh
    variables: kernels that share a cached import must not share binding sites), and the TIR
    functions they call (`prims`, under the GlobalVars they are called by)."""
    from tvm.relax.utils import copy_with_new_vars

    entries: dict[Any, Any] = dict(prims or {})
    for name, fn in functions.items():
        entries[name] = copy_with_new_vars(fn).with_attr("global_symbol", name)
    return tvm.IRModule(entries)


def prim_funcs_by_var(mod: tvm.IRModule) -> dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc]:
    """A module's TIR functions, keyed by the GlobalVars its Relax functions call them by."""
    return {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


# ------------------------------------------------------------------------- fusion
def fuse_for_tuning(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse exactly as `compile_relax` does, so tuned records match at build."""
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(_fuse_passes(target))(mod)


def _fuse_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The target's library dispatch, then legalization and fusion. Sort and scan ops
    (`R.cumsum`, `R.sort`, `R.topk`, ...) have no legalization: the dispatch passes lower them
    to TOPI kernels; without them they reach VM codegen, which cannot emit them."""
    return [*_dispatch_passes(target), *_legalize_passes()]


def _dispatch_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    from tvm.relax import pipeline as relax_pipeline

    try:
        return list(relax_pipeline.library_dispatch_passes(target))
    except ValueError:  # no per-target pipeline registered: the generic dispatch passes
        return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def _legalize_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def prim_funcs(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def workload_of(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The MetaSchedule workload for one fused kernel (the same normalisation MS applies)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def workload_hash(workload: tvm.IRModule) -> str:
    return str(tvm_ffi.structural_hash(workload))


def workload_json(workload: tvm.IRModule) -> str:
    return json.dumps(ms.database.Workload(workload).as_json())


def workload_flops(workload: tvm.IRModule) -> int:
    """Floating-point operations of one run of a workload (0 where TVM cannot count them)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return int(estimate_tir_flops(workload))
    except Exception:  # informational only: the analysis rejects some loop nests
        return 0


def schedule_rules(func: tvm.tirx.PrimFunc) -> set[str]:
    """The schedule spaces a TIR function's blocks name (their `schedule_rule` annotations, as
    a fused kernel family sets them; "None", which only opts a block out, left out)."""
    return set(re.findall(r'"schedule_rule": "([^"]+)"', func.script())) - {"None"}


def has_custom_schedule_rule(workload: tvm.IRModule) -> bool:
    """Whether the workload names its own schedule space: such a kernel is tuned whatever its
    anchor block looks like."""
    return any(schedule_rules(f) for f in prim_funcs(workload).values())


def is_contraction(workload: tvm.IRModule) -> bool:
    """Whether a fused kernel's anchor block (its reduction with the most flops) reads two or more
    buffers, as convolutions and matmuls do: such a kernel needs a tuned schedule."""
    from tvm.s_tir.analysis import find_anchor_sblock

    anchor = find_anchor_sblock(workload)
    return anchor is not None and len({_region_buffer(r) for r in anchor.reads}) >= 2


# ----------------------------------------------------------------------- database
@derived_object
class SqliteDatabase(ms.database.PyDatabase):
    """MetaSchedule's database role over hwaware's sqlite file, for one target."""

    def __init__(self, db: TuningDatabase, target: tvm.target.Target, target_key: str):
        super().__init__()
        self.db = db
        self.target = target
        self.target_key = target_key
        self._workloads: dict[str, ms.database.Workload] = {}

    def has_workload(self, mod: tvm.IRModule) -> bool:
        return self.db.has_workload(workload_hash(mod), TVM_VERSION)

    def commit_workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        key = workload_hash(mod)
        if key not in self._workloads:
            self.db.commit_workload(key, TVM_VERSION, workload_json(mod))
            self._workloads[key] = ms.database.Workload(mod)
        return self._workloads[key]

    def commit_tuning_record(self, record: ms.database.TuningRecord) -> None:
        trace, run_secs, _target, args_info = record.as_json()
        self.db.commit_record(_record_row(
            workload_hash(record.workload.mod), self.target_key, trace, args_info,
            [float(s) for s in run_secs or [FAILED_RUN_SECS]], None, self.db.device, None,
        ))

    def get_top_k(self, workload: ms.database.Workload, top_k: int) -> list[Any]:
        rows = self.db.top_records(workload_hash(workload.mod), TVM_VERSION, self.target_key, top_k)
        target_json = self.target.export()
        return [
            ms.database.TuningRecord.from_json(
                [json.loads(r.trace_json), r.run_secs, target_json, json.loads(r.args_info_json)],
                workload,
            )
            for r in rows
        ]

    def get_all_tuning_records(self) -> list[Any]:
        records: list[Any] = []
        for workload in self._workloads.values():
            records.extend(self.get_top_k(workload, 1 << 20))
        return records

    def __len__(self) -> int:
        return self.db.count_target_records(self.target_key, TVM_VERSION)


def plain_json(obj: Any) -> Any:
    """TVM containers and immediates (Array, Map, IntImm, ...) -> plain JSON-able Python."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return obj.value
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(plain_json(k)): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or hasattr(obj, "__iter__"):
        return [plain_json(x) for x in obj]
    return str(obj)


def _record_row(whash: str, target_key: str, trace: Any, args_info: Any, run_secs: list[float],
                error: str | None, device: str, session_id: str | None) -> RecordRow:
    ok = error is None and run_secs and max(run_secs) < FAILED_RUN_SECS
    return RecordRow(
        workload_hash=whash, target_key=target_key, trace_json=json.dumps(trace),
        args_info_json=json.dumps(args_info), run_secs=run_secs,
        mean_us=(sum(run_secs) / len(run_secs) * 1e6) if ok else None,
        error=None if ok else (error or "failed"), device=device, session_id=session_id,
        tvm_version=TVM_VERSION, created_at=time.time(),
    )


@derived_object
class RecordingCallback(ms.measure_callback.PyMeasureCallback):
    """Commits every measured candidate (failed ones too, with their error) as it is measured."""

    def __init__(self, database: SqliteDatabase, session_id: str,
                 on_measured: Callable[[str, int, int, float | None], None]):
        super().__init__()
        self.database = database
        self.session_id = session_id
        self.on_measured = on_measured

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Sequence[Any],
              builder_results: Sequence[Any], runner_results: Sequence[Any]) -> None:
        task = task_scheduler.tasks_[task_id].ctx
        workload = self.database.commit_workload(task.mod)
        whash = workload_hash(workload.mod)
        best: float | None = None
        new = 0
        for cand, built, ran in zip(measure_candidates, builder_results, runner_results,
                                    strict=True):
            error = built.error_msg or ran.error_msg
            run_secs = [float(s) for s in ran.run_secs] if ran.run_secs else [FAILED_RUN_SECS]
            row = _record_row(
                whash, self.database.target_key, plain_json(cand.sch.trace.as_json()),
                [plain_json(a.as_json()) for a in cand.args_info], run_secs,
                str(error)[-2000:] if error else None, self.database.db.device, self.session_id,
            )
            new += self.database.db.commit_record(row)
            if row.mean_us is not None:
                best = row.mean_us if best is None else min(best, row.mean_us)
        self.on_measured(str(task.task_name), len(measure_candidates), new, best)


# ------------------------------------------------------------------------- tuning
FixedSchedules = Mapping[str, Callable[[Any, Any], Any]]  # rule -> (PrimFunc, target) -> Schedule


def fixed_schedule_of(func: tvm.tirx.PrimFunc, fixed_schedules: FixedSchedules
                      ) -> Callable[[Any, Any], Any] | None:
    """The fixed-decision schedule of the first schedule rule of `func` that has one."""
    rule = next((r for r in sorted(schedule_rules(func)) if r in fixed_schedules), None)
    return None if rule is None else fixed_schedules[rule]


def postprocessed_fixed_schedule(context: Any, fixed_schedules: FixedSchedules) -> Any | None:
    """The fixed-decision schedule of the tuning context's workload (by its schedule rule),
    post-processed like a sampled candidate; None if its rules have none or a postproc fails."""
    func = context.mod["main"]
    schedule = fixed_schedule_of(func, fixed_schedules)
    if schedule is None:
        return None
    sch = schedule(func, context.target)
    sch.enter_postproc()
    try:
        return sch if all(p.apply(sch) for p in context.space_generator.postprocs) else None
    except RuntimeError as err:  # some postprocs raise where others return False
        log.debug("the fixed schedule of %s fails a postproc: %s", context.task_name, err)
        return None


@derived_object
class SkipStoredCandidates(ms.search_strategy.PySearchStrategy):
    """An evolutionary search that never measures a candidate the database already holds.

    MetaSchedule seeds each search with the database's best traces but only remembers what it
    measured in the current session, so a resumed session can propose a stored candidate again
    (it did, one in eight trials, in CI). This wrapper drops those before they are built.

    It also measures the workload's fixed-decision schedule first (`fixed_schedules`, by
    schedule rule, when the database does not hold it yet): a fused family kernel's default is
    hand-picked, and a small budget of random samples can all be slower than it. Once measured,
    it is in the database, where the search takes its best traces from to mutate."""

    MAX_ALL_STORED_ROUNDS = 16

    def __init__(self, inner: Any, database: SqliteDatabase,
                 fixed_schedules: FixedSchedules | None = None):
        super().__init__()
        self.inner = inner
        self.database = database
        self.fixed_schedules = fixed_schedules or {}
        self.workload_hash = ""
        self.context: Any = None
        self.seeded = False

    def _initialize_with_tune_context(self, context: Any) -> None:
        self.inner._initialize_with_tune_context(context)
        self.workload_hash = workload_hash(context.mod)
        self.context = context

    def pre_tuning(self, max_trials: int, num_trials_per_iter: int, design_spaces: Any,
                   database: Any = None, cost_model: Any = None) -> None:
        self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database,
                              cost_model)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self) -> list[Any] | None:
        if not self.seeded:
            self.seeded = True
            seed = self._fixed_candidate()
            if seed is not None:
                return [seed]
        for _ in range(self.MAX_ALL_STORED_ROUNDS):
            candidates = self.inner.generate_measure_candidates()
            if candidates is None:
                return None
            fresh = [c for c in candidates if not self._stored(c)]
            if fresh:
                return fresh
            self.inner.notify_runner_results([], [])  # nothing measured; ask for more
        return None

    def notify_runner_results(self, measure_candidates: Any, results: Any) -> None:
        self.inner.notify_runner_results(measure_candidates, results)

    def clone(self) -> Any:
        return SkipStoredCandidates(self.inner.clone(), self.database, self.fixed_schedules)

    def _fixed_candidate(self) -> Any | None:
        """The fixed-decision schedule of the workload's rule, post-processed like a sampled
        candidate; None if it has no rule with one, or the database holds it already."""
        sch = postprocessed_fixed_schedule(self.context, self.fixed_schedules)
        if sch is None:
            return None
        candidate = ms.MeasureCandidate(
            sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True))
        return None if self._stored(candidate) else candidate

    def _stored(self, candidate: Any) -> bool:
        db = self.database
        return db.db.has_candidate(self.workload_hash, TVM_VERSION, db.target_key,
                                   json.dumps(plain_json(candidate.sch.trace.as_json())))


def remeasure_top_records(workload: tvm.IRModule, database: SqliteDatabase, k: int = 4,
                          rounds: int = 30, fixed_schedules: FixedSchedules | None = None
                          ) -> None:
    """Rebuild the k fastest stored records of `workload` (a CPU target's) and its fixed-decision
    schedule (`fixed_schedules`, stored if it is not yet), time them in this process round-robin
    on the runner's random inputs, and store the medians (scaled to the group's median runner
    time) as their measurements, so the build applies the best of them by a like-for-like
    comparison.

    The runner times each candidate once, and on a shared 2-core VM whose speed swings by 2x
    over seconds (hypervisor steal), that ranks them by luck: the bottleneck block's "best"
    record (4.3 ms) ran at 6.6 ms against 5.0 ms for the default it displaced. The default is
    always in the group: a database tuned before it was measured first, or one whose lucky
    records pushed it out of the top k, would otherwise keep a record slower than untuned."""
    rows = database.db.top_records(workload_hash(workload), TVM_VERSION, database.target_key, k)
    if not rows or database.target.kind.name != "llvm":
        return
    schedules = _replayed(workload, rows, database.target)
    fixed = _postprocessed_fixed(workload, database.target, fixed_schedules or {})
    fixed_trace = None if fixed is None else plain_json(fixed.trace.as_json())
    if fixed is not None and all(json.loads(r.trace_json) != fixed_trace for r in rows):
        schedules.append(fixed)
    if len(schedules) < 2:
        return
    run_secs = _time_round_robin([sch.mod for sch in schedules], database.target,
                                 json.loads(rows[0].args_info_json), rounds)
    # the runner's scale: records not re-timed keep their runner times, and the re-timed best
    # (<= the median of the group) still ranks above every one of those
    scale = statistics.median(r.mean_us or 0.0 for r in rows) / 1e6 / \
        statistics.median(statistics.median(secs) for secs in run_secs[:len(rows)])
    scaled = [[s * scale for s in secs] for secs in run_secs]
    if len(schedules) > len(rows):  # the fixed schedule, stored now
        rows.append(_record_row(workload_hash(workload), database.target_key, fixed_trace,
                                json.loads(rows[0].args_info_json), scaled[-1], None,
                                database.db.device, None))
        database.db.commit_record(rows[-1])
    for row, secs in zip(rows, scaled, strict=True):
        database.db.remeasure(row, secs)  # mean_us: the median, as for every re-timed record


def _replayed(workload: tvm.IRModule, rows: list[RecordRow], target: tvm.target.Target
              ) -> list[Any]:
    """The schedules of stored records, their traces replayed on `workload`."""
    target_json, ms_workload = target.export(), ms.database.Workload(workload)
    schedules = []
    for row in rows:
        sch = tvm.s_tir.Schedule(workload)
        ms.database.TuningRecord.from_json(
            [json.loads(row.trace_json), None, target_json, json.loads(row.args_info_json)],
            ms_workload,
        ).trace.apply_to_schedule(sch, remove_postproc=False)
        schedules.append(sch)
    return schedules


def _postprocessed_fixed(workload: tvm.IRModule, target: tvm.target.Target,
                         fixed_schedules: FixedSchedules) -> Any | None:
    if not fixed_schedules:
        return None
    import_tensor_intrinsics()  # else TuneContext imports them slowly (~55 s)
    return postprocessed_fixed_schedule(ms.TuneContext(
        mod=workload, target=target, space_generator="post-order-apply", task_name="remeasure",
    ), fixed_schedules)


def _time_round_robin(mods: list[tvm.IRModule], target: tvm.target.Target,
                      args_info: Any, rounds: int) -> list[list[float]]:
    """Seconds per call of each scheduled module, built as the tuning builder builds and timed
    in turns (`rounds` samples each, >= 20 ms of calls per sample) on the same random inputs."""
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument

    device = tvm.cpu()
    timers = [fast_build(mod, target, None).time_evaluator(
        "main", device, number=1, repeat=1, min_repeat_ms=20) for mod in mods]
    (args,) = default_alloc_argument(device, args_info, 1)
    run_secs: list[list[float]] = [[] for _ in mods]
    for _ in range(rounds):
        for timer, secs in zip(timers, run_secs, strict=True):
            secs.append(float(timer(*args).mean))
    return run_secs


def tune_workloads(
    workloads: dict[str, tvm.IRModule],
    budgets: dict[str, int],
    target: tvm.target.Target,
    database: SqliteDatabase,
    session_id: str,
    on_measured: Callable[[str, int, int, float | None], None],
    work_dir: str,
    num_trials_per_iter: int = 16,
    runner_timeout_s: float = 10.0,
    builder_timeout_s: float = 60.0,
    population: int = 256,
    f_build: Callable[[Any, Any, Any], Any] | None = None,
    fixed_schedules: FixedSchedules | None = None,
) -> None:
    """Run MetaSchedule (evolutionary search + XGBoost cost model) over the named workloads.

    The search population is half MetaSchedule's default: on a 2-core machine each generation
    of 512 costs ~6 s of feature extraction, as much as building the batch it picks.
    `fixed_schedules` (rule -> fixed-decision Schedule): measured first (SkipStoredCandidates)."""
    import_tensor_intrinsics()
    cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else \
        len(os.sched_getaffinity(0))  # a GPU target: this host's cores build its candidates
    names = sorted(workloads)
    contexts = [
        ms.TuneContext(
            mod=workloads[n], target=target, space_generator="post-order-apply",
            search_strategy=SkipStoredCandidates(ms.search_strategy.EvolutionarySearch(
                population_size=population, genetic_num_iters=3, init_min_unmeasured=32,
            ), database, fixed_schedules),
            task_name=n, num_threads=cores,
            logger=logging.getLogger(f"hwaware.ms.{n}"),
        )
        for n in names
    ]
    callbacks = [
        RecordingCallback(database, session_id, on_measured),
        ms.measure_callback.RemoveBuildArtifact(),
        ms.measure_callback.UpdateCostModel(),
    ]
    total = sum(budgets[n] for n in names)
    ms.tune_tasks(
        tasks=contexts,
        task_weights=[1.0] * len(names),
        work_dir=work_dir,
        max_trials_global=total,
        max_trials_per_task=max(budgets.values()),
        num_trials_per_iter=num_trials_per_iter,
        builder=ms.builder.LocalBuilder(f_build=f_build or fast_build, max_workers=cores,
                                        timeout_sec=builder_timeout_s),
        runner=ms.runner.LocalRunner(timeout_sec=runner_timeout_s),
        database=database,
        cost_model=ms.cost_model.XGBModel(num_tuning_cores=cores),
        measure_callbacks=callbacks,
        task_scheduler="gradient",
    )


# -------------------------------------------------------------------------- build


def build_executable(
    mod: tvm.IRModule, target: tvm.target.Target, database: SqliteDatabase | None,
    fixed_schedules: FixedSchedules | None = None,
) -> tuple[Any, set[str]]:
    """Fused kernels -> a Relax VM executable: tuned records where the database has them, then
    the fixed-decision schedule of each function's own schedule space (`fixed_schedules`, by
    rule name), then a rule-based default schedule elsewhere. Also returns the hashes of the
    workloads that got a tuned record, so callers can check that tuning applied (it fails
    silently otherwise)."""
    from tvm.relax.transform import MetaScheduleApplyDatabase

    applied: set[str] = set()

    @tvm.transform.module_pass(opt_level=3)
    def _pipeline(m: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        m = tvm.transform.Sequential(_fuse_passes(target))(m)
        if database is not None:
            hashes = {n: workload_hash(workload_of(f)) for n, f in prim_funcs(m).items()}
            m = MetaScheduleApplyDatabase(enable_warning=False)(m)
            applied.update(hashes[n] for n, f in prim_funcs(m).items()
                           if n in hashes and _is_scheduled(f))
        m = apply_fixed_schedules(m, target, fixed_schedules or {})
        m = default_schedule(m, target)
        return tvm.transform.Sequential(_lowering_passes(target))(m)

    ctx_db = database if database is not None else ms.database.MemoryDatabase()
    with target, ctx_db, tvm.transform.PassContext(opt_level=3):
        executable = relax.build(mod, target=target, relax_pipeline=_pipeline)
    return executable, applied


def apply_fixed_schedules(mod: tvm.IRModule, target: tvm.target.Target,
                          fixed_schedules: FixedSchedules) -> tvm.IRModule:
    """Each TIR function nothing has scheduled yet whose blocks name a schedule space in
    `fixed_schedules` (rule -> (PrimFunc, target) -> Schedule), scheduled by it and marked."""
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
            continue
        schedule = fixed_schedule_of(func, fixed_schedules)
        if schedule is not None:
            scheduled = schedule(func, target).mod["main"]
            mod.update_func(gv, scheduled.with_attr("tirx.is_scheduled", True))
    return mod


def _is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    return bool(func.attrs) and "tirx.is_scheduled" in func.attrs and \
        int(func.attrs["tirx.is_scheduled"]) == 1


def _lowering_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """Relax -> VM passes after scheduling (what `compile_relax` runs for CPU targets)."""
    from tvm.relax import pipeline as relax_pipeline

    try:
        return [*relax_pipeline.dataflow_lower_passes(target),
                *relax_pipeline.finalize_passes(target)]
    except (ValueError, AttributeError):  # no per-target pipeline registered (cpu_generic)
        t = relax.transform
        return [t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(),
                t.CallTIRRewrite(), t.StaticPlanBlockMemory(), t.LowerAllocTensor(),
                t.KillAfterLastUse(), t.LowerRuntimeBuiltin(), t.ComputePrimValue(),
                t.VMShapeLower(), t.AttachGlobalSymbol()]


def default_schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every kernel the database did not: DLight's rules, then parallel+vectorize."""
    from tvm.s_tir import dlight as dl

    if target.kind.name == "cuda":
        rules = [Tolerant(rule) for rule in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                             dl.gpu.GeneralReduction())] + [dl.gpu.Fallback()]
    else:
        rules = [SmallSerial(), NarrowVectors(dl.cpu.GEMV()), dl.cpu.Reduction(),
                 ParallelVectorize()]
    return dl.ApplyDefaultSchedule(*rules)(mod)


class Tolerant(ScheduleRule):  # type: ignore[misc]
    """A DLight rule that passes (to the next rule) where it fails on a kernel it claims:
    GEMV's inner-reduction path asserts on some GAT projection shapes in TVM 0.27."""

    def __init__(self, rule: Any):
        self.rule = rule

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        try:
            return self.rule.apply(func, target, tunable)
        except (AssertionError, RuntimeError, ValueError) as err:  # TVM errors are RuntimeErrors
            log.debug("%s does not apply: %s", type(self.rule).__name__, err)
            return None


MAX_VECTOR_LANES = 64  # wider vectorized loops can take LLVM's codegen minutes to hours


class NarrowVectors(ScheduleRule):  # type: ignore[misc]
    """A DLight rule whose schedule is refused (the next rule applies) where it vectorizes a loop
    wider than `MAX_VECTOR_LANES`. DLight's CPU GEMV vectorizes 128 output rows around the
    unrolled reduction (strided weight loads, one gather per row): a 1280x80 GEMV, MobileNetV2's
    last 1x1 conv, sat in LLVM codegen for over 10 minutes."""

    def __init__(self, rule: Any):
        self.rule = rule

    def apply(self, func: Any, target: Any, tunable: bool) -> Any:
        sch = self.rule.apply(func, target, tunable)
        if sch is None or isinstance(sch, list):
            return sch
        widest = widest_vector(sch.mod["main"].body)
        if widest > MAX_VECTOR_LANES:
            log.debug("%s vectorizes %d lanes; not applied", type(self.rule).__name__, widest)
            return None
        return sch


def widest_vector(stmt: Any) -> int:
    """The largest constant extent of a vectorized loop in a TIR statement (0 if none)."""
    widest = 0
    if isinstance(stmt, tvm.tirx.For) and stmt.kind == tvm.tirx.ForKind.VECTORIZED:
        widest = int(stmt.extent) if isinstance(stmt.extent, tvm.tirx.IntImm) else 1 << 30
    children = list(stmt.seq) if isinstance(stmt, tvm.tirx.SeqStmt) else \
        [getattr(stmt, a, None) for a in ("body", "block", "init", "then_case", "else_case")]
    return max([widest, *(widest_vector(c) for c in children if isinstance(c, tvm.tirx.Stmt))])


SMALL_KERNEL_ITERATIONS = 1 << 15  # below this, waking worker threads costs more than it saves


class SmallSerial(ScheduleRule):  # type: ignore[misc]
    """CPU default for small kernels (batch-1 MLP layers, gates, heads): inline, vectorize the
    innermost spatial loop, and stay on the calling thread (a parallel launch costs ~10-20 us,
    more than the whole kernel)."""

    def apply(self, func: Any, target: Any, _: bool) -> Any:
        from tvm.s_tir import Schedule
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if not isinstance(func, tvm.tirx.PrimFunc):
            return None
        sch = Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or any(_iterations(sch, i) > SMALL_KERNEL_ITERATIONS for i in infos):
            return None  # also when a loop extent is symbolic
        infos = try_inline(sch, infos)
        lanes = max(1, _vector_lanes(target))
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            if info.is_injective() and loops and kinds[-1] == "S":
                extent = _extent(sch, loops[-1])
                if extent is not None and extent >= lanes and extent % lanes == 0:
                    _, inner = sch.split(loops[-1], factors=[None, lanes])
                    sch.vectorize(inner)
        return sch


def is_small(workload: tvm.IRModule) -> bool:
    """Whether every block of a fused kernel runs few enough iterations that `SmallSerial`
    schedules it well without tuning (a batch-1 matmul of a small MLP, a gate, a head). False
    where the analysis fails (such a kernel waits for a tuned record)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    try:
        sch = Schedule(workload["main"])
        infos = normalize_prim_func(sch)
        return infos is not None and all(_iterations(sch, i) <= SMALL_KERNEL_ITERATIONS
                                         for i in infos)
    except (RuntimeError, ValueError, AssertionError) as err:  # TVM errors are RuntimeErrors
        log.debug("no default schedule for a kernel the analysis rejects: %s", err)
        return False


def _iterations(sch: Any, info: Any) -> int:
    total = 1
    for loop in sch.get_loops(info.block_rv):
        extent = _extent(sch, loop)
        if extent is None:
            return 1 << 62
        total *= extent
    return total


class ParallelVectorize(ScheduleRule):  # type: ignore[misc]
    """CPU default for any kernel: inline what can be inlined, then run the outer loops of each
    remaining block in parallel and vectorize the innermost spatial loop."""

    def apply(self, func: Any, target: Any, _: bool) -> Any:
        from tvm.s_tir import Schedule
        from tvm.s_tir.dlight.analysis import normalize_prim_func
        from tvm.s_tir.dlight.base import try_inline

        if not isinstance(func, tvm.tirx.PrimFunc):
            return None
        sch = Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        lanes = max(1, _vector_lanes(target))
        cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1
        for info in infos:
            _parallel_vectorize_block(sch, info, lanes, cores)
        return sch


def _vector_lanes(target: Any) -> int:
    from tvm.target.codegen import llvm_get_vector_width

    return max(1, int(llvm_get_vector_width(target)) // 32)


def _parallel_vectorize_block(sch: Any, info: Any, lanes: int, cores: int) -> None:
    loops = sch.get_loops(info.block_rv)
    kinds = info.dom_kind()
    spatial = [lp for lp, k in zip(loops, kinds, strict=False) if k == "S"]
    if not spatial or len(spatial) != len(loops) and kinds.index("R") < len(spatial):
        # reduction loops interleaved before spatial ones: parallelise the leading spatial loops
        lead = []
        for lp, k in zip(loops, kinds, strict=False):
            if k != "S":
                break
            lead.append(lp)
        if lead:
            sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
        return
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    extent = _extent(sch, fused)
    if info.is_injective() and extent is not None and extent >= lanes * 2 and extent % lanes == 0:
        outer, inner = sch.split(fused, factors=[None, lanes])
        sch.parallel(outer)
        sch.vectorize(inner)
    elif extent is None or extent >= cores:
        sch.parallel(fused)


def _extent(sch: Any, loop: Any) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None


# ------------------------------------------------------------------------ runtime
_ALIGNMENT = 64  # TVM's kAllocAlignment: compiled kernels may assume it


def load_executable(path: str) -> Any:
    """A saved kernel library; a runnable CPU one runs its kernels on PyTorch's OpenMP team
    (`hwaware.threads`)."""
    from hwaware import threads

    module = tvm.runtime.load_module(path)
    if path.endswith(".so"):
        threads.share_threads(path)
    return module


class LibraryFile:
    """A kernel library another process built and wrote to `path`, loaded here. A loaded
    library cannot be exported again, so saving it copies the file."""

    def __init__(self, path: str):
        self.path = path
        self.module = load_executable(path)


def make_vm(executable: Any, device_kind: str = "cpu", share_threads: bool = False) -> Any:
    """A VM for `executable`; `share_threads`: a CPU executable built in this process runs its
    kernels on PyTorch's OpenMP team (`hwaware.threads`)."""
    if isinstance(executable, LibraryFile):
        executable = executable.module
    if share_threads and device_kind == "cpu" and isinstance(executable, tvm.runtime.Executable):
        from hwaware import threads

        executable = threads.with_shared_threads(executable)
    device = tvm.cuda() if device_kind == "cuda" else tvm.cpu()
    return relax.VirtualMachine(executable, device)


def torch_callable(vm: Any, name: str, num_outputs: int | None = None
                   ) -> Callable[..., list[Any]]:
    """A VM function as a torch -> torch call. tvm-ffi passes torch tensors by DLPack and
    hands torch tensors back; a tuple result is read element by element (faster than
    iterating the Array, which matters for batch-1 kernels of a few microseconds)."""
    import torch
    from tvm_ffi import container

    func = vm[name]
    get_item = container._ffi_api.ArrayGetItem
    to_torch = torch.from_dlpack

    def as_torch(o: Any) -> Any:
        return o if isinstance(o, torch.Tensor) else to_torch(o)

    def call(*tensors: torch.Tensor) -> list[torch.Tensor]:
        args = [t if t.is_contiguous() and not t.data_ptr() % _ALIGNMENT
                else t.clone(memory_format=torch.contiguous_format)  # fresh, aligned storage
                for t in tensors]
        out = func(*args)
        if isinstance(out, (torch.Tensor, tvm.runtime.Tensor)):
            return [as_torch(out)]
        n = len(out) if num_outputs is None else num_outputs
        return [as_torch(get_item(out, i)) for i in range(n)]

    return call


def export_executable(executable: Any, path: str, cross: bool = False) -> None:
    """Write the library: a shared object, or for a cross target a tar of object files that
    `load_executable` links on the device with its own compiler."""
    if isinstance(executable, LibraryFile):
        shutil.copyfile(executable.path, path)
    elif cross:
        from tvm.support.tar import tar

        executable.export_library(path, fcompile=tar)
    else:
        executable.export_library(path)
