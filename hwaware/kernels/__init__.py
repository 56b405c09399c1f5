"""Fused kernel families: patterns of the rewritten ATen graph that run as ONE tunable TIR kernel.

Stage 3 (partition) asks every family to `find` its pattern in the rewritten graph; each group of
nodes it returns becomes one kernel of that family instead of the ordinary contraction-plus-
epilogue kernels. Stage 4/5 (tune, build) ask the family to `lower` that kernel's standalone
graph to a Relax module whose `main` calls the family's PrimFunc through `call_tir`. The PrimFunc
carries a `schedule_rule` block annotation naming the family's schedule space, so MetaSchedule
tunes it like any other workload and the tuning database keeps its records by structural hash.

A family module (conv.py, resblock.py, gnn.py, attention.py) exports one `KernelFamily` object.
`find` returns only groups it can lower (an unsupported variant is left to the unfused path,
with a debug log line); `lower` gets the kernel graph that partition cut from those nodes.
Finding imports no TVM: a family's lowering code imports it where it runs (attention's is its
own module, `attention_kernel`, reached through `lowering`), and its schedule spaces are
registered with MetaSchedule when it lowers (`register`), not when the family is imported.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx

# Family modules of this package, in the order `find` runs, and their FAMILY objects' names.
FAMILY_MODULES = ("convnext", "conv", "resblock", "rgcn", "gnn", "attention")
FAMILY_NAMES = ("convnext_block", "conv_block", "res_block", "rgcn", "gnn", "attention")
_names = itertools.count()
_registered: set[str] = set()  # rules whose spaces are registered in this process


@dataclass(frozen=True)
class KernelFamily:
    """One fused kernel family.

    `find(gm)`: groups of `call_function` nodes of the rewritten graph, one group per instance.
    Each group's outside inputs must come before its first node (graph order), and only the
    group's final values may be used outside it.
    `lower(graph, inputs, target, name)`: an IRModule whose Relax `main` takes the kernel graph's
    inputs (placeholders, in order) and returns the tuple of its outputs; weights are embedded
    as constants. PrimFunc names start with `name` (unique per process). `target` is the
    hwaware `Target`; `inputs` are example tensors for the graph's placeholders.
    `rule`: the `schedule_rule` the family's PrimFuncs carry (its tunable schedule space).
    `schedule_fixed(func, tvm_target)`: a Schedule of one such PrimFunc by that space with fixed
    decisions: what a build with no tuned record for it runs, and the first candidate a tuning
    session measures (its trace seeds the search, so tuning never ends worse than untuned).
    `computed_share(group, gm)`: the share of the group's contraction work its kernel does, for
    its FLOP count (a causal attention skips the key blocks above the diagonal); None: all.
    `register()`: registers the family's sampled schedule spaces with MetaSchedule (idempotent;
    `lower` and `fixed_schedules` call it, so finding a pattern never imports TVM)."""

    name: str
    rule: str
    find: Callable[[fx.GraphModule], list[list[fx.Node]]]
    lower: Callable[[fx.GraphModule, list[Any], Any, str], Any]
    schedule_fixed: Callable[[Any, Any], Any]
    computed_share: Callable[[list[fx.Node], fx.GraphModule], float] | None = None
    register: Callable[[], None] = lambda: None


def lowering(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, a function of a family's lowering half, imported at its first call (the
    lowering half imports TVM; the family's pattern half does not import it at all)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def unique_name(family: str) -> str:
    """A PrimFunc name no other lowering in this process uses."""
    return f"hw_{family}_{next(_names)}"


def first_registration(rule: str) -> bool:
    """True the first time this process registers the schedule spaces of `rule`."""
    if rule in _registered:
        return False
    _registered.add(rule)
    return True


def register_spaces(rule: str, schedules: dict[str, Callable[[Any, Any], Any]],
                    sampled: Callable[[], Any]) -> None:
    """Register `schedules[kind](sch, sampled())` (kind: "cpu", "cuda") as the schedule space
    MetaSchedule's ApplyCustomRule looks up for blocks annotated `schedule_rule: rule`;
    `sampled()` makes the decisions with sampling instructions. Once per rule and process."""
    import tvm

    if not first_registration(rule):
        return
    for kind, schedule in schedules.items():
        def space(sch: Any, _block: Any, schedule: Callable[[Any, Any], Any] = schedule
                  ) -> list[Any]:
            return [schedule(sch, sampled())]

        tvm.register_global_func(f"s_tir.meta_schedule.{kind}.{rule}", space, override=True)


def fixed_schedule(schedules: dict[str, Callable[[Any, Any], Any]],
                   decisions: Callable[[str, int], Any]) -> Callable[[Any, Any], Any]:
    """A family's `schedule_fixed` when its space is `schedules[kind](sch, decisions)`: the
    PrimFunc scheduled by the space for the target's kind ("cpu" or "cuda") with the fixed
    `decisions(kind, cores)` in place of sampled ones (returns the Schedule)."""

    def schedule_fixed(func: Any, target: Any) -> Any:
        from tvm import s_tir

        kind = "cuda" if target.kind.name == "cuda" else "cpu"
        sch = s_tir.Schedule(func)
        schedules[kind](sch, decisions(kind, target_cores(target)))
        return sch

    return schedule_fixed


def keep_default_rules_off(sch: Any, block: Any) -> None:
    """Mark a block the family's GPU schedule has bound as done: MetaSchedule's default rules
    (AutoBind) would otherwise bind its serial feature loops to blockIdx.x too, because they do
    not see the thread bindings outside the family's opaque row block (wrong rows, or two
    extents on blockIdx.x)."""
    sch.annotate(block, "schedule_rule", "None")


def target_cores(target: Any) -> int:
    """The CPU cores a TVM target's parallel loops run on (its "num-cores"; 1 if unset)."""
    return int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1


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


def fixed_schedules() -> dict[str, Callable[[Any, Any], Any]]:
    """Every family's fixed-decision schedule, by its rule name (`schedules.build_executable`)."""
    return {f.rule: f.schedule_fixed for f in families().values()}


def families() -> dict[str, KernelFamily]:
    """Every fused kernel family, by name (TVM-free: a family imports TVM only to lower)."""
    modules = [importlib.import_module(f"hwaware.kernels.{m}") for m in FAMILY_MODULES]
    found = {m.FAMILY.name: m.FAMILY for m in modules}
    assert tuple(found) == FAMILY_NAMES, "FAMILY_NAMES lists the families in this order"
    return found
