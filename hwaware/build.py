"""Stage 5, build: kernels -> one TVM library, and a measured choice of implementation per kernel.

Goes in: a `Partition`, the target, the tuning database and example inputs. Comes out: a
`CompiledModel`. For each kernel:
1. import its small FX graph into Relax (a kernel that fails to import stays in PyTorch);
   kernels of one structure (a deep model's repeated layers) share one import, into which
   each one's weights are bound (`ImportCache`);
2. a kernel whose contraction has no tuned record stays in PyTorch (TVM without a schedule is
   ~25x slower than eager; PyTorch's own kernel is the sensible default), unless a default
   schedule serves it untuned (a small kernel, a dense matmul: `schedules.has_default_schedule`);
3. build the rest into one library: tuned records from the database, a rule-based default
   schedule for element-wise and reduction kernels. The best record of each workload is first
   run against the workload's unscheduled definition on random inputs (`hwaware.tvm.check`:
   rtol 1e-3, atol 1e-4 scaled by the largest output magnitude, in a worker process): one that
   differs, crashes or hangs is excluded (one warning naming it) and the next best is used.
   If that build fails, the kernels that fail to build stay in PyTorch (one warning naming
   their ops) and the rest are built again;
4. run each TVM kernel on the real intermediate values of the example inputs: a result that
   differs from PyTorch's (or an error) keeps the kernel in PyTorch (with a warning); otherwise
   time both, interleaved, and keep the faster. Every timing goes into the database. Kernels
   of one signature (the same ops on the same shapes) are timed once, each checked.
5. a fused family kernel kept in PyTorch (wrong, or not faster) is dissolved: its ops are
   partitioned again as ordinary kernels and steps 1-4 run on them, so the group is no slower
   than the unfused build (rather than running as its PyTorch ops one by one).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import operator
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from hwaware import onednn
from hwaware.db import TuningDatabase
from hwaware.index_guard import whole_program_checks
from hwaware.kernels import families, fixed_schedules, unique_name
from hwaware.partition import CONTRACTIONS, VIEW_OPS, Partition
from hwaware.program import KernelSpec, KernelStep, OpStep, Program
from hwaware.runner import Timing, time_until_clear
from hwaware.runtime import (
    BuildInfo,
    CompiledModel,
    channels_last_slots,
    kernel_inputs,
    run_kernel_in_torch,
)
from hwaware.target import Target

log = logging.getLogger(__name__)

FUSED_FAMILIES = set(families())
CONTRACTION_FAMILIES = set(CONTRACTIONS.values()) | FUSED_FAMILIES
# A kernel moves to TVM only when clearly faster: each switch between PyTorch and TVM costs
# (their thread pools disturb each other), and timings on a shared machine are noisy.
MARGIN = 0.1
# Where to choose by: the lower quartile of the timings. Noise on a shared VM only adds time,
# in phases of seconds; medians of three blocks, one in a slow phase, sent the fused ResNet
# basic block (1.2x its PyTorch ops in the other runs) to PyTorch in one bench run of three.
DECISION_QUANTILE = 0.25
ONE_CALL = "k_whole"  # the kernel (and TVM function) of a model run as one TVM call
CHAINED = "chained"  # the plan that runs every kernel of the library in one TVM call
KERNEL_CALLS = "kernel-calls"  # the chosen kernel-by-kernel program, timed beside one-call plans
US = operator.attrgetter("us")  # of a runner.Timing


class KernelMismatchWarning(UserWarning):
    """A TVM kernel's output differed from PyTorch's; the kernel runs in PyTorch instead."""


class KernelFallbackWarning(UserWarning):
    """TVM could not import, build or run a kernel; the kernel runs in PyTorch instead."""


@dataclass
class KernelTasks:
    """A kernel imported into Relax, with the fused TIR workloads its build will contain."""

    function: Any
    workloads: dict[str, Any]  # workload hash -> IRModule
    heavy: set[str]  # hashes of workloads holding a contraction
    prim_funcs: dict[Any, Any] = field(default_factory=dict)  # GlobalVar -> PrimFunc it calls
    fused: bool = False  # a fused family kernel: its family's fixed schedule when untuned
    builds: bool = True  # False once TVM failed to build it alone: later builds leave it out


@dataclass
class ImportCache:
    """Imports kept across a build's re-partitions: each kernel's (`_import_key`), and each
    kernel structure's with its weights left as parameters (`_structure_key`), into which the
    weights of every kernel of that structure are bound (`ir.bind_weights`): TVM's importer
    takes about a second a kernel, and a deep model repeats a few structures many times."""

    kernels: dict[Any, KernelTasks | None] = field(default_factory=dict)
    structures: dict[Any, Any] = field(default_factory=dict)


def import_kernels(part: Partition, inputs: dict[str, list[Any]], target: Target,
                   cache: ImportCache | None = None) -> dict[str, KernelTasks]:
    """Each kernel graph -> Relax function + its fused workloads. Failures stay in PyTorch.
    Kernels with the same signature and weights (the same kernel in a re-partition) are
    imported once, kernels of one structure with other weights bound into one import
    (`ImportCache`)."""
    cache = ImportCache() if cache is None else cache
    imported = {}
    for name, graph in part.kernel_graphs.items():
        key = _import_key(part.program.kernels[name], graph)
        if key not in cache.kernels:
            cache.kernels[key] = _import_kernel(part, name, graph, inputs[name], target,
                                                cache.structures)
        kernel = cache.kernels[key]
        if kernel is not None:
            imported[name] = kernel
    return imported


def _import_key(spec: KernelSpec, graph: Any) -> tuple[Any, ...]:
    """What makes two kernels one import: their structure (`_structure_key`) and their
    weights (their storage tells)."""
    return (*_structure_key(spec, graph), tuple(b.data_ptr() for b in graph.buffers()))


def _structure_key(spec: KernelSpec, graph: Any) -> tuple[Any, ...]:
    """What makes two kernels one import but for their weights: the signature names ops and
    shapes, not which of their values leave the kernel (the same RMSNorm returns its
    normalized input or not, depending on the graph around it) nor which weights are one
    tensor."""
    position = {step.out: i for i, step in enumerate(spec.steps)}
    storages = [b.data_ptr() for b in graph.buffers()]
    return (spec.signature, tuple(position.get(slot) for slot in spec.outputs),
            tuple(storages.index(ptr) for ptr in storages))


def _import_kernel(part: Partition, name: str, graph: Any, inputs: list[Any], target: Target,
                   structures: dict[Any, Any]) -> KernelTasks | None:
    from hwaware.tvm import ir

    spec = part.program.kernels[name]
    graph, inputs = on_cpu(graph, inputs)
    try:
        module = _lower_fused(spec.family, graph, inputs, target) \
            if spec.family in FUSED_FAMILIES else _lower_torch(
                graph, inputs, structures, _structure_key(spec, graph))
        workloads, heavy = _workloads(module, spec.family, _tvm_target(target))
    except Exception as err:  # the importer and the lowerings raise many error types
        warn_fallback(part.program, {name: err}, "could not be imported into TVM")
        return None
    return KernelTasks(module["main"], workloads, heavy, ir.prim_funcs_by_var(module),
                       spec.family in FUSED_FAMILIES)


def _workloads(module: Any, family: str, tgt: Any) -> tuple[dict[str, Any], set[str]]:
    """The fused TIR workloads of a kernel's module by hash, and the hashes of those that need
    a schedule of their own (a contraction, or a fused family's schedule space)."""
    from hwaware.tvm import ir

    workloads, heavy = {}, set()
    for func in ir.prim_funcs(ir.fuse_for_tuning(module, tgt)).values():
        workload = ir.workload_of(func)
        key = ir.workload_hash(workload)
        workloads[key] = workload
        if family in FUSED_FAMILIES and ir.has_custom_schedule_rule(workload) or \
                family in CONTRACTION_FAMILIES and ir.is_contraction(workload):
            heavy.add(key)
    return workloads, heavy


def warn_fallback(program: Program, errors: dict[str, BaseException], what: str) -> None:
    """One warning for kernels that stay in PyTorch because TVM failed on them: each kernel
    by name and ops, and the first error. (A fused family kernel is then built unfused.)"""
    if not errors:
        return
    kernels = "; ".join(f"{name} ({', '.join(kernel_ops(program.kernels[name]))})"
                        for name in errors)
    err = next(iter(errors.values()))
    first_line = next((line for line in str(err).splitlines() if line.strip()), "")
    fused = any(program.kernels[name].family in FUSED_FAMILIES for name in errors)
    log.debug("kernels %s %s: %s", list(errors), what, err)
    warnings.warn(f"hwaware: kernel(s) {kernels} {what} ({type(err).__name__}: "
                  f"{first_line[:200]}); they run in PyTorch"
                  f"{', a fused kernel as ordinary kernels' if fused else ''}",
                  KernelFallbackWarning, stacklevel=4)


def kernel_ops(spec: KernelSpec) -> list[str]:
    """The distinct ops a kernel computes, in order (views and tuple indexing left out, unless
    the kernel has nothing else)."""
    ops = list(dict.fromkeys(step.op for step in spec.steps))
    return [op for op in ops if op not in VIEW_OPS] or ops


def on_cpu(graph: Any, inputs: list[Any]) -> tuple[Any, list[Any]]:
    """The graph and its example inputs as the importers need them: on the CPU. Its tensors
    become constants of the library (a GPU's VM copies them over when it loads), and TVM
    hashes and serializes constants only from host memory. A graph already there is returned
    as is; else a copy, so the model's own graph stays on its device."""
    tensors = [*inputs, *(operator.attrgetter(n.target)(graph) for n in graph.graph.nodes
                          if n.op == "get_attr")]
    if all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor)):
        return graph, inputs
    graph = copy.deepcopy(graph)
    for node in graph.graph.nodes:
        value = operator.attrgetter(node.target)(graph) if node.op == "get_attr" else None
        if isinstance(value, torch.Tensor):
            owner, _, attr = node.target.rpartition(".")
            module = graph.get_submodule(owner) if owner else graph
            value = value.detach().cpu()
            if attr in module._parameters:
                module._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
            elif attr in module._buffers:
                module._buffers[attr] = value
            else:
                setattr(module, attr, value)
    return graph, [x.cpu() if isinstance(x, torch.Tensor) else x for x in inputs]


def _lower_torch(graph: Any, inputs: list[Any], structures: dict[Any, Any], key: Any) -> Any:
    """An ordinary kernel: torch.export, then TVM's importer, once per structure `key` with
    the weights as parameters, each kernel's weights then bound into that import. Where the
    importer takes no weights as parameters (an op whose conversion needs a constant), the
    kernel is imported with its weights, as one of its own."""
    from hwaware.tvm import ir

    if structures.get(key, True) is not None:
        try:
            exported = _exported(_weights_as_parameters(graph), inputs)
            if key not in structures:
                structures[key] = ir.import_torch_program_unbound(exported)
            bound = ir.bind_weights(structures[key], ir.weight_parameters(exported))
            return ir.module_of_functions({"main": bound})
        except Exception as err:  # the importer raises many error types
            log.debug("kernel imported with its weights bound by TVM's importer: %s", err)
            structures.setdefault(key, None)
    return ir.module_of_functions({"main": _import_into_tvm(graph, inputs)})


def _weights_as_parameters(graph: Any) -> Any:
    """The kernel graph with its weights (buffers) as parameters, which TVM's importer can
    leave unbound."""
    root = torch.nn.Module()
    for name, value in graph.named_buffers():
        root.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
    return torch.fx.GraphModule(root, copy.deepcopy(graph.graph))


def _import_into_tvm(graph: Any, inputs: list[Any]) -> Any:
    """A graph -> a Relax function with its weights as constants."""
    from hwaware.tvm import ir

    return ir.import_torch_program(_exported(graph, inputs))


def _exported(graph: Any, inputs: list[Any]) -> Any:
    """torch.export of a graph, with the index tensors computed at run time wrapped as
    PyTorch counts negative ones."""
    from hwaware.rewrite.negative_indices import runtime_indices_wrapped

    with torch.no_grad():
        return torch.export.export(runtime_indices_wrapped(graph), tuple(_own_storages(inputs)),
                                   strict=False)


def _own_storages(inputs: list[Any]) -> list[Any]:
    """The example inputs, each tensor on a storage of its own: torch.export of a graph two of
    whose inputs share one (a view of another input: GPT-2's position ids, once equal `arange`s
    were merged) made a guard function that TVM's re-export failed in ('NoneType' object has
    no attribute 'size')."""
    seen: set[int] = set()
    owned = []
    for value in inputs:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage().data_ptr()
            if storage in seen:
                value = value.clone()
            seen.add(storage)
        owned.append(value)
    return owned


def _lower_fused(family: str, graph: Any, inputs: list[Any], target: Target) -> Any:
    """A fused family kernel: the family's own TIR definition (`hwaware.kernels`)."""
    return families()[family].lower(graph, inputs, target, unique_name(family))


def build(part: Partition, target: Target, db: TuningDatabase | None,
          example_inputs: list[torch.Tensor], info: BuildInfo, measure: bool = True,
          repeats: int = 30) -> CompiledModel:
    """Build the library and choose, per kernel, TVM or PyTorch (see module docstring). A fused
    family kernel that differs from PyTorch or loses to it is dissolved, and its ops are built
    again as ordinary kernels (whose own TVM kernels may still win), not run op by op."""
    cache = ImportCache()
    while True:
        part, executable, one_call, unbuilt = _build_kernels(part, target, db, example_inputs,
                                                             info, measure, repeats, cache)
        if unbuilt:  # kernels TVM failed to build, cut around their contraction: build again
            part = part.split(unbuilt)
            continue
        lost = {k.signature: k for k in part.program.kernels.values()
                if k.family in FUSED_FAMILIES and k.impl == "torch"}
        if not lost:
            break
        for signature, spec in lost.items():
            info.dissolved[signature] = _why_left(spec)
            log.debug("fused kernel %s (%s) %s: built unfused", spec.name, signature,
                      info.dissolved[signature])
        part = part.dissolve(set(lost))
    program = part.program
    info.kernel_nodes = {name: list(nodes) for name, nodes in part.kernel_nodes.items()}
    on_onednn: list[str] = []
    if target.kind == "cpu" and target.can_run_here and measure:
        on_onednn = _choose_onednn(program, example_inputs, repeats)
    if executable is None or not target.can_run_here or not measure:
        return CompiledModel(program, executable, info, target.kind)
    _choose_whole_program(program, executable, info, target, example_inputs, repeats, on_onednn)
    chosen = CompiledModel(program, executable, info, target.kind)
    wholes = {CHAINED: _chained_model(chosen, target, example_inputs)}
    if one_call:
        wholes[ONE_CALL] = _one_call_model(part, chosen, _tvm_target(target),
                                           _adapter(db, target), info, target, example_inputs)
    return _fastest_call(chosen, {n: m for n, m in wholes.items() if m is not None},
                         example_inputs, repeats)


def _fastest_call(chosen: CompiledModel, wholes: dict[str, CompiledModel],
                  example_inputs: list[torch.Tensor], repeats: int) -> CompiledModel:
    """`chosen` (the kernels called one by one), or the fastest of the `wholes` (the model in
    one TVM call, by plan name) where it is `MARGIN` faster, timed interleaved."""
    if not wholes:
        return chosen
    info, names = chosen.info, list(wholes)
    times = time_until_clear([partial(m, *example_inputs) for m in (*wholes.values(), chosen)],
                             3 * repeats, DECISION_QUANTILE, MARGIN)
    for name, timing in zip([*names, KERNEL_CALLS], times, strict=True):
        info.plan_us[name], info.plan_spread[name] = timing.us, timing.spread
    best = min(range(len(names)), key=lambda i: times[i].us)
    if times[best].us * (1 + MARGIN) >= times[-1].us:
        return chosen
    whole = wholes[names[best]]
    whole.kernel_plan = CompiledModel(chosen.program, chosen.executable,
                                      replace(info, kernel_nodes=dict(info.kernel_nodes)),
                                      whole._device_kind)
    info.plan = names[best]
    info.kernel_nodes = {ONE_CALL: [n for nodes in info.kernel_nodes.values() for n in nodes]}
    return whole


def _build_kernels(part: Partition, target: Target, db: TuningDatabase | None,
                   example_inputs: list[torch.Tensor], info: BuildInfo, measure: bool,
                   repeats: int, cache: ImportCache) -> tuple[Partition, Any, bool, set[str]]:
    """Import, build and choose each kernel of `part` on its own: the partition the kernels
    came from (contractions without a schedule cut from their epilogues), the library (None if
    no kernel could go to TVM), whether the whole graph may be tried as one TVM call, and the
    signatures of kernels that failed to build and may be split (`Partition.split`)."""
    inputs = kernel_inputs(part.program, example_inputs)
    imported = import_kernels(part, inputs, target, cache)
    scheduled = {n: _has_schedules(k, db, target) for n, k in imported.items()}
    one_call = not part.host_ops and len(imported) == len(part.kernel_graphs) and all(
        scheduled.values()) and not any(
        k.family in FUSED_FAMILIES for k in part.program.kernels.values())  # it would unfuse
    untuned = {part.program.kernels[n].signature for n, ok in scheduled.items() if not ok}
    if untuned:  # run those contractions in PyTorch, their epilogues on TVM
        part = part.unfuse(untuned)
        inputs = kernel_inputs(part.program, example_inputs)
        imported = import_kernels(part, inputs, target, cache)
        scheduled = {n: _has_schedules(k, db, target) for n, k in imported.items()}
    program = part.program
    candidates = {n: k for n, k in imported.items() if k.builds and scheduled[n]}
    for spec in program.kernels.values():
        spec.impl = "torch"
    tgt = _tvm_target(target)
    splittable = {n for n in candidates if _splittable(program.kernels[n], part)}
    executable, built = _build_library(program, candidates, partial(
        _build_module, tgt=tgt, adapter=_adapter(db, target), info=info,
        chain=program if chainable(program) else None), quiet=splittable)
    unbuilt = {program.kernels[n].signature for n in splittable - set(built)}
    one_call = one_call and len(built) == len(imported)
    if executable is None:
        info.tuned_workloads = []
        return part, None, one_call, unbuilt
    if not target.can_run_here:
        for name in built:  # build-only target: the library is for the device
            program.kernels[name].impl = "tvm"
        return part, executable, one_call, unbuilt
    _choose_each(program, executable, list(built), inputs, db, target, measure, repeats)
    if db is not None:
        _commit_kernels(db, part, built, target)
    return part, executable, one_call, unbuilt


def _splittable(spec: KernelSpec, part: Partition) -> bool:
    """Whether a kernel that fails to build is cut around its contraction and built again: an
    ordinary kernel holding a contraction and other ops, not cut before."""
    ops = [s for s in spec.steps if s.op not in VIEW_OPS]
    return spec.family in CONTRACTIONS.values() and len(ops) > 1 and \
        spec.signature not in part.split_signatures


def _commit_kernels(db: TuningDatabase, part: Partition, built: dict[str, KernelTasks],
                    target: Target) -> None:
    """Each built kernel's schema (`decompose.KernelRecord`) and the TVM workloads it holds,
    beside the measurements `_choose` committed: what the latency predictor reads."""
    from hwaware.decompose import kernel_record
    from hwaware.tvm.setup import TVM_VERSION

    for name, kernel in built.items():
        record = kernel_record(part.program.kernels[name], part.kernel_graphs[name])
        db.commit_kernel(record, kernel.workloads, TVM_VERSION, target.key)


BuildFn = Callable[[dict[str, KernelTasks]], Any]  # kernels -> a library of them, or raises


def _build_library(program: Program, candidates: dict[str, KernelTasks], build_fn: BuildFn,
                   quiet: set[str] | None = None) -> tuple[Any, dict[str, KernelTasks]]:
    """The candidate kernels built into one library, and the kernels it holds (None and none
    if nothing built). When that build fails, halves of the kernels are built until each kernel
    that fails is found alone: those stay in PyTorch (one warning naming their ops; marked, so
    that later builds of this model leave them out) and the rest are built together again.
    Kernels that build apart but not together all stay in PyTorch. No warning names the
    `quiet` ones (the caller builds them again in pieces)."""
    if not candidates:
        return None, {}
    try:
        return build_fn(candidates), candidates
    except Exception as err:  # TVM's passes and codegens raise many error types
        failed = _failing_kernels(candidates, err, build_fn) or dict.fromkeys(candidates, err)
    rest = {n: k for n, k in candidates.items() if n not in failed}
    executable = None
    if rest:
        try:
            executable = build_fn(rest)
        except Exception as err:  # TVM's passes and codegens raise many error types
            failed.update(dict.fromkeys(rest, err))
            rest = {}
    for name in failed:
        candidates[name].builds = False
    warn_fallback(program, {n: e for n, e in failed.items() if n not in (quiet or ())},
                  "could not be built by TVM")
    return executable, rest


def _failing_kernels(kernels: dict[str, KernelTasks], error: BaseException, build_fn: BuildFn
                     ) -> dict[str, BaseException]:
    """Of `kernels`, whose library failed to build with `error`, the ones that fail in every
    half they are built in, with their errors (a bisection: a few builds find one bad kernel
    among many)."""
    if len(kernels) == 1:
        return {next(iter(kernels)): error}
    names = list(kernels)
    failed: dict[str, BaseException] = {}
    for half in (names[:len(names) // 2], names[len(names) // 2:]):
        subset = {n: kernels[n] for n in half}
        try:
            build_fn(subset)
        except Exception as err:  # TVM's passes and codegens raise many error types
            failed.update(_failing_kernels(subset, err, build_fn))
    return failed


def _build_module(kernels: dict[str, KernelTasks], tgt: Any, adapter: Any, info: BuildInfo,
                  chain: Program | None = None) -> Any:
    """One library of `kernels`, each a public function by its kernel name (records the tuned
    workloads it applied in `info`). With `chain` (a program of kernel steps only), when it
    holds every kernel of it, the library also has the function `ONE_CALL` calling them in the
    program's order (left out, with a debug message, where that does not build)."""
    from hwaware.tvm import ir

    mod = ir.module_of_functions({n: k.function for n, k in kernels.items()},
                                 {v: f for k in kernels.values() for v, f in k.prim_funcs.items()})
    if chain is not None and {s.kernel for s in chain.steps if isinstance(s, KernelStep)} \
            <= set(kernels):
        try:
            return _build_scheduled(ir.with_chain(mod, ONE_CALL, *_chain_of(chain)), tgt,
                                    adapter, info)
        except Exception as err:  # TVM's passes and codegens raise many error types
            log.debug("no chained build: %s", err)
    return _build_scheduled(mod, tgt, adapter, info)


def _build_scheduled(mod: Any, tgt: Any, adapter: Any, info: BuildInfo) -> Any:
    from hwaware.tvm import schedules

    executable, applied = schedules.build_executable(mod, tgt, adapter, fixed_schedules())
    info.tuned_workloads = sorted(applied)
    return executable


def chainable(program: Program) -> bool:
    """Whether `program` can run as one chain of its kernels: kernel steps only (no host op),
    and outputs that are neither inputs nor repeated (one TVM call returns fresh tensors)."""
    outputs = program.output_slots
    return all(isinstance(s, KernelStep) for s in program.steps) and \
        len(set(outputs)) == len(outputs) and not set(outputs) & set(program.input_slots)


def _chain_of(program: Program) -> tuple[list[tuple[int, list[int], str]],
                                         list[tuple[str, list[int], list[int]]], list[int]]:
    """`program`'s inputs, kernel calls and outputs as `ir.with_chain` takes them."""
    inputs = [(slot, list(spec["shape"]), str(spec["dtype"]))
              for slot, spec in zip(program.input_slots, program.input_specs, strict=True)]
    calls = [(s.kernel, list(s.inputs), list(s.outputs)) for s in program.steps
             if isinstance(s, KernelStep)]
    return inputs, calls, list(program.output_slots)


def _chained_model(chosen: CompiledModel, target: Target, example_inputs: list[torch.Tensor]
                   ) -> CompiledModel | None:
    """The model as one call of its library's chain of kernels (`ONE_CALL`, see
    `_build_module`): offered when every kernel passed its check against PyTorch (so each runs
    on TVM in it), kept if it matches PyTorch (None where the library has no chain)."""
    program = chosen.program
    if chosen.executable is None or not chainable(program) or \
            any(k.tvm_us is None for k in program.kernels.values()):
        return None
    whole = CompiledModel(_whole_program(program), chosen.executable, chosen.info, target.kind)
    try:
        got = whole.run_flat(list(example_inputs))
        matches = _all_close(got, run_kernel_in_torch(whole.program, ONE_CALL,
                                                      list(example_inputs)))
    except Exception as err:  # no chain in the library, or a VM error
        log.debug("no chained call: %s", err)
        return None
    return whole if matches else None


def _choose_each(program: Program, executable: Any, names: list[str],
                 inputs: dict[str, list[Any]], db: TuningDatabase | None, target: Target,
                 measure: bool, repeats: int) -> None:
    """Check and time each kernel of the library against PyTorch (`_choose`); a kernel whose
    check or timing raises stays in PyTorch."""
    from hwaware.tvm import vm as tvm_vm

    failed: dict[str, BaseException] = {}
    try:
        # on PyTorch's OpenMP team, as the compiled model will run them: on TVM's own pool, a
        # kernel timed right after PyTorch's ops shares its cores with spinning OpenMP threads
        vm = tvm_vm.make_vm(executable, target.kind, share_threads=True)
    except Exception as err:  # the VM refuses the library: every kernel stays in PyTorch
        failed = {name: err for name in names}
        names = []
    timed: dict[str, str] = {}  # signature -> the kernel whose timings stand for it
    for name in names:
        spec = program.kernels[name]
        try:
            call = tvm_vm.torch_callable(vm, name)
            twin = timed.get(spec.signature)
            if twin is None:
                _choose(program, name, call, inputs[name], db, target, measure, repeats)
            else:
                _choose_like(program, name, twin, call, inputs[name])
        except Exception as err:  # a kernel that raises on its example inputs
            spec.impl = "torch"
            failed[name] = err
        if spec.tvm_us is not None:
            timed.setdefault(spec.signature, name)
    warn_fallback(program, failed, "failed when run on TVM")


def _tvm_target(target: Target) -> Any:
    from hwaware.tvm import setup

    return setup.resolve(target).tvm


def _adapter(db: TuningDatabase | None, target: Target) -> Any:
    """The database as the build reads it: on a CPU target that runs here, every record it
    applies is first checked to compute its workload's outputs (`hwaware.tvm.check`); a wrong
    one is excluded with a warning and the next best is applied instead."""
    from hwaware.tvm import database, setup

    if db is None:
        return None
    return database.SqliteDatabase.checked(db, setup.resolve(target))


def _why_left(spec: KernelSpec) -> str:
    """Why a fused kernel runs in PyTorch, for `BuildInfo.dissolved`."""
    if spec.tvm_us is not None and spec.torch_us is not None:
        return f"not faster than PyTorch ({spec.tvm_us:.0f} vs {spec.torch_us:.0f} us)"
    return "did not build, or differs from PyTorch"


def _one_call_model(part: Partition, chosen: CompiledModel, tgt: Any, adapter: Any,
                    info: BuildInfo, target: Target, example_inputs: list[torch.Tensor]
                    ) -> CompiledModel | None:
    """The whole graph as ONE TVM function: one VM call per inference instead of one per
    kernel, which is what counts for small batch-1 graphs (a gate, an exit head, an MLP).
    Offered only when every op imports and builds and every contraction has a schedule (tuned,
    or small enough for the default one); kept only if it matches PyTorch (and None whenever a
    step of it raises)."""
    program = chosen.program
    if not chainable(program):
        return None
    try:
        executable, got = _build_one_call(part, tgt, adapter, target, example_inputs,
                                          len(program.output_slots))
        whole = _whole_program(program)
        matches = _all_close(got, run_kernel_in_torch(whole, ONE_CALL, list(example_inputs)))
    except Exception as err:  # the importer and the build raise many error types
        log.debug("no one-call build: %s", err)
        return None
    if not matches:
        log.debug("one-call build differs from PyTorch; not used")
        return None
    return CompiledModel(whole, executable, info, target.kind)


def _build_one_call(part: Partition, tgt: Any, adapter: Any, target: Target,
                    example_inputs: list[torch.Tensor], num_outputs: int
                    ) -> tuple[Any, list[Any]]:
    """The captured graph imported and built as one TVM function, and its outputs on the
    example inputs."""
    from hwaware.tvm import ir, schedules
    from hwaware.tvm import vm as tvm_vm

    function = _import_into_tvm(*on_cpu(part.captured.graph_module, example_inputs))
    executable, _ = schedules.build_executable(
        ir.module_of_functions({ONE_CALL: function}), tgt, adapter)
    call = tvm_vm.torch_callable(tvm_vm.make_vm(executable, target.kind), ONE_CALL,
                                     num_outputs)
    return executable, call(*example_inputs)


def redecide(model: CompiledModel, example_inputs: list[Any], repeats: int = 30) -> None:
    """Choose again, on this machine, where each kernel of a built or loaded model runs: every
    kernel its library holds (those that passed the build's check) is checked and timed
    against its PyTorch ops here, then the whole-model check runs again. The choices a saved
    model carries were timed where it was compiled, on a machine that may have been busy or of
    another CPU kind. Raises ValueError when there is nothing to re-time here."""
    target = model.info.built_for()
    if model.executable is None:
        raise ValueError("this model has no TVM kernels: every kernel runs in PyTorch already")
    if not target.can_run_here:
        raise ValueError(f"its kernels are built for target {target.name}, which cannot run "
                         "on this machine")
    program = model.program
    names = [k.name for k in program.kernels.values() if k.impl == "tvm" or k.tvm_us is not None]
    inputs = kernel_inputs(program, example_inputs)
    _choose_each(program, model.executable, names, inputs, None, target, True, repeats)
    _choose_whole_program(program, model.executable, model.info, target, example_inputs,
                          repeats)


def _choose_onednn(program: Program, example_inputs: list[torch.Tensor], repeats: int
                   ) -> list[str]:
    """Each kernel left in PyTorch that oneDNN can run (`onednn.takes`: a convolution or linear
    layer of a constant weight, with its epilogue) runs through oneDNN where that matches its
    PyTorch ops and is `MARGIN` faster, timed interleaved (`torch_us`: the PyTorch ops' time).
    Chosen from the last kernel back, so that each kernel's readers are decided: a result
    PyTorch reads is timed with its conversion from channels-last (`onednn` module docstring).
    Returns the kernels that oneDNN runs correctly, chosen or not."""
    order = [s.kernel for s in reversed(program.steps) if isinstance(s, KernelStep)]
    names = [n for n in dict.fromkeys(order) if program.kernels[n].impl == "torch"
             and onednn.takes(program.kernels[n], program.constants)]
    if not names:
        return []
    inputs = kernel_inputs(program, example_inputs)
    correct: list[str] = []
    timed: dict[tuple[str, bool], str] = {}  # (signature, layout kept) -> the kernel timed
    for name in names:
        spec = program.kernels[name]
        keep = set(spec.outputs) <= channels_last_slots(program)
        call = onednn.kernel_function(spec, program.constants, keep_channels_last=keep)
        twin = timed.get((spec.signature, keep))
        with torch.no_grad():
            try:
                ok = _matches_pytorch(program, name, call, inputs[name])
                timing = _timed_against_pytorch(program, name, call, inputs[name], repeats) \
                    if ok and twin is None else None
            except Exception as err:  # oneDNN refuses it: the kernel stays in PyTorch
                log.debug("kernel %s stays in PyTorch: oneDNN raised %s", name, err)
                continue
        if timing is not None:
            ours, theirs = timing
            spec.torch_us, spec.torch_spread = theirs.us, theirs.spread
            spec.impl = onednn.IMPL if _faster(ours.us, theirs.us) else "torch"
            timed[spec.signature, keep] = name
        elif ok and twin is not None:  # a repeated layer: placed as its twin (`_choose_like`)
            done = program.kernels[twin]
            spec.impl, spec.torch_us, spec.torch_spread = done.impl, done.torch_us, \
                done.torch_spread
        correct += [name] if ok else []
    return correct


def _whole_program(program: Program) -> Program:
    """`program` as one kernel, `ONE_CALL`, whose PyTorch steps are all of its steps."""
    torch_steps: list[OpStep] = []
    for step in program.steps:
        torch_steps += [step] if isinstance(step, OpStep) else program.kernels[step.kernel].steps
    parts = "|".join(program.kernels[s.kernel].signature if isinstance(s, KernelStep)
                     else s.op for s in program.steps)
    signature = "whole:" + hashlib.sha256(parts.encode()).hexdigest()[:16]
    spec = KernelSpec(ONE_CALL, "whole", signature, program.input_slots,
                      program.output_slots, torch_steps, impl="tvm",
                      flops=sum(k.flops for k in program.kernels.values()),
                      index_checks=whole_program_checks(program))
    return replace(program, steps=[KernelStep(ONE_CALL, program.input_slots,
                                              program.output_slots)],
                   kernels={ONE_CALL: spec})


def _choose_whole_program(program: Program, executable: Any, info: BuildInfo, target: Target,
                          example_inputs: list[torch.Tensor], repeats: int,
                          on_onednn: Collection[str] = ()) -> None:
    """Time the whole model under each assignment and keep the fastest: each kernel's own
    choice, every verified kernel on TVM, everything in PyTorch, and (given `on_onednn`, the
    kernels oneDNN runs correctly) each of the first two with those on oneDNN. Kernels
    timed one by one miss how the two runtimes' thread pools disturb each other inside one
    inference (PyTorch's OpenMP threads spin after each op and slow the next TVM kernel), and
    that consecutive oneDNN kernels pass channels-last results; the whole program shows it."""
    verified = [k.name for k in program.kernels.values() if k.tvm_us is not None]
    if not verified:
        return
    per_kernel = {k.name: k.impl for k in program.kernels.values()}
    plans = {
        "per-kernel": per_kernel,
        "all-tvm": {**per_kernel, **{n: "tvm" for n in verified}},
        "all-torch": {n: onednn.IMPL if impl == onednn.IMPL else "torch"
                      for n, impl in per_kernel.items()},
    }
    for name in ("per-kernel", "all-tvm"):  # consecutive oneDNN kernels pass channels-last
        plan = {**plans[name], **{n: onednn.IMPL for n in on_onednn}}
        if plan not in plans.values():
            plans[f"{name}-onednn"] = plan
    models = [CompiledModel(_with_impls(program, plan), executable, info, target.kind)
              for plan in plans.values()]
    times = time_until_clear([partial(m, *example_inputs) for m in models], 3 * repeats,
                             DECISION_QUANTILE)
    info.plan_us = {name: t.us for name, t in zip(plans, times, strict=True)}
    info.plan_spread = {name: t.spread for name, t in zip(plans, times, strict=True)}
    best = min(plans, key=lambda name: info.plan_us[name])
    for name, impl in plans[best].items():
        program.kernels[name].impl = impl
    info.plan = best


def _with_impls(program: Program, impls: dict[str, str]) -> Program:
    kernels = {n: replace(k, impl=impls[n]) for n, k in program.kernels.items()}
    return replace(program, kernels=kernels)


def _has_schedules(kernel: KernelTasks, db: TuningDatabase | None, target: Target) -> bool:
    """Every contraction of the kernel has a tuned record, or a default schedule that needs
    no tuning (`schedules.has_default_schedule`: small, a dense matmul, a small conv), or the
    kernel is a fused family kernel with its family's fixed-decision schedule."""
    from hwaware.tvm.schedules import has_default_schedule
    from hwaware.tvm.setup import TVM_VERSION

    return kernel.fused or all(
        db is not None and db.top_records(h, TVM_VERSION, target.key, 1)
        or has_default_schedule(kernel.workloads[h], _tvm_target(target))
        for h in kernel.heavy
    )


def _choose(program: Program, name: str, call: Callable[..., list[Any]], inputs: list[Any],
            db: TuningDatabase | None, target: Target, measure: bool, repeats: int) -> None:
    spec = program.kernels[name]
    if not _matches_pytorch(program, name, call, inputs):
        _warn_mismatch(spec)
        return
    if not measure:
        spec.impl = "tvm"
        return
    tvm, torch_side = _timed_against_pytorch(program, name, call, inputs, repeats)
    spec.tvm_us, spec.torch_us = tvm.us, torch_side.us
    spec.tvm_spread, spec.torch_spread = tvm.spread, torch_side.spread
    spec.impl = "tvm" if _tvm_wins(tvm.us, torch_side.us) else "torch"
    if db is not None:
        db.commit_kernel_measurement(spec.signature, target.key, "tvm", tvm.us, spec.family)
        db.commit_kernel_measurement(spec.signature, target.key, "torch", torch_side.us,
                                     spec.family)


def _choose_like(program: Program, name: str, twin: str, call: Callable[..., list[Any]],
                 inputs: list[Any]) -> None:
    """Kernel `name` placed as the kernel `twin` of the same signature was (the same ops on
    the same shapes, other weights: a repeated layer), after its own check against PyTorch:
    timing it again would time the same code on the same shapes. A model of 12 identical
    layers is timed once per distinct kernel, not 12 times."""
    spec, done = program.kernels[name], program.kernels[twin]
    if not _matches_pytorch(program, name, call, inputs):
        _warn_mismatch(spec)
        return
    spec.impl, spec.tvm_us, spec.torch_us = done.impl, done.tvm_us, done.torch_us
    spec.tvm_spread, spec.torch_spread = done.tvm_spread, done.torch_spread


def _warn_mismatch(spec: KernelSpec) -> None:
    warnings.warn(f"hwaware: TVM kernel {spec.name} ({spec.family}) differs from PyTorch; "
                  "it runs in PyTorch", KernelMismatchWarning, stacklevel=4)


def _matches_pytorch(program: Program, name: str, call: Callable[..., list[Any]],
                     inputs: list[Any]) -> bool:
    """Whether `call` (another implementation of kernel `name`) gives its PyTorch ops'
    outputs on `inputs` (`_all_close`)."""
    with full_fp32():
        expected = run_kernel_in_torch(program, name, inputs)
    return _all_close(call(*inputs), expected)


def _timed_against_pytorch(program: Program, name: str, call: Callable[..., list[Any]],
                           inputs: list[Any], repeats: int) -> tuple[Timing, Timing]:
    """`call` and kernel `name`'s PyTorch ops timed interleaved until the choice is clear
    (`time_until_clear`); a loss is timed again, each side keeping its best."""
    sides = [lambda: call(*inputs), lambda: run_kernel_in_torch(program, name, inputs)]
    ours, theirs = time_until_clear(sides, repeats, DECISION_QUANTILE, MARGIN)
    if not _faster(ours.us, theirs.us):
        again = time_until_clear(sides, repeats, DECISION_QUANTILE, MARGIN)
        ours, theirs = min(ours, again[0], key=US), min(theirs, again[1], key=US)
    return ours, theirs


def _tvm_wins(tvm_us: float, torch_us: float) -> bool:
    """Whether a TVM kernel is clearly faster than its ops in PyTorch (`_faster`)."""
    return _faster(tvm_us, torch_us)


def _faster(ours_us: float, torch_us: float) -> bool:
    """Whether a kernel's TVM (or oneDNN) code is clearly (MARGIN) faster than its ops in
    PyTorch. The timings come from `time_until_clear`: a near-tie or a noisy side is timed
    again, more interleaved, before a choice stands (noise on a shared machine only adds time,
    in phases that can hit one side's blocks alone: the fused ResNet basic block, 1.1-1.4x
    faster than its PyTorch ops in four bench runs, timed 0.61x in a fifth and was
    dissolved)."""
    return ours_us * (1 + MARGIN) < torch_us


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """PyTorch on the GPU without TF32 (cuDNN convolutions use it by default: ~1e-3 relative
    error), so that the reference a TVM kernel is checked against is FP32 like the kernel."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def _all_close(got: list[Any], expected: list[Any]) -> bool:
    """A kernel's outputs against its PyTorch ops': the same check as `hwaware.verify` (an
    absolute tolerance scaled by the largest value: ResNet-50's eight last fused blocks, with
    outputs up to 43,000 under random weights, differed from PyTorch by at most 8e-7 times
    their largest value, float32 rounding, and were refused at a flat 1e-4)."""
    from hwaware.verify import leaf_difference

    return len(got) == len(expected) and all(
        leaf_difference(g, e) is None for g, e in zip(got, expected, strict=True))
