"""Audit a schedule space: do the schedules the search can make compute their workload?

Goes in: a workload (a fused TIR function with a family's schedule rule, or any TIR workload)
and a CPU target. Comes out: schedules as MetaSchedule's evolutionary search makes them (a
fresh sample of the design space, then TVM's own `MutateTileSize` applied, replayed from the
trace as a stored record is), how many of their blocks run under a predicate, and whether each
computes the workload's outputs (`hwaware.tvm.check.records_mismatch`).

Why: a schedule rule is written against the tile sizes it samples, but the search mutates them
later while every other decision stays. A lane count sampled for one tile that no longer
divides the mutated one left predicated register tiles whose copy-out stages wrote other
parallel tiles' outputs: a race that computed wrong numbers in 23 of 128 tuned records of a
MobileNetV2 block (session 34). Used by the kernel tests and `bench/search_spaces.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tvm
from tvm.s_tir import meta_schedule as ms

from hwaware.tvm.setup import import_tensor_intrinsics


def searched_schedules(workload: tvm.IRModule, target: tvm.target.Target, count: int,
                       mutations: int = 3) -> list[Any]:
    """`count` schedules of `workload`'s first design space: sample k (seed k) with its tile
    sizes mutated `mutations` times by `MutateTileSize`, replayed on the workload."""
    import_tensor_intrinsics()  # else TuneContext imports them slowly (~55 s)
    schedules = []
    for seed in range(1, count + 1):
        context = ms.TuneContext(mod=workload, target=target, space_generator="post-order-apply",
                                 task_name="audit", rand_state=seed)
        space = context.generate_design_space()[0]
        mutator = ms.mutator.MutateTileSize()
        mutator._initialize_with_tune_context(context)
        trace = space.trace
        for _ in range(mutations):
            trace = mutator.apply(trace) or trace
        sch = tvm.s_tir.Schedule(workload)
        trace.apply_to_schedule(sch, remove_postproc=True)
        schedules.append(sch)
    return schedules


def predicated_blocks(sch: Any) -> int:
    """How many blocks of a scheduled module run under a predicate (`T.where`): what a split
    by a factor that does not divide its loop leaves."""
    return str(sch.mod.script()).count("T.where(")


@dataclass
class SpaceAudit:
    """What `audit` found: per schedule, its predicated blocks and why it is wrong (or None)."""

    predicated: list[int]
    wrong: list[str | None]


def audit(workload: tvm.IRModule, target: tvm.target.Target, count: int, built: int
          ) -> SpaceAudit:
    """`count` searched schedules of `workload` counted for predicated blocks; the first
    `built` of them built and run on this machine against the unscheduled workload."""
    from hwaware.tvm.check import records_mismatch

    schedules = searched_schedules(workload, target, count)
    records = [ms.database.TuningRecord(sch.trace, ms.database.Workload(workload))
               for sch in schedules[:built]]
    return SpaceAudit([predicated_blocks(sch) for sch in schedules],
                      records_mismatch(workload, records, target))
