"""Dynamic networks, the driver: stage -> split -> explore -> compile each region -> model.

`plan_model` decides whether a model needs the dynamic path (its forward branches or loops on
values only known at run time); `compile_dynamic` and `tune_dynamic` are what
`hwaware.compile` / `hwaware.tune` run for such a model. Every region specialization goes
through the same static pipeline as any model (capture, rewrite, partition, tune, build), so
regions with the same structure share tuning records: same workload, same database rows.

Nothing here may turn a model into a wrong one: the host program's run on the example inputs
must equal eager PyTorch's, and a forward that branches on values but can be neither rewritten
nor captured (`eager_model`) runs in eager PyTorch as one region, with one warning naming the
line that decides.
"""

from __future__ import annotations

import inspect
import logging
import math
import traceback
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
    identified,
    same_outputs,
    unspecializable,
)
from hwaware.dynamic.split import HostPlan, RegionDef, split
from hwaware.dynamic.stage import Staged, StagingError, needs_inline, stage
from hwaware.target import Target
from hwaware.tune import SessionSummary

log = logging.getLogger(__name__)


def plan_model(model: torch.nn.Module) -> tuple[Staged, HostPlan] | None:
    """The host plan of a model whose forward needs one; None for a straight-line forward
    (or one whose source hwaware cannot rewrite: the static path then decides, and a capture
    that fails on a value-dependent branch falls back to `eager_model`)."""
    if type(model).__module__.startswith("torch."):
        return None  # PyTorch's own modules: their branches are fast paths export handles
    try:
        staged = stage(model)
        plan = split(staged)
    except (StagingError, SyntaxError) as err:  # SyntaxError: source that does not parse alone
        log.info("%s: not rewritten as a dynamic network: %s", type(model).__name__, err)
        return None
    except Exception as err:  # noqa: BLE001 - a construct the rewrite trips on: not fatal
        log.warning("%s: not rewritten as a dynamic network (%s: %s)", type(model).__name__,
                    type(err).__name__, err)
        return None
    return (staged, plan) if plan.is_dynamic else None


class RewriteError(Exception):
    """The rewritten forward failed, or disagreed with eager PyTorch, on the example inputs."""


def make_runners(staged: Staged, plan: HostPlan) -> dict[str, RegionRunner]:
    runners = {}
    for name, r in plan.regions.items():
        fn, namespace = region_function(staged, r)
        info = RegionInfo(name, r.inputs, r.outputs, r.where, r.source(), None,
                          r.arithmetic_inputs, str(namespace.get("__name__", "")))
        runner = RegionRunner(info, fn, staged.root)
        if r.eager_reason:
            runner.mark_eager(f"Python side effect ({r.eager_reason})", strict=False)
        runners[name] = runner
    return runners


def region_function(staged: Staged, region: RegionDef) -> tuple[Callable[..., Any],
                                                                   dict[str, Any]]:
    """A region's Python function, made from the live model's own forward (the source `split`
    generated from it), in the globals of the module that forward comes from; and those
    globals."""
    namespace = dict(staged.globals[region.origin.globals_id])
    code = compile(region.source(), f"<hwaware {region.name} from {region.where}>", "exec")
    exec(code, namespace)  # noqa: S102 - generated from the live class, never from a folder
    return namespace[region.name], namespace


def eager_region_functions(model: torch.nn.Module, regions: list[RegionInfo]
                           ) -> dict[str, Callable[..., Any]]:
    """The Python of a loaded model's eager regions, made again from `model`'s own forward,
    never from the saved folder. Raises ValueError naming a region whose source `model`'s
    forward no longer gives (its class changed since the compile)."""
    functions: dict[str, Callable[..., Any]] = {
        info.name: _whole_forward for info in regions if info.source == WHOLE_FORWARD}
    rest = [info for info in regions if info.name not in functions]
    planned = plan_model(model) if rest else None
    for info in rest:
        region = planned[1].regions.get(info.name) if planned else None
        if planned is None or region is None or region.source() != info.source:
            raise ValueError(f"{info.name} ({info.where}): the forward of model= no longer "
                             "gives the region that was compiled (its class changed since); "
                             "compile and save it again")
        functions[info.name] = region_function(planned[0], region)[0]
    return functions


Pending = tuple[RegionRunner, Key, list[Any]]


def explore_model(staged: Staged, plan: HostPlan, inputs: Sequence[Any], strict: bool
                  ) -> tuple[dict[str, RegionRunner], ExploreStats, list[Pending]]:
    """Runners for every region, the exploration statistics, and every specialization met.
    Raises RewriteError when the host program's own run on `inputs` fails or differs from
    eager PyTorch's."""
    if strict:
        for region in plan.regions.values():
            if region.eager_reason:
                raise DynamicCaptureError(f"{region.where}: Python side effect "
                                          f"({region.eager_reason}) cannot be compiled "
                                          "(strict=True)")
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)  # the same random numbers for both runs (a model may sample)
        expected = staged.root(*inputs)  # the model's own errors are raised here, as they are
    runners = make_runners(staged, plan)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            stats, got = explore(plan.source(instrumented=True), plan.sites, runners, inputs)
    except Exception as err:
        raise RewriteError(f"the rewritten forward failed where eager PyTorch did not "
                           f"({type(err).__name__}: {err})") from err
    if not same_outputs(got, expected):
        raise RewriteError("the rewritten forward disagrees with eager PyTorch on the "
                           "example inputs")
    pending = [(r, k, a) for r in runners.values() if r.eager_reason is None
               for k, a in r.recorded.items()]
    for r in runners.values():
        r.recorded = {}
    return runners, stats, pending


def capture_pending(pending: list[Pending], model_name: str, strict: bool
                    ) -> list[tuple[RegionRunner, Key, Captured]]:
    """Capture each specialization as a static graph; a region that cannot be captured runs
    in eager (with one warning naming its line) or, with strict=True, raises. A failure on
    inputs only met on a forced exploration path (perhaps an infeasible one) only skips that
    specialization: a real call meeting it compiles it then."""
    out = []
    for runner, key, args in pending:
        reason = unspecializable(runner.info, key)
        if reason is not None:
            runner.mark_eager(reason, strict)
        if runner.eager_reason is not None:
            continue
        module = runner.module_for(key, args)
        try:
            captured = capture(module, tuple(graph_inputs(key, args)),
                               name=f"{model_name}.{runner.info.name}")
        except CaptureError as err:
            cause = err.__cause__ or err
            if key in runner.forced_only:
                log.info("%s: not compiled for inputs met only on a forced path: %s",
                         runner.info.name, cause)
                continue
            runner.mark_eager(f"cannot be made static ({type(cause).__name__}: "
                              f"{str(cause).splitlines()[0] if str(cause) else ''})", strict,
                              where_raised(cause, module.root))
            continue
        out.append((runner, key, captured))
    return out


def compile_dynamic(model: torch.nn.Module, staged: Staged, plan: HostPlan,
                    inputs: Sequence[Any], target: Target, db: TuningDatabase | None,
                    trials: int, show_progress: bool, strict: bool,
                    compile_graphs: Callable[..., list[Any]]) -> DynamicModel:
    """Explore, compile every specialization met (tuning them together first if trials > 0),
    and return the model; later unseen shapes compile on first use. A host program that fails
    or disagrees with eager PyTorch on `inputs` gives `eager_model` instead."""
    name = type(model).__name__
    try:
        runners, stats, pending = explore_model(staged, plan, inputs, strict)
    except RewriteError as err:
        return eager_model(model, inputs, target, err, strict)

    def build_pending(items: list[Pending], tuning_trials: int) -> None:
        captured = capture_pending(items, name, strict)
        models = compile_graphs([c for _, _, c in captured], target, db, tuning_trials,
                                show_progress)
        for (runner, key, _), cm in zip(captured, models, strict=True):
            runner.add(key, cm)

    build_pending(pending, trials)
    for r in runners.values():
        r.compile_new = lambda runner, key, args: build_pending([(runner, key, args)], 0)
    info = identified(DynamicInfo(name, target.name, list(staged.params), stats,
                                  defaults=len(staged.defaults)), model)
    info.dynamo_graphs, info.dynamo_breaks = dynamo_explain(model, inputs)
    return DynamicModel(plan.source(), runners, info)


def tune_dynamic(model: torch.nn.Module, staged: Staged, plan: HostPlan,
                 inputs: Sequence[Any], target: Target, db: TuningDatabase, trials: int,
                 show_progress: bool, tune_graphs: Callable[..., SessionSummary]
                 ) -> SessionSummary:
    """One tuning session over the contraction workloads of every region specialization
    (none when the model will run in eager PyTorch)."""
    try:
        _, _, pending = explore_model(staged, plan, inputs, strict=False)
    except RewriteError as err:
        log.warning("%s: nothing to tune: %s", type(model).__name__, err)
        pending = []
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


# --------------------------------------------------------------------- eager fallback
def eager_model(model: torch.nn.Module, inputs: Sequence[Any], target: Target,
                err: Exception, strict: bool) -> DynamicModel:
    """The whole forward as one eager region, with one warning naming the line that made it
    so: for a model whose rewrite failed on the example inputs (RewriteError), or that could
    not be captured (CaptureError) while its forward branches on values. Any other capture
    error, or strict=True, raises."""
    cause = err.__cause__ if isinstance(err, CaptureError) and err.__cause__ else err
    if isinstance(err, CaptureError) and not branches_on_values(model, cause):
        raise err
    text = str(cause).splitlines()[0] if str(cause) else ""
    refusal = rewrite_refusal(model) if isinstance(err, CaptureError) else None
    not_rewritten = f"; hwaware did not rewrite its Python: {refusal}" if refusal else ""
    reason = (f"{type(model).__name__}.forward cannot be made static "
              f"({type(cause).__name__}: {text}){not_rewritten}, so all of it is one region")
    params, defaults = _call_params(model, len(inputs))
    info = RegionInfo("region_0", params, ["out"], where_raised(cause, model), WHOLE_FORWARD)
    runner = RegionRunner(info, _whole_forward, model)
    runner.mark_eager(reason, strict)
    required = len(params) - len(defaults)
    signature = ", ".join(params[:required] + [
        f"{p}={v!r}" for p, v in zip(params[required:], defaults, strict=True)])
    host = f"def forward({signature}):\n    out, = region_0({', '.join(params)})\n    return out"
    return DynamicModel(host, {"region_0": runner}, identified(DynamicInfo(
        type(model).__name__, target.name, params, ExploreStats(), defaults=len(defaults)),
        model))


WHOLE_FORWARD = "def region_0(self, *args):\n    return (self(*args),)"  # eager_model's region


def rewrite_refusal(model: torch.nn.Module) -> str | None:
    """Why the dynamic-network rewrite refused `model`'s forward (its source is not available,
    a decorator hides its code, it reads *args, ...), for the warning; None if it did not."""
    if type(model).__module__.startswith("torch."):
        return None
    try:
        stage(model)
    except StagingError as err:
        return str(err)
    except Exception:  # noqa: BLE001 - plan_model already logged it
        return None
    return None


def _whole_forward(root: torch.nn.Module, *args: Any) -> tuple[Any]:
    return (root(*args),)


def branches_on_values(model: torch.nn.Module, err: BaseException) -> bool:
    """Does the forward read tensor values into Python (by its source, or by the error)?"""
    if "data-dependent" in str(err) or "DataDependent" in type(err).__name__:
        return True
    try:
        return needs_inline(type(model).forward, model)
    except Exception:  # noqa: BLE001 - a source hwaware cannot read: not known to branch
        return False


def where_raised(err: BaseException, model: torch.nn.Module) -> str:
    """file:line of the user's code that raised `err` (the deepest frame in a file of the
    model's classes, or in a region hwaware generated from one), else of the forward."""
    files = {_source_file(c) for m in model.modules() for c in type(m).__mro__
             if not c.__module__.startswith(("torch.", "builtins"))}
    where = ""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for frame, line in traceback.walk_tb(e.__traceback__):
            name = frame.f_code.co_filename
            if name in files:
                where = f"{name}:{line}"
            elif name.startswith("<hwaware region_") and " from " in name:
                where = name.split(" from ", 1)[1].rstrip(">")
        e = e.__cause__ or e.__context__
    if where:
        return where
    fn = inspect.unwrap(type(model).forward)
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"<{type(model).__qualname__}.forward>"
    return f"{inspect.getsourcefile(fn) or code.co_filename}:{code.co_firstlineno}"


def _source_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except TypeError:  # a class defined in C
        return None


def _call_params(model: torch.nn.Module, n_inputs: int) -> tuple[list[str], list[Any]]:
    """Names of the forward's positional parameters and the defaults of the last ones (x0,
    x1, ... and none for a forward taking *args). Defaults that are not literals (None, numbers,
    strings) are left out, as the staged forward does: callers pass every argument then."""
    sig = inspect.signature(model.forward)
    ps = list(sig.parameters.values())
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in ps):
        return [f"x{i}" for i in range(n_inputs)], []
    defaults = [p.default for p in ps if p.default is not p.empty]
    literal = all(d is None or isinstance(d, (bool, int, str)) or
                  isinstance(d, float) and math.isfinite(d) for d in defaults)
    return [p.name for p in ps], defaults if literal else []
