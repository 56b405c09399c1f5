# mypy: disable-error-code="valid-type"
# (TVMScript buffer annotations `T.Buffer((M, F), "float32")` are not Python types)
"""GNN message passing as sparse kernels: gather-scatter aggregation and GAT attention.

Pattern in (the rewritten ATen graph; what `torch.export` makes of PyG layers):
- gather-scatter: `index_select(x, 0, src)` [`* view(w, [-1, 1])`] scattered into a zero tensor
  by `scatter_add` / `index_add` / `scatter_reduce(sum|mean|amax, include_self=False)` along dst
  (GCNConv, SAGEConv mean and max, a hand-written `zeros_like(x).index_add_(0, dst, x[src])`);
  SAGE's mean (`sum / clamp(count, 1)`, count a scatter of ones over the same dst) joins it.
- GAT: `index_select` of the per-node source and destination scores, `leaky_relu`, PyG's edge
  softmax (`scatter_reduce amax`, `exp`, `scatter_add` + eps, divide) and the weighted scatter of
  `index_select(feat, 0, src)` (multi-head, `feat` is N x H x C).
Index vectors that are `select`s of an edge_index used only by the group join it.

Kernel out: one PrimFunc per group. It turns the COO edges into CSR by a counting sort (serial,
O(E + N)), then runs one row block per destination node, parallel over rows and vectorized over
the feature dim; no E x F message tensor is made. GAT does scores, max, exp-sum and the weighted
sum per destination row (per head) in that same row block.

Edge counts: PyG's self-loop handling makes E data-dependent (`u0 + N`). Relax `main` takes E as
a symbolic dim; a small glue PrimFunc pads the edge arrays to E_cap = the next power of two above
E's upper bound (torch's shape env knows `u0 <= E_in`), so the tuned kernel has static shapes
(tuning is per graph-size bucket) and reads only the first E edges (the count is an input).

MetaSchedule fills integer inputs with random bits when it measures a candidate, so the kernel
masks every index with the next power of two above its range and drops the ones still outside
it: real indices are unchanged, and random ones make a uniformly random graph of E_cap edges,
which is a fair workload to time schedules on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily, fixed_schedule, keep_default_rules_off, register_spaces
from hwaware.program import op_name

log = logging.getLogger(__name__)

RULE = "gnn_sparse"
ROW_BLOCKS = ("spmm", "gat")
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
    into dst) or "gat" (x = feat N x H x C, a_src/a_dst the per-node scores)."""

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

    def inputs(self) -> list[fx.Node]:
        """The tensors the kernel reads (edge_index once even if both vectors come from it)."""
        found = [self.x, self.src.node, self.dst.node, self.weight, self.a_src, self.a_dst]
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
    """PyG GATConv's aggregation: softmax-weighted scatter of `feat[src]` (feat N x H x C)."""
    used: set[fx.Node] = {node}
    scatter = _scatter(node, used)
    if scatter is None or scatter[0] != "sum" or _op(scatter[2]) != "aten.mul.Tensor":
        return None
    _, dst, mul = scatter
    alpha, gathered = mul.args[0], _gather(mul.args[1], used, 3)
    if gathered is None or _op(alpha) != "aten.unsqueeze.default":
        return None
    used.update((mul, alpha))
    feat, src = gathered
    softmax = _edge_softmax(alpha.args[0], used, dst)
    if softmax is None:
        return None
    scores, slope = softmax
    a_src = _gather(scores.args[0], used, 2)
    a_dst = _gather(scores.args[1], used, 2)
    if a_src is None or a_dst is None or not _same_index(a_src[1], src) or \
            not _same_index(a_dst[1], dst):
        return None
    used.add(scores)
    return Match("gat", node, feat, src, dst, "sum", None, a_src[0], a_dst[0], slope, used)


def _edge_softmax(alpha: Any, used: set[fx.Node], dst: EdgeIndex
                  ) -> tuple[fx.Node, float] | None:
    """PyG's `softmax(leaky_relu(a_src[src] + a_dst[dst]), dst)`: (the add, the slope)."""
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
    lrelu, peak = sub.args[0], _gathered_by(sub.args[1], dst, used)
    maxed = _scatter(peak, used) if isinstance(peak, fx.Node) else None
    if maxed is None or maxed[0] != "max" or not _same_index(maxed[1], dst):
        return None
    fed = maxed[2]
    if _op(fed) == "aten.detach.default":
        used.add(fed)
        fed = fed.args[0]
    if fed is not lrelu or _op(lrelu) != "aten.leaky_relu.default" or \
            _op(lrelu.args[0]) != "aten.add.Tensor":
        return None
    used.update((alpha, ex, denom, denom.args[0], sub, peak, lrelu))
    return lrelu.args[0], float(_arg(lrelu, 1, "negative_slope", 0.01))


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


# ----------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class Shapes:
    """Static sizes of one kernel: M source nodes, N destination nodes, F = H x C features,
    EC edge capacity (power of two)."""

    M: int
    N: int
    H: int
    C: int
    EC: int

    @property
    def F(self) -> int:  # noqa: N802 (the usual name)
        return self.H * self.C


def _mask(n: int) -> int:
    """All-ones below the next power of two >= n (so `i & mask == i` for 0 <= i < n)."""
    return (1 << max(1, (n - 1).bit_length())) - 1


def edge_capacity(bound: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(bound, 1))))


def _csr_macro(s: Shapes) -> Any:
    """TIR that sorts the first `ne[0]` COO edges by dst into CSR (rowptr, col, wsort)."""
    from tvm.script import tirx as T

    M, N, EC, mask_n, mask_m = s.M, s.N, s.EC, _mask(s.N), _mask(s.M)  # noqa: N806

    @T.macro
    def csr(src, dst, w, ne, rowptr, pos, col, wsort):  # type: ignore[no-untyped-def]
        with T.sblock("csr"):
            T.reads(src[0:EC], dst[0:EC], w[0:EC], ne[0:1])
            T.writes(rowptr[0:N + 1], pos[0:N], col[0:EC], wsort[0:EC])
            T.sblock_attr({"schedule_rule": "None"})
            n_e = T.max(T.min(ne[0], EC), 0)
            for i in range(N + 1):
                rowptr[i] = 0
            for e in range(EC):
                if e < n_e and (dst[e] & mask_n) < N:
                    rowptr[(dst[e] & mask_n) + 1] = rowptr[(dst[e] & mask_n) + 1] + 1
            for i in range(N):
                rowptr[i + 1] = rowptr[i + 1] + rowptr[i]
                pos[i] = rowptr[i]
            for e in range(EC):
                if e < n_e and (dst[e] & mask_n) < N:
                    col[pos[dst[e] & mask_n]] = T.if_then_else(
                        (src[e] & mask_m) < M, src[e] & mask_m, 0)
                    wsort[pos[dst[e] & mask_n]] = T.if_then_else((src[e] & mask_m) < M,
                                                                 w[e], T.float32(0))
                    pos[dst[e] & mask_n] = pos[dst[e] & mask_n] + 1

    return csr


def spmm_func(s: Shapes, reduce: str) -> Any:
    """out[i, :] = reduce over edges (j -> i) of w_e * x[j, :]; reduce is sum, mean or max;
    rows without edges are 0 (as PyTorch's scatter into zeros)."""
    from tvm.script import tirx as T

    M, N, F, EC = s.M, s.N, s.F, s.EC  # noqa: N806
    is_max, is_mean = reduce == "max", reduce == "mean"
    csr = _csr_macro(s)

    @T.prim_func(private=True, s_tir=True)
    def spmm(x: T.Buffer((M, F), "float32"), src: T.Buffer((EC,), "int32"),
             dst: T.Buffer((EC,), "int32"), w: T.Buffer((EC,), "float32"),
             ne: T.Buffer((1,), "int32"), out: T.Buffer((N, F), "float32")) -> None:
        # The accumulations read their own output element; their declared reads leave it out,
        # or TVM's dataflow check refuses to vectorize / parallelize around them.
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.sblock_attr({"schedule_rule": "None"})  # no default parallel/vectorize
            rowptr = T.alloc_buffer((N + 1,), "int32")
            pos = T.alloc_buffer((N,), "int32")
            col = T.alloc_buffer((EC,), "int32")
            wsort = T.alloc_buffer((EC,), "float32")
            csr(src, dst, w, ne, rowptr, pos, col, wsort)
            for i in range(N):
                with T.sblock("spmm"):
                    vi = T.axis.spatial(N, i)
                    T.reads(rowptr[vi:vi + 2], col[0:EC], wsort[0:EC], x[0:M, 0:F])
                    T.writes(out[vi, 0:F])
                    T.sblock_attr({"schedule_rule": RULE})
                    k = T.alloc_buffer((1,), "int32", scope="local")
                    acc = T.alloc_buffer((F,), "float32", scope="local")
                    for f in range(F):
                        with T.sblock("spmm_init"):
                            vf = T.axis.spatial(F, f)
                            if is_max:
                                acc[vf] = T.min_value("float32")
                            else:
                                acc[vf] = T.float32(0)
                    k[0] = rowptr[vi]
                    while k[0] < rowptr[vi + 1]:
                        for f in range(F):
                            with T.sblock("spmm_acc"):
                                vf = T.axis.spatial(F, f)
                                T.reads(col[0:EC], wsort[0:EC], x[0:M, vf])
                                T.writes(acc[vf])
                                if is_max:
                                    acc[vf] = T.max(acc[vf], wsort[k[0]] * x[col[k[0]], vf])
                                else:
                                    acc[vf] = acc[vf] + wsort[k[0]] * x[col[k[0]], vf]
                        k[0] = k[0] + 1
                    for f in range(F):
                        with T.sblock("spmm_out"):
                            vf = T.axis.spatial(F, f)
                            if is_max:
                                out[vi, vf] = T.if_then_else(rowptr[vi + 1] > rowptr[vi], acc[vf],
                                                             T.float32(0))
                            elif is_mean:
                                out[vi, vf] = acc[vf] / T.Cast("float32", T.max(
                                    rowptr[vi + 1] - rowptr[vi], 1))
                            else:
                                out[vi, vf] = acc[vf]

    return spmm


def gat_func(s: Shapes, slope: float) -> Any:
    """PyG GATConv's aggregation per destination row i and head h: e = leaky_relu(a_src[j, h]
    + a_dst[i, h]), alpha = softmax over i's edges (+1e-16 in the sum), out = sum alpha x[j]."""
    from tvm.script import tirx as T

    M, N, H, C, EC = s.M, s.N, s.H, s.C, s.EC  # noqa: N806
    csr = _csr_macro(s)

    @T.prim_func(private=True, s_tir=True)
    def gat(x: T.Buffer((M, H, C), "float32"), a_src: T.Buffer((M, H), "float32"),
            a_dst: T.Buffer((N, H), "float32"), src: T.Buffer((EC,), "int32"),
            dst: T.Buffer((EC,), "int32"), w: T.Buffer((EC,), "float32"),
            ne: T.Buffer((1,), "int32"), out: T.Buffer((N, H, C), "float32")) -> None:
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.sblock_attr({"schedule_rule": "None"})  # no default parallel/vectorize
            rowptr = T.alloc_buffer((N + 1,), "int32")
            pos = T.alloc_buffer((N,), "int32")
            col = T.alloc_buffer((EC,), "int32")
            wsort = T.alloc_buffer((EC,), "float32")
            csr(src, dst, w, ne, rowptr, pos, col, wsort)
            for i in range(N):
                with T.sblock("gat"):
                    vi = T.axis.spatial(N, i)
                    T.reads(rowptr[vi:vi + 2], col[0:EC], x[0:M, 0:H, 0:C], a_src[0:M, 0:H],
                            a_dst[vi, 0:H])
                    T.writes(out[vi, 0:H, 0:C])
                    T.sblock_attr({"schedule_rule": RULE})
                    k = T.alloc_buffer((1,), "int32", scope="local")
                    peak = T.alloc_buffer((H,), "float32", scope="local")
                    total = T.alloc_buffer((H,), "float32", scope="local")
                    p = T.alloc_buffer((H,), "float32", scope="local")
                    acc = T.alloc_buffer((H, C), "float32", scope="local")
                    for h in range(H):
                        with T.sblock("gat_init"):
                            vh = T.axis.spatial(H, h)
                            peak[vh] = T.min_value("float32")
                            total[vh] = T.float32(0)
                    k[0] = rowptr[vi]
                    while k[0] < rowptr[vi + 1]:
                        for h in range(H):
                            with T.sblock("gat_max"):
                                vh = T.axis.spatial(H, h)
                                T.reads(col[0:EC], a_src[0:M, vh], a_dst[vi, vh])
                                T.writes(peak[vh])
                                peak[vh] = T.max(peak[vh], T.if_then_else(
                                    a_src[col[k[0]], vh] + a_dst[vi, vh] > T.float32(0),
                                    a_src[col[k[0]], vh] + a_dst[vi, vh],
                                    (a_src[col[k[0]], vh] + a_dst[vi, vh]) * T.float32(slope)))
                        k[0] = k[0] + 1
                    for h, c in T.grid(H, C):
                        with T.sblock("gat_zero"):
                            vh, vc = T.axis.remap("SS", [h, c])
                            acc[vh, vc] = T.float32(0)
                    k[0] = rowptr[vi]
                    while k[0] < rowptr[vi + 1]:
                        for h in range(H):
                            with T.sblock("gat_exp"):
                                vh = T.axis.spatial(H, h)
                                T.reads(col[0:EC], a_src[0:M, vh], a_dst[vi, vh], peak[vh])
                                T.writes(p[vh], total[vh])
                                p[vh] = T.exp(T.if_then_else(
                                    a_src[col[k[0]], vh] + a_dst[vi, vh] > T.float32(0),
                                    a_src[col[k[0]], vh] + a_dst[vi, vh],
                                    (a_src[col[k[0]], vh] + a_dst[vi, vh]) * T.float32(slope))
                                    - peak[vh])
                                total[vh] = total[vh] + p[vh]
                        for h, c in T.grid(H, C):
                            with T.sblock("gat_acc"):
                                vh, vc = T.axis.remap("SS", [h, c])
                                T.reads(col[0:EC], x[0:M, vh, vc], p[vh])
                                T.writes(acc[vh, vc])
                                acc[vh, vc] = acc[vh, vc] + p[vh] * x[col[k[0]], vh, vc]
                        k[0] = k[0] + 1
                    for h, c in T.grid(H, C):
                        with T.sblock("gat_out"):
                            vh, vc = T.axis.remap("SS", [h, c])
                            out[vi, vh, vc] = acc[vh, vc] / (total[vh] + T.float32(GAT_EPS))

    return gat


# ---------------------------------------------------------------------------- schedules
class Sampled:
    """Decisions drawn by MetaSchedule's sampling instructions (the tunable space)."""

    def tile(self, sch: Any, loop: Any, max_inner: int) -> list[Any]:
        return list(sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_inner))

    def choose(self, sch: Any, candidates: list[int], _default: int) -> Any:
        return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))


class Fixed:
    """Fixed decisions for a build without tuned records."""

    def __init__(self, rows: int):
        self.rows = rows

    def tile(self, sch: Any, loop: Any, max_inner: int) -> list[Any]:
        extent = int(sch.get(loop).extent)
        inner = max(d for d in range(1, min(self.rows, max_inner, extent) + 1) if extent % d == 0)
        return [extent // inner, inner]

    def choose(self, sch: Any, candidates: list[int], default: int) -> Any:
        return max(c for c in candidates if c <= default) if min(candidates) <= default \
            else min(candidates)


Decide = Sampled | Fixed


def _lanes(extent: int, limit: int) -> list[int]:
    """Vector widths (or thread counts) that divide a feature loop."""
    return [d for d in range(1, min(extent, limit) + 1) if extent % d == 0 and
            (d & (d - 1) == 0 or d == extent)]


def _feature_blocks(sch: Any) -> list[Any]:
    """The row block's loops over features (last loop = feature), by name. The accumulation
    inside the `while` comes first: splitting a sibling loop first and then it made TVM 0.27's
    schedule write into the original PrimFunc (a copy-on-write miss under `while`), which broke
    MetaSchedule's trace replay ("old_outputs.size() == new_outputs.size()")."""
    names = ("spmm_acc", "spmm_init", "spmm_out", "gat_acc", "gat_zero", "gat_out")
    return [sch.get_sblock(n) for n in names if _has_block(sch, n)]


def _row_block(sch: Any) -> Any:
    return next(sch.get_sblock(n) for n in ROW_BLOCKS if _has_block(sch, n))


def _has_block(sch: Any, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # TVM raises a generic error for a missing block
        return False


def schedule_cpu(sch: Any, decide: Decide) -> Any:
    """Rows in parallel chunks, the feature loop of every accumulation vectorized."""
    row = _row_block(sch)
    outer, inner = sch.split(sch.get_loops(row)[0], decide.tile(sch, sch.get_loops(row)[0], 64))
    sch.parallel(outer)
    blocks = _feature_blocks(sch)
    extent = int(sch.get(sch.get_loops(blocks[0])[-1]).extent)
    lanes = decide.choose(sch, _lanes(extent, 64), 16)
    for block in blocks:
        _, vec = sch.split(sch.get_loops(block)[-1], [None, lanes])
        sch.vectorize(vec)
    return sch


def schedule_cuda(sch: Any, decide: Decide) -> Any:
    """A CUDA block per chunk of rows (threadIdx.y), features on threadIdx.x; the CSR sort
    runs on one thread (it is serial)."""
    csr = sch.get_sblock("csr")
    sch.bind(sch.add_unit_loop(csr), "blockIdx.x")
    sch.bind(sch.add_unit_loop(csr), "threadIdx.x")
    row = _row_block(sch)
    blocks = _feature_blocks(sch)
    extent = int(sch.get(sch.get_loops(blocks[0])[-1]).extent)
    threads = decide.choose(sch, _lanes(extent, 32), 32)
    outer, inner = sch.split(sch.get_loops(row)[0], decide.tile(sch, sch.get_loops(row)[0], 8))
    sch.bind(outer, "blockIdx.x")
    sch.bind(inner, "threadIdx.y")
    for block in blocks:
        _, lane = sch.split(sch.get_loops(block)[-1], [None, threads])
        sch.bind(lane, "threadIdx.x")
        keep_default_rules_off(sch, block)
    return sch


SCHEDULES: dict[str, Callable[[Any, Decide], Any]] = {"cpu": schedule_cpu, "cuda": schedule_cuda}


def register_schedule_rules() -> None:
    """Register the sampled schedule spaces MetaSchedule's ApplyCustomRule finds by the blocks'
    `schedule_rule` annotation (idempotent)."""
    register_spaces(RULE, SCHEDULES, Sampled)


schedule_fixed = fixed_schedule(
    SCHEDULES, lambda kind, _cores: Fixed(rows=8 if kind == "cuda" else 16))


def _is_family_func(func: Any) -> bool:
    from hwaware.tvm import ir

    return RULE in ir.schedule_rules(func)


# ------------------------------------------------------------------------------- lower
def relax_params(graph: fx.GraphModule) -> tuple[list[Any], dict[fx.Node, Any]]:
    """Relax parameters for the kernel graph's placeholders (a data-dependent size, such as
    the edge count, becomes one named symbolic dim shared by every input that has it), and
    the placeholder -> parameter map."""
    from tvm import relax

    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    dims: dict[str, Any] = {}
    params = [relax.Var(p.name, _struct_info(p, dims)) for p in placeholders]
    return params, dict(zip(placeholders, params, strict=True))


def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph -> Relax `main`: edge glue (pad to E_cap, int32) + one sparse kernel."""
    register_schedule_rules()
    from tvm import relax

    matches = _matches(graph)
    if len(matches) != 1:
        raise ValueError(f"gnn.lower: expected one aggregation in the kernel graph, "
                         f"found {len(matches)}")
    match = matches[0]
    params, var_of = relax_params(graph)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            args = [_tensor(bb, n, var_of, graph) for n in _dense_inputs(match)]
            edges = _edge_glue(bb, match, var_of, graph, name)
            shapes = _shapes(match, edge_capacity(edge_bound(match) or 0))
            func = spmm_func(shapes, match.reduce) if match.kind == "spmm" else \
                gat_func(shapes, match.slope)
            gv = bb.add_func(func, name)
            out = bb.emit(relax.call_tir(gv, [*args, *edges], _out_info(match)))
            result = bb.emit_output(relax.Tuple([out]))
        bb.emit_func_output(result)
    return bb.finalize()


def _dense_inputs(match: Match) -> list[fx.Node]:
    return [match.x] if match.kind == "spmm" else [match.x, match.a_src, match.a_dst]  # type: ignore[list-item]


def _shapes(match: Match, capacity: int) -> Shapes:
    x = _val(match.x)
    n = int(_val(match.out).shape[0])
    h, c = (1, int(x.shape[1])) if match.kind == "spmm" else (int(x.shape[1]), int(x.shape[2]))
    return Shapes(int(x.shape[0]), n, h, c, capacity)


def _out_info(match: Match) -> Any:
    from tvm import relax

    return relax.TensorType([int(s) for s in _val(match.out).shape], "float32")


def _struct_info(node: fx.Node, dims: dict[str, Any]) -> Any:
    """The placeholder's shape, a symbolic dim as one tir.Var per distinct expression."""
    from tvm import relax, tirx

    val = _val(node)
    shape = [s if isinstance(s, int) else dims.setdefault(str(s), tirx.Var(f"e{len(dims)}",
                                                                               "int64"))
             for s in val.shape]
    return relax.TensorType(shape, str(val.dtype).removeprefix("torch."))


def _tensor(bb: Any, node: fx.Node, var_of: dict[fx.Node, Any], graph: fx.GraphModule) -> Any:
    """A kernel input as a Relax value: a parameter, or a weight as a constant."""
    from tvm import relax

    if node in var_of:
        return var_of[node]
    value: Any = graph
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return relax.const(value.detach().cpu().contiguous().numpy())


def _edge_glue(bb: Any, match: Match, var_of: dict[fx.Node, Any], graph: fx.GraphModule,
               name: str) -> list[Any]:
    """src, dst (int32), weight and the edge count, padded to the kernel's edge capacity."""
    from tvm import relax

    capacity = edge_capacity(edge_bound(match) or 0)
    tensors = {"src": _tensor(bb, match.src.node, var_of, graph),
               "dst": _tensor(bb, match.dst.node, var_of, graph)}
    if match.weight is not None:
        tensors["weight"] = _tensor(bb, match.weight, var_of, graph)
    pad = _pad_edges(match.src.row, match.dst.row, capacity, list(tensors))
    glue = bb.emit_te(pad, *tensors.values(), primfunc_name_hint=f"{name}_edges")
    return [bb.emit(relax.TupleGetItem(glue, i)) for i in range(4)]


def _pad_edges(src_row: int | None, dst_row: int | None, capacity: int, names: list[str]
               ) -> Callable[..., list[Any]]:
    """TE glue: (src, dst[, weight]) -> int32 src, dst, fp32 weight (1 without one) padded to
    `capacity`, and the edge count. A `row` picks that row of a 2 x E edge_index."""
    from tvm import te, tirx

    def pad(*tensors: Any) -> list[Any]:
        given = dict(zip(names, tensors, strict=True))
        count = given["src"].shape[-1]

        def index(t: Any, row: int | None) -> Any:
            return te.compute((capacity,), lambda e: tirx.if_then_else(
                e < count, (t[row, e] if row is not None else t[e]).astype("int32"), 0),
                name="pad_index")

        def weight(e: Any) -> Any:
            w = given.get("weight")
            if w is None:
                return tirx.const(1.0, "float32")
            return tirx.if_then_else(e < count, w[e, 0] if len(w.shape) == 2 else w[e],
                                     tirx.const(0.0, "float32"))

        return [index(given["src"], src_row), index(given["dst"], dst_row),
                te.compute((capacity,), weight, name="pad_weight"),
                te.compute((1,), lambda _: tirx.Cast("int32", count), name="edge_count")]

    return pad


FAMILY = KernelFamily(name="gnn", rule=RULE, find=find, lower=lower,
                      schedule_fixed=schedule_fixed,
                      register=register_schedule_rules)
