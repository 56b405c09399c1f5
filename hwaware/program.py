"""The host program: a flat, serializable list of steps that runs a partitioned model.

Goes in (from the partitioner): ATen op steps that run in PyTorch on the host, and kernel steps
that call one compiled kernel. Comes out: a JSON document (no pickle) that `runtime.py` executes
and saves next to the TVM library, and readable Python for people (`to_python`).

Values are numbered slots; step arguments are encoded as JSON: `{"v": i}` for slot i,
`{"c": name}` for a constant tensor, `{"dtype": ...}` for torch dtypes, lists for lists, and
plain JSON for numbers, strings, booleans and None.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections.abc import Callable
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
    impl: str = "torch"  # "torch", "tvm", or "onnx-reference" (see onnx_reference.py)
    flops: int = 0
    tvm_us: float | None = None
    torch_us: float | None = None


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
    def from_json(text: str, constants: dict[str, torch.Tensor]) -> Program:
        doc = json.loads(text)
        if doc.get("schema_version") != PROGRAM_SCHEMA_VERSION:
            raise ValueError(
                f"program schema version {doc.get('schema_version')} is not supported "
                f"(expected {PROGRAM_SCHEMA_VERSION})"
            )
        missing = sorted(set(doc["constants"]) - set(constants))
        if missing:
            raise ValueError(f"the saved weights lack constants {missing[:5]}")
        kernels = {}
        for name, k in doc["kernels"].items():
            k["steps"] = [OpStep(**s) for s in k["steps"]]
            kernels[name] = KernelSpec(**k)
        return Program(
            input_slots=doc["input_slots"], input_specs=doc["input_specs"],
            output_slots=doc["output_slots"], out_spec=doc["out_spec"],
            steps=[_step_from_json(s) for s in doc["steps"]], kernels=kernels,
            num_slots=doc["num_slots"], constants=constants,
        )

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
    named = {int(i): getattr(torch.return_types, name)
             for i, name in doc["return_types"].items()}
    return _retyped(pytree.treespec_loads(doc["spec"]),
                    lambda index, node: named.get(index, node.type))


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
        return getattr(torch, name)
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


def resolve_op(op: str) -> Any:
    """"aten.add.Tensor" -> torch.ops.aten.add.Tensor; "getitem" -> operator.getitem."""
    if op == "getitem":
        return operator.getitem
    if op.startswith("operator."):  # arithmetic on symbolic sizes
        return getattr(operator, op.removeprefix("operator."))
    namespace, name, overload = op.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


def op_name(target: Any) -> str:
    if target is operator.getitem:
        return "getitem"
    name = str(getattr(target, "__name__", ""))
    if name and getattr(operator, name, None) is target:
        return f"operator.{name}"
    if not isinstance(target, torch._ops.OpOverload):
        raise TypeError(f"the host program cannot call {target!r}")
    return str(target)
