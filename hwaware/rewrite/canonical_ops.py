"""Write ops that TVM's exported-program importer lacks as equivalent ops it has.

- ATen's aliases (`multiply`, `subtract`, `divide`, `greater`, ...) become the ops they alias
  (`mul`, `sub`, `div`, `gt`, ...), overload for overload: ConvBERT's `aten.multiply.Tensor`
  ran on the host.
- `where` with a Python scalar for a branch (`where.ScalarOther`, `where.ScalarSelf`,
  `where.Scalar`) becomes `where.self` with the scalar as a 0-d constant of the result's dtype:
  MPNet, GPT-Neo and BLOOM each ran one such `where` on the host, which split their graphs.
- `clamp` of an integer tensor with one bound gets the dtype's extreme for the other: the
  importer filled it with infinity, which no integer holds, and the kernel failed to import.
- `pow` of a floating tensor to 2, 3, 0.5, -0.5 or -1 becomes the ops PyTorch's own CPU and CUDA
  kernels compute it with (`x * x`, `x * x * x`, `sqrt`, `rsqrt`, `reciprocal`): TVM calls
  `powf` per element, which LLVM cannot vectorize; GPT-2's GELU (`pow(x, 3.0)`) took 9 us of
  a 2 us kernel, and RMSNorm's `pow(x, 2)` sits in every Llama and T5 layer.
Each rewrite happens only where the op it writes is one the importer translates
(`hwaware.aten_ops`).
"""

from __future__ import annotations

import torch
from torch import fx

from hwaware.aten_ops import SUPPORTED_ATEN_OPS
from hwaware.rewrite.constants import insert_constant

aten = torch.ops.aten

# alias -> the op it is (ATen's `native_functions.yaml` aliases)
ALIASES = {
    "multiply": "mul", "subtract": "sub", "divide": "div", "true_divide": "div",
    "greater": "gt", "greater_equal": "ge", "less": "lt", "less_equal": "le",
    "not_equal": "ne", "negative": "neg", "absolute": "abs", "clip": "clamp", "fix": "trunc",
    "arccos": "acos", "arcsin": "asin", "arctan": "atan", "arccosh": "acosh",
    "arcsinh": "asinh", "arctanh": "atanh", "arctan2": "atan2",
}
SCALAR_WHERES = ("ScalarOther", "ScalarSelf", "Scalar")


def canonical_ops(gm: fx.GraphModule) -> int:
    """Rewrite each aliased op and each `where` with a scalar branch (see the module
    docstring). Returns the count."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        canonical = _canonical(node.target)
        if canonical is not None:
            node.target = canonical
            changed += 1
        elif _is_scalar_where(node.target):
            _where_with_constants(gm, node)
            changed += 1
        elif _is_integer_clamp_with_one_bound(node):
            _clamp_with_both_bounds(node)
            changed += 1
        elif (form := _special_power(node)) is not None:
            _power_as_products(gm, node, form)
            changed += 1
    return changed


def _canonical(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """The op `op` aliases, with the same overload and arguments, where the importer has it."""
    namespace, name = op._schema.name.split("::")
    if namespace != "aten" or name not in ALIASES:
        return None
    packet = getattr(aten, ALIASES[name], None)
    target = getattr(packet, op._overloadname, None) if packet is not None else None
    if not isinstance(target, torch._ops.OpOverload) or \
            f"{ALIASES[name]}.{op._overloadname}" not in SUPPORTED_ATEN_OPS:
        return None
    same = [a.name for a in target._schema.arguments] == [a.name for a in op._schema.arguments]
    return target if same else None


def _is_scalar_where(op: torch._ops.OpOverload) -> bool:
    return op._schema.name == "aten::where" and op._overloadname in SCALAR_WHERES


def _where_with_constants(gm: fx.GraphModule, node: fx.Node) -> None:
    """`where(condition, a, b)` with scalar `a` or `b` -> `where.self` with 0-d constants."""
    dtype = node.meta["val"].dtype
    condition, *branches = node.args
    args: list[fx.node.Argument] = [condition]
    for value in branches:
        if isinstance(value, fx.Node):
            args.append(value)
            continue
        args.append(insert_constant(gm, node, "_where_scalar", torch.tensor(value, dtype=dtype)))
    node.target, node.args = aten.where.self, tuple(args)


def _is_integer_clamp_with_one_bound(node: fx.Node) -> bool:
    out = node.meta.get("val")
    return node.target is aten.clamp.default and isinstance(out, torch.Tensor) and \
        not out.dtype.is_floating_point and out.dtype != torch.bool and \
        (_clamp_bounds(node).count(None) == 1)


def _clamp_bounds(node: fx.Node) -> list[fx.node.Argument]:
    bounds = list(node.args[1:3]) + [None] * (3 - len(node.args))
    names = ("min", "max")
    return [node.kwargs.get(name, bound) for name, bound in zip(names, bounds, strict=True)]


def _clamp_with_both_bounds(node: fx.Node) -> None:
    """`clamp(x, min=a)` -> `clamp(x, a, <dtype max>)` (and the same for a missing `min`)."""
    info = torch.iinfo(node.meta["val"].dtype)
    low, high = _clamp_bounds(node)
    node.args = (node.args[0], info.min if low is None else low, info.max if high is None else high)
    node.kwargs = {}


# exponent -> how PyTorch's `pow_tensor_scalar` kernels compute it (ATen's PowKernel)
POWERS = {2.0: "square", 3.0: "cube", 0.5: "sqrt", -0.5: "rsqrt", -1.0: "reciprocal"}


def _special_power(node: fx.Node) -> str | None:
    """How a `pow(x, exponent)` node of a floating tensor is computed without `pow` (a key of
    `POWERS`'s values), or None."""
    if node.target is not aten.pow.Tensor_Scalar or len(node.args) != 2 or node.kwargs:
        return None
    base, exponent = node.args
    value = node.meta.get("val")
    if not isinstance(base, fx.Node) or not isinstance(value, torch.Tensor) or \
            not value.dtype.is_floating_point or isinstance(exponent, bool) or \
            not isinstance(exponent, (int, float)):
        return None
    base_value = base.meta.get("val")
    if not isinstance(base_value, torch.Tensor) or base_value.dtype != value.dtype:
        return None  # an integer base promoted by a float exponent
    return POWERS.get(float(exponent))


def _power_as_products(gm: fx.GraphModule, node: fx.Node, form: str) -> None:
    """`pow(x, e)` -> `x * x`, `(x * x) * x`, `sqrt(x)`, `rsqrt(x)` or `reciprocal(x)` (`form`,
    from `_special_power`)."""
    base = node.args[0]
    assert isinstance(base, fx.Node)
    if form in ("square", "cube"):
        node.target, node.args = aten.mul.Tensor, (base, base)
        if form == "cube":
            with gm.graph.inserting_after(node):
                cube = gm.graph.call_function(aten.mul.Tensor, (node, base))
            cube.meta = dict(node.meta)
            node.replace_all_uses_with(cube, delete_user_cb=lambda user: user is not cube)
        return
    node.target = {"sqrt": aten.sqrt.default, "rsqrt": aten.rsqrt.default,
                   "reciprocal": aten.reciprocal.default}[form]
    node.args = (base,)
