"""GNN message passing as sparse kernels: gather-scatter aggregation and GAT attention.

Pattern in (the rewritten ATen graph; what `torch.export` makes of PyG layers):
- gather-scatter: `index_select(x, 0, src)` [`* view(w, [-1, 1])`] scattered into a zero tensor
  by `scatter_add` / `index_add` / `scatter_reduce(sum|mean|amax, include_self=False)` along dst
  (GCNConv, SAGEConv mean and max, a hand-written `zeros_like(x).index_add_(0, dst, x[src])`);
  SAGE's mean (`sum / clamp(count, 1)`, count a scatter of ones over the same dst) joins it.
- GAT: `index_select` of the per-node source and destination scores, `leaky_relu`, PyG's edge
  softmax (`scatter_reduce amax`, `exp`, `scatter_add` + eps, divide) and the weighted scatter of
  `index_select(feat, 0, src)` (multi-head, `feat` is N x H x C).
- GATv2: the same softmax and scatter, with PyG GATv2Conv's per-edge score
  `sum(leaky_relu(x_r[dst] + x_l[src]) * att, -1)` (x_l, x_r N x H x C; x_l also the message).
Index vectors that are `select`s of an edge_index used only by the group join it.

This module is the TVM-free half (`find`, the `Match` it makes, edge-count bounds); kernel out:
one sparse PrimFunc per group, built and scheduled by `gnn_kernel`, the lowering half, imported
when a kernel is lowered. `rgcn` reuses the matchers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily
from hwaware.program import op_name

log = logging.getLogger(__name__)

RULE = "gnn_sparse"
GAT_EPS = 1e-16
_ZEROS = {"aten.new_zeros.default", "aten.zeros_like.default", "aten.zeros.default"}
_ONES = {"aten.new_ones.default", "aten.ones_like.default", "aten.ones.default"}
_REDUCE = {"sum": "sum", "mean": "mean", "amax": "max"}


# ------------------------------------------------------------------------------ patterns
@dataclass(frozen=True)
class EdgeIndex:
    """Where an edge vector comes from: a 1-D tensor, or row `row` of a 2 x E edge_index."""

    node: fx.Node
    row: int | None = None


@dataclass
class Match:
    """One recognised aggregation. `kind` is "spmm" (reduce sum/mean/max of `weight * x[src]`
    into dst), "gat" (x = feat N x H x C, a_src/a_dst the per-node scores) or "gatv2" (x = x_l,
    x_dst = x_r, both N x H x C, att the 1 x H x C score weights)."""

    kind: str
    out: fx.Node
    x: fx.Node
    src: EdgeIndex
    dst: EdgeIndex
    reduce: str = "sum"
    weight: fx.Node | None = None
    a_src: fx.Node | None = None
    a_dst: fx.Node | None = None
    slope: float = 0.2
    nodes: set[fx.Node] = field(default_factory=set)
    x_dst: fx.Node | None = None
    att: fx.Node | None = None

    def inputs(self) -> list[fx.Node]:
        """The tensors the kernel reads (edge_index once even if both vectors come from it)."""
        found = [self.x, self.src.node, self.dst.node, self.weight, self.a_src, self.a_dst,
                 self.x_dst, self.att]
        return list(dict.fromkeys(n for n in found if n is not None))


def _op(node: Any) -> str:
    return op_name(node.target) if isinstance(node, fx.Node) and node.op == "call_function" \
        else ""


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dim0(node: fx.Node, dim: Any, ndim: int) -> bool:
    return isinstance(dim, int) and dim in (0, -ndim)


def _edge_index(node: Any, used: set[fx.Node]) -> EdgeIndex | None:
    """A 1-D int index, as a `select` of a 2 x E edge_index where that select joins the group."""
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.ndim != 1 or val.dtype not in (torch.int64,
                                                                             torch.int32):
        return None
    if _op(node) == "aten.select.int" and node.args[1] == 0 and _val(node.args[0]).ndim == 2:
        used.add(node)
        return EdgeIndex(node.args[0], int(node.args[2]))
    return EdgeIndex(node)


def _scatter_index(index: Any, used: set[fx.Node]) -> EdgeIndex | None:
    """The 1-D dst of a scatter: `expand_as(view(dst, [-1, 1, ..]), src)`, or dst itself."""
    if _op(index) in ("aten.expand_as.default", "aten.expand.default"):
        view = index.args[0]
        if _op(view) not in ("aten.view.default", "aten.reshape.default") or \
                any(int(s) != 1 for s in _val(view).shape[1:]):
            return None
        used.update((index, view))
        return _edge_index(view.args[0], used)
    return _edge_index(index, used)


def _zero_base(base: Any, used: set[fx.Node]) -> bool:
    if _op(base) in _ZEROS or _op(base) == "aten.full.default" and base.args[1] == 0:
        used.add(base)
        return True
    return False


def _scatter(node: fx.Node, used: set[fx.Node]) -> tuple[str, EdgeIndex, Any] | None:
    """(reduce, dst, message) of a scatter/index_add into zeros along dim 0, else None."""
    op = _op(node)
    if op not in ("aten.scatter_add.default", "aten.index_add.default",
                  "aten.scatter_reduce.two"):
        return None
    base, dim, index, msg = node.args[:4]
    if not _dim0(node, dim, _val(node).ndim) or not _zero_base(base, used):
        return None
    reduce = "sum"
    if op == "aten.index_add.default" and _arg(node, 4, "alpha", 1) != 1:
        return None
    if op == "aten.scatter_reduce.two":
        reduce = _REDUCE.get(str(node.args[4]), "")
        if not reduce or reduce != "sum" and _arg(node, 5, "include_self", True):
            log.debug("gnn: %s reduce=%s include_self is not taken", node.name, node.args[4])
            return None
    dst = _scatter_index(index, used) if op != "aten.index_add.default" \
        else _edge_index(index, used)
    return None if dst is None else (reduce, dst, msg)


def _gather(node: Any, used: set[fx.Node], ndim: int) -> tuple[fx.Node, EdgeIndex] | None:
    """(x, src) of `index_select(x, 0, src)` with x of `ndim` dims."""
    if _op(node) != "aten.index_select.default" or _val(node.args[0]).ndim != ndim or \
            not _dim0(node, node.args[1], ndim):
        return None
    src = _edge_index(node.args[2], used)
    if src is None:
        return None
    used.add(node)
    return node.args[0], src


def _message(msg: Any, used: set[fx.Node]) -> tuple[fx.Node, EdgeIndex, fx.Node | None] | None:
    """(x, src, weight) of `index_select(x, 0, src)` [`* view(weight, [-1, 1])`], x 2-D."""
    gathered = _gather(msg, used, 2)
    if gathered is not None:
        return (*gathered, None)
    if _op(msg) != "aten.mul.Tensor":
        return None
    for a, b in (msg.args[:2], msg.args[1::-1]):
        tried: set[fx.Node] = {msg}
        gathered = _gather(b, tried, 2)
        weight = _edge_weight(a, tried)
        if gathered is not None and weight is not None:
            used |= tried
            return (*gathered, weight)
    return None


def _edge_weight(node: Any, used: set[fx.Node]) -> fx.Node | None:
    """A per-edge float weight as an E x 1 column (a `view` of an E vector, or E x 1 itself)."""
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or val.ndim != 2 or \
            val.shape[1] != 1:
        return None
    if _op(node) in ("aten.view.default", "aten.reshape.default") and _val(node.args[0]).ndim == 1:
        used.add(node)
        return node.args[0]  # type: ignore[no-any-return]
    return node  # type: ignore[no-any-return]


def _match_spmm(node: fx.Node) -> Match | None:
    used: set[fx.Node] = {node}
    scatter = _scatter(node, used)
    if scatter is None:
        return None
    reduce, dst, msg = scatter
    message = _message(msg, used)
    if message is None:
        return None
    x, src, weight = message
    match = Match("spmm", node, x, src, dst, reduce, weight, nodes=used)
    if reduce == "sum":
        _absorb_mean(match)
    return match


def _absorb_mean(match: Match) -> None:
    """SAGE's mean: `sum / expand_as(view(clamp(count, 1)))`, count = scatter of ones to dst."""
    divs = [u for u in match.out.users if _op(u) == "aten.div.Tensor" and u.args[0] is match.out]
    if len(divs) != 1:
        return
    div = divs[0]
    used: set[fx.Node] = {div}
    denom: Any = div.args[1]
    if _op(denom) in ("aten.expand_as.default", "aten.expand.default"):
        used.add(denom)
        denom = denom.args[0]
    if _op(denom) in ("aten.view.default", "aten.reshape.default"):
        used.add(denom)
        denom = denom.args[0]
    if _op(denom) != "aten.clamp.default" or _arg(denom, 1, "min") != 1 or \
            _arg(denom, 2, "max") is not None:
        return
    used.add(denom)
    count = denom.args[0]
    scatter = _scatter(count, used) if isinstance(count, fx.Node) else None
    if scatter is None or scatter[0] != "sum" or _op(scatter[2]) not in _ONES or \
            not _same_index(scatter[1], match.dst):
        return
    used.update((count, scatter[2]))
    if any(u not in used for u in match.out.users):  # the sum is also used on its own
        return
    match.nodes |= used
    match.out, match.reduce = div, "mean"


def _same_index(a: EdgeIndex, b: EdgeIndex) -> bool:
    return a == b or a.row == b.row and _same_value(a.node, b.node)


def _same_value(a: Any, b: Any) -> bool:
    """Same node, or the same pure op on the same arguments (PyG selects edge_index twice)."""
    if a is b:
        return True
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == \
        "call_function" and a.target == b.target and a.kwargs == b.kwargs and \
        len(a.args) == len(b.args) and all(_same_value(x, y) for x, y in zip(a.args, b.args,
                                                                             strict=True))


def _match_gat(node: fx.Node) -> Match | None:
    """PyG GATConv's and GATv2Conv's aggregation: softmax-weighted scatter of `feat[src]`
    (feat N x H x C), the softmax over the edges into each dst of a per-edge score."""
    used: set[fx.Node] = {node}
    scatter = _scatter(node, used)
    if scatter is None or scatter[0] != "sum" or _op(scatter[2]) != "aten.mul.Tensor":
        return None
    mul: Any = scatter[2]
    dst = scatter[1]
    alpha, message = mul.args[:2] if _op(mul.args[0]) == "aten.unsqueeze.default" \
        else mul.args[1::-1]
    gathered = _gather(message, used, 3)
    if gathered is None or _op(alpha) != "aten.unsqueeze.default" or alpha.args[1] != -1:
        return None
    used.update((mul, alpha))
    feat, src = gathered
    logits = _edge_softmax(alpha.args[0], used, dst)
    if logits is None:
        return None
    if _op(logits) != "aten.leaky_relu.default":
        return _match_gatv2(node, logits, feat, src, dst, used)
    used.add(logits)
    scores: Any = logits.args[0]
    slope = float(_arg(logits, 1, "negative_slope", 0.01))
    if _op(scores) != "aten.add.Tensor":
        return None
    a_src = _gather(scores.args[0], used, 2)
    a_dst = _gather(scores.args[1], used, 2)
    if a_src is None or a_dst is None or not _same_index(a_src[1], src) or \
            not _same_index(a_dst[1], dst):
        return None
    used.add(scores)
    return Match("gat", node, feat, src, dst, "sum", None, a_src[0], a_dst[0], slope, used)


def _match_gatv2(node: fx.Node, logits: fx.Node, feat: fx.Node, src: EdgeIndex,
                 dst: EdgeIndex, used: set[fx.Node]) -> Match | None:
    """GATv2's score `sum(mul(leaky_relu(add(x_r[dst], x_l[src])), att), [-1])`, where x_l[src]
    is the message's own gather (`feat` is x_l)."""
    dims: Any = logits.args[1]
    if _op(logits) != "aten.sum.dim_IntList" or list(dims) not in ([-1], [2]) or \
            _arg(logits, 2, "keepdim", False) or _op(logits.args[0]) != "aten.mul.Tensor":
        return None
    weighted: Any = logits.args[0]
    lrelu: Any
    lrelu, att = weighted.args[:2] if _op(weighted.args[0]) == "aten.leaky_relu.default" \
        else weighted.args[1::-1]
    if _op(lrelu) != "aten.leaky_relu.default" or _op(lrelu.args[0]) != "aten.add.Tensor" or \
            not isinstance(att, fx.Node) or _val(att).ndim != 3 or _val(att).shape[0] != 1:
        return None
    tried = set(used)
    pair = [_gather(a, tried, 3) for a in lrelu.args[0].args[:2]]
    if any(p is None for p in pair):
        return None
    by_role = {("src" if p[0] is feat and _same_index(p[1], src) else "dst"): p
               for p in pair if p is not None}
    x_dst = by_role.get("dst")
    if "src" not in by_role or x_dst is None or not _same_index(x_dst[1], dst):
        return None
    used |= tried | {logits, weighted, lrelu, lrelu.args[0]}
    return Match("gatv2", node, feat, src, dst, "sum", None, None, None,
                 float(_arg(lrelu, 1, "negative_slope", 0.01)), used, x_dst[0], att)


def _edge_softmax(alpha: Any, used: set[fx.Node], dst: EdgeIndex) -> fx.Node | None:
    """PyG's `softmax(logits, dst)` (max-shifted exp over each dst's edges, + eps in the sum,
    optionally through dropout that is off): the per-edge logits node."""
    if _op(alpha) == "aten.dropout.default" and (alpha.args[1] == 0 or not alpha.args[2]):
        used.add(alpha)
        alpha = alpha.args[0]
    if _op(alpha) != "aten.div.Tensor":
        return None
    ex, norm = alpha.args
    denom = _gathered_by(norm, dst, used)
    if _op(ex) != "aten.exp.default" or _op(denom) != "aten.add.Tensor" or \
            denom.args[1] != GAT_EPS:
        return None
    total = _scatter(denom.args[0], used)
    if total is None or total[0] != "sum" or total[2] is not ex or not _same_index(total[1], dst):
        return None
    sub = ex.args[0]
    if _op(sub) != "aten.sub.Tensor":
        return None
    logits, peak = sub.args[0], _gathered_by(sub.args[1], dst, used)
    maxed = _scatter(peak, used) if isinstance(peak, fx.Node) else None
    if maxed is None or maxed[0] != "max" or not _same_index(maxed[1], dst):
        return None
    fed = maxed[2]
    if _op(fed) == "aten.detach.default":
        used.add(fed)
        fed = fed.args[0]
    if fed is not logits:
        return None
    used.update((alpha, ex, denom, denom.args[0], sub, peak))
    return logits  # type: ignore[no-any-return]


def _gathered_by(node: Any, dst: EdgeIndex, used: set[fx.Node]) -> Any:
    """`y` of `index_select(y, 0, dst)` (any rank), else None."""
    if _op(node) != "aten.index_select.default" or not _dim0(node, node.args[1],
                                                                _val(node.args[0]).ndim):
        return None
    index = _edge_index(node.args[2], used)
    if index is None or not _same_index(index, dst):
        return None
    used.add(node)
    return node.args[0]


def _matches(gm: fx.GraphModule) -> list[Match]:
    """Every supported aggregation of `gm` (GAT first: its scatters also look like SpMMs)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found: list[Match] = []
    taken: set[fx.Node] = set()
    for matcher in (_match_gat, _match_spmm):
        for node in reversed(list(gm.graph.nodes)):
            if node in taken or node.op != "call_function":
                continue
            match = matcher(node)
            if match is None or match.nodes & taken or not _valid(match, order):
                continue
            found.append(match)
            taken |= match.nodes
    return sorted(found, key=lambda m: order[m.out])


def _valid(match: Match, order: dict[fx.Node, int]) -> bool:
    """The contract: a self-contained group that we can lower (shapes, dtypes, bounds)."""
    _absorb_selects(match)
    why = _unsupported(match)
    first = min(order[n] for n in match.nodes) if match.nodes else 0
    outside = {i for n in match.nodes for i in n.all_input_nodes if i not in match.nodes}
    if why is None and any(order[n] > first for n in outside if n.op != "get_attr"):
        why = "an input is computed after the group starts"
    if why is None and any(u not in match.nodes for n in match.nodes - {match.out}
                           for u in n.users):
        why = "an intermediate value is used outside the group"
    if why is not None:
        log.debug("gnn: %s aggregation at %s skipped: %s", match.kind, match.out.name, why)
    return why is None


def _absorb_selects(match: Match) -> None:
    """An edge_index `select` joins the group only when nothing else reads it; one that is read
    outside becomes the kernel's input instead (unless the group selects that row twice)."""
    selects = [n for n in match.nodes if _op(n) == "aten.select.int"]
    for node in selects:
        if all(u in match.nodes for u in node.users):
            continue
        twins = [n for n in selects if n is not node and _same_value(n, node)]
        if twins:
            match.nodes.clear()
            return
        match.nodes.discard(node)
        index = EdgeIndex(node.args[0], node.args[2])  # type: ignore[arg-type]
        match.src = EdgeIndex(node) if match.src == index else match.src
        match.dst = EdgeIndex(node) if match.dst == index else match.dst


def _unsupported(match: Match) -> str | None:
    if not match.nodes:
        return "an edge vector is used outside the group"
    out = _val(match.out)
    if out.dtype != torch.float32 or _val(match.x).dtype != torch.float32:
        return f"dtype {out.dtype} (fp32 only)"
    if any(not isinstance(s, int) for s in (*out.shape, *_val(match.x).shape)):
        return "a node count or feature dim is symbolic"
    if edge_bound(match) is None:
        return "the edge count has no upper bound"
    if match.kind == "gat" and _val(match.a_src).shape[1] != _val(match.x).shape[1]:
        return "score and feature heads differ"
    if match.kind == "gatv2" and (
            _val(match.x_dst).shape[1:] != _val(match.x).shape[1:] or
            _val(match.att).shape[1:] != _val(match.x).shape[1:] or
            _val(match.out).shape[1:] != _val(match.x).shape[1:] or
            _val(match.x_dst).shape[0] != _val(match.out).shape[0] or
            any(_val(n).dtype != torch.float32 for n in (match.x_dst, match.att))):
        return "source, destination and score shapes differ"
    return None


def edge_count(match: Match) -> Any:
    """E (an int, or a torch SymInt when it depends on the data)."""
    val = _val(match.src.node)
    return val.shape[-1]


def edge_bound(match: Match) -> int | None:
    """The largest E can be: E itself, or the shape env's upper bound of a symbolic E."""
    return size_bound(edge_count(match))


def size_bound(count: Any) -> int | None:
    """The largest a size can be: itself, or the shape env's upper bound of a symbolic one."""
    if isinstance(count, int):
        return count
    try:
        upper = count.node.shape_env.bound_sympy(count.node.expr).upper
        return int(upper) if upper.is_finite else None
    except (AttributeError, TypeError, ValueError):
        return None


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups of gather-scatter / GAT nodes, each lowered to one sparse kernel."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return [sorted(m.nodes, key=order.__getitem__) for m in _matches(gm)]


FAMILY = KernelFamily(name="gnn", rule=RULE, find=find, lowering="hwaware.kernels.gnn_kernel")
