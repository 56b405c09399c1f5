"""Index guards: a TVM kernel never reads or writes out of bounds on indices the user passed in.

PyTorch checks every index it gathers or scatters by (`embedding`, `index_select`, `x[idx]`,
`gather`, `scatter_add`, `index_add`, ...) and raises `IndexError` for one out of range. TVM's
kernels do not: its importer emits `take` in "fast" mode, which reads past the end of the tensor
(a token id beyond the vocabulary crashed the process), and hwaware's own sparse kernels
(`kernels/gnn_kernel.py`) index by edge vectors unchecked (a node id beyond the node count gave
a silently wrong result). Negative indices, which `x[idx]` wraps in PyTorch, read before the
start.

Goes in (at partition time): a kernel's ATen nodes. Comes out: its guards, `IndexCheck`s
(JSON-serializable, saved in `KernelSpec.index_checks`): which kernel input is used as an index,
which of its rows (an edge_index's `select`), and the size it indexes into. At run time
(`runtime.py`), `out_of_range` checks them before the TVM kernel runs; a kernel whose indices
are out of range runs its PyTorch ops instead, which raise PyTorch's own error (or, for negative
indices that PyTorch wraps, compute the right result).

Checked: indices that reach the kernel as inputs, followed back through ops that keep their
values (views, expands, copies, an int dtype change). An index the kernel computes itself from
something else (an `arange`, arithmetic) is the model's own and is not checked. A check is
conservative: where an index is a slice of an input, the whole input is checked, and where it
fails, the kernel runs in PyTorch, which decides.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hwaware.program import KernelStep, OpStep, Program, op_name

# [input position, [[dim, index] of `select`s applied to that input, in order], exclusive bound,
#  optionally the lowest index allowed (0 if absent; -bound for ONNX, which counts from the back)]
IndexCheck = list[Any]

# ops whose output holds the same index values as their first argument (or a subset of them)
_SAME_VALUES = {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default",
    "aten.flatten.using_ints", "aten.expand.default", "aten.expand_as.default",
    "aten.clone.default", "aten.contiguous.default", "aten.alias.default",
    "aten.detach.default", "aten.permute.default", "aten.t.default", "aten.transpose.int",
    "aten._to_copy.default", "aten.to.dtype", "aten.slice.Tensor", "aten.select.int",
    "aten.lift_fresh_copy.default",
}
# ops that index dim `dim` (an argument) of argument 0 with the index at argument 2
_BY_DIM = {
    "aten.index_select.default", "aten.gather.default", "aten.scatter.src",
    "aten.scatter.value", "aten.scatter_add.default", "aten.scatter_reduce.two",
    "aten.index_add.default", "aten.index_copy.default", "aten.index_fill.int_Scalar",
    "aten.index_fill.int_Tensor",
}
_BY_POSITION = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}


def index_checks(run: list[fx.Node], inputs: list[fx.Node]) -> list[IndexCheck]:
    """The guards of the kernel made of `run` (ATen nodes) with external `inputs`."""
    position = {node: i for i, node in enumerate(inputs)}
    found: list[IndexCheck] = []
    for node in run:
        for index, bound in _indexed(node):
            check = _traced(index, bound, position)
            if check is not None and check not in found:
                found.append(check)
    return _merged(found)


def _indexed(node: fx.Node) -> list[tuple[Any, int]]:
    """(index node, size it indexes into) of each tensor index `node` uses."""
    op = op_name(node.target) if node.op == "call_function" else ""
    args: Any = node.args
    if op == "aten.embedding.default":
        return _bounded(args[1], _size(args[0], 0))
    if op in _BY_DIM:
        return _bounded(args[2], _size(args[0], args[1]))
    if op == "aten.take.default":
        shape = _shape(args[0])
        return _bounded(args[1], _numel(shape))
    if op in _BY_POSITION:
        return [pair for dim, index in enumerate(args[1]) if index is not None
                for pair in _bounded(index, _size(args[0], dim))]
    return []


def _bounded(index: Any, bound: int | None) -> list[tuple[Any, int]]:
    val = index.meta.get("val") if isinstance(index, fx.Node) else None
    integral = isinstance(val, torch.Tensor) and not val.is_floating_point() and \
        val.dtype != torch.bool and not val.is_complex()
    return [(index, bound)] if integral and bound is not None else []


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _size(node: Any, dim: Any) -> int | None:
    shape = _shape(node)
    if shape is None or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        return None
    size = shape[dim]
    return size if isinstance(size, int) else None  # a symbolic size: not checkable here


def _numel(shape: tuple[Any, ...] | None) -> int | None:
    if shape is None or not all(isinstance(s, int) for s in shape):
        return None
    total = 1
    for s in shape:
        total *= s
    return total


def _traced(index: fx.Node, bound: int, position: dict[fx.Node, int]) -> IndexCheck | None:
    """The check of the kernel input `index` comes from (through value-keeping ops), if any."""
    node: Any = index
    while node not in position:
        op = op_name(node.target) if isinstance(node, fx.Node) and \
            node.op == "call_function" else ""
        if op not in _SAME_VALUES or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        source = node.args[0]
        if op == "aten.select.int" and source in position and isinstance(node.args[1], int) \
                and isinstance(node.args[2], int):
            return [position[source], [[node.args[1], node.args[2]]], bound]
        if op in ("aten._to_copy.default", "aten.to.dtype") and not _integral(source):
            return None
        node = source
    return [position[node], [], bound]


def _integral(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and not val.is_floating_point() and \
        val.dtype != torch.bool


def _merged(checks: list[IndexCheck]) -> list[IndexCheck]:
    """One check of a whole input where every check of it has the same bound (an edge_index
    whose two rows index the same node count: one min/max instead of two)."""
    by_input: dict[int, list[IndexCheck]] = {}
    for check in checks:
        by_input.setdefault(check[0], []).append(check)
    merged: list[IndexCheck] = []
    for i, group in by_input.items():
        bounds = {c[2] for c in group}
        merged += [[i, [], bounds.pop()]] if len(bounds) == 1 else group
    return merged


def out_of_range(checks: list[IndexCheck], inputs: list[Any]) -> str | None:
    """The first guarded index among a kernel's `inputs` outside its range (below its lower
    bound, 0 unless the check allows negatives, or not below its bound), described; else None."""
    for check in checks:
        i, selects, bound = check[:3]
        lowest = check[3] if len(check) > 3 else 0
        index = inputs[i]
        for dim, at in selects:
            index = index.select(dim, at)
        if index.numel():
            low, high = (int(v) for v in torch.aminmax(index))
            if low < lowest or high >= bound:
                return f"input {i} holds index {low if low < lowest else high}, outside " \
                    f"[{lowest}, {bound})"
    return None


def whole_program_checks(program: Program) -> list[IndexCheck]:
    """The guards of `program` run as one TVM call: each kernel's, on the program input its
    index comes from (through host ops that keep values; the whole input, conservatively).
    An index the program computes itself is the model's own, as inside a kernel."""
    input_position = {slot: i for i, slot in enumerate(program.input_slots)}
    made_by = {s.out: s for s in program.steps if isinstance(s, OpStep)}
    found: list[IndexCheck] = []
    for step in program.steps:
        if not isinstance(step, KernelStep):
            continue
        for i, selects, bound in program.kernels[step.kernel].index_checks:
            slot = step.inputs[i]
            while slot in made_by and made_by[slot].op in _SAME_VALUES and \
                    _slot_of(made_by[slot].args[0]) is not None:
                slot, selects = _slot_of(made_by[slot].args[0]), []
            check = [input_position[slot], selects, bound] if slot in input_position else None
            if check is not None and check not in found:
                found.append(check)
    return _merged(found)


def _slot_of(arg: Any) -> Any:
    return arg.get("v") if isinstance(arg, dict) else None


# ONNX ops that index axis `axis` (default 0) of input 0 with input 1, negatives from the back
_ONNX_BY_AXIS = {"Gather", "GatherElements", "ScatterElements"}
_ONNX_SAME_VALUES = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand",
                     "Transpose", "Cast"}


def onnx_index_checks(model: Any, inputs: list[str], shapes: dict[str, tuple[int, ...]]
                      ) -> list[IndexCheck]:
    """The guards of an ONNX graph run as one kernel: indices of `Gather`, `GatherElements`
    and `ScatterElements` that come from graph `inputs` (through ops that keep values), against
    their axis's size (from `shapes`, the static shapes of inputs, or an initializer's)."""
    sizes = dict(shapes)
    sizes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    made_by = {out: node for node in model.graph.node for out in node.output}
    position = {name: i for i, name in enumerate(inputs)}
    found: list[IndexCheck] = []
    for node in model.graph.node:
        if node.op_type not in _ONNX_BY_AXIS or len(node.input) < 2:
            continue
        shape = sizes.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        source = node.input[1]
        while source in made_by and made_by[source].op_type in _ONNX_SAME_VALUES:
            source = made_by[source].input[0]
        if shape is None or source not in position or not -len(shape) <= axis < len(shape):
            continue
        bound = int(shape[axis])
        check = [position[source], [], bound, -bound]
        if check not in found:
            found.append(check)
    return found
