"""TVM IR: importers, the fusion `compile_relax` runs, and workload helpers.

Goes in: a torch ExportedProgram or an ONNX ModelProto. Comes out: Relax functions and modules;
`fuse_for_tuning` runs exactly the passes MetaSchedule's `compile_relax` runs before looking a
kernel up in the database (the target's library dispatch, then the five legalize-and-fuse
passes: tuning anything else gives records that silently never apply); then the fused kernels
as MetaSchedule workloads, their structural hash (the database key), FLOPs and schedule rules.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms


def import_torch_program(exported: Any) -> relax.Function:
    """A torch.export ExportedProgram -> a Relax function with weights bound as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(exported, keep_params_as_input=False)
    return mod["main"]


def import_torch_program_unbound(exported: Any) -> relax.Function:
    """A torch.export ExportedProgram whose weights are parameters -> a Relax function taking
    them as its last parameters (after `num_input` inputs), to bind with `bind_weights`: one
    import serves every kernel of one structure (the layers of a deep model), where importing
    each costs about a second."""
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(exported, keep_params_as_input=True)["main"].without_attr(
        "params")


def weight_parameters(exported: Any) -> dict[str, Any]:
    """An ExportedProgram's parameters by the names its graph (and so the Relax function
    `import_torch_program_unbound` makes of it) gives their inputs."""
    kind = torch.export.graph_signature.InputKind.PARAMETER
    return {spec.arg.name: exported.state_dict[spec.target]
            for spec in exported.graph_signature.input_specs if spec.kind is kind}


def bind_weights(function: relax.Function, weights: dict[str, Any]) -> relax.Function:
    """`function` (from `import_torch_program_unbound`) with its weight parameters bound to
    `weights` (torch tensors by parameter name) as constants: what `import_torch_program`
    returns for the graph those weights come from. Raises KeyError for a parameter that
    `weights` lacks, ValueError for a shape or dtype that differs."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    first = int(function.attrs["num_input"])
    binding = {}
    for param in function.params[first:]:
        tensor = weights[param.name]
        shape, dtype = [int(d) for d in param.ty.shape], str(param.ty.dtype)
        if shape != list(tensor.shape) or dtype != str(tensor.dtype).removeprefix("torch."):
            raise ValueError(f"weight {param.name}: {list(tensor.shape)} {tensor.dtype} "
                             f"where the import has {shape} {dtype}")
        binding[param.name] = ExportedProgramImporter._convert_pytorch_tensor_to_tvm(tensor)
    if len(binding) != len(weights):
        raise KeyError(f"weights {sorted(set(weights) - set(binding))} are not parameters")
    bound = relax.transform.BindParams("main", binding)(tvm.IRModule({"main": function}))
    return bound["main"].without_attr("num_input")


def import_onnx(model: Any, shapes: dict[str, list[int]], dtypes: dict[str, str],
                name: str = "main") -> tvm.IRModule:
    """An ONNX ModelProto -> a Relax module whose entry function is `name`, weights bound as
    constants. The module may also hold TIR functions the importer emitted for some ops."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    functions = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    functions[tvm.ir.GlobalVar(name)] = mod["main"].with_attr("global_symbol", name)
    return tvm.IRModule(functions)


def _region_buffer(region: Any) -> str:
    """The name of the buffer a block read/write region touches."""
    return str(region.source.name)


def module_of_functions(functions: dict[str, relax.Function],
                        prims: dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc] | None = None
                        ) -> tvm.IRModule:
    """One IRModule holding each kernel as its own public Relax function (each with fresh
    variables: kernels that share a cached import must not share binding sites), and the TIR
    functions they call (`prims`, under the GlobalVars they are called by)."""
    from tvm.relax.utils import copy_with_new_vars

    entries: dict[Any, Any] = dict(prims or {})
    for name, fn in functions.items():
        entries[name] = copy_with_new_vars(fn).with_attr("global_symbol", name)
    return tvm.IRModule(entries)


def with_chain(mod: tvm.IRModule, name: str, inputs: list[tuple[int, list[int], str]],
               calls: list[tuple[str, list[int], list[int]]], outputs: list[int]) -> tvm.IRModule:
    """`mod` (a module of kernel functions) plus a public Relax function `name` that calls them
    in order: one VM call runs the whole program, each kernel still built and scheduled as its
    own function (fused families included). Values are numbered: `inputs` are the function's
    parameters (number, shape, dtype), each of `calls` is (kernel function, numbers of its
    arguments, numbers of its results), `outputs` the numbers it returns, as a tuple."""
    builder = relax.BlockBuilder(mod)
    params = [relax.Var(f"in{number}", relax.TensorType(shape, dtype))
              for number, shape, dtype in inputs]
    with builder.function(name, params):
        values = {number: param for (number, _, _), param in zip(inputs, params, strict=True)}
        for kernel, arguments, results in calls:
            callee = builder.get().get_global_var(kernel)
            relax.expr._update_type(callee, builder.get()[callee].ty)  # a Relax call needs it
            result = builder.emit(relax.Call(callee, [values[a] for a in arguments]))
            if isinstance(result.ty, relax.TupleType):
                for i, number in enumerate(results):
                    values[number] = builder.emit(relax.TupleGetItem(result, i))
            else:
                (number,) = results
                values[number] = result
        builder.emit_func_output(relax.Tuple([values[o] for o in outputs]))
    chained = builder.get()
    chained[name] = chained[name].with_attr("global_symbol", name)
    return chained


def prim_funcs_by_var(mod: tvm.IRModule) -> dict[tvm.ir.GlobalVar, tvm.tirx.PrimFunc]:
    """A module's TIR functions, keyed by the GlobalVars its Relax functions call them by."""
    return {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


# ------------------------------------------------------------------------- fusion
def fuse_for_tuning(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalize and fuse exactly as `compile_relax` does, so tuned records match at build."""
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(fuse_passes(target))(mod)


def fuse_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """The target's library dispatch, then legalization and fusion. Sort and scan ops
    (`R.cumsum`, `R.sort`, `R.topk`, ...) have no legalization: the dispatch passes lower them
    to TOPI kernels; without them they reach VM codegen, which cannot emit them."""
    return [*_dispatch_passes(target), *_legalize_passes()]


def _dispatch_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    from tvm.relax import pipeline as relax_pipeline

    try:
        return list(relax_pipeline.library_dispatch_passes(target))
    except ValueError:  # no per-target pipeline registered: the generic dispatch passes
        return [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()]


def _legalize_passes() -> list[tvm.transform.Pass]:
    return [
        relax.transform.LegalizeOps(customize_legalize_map=FAST_LEGALIZATIONS),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def _float32_legalization(op: str, compute: Any) -> Any:
    """A legalization of the unary `op` by the TE `compute` for float32, and as TVM legalizes it
    for other dtypes. LLVM makes `erf` and `tanh` scalar libm calls per element; TVM's rational
    `fast_erf` (within 5e-7 of erf) and `fast_tanh` (within 5 ulp, 3e-7, of PyTorch's) vectorize:
    the scalar calls cost a 196x192x768 Linear's GELU epilogue more than its matmul, and
    GPT-2's 8x128 GELU (tanh form) twice its matmul."""

    def legalize(bb: Any, call: Any) -> Any:
        if str(call.ty.dtype) != "float32":
            return _tvm_legalization(op)(bb, call)
        return bb.call_te(compute, call.args[0], primfunc_name_hint=op.rpartition(".")[2])

    return legalize


def _const(v: float) -> Any:
    return tvm.tirx.const(v, "float32")


def _gelu_erf(t: Any) -> Any:
    from tvm import topi

    return t * (_const(0.5) + topi.fast_erf(t * _const(0.5**0.5)) * _const(0.5))


def _gelu_tanh(t: Any) -> Any:
    """`nn.GELU(approximate="tanh")`, written as TVM writes it."""
    import math

    from tvm import topi

    inner = _const(math.sqrt(2.0 / math.pi)) * t * (_const(1.0) + _const(0.044715) * t * t)
    return _const(0.5) * t * (_const(1.0) + topi.fast_tanh(inner))


def _topi(name: str) -> Any:
    def compute(t: Any) -> Any:
        from tvm import topi

        return getattr(topi, name)(t)

    return compute


def _tvm_legalization(op: str) -> Any:
    return tvm.ir.Op.get(op).get_attr("FLegalize")


FAST_LEGALIZATIONS = {
    "relax.nn.gelu": _float32_legalization("relax.nn.gelu", _gelu_erf),
    "relax.nn.gelu_tanh": _float32_legalization("relax.nn.gelu_tanh", _gelu_tanh),
    "relax.erf": _float32_legalization("relax.erf", _topi("fast_erf")),
    "relax.tanh": _float32_legalization("relax.tanh", _topi("fast_tanh")),
}


def prim_funcs(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def workload_of(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The MetaSchedule workload for one fused kernel (the same normalisation MS applies)."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def workload_hash(workload: tvm.IRModule) -> str:
    return str(tvm_ffi.structural_hash(workload))


def workload_json(workload: tvm.IRModule) -> str:
    return json.dumps(ms.database.Workload(workload).as_json())


def workload_flops(workload: tvm.IRModule) -> int:
    """Floating-point operations of one run of a workload (0 where TVM cannot count them)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return int(estimate_tir_flops(workload))
    except Exception:  # informational only: the analysis rejects some loop nests
        return 0


def schedule_rules(func: tvm.tirx.PrimFunc) -> set[str]:
    """The schedule spaces a TIR function's blocks name (their `schedule_rule` annotations, as
    a fused kernel family sets them; "None", which only opts a block out, left out)."""
    return set(re.findall(r'"schedule_rule": "([^"]+)"', func.script())) - {"None"}


def has_custom_schedule_rule(workload: tvm.IRModule) -> bool:
    """Whether the workload names its own schedule space: such a kernel is tuned whatever its
    anchor block looks like."""
    return any(schedule_rules(f) for f in prim_funcs(workload).values())


def is_contraction(workload: tvm.IRModule) -> bool:
    """Whether a fused kernel's anchor block (its reduction with the most flops) reads two or more
    buffers, as convolutions and matmuls do: such a kernel needs a tuned schedule."""
    from tvm.s_tir.analysis import find_anchor_sblock

    anchor = find_anchor_sblock(workload)
    return anchor is not None and len({_region_buffer(r) for r in anchor.reads}) >= 2


def plain_json(obj: Any) -> Any:
    """TVM containers and immediates (Array, Map, IntImm, ...) -> plain JSON-able Python."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):
        return obj.value
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {str(plain_json(k)): plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or hasattr(obj, "__iter__"):
        return [plain_json(x) for x in obj]
    return str(obj)
