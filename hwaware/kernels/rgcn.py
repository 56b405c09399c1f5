"""Relational GNN (RGCN) layers as one kernel: per-(node, relation) mean (or sum) aggregation
feeding one segmented GEMM, with no per-edge weight copy.

Pattern in (the rewritten ATen graph; what `torch.export` makes of PyG's `RGCNConv` on its
relation loop, the path PyG takes without pyg-lib's segment_matmul, or of a hand-written layer):
  out = [zeros | matmul(x, root)] + sum_r matmul(mean_{j -> i, type == r} x_j, W_r) [+ bias]
where relation r's edges are `index(edge_index, [None, eq(edge_type, r)])` and its mean is the
gnn family's gather-scatter mean (`gnn._match_spmm`: SAGE-style sum / clamp(count, 1), or
`scatter_reduce(mean)`); RGCNConv(aggr="add") sums instead, which the kernel does too. The
masks, their data-dependent edge counts (and the runtime asserts on them) join the group: the
kernel reads x, edge_index and edge_type themselves. Relations must be 0..R-1, each with a
constant weight; the sum is a chain of adds whose parts are used only by the chain. Other
aggregations (max) and partial layers stay with `gnn` and the ordinary kernels. This family runs
before `gnn`, whose per-relation aggregations it contains.
PyG's `FastRGCNConv` is taken too: its message `x[src] @ W[edge_type]` (a bmm over E per-edge
weight copies) with the per-(dst, type) mean norm, scattered into dst, is the same layer.

This module is the TVM-free half (`find` and the `Layer` it matches); kernel out: one PrimFunc
per layer, built and scheduled by `rgcn_kernel`, the lowering half, imported when a kernel is
lowered.

PyG's default `RGCNConv.forward` asks `int(segment_count.max())` for its segment_matmul
heuristic, which `torch.export` cannot capture; set `torch_geometric.backend.use_segment_matmul =
False` (without pyg-lib both choices run the same relation loop).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily, gnn
from hwaware.kernels.gnn import _arg, _op, _val

log = logging.getLogger(__name__)

RULE = "rgcn_segmm"
_MATMUL = {"aten.matmul.default", "aten.mm.default"}
_ZEROS = {"aten.zeros.default", "aten.new_zeros.default", "aten.zeros_like.default"}


# ------------------------------------------------------------------------------ patterns
Weight = tuple[fx.Node, int | None]


@dataclass
class Layer:
    """One recognised relational layer: relation r's weight (F_in x F_out) is `weights[r]`:
    (a constant, None) or (a R x F_in x F_out constant, r)."""

    out: fx.Node
    x: fx.Node
    edge_index: fx.Node
    edge_type: fx.Node
    src_row: int
    dst_row: int
    weights: list[Weight]
    reduce: str = "mean"  # or "sum"
    root: fx.Node | None = None
    bias: fx.Node | None = None
    nodes: set[fx.Node] = field(default_factory=set)

    def inputs(self) -> list[fx.Node]:
        return [self.x, self.edge_index, self.edge_type]


@dataclass
class Relation:
    """`matmul(mean (or sum) over relation r's edges of x[src], W_r)`."""

    r: int
    reduce: str
    x: fx.Node
    edge_index: fx.Node
    edge_type: fx.Node
    src_row: int
    dst_row: int
    weight: Weight
    nodes: set[fx.Node]


def _const(node: Any, ndim: int) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and \
        isinstance(_val(node), torch.Tensor) and _val(node).ndim == ndim


def _relation_mask(index: fx.Node, used: set[fx.Node]) -> tuple[fx.Node, fx.Node, int] | None:
    """(edge_index, edge_type, r) of `index(edge_index, [None, eq(edge_type, r)])`, with the
    size arithmetic and runtime asserts on its (data-dependent) length."""
    args: Any = index.args
    if _op(index) != "aten.index.Tensor" or len(args[1]) != 2 or args[1][0] is not None:
        return None
    eq: Any = args[1][1]
    if _op(eq) != "aten.eq.Scalar" or not isinstance(eq.args[1], int) or \
            isinstance(eq.args[1], bool) or len(eq.users) != 1:
        return None
    used.update((index, eq))
    _absorb_size_checks(index, used)
    return args[0], eq.args[0], eq.args[1]


def _absorb_size_checks(node: fx.Node, used: set[fx.Node]) -> None:
    """`sym_size(node)` and the comparisons/asserts on it (they have no tensor value)."""
    todo = [u for u in node.users if _op(u) == "aten.sym_size.int"]
    while todo:
        n = todo.pop()
        used.add(n)
        todo += [u for u in n.users if not isinstance(_val(u), torch.Tensor) and u not in used]


def _match_relation(term: Any) -> Relation | None:
    if _op(term) not in _MATMUL or not _const(term.args[1], 2):
        return None
    agg: Any = term.args[0]  # scatter_reduce(mean), SAGE-style sum / clamp(count, 1), or a sum
    scatter = agg.args[0] if _op(agg) == "aten.div.Tensor" else agg
    match = gnn._match_spmm(scatter) if isinstance(scatter, fx.Node) else None
    if match is None or match.reduce not in ("mean", "sum") or match.out is not agg or \
            match.weight is not None or match.src.node is not match.dst.node or \
            match.src.row is None or match.dst.row is None:
        return None
    used = {term, *match.nodes}
    mask = _relation_mask(match.src.node, used)
    if mask is None:
        return None
    edge_index, edge_type, r = mask
    return Relation(r, match.reduce, match.x, edge_index, edge_type, match.src.row,
                    match.dst.row, (term.args[1], None), used)


def _match_typed_weights(term: Any) -> list[Relation]:
    """PyG's FastRGCNConv: `scatter_add` into dst of [norm *] x[src] @ W[edge_type] (a bmm over
    per-edge weight copies, the E x F_in x F_out tensor this kernel never makes); norm (mean) is
    1 / clamp(count of i's edges of that type, 1), from a one-hot count gathered back per edge.
    One Relation per type r (the group's nodes on the first)."""
    used: set[fx.Node] = set()
    scatter = gnn._scatter(term, used) if isinstance(term, fx.Node) else None
    if scatter is None or scatter[0] != "sum":
        return []
    _, dst, msg = scatter
    reduce, norm = "sum", None
    if _op(msg) == "aten.mul.Tensor":
        used.add(msg)
        reduce, (norm, msg) = "mean", sorted(msg.args[:2],
                                             key=lambda a: _op(a) == "aten.squeeze.dim")
    typed = _typed_matmul(msg, used)
    if typed is None:
        return []
    x, src, weight, edge_type = typed
    if src.node is not dst.node or src.row is None or dst.row is None or \
            norm is not None and not _type_mean_norm(norm, dst, edge_type, used):
        return []
    used.add(term)
    return [Relation(r, reduce, x, src.node, edge_type, src.row, dst.row, (weight, r),
                     used if r == 0 else set()) for r in range(_val(weight).shape[0])]


def _typed_matmul(msg: Any, used: set[fx.Node]) -> tuple[fx.Node, Any, fx.Node, fx.Node] | None:
    """(x, src, W, edge_type) of `squeeze(bmm(unsqueeze(x[src], -2), W[edge_type]), -2)`."""
    if _op(msg) != "aten.squeeze.dim" or msg.args[1] != -2 or _op(msg.args[0]) != \
            "aten.bmm.default":
        return None
    lhs, rhs = msg.args[0].args
    if _op(lhs) != "aten.unsqueeze.default" or lhs.args[1] != -2 or \
            _op(rhs) != "aten.index.Tensor" or not _const(rhs.args[0], 3) or len(rhs.args[1]) != 1:
        return None
    gathered = gnn._gather(lhs.args[0], used, 2)
    if gathered is None:
        return None
    used.update((msg, msg.args[0], lhs, rhs))
    return gathered[0], gathered[1], rhs.args[0], rhs.args[1][0]


def _type_mean_norm(norm: Any, dst: Any, edge_type: fx.Node, used: set[fx.Node]) -> bool:
    """`mul(reciprocal(clamp(gather(index(count, [dst]), 1, view(edge_type)), 1)), 1)` with
    count = scatter_add into dst of one_hot(edge_type) (`scatter(zeros, 1, unsqueeze(t, 1), 1)`)."""
    chain = ["aten.mul.Tensor", "aten.reciprocal.default", "aten.clamp.default",
             "aten.gather.default", "aten.index.Tensor"]
    node, seen = norm, []
    for op in chain:
        if _op(node) != op:
            return False
        seen.append(node)
        node = node.args[0]
    mul, _, clamp, gather, index = seen
    tried: set[fx.Node] = set()
    rows = gnn._edge_index(index.args[1][0], tried) if len(index.args[1]) == 1 else None
    if mul.args[1] != 1 or _arg(clamp, 1, "min") != 1 or _arg(clamp, 2, "max") is not None or \
            gather.args[1] != 1 or _op(gather.args[2]) != "aten.view.default" or \
            gather.args[2].args[0] is not edge_type or rows is None or \
            not gnn._same_index(rows, dst):
        return False
    count = gnn._scatter(node, tried)
    one_hot: Any = count[2] if count is not None else None
    if count is None or count[0] != "sum" or not gnn._same_index(count[1], dst) or \
            _op(one_hot) != "aten.scatter.value" or one_hot.args[1] != 1 or \
            one_hot.args[3] != 1 or _op(one_hot.args[0]) not in _ZEROS or \
            _op(one_hot.args[2]) != "aten.unsqueeze.default" or \
            one_hot.args[2].args[0] is not edge_type:
        return False
    used.update(seen, tried, (gather.args[2], node, one_hot, one_hot.args[0], one_hot.args[2]))
    return True


def _add_terms(node: fx.Node, used: set[fx.Node]) -> list[Any]:
    """The leaves of a chain of adds ending in `node` (inner adds used only by the chain)."""
    if _op(node) != "aten.add.Tensor" or _arg_alpha(node) != 1:
        return [node]
    used.add(node)
    terms: list[Any] = []
    for a in node.args[:2]:
        inner = isinstance(a, fx.Node) and _op(a) == "aten.add.Tensor" and len(a.users) == 1
        terms += _add_terms(a, used) if inner else [a]  # type: ignore[arg-type]
    return terms


def _arg_alpha(node: fx.Node) -> Any:
    return node.kwargs.get("alpha", 1)


def _match_layer(node: fx.Node) -> Layer | None:
    """The relational layer whose add chain ends in `node`."""
    used: set[fx.Node] = set()
    terms = _add_terms(node, used)
    if len(terms) < 2:
        return None
    relations: list[Relation] = []
    rest: list[Any] = []
    for term in terms:
        rel = _match_relation(term)
        found = [rel] if rel is not None else _match_typed_weights(term)
        relations += found
        if not found:
            rest.append(term)
    if not relations:
        return None
    first = relations[0]
    if any((r.reduce, r.x, r.edge_index, r.edge_type, r.src_row, r.dst_row) !=
           (first.reduce, first.x, first.edge_index, first.edge_type, first.src_row,
            first.dst_row) for r in relations):
        log.debug("rgcn: %s: relations reduce differently or read different features or edges",
                  node.name)
        return None
    if sorted(r.r for r in relations) != list(range(len(relations))):
        log.debug("rgcn: %s: relations are not 0..R-1", node.name)
        return None
    relations.sort(key=lambda r: r.r)
    layer = Layer(node, first.x, first.edge_index, first.edge_type, first.src_row,
                  first.dst_row, [r.weight for r in relations], first.reduce,
                  nodes=used.union(*(r.nodes for r in relations)))
    return layer if _absorb_rest(layer, rest) else None


def _absorb_rest(layer: Layer, rest: list[Any]) -> bool:
    """The other terms of the sum: a zeros start, `matmul(x, root)` and a bias vector."""
    for term in rest:
        if _op(term) in _ZEROS and len(term.users) == 1:
            layer.nodes.add(term)
        elif _op(term) in _MATMUL and term.args[0] is layer.x and _const(term.args[1], 2) and \
                layer.root is None:
            layer.root = term.args[1]
            layer.nodes.add(term)
        elif _const(term, 1) and layer.bias is None:
            layer.bias = term
        else:
            log.debug("rgcn: %s: term %s is not a relation, root, bias or zeros",
                      layer.out.name, term)
            return False
    return True


def _unsupported(layer: Layer, order: dict[fx.Node, int]) -> str | None:
    out, x = _val(layer.out), _val(layer.x)
    f_in, f_out = x.shape[-1], out.shape[-1]
    if out.dtype != torch.float32 or x.dtype != torch.float32:
        return f"dtype {out.dtype} (fp32 only)"
    if any(not isinstance(s, int) for s in (*out.shape, *x.shape)):
        return "a node count or feature dim is symbolic"
    if out.ndim != 2 or x.ndim != 2 or out.shape[0] != x.shape[0]:
        return "not a node-feature matrix in and out"
    if any(tuple(_val(w).shape[i is not None:]) != (f_in, f_out) for w, i in layer.weights) or \
            layer.root is not None and tuple(_val(layer.root).shape) != (f_in, f_out) or \
            layer.bias is not None and tuple(_val(layer.bias).shape) != (f_out,):
        return "weight shapes differ from F_in x F_out"
    if gnn.size_bound(_val(layer.edge_type).shape[0]) is None:
        return "the edge count has no upper bound"
    if any(u not in layer.nodes for n in layer.nodes - {layer.out} for u in n.users):
        return "an intermediate value is used outside the group"
    first = min(order[n] for n in layer.nodes)
    if any(order[i] > first for n in layer.nodes for i in n.all_input_nodes
           if i not in layer.nodes and i.op != "get_attr"):
        return "an input is computed after the group starts"
    return None


def _layers(gm: fx.GraphModule) -> list[Layer]:
    """Every supported relational layer of `gm` (the last add of each chain first)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found: list[Layer] = []
    taken: set[fx.Node] = set()
    for node in reversed(list(gm.graph.nodes)):
        if node in taken or _op(node) != "aten.add.Tensor":
            continue
        layer = _match_layer(node)
        if layer is None or layer.nodes & taken:
            continue
        why = _unsupported(layer, order)
        if why is not None:
            log.debug("rgcn: layer at %s skipped: %s", node.name, why)
            continue
        found.append(layer)
        taken |= layer.nodes
    return sorted(found, key=lambda m: order[m.out])


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of relational-layer nodes, each lowered to one kernel."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [sorted(m.nodes, key=order.__getitem__) for m in _layers(gm)]


FAMILY = KernelFamily(name="rgcn", rule=RULE, find=find, lowering="hwaware.kernels.rgcn_kernel")
