"""Search policy: MetaSchedule runs over the workloads, and what hwaware adds to its search.

Goes in: workloads, budgets, a target and a `SqliteDatabase`. Comes out: records in the
database. The search measures each fused family's fixed-decision schedule first, never
measures a candidate the database already holds (`SkipStoredCandidates`), and
`remeasure_top_records` re-times the best stored records side by side so the build picks the
best by a like-for-like comparison. The XGBoost cost model that ranks candidates starts from
the target's saved one and is saved again after the session (`hwaware.tvm.cost_model`).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from hwaware.db import RecordRow
from hwaware.runner import LocalRunner
from hwaware.tvm import cost_model as search_cost_model
from hwaware.tvm.database import RecordingCallback, SqliteDatabase, record_row
from hwaware.tvm.ir import plain_json, workload_hash
from hwaware.tvm.rpc import RpcRunner, kernel_evaluations
from hwaware.tvm.schedules import FixedSchedules, fixed_schedule_of
from hwaware.tvm.setup import TVM_VERSION, fast_build, import_tensor_intrinsics

log = logging.getLogger(__name__)


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
                 fixed_schedules: FixedSchedules | None = None, budget: int | None = None):
        super().__init__()
        self.inner = inner
        self.budget = budget  # this task's trials (tune_tasks has one maximum for all tasks)
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
        trials = max_trials if self.budget is None else min(max_trials, self.budget)
        self.inner.pre_tuning(trials, num_trials_per_iter, design_spaces, database, cost_model)

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
        return SkipStoredCandidates(self.inner.clone(), self.database, self.fixed_schedules,
                                    self.budget)

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
                          rounds: int = 30, fixed_schedules: FixedSchedules | None = None,
                          runner: RpcRunner | None = None) -> None:
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
    stored = database.db.top_records(workload_hash(workload), TVM_VERSION, database.target_key,
                                     k)
    if not stored or database.target.kind.name != "llvm":
        return
    # with the adapter's `verify`, a record that computes wrong numbers is marked failed here
    replayed = _replayed(workload, database.computing(stored, ms.database.Workload(workload)))
    if not replayed:
        return
    rows, schedules = [r for r, _ in replayed], [s for _, s in replayed]
    fixed = _postprocessed_fixed(workload, database.target, fixed_schedules or {})
    fixed_trace = None if fixed is None else plain_json(fixed.trace.as_json())
    if fixed is not None and all(json.loads(r.trace_json) != fixed_trace for r in rows):
        schedules.append(fixed)
    if len(schedules) < 2:
        return
    run_secs = _time_round_robin([sch.mod for sch in schedules], database.target,
                                 json.loads(rows[0].args_info_json), rounds, runner)
    # the runner's scale: records not re-timed keep their runner times, and the re-timed best
    # (<= the median of the group) still ranks above every one of those
    scale = statistics.median(r.mean_us or 0.0 for r in rows) / 1e6 / \
        statistics.median(statistics.median(secs) for secs in run_secs[:len(rows)])
    scaled = [[s * scale for s in secs] for secs in run_secs]
    if len(schedules) > len(rows):  # the fixed schedule, stored now
        rows.append(record_row(workload_hash(workload), database.target_key, fixed_trace,
                                json.loads(rows[0].args_info_json), scaled[-1], None,
                                database.device, None))
        database.db.commit_record(rows[-1])
    for row, secs in zip(rows, scaled, strict=True):
        # mean_us: the median, as for every re-timed record; device: where it was re-timed
        database.db.remeasure(row, secs, database.device)


def _replayed(workload: tvm.IRModule, records: list[tuple[RecordRow, Any]]
              ) -> list[tuple[RecordRow, Any]]:
    """The schedules of stored records (replayed on `workload`), with their rows."""
    replayed = []
    for row, record in records:
        sch = tvm.s_tir.Schedule(workload)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        replayed.append((row, sch))
    return replayed


def _postprocessed_fixed(workload: tvm.IRModule, target: tvm.target.Target,
                         fixed_schedules: FixedSchedules) -> Any | None:
    if not fixed_schedules:
        return None
    import_tensor_intrinsics()  # else TuneContext imports them slowly (~55 s)
    return postprocessed_fixed_schedule(ms.TuneContext(
        mod=workload, target=target, space_generator="post-order-apply", task_name="remeasure",
    ), fixed_schedules)


def _time_round_robin(mods: list[tvm.IRModule], target: tvm.target.Target,
                      args_info: Any, rounds: int, runner: RpcRunner | None = None
                      ) -> list[list[float]]:
    """Seconds per call of each scheduled module, built as the tuning builder builds and timed
    in turns (`rounds` samples each, >= 20 ms of calls per sample, by TVM's time evaluator) on
    the same random inputs: in this process through the `LocalRunner`, or on a farm device
    (`runner`)."""
    libs = [fast_build(mod, target, None) for mod in mods]
    with kernel_evaluations(libs, args_info, runner) as evaluations:
        timer = runner or LocalRunner(block=1, untimed_per_block=0, self_timed=True)
        run_us = timer.run_us(evaluations, rounds)
    return [[us / 1e6 for us in samples] for samples in run_us]


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
    runner: Any = None,
    cost_model_dir: Path | None = None,
    weights: dict[str, float] | None = None,
) -> None:
    """Run MetaSchedule (evolutionary search + XGBoost cost model) over the named workloads,
    each within its own budget; `weights` (default 1): how many times the model runs each
    workload, for the gradient task scheduler, which tunes next the task whose weighted
    latency is falling fastest.

    The search population is half MetaSchedule's default: on a 2-core machine each generation
    of 512 costs ~6 s of feature extraction, as much as building the batch it picks.
    `fixed_schedules` (rule -> fixed-decision Schedule): measured first (SkipStoredCandidates).
    `runner`: MetaSchedule's runner (default: its `LocalRunner`; a farm's `RPCRunner`).
    `cost_model_dir`: where the target's search cost model is kept between sessions
    (`cost_model.model_dir`); the session starts from it and saves it, with this session's
    data, when done. None: a cold session, which reads and writes none."""
    import_tensor_intrinsics()
    cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else \
        len(os.sched_getaffinity(0))  # a GPU target: this host's cores build its candidates
    names = sorted(workloads)
    contexts = [
        ms.TuneContext(
            mod=workloads[n], target=target, space_generator="post-order-apply",
            search_strategy=SkipStoredCandidates(ms.search_strategy.EvolutionarySearch(
                population_size=population, genetic_num_iters=3, init_min_unmeasured=32,
            ), database, fixed_schedules, budgets[n]),
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
    model = search_cost_model.warm_model(cost_model_dir, database.target_key, cores)
    with target:  # the families' sampled spaces size their register tiles by it (`isa`)
        ms.tune_tasks(
            tasks=contexts,
            task_weights=[(weights or {}).get(n, 1.0) for n in names],
            work_dir=work_dir,
            max_trials_global=total,
            max_trials_per_task=max(budgets.values()),
            num_trials_per_iter=num_trials_per_iter,
            builder=ms.builder.LocalBuilder(f_build=f_build or fast_build, max_workers=cores,
                                            timeout_sec=builder_timeout_s),
            runner=runner or ms.runner.LocalRunner(timeout_sec=runner_timeout_s),
            database=database,
            cost_model=model,
            measure_callbacks=callbacks,
            task_scheduler="gradient",
        )
    if cost_model_dir is not None:
        search_cost_model.save(model, cost_model_dir, database.target_key)
