"""ONNX frontend: an ONNX file gets the same tuning, database and runtime as a PyTorch model.

Stage: replaces 1-3 (capture, rewrite, partition) for ONNX files, then joins 4-6. Goes in: the
path of an `.onnx` file (weights inline, or as external data beside it), a target, the tuning
database and a trial budget. Comes out: a `CompiledModel` (torch tensors in and out, `save` and
`hwaware.load` as for any model) or a `SessionSummary`.

First the graph's constants are folded for the static input shapes (`onnx_fold.py`): exporters
compute shapes at run time, and TVM's importer mishandles some of those chains. Then the whole
graph becomes one kernel of the host program. It has no PyTorch steps, so it runs on TVM. Its
fused contraction workloads (convolutions, matmuls) are the tuning tasks. The session in
`tune.py` tunes them and writes the records to the same database as PyTorch models' kernels.

Where TVM cannot import or build the graph, `compile_onnx` still returns a correct model: the one
kernel then runs on ONNX's reference evaluator (`onnx_reference.py`, un-accelerated), with one
warning naming the op and TVM's error. The build runs in a child process stopped after
`BUILD_TIMEOUT_S` (environment variable `HWAWARE_ONNX_BUILD_TIMEOUT_S`, default 600): a kernel
LLVM cannot finish must never hang the user's program; that too falls back, with one warning.
`tune_onnx` raises instead: there is nothing to tune.

Security: a tensor stored as external data may only name a file inside the model's folder. Every
location is checked before any external data is read.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx.external_data_helper import load_external_data_for_model
from torch.utils import _pytree as pytree

from hwaware import onnx_reference
from hwaware.db import DEFAULT_DB_PATH, DbArg, TuningDatabase, open_db
from hwaware.farm import Farm
from hwaware.index_guard import onnx_index_checks
from hwaware.onnx_fold import fold_constants
from hwaware.program import KernelSpec, KernelStep, Program
from hwaware.runtime import BuildInfo, CompiledModel
from hwaware.target import Target, get_target
from hwaware.tune import SessionSummary, TuningTask, require_runnable, tune_tasks

log = logging.getLogger(__name__)

KERNEL_NAME = "onnx_graph"
FAMILY = "onnx"
TIMEOUT_ENV = "HWAWARE_ONNX_BUILD_TIMEOUT_S"
BUILD_TIMEOUT_S = float(os.environ.get(TIMEOUT_ENV, "600"))
_FAMILY_WORDS = ("conv1d", "conv2d", "conv3d", "conv", "matmul", "dense", "attention")

ShapesArg = Mapping[str, Sequence[int]] | None


class OnnxImportError(ValueError):
    """An ONNX file that cannot be loaded or imported (safely)."""


class TvmUnsupportedError(OnnxImportError):
    """A valid ONNX graph that TVM cannot import or build (`compile_onnx` falls back)."""


@dataclass(frozen=True)
class GraphInput:
    """One input of the ONNX graph, with the static shape the model is compiled for."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch/numpy name: "float32", "int64", ...


@dataclass
class OnnxGraph:
    """An ONNX file read, checked and constant-folded for its static input shapes."""

    path: Path
    model: onnx.ModelProto
    inputs: list[GraphInput]
    signature: str

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def num_outputs(self) -> int:
        return len(self.model.graph.output)


@dataclass
class ImportedOnnx:
    """An ONNX graph as one Relax kernel, with the contraction workloads to tune."""

    graph: OnnxGraph
    module: Any  # tvm.IRModule, not fused: `build_executable` fuses it as it tunes it
    tasks: list[TuningTask]
    flops: int


# ------------------------------------------------------------------------ public verbs
def compile_onnx(path: str | os.PathLike[str], *, target: str | Target = "host",
                 db: DbArg = DEFAULT_DB_PATH, trials: int = 0, show_progress: bool = True,
                 input_shapes: ShapesArg = None) -> CompiledModel:
    """Compile an ONNX file for `target`; tune its contraction workloads first if `trials` > 0.
    A graph TVM cannot import or build runs on ONNX's reference evaluator (one warning)."""
    tgt = get_target(target)
    database = open_db(db)
    graph = read_onnx(path, input_shapes)                       # load, check, fold constants
    try:
        imported = import_graph(graph, tgt)                     # ONNX -> one Relax kernel
        if trials > 0 and database is not None:                 # 4. tune into the database
            summary = tune_tasks(imported.tasks, tgt, database, trials, graph.name,
                                 show_progress)
            log.info("%s", summary.table())
        return build_onnx(imported, tgt, database)              # 5. records -> library; 6. run
    except TvmUnsupportedError as err:
        log.warning("%s; the model runs un-accelerated, on ONNX's reference evaluator", err)
        return reference_model(graph, tgt)


def tune_onnx(path: str | os.PathLike[str], *, target: str | Target = "host",
              db: DbArg = DEFAULT_DB_PATH, trials: int = 200, show_progress: bool = True,
              input_shapes: ShapesArg = None, farm: Farm | None = None,
              cold_start: bool = False) -> SessionSummary:
    """Run a tuning session over an ONNX file's contraction workloads (records go to `db`),
    measured on `farm` if one is given; `cold_start`: see `hwaware.tune`."""
    tgt = get_target(target)
    database = open_db(db)
    if database is None:
        raise ValueError("tuning needs a database (db=None was given)")
    require_runnable(tgt, farm)
    imported = import_onnx_file(path, tgt, input_shapes)
    return tune_tasks(imported.tasks, tgt, database, trials, imported.graph.name, show_progress,
                      farm, cold_start)


# ----------------------------------------------------------------------------- loading
def load_onnx(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file; external data is read only after every location has been checked."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such ONNX file")
    model = _parse(file)
    folder = file.parent.resolve()
    check_external_data(model, folder)
    if any(_is_external(t) for t in _all_tensors(model)):
        try:
            load_external_data_for_model(model, str(folder))
        except (OSError, ValueError) as err:
            raise OnnxImportError(f"{file}: cannot read its external data: {err}") from err
    return model


def _parse(file: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError, RuntimeWarning, ...
        raise OnnxImportError(f"{file}: not an ONNX model (it does not parse as one: "
                              f"{type(err).__name__})") from err
    if model.ir_version < 3 or not model.graph.output:
        raise OnnxImportError(f"{file}: not an ONNX model, or one older than ONNX 1.1 "
                              f"(IR version {model.ir_version}, "
                              f"{len(model.graph.output)} graph outputs)")
    return model


def check_external_data(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that leave `folder` (absolute, `..`, escaping symlinks)."""
    for tensor in _all_tensors(model):
        if _is_external(tensor):
            _check_inside(tensor.name, _location(tensor), folder)


def _check_inside(tensor: str, location: str, folder: Path) -> None:
    if not location:
        raise OnnxImportError(f"tensor {tensor!r}: external data without a location")
    try:
        resolved = (folder / location).resolve()
    except (OSError, ValueError) as err:  # null bytes, symlink loops
        raise OnnxImportError(f"tensor {tensor!r}: bad external data location "
                              f"{location!r}: {err}") from err
    if Path(location).is_absolute() or not resolved.is_relative_to(folder):
        raise OnnxImportError(
            f"tensor {tensor!r}: external data location {location!r} resolves to {resolved}, "
            f"outside the model's folder {folder}; refusing to read it"
        )


def _is_external(tensor: onnx.TensorProto) -> bool:
    return bool(tensor.data_location == onnx.TensorProto.EXTERNAL)


def _location(tensor: onnx.TensorProto) -> str:
    return next((str(e.value) for e in tensor.external_data if e.key == "location"), "")


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model: initializers (sparse ones too), node attributes, subgraphs
    and local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
        for sp in [*sparse, *attr.sparse_tensors]:
            yield from (sp.values, sp.indices)
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for graph in attr.graphs:
            yield from _graph_tensors(graph)


# ----------------------------------------------------------------------------- inputs
def graph_inputs(model: onnx.ModelProto, input_shapes: ShapesArg = None) -> list[GraphInput]:
    """The graph's runtime inputs (not its initializers), each with a static shape."""
    initializers = {t.name for t in model.graph.initializer}
    infos = [vi for vi in model.graph.input if vi.name not in initializers]
    overrides = dict(input_shapes or {})
    unknown = sorted(set(overrides) - {vi.name for vi in infos})
    if unknown:
        raise ValueError(f"input_shapes names {unknown}, which are not inputs of the graph; "
                         f"its inputs are {[vi.name for vi in infos]}")
    return [_graph_input(vi, overrides.get(vi.name)) for vi in infos]


def _graph_input(vi: onnx.ValueInfoProto, override: Sequence[int] | None) -> GraphInput:
    if not vi.type.HasField("tensor_type"):
        raise OnnxImportError(f"input {vi.name!r} is a {vi.type.WhichOneof('value')}, not a "
                              "tensor; only tensor inputs are supported")
    dtype = _dtype_name(vi.name, vi.type.tensor_type.elem_type)
    if override is not None:
        shape = tuple(int(d) for d in override)
        if any(d < 0 for d in shape):
            raise ValueError(f"input_shapes[{vi.name!r}] = {list(shape)} has a negative size")
        return GraphInput(vi.name, shape, dtype)
    return GraphInput(vi.name, _static_shape(vi), dtype)


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    tensor_type = vi.type.tensor_type
    if not tensor_type.HasField("shape"):
        dims_text = "of unknown rank"
    else:
        dims = list(tensor_type.shape.dim)
        if all(d.HasField("dim_value") for d in dims):
            return tuple(int(d.dim_value) for d in dims)
        shown = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        dims_text = f"with dynamic dimensions {shown}"
    raise OnnxImportError(
        f"input {vi.name!r} has a shape {dims_text}; export the model with static shapes "
        f"(torch.onnx.export without dynamic_axes/dynamic_shapes), or pass "
        f"input_shapes={{{vi.name!r}: [...]}}"
    )


def _dtype_name(name: str, elem_type: int) -> str:
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
    except (KeyError, ValueError) as err:
        raise OnnxImportError(f"input {name!r} has an unsupported element type "
                              f"{onnx.TensorProto.DataType.Name(elem_type)}") from err
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise OnnxImportError(f"input {name!r} has element type {dtype}, which torch lacks")
    return str(dtype)


# ---------------------------------------------------------------------------- importing
def import_onnx_file(path: str | os.PathLike[str], target: Target,
                     input_shapes: ShapesArg = None) -> ImportedOnnx:
    """Load, check, fold and import an ONNX file; find the contraction workloads its build
    holds. Raises `TvmUnsupportedError` where TVM's importer fails."""
    return import_graph(read_onnx(path, input_shapes), target)


def read_onnx(path: str | os.PathLike[str], input_shapes: ShapesArg = None) -> OnnxGraph:
    """An ONNX file, checked, with its constants folded for the static input shapes."""
    file = Path(path)
    model = load_onnx(file)
    inputs = graph_inputs(model, input_shapes)
    folded = fold_constants(model, {i.name: i.shape for i in inputs})
    return OnnxGraph(file, folded, inputs, _signature(folded, inputs))


def import_graph(graph: OnnxGraph, target: Target) -> ImportedOnnx:
    """The graph as one Relax kernel, with its contraction workloads as tuning tasks."""
    from hwaware.tvm import ir, setup

    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # the importer prints
            module = ir.import_onnx(graph.model,
                                            {i.name: list(i.shape) for i in graph.inputs},
                                            {i.name: i.dtype for i in graph.inputs}, KERNEL_NAME)
    except Exception as err:  # the importer raises many error types
        log.debug("TVM's ONNX importer printed: %s", printed.getvalue())
        raise TvmUnsupportedError(f"{graph.path}: TVM's ONNX importer failed on "
                                  f"{_failing_op(err)}: {_first_line(err)}") from err
    try:
        fused = ir.fuse_for_tuning(module, setup.resolve(target).tvm)
    except Exception as err:  # TVM's passes raise many error types
        raise TvmUnsupportedError(f"{graph.path}: TVM's fusion passes failed on the imported "
                                  f"graph: {_first_line(err)}") from err
    workloads = fused_workloads(fused)
    return ImportedOnnx(
        graph=graph, module=module, tasks=contraction_tasks(workloads),
        flops=sum(ir.workload_flops(w) for _, w in workloads.values()),
    )


def _failing_op(err: BaseException) -> str:
    """The op the importer was converting when it raised (its innermost `_construct_nodes`
    frame holds the node), or the unsupported ops its up-front check names."""
    node, tb = None, err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_construct_nodes":
            node = tb.tb_frame.f_locals.get("node", node)
        tb = tb.tb_next
    if isinstance(node, onnx.NodeProto):
        return f"op {node.op_type} (node {node.name!r})"
    unsupported = "not supported for frontend ONNX:"
    if unsupported in str(err):
        return "op " + str(err).split(unsupported, 1)[1].strip().splitlines()[0]
    return "the graph"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def fused_workloads(fused: Any) -> dict[str, tuple[str, Any]]:
    """Workload hash -> (fused function name, MetaSchedule workload), for every TIR kernel."""
    from hwaware.tvm import ir

    workloads: dict[str, tuple[str, Any]] = {}
    for fname, func in sorted(ir.prim_funcs(fused).items()):
        workload = ir.workload_of(func)
        workloads.setdefault(ir.workload_hash(workload), (fname, workload))
    return workloads


def contraction_tasks(workloads: dict[str, tuple[str, Any]]) -> list[TuningTask]:
    """The workloads that need a tuned schedule (convolutions, matmuls) as tuning tasks."""
    from hwaware.tvm import ir

    tasks = []
    for key, (fname, workload) in workloads.items():
        if ir.is_contraction(workload):
            family = _family(fname)
            tasks.append(TuningTask(f"{family}_{key[:10]}", workload, key, family, [KERNEL_NAME],
                                    ir.workload_flops(workload)))
    return tasks


def _family(fused_name: str) -> str:
    """"fused_conv2d_add_relu" -> "conv2d"; "matmul1" -> "matmul"."""
    found = next((w for w in _FAMILY_WORDS if w in fused_name), "contraction")
    return "matmul" if found == "dense" else found


def _signature(model: onnx.ModelProto, inputs: list[GraphInput]) -> str:
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    digest.update(repr([(i.name, i.shape, i.dtype) for i in inputs]).encode())
    return f"onnx:{digest.hexdigest()[:16]}"


# ----------------------------------------------------------------------------- building
def build_onnx(imported: ImportedOnnx, target: Target, db: TuningDatabase | None
               ) -> CompiledModel:
    """Tuned records (rule-based defaults elsewhere) -> library -> one-kernel `CompiledModel`."""
    from hwaware.tvm import database, setup

    resolved = setup.resolve(target)
    tgt = resolved.tvm
    adapter = database.SqliteDatabase.checked(db, resolved) if db is not None else None
    if adapter is not None and adapter.verify:  # here: the build's forked child must not write
        adapter.check_best([task.workload for task in imported.tasks])
    if target.can_run_here:
        executable, applied = build_with_time_limit(imported, tgt, adapter)
    else:  # a cross library cannot be loaded here, so it cannot come from a child process
        executable, applied = _build(imported, tgt, adapter)
    _warn_untuned(imported.tasks, db, target)
    info = BuildInfo.for_target(target, [], {}, sorted(applied))
    program = onnx_program(imported.graph, "tvm", imported.flops)
    return CompiledModel(program, executable, info, target.kind)


def _build(imported: ImportedOnnx, tgt: Any, adapter: Any) -> tuple[Any, set[str]]:
    from hwaware.tvm import schedules

    try:
        return schedules.build_executable(imported.module, tgt, adapter)
    except Exception as err:  # TVM's passes and codegen raise many error types
        raise TvmUnsupportedError(f"{imported.graph.path}: TVM's build failed: "
                                  f"{_first_line(err)}") from err


def build_with_time_limit(imported: ImportedOnnx, tgt: Any, adapter: Any
                          ) -> tuple[Any, set[str]]:
    """TVM's build in a child process, stopped after `BUILD_TIMEOUT_S` (LLVM's codegen has sat
    on one badly scheduled kernel for hours): the library it writes, loaded here, and the
    workloads that got tuned records. Raises `TvmUnsupportedError` when the build fails, dies
    or runs past the limit."""
    from hwaware.tvm import vm

    folder = tempfile.mkdtemp(prefix="hwaware-onnx-")
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "kernels.so")
    context = multiprocessing.get_context("fork")  # the child inherits the imported module
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_build_child, args=(sender, imported, tgt, adapter, path),
                            daemon=True)
    child.start()
    sender.close()
    try:
        outcome = receiver.recv() if receiver.poll(BUILD_TIMEOUT_S) else ("timeout", "")
    except EOFError:
        outcome = ("died", "")
    finally:
        child.join(timeout=10)
        child.kill()
    status, detail = outcome
    if status != "ok":
        raise TvmUnsupportedError(_failed_build_message(imported, status, detail,
                                                        child.exitcode))
    return vm.LibraryFile(path), set(detail)


def _build_child(sender: Any, imported: ImportedOnnx, tgt: Any, adapter: Any,
                 path: str) -> None:
    from hwaware.tvm import vm

    try:
        executable, applied = _build(imported, tgt, adapter)
        vm.export_executable(executable, path)
        sender.send(("ok", sorted(applied)))
    except Exception as err:
        sender.send(("error", str(err)))


def _failed_build_message(imported: ImportedOnnx, status: str, detail: str,
                          exitcode: int | None) -> str:
    if status == "timeout":
        return (f"{imported.graph.path}: TVM's build of its {len(imported.tasks)} contraction "
                f"workloads ran past {BUILD_TIMEOUT_S:.0f} s and was stopped (the limit: "
                f"{TIMEOUT_ENV})")
    if status == "died":
        return f"{imported.graph.path}: TVM's build process died (exit code {exitcode})"
    return detail


def reference_model(graph: OnnxGraph, target: Target) -> CompiledModel:
    """The graph on ONNX's reference evaluator: correct, un-accelerated, saves and loads."""
    program = onnx_program(graph, onnx_reference.IMPL)
    program.constants[onnx_reference.model_constant(KERNEL_NAME)] = \
        onnx_reference.as_constant(graph.model.SerializeToString())
    return CompiledModel(program, None, BuildInfo.for_target(target, [], {}), target.kind)


def _warn_untuned(tasks: list[TuningTask], db: TuningDatabase | None, target: Target) -> None:
    from hwaware.tvm.setup import TVM_VERSION

    untuned = [t.name for t in tasks
               if db is None or not db.top_records(t.workload_hash, TVM_VERSION, target.key, 1)]
    if untuned:
        log.warning("%d of %d ONNX contraction workloads have no tuned record for %s (%s); they "
                    "get a rule-based schedule, usually much slower: tune with trials > 0",
                    len(untuned), len(tasks), target.key, ", ".join(untuned[:4]))


def onnx_program(graph: OnnxGraph, impl: str, flops: int = 0) -> Program:
    """The host program: inputs -> the one kernel (run by `impl`) -> outputs (a tensor, or a
    tuple)."""
    n_in, n_out = len(graph.inputs), graph.num_outputs
    in_slots, out_slots = list(range(n_in)), list(range(n_in, n_in + n_out))
    names = [i.name for i in graph.inputs]
    checks = onnx_index_checks(graph.model, names, {i.name: i.shape for i in graph.inputs})
    spec = KernelSpec(KERNEL_NAME, FAMILY, graph.signature, in_slots, out_slots, steps=[],
                      impl=impl, flops=flops, index_checks=checks)
    out_spec = pytree.tree_flatten(0 if n_out == 1 else tuple(range(n_out)))[1]
    return Program(
        input_slots=in_slots,
        input_specs=[{"shape": list(i.shape), "dtype": i.dtype} for i in graph.inputs],
        output_slots=out_slots, out_spec=pytree.treespec_dumps(out_spec),
        steps=[KernelStep(KERNEL_NAME, in_slots, out_slots)], kernels={KERNEL_NAME: spec},
        num_slots=n_in + n_out,
    )
