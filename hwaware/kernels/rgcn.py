# mypy: disable-error-code="valid-type"
# (TVMScript buffer annotations `T.Buffer((M, F), "float32")` are not Python types)
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

Kernel out (compact materialisation): mean is linear, so sum_r mean_r(x_j) W_r = H W where
H[i] = [mean_0(x_j) | ... | mean_{R-1}(x_j) | x_i] (N x (R+1) x F_in) and W = [W_0; ..; root].
One PrimFunc sorts the edges by (dst, relation) into CSR (gnn's in-kernel counting sort over
N*R segments, keyed in the edge glue), then per tile of TB destination rows gathers the tile's
H (TB x (R+1) x F_in, never all of it) and multiplies it by W in registers, adding the bias.
Nothing of size E x F is made, let alone an E x F_in x F_out weight copy (what PyG's
FastRGCNConv gathers). Edge counts, E_cap buckets and MetaSchedule's random index inputs are
handled as in `gnn` (its CSR macro, masks and capacity helpers).

PyG's default `RGCNConv.forward` asks `int(segment_count.max())` for its segment_matmul
heuristic, which `torch.export` cannot capture; set `torch_geometric.backend.use_segment_matmul =
False` (without pyg-lib both choices run the same relation loop).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hwaware.kernels import (
    KernelFamily,
    fixed_schedule,
    gnn,
    keep_default_rules_off,
    register_spaces,
)
from hwaware.kernels.gnn import Decide, Fixed, Sampled, _arg, _op, _val

log = logging.getLogger(__name__)

RULE = "rgcn_segmm"
# H's feature loops, the accumulation inside the `while` first (see `gnn._feature_blocks`)
AGG_BLOCKS = ("agg_acc", "agg_init", "agg_out", "agg_root")
GPU_AGG_BLOCKS = ("agg_feature", "agg_root")  # rgcn_func(gpu=True)
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


# ----------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class Shapes:
    """Static sizes: N nodes, R relations, S = H's slots (R, or R + 1 with a root weight),
    F_in, F_out, EC edge capacity, TB rows per tile (divides N); per relation a mean or a sum."""

    N: int
    R: int
    S: int
    FI: int
    FO: int
    EC: int
    mean: bool = True

    @property
    def TB(self) -> int:  # noqa: N802 (the kernel's name for it)
        return max(d for d in (1, 2, 4, 8) if self.N % d == 0)


def rgcn_func(s: Shapes, gpu: bool = False) -> Any:
    """out[i] = bias + sum_s H[i, s] @ W[s], H[i, r] = mean (or sum) of x[j] over i's
    relation-r edges (0 without any), H[i, R] = x[i] (root slot); H is made per tile of TB
    rows. `gpu`: H in shared memory (a CUDA block's threads share the tile), each feature summed
    over the edges in a register (a thread per feature; the CPU form accumulates a row of H
    per edge, which on a GPU would need a barrier inside the data-dependent edge loop)."""
    from tvm.script import tirx as T

    N, R, S, FI, FO, EC, TB, is_mean = s.N, s.R, s.S, s.FI, s.FO, s.EC, s.TB, s.mean  # noqa: N806
    h_scope = "shared" if gpu else "global"
    csr = gnn._csr_macro(gnn.Shapes(N, N * R + 1, 1, FI, EC))  # key N*R: a dropped edge

    @T.prim_func(private=True, s_tir=True)
    def rgcn(x: T.Buffer((N, FI), "float32"), wst: T.Buffer((S, FI, FO), "float32"),
             bias: T.Buffer((FO,), "float32"), src: T.Buffer((EC,), "int32"),
             key: T.Buffer((EC,), "int32"), w: T.Buffer((EC,), "float32"),
             ne: T.Buffer((1,), "int32"), out: T.Buffer((N, FO), "float32")) -> None:
        # As in gnn: the accumulations' declared reads leave out their own output element.
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.sblock_attr({"schedule_rule": "None"})  # no default parallel/vectorize
            rowptr = T.alloc_buffer((N * R + 2,), "int32")
            pos = T.alloc_buffer((N * R + 1,), "int32")
            col = T.alloc_buffer((EC,), "int32")
            wsort = T.alloc_buffer((EC,), "float32")
            csr(src, key, w, ne, rowptr, pos, col, wsort)
            for it in range(N // TB):
                with T.sblock("rgcn_tile"):
                    vit = T.axis.spatial(N // TB, it)
                    T.reads(rowptr[vit * TB * R:vit * TB * R + TB * R + 1], col[0:EC],
                            x[0:N, 0:FI], wst[0:S, 0:FI, 0:FO], bias[0:FO])
                    T.writes(out[vit * TB:vit * TB + TB, 0:FO])
                    T.sblock_attr({"schedule_rule": RULE})
                    h = T.alloc_buffer((TB, S, FI), "float32", scope=h_scope)
                    k = T.alloc_buffer((1,), "int32", scope="local")
                    for ii, r in T.grid(TB, R):
                        with T.sblock("rgcn_agg"):
                            vi, vr = T.axis.remap("SS", [ii, r])
                            T.reads(rowptr[(vit * TB + vi) * R + vr:(vit * TB + vi) * R + vr + 2],
                                    col[0:EC], x[0:N, 0:FI])
                            T.writes(h[vi, vr, 0:FI])
                            T.sblock_attr({"schedule_rule": "None"})
                            if gpu:  # each feature's sum in a register
                                for f in range(FI):
                                    with T.sblock("agg_feature"):
                                        vf = T.axis.spatial(FI, f)
                                        T.reads(rowptr[(vit * TB + vi) * R + vr:
                                                       (vit * TB + vi) * R + vr + 2],
                                                col[0:EC], x[0:N, vf])
                                        T.writes(h[vi, vr, vf])
                                        acc = T.alloc_buffer((1,), "float32", scope="local")
                                        kf = T.alloc_buffer((1,), "int32", scope="local")
                                        acc[0] = T.float32(0)
                                        kf[0] = rowptr[(vit * TB + vi) * R + vr]
                                        while kf[0] < rowptr[(vit * TB + vi) * R + vr + 1]:
                                            acc[0] = acc[0] + x[col[kf[0]], vf]
                                            kf[0] = kf[0] + 1
                                        if is_mean:
                                            h[vi, vr, vf] = acc[0] / T.Cast("float32", T.max(
                                                rowptr[(vit * TB + vi) * R + vr + 1]
                                                - rowptr[(vit * TB + vi) * R + vr], 1))
                                        else:
                                            h[vi, vr, vf] = acc[0]
                            else:
                                for f in range(FI):
                                    with T.sblock("agg_init"):
                                        vf = T.axis.spatial(FI, f)
                                        h[vi, vr, vf] = T.float32(0)
                                k[0] = rowptr[(vit * TB + vi) * R + vr]
                                while k[0] < rowptr[(vit * TB + vi) * R + vr + 1]:
                                    for f in range(FI):
                                        with T.sblock("agg_acc"):
                                            vf = T.axis.spatial(FI, f)
                                            T.reads(col[0:EC], x[0:N, vf])
                                            T.writes(h[vi, vr, vf])
                                            h[vi, vr, vf] = h[vi, vr, vf] + x[col[k[0]], vf]
                                    k[0] = k[0] + 1
                                for f in range(FI):
                                    with T.sblock("agg_out"):
                                        vf = T.axis.spatial(FI, f)
                                        T.reads(rowptr[(vit * TB + vi) * R + vr:
                                                       (vit * TB + vi) * R + vr + 2])
                                        T.writes(h[vi, vr, vf])
                                        if is_mean:
                                            h[vi, vr, vf] = h[vi, vr, vf] / T.Cast("float32", T.max(
                                                rowptr[(vit * TB + vi) * R + vr + 1]
                                                - rowptr[(vit * TB + vi) * R + vr], 1))
                                        else:
                                            h[vi, vr, vf] = h[vi, vr, vf]
                    for ii, t, f in T.grid(TB, S - R, FI):
                        with T.sblock("agg_root"):
                            vi, vt, vf = T.axis.remap("SSS", [ii, t, f])
                            h[vi, R + vt, vf] = x[vit * TB + vi, vf]
                    for ii, o, t, f in T.grid(TB, FO, S, FI):
                        with T.sblock("rgcn_gemm"):
                            vi, vo, vt, vf = T.axis.remap("SSRR", [ii, o, t, f])
                            T.sblock_attr({"schedule_rule": "None"})  # the tile's rule does it
                            with T.init():
                                out[vit * TB + vi, vo] = bias[vo]
                            out[vit * TB + vi, vo] = out[vit * TB + vi, vo] + \
                                h[vi, vt, vf] * wst[vt, vf, vo]

    return rgcn


# ---------------------------------------------------------------------------- schedules
def _vectorize_agg(sch: Any, decide: Decide) -> None:
    """H's feature loops vectorized (the accumulation inside the `while` first, as in gnn)."""
    for name in AGG_BLOCKS:
        fin = sch.get_loops(sch.get_sblock(name))[-1]
        lanes = decide.choose(sch, gnn._lanes(int(sch.get(fin).extent), 16), 16)
        _, vec = sch.split(fin, [None, lanes])
        sch.vectorize(vec)


def schedule_cpu(sch: Any, decide: Decide) -> Any:
    """Chunks of row tiles in parallel; per tile, H's rows gathered (vectorized over features),
    then H times W in registers: the tile's rows unrolled, a column tile of vectors."""
    _vectorize_agg(sch, decide)
    gemm = sch.get_sblock("rgcn_gemm")
    row, o, t, f = sch.get_loops(gemm)[-4:]
    lanes = decide.choose(sch, gnn._lanes(int(sch.get(o).extent), 16), 16)
    o_rest, vec = sch.split(o, [None, lanes])
    rows = int(sch.get(row).extent)  # vectors per column tile: <= 16 accumulators
    o0, vecs = sch.split(o_rest, decide.tile(sch, o_rest, max(1, 16 // rows)))
    sch.reorder(o0, t, f, row, vecs, vec)
    sch.vectorize(vec)  # while it is still a reduction block with its init (TVM's check)
    sch.unroll(row)
    sch.unroll(vecs)
    # The tile's accumulators; its write-back loops are left to LLVM: a get_loops on them
    # would return fewer loops when a sampled extent is 1, which breaks MetaSchedule's replay.
    sch.reverse_compute_at(sch.cache_write(gemm, 0, "local"), o0)
    sch.decompose_reduction(gemm, t)
    tiles = sch.get_loops(sch.get_sblock("rgcn_tile"))[0]
    chunk, _ = sch.split(tiles, decide.tile(sch, tiles, 16))
    sch.parallel(chunk)
    return sch


def schedule_cuda(sch: Any, decide: Decide) -> Any:
    """A CUDA block per row tile, H in its shared memory, the tile's rows on threadIdx.y,
    output columns / features on threadIdx.x; the CSR sort on one thread."""
    csr = sch.get_sblock("csr")
    sch.bind(sch.add_unit_loop(csr), "blockIdx.x")
    sch.bind(sch.add_unit_loop(csr), "threadIdx.x")
    tile = sch.get_sblock("rgcn_tile")
    sch.bind(sch.get_loops(tile)[0], "blockIdx.x")
    sch.bind(sch.add_unit_loop(tile), "threadIdx.z")  # the tile block itself under a thread axis
    for name in ("rgcn_agg", "agg_root", "rgcn_gemm"):  # every stage under a thread binding
        sch.bind(sch.get_loops(sch.get_sblock(name))[0], "threadIdx.y")
    gemm = sch.get_sblock("rgcn_gemm")
    o, _, fin = sch.get_loops(gemm)[-3:]
    width = math.gcd(int(sch.get(o).extent), int(sch.get(fin).extent))
    threads = decide.choose(sch, gnn._lanes(width, 32), 32)  # one count for every block
    for loop in [o, *(sch.get_loops(sch.get_sblock(n))[-1] for n in GPU_AGG_BLOCKS)]:
        _, lane = sch.split(loop, [None, threads])
        sch.bind(lane, "threadIdx.x")
    for name in GPU_AGG_BLOCKS:
        keep_default_rules_off(sch, sch.get_sblock(name))
    return sch


SCHEDULES: dict[str, Callable[[Any, Decide], Any]] = {"cpu": schedule_cpu, "cuda": schedule_cuda}


schedule_fixed = fixed_schedule(
    SCHEDULES, lambda kind, _cores: Fixed(rows=4 if kind == "cpu" else 8))


# ------------------------------------------------------------------------------- lower
def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph -> Relax `main`: edge glue (keys, pad to E_cap) + one rgcn kernel."""
    register_schedule_rules()
    from tvm import relax

    layers = _layers(graph)
    if len(layers) != 1:
        raise ValueError(f"rgcn.lower: expected one relational layer in the kernel graph, "
                         f"found {len(layers)}")
    layer = layers[0]
    params, var_of = gnn.relax_params(graph)
    shapes = _shapes(layer)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            x, edge_index, edge_type = (gnn._tensor(bb, n, var_of, graph) for n in layer.inputs())
            flat = bb.emit(_flat_view(edge_index))
            glue = bb.emit_te(_edge_keys(layer, shapes), flat, edge_type,
                              primfunc_name_hint=f"{name}_edges")
            edges = [bb.emit(relax.TupleGetItem(glue, i)) for i in range(4)]
            weights = [relax.const(w) for w in _weights(layer, graph, shapes)]
            gv = bb.add_func(rgcn_func(shapes, gpu=target.kind == "cuda"), name)
            out = bb.emit(relax.call_tir(gv, [x, *weights, *edges], relax.TensorType(
                [shapes.N, shapes.FO], "float32")))
            result = bb.emit_output(relax.Tuple([out]))
        bb.emit_func_output(result)
    return bb.finalize()


def _flat_view(edge_index: Any) -> Any:
    """edge_index as a 1-D view made by the VM (not a TIR reshape, which FuseOps would fuse into
    the glue): torch strides an empty 2 x 0 tensor (1, 1), and TVM refuses that as not compact
    when it calls a PrimFunc on it; the view is compact."""
    from tvm import relax

    rows, count = edge_index.ty.shape
    return relax.call_pure_packed("vm.builtin.reshape", edge_index, relax.ShapeExpr(
        [rows * count]), ty_args=relax.TensorType([rows * count], "int64"))


def _shapes(layer: Layer) -> Shapes:
    n, f_in = (int(s) for s in _val(layer.x).shape)
    r = len(layer.weights)
    bound = gnn.size_bound(_val(layer.edge_type).shape[0]) or 0
    return Shapes(n, r, r + (layer.root is not None), f_in, int(_val(layer.out).shape[1]),
                  gnn.edge_capacity(bound), layer.reduce == "mean")


def _weights(layer: Layer, graph: fx.GraphModule, s: Shapes) -> list[Any]:
    """W stacked (S x F_in x F_out: relations, then root) and the bias (zeros without one)."""
    def value(node: fx.Node) -> torch.Tensor:
        got: Any = graph
        for part in str(node.target).split("."):
            got = getattr(got, part)
        return got.detach().float()

    stack = [value(w) if i is None else value(w)[i] for w, i in layer.weights]
    stack += [value(layer.root)] if layer.root else []
    bias = value(layer.bias) if layer.bias is not None else torch.zeros(s.FO)
    return [torch.stack(stack).cpu().contiguous().numpy(), bias.cpu().contiguous().numpy()]


def _edge_keys(layer: Layer, s: Shapes) -> Callable[..., list[Any]]:
    """TE glue: (edge_index flattened, edge_type) -> int32 src, key = dst * R + type (N * R for
    an edge of no relation 0..R-1 or out of range), unit weights, each padded to E_cap, and E."""
    from tvm import te, tirx

    src_row, dst_row, cap, invalid = layer.src_row, layer.dst_row, s.EC, s.N * s.R

    def glue(edges: Any, edge_type: Any) -> list[Any]:
        count = edge_type.shape[0]

        def key(e: Any) -> Any:
            dst, rel = edges[dst_row * count + e], edge_type[e]
            ok = tirx.all(rel >= 0, rel < s.R, dst >= 0, dst < s.N)
            return tirx.if_then_else(e < count, tirx.if_then_else(
                ok, (dst * s.R + rel).astype("int32"), invalid), invalid)

        return [te.compute((cap,), lambda e: tirx.if_then_else(
                    e < count, edges[src_row * count + e].astype("int32"), 0), name="pad_src"),
                te.compute((cap,), key, name="edge_key"),
                te.compute((cap,), lambda _: tirx.const(1.0, "float32"), name="unit_weight"),
                te.compute((1,), lambda _: tirx.Cast("int32", count), name="edge_count")]

    return glue


def register_schedule_rules() -> None:
    """Register the sampled schedule spaces for blocks annotated `schedule_rule: rgcn_segmm`."""
    register_spaces(RULE, SCHEDULES, Sampled)


FAMILY = KernelFamily(name="rgcn", rule=RULE, find=find, lower=lower,
                      schedule_fixed=schedule_fixed,
                      register=register_schedule_rules)
