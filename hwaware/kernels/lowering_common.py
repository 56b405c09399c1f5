"""What the lowering halves of the kernel families share (imported only to lower or schedule).

Each family's `<family>_kernel` module builds the family's PrimFunc and schedules it; the
helpers here are those several families use: how a schedule space is registered with
MetaSchedule (`register_spaces`, the one way, once per rule and process), a fixed-decision
`schedule_fixed` made from a family's schedules, the target's core count, and two schedule
steps (a register-tile accumulator; keeping MetaSchedule's default rules off a bound block).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm
from tvm import s_tir

Space = Callable[[Any, Any], list[Any]]  # (schedule, annotated block) -> schedules
_registered: set[str] = set()  # rules whose spaces are registered in this process


def register_spaces(rule: str, spaces: dict[str, Space]) -> None:
    """Register `spaces[kind]` (kind: "cpu", "cuda") as the schedule space MetaSchedule's
    ApplyCustomRule looks up for blocks annotated `schedule_rule: rule`. Once per rule and
    process; a family's `lower` calls it, so finding a pattern never imports TVM."""
    if rule in _registered:
        return
    _registered.add(rule)
    for kind, space in spaces.items():
        tvm.register_global_func(f"s_tir.meta_schedule.{kind}.{rule}", space, override=True)


def sampled_spaces(schedules: dict[str, Callable[[Any, Any], Any]],
                   sampled: Callable[[], Any]) -> dict[str, Space]:
    """The spaces of a family whose space for each kind is `schedules[kind](sch, decisions)`:
    that schedule with the decisions `sampled()` makes (sampling instructions)."""

    def space_of(schedule: Callable[[Any, Any], Any]) -> Space:
        def space(sch: Any, _block: Any) -> list[Any]:
            return [schedule(sch, sampled())]

        return space

    return {kind: space_of(schedule) for kind, schedule in schedules.items()}


def fixed_schedule(schedules: dict[str, Callable[[Any, Any], Any]],
                   decisions: Callable[[str, int], Any]) -> Callable[[Any, Any], Any]:
    """A family's `schedule_fixed` when its space is `schedules[kind](sch, decisions)`: the
    PrimFunc scheduled by the space for the target's kind ("cpu" or "cuda") with the fixed
    `decisions(kind, cores)` in place of sampled ones (returns the Schedule). The target is in
    scope meanwhile (the vector unit the schedules size their tiles by, `isa`)."""

    def schedule_fixed(func: Any, target: Any) -> Any:
        kind = "cuda" if target.kind.name == "cuda" else "cpu"
        sch = s_tir.Schedule(func)
        with target:
            schedules[kind](sch, decisions(kind, target_cores(target)))
        return sch

    return schedule_fixed


def target_cores(target: Any) -> int:
    """The CPU cores a TVM target's parallel loops run on (its "num-cores"; 1 if unset)."""
    return int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1


def keep_default_rules_off(sch: Any, block: Any) -> None:
    """Mark a block the family's GPU schedule has bound as done: MetaSchedule's default rules
    (AutoBind) would otherwise bind its serial feature loops to blockIdx.x too, because they do
    not see the thread bindings outside the family's opaque row block (wrong rows, or two
    extents on blockIdx.x)."""
    sch.annotate(block, "schedule_rule", "None")


def accumulate_in_registers(sch: Any, block: Any, tile_loop: Any, reduction: Any) -> None:
    """Give the reduction `block` a "local" accumulator of one register tile: the values one
    iteration of `tile_loop` computes, written back to `block`'s buffer after the reduction
    (vectorized), with the zero-init hoisted before the `reduction` loop. LLVM keeps such a
    small local buffer in registers; accumulating in the block's own (tile or whole-output)
    buffer instead makes every FMA load and store its accumulator."""
    cache = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(cache, tile_loop, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(cache)[-1])
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
