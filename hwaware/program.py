"""The host program: a flat, serializable list of steps that runs a partitioned model.

Goes in (from the partitioner): ATen op steps that run in PyTorch on the host, and kernel steps
that call one compiled kernel. Comes out: a JSON document (no pickle) that `runtime.py` executes
and saves next to the TVM library, and readable Python for people (`to_python`).

Values are numbered slots; step arguments are encoded as JSON: `{"v": i}` for slot i,
`{"c": name}` for a constant tensor, `{"dtype": ...}` for torch dtypes, lists for lists, and
plain JSON for numbers, strings, booleans and None.

A program names only allowed ops (`resolve_op`): PyTorch operators of the namespaces the
compiler emits (`TORCH_OP_NAMESPACES`, looked up in PyTorch's operator registry and checked to
be operator overloads), custom operators that a library imported in this process defined with
`torch.library.custom_op` (`python_custom_op`; a saved model that calls one loads once that
library is imported), `getitem`, and the `operator` and `torch.sym_*` functions of
symbolic-size arithmetic (`HOST_OPERATORS`, `SIZE_FUNCTIONS`). Anything else, when a
program is read, raises `DisallowedOpError` naming the op and the file: a program file is
data, never a way to call arbitrary Python.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

PROGRAM_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class OpStep:
    """Call one ATen op (e.g. "aten.add.Tensor") or "getitem" in PyTorch; result in slot `out`."""

    op: str
    args: list[Any]
    kwargs: dict[str, Any]
    out: int


def slots_read(step: OpStep) -> list[int]:
    """The slots `step` reads, in argument order (a slot read twice is listed twice)."""
    return [leaf["v"] for leaf in pytree.tree_leaves(
        [step.args, step.kwargs], is_leaf=lambda a: isinstance(a, dict) and "v" in a)
        if isinstance(leaf, dict) and "v" in leaf]


@dataclass(frozen=True)
class KernelStep:
    """Run kernel `kernel` on slots `inputs`; its results go to slots `outputs`."""

    kernel: str
    inputs: list[int]
    outputs: list[int]


@dataclass
class KernelSpec:
    """One partitioned kernel: its PyTorch steps (always kept: the fallback and the reference),
    a stable signature that names it in the database, and which implementation runs it."""

    name: str
    family: str
    signature: str
    inputs: list[int]
    outputs: list[int]
    steps: list[OpStep]
    impl: str = "torch"  # "torch", "tvm", "onednn" (onednn.py) or "onnx-reference" (its module)
    flops: int = 0
    tvm_us: float | None = None
    torch_us: float | None = None
    # the timings' spreads (`runner.Timing.spread`): how far the choice above can be trusted
    tvm_spread: float | None = None
    torch_spread: float | None = None
    # indices from its inputs checked before its TVM kernel runs (`index_guard.IndexCheck`)
    index_checks: list[list[Any]] = field(default_factory=list)


@dataclass
class Program:
    """A whole partitioned model: host steps, kernels, constants and the calling convention."""

    input_slots: list[int]
    input_specs: list[dict[str, Any]]
    output_slots: list[int]
    out_spec: str  # dump_tree_spec
    steps: list[OpStep | KernelStep]
    kernels: dict[str, KernelSpec]
    num_slots: int
    constants: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    schema_version: int = PROGRAM_SCHEMA_VERSION

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        self.check_ops("the program to save")  # never write what `from_json` refuses
        doc = {
            "schema_version": self.schema_version,
            "input_slots": self.input_slots,
            "input_specs": self.input_specs,
            "output_slots": self.output_slots,
            "out_spec": self.out_spec,
            "num_slots": self.num_slots,
            "steps": [_step_to_json(s) for s in self.steps],
            "kernels": {k: asdict(v) for k, v in self.kernels.items()},
            "constants": sorted(self.constants),
        }
        return json.dumps(doc, indent=1)

    @staticmethod
    def from_json(text: str, constants: dict[str, torch.Tensor], where: str = "program.json"
                  ) -> Program:
        """The program `to_json` wrote; raises `DisallowedOpError` naming the op and `where`
        (the file) for an op outside the allowlist, before anything runs."""
        doc = json.loads(text)
        if doc.get("schema_version") != PROGRAM_SCHEMA_VERSION:
            raise ValueError(
                f"{where}: program schema version {doc.get('schema_version')} is not "
                f"supported (expected {PROGRAM_SCHEMA_VERSION})"
            )
        missing = sorted(set(doc["constants"]) - set(constants))
        if missing:
            raise ValueError(f"the saved weights lack constants {missing[:5]}")
        kernels = {}
        for name, k in doc["kernels"].items():
            k["steps"] = [OpStep(**s) for s in k["steps"]]
            kernels[name] = KernelSpec(**k)
        program = Program(
            input_slots=doc["input_slots"], input_specs=doc["input_specs"],
            output_slots=doc["output_slots"], out_spec=doc["out_spec"],
            steps=[_step_from_json(s) for s in doc["steps"]], kernels=kernels,
            num_slots=doc["num_slots"], constants=constants,
        )
        program.check_ops(where)
        return program

    def op_steps(self) -> Iterator[OpStep]:
        """Every PyTorch step: on the host and inside each kernel."""
        yield from (s for s in self.steps if isinstance(s, OpStep))
        for kernel in self.kernels.values():
            yield from kernel.steps

    def custom_operator_modules(self) -> list[str]:
        """The Python modules that define the custom operators this program calls (what a
        process must import before it loads a saved model that calls them)."""
        found = (_TORCH_OP.fullmatch(step.op) for step in self.op_steps())
        return sorted({defining_module(m[1], m[2]) for m in found
                       if m is not None and python_custom_op(m[1], m[2])})

    def check_ops(self, where: str) -> None:
        """Raise `DisallowedOpError` naming the first op outside the allowlist and `where`."""
        for step in self.op_steps():
            try:
                resolve_op(step.op)
            except DisallowedOpError as err:
                raise DisallowedOpError(f"{where}: {err}") from None

    # ---------------------------------------------------------------- python
    def to_python(self) -> str:
        """The host program as readable Python (what `runtime.py` executes step by step)."""
        lines = [f"def forward({', '.join(f'v{i}' for i in self.input_slots)}):"]
        for step in self.steps:
            if isinstance(step, KernelStep):
                spec = self.kernels[step.kernel]
                outs = ", ".join(f"v{i}" for i in step.outputs)
                ins = ", ".join(f"v{i}" for i in step.inputs)
                lines.append(f"    {outs}, = {step.kernel}({ins})"
                             f"  # {spec.family}, runs on {spec.impl}")
            else:
                lines.append(f"    v{step.out} = {_call_text(step)}")
        lines.append(f"    return {', '.join(f'v{i}' for i in self.output_slots)}")
        return "\n".join(lines) + "\n"


def _call_text(step: OpStep) -> str:
    args = [_arg_text(a) for a in step.args]
    args += [f"{k}={_arg_text(v)}" for k, v in step.kwargs.items()]
    return f"{step.op}({', '.join(args)})"


def _arg_text(a: Any) -> str:
    if isinstance(a, dict):
        if "v" in a:
            return f"v{a['v']}"
        if "c" in a:
            return f"const[{a['c']!r}]"
        return f"torch.{next(iter(a.values()))}"
    if isinstance(a, list):
        return "[" + ", ".join(_arg_text(x) for x in a) + "]"
    return repr(a)


def _step_to_json(step: OpStep | KernelStep) -> dict[str, Any]:
    return {"kind": "kernel" if isinstance(step, KernelStep) else "op", **asdict(step)}


def _step_from_json(doc: dict[str, Any]) -> OpStep | KernelStep:
    kind = doc.pop("kind")
    return KernelStep(**doc) if kind == "kernel" else OpStep(**doc)


# ---------------------------------------------------------------- output tree
def dump_tree_spec(spec: pytree.TreeSpec) -> str:
    """`pytree.treespec_dumps`, which also writes PyTorch's named-tuple return types (what
    `torch.sort`, `torch.topk` or `torch.linalg.svd` return; torch cannot serialize them): as
    tuples, with the preorder position and name of each kept next to the spec."""
    named: dict[str, str] = {}

    def plain_type(index: int, node: pytree.TreeSpec) -> Any:
        if node.type.__module__ != "torch.return_types":
            return node.type
        named[str(index)] = node.type.__name__
        return tuple

    plain = pytree.treespec_dumps(_retyped(spec, plain_type))
    return json.dumps({"spec": plain, "return_types": named}) if named else plain


def load_tree_spec(text: str) -> pytree.TreeSpec:
    """The spec `dump_tree_spec` wrote (or `pytree.treespec_dumps`, as older saves hold)."""
    doc = json.loads(text)
    if not isinstance(doc, dict):
        return pytree.treespec_loads(text)
    named = {int(i): _return_type(name) for i, name in doc["return_types"].items()}
    return _retyped(pytree.treespec_loads(doc["spec"]),
                    lambda index, node: named.get(index, node.type))


def _return_type(name: str) -> type:
    """A named-tuple return type of PyTorch's (`torch.return_types`), looked up by name."""
    types = {n: t for n, t in vars(torch.return_types).items()
             if isinstance(t, type) and issubclass(t, tuple) and not n.startswith("_")}
    if name not in types:
        raise ValueError(f"{name!r} is not one of PyTorch's return types")
    return types[name]


def _retyped(spec: pytree.TreeSpec, new_type: Callable[[int, pytree.TreeSpec], Any]
             ) -> pytree.TreeSpec:
    """`spec` with each inner node's type replaced by `new_type(preorder index, node)`."""
    counter = itertools.count()

    def visit(node: pytree.TreeSpec) -> pytree.TreeSpec:
        index = next(counter)
        if node.is_leaf():
            return node
        return pytree.TreeSpec(new_type(index, node), node.context,
                               [visit(child) for child in node.children()])

    return visit(spec)


# -------------------------------------------------------------- argument coding
_TORCH_ENUMS = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format,
                "device": torch.device}
# name -> value of each enum a program may hold (`torch.float32` is "float32"); a lookup table,
# so a program never names an arbitrary attribute of `torch`
_ENUM_VALUES = {tag: {name: value for name, value in vars(torch).items()
                      if isinstance(value, kind) and not name.startswith("_")}
                for tag, kind in _TORCH_ENUMS.items() if kind is not torch.device}


def torch_enum(tag: str, name: str) -> Any:
    """`torch.<name>` for a dtype, layout or memory format (`tag`), by lookup."""
    values = _ENUM_VALUES.get(tag, {})
    if name not in values:
        raise ValueError(f"{name!r} is not a torch {tag} (valid: {sorted(values)[:8]}...)")
    return values[name]


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 for "float32" (by lookup)."""
    return torch_enum("dtype", name)  # type: ignore[no-any-return]


def encode_arg(a: Any, slot_of: Any, const_of: Any) -> Any:
    """FX argument -> JSON. `slot_of(node)` / `const_of(node)` name nodes (const_of may be None)."""
    import torch.fx as fx

    if isinstance(a, fx.Node):
        const = const_of(a)
        return {"c": const} if const is not None else {"v": slot_of(a)}
    if isinstance(a, (list, tuple)):
        return [encode_arg(x, slot_of, const_of) for x in a]
    for tag, kind in _TORCH_ENUMS.items():
        if isinstance(a, kind):
            return {tag: str(a).removeprefix("torch.")}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise TypeError(f"cannot encode argument {a!r} of type {type(a).__name__}")


def decode_arg(a: Any, slots: list[Any], constants: dict[str, torch.Tensor]) -> Any:
    if isinstance(a, dict):
        if "v" in a:
            return slots[a["v"]]
        if "c" in a:
            return constants[a["c"]]
        if "device" in a:
            return torch.device(a["device"])
        tag, name = next(iter(a.items()))
        return torch_enum(tag, name)
    if isinstance(a, list):
        return [decode_arg(x, slots, constants) for x in a]
    return a


def bind_arg(a: Any, constants: dict[str, torch.Tensor]) -> tuple[bool, Any]:
    """Decode an argument once, ahead of the calls: (False, value) when it names no slot, else
    (True, getter) where getter(slots) fetches the value. Keeps the host program's per-call
    overhead to list indexing."""
    if isinstance(a, dict) and "v" in a:
        slot = a["v"]
        return True, lambda slots: slots[slot]
    if isinstance(a, list):
        parts = [bind_arg(x, constants) for x in a]
        if not any(dynamic for dynamic, _ in parts):
            return False, [value for _, value in parts]
        return True, lambda slots: [g(slots) if d else g for d, g in parts]
    return False, decode_arg(a, [], constants)


class DisallowedOpError(ValueError):
    """A program names an op outside the allowlist (see the module docstring)."""


TORCH_OP_NAMESPACES = frozenset({"aten", "prims"})  # the torch.ops namespaces export emits
REFUSED_TORCH_OPS = frozenset({"aten.from_file"})  # reads a file named by the program
# the `operator` functions of arithmetic on symbolic sizes: the exact set `op_name` writes
HOST_OPERATORS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (
        operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
        operator.mod, operator.pow, operator.neg, operator.pos, operator.abs,
        operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
        operator.and_, operator.or_, operator.xor, operator.not_, operator.invert,
        operator.lshift, operator.rshift, operator.truth)}
# torch's functions on symbolic sizes (Dynamo's graphs sum data-dependent sizes with sym_sum)
SIZE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    f.__name__: f for f in (torch.sym_sum, torch.sym_max, torch.sym_min, torch.sym_not,
                            torch.sym_int, torch.sym_float)}
# the Python functions a program may call, by the module prefix it names them with
HOST_FUNCTIONS = {"operator": HOST_OPERATORS, "torch": SIZE_FUNCTIONS}
_TORCH_OP = re.compile(r"([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)")


def resolve_op(op: str, in_process: bool = False) -> Any:
    """"aten.add.Tensor" -> torch.ops.aten.add.Tensor; "getitem" -> operator.getitem;
    "operator.mul" -> operator.mul. Raises `DisallowedOpError` for any other name.
    `in_process`: for running a program built in this process from the user's own model, or one
    already checked when it was read: then any operator PyTorch's dispatcher has resolves (a C++
    custom operator such as torchvision's `nms` runs; `save` still refuses to write it)."""
    if op == "getitem":
        return operator.getitem
    prefix, _, name = op.partition(".")
    functions = HOST_FUNCTIONS.get(prefix)
    if functions is not None:  # arithmetic on symbolic sizes
        fn = functions.get(name)
        if fn is None:
            raise DisallowedOpError(f"op {op!r} is not allowed (allowed {prefix} functions: "
                                    f"{sorted(functions)})")
        return fn
    return _torch_op(op, in_process)


def _torch_op(op: str, in_process: bool = False) -> torch._ops.OpOverload:
    """An operator overload from PyTorch's registry, for an op name of an allowed namespace or
    a Python custom operator (`python_custom_op`). The name must be registered with PyTorch's
    dispatcher before any attribute is looked up, so dunder operators (`aten.__and__.Tensor`,
    what `x & y` exports to) resolve and nothing else of the namespace objects
    (`aten.__class__`) can."""
    match = _TORCH_OP.fullmatch(op)
    if match is None or not _allowed(match, in_process):
        raise DisallowedOpError(f"op {op!r} is not allowed (a program may name PyTorch operators "
                                f"of {sorted(TORCH_OP_NAMESPACES)}, custom operators defined "
                                "with torch.library.custom_op, 'getitem' and "
                                "'operator.<arithmetic>')" + _unregistered_hint(match))
    namespace, name, overload = match.groups()
    try:
        found = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    except (AttributeError, RuntimeError) as err:
        raise DisallowedOpError(f"op {op!r}: PyTorch has no such operator ({err})") from None
    if not isinstance(found, torch._ops.OpOverload):
        raise DisallowedOpError(f"op {op!r} is not a PyTorch operator overload")
    return found


def _allowed(match: re.Match[str], in_process: bool) -> bool:
    """Whether the op `match` names may run: in a program built in this process, any op the
    dispatcher has; in a program read from a file, an op of an allowed namespace that is not
    refused, or a Python custom operator."""
    namespace, name, overload = match.groups()
    registered = _registered(namespace, name, overload)
    if in_process:
        return registered
    if f"{namespace}.{name}" in REFUSED_TORCH_OPS:
        return False
    return namespace in TORCH_OP_NAMESPACES and registered or python_custom_op(namespace, name)


def python_custom_op(namespace: str, name: str) -> bool:
    """Whether `namespace::name` is a custom operator that Python code outside torch defined
    with `torch.library.custom_op` in this process (Hugging Face's MoE `grouped_mm_fallback`).
    Such an op resolves only where its library has been imported: a program file cannot make
    one exist, and torch's own internal namespaces stay refused."""
    return defining_module(namespace, name).partition(".")[0] not in ("", "torch")


def defining_module(namespace: str, name: str) -> str:
    """The Python module whose `torch.library.custom_op` defined `namespace::name` ("" when no
    Python custom operator of that name is registered)."""
    from torch._library import custom_ops

    definition = custom_ops.OPDEFS.get(f"{namespace}::{name}")
    return str(getattr(getattr(definition, "_init_fn", None), "__module__", "") or "")


def _unregistered_hint(match: re.Match[str] | None) -> str:
    if match is None or match[1] in TORCH_OP_NAMESPACES or _registered(*match.groups()):
        return ""
    return (f"; if it is a custom operator, it is not registered in this process: import the "
            f"library that defines namespace {match[1]!r} first")


def _registered(namespace: str, name: str, overload: str) -> bool:
    """Whether PyTorch's dispatcher has the operator `namespace::name.overload`."""
    qualified = f"{namespace}::{name}" + ("" if overload == "default" else f".{overload}")
    if qualified not in _dispatcher_ops():
        _dispatcher_ops.cache_clear()  # a library imported since may have registered it
    return qualified in _dispatcher_ops()


@functools.cache
def _dispatcher_ops() -> frozenset[str]:
    return frozenset(torch._C._dispatch_get_all_op_names())


def op_name(target: Any) -> str:
    """The name a program stores for an FX call target (what `resolve_op` reads back)."""
    if target is operator.getitem:
        return "getitem"
    name = str(getattr(target, "__name__", ""))
    for prefix, functions in HOST_FUNCTIONS.items():
        if functions.get(name) is target:
            return f"{prefix}.{name}"
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"the host program cannot call {target!r}")
    return str(target)
