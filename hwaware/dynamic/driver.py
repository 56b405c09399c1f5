"""Dynamic networks, the driver: stage -> split -> explore -> compile each region -> model.

`plan_model` decides whether a model needs the dynamic path (its forward branches or loops on
values only known at run time); `compile_dynamic` and `tune_dynamic` are what
`hwaware.compile` / `hwaware.tune` run for such a model. Every region specialization goes
through the same static pipeline as any model (capture, rewrite, partition, tune, build), so
regions with the same structure share tuning records: same workload, same database rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from hwaware.capture import Captured, CaptureError, capture
from hwaware.db import TuningDatabase
from hwaware.dynamic.model import (
    DynamicCaptureError,
    DynamicInfo,
    DynamicModel,
    ExploreStats,
    Key,
    RegionInfo,
    RegionRunner,
    explore,
    graph_inputs,
)
from hwaware.dynamic.split import HostPlan, split
from hwaware.dynamic.stage import Staged, StagingError, stage
from hwaware.target import Target
from hwaware.tune import SessionSummary

log = logging.getLogger(__name__)


def plan_model(model: torch.nn.Module) -> tuple[Staged, HostPlan] | None:
    """The host plan of a model whose forward needs one; None for a straight-line forward
    (or one whose source hwaware cannot rewrite: the static path then decides)."""
    if type(model).__module__.startswith("torch."):
        return None  # PyTorch's own modules: their branches are fast paths export handles
    try:
        staged = stage(model)
        plan = split(staged)
    except StagingError as err:
        log.info("%s: not rewritten as a dynamic network: %s", type(model).__name__, err)
        return None
    except SyntaxError as err:  # source that does not parse on its own (rare)
        log.info("%s: source not parsed: %s", type(model).__name__, err)
        return None
    return (staged, plan) if plan.is_dynamic else None


def make_runners(staged: Staged, plan: HostPlan) -> dict[str, RegionRunner]:
    runners = {}
    for name, r in plan.regions.items():
        source = r.source()
        namespace = dict(staged.globals[r.origin.globals_id])
        exec(compile(source, f"<hwaware {name} from {r.where}>", "exec"),  # noqa: S102
             namespace)
        info = RegionInfo(name, r.inputs, r.outputs, r.where, source, None,
                          r.arithmetic_inputs)
        runner = RegionRunner(info, namespace[name], staged.root)
        if r.eager_reason:
            runner.mark_eager(f"Python side effect ({r.eager_reason})", strict=False)
        runners[name] = runner
    return runners


Pending = tuple[RegionRunner, Key, list[Any]]


def explore_model(staged: Staged, plan: HostPlan, inputs: Sequence[Any], strict: bool
                  ) -> tuple[dict[str, RegionRunner], ExploreStats, list[Pending]]:
    """Runners for every region, the exploration statistics, and every specialization met."""
    if strict:
        for region in plan.regions.values():
            if region.eager_reason:
                raise DynamicCaptureError(f"{region.where}: Python side effect "
                                          f"({region.eager_reason}) cannot be compiled "
                                          "(strict=True)")
    runners = make_runners(staged, plan)
    stats = explore(plan.source(instrumented=True), plan.sites, runners, inputs)
    pending = [(r, k, a) for r in runners.values() if r.eager_reason is None
               for k, a in r.recorded.items()]
    for r in runners.values():
        r.recorded = {}
    return runners, stats, pending


def capture_pending(pending: list[Pending], model_name: str, strict: bool
                    ) -> list[tuple[RegionRunner, Key, Captured]]:
    """Capture each specialization as a static graph; a region that cannot be captured runs
    in eager (with one warning naming its line) or, with strict=True, raises."""
    out = []
    for runner, key, args in pending:
        if runner.eager_reason is not None:
            continue
        module = runner.module_for(key, args)
        try:
            captured = capture(module, tuple(graph_inputs(key, args)),
                               name=f"{model_name}.{runner.info.name}")
        except CaptureError as err:
            cause = err.__cause__ or err
            runner.mark_eager(f"cannot be made static ({type(cause).__name__}: "
                              f"{str(cause).splitlines()[0] if str(cause) else ''})", strict)
            continue
        out.append((runner, key, captured))
    return out


def compile_dynamic(model: torch.nn.Module, staged: Staged, plan: HostPlan,
                    inputs: Sequence[Any], target: Target, db: TuningDatabase | None,
                    trials: int, show_progress: bool, strict: bool,
                    compile_graphs: Callable[..., list[Any]]) -> DynamicModel:
    """Explore, compile every specialization met (tuning them together first if trials > 0),
    and return the model; later unseen shapes compile on first use."""
    name = type(model).__name__
    runners, stats, pending = explore_model(staged, plan, inputs, strict)

    def build_pending(items: list[Pending], tuning_trials: int) -> None:
        captured = capture_pending(items, name, strict)
        models = compile_graphs([c for _, _, c in captured], target, db, tuning_trials,
                                show_progress)
        for (runner, key, _), cm in zip(captured, models, strict=True):
            runner.add(key, cm)

    build_pending(pending, trials)
    for r in runners.values():
        r.compile_new = lambda runner, key, args: build_pending([(runner, key, args)], 0)
    info = DynamicInfo(name, target.name, list(staged.params), stats,
                       defaults=len(staged.defaults))
    info.dynamo_graphs, info.dynamo_breaks = dynamo_explain(model, inputs)
    return DynamicModel(plan.source(), runners, info)


def tune_dynamic(model: torch.nn.Module, staged: Staged, plan: HostPlan,
                 inputs: Sequence[Any], target: Target, db: TuningDatabase, trials: int,
                 show_progress: bool, tune_graphs: Callable[..., SessionSummary]
                 ) -> SessionSummary:
    """One tuning session over the contraction workloads of every region specialization."""
    _, _, pending = explore_model(staged, plan, inputs, strict=False)
    captured = capture_pending(pending, type(model).__name__, strict=False)
    return tune_graphs([c for _, _, c in captured], target, db, trials, show_progress)


def dynamo_explain(model: torch.nn.Module, inputs: Sequence[Any]) -> tuple[int | None,
                                                                           int | None]:
    """How many graphs and graph breaks Dynamo (torch.compile's frontend) makes of the same
    call: graphs are counted at the backend, since `torch._dynamo.explain` reports 0 graphs
    when Dynamo falls back for a whole frame (it does for a data-dependent `if` in a loop)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    graphs = 0

    def count(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        nonlocal graphs
        graphs += 1
        return gm.forward

    try:
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            torch.compile(model, backend=count)(*inputs)
        return graphs, sum(counters["graph_break"].values())
    except Exception as err:  # noqa: BLE001 - a comparison only; never fails a compile
        log.info("Dynamo comparison failed: %s", err)
        return None, None
    finally:
        torch._dynamo.reset()
