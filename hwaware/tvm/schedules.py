"""Build: records and default schedules -> one Relax VM executable.

Goes in: a Relax module of fused kernels, a TVM target, the database adapter (or None) and the
families' fixed-decision schedules. Comes out: the executable and the workloads that got a
tuned record. A kernel without a record gets its family's fixed schedule, else a rule-based
default (`DenseMatmul` for Linear layers, on the calling thread when small; `SmallSerial` for
other small kernels; `DirectConv` for small convolutions; DLight's GEMV and reduction rules;
`ParallelVectorize`): never an unscheduled kernel.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.dlight.base import ScheduleRule

from hwaware.tvm.ir import fuse_passes, prim_funcs, schedule_rules, workload_hash, workload_of
from hwaware.tvm.isa import VectorUnit, vector_unit

if TYPE_CHECKING:
    from hwaware.tvm.database import SqliteDatabase

log = logging.getLogger(__name__)

FixedSchedules = Mapping[str, Callable[[Any, Any], Any]]  # rule -> (PrimFunc, target) -> Schedule


def fixed_schedule_of(func: tvm.tirx.PrimFunc, fixed_schedules: FixedSchedules
                      ) -> Callable[[Any, Any], Any] | None:
    """The fixed-decision schedule of the first schedule rule of `func` that has one."""
    rule = next((r for r in sorted(schedule_rules(func)) if r in fixed_schedules), None)
    return None if rule is None else fixed_schedules[rule]


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
        m = tvm.transform.Sequential(fuse_passes(target))(m)
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
        from hwaware.tvm.dense import schedule_dense
        from hwaware.tvm.direct_conv import schedule_direct_conv

        rules = [LanesRule("DenseMatmul", schedule_dense), SmallSerial(),
                 LanesRule("DirectConv", schedule_direct_conv), NarrowVectors(dl.cpu.GEMV()),
                 dl.cpu.Reduction(), ParallelVectorize()]
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
        lanes = vector_unit(target).lanes
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            if info.is_injective() and loops and kinds[-1] == "S":
                extent = _extent(sch, loops[-1])
                if extent is not None and extent >= lanes and extent % lanes == 0:
                    _, inner = sch.split(loops[-1], factors=[None, lanes])
                    sch.vectorize(inner)
        return sch


class LanesRule(ScheduleRule):  # type: ignore[misc]
    """A CPU default from a function (PrimFunc, `isa.VectorUnit`) -> schedule, or None where it
    does not take the kernel (then, or where TVM raises, the next rule applies): `DenseMatmul`
    (`hwaware.tvm.dense`, a Linear layer and its epilogue) and `DirectConv`
    (`hwaware.tvm.direct_conv`, a standalone conv2d and its epilogue)."""

    def __init__(self, name: str, schedule: Callable[[Any, VectorUnit], Any]):
        self.name, self.schedule = name, schedule

    def apply(self, func: Any, target: Any, _: bool) -> Any:
        try:
            return self.schedule(func, vector_unit(target))
        except (RuntimeError, ValueError, AssertionError) as err:  # TVM errors: RuntimeErrors
            log.debug("no %s schedule (the next rule applies): %s", self.name, err)
            return None


def has_default_schedule(workload: tvm.IRModule, target: tvm.target.Target) -> bool:
    """Whether a kernel's contraction gets a good schedule without tuning: small enough for
    `SmallSerial`, or on a CPU a dense matmul (`DenseMatmul`) or a small conv (`DirectConv`)."""
    from hwaware.tvm import dense, direct_conv

    if is_small(workload):
        return True
    if target.kind.name != "llvm":
        return False
    unit = vector_unit(target)
    return dense.takes(workload["main"], unit) or direct_conv.takes(workload["main"], unit)


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
        lanes = vector_unit(target).lanes
        cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1
        for info in infos:
            _parallel_vectorize_block(sch, info, lanes, cores)
        return sch


def _parallel_vectorize_block(sch: Any, info: Any, lanes: int, cores: int) -> None:
    """Run the block's spatial loops fused in parallel, vectorized by `lanes` where its rows
    (the innermost spatial loop) are whole vectors. A vector that crosses rows indexes each
    lane with a division and a modulo that TVM's simplifier often keeps, and the lanes load one
    by one: a ReLU over 256 x 28 x 28 ran 205-234 us in 8-lane vectors, 25-29 us in 4-lane ones
    or as a plain loop (which LLVM vectorizes itself; on 2 Zen 3 cores, 8 shapes)."""
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
    row = _extent(sch, spatial[-1])
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    extent = _extent(sch, fused)
    if info.is_injective() and extent is not None and extent >= lanes * 2 and \
            row is not None and row % lanes == 0:
        outer, inner = sch.split(fused, factors=[None, lanes])
        sch.parallel(outer)
        sch.vectorize(inner)
    elif extent is None or extent >= cores:
        sch.parallel(fused)


def _extent(sch: Any, loop: Any) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None
