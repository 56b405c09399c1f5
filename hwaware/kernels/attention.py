"""Fused attention: one TIR kernel with FlashAttention's online softmax.

Pattern in (rewritten ATen graph, fp32):
- `aten.scaled_dot_product_attention(q, k, v, attn_mask=None|bool|additive, is_causal, scale)`
  with q/k/v of equal leading dims (no GQA broadcast) and no dropout;
- the hand-written form of Hugging Face BERT / GPT-2: `matmul(q, kT)` -> element-wise score ops
  (`/ sqrt(d)`, `* scale`, `+ additive mask`, `where(bool_mask, s, min)`) -> `softmax(-1)`
  -> [eval dropout] -> `matmul(p, v)`.
  The group also takes the view ops (view/permute/transpose/...) that feed q, k, v and the
  element-wise ops that build a mask, where only this attention uses them, and the view ops
  after the output (`permute -> contiguous -> view` back to [B, S, H*D]): the kernel reads and
  writes through those views instead of materialising them.

This module is the TVM-free half (pattern and `Plan`). Kernel out: ONE PrimFunc with
FlashAttention's online softmax (no S x S matrix), built and scheduled by `attention_kernel`,
the lowering half, imported lazily (tile sizes, the TIR template, the "hw_attention" schedule
spaces for cpu and cuda). A causal mask (SDPA's `is_causal`, or a `where` with a
lower-triangular constant) becomes an index test and key blocks above the diagonal are skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import fx

from hwaware.kernels import KernelFamily
from hwaware.program import op_name

log = logging.getLogger(__name__)

RULE = "hw_attention"
NEG = "T.min_value('float32')"
Index = list[str]

Expr = Callable[[Index], str]


# ----------------------------------------------------------------------------- indices
def linear(idx: Index, shape: Sequence[int]) -> str:
    """Row-major linear offset of `idx` in `shape`, as a TVMScript expression."""
    expr = "0"
    for i, s in zip(idx, shape, strict=True):
        expr = i if expr == "0" else f"({expr}) * {s} + {i}"
    return expr


def delinear(offset: str, shape: Sequence[int]) -> Index:
    """The index in `shape` of a row-major linear offset."""
    out, stride = [], 1
    for s in reversed(shape):
        out.append("0" if s == 1 else f"T.floormod(T.floordiv({offset}, {stride}), {s})")
        stride *= s
    return out[::-1]


# ------------------------------------------------------------------------ lazy tensors
@dataclass
class Lazy:
    """A tensor known only by how to read one element: `read(index) -> TVMScript expression`."""

    shape: tuple[int, ...]
    dtype: str
    read: Expr


def _lit(value: Any, dtype: str = "float32") -> Lazy:
    if isinstance(value, bool):
        text = f"T.bool({value})"
        dtype = "bool"
    elif math.isinf(float(value)) or math.isnan(float(value)):
        text = f"T.float32('{float(value)}')"
    else:
        text = f"T.float32({float(value)!r})"
    return Lazy((), dtype, lambda idx: text)


def _reshape_pull(x: Lazy, shape: Sequence[int]) -> Lazy:
    return Lazy(tuple(shape), x.dtype,
                lambda idx: x.read(delinear(linear(idx, shape), x.shape)))


def _broadcast(x: Lazy, shape: tuple[int, ...]) -> Expr:
    lead = len(shape) - len(x.shape)
    return lambda idx: x.read([("0" if s == 1 else i) for i, s in zip(idx[lead:], x.shape,
                                                                    strict=True)])


def _elementwise(fmt: Callable[..., str], out_dtype: str | None, *args: Lazy) -> Lazy:
    shape = tuple(torch.broadcast_shapes(*[a.shape for a in args]))
    reads = [_broadcast(a, shape) for a in args]
    dtype = out_dtype or next((a.dtype for a in args if a.dtype != "bool"), "float32")
    return Lazy(shape, dtype, lambda idx: fmt(*[r(idx) for r in reads]))


def _cast(x: Lazy, dtype: str) -> Lazy:
    if x.dtype == dtype:
        return x
    return Lazy(x.shape, dtype, lambda idx: f"T.Cast('{dtype}', {x.read(idx)})")


def _permute(x: Lazy, dims: Sequence[int]) -> Lazy:
    dims = [d % len(x.shape) for d in dims]
    inverse = [dims.index(k) for k in range(len(dims))]
    return Lazy(tuple(x.shape[d] for d in dims), x.dtype,
                lambda idx: x.read([idx[inverse[k]] for k in range(len(dims))]))


def _transpose(x: Lazy, a: int, b: int) -> Lazy:
    dims = list(range(len(x.shape)))
    a, b = a % len(dims), b % len(dims)
    dims[a], dims[b] = dims[b], dims[a]
    return _permute(x, dims)


def _val_shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(int(s) for s in node.meta["val"].shape)


def _as_lazy(arg: Any) -> Lazy:
    return arg if isinstance(arg, Lazy) else _lit(arg)


def _binary(fmt: str) -> Callable[[fx.Node, list[Any]], Lazy]:
    def handler(node: fx.Node, args: list[Any]) -> Lazy:
        alpha: Any = node.kwargs.get("alpha", 1)
        a, b = _as_lazy(args[0]), _as_lazy(args[1])
        if alpha != 1:
            b = _elementwise(lambda y: f"{y} * T.float32({float(alpha)!r})", None, b)
        return _elementwise(lambda x, y: fmt.format(x, y), None, a, b)
    return handler


def _view(node: fx.Node, args: list[Any]) -> Lazy:
    return _reshape_pull(args[0], _val_shape(node))


def _identity(node: fx.Node, args: list[Any]) -> Lazy:
    return args[0]  # type: ignore[no-any-return]


def _to(node: fx.Node, args: list[Any]) -> Lazy:
    return _cast(args[0], str(node.meta["val"].dtype).removeprefix("torch."))


def _full(node: fx.Node, args: list[Any]) -> Lazy:
    value = _lit(args[1])
    return Lazy(_val_shape(node), value.dtype, value.read)


def _where(node: fx.Node, args: list[Any]) -> Lazy:
    c, a, b = (_as_lazy(x) for x in args[:3])
    return _elementwise(lambda x, y, z: f"T.if_then_else({x}, {y}, {z})", a.dtype, c, a, b)


# Ops the kernel evaluates element by element through views; the same table decides what find()
# may put in a group, so find and lower never disagree.
PULL_OPS: dict[str, Callable[[fx.Node, list[Any]], Lazy]] = {
    "aten.view.default": _view, "aten.reshape.default": _view,
    "aten._unsafe_view.default": _view, "aten.unsqueeze.default": _view,
    "aten.squeeze.dim": _view, "aten.squeeze.dims": _view, "aten.flatten.using_ints": _view,
    "aten.permute.default": lambda n, a: _permute(a[0], a[1]),
    "aten.transpose.int": lambda n, a: _transpose(a[0], a[1], a[2]),
    "aten.t.default": lambda n, a: _transpose(a[0], 0, 1),
    "aten.expand.default": lambda n, a: Lazy(_val_shape(n), a[0].dtype,
                                             _broadcast(a[0], _val_shape(n))),
    "aten.contiguous.default": _identity, "aten.clone.default": _identity,
    "aten.alias.default": _identity, "aten.detach.default": _identity,
    "aten.to.dtype": _to, "aten._to_copy.default": _to,
    "aten.add.Tensor": _binary("({0} + {1})"), "aten.sub.Tensor": _binary("({0} - {1})"),
    "aten.mul.Tensor": _binary("({0} * {1})"), "aten.div.Tensor": _binary("({0} / {1})"),
    "aten.add.Scalar": _binary("({0} + {1})"), "aten.sub.Scalar": _binary("({0} - {1})"),
    "aten.mul.Scalar": _binary("({0} * {1})"), "aten.div.Scalar": _binary("({0} / {1})"),
    "aten.rsub.Scalar": _binary("({1} - {0})"), "aten.rsub.Tensor": _binary("({1} - {0})"),
    "aten.neg.default": lambda n, a: _elementwise(lambda x: f"(-{x})", None, a[0]),
    "aten.logical_not.default": lambda n, a: _elementwise(lambda x: f"(not {x})", "bool", a[0]),
    "aten.where.self": _where, "aten.where.ScalarOther": _where, "aten.where.ScalarSelf": _where,
    "aten.masked_fill.Scalar": lambda n, a: _where(n, [a[1], a[2], a[0]]),
    "aten.full.default": _full, "aten.scalar_tensor.default": _full,
}
# Ops with no value that export leaves next to the tensors they check.
NO_VALUE_OPS = {"aten._assert_tensor_metadata.default"}
# View ops the kernel can write its output through.
PUSH_OPS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
            "aten.permute.default", "aten.transpose.int", "aten.contiguous.default",
            "aten.clone.default", "aten.unsqueeze.default", "aten.squeeze.dim",
            "aten.flatten.using_ints"}
# Element-wise ops allowed between the scores and the softmax.
SCORE_OPS = {"aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
             "aten.add.Scalar", "aten.sub.Scalar", "aten.mul.Scalar", "aten.div.Scalar",
             "aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf",
             "aten.masked_fill.Scalar", "aten.to.dtype",
             "aten._to_copy.default", "aten.contiguous.default", "aten.clone.default",
             "aten.alias.default", "aten.detach.default"}
SDPA = "aten.scaled_dot_product_attention.default"
MATMULS = {"aten.matmul.default", "aten.bmm.default"}
SOFTMAX = {"aten.softmax.int", "aten._softmax.default"}


def _op(node: fx.Node) -> str:
    try:
        return op_name(node.target)
    except TypeError:  # not an ATen op (a Python builtin on sizes, ...)
        return ""


# ------------------------------------------------------------------------------ find
@dataclass
class Match:
    """One attention found in a graph: its core nodes and what feeds them."""

    q: fx.Node | None            # SDPA q, or the first matmul's left operand
    k: fx.Node | None            # SDPA k (rows = keys), or None for the hand-written form
    kt: fx.Node | None           # the first matmul's right operand ([..., D, Sk])
    v: fx.Node
    core: list[fx.Node]          # sdpa, or matmul -> score ops -> softmax -> [dropout] -> matmul
    chain: list[fx.Node] = field(default_factory=list)  # the score ops, in order
    outputs: list[fx.Node] = field(default_factory=list)  # view ops after the result


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of nodes, one per supported attention (see the module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups: list[list[fx.Node]] = []
    taken: set[fx.Node] = set()
    for node in gm.graph.nodes:
        match = _match(node)
        if match is None or taken & set(match.core):
            continue
        group = _grow(match, order)
        if group is not None:
            groups.append(group)
            taken.update(group)
    return groups


def _match(node: fx.Node) -> Match | None:
    op = _op(node) if node.op == "call_function" else ""
    if op == SDPA:
        return _match_sdpa(node)
    if op in MATMULS:
        return _match_handwritten(node)
    return None


def _fp32(*nodes: fx.Node) -> bool:
    vals = [n.meta.get("val") for n in nodes]
    return all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in vals)


def _skip(node: fx.Node, why: str) -> Any:
    """Log why an attention stays on the unfused path; returns None for `return _skip(...)`."""
    log.debug("attention at %s stays unfused: %s", node.name, why)


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa"]
    defaults = [None, None, None, None, 0.0, False, None, False]
    args: dict[str, Any] = dict(zip(names, defaults, strict=True))
    args.update(zip(names, node.args, strict=False))
    args.update(node.kwargs)
    return args


def kept_share(run: list[fx.Node], graph: fx.GraphModule) -> float:
    """The share of its (query, key) pairs a fused attention kernel computes: those on or below
    the diagonal under a causal mask (SDPA's is_causal, or GPT-2's where(tril, ...)), since it
    skips the key blocks above; 1 without one. Its FLOP count counts only those."""
    for node in run:
        if _op(node) == "aten.scaled_dot_product_attention.default":
            a = _sdpa_args(node)
            sq, sk = _val_shape(a["query"])[-2], _val_shape(a["key"])[-2]
            return _causal_share(sq, sk, 0) if a["is_causal"] else 1.0
        if _op(node) in ("aten.where.self", "aten.where.ScalarOther"):
            sq, sk = _val_shape(node)[-2:]
            if _causal_where([node], graph, sq, sk) is not None:
                return _causal_share(sq, sk, sk - sq)
    return 1.0


def _causal_share(sq: int, sk: int, offset: int) -> float:
    """The share of an (sq x sk) score matrix with key <= row + offset."""
    return sum(min(sk, max(0, row + offset + 1)) for row in range(sq)) / (sq * sk)


def _match_sdpa(node: fx.Node) -> Match | None:
    a = _sdpa_args(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    if not _fp32(q, k, v, node):
        return _skip(node, "not float32")
    if a["dropout_p"] or a["enable_gqa"]:
        return _skip(node, "dropout or GQA")
    qs, ks, vs = (_val_shape(x) for x in (q, k, v))
    if len(qs) < 3 or not qs[:-2] == ks[:-2] == vs[:-2] or ks[-2] != vs[-2]:
        return _skip(node, f"q/k/v leading dims differ or broadcast: {qs} {ks} {vs}")
    if mask is not None:
        if a["is_causal"]:
            return _skip(node, "both a mask and is_causal")
        if not isinstance(mask, fx.Node) or not _mask_ok(mask, qs[:-1] + (ks[-2],)):
            return _skip(node, "mask is not a bool/fp32 tensor broadcastable to the scores")
    return Match(q=q, k=k, kt=None, v=v, core=[node])


def _mask_ok(mask: fx.Node, scores: tuple[int, ...]) -> bool:
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.bool, torch.float32):
        return False
    try:
        return tuple(torch.broadcast_shapes(tuple(val.shape), scores)) == scores
    except RuntimeError:
        return False


def _match_handwritten(mm: fx.Node) -> Match | None:
    """matmul(q, kT) -> element-wise chain -> softmax(-1) -> [dropout] -> matmul(p, v)."""
    chain: list[fx.Node] = []
    node = mm
    while True:
        users = _value_users(node)
        if len(users) != 1:
            return None
        nxt = users[0]
        op = _op(nxt)
        if op in SOFTMAX:
            break
        if op not in SCORE_OPS or _val_shape(nxt) != _val_shape(mm):
            return None
        chain.append(nxt)
        node = nxt
    softmax = nxt
    if _softmax_dim(softmax) not in (-1, len(_val_shape(mm)) - 1):
        return _skip(softmax, "softmax not over the last dim")
    probs = softmax
    users = _value_users(probs)
    if len(users) == 1 and _op(users[0]) == "aten.dropout.default" and not users[0].args[2]:
        probs = users[0]
        users = _value_users(probs)
    if len(users) != 1 or _op(users[0]) not in MATMULS or users[0].args[0] is not probs:
        return None
    mm2 = users[0]
    q, kt, v = (cast(fx.Node, a) for a in (mm.args[0], mm.args[1], mm2.args[1]))
    if not all(isinstance(x, fx.Node) for x in (q, kt, v)):
        return None
    if not _fp32(q, kt, v, mm2, softmax):
        return _skip(mm, "not float32")
    qs, kts, vs = (_val_shape(x) for x in (q, kt, v))
    if len(qs) < 3 or not qs[:-2] == kts[:-2] == vs[:-2] or kts[-1] != vs[-2]:
        return _skip(mm, f"q/kT/v leading dims differ or broadcast: {qs} {kts} {vs}")
    for op_node in chain:
        if _chain_operand(op_node, chain, mm) is None:
            return _skip(op_node, f"score op {_op(op_node)} not supported in the kernel")
    core = [mm, *chain, softmax] + ([probs] if probs is not softmax else []) + [mm2]
    return Match(q=q, k=None, kt=kt, v=v, core=core, chain=chain)


def _softmax_dim(node: fx.Node) -> int:
    return int(node.args[1])  # type: ignore[arg-type]


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if _op(u) not in NO_VALUE_OPS]


def _chain_operand(node: fx.Node, chain: list[fx.Node], mm: fx.Node) -> int | None:
    """Which argument of a score op is the scores (the others are masks and scalars)."""
    prev = chain[chain.index(node) - 1] if chain.index(node) else mm
    positions = [i for i, a in enumerate(node.args) if a is prev]
    return positions[0] if len(positions) == 1 else None


def _grow(match: Match, order: dict[fx.Node, int]) -> list[fx.Node] | None:
    """The core plus the private producers of its inputs (as many as keep every outside input
    before the group's first node), the output views, and no-value checks on group values."""
    core = match.core
    members = set(core)
    outputs = _output_views(core[-1])
    match.outputs = outputs
    members.update(outputs)
    producers = _private_producers(members, order)
    first_core = order[core[0]]
    cuts = sorted({order[n] for n in producers} | {first_core})
    for cut in cuts:
        group = members | {n for n in producers if order[n] >= cut}
        group |= _checks_of(group)
        if all(order[i] < min(order[n] for n in group) for i in _outside_inputs(group)):
            return sorted(group, key=order.__getitem__)
    return _skip(core[0], "an input of the attention is computed after it starts")


def _output_views(last: fx.Node) -> list[fx.Node]:
    views: list[fx.Node] = []
    node = last
    while True:
        users = _value_users(node)
        if len(users) != 1 or _op(users[0]) not in PUSH_OPS or users[0].args[0] is not node:
            return views
        node = users[0]
        views.append(node)


def _private_producers(members: set[fx.Node], order: dict[fx.Node, int]) -> set[fx.Node]:
    """call_function producers the kernel can evaluate and that only the group uses."""
    found: set[fx.Node] = set()
    frontier = [i for n in members for i in n.all_input_nodes]
    while frontier:
        node = frontier.pop()
        if node in found or node in members or node.op != "call_function" or \
                _op(node) not in PULL_OPS:
            continue
        if any(u not in members | found and _op(u) not in NO_VALUE_OPS for u in node.users):
            continue
        found.add(node)
        frontier.extend(node.all_input_nodes)
    # a producer is private only if all its users end up inside: re-check to a fixed point
    changed = True
    while changed:
        changed = False
        for node in list(found):
            if any(u not in members | found and _op(u) not in NO_VALUE_OPS for u in node.users):
                found.discard(node)
                changed = True
    return found


def _checks_of(group: set[fx.Node]) -> set[fx.Node]:
    return {u for n in group for u in n.users if _op(u) in NO_VALUE_OPS}


def _outside_inputs(group: set[fx.Node]) -> list[fx.Node]:
    return [i for n in group for i in n.all_input_nodes
            if i not in group and i.op not in ("get_attr",)]


# ---------------------------------------------------------------------------- lower
@dataclass
class Plan:
    """What the kernel template needs, derived from the kernel graph."""

    q: Lazy                      # [*lead, Sq, D]
    k: Lazy                      # [*lead, Sk, D]
    v: Lazy                      # [*lead, Sk, Dv]
    score: Callable[[Index, str], str]  # ([*lead, row, key], raw q.k) -> softmax input
    causal_offset: int | None    # keys <= row + offset are kept; None: not causal
    out_shape: tuple[int, ...] = ()
    out_index: Callable[[Index], Index] = lambda idx: idx
    params: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def lead(self) -> tuple[int, ...]:
        return self.q.shape[:-2]

    @property
    def sq(self) -> int:
        return self.q.shape[-2]

    @property
    def sk(self) -> int:
        return self.k.shape[-2]

    @property
    def d(self) -> int:
        return self.q.shape[-1]

    @property
    def dv(self) -> int:
        return self.v.shape[-1]


class _Evaluator:
    """Turns kernel-graph nodes into `Lazy` tensors; placeholders and constant tensors become
    kernel parameters, one-element constants become literals."""

    def __init__(self, graph: fx.GraphModule):
        self.graph = graph
        self.env: dict[fx.Node, Lazy] = {}
        self.params: list[tuple[str, tuple[int, ...], str]] = []
        self.constants: dict[str, torch.Tensor] = {}

    def __call__(self, arg: Any) -> Any:
        if isinstance(arg, (list, tuple)):
            return [self(a) for a in arg]
        if not isinstance(arg, fx.Node):
            return arg
        if arg not in self.env:
            self.env[arg] = self._evaluate(arg)
        return self.env[arg]

    def _evaluate(self, node: fx.Node) -> Lazy:
        if node.op not in ("placeholder", "get_attr"):
            return PULL_OPS[_op(node)](node, [self(a) for a in node.args])
        name = f"p_{node.name}"
        if node.op == "get_attr":
            tensor = _attr(self.graph, str(node.target))
            if tensor.numel() == 1:
                literal = _lit(tensor.item())
                return Lazy(tuple(tensor.shape), literal.dtype, literal.read)
            self.constants[name] = tensor.contiguous()
        shape, dtype = _val_shape(node), _dtype(node)
        self.params.append((name, shape, dtype))
        return Lazy(shape, dtype, lambda idx: f"{name}[{', '.join(idx) if idx else '()'}]")


def _attr(graph: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = graph
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach()  # type: ignore[no-any-return]


def _dtype(node: fx.Node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")


def plan_of(graph: fx.GraphModule) -> Plan:
    """Re-derive the attention (shapes, masks, views) from a kernel graph."""
    match = next((m for m in map(_match, graph.graph.nodes) if m is not None), None)
    if match is None:
        raise ValueError("no supported attention in this kernel graph")
    value = _Evaluator(graph)
    plan = _sdpa_plan(match.core[0], value) if _op(match.core[0]) == SDPA \
        else _handwritten_plan(match, value, graph)
    plan.out_shape, plan.out_index = _push(_output_views(match.core[-1]),
                                           plan.q.shape[:-1] + (plan.dv,))
    plan.params, plan.constants = value.params, value.constants
    return plan


def _sdpa_plan(node: fx.Node, value: _Evaluator) -> Plan:
    a = _sdpa_args(node)
    q, k, v = value(a["query"]), value(a["key"]), value(a["value"])
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = value(a["attn_mask"]) if a["attn_mask"] is not None else None
    mask_read = _broadcast(mask, q.shape[:-1] + (k.shape[-2],)) if mask else None

    def score(idx: Index, raw: str) -> str:
        scaled = f"{raw} * T.float32({float(scale)!r})"
        if mask is None or mask_read is None:
            return scaled
        if mask.dtype == "bool":
            return f"T.if_then_else({mask_read(idx)}, {scaled}, {NEG})"
        return f"({scaled} + {mask_read(idx)})"

    return Plan(q, k, v, score, 0 if a["is_causal"] else None)


RAW = "__raw_score__"


def _handwritten_plan(match: Match, value: _Evaluator, graph: fx.GraphModule) -> Plan:
    q, kt, v = value(match.q), value(match.kt), value(match.v)
    k = _transpose(kt, -1, -2)
    mm = match.core[0]
    value.env[mm] = Lazy(_val_shape(mm), "float32", lambda idx: RAW)
    causal = _causal_where(match.chain, graph, q.shape[-2], k.shape[-2])
    if causal is not None:  # the index test in the kernel replaces the mask
        value.env[causal] = value(causal.args[1])
    scores = value(match.chain[-1]) if match.chain else value.env[mm]

    def score(idx: Index, raw: str) -> str:
        return scores.read(idx).replace(RAW, raw)

    offset = k.shape[-2] - q.shape[-2] if causal is not None else None
    return Plan(q, k, v, score, offset)


def _causal_where(chain: list[fx.Node], graph: fx.GraphModule, sq: int, sk: int
                  ) -> fx.Node | None:
    """The `where(tril, scores, very negative)` of GPT-2's causal mask, if the chain has one."""
    for node in chain:
        if _op(node) not in ("aten.where.self", "aten.where.ScalarOther"):
            continue
        cond, fill = node.args[0], node.args[2]
        if not isinstance(cond, fx.Node) or cond.op != "get_attr":
            continue
        mask = _attr(graph, str(cond.target))
        fill_value = _scalar_value(fill, graph)
        if mask.dtype != torch.bool or fill_value is None or fill_value > -1e30:
            continue
        if mask.shape[-2:] != (sq, sk) or any(s != 1 for s in mask.shape[:-2]):
            continue
        tril = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        if torch.equal(mask.reshape(sq, sk), tril):
            return node
    return None


def _scalar_value(arg: Any, graph: fx.GraphModule) -> float | None:
    if isinstance(arg, (int, float)):
        return float(arg)
    if isinstance(arg, fx.Node) and _op(arg) in ("aten.full.default",
                                                 "aten.scalar_tensor.default"):
        fill: Any = arg.args[1] if _op(arg) == "aten.full.default" else arg.args[0]
        return float(fill)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        tensor = _attr(graph, str(arg.target))
        return float(tensor.item()) if tensor.numel() == 1 else None
    return None


def _push(views: list[fx.Node], shape: tuple[int, ...]
          ) -> tuple[tuple[int, ...], Callable[[Index], Index]]:
    """Where element `index` of the attention result lands after the output view ops."""
    mapping: Callable[[Index], Index] = lambda idx: idx  # noqa: E731
    for node in views:
        new_shape = _val_shape(node)
        mapping = _push_one(node, mapping, shape, new_shape)
        shape = new_shape
    return shape, mapping


def _push_one(node: fx.Node, inner: Callable[[Index], Index], shape: tuple[int, ...],
              new_shape: tuple[int, ...]) -> Callable[[Index], Index]:
    op = _op(node)
    if op in ("aten.permute.default", "aten.transpose.int"):
        dims = list(range(len(shape)))
        if op == "aten.permute.default":
            dims = [int(d) % len(shape) for d in cast(list, node.args[1])]
        else:
            a, b = (int(cast(int, x)) % len(shape) for x in node.args[1:3])
            dims[a], dims[b] = dims[b], dims[a]
        return lambda idx: [inner(idx)[d] for d in dims]
    if op in ("aten.contiguous.default", "aten.clone.default"):
        return inner
    return lambda idx: delinear(linear(inner(idx), shape), new_shape)


FAMILY = KernelFamily(name="attention", rule=RULE, find=find,
                      lowering="hwaware.kernels.attention_kernel", computed_share=kept_share)
