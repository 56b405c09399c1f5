"""Make PyTorch's implicit dtype promotions explicit, so TVM computes in the dtype PyTorch does.

- Ops that promote their input's dtype (`cumsum` of a bool mask is int64) get that dtype as
  their `dtype` argument. PyTorch accumulates bool and integer inputs of `cumsum`/`cumprod` in
  int64 unless told otherwise; TVM's importer keeps the input's dtype when no `dtype` is given,
  and a bool cumsum (GPT-2's and Llama's position ids: `mask.cumsum(-1)`) then fails in LLVM
  codegen.
- Element-wise ops get each tensor operand in the dtype PyTorch computes them in (the result's,
  or a comparison's promoted dtype), cast first where it differs, which is what PyTorch's type
  promotion computes. TVM's importer kept an integer input's dtype in a float op, and the kernel
  then failed to import (DeBERTa's log-bucketed relative positions: `log(int_positions / mid)`
  made its embedding kernel run in PyTorch); it promoted `int64_0d + int32_vector` to int64,
  where PyTorch keeps int32 (a 0-d tensor does not promote a dimensioned one), so the kernel
  differed. Python numbers in tensor arguments become 0-d constants of that dtype where the
  importer would make them int32 or float32 of another (Mixtral's `int64_perm // 2` failed to
  import).
"""

from __future__ import annotations

import torch
from torch import fx

from hwaware.rewrite.constants import insert_constant

aten = torch.ops.aten


def explicit_dtypes(gm: fx.GraphModule) -> int:
    """Set `dtype` on each op that takes one, was given none, and returns another dtype than its
    first input's. Returns the count."""
    changed = 0
    for node in gm.graph.nodes:
        if _promotes(node):
            node.kwargs = {**node.kwargs, "dtype": node.meta["val"].dtype}
            changed += 1
    return changed


# Arguments of element-wise ops that are meant to be bool (never cast): `where`'s condition,
# `masked_fill`'s mask
_BOOL_ARGUMENTS = ("condition", "mask")
# Comparisons: a bool result, computed in the operands' promoted dtype
_COMPARISONS = frozenset({"eq", "ne", "lt", "le", "gt", "ge"})
# Element-wise ops that ATen does not tag `pointwise`
_UNTAGGED_ELEMENTWISE = frozenset({"aten::floor_divide"})
# The dtypes TVM's importer gives a Python number: as an operand of a tensor of another dtype,
# some ops (`floor_divide`, rounding `div`) failed to import ("Binary operators must have the
# same datatype": Mixtral's `perm // top_k` on int64)
_IMPORTER_SCALAR_DTYPES = (torch.float32, torch.int32)


def explicit_promotions(gm: fx.GraphModule) -> int:
    """Cast each tensor operand of an element-wise op that has another dtype than the one
    PyTorch computes the op in to that dtype (a plain `aten.to.dtype` before the op), and make
    each Python-number operand in a tensor argument a 0-d constant of that dtype where the
    importer would give it another. Returns how many operands changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        dtype = _compute_dtype(node)
        if dtype is None:
            continue
        for position, operand in _operands(node):
            if isinstance(operand, fx.Node) and _dtype_of(operand) not in (None, dtype):
                _replace_arg(node, position, _cast(gm, node, operand, dtype))
                changed += 1
            elif _is_number(operand) and dtype not in _IMPORTER_SCALAR_DTYPES:
                value = torch.tensor(operand, dtype=dtype)
                _replace_arg(node, position, insert_constant(gm, node, "_operand", value))
                changed += 1
    return changed


def _compute_dtype(node: fx.Node) -> torch.dtype | None:
    """The dtype PyTorch computes an element-wise op in: its result's, or for a comparison its
    tensor operands' promoted dtype. None for any other node."""
    target = node.target
    out = node.meta.get("val")
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or \
            not _elementwise(target) or not isinstance(out, torch.Tensor) or \
            "dtype" in [a.name for a in target._schema.arguments]:
        return None
    if out.dtype != torch.bool:
        return out.dtype
    if target._schema.name.partition("::")[2] not in _COMPARISONS:
        return None
    values = [a.meta["val"] for _, a in _operands(node)
              if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)]
    return torch.result_type(values[0], values[1]) if len(values) == 2 else None


def _elementwise(op: torch._ops.OpOverload) -> bool:
    return torch.Tag.pointwise in op.tags or op._schema.name in _UNTAGGED_ELEMENTWISE


def _operands(node: fx.Node) -> list[tuple[int, fx.node.Argument]]:
    """(position, argument) of each positional argument of a tensor-typed schema slot that is
    not a bool condition or mask."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return []
    schema = node.target._schema.arguments
    return [(i, arg) for i, arg in enumerate(node.args)
            if i < len(schema) and schema[i].name not in _BOOL_ARGUMENTS
            and isinstance(schema[i].type, torch.TensorType)]


def _dtype_of(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cast(gm: fx.GraphModule, before: fx.Node, source: fx.Node, dtype: torch.dtype) -> fx.Node:
    with gm.graph.inserting_before(before):
        cast = gm.graph.call_function(aten.to.dtype, (source, dtype))
    cast.meta["val"] = source.meta["val"].to(dtype)
    return cast


def _replace_arg(node: fx.Node, position: int, value: fx.Node) -> None:
    args = list(node.args)
    args[position] = value
    node.args = tuple(args)


def _promotes(node: fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    names = [a.name for a in target._schema.arguments]
    if "dtype" not in names or node.kwargs.get("dtype") is not None or \
            len(node.args) > names.index("dtype"):
        return False
    first = node.args[0] if node.args else None
    source = first.meta.get("val") if isinstance(first, fx.Node) else None
    out = node.meta.get("val")
    return isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and \
        source.dtype != out.dtype
