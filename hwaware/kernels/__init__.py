"""Fused kernel families: patterns of the rewritten ATen graph that run as ONE tunable TIR kernel.

Stage 3 (partition) asks every family to `find` its pattern in the rewritten graph; each group of
nodes it returns becomes one kernel of that family instead of the ordinary contraction-plus-
epilogue kernels. Stage 4/5 (tune, build) ask the family to `lower` that kernel's standalone
graph to a Relax module whose `main` calls the family's PrimFunc through `call_tir`. The PrimFunc
carries a `schedule_rule` block annotation naming the family's schedule space, so MetaSchedule
tunes it like any other workload and the tuning database keeps its records by structural hash.

Each family is two modules: `<family>.py`, the pattern half (what a match is, `find`, its FLOP
share), which imports no TVM and exports the family's one `KernelFamily` object, `FAMILY`; and
`<family>_kernel.py`, the lowering half (TIR template, schedule spaces, `lower`,
`schedule_fixed`), imported only when a kernel is lowered or scheduled. What the lowering halves
share is in `lowering_common`, which also holds the one way to register a schedule space.
`find` returns only groups the family can lower (an unsupported variant is left to the unfused
path, with a debug log line); `lower` gets the kernel graph that partition cut from those nodes.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from torch import fx

# The families' pattern modules (hwaware.kernels.<module>, each with one FAMILY), in the order
# partition runs their `find`: the first family to claim a node keeps it.
FAMILY_MODULES = ("convnext", "conv", "resblock", "rgcn", "gnn", "attention")
_names = itertools.count()


@dataclass(frozen=True)
class KernelFamily:
    """One fused kernel family.

    `find(gm)`: groups of `call_function` nodes of the rewritten graph, one group per instance.
    Each group's outside inputs must come before its first node (graph order), and only the
    group's final values may be used outside it.
    `rule`: the `schedule_rule` the family's PrimFuncs carry (its tunable schedule space).
    `lowering`: the module of the family's lowering half; `lower` and `schedule_fixed` call its
    functions of those names, importing it (and TVM) at their first call.
    `computed_share(group, gm)`: the share of the group's contraction work its kernel does, for
    its FLOP count (a causal attention skips the key blocks above the diagonal); None: all."""

    name: str
    rule: str
    find: Callable[[fx.GraphModule], list[list[fx.Node]]]
    lowering: str
    computed_share: Callable[[list[fx.Node], fx.GraphModule], float] | None = None

    def lower(self, graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
        """An IRModule whose Relax `main` takes the kernel graph's inputs (placeholders, in
        order) and returns the tuple of its outputs; weights are embedded as constants.
        PrimFunc names start with `name` (unique per process). `target` is the hwaware
        `Target`; `inputs` are example tensors for the graph's placeholders. Registers the
        family's sampled schedule spaces with MetaSchedule."""
        return self._lowering().lower(graph, inputs, target, name)

    def schedule_fixed(self, func: Any, target: Any) -> Any:
        """A Schedule of one of the family's PrimFuncs by its space with fixed decisions, for a
        TVM target: what a build with no tuned record for it runs, and the first candidate a
        tuning session measures (its trace seeds the search, so tuning never ends worse than
        untuned)."""
        return self._lowering().schedule_fixed(func, target)

    def _lowering(self) -> ModuleType:
        return importlib.import_module(self.lowering)


def unique_name(family: str) -> str:
    """A PrimFunc name no other lowering in this process uses."""
    return f"hw_{family}_{next(_names)}"


def fixed_schedules() -> dict[str, Callable[[Any, Any], Any]]:
    """Every family's fixed-decision schedule, by its rule name (`schedules.build_executable`)."""
    return {f.rule: f.schedule_fixed for f in families().values()}


def families() -> dict[str, KernelFamily]:
    """Every fused kernel family, by name, in `find` order (TVM-free: a family imports TVM only
    to lower)."""
    found = [importlib.import_module(f"hwaware.kernels.{m}").FAMILY for m in FAMILY_MODULES]
    return {f.name: f for f in found}
