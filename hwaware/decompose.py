"""Decomposition (public): a model -> the kernels hwaware compiles it into, without building.

Goes in: a model and example inputs (what `hwaware.compile` takes). Runs stages 1-3 only:
capture -> rewrite -> partition. Comes out: a `Decomposition`, one frozen `KernelRecord` per
kernel: its stable signature (the key of the tuning database and of latency tables), family,
ops, input and output shapes and dtypes, attributes, FLOPs and bytes moved; and one record of
family "host" per op the host program runs in PyTorch between kernels (an index_add a GNN
scatters with, a view, a data-dependent op), so that a model's time is all accounted for. This
is how the latency predictor and the architecture search read a model: the kernels as hwaware
would build them (fused blocks as one kernel), not as eager PyTorch runs them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from hwaware.aten_ops import supported_aten_ops
from hwaware.capture import Captured, capture
from hwaware.partition import Partition, kernel_signature, partition
from hwaware.program import op_name
from hwaware.rewrite import rewrite

KERNEL_SCHEMA_VERSION = 1
HOST_FAMILY = "host"  # the family of a record of one host op (run in PyTorch by the program)


@dataclass(frozen=True)
class KernelRecord:
    """One kernel of a partitioned model, as the database and the predictor know it."""

    signature: str
    family: str
    ops: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]  # -1: a size that depends on the data
    output_shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]  # of the inputs, then the outputs
    attributes: str  # JSON: per op, its non-tensor arguments
    flops: int  # of the contraction (2 x multiply-accumulates); 0 for element-wise kernels
    bytes_moved: int  # inputs, outputs and weights, each read or written once
    weight_bytes: int
    schema_version: int = KERNEL_SCHEMA_VERSION

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes_moved if self.bytes_moved else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str | dict[str, Any]) -> KernelRecord:
        doc = json.loads(text) if isinstance(text, str) else dict(text)
        if doc.get("schema_version") != KERNEL_SCHEMA_VERSION:
            raise ValueError(f"kernel record schema {doc.get('schema_version')} is not "
                             f"supported (expected {KERNEL_SCHEMA_VERSION})")
        for key in ("ops", "dtypes"):
            doc[key] = tuple(doc[key])
        for key in ("input_shapes", "output_shapes"):
            doc[key] = tuple(tuple(s) for s in doc[key])
        return KernelRecord(**doc)


@dataclass(frozen=True)
class Decomposition:
    """A model's kernels in program order, and the ops that run on the host in PyTorch."""

    model: str
    kernels: tuple[KernelRecord, ...]
    host_ops: tuple[str, ...]  # the distinct ops
    host_steps: int = 0  # how many host op calls one run makes
    host_records: tuple[KernelRecord, ...] = ()  # one per host op call, in program order

    @property
    def priced(self) -> tuple[KernelRecord, ...]:
        """Everything one run spends time in: the kernels, then the host ops."""
        return self.kernels + self.host_records


    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)


def decompose(model: torch.nn.Module, example_inputs: Any, *, fuse: bool = True
              ) -> Decomposition:
    """The kernels `hwaware.compile(model, example_inputs)` would build (stages 1-3)."""
    captured = capture(model, as_inputs(example_inputs))
    _, part = rewrite_and_partition(captured, fuse)
    return decomposition_of(part)


def decomposition_of(part: Any) -> Decomposition:
    """The records of an already partitioned graph (a `hwaware.partition.Partition`)."""
    records = tuple(kernel_record(spec, part.kernel_graphs[name])
                    for name, spec in part.program.kernels.items()
                    if name in part.kernel_graphs)
    from hwaware.program import OpStep

    host_steps = sum(isinstance(s, OpStep) for s in part.program.steps)
    return Decomposition(part.captured.name, records, tuple(part.host_ops), host_steps,
                         tuple(host_record(n, part.captured.graph_module)
                               for n in host_nodes(part)))


def host_nodes(part: Any) -> list[fx.Node]:
    """The graph's ops the host program runs in PyTorch, in program order (the partitioner
    emits a host step for each call not in a kernel, in graph order)."""
    in_kernels = {n for nodes in part.kernel_nodes.values() for n in nodes}
    return [n for n in part.captured.graph_module.graph.nodes
            if n.op == "call_function" and n.name not in in_kernels]


def host_record(node: fx.Node, gm: fx.GraphModule) -> KernelRecord:
    """The record of one host op: family "host", its op, shapes and bytes (no FLOPs: its time
    is PyTorch's dispatch and memory traffic)."""
    inputs = [_val(n) for n in node.all_input_nodes
              if n.op != "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)]
    weights = [_val(n) for n in node.all_input_nodes
               if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)]
    outputs = [v for v in pytree.tree_leaves(node.meta.get("val"))
               if isinstance(v, torch.Tensor)]
    return KernelRecord(
        signature=kernel_signature([node], list(node.all_input_nodes), gm, HOST_FAMILY),
        family=HOST_FAMILY, ops=(op_name(node.target),),
        input_shapes=tuple(_dims(t) for t in inputs),
        output_shapes=tuple(_dims(t) for t in outputs),
        dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in [*inputs, *outputs]),
        attributes=json.dumps([[op_name(node.target), _node_literals(list(node.args)),
                                _node_literals(dict(node.kwargs))]], sort_keys=True, default=repr),
        flops=0, bytes_moved=sum(_bytes(t) for t in [*inputs, *outputs, *weights]),
        weight_bytes=sum(_bytes(t) for t in weights),
    )


def _node_literals(arg: Any) -> Any:
    """A graph call's arguments without its references to values (as `_literals` does for an
    encoded step's)."""
    if isinstance(arg, fx.Node):
        return None
    if isinstance(arg, dict):
        return {str(k): _node_literals(v) for k, v in arg.items()}
    if isinstance(arg, (list, tuple)):
        return [_node_literals(a) for a in arg]
    return arg if isinstance(arg, (int, float, bool, str, type(None))) else repr(arg)


def records_by_module(part: Any) -> list[tuple[str, KernelRecord]]:
    """Each kernel's record, then each host op's, with the module that owns it: the
    `nn.Module` path of its first node that has one ("" for none). A kernel that fuses ops of
    two modules (a residual add with the next layer's norm) belongs to the one its first op
    comes from."""
    nodes = {n.name: n for n in part.captured.graph_module.graph.nodes}
    kernels = [(_owner([nodes[n] for n in part.kernel_nodes.get(name, ()) if n in nodes]),
                kernel_record(spec, part.kernel_graphs[name]))
               for name, spec in part.program.kernels.items() if name in part.kernel_graphs]
    gm = part.captured.graph_module
    return kernels + [(_owner(_this_and_earlier(n)), host_record(n, gm)) for n in host_nodes(part)]


def _this_and_earlier(node: fx.Node) -> Iterator[fx.Node]:
    """`node`, then the nodes before it, nearest first: a host op export made up (a size
    query, a runtime assertion) has no module and belongs to the op it follows."""
    while node.op != "root":
        yield node
        node = node.prev


def _owner(nodes: Iterable[Any]) -> str:
    for node in nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            return str(list(stack.values())[-1][0])
    return ""


def kernel_record(spec: Any, graph: torch.fx.GraphModule) -> KernelRecord:
    """A kernel's record from its `KernelSpec` and its standalone graph."""
    nodes = list(graph.graph.nodes)
    inputs = [_val(n) for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    outputs = [_val(n) for n in output.args[0]]
    weights = [b for _, b in graph.named_buffers()]
    return KernelRecord(
        signature=spec.signature, family=spec.family, ops=tuple(s.op for s in spec.steps),
        input_shapes=tuple(_dims(t) for t in inputs),
        output_shapes=tuple(_dims(t) for t in outputs),
        dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in [*inputs, *outputs]),
        attributes=json.dumps([[s.op, _literals(s.args), _literals(s.kwargs)]
                               for s in spec.steps], sort_keys=True),
        flops=int(spec.flops), bytes_moved=sum(_bytes(t) for t in [*inputs, *outputs, *weights]),
        weight_bytes=sum(_bytes(t) for t in weights),
    )


def _val(node: Any) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"kernel value {node.name} has no tensor metadata")
    return val


def _dims(t: torch.Tensor) -> tuple[int, ...]:
    """The shape, with -1 for a size that depends on the data (a GNN's edge count after a
    filter): such a kernel stays in PyTorch, and a record says so rather than guess."""
    return tuple(d if isinstance(d, int) else -1 for d in t.shape)


def _bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor of known shape (0 for a data-dependent one)."""
    dims = _dims(t)
    return 0 if -1 in dims else math.prod(dims) * t.element_size()


def _literals(arg: Any) -> Any:
    """An encoded step argument without its references to values (slots and constants)."""
    if isinstance(arg, dict):
        if "v" in arg or "c" in arg:
            return None
        return {k: _literals(v) for k, v in arg.items()}
    if isinstance(arg, list):
        return [_literals(a) for a in arg]
    return arg


def rewrite_and_partition(captured: Captured, fuse: bool = True
                          ) -> tuple[dict[str, int], Partition]:
    """Stages 2 and 3: the rewrites applied (name -> count) and the partition."""
    rewrites = rewrite(captured)
    return rewrites, partition(captured, supported_aten_ops(), fuse=fuse)


def as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    """Example inputs as a tuple (one tensor, or a sequence of them)."""
    if example_inputs is None:
        raise ValueError("example_inputs are needed to compile a PyTorch model")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)
