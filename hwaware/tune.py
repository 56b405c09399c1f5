"""Stage 4, tune: a tuning session over a partitioned model's kernels, kept in the database.

Goes in: a `Partition`, example inputs, a target, a database and a trial budget. Comes out: a
`SessionSummary`, and every measured candidate committed to the database as it is measured.

The tasks are the fused TIR workloads of the kernels that hold a contraction (convolution,
matmul, attention); element-wise and reduction kernels get a rule-based schedule instead.
Budgets: each task's share of the trials follows its share of the model's work (`task_budgets`:
FLOPs times the kernels that call it, half of the budget spread evenly), and MetaSchedule's
gradient task scheduler weighs each task by the kernels that call it.
Resuming: a task that already has its share of the budget in the database is skipped; one with
part of it gets only the rest; MetaSchedule seeds its search from the stored records.
Warm start: the search's XGBoost cost model is kept per target between sessions
(`cost_models/<target key>/metaschedule/`), so a new session ranks its first candidates with
what earlier ones learned; `cold_start=True` leaves it out.

On a device farm (`Farm`): candidates are built here in parallel and measured on the farm's
devices (MetaSchedule's `RPCRunner`), the re-measure of top records too; each record names the
farm's device (`rpc:KEY`) instead of this machine.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hwaware.build import import_kernels
from hwaware.db import TuningDatabase
from hwaware.farm import Farm
from hwaware.options import check_count, check_flag
from hwaware.partition import Partition
from hwaware.runtime import kernel_inputs
from hwaware.target import Target

log = logging.getLogger(__name__)

TRIALS_PER_ITER = 16


@dataclass
class TaskSummary:
    """One tuned workload: where it comes from, how much was measured, the best found."""

    name: str
    workload_hash: str
    family: str
    kernels: list[str]
    flops: int
    trials_before: int
    trials_now: int
    best_us: float | None

    @property
    def gflops(self) -> float | None:
        if not self.best_us or not self.flops:
            return None
        return self.flops / self.best_us / 1e3


@dataclass
class SessionSummary:
    session_id: str
    target_key: str
    trials_requested: int
    trials_measured: int
    elapsed_s: float
    remeasured: int = 0
    tasks: list[TaskSummary] = field(default_factory=list)
    # seconds per phase (search, build, run, cost_model, database: `hwaware.tvm.phases`, and
    # remeasure: the best records timed again); the rest of elapsed_s is in no phase
    phases_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def table(self) -> str:
        lines = [f"tuning session {self.session_id} on {self.target_key}: "
                 f"{self.trials_measured} trials measured in {self.elapsed_s:.0f} s",
                 f"{'task':<34}{'family':<10}{'trials':>8}{'best us':>10}{'GFLOP/s':>9}"]
        for t in self.tasks:
            best = "-" if t.best_us is None else f"{t.best_us:.1f}"
            gf = "-" if t.gflops is None else f"{t.gflops:.1f}"
            lines.append(f"{t.name[:33]:<34}{t.family:<10}{t.trials_before + t.trials_now:>8}"
                         f"{best:>10}{gf:>9}")
        return "\n".join(lines)


@dataclass
class TuningTask:
    """One workload to tune: its name, TIR module, database key, family and the kernels using it."""

    name: str
    workload: Any
    workload_hash: str
    family: str
    kernels: list[str]
    flops: int


def extract_tasks(part: Partition, example_inputs: list[torch.Tensor], target: Target
                  ) -> list[TuningTask]:
    """The distinct contraction workloads of a partitioned model (shared ones tuned once)."""
    inputs = kernel_inputs(part.program, example_inputs)
    imported = import_kernels(part, inputs, target)
    tasks: dict[str, TuningTask] = {}
    for kname, kernel in imported.items():
        spec = part.program.kernels[kname]
        for whash in sorted(kernel.heavy):
            if whash in tasks:
                tasks[whash].kernels.append(kname)
                continue
            tasks[whash] = TuningTask(f"{spec.family}_{whash[:10]}", kernel.workloads[whash],
                                      whash, spec.family, [kname], spec.flops)
    return list(tasks.values())


def require_runnable(target: Target, farm: Farm | None = None) -> None:
    """Tuning measures kernels: refuse a target whose kernels cannot run on this machine, unless
    a farm measures them."""
    if farm is None and not target.can_run_here:
        raise ValueError(f"target {target.name} cannot run on this machine; tuning measures "
                         "kernels, so tune on the device itself (or through the device farm)")


def tune_tasks(tasks: list[TuningTask], target: Target, db: TuningDatabase, trials: int,
               model_name: str = "", show_progress: bool = True, farm: Farm | None = None,
               cold_start: bool = False) -> SessionSummary:
    """Tune `tasks` within `trials` measurements in total; any frontend's tasks (torch, ONNX);
    measured on `farm`'s devices when one is given, else on this machine. However the session
    ends, the WAL is checkpointed so the `.db` file holds its records.

    The search's cost model starts from the one earlier sessions left for this target and is
    saved for the next (`hwaware.tvm.cost_model`); `cold_start=True` neither reads nor
    writes it."""
    require_runnable(target, farm)
    summary = SessionSummary(uuid.uuid4().hex[:12], target.key, check_count("trials", trials),
                             0, 0.0)
    check_flag("cold_start", cold_start)
    if not tasks or trials == 0:
        return summary
    try:
        return _run_session(tasks, target, db, summary, model_name, show_progress, farm,
                            cold_start)
    finally:  # also on Ctrl-C or an error: the records so far go into the .db file itself
        db.checkpoint()


def _run_session(tasks: list[TuningTask], target: Target, db: TuningDatabase,
                 summary: SessionSummary, model_name: str, show_progress: bool,
                 farm: Farm | None, cold_start: bool) -> SessionSummary:
    """The session itself: each task's remaining budget measured (on `farm`, if one is given),
    the summary filled in."""
    from hwaware.kernels import fixed_schedules as family_schedules
    from hwaware.tvm import cost_model, database, phases, schedules, search, setup

    session_id, trials = summary.session_id, summary.trials_requested
    budgets = task_budgets(tasks, trials)
    before = {t.workload_hash: db.count_records(t.workload_hash, setup.TVM_VERSION,
                                                target.key) for t in tasks}
    remaining = {t.name: max(0, budgets[t.name] - before[t.workload_hash]) for t in tasks}
    todo = [t for t in tasks if remaining[t.name] > 0]
    db.start_session(session_id, target.key, model_name, trials)
    start = time.time()
    progress = _Progress(sum(remaining[t.name] for t in todo), show_progress)
    if todo:
        resolved = setup.resolve(target)
        tgt = resolved.tvm
        adapter = database.SqliteDatabase.of(db, resolved, farm.device if farm else None)
        fixed_schedules = family_schedules()
        ms_runner, remeasure_runner = _runners(farm)
        with tempfile.TemporaryDirectory(prefix="hwaware-ms-") as work_dir, \
                phases.phase_times() as summary.phases_s:
            search.tune_workloads(
                {t.name: t.workload for t in todo}, {t.name: remaining[t.name] for t in todo},
                tgt, adapter, session_id, progress.update, work_dir,
                num_trials_per_iter=_batch_size(max(budgets.values())),
                weights={t.name: float(len(t.kernels)) for t in todo},
                fixed_schedules=fixed_schedules,
                runner=ms_runner,
                cost_model_dir=None if cold_start else cost_model.model_dir(target.key),
            )
        remeasure_start = time.time()
        # checked (on the farm device that measured them, if one did): a best record that
        # computes wrong numbers is marked failed, not re-ranked
        checked = database.SqliteDatabase.checked(db, resolved, adapter.device, farm)
        for t in todo:  # fused kernels: re-rank their best records like for like
            if schedules.fixed_schedule_of(t.workload["main"], fixed_schedules) is not None:
                _remeasure(t, checked, fixed_schedules, remeasure_runner)
        summary.phases_s["remeasure"] = time.time() - remeasure_start
    progress.close()
    summary.elapsed_s = time.time() - start
    summary.trials_measured = progress.done
    summary.remeasured = progress.remeasured
    for t in tasks:
        best = db.top_records(t.workload_hash, setup.TVM_VERSION, target.key, 1)
        now = db.count_records(t.workload_hash, setup.TVM_VERSION, target.key)
        summary.tasks.append(TaskSummary(
            t.name, t.workload_hash, t.family, t.kernels, t.flops, before[t.workload_hash],
            now - before[t.workload_hash], best[0].mean_us if best else None,
        ))
    db.finish_session(session_id, summary.to_json())
    return summary


def _runners(farm: Farm | None) -> tuple[Any, Any]:
    """MetaSchedule's runner and hwaware's `Runner` for the re-measure: the farm's (RPC), or
    None for both (this machine's)."""
    if farm is None:
        return None, None
    from hwaware.tvm import rpc

    log.warning("measuring on the farm's %r devices (tracker %s); a build's TVM-vs-PyTorch "
                "choice still times both sides on the machine that builds: a TVM RPC server "
                "runs TVM modules, not PyTorch", farm.key, farm.tracker)
    return rpc.tuning_runner(farm), rpc.RpcRunner(farm)


def _remeasure(task: TuningTask, adapter: Any, fixed_schedules: Any, runner: Any) -> None:
    """Re-time the task's best records side by side; on a farm, a device lost by then costs
    only this step (the records keep their runner times), never the finished session."""
    from hwaware.tvm import search

    try:
        search.remeasure_top_records(task.workload, adapter, fixed_schedules=fixed_schedules,
                                     runner=runner)
    except (RuntimeError, ValueError, OSError) as err:  # TVM's errors are RuntimeErrors
        if runner is None:
            raise
        log.warning("re-measuring %s on the farm failed, its records keep their runner times: "
                    "%s", task.name, str(err).strip().splitlines()[-1][:300])


def _batch_size(per_task: int) -> int:
    """Candidates per search round: bigger rounds amortise the search on big budgets."""
    if per_task >= 8 * TRIALS_PER_ITER:
        return 2 * TRIALS_PER_ITER
    return min(TRIALS_PER_ITER, per_task)


def task_budgets(tasks: list[TuningTask], trials: int) -> dict[str, int]:
    """Each task's share of `trials`, by its share of the model's work: FLOPs of one call times
    the kernels that call it (a block repeated 16 times weighs 16 times). Half of the budget is
    shared evenly (every task gets a search, however light), half by weight; shares above one
    round are whole rounds (`TRIALS_PER_ITER`). The same tasks and trials always give the same
    budgets, so a resumed session measures only what its first run did not."""
    weights = [max(t.flops, 1) * len(t.kernels) for t in tasks]
    total = sum(weights)
    even = trials / 2 / len(tasks)
    return {t.name: _whole_rounds(math.ceil(even + trials / 2 * w / total))
            for t, w in zip(tasks, weights, strict=True)}


def _whole_rounds(share: int) -> int:
    """Shares above one round rounded to the nearest whole round."""
    if share > TRIALS_PER_ITER:
        share = round(share / TRIALS_PER_ITER) * TRIALS_PER_ITER
    return share


class _Progress:
    """A tqdm bar: trials done/total, elapsed, ETA, and the best latency per task so far."""

    def __init__(self, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.done = 0
        self.remeasured = 0  # candidates measured again although the database had them
        self.best: dict[str, float] = {}
        self.bar = tqdm(total=total, unit="trial", desc="tuning", disable=not enabled,
                        dynamic_ncols=True)

    def update(self, task: str, measured: int, new: int, best_us: float | None) -> None:
        self.done += measured
        self.remeasured += measured - new
        if best_us is not None:
            self.best[task] = min(best_us, self.best.get(task, math.inf))
        self.bar.update(measured)
        self.bar.set_postfix_str(
            " ".join(f"{k.split('_')[0]}:{v:.0f}us" for k, v in sorted(self.best.items())[:4])
        )

    def close(self) -> None:
        self.bar.close()
