# mypy: disable-error-code="valid-type"
# (TVMScript buffer annotations `T.Buffer((M, F), "float32")` are not Python types)
"""The lowering half of the gnn family: sparse aggregation PrimFuncs and their schedule spaces.

`gnn.py` (TVM-free) finds the aggregations; this module, imported only when a kernel is lowered
or scheduled, turns one into a Relax `main` (edge glue + one PrimFunc).

Kernel out: one PrimFunc per group. It turns the COO edges into CSR by a counting sort (serial,
O(E + N)), then runs one row block per destination node, parallel over rows and vectorized over
the feature dim; no E x F message tensor is made. GAT and GATv2 (one row body, each with its
own per-edge score) do scores, max, exp-sum and the weighted
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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import fx
from tvm import relax, te, tirx
from tvm.ir import Range
from tvm.script import tirx as T

from hwaware.kernels.gnn import GAT_EPS, RULE, Match, _matches, _val, edge_bound
from hwaware.kernels.lowering_common import (
    fixed_schedule,
    keep_default_rules_off,
    register_spaces,
    sampled_spaces,
)

ROW_BLOCKS = ("spmm", "gat")


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


def _edge_softmax_body(s: Shapes) -> Any:
    """TIR macro, the body of an attention aggregation: the edges sorted into CSR, then one row
    block per destination row i; per head h, alpha = softmax over i's edges of the score that
    `edge_score(score, vh, vi, k, col, x, score_a, score_b)` leaves in score[vh] for edge
    k[0] (+1e-16 in the sum), and out = sum alpha x[j]. The max pass and the exp pass each
    compute an edge's score (a row block may not write a buffer it reads, so none is stored
    between them)."""
    N, H, C, EC = s.N, s.H, s.C, s.EC  # noqa: N806
    csr = _csr_macro(s)

    @T.macro
    def body(edge_score, x, score_a, score_b, src, dst, w, ne, out):  # type: ignore[no-untyped-def]
        rowptr = T.alloc_buffer((N + 1,), "int32")
        pos = T.alloc_buffer((N,), "int32")
        col = T.alloc_buffer((EC,), "int32")
        wsort = T.alloc_buffer((EC,), "float32")
        csr(src, dst, w, ne, rowptr, pos, col, wsort)
        for i in range(N):
            with T.sblock("gat"):
                vi = T.axis.spatial(N, i)
                T.reads(rowptr[vi:vi + 2], whole(col), whole(x), whole(score_a), whole(score_b))
                T.writes(out[vi, 0:H, 0:C])
                T.sblock_attr({"schedule_rule": RULE})
                k = T.alloc_buffer((1,), "int32", scope="local")
                peak = T.alloc_buffer((H,), "float32", scope="local")
                total = T.alloc_buffer((H,), "float32", scope="local")
                score = T.alloc_buffer((H,), "float32", scope="local")
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
                            T.reads(whole(col), whole(x), whole(score_a), whole(score_b))
                            T.writes(score[vh], peak[vh])
                            edge_score(score, vh, vi, k, col, x, score_a, score_b)
                            peak[vh] = T.max(peak[vh], score[vh])
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
                            T.reads(whole(col), whole(x), whole(score_a), whole(score_b),
                                    peak[vh])
                            T.writes(score[vh], p[vh], total[vh])
                            edge_score(score, vh, vi, k, col, x, score_a, score_b)
                            p[vh] = T.exp(score[vh] - peak[vh])
                            total[vh] = total[vh] + p[vh]
                    for h, c in T.grid(H, C):
                        with T.sblock("gat_acc"):
                            vh, vc = T.axis.remap("SS", [h, c])
                            T.reads(whole(col), x[0:x.shape[0], vh, vc], p[vh])
                            T.writes(acc[vh, vc])
                            acc[vh, vc] = acc[vh, vc] + p[vh] * x[col[k[0]], vh, vc]
                    k[0] = k[0] + 1
                for h, c in T.grid(H, C):
                    with T.sblock("gat_out"):
                        vh, vc = T.axis.remap("SS", [h, c])
                        out[vi, vh, vc] = acc[vh, vc] / (total[vh] + T.float32(GAT_EPS))

    return body


def whole(buffer: Any) -> Any:
    """A buffer's whole region (for a block's reads, whatever the buffer's rank)."""
    return tirx.BufferRegion(buffer, [Range.from_min_extent(0, extent)
                                      for extent in buffer.shape])


def _leaky_relu(value: Any, slope: float) -> Any:
    return T.if_then_else(value > T.float32(0), value, value * T.float32(slope))


def gat_func(s: Shapes, slope: float) -> Any:
    """PyG GATConv's aggregation: score e = leaky_relu(a_src[j, h] + a_dst[i, h]) (score_a =
    a_src, score_b = a_dst)."""
    M, N, H, C, EC = s.M, s.N, s.H, s.C, s.EC  # noqa: N806
    body = _edge_softmax_body(s)

    @T.macro
    def edge_score(score, vh, vi, k, col, x, a_src, a_dst):  # type: ignore[no-untyped-def]
        score[vh] = _leaky_relu(a_src[col[k[0]], vh] + a_dst[vi, vh], slope)

    @T.prim_func(private=True, s_tir=True)
    def gat(x: T.Buffer((M, H, C), "float32"), score_a: T.Buffer((M, H), "float32"),
            score_b: T.Buffer((N, H), "float32"), src: T.Buffer((EC,), "int32"),
            dst: T.Buffer((EC,), "int32"), w: T.Buffer((EC,), "float32"),
            ne: T.Buffer((1,), "int32"), out: T.Buffer((N, H, C), "float32")) -> None:
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.sblock_attr({"schedule_rule": "None"})  # no default parallel/vectorize
            body(edge_score, x, score_a, score_b, src, dst, w, ne, out)

    return gat


def gatv2_func(s: Shapes, slope: float) -> Any:
    """PyG GATv2Conv's aggregation: score e = sum_c att[h, c] * leaky_relu(x[j, h, c] +
    x_dst[i, h, c]) (x = x_l, also the message; score_a = x_dst, score_b = att, 1 x H x C)."""
    M, N, H, C, EC = s.M, s.N, s.H, s.C, s.EC  # noqa: N806
    body = _edge_softmax_body(s)

    @T.macro
    def edge_score(score, vh, vi, k, col, x, x_dst, att):  # type: ignore[no-untyped-def]
        score[vh] = T.float32(0)
        for c in range(C):
            score[vh] = score[vh] + att[0, vh, c] * _leaky_relu(
                x[col[k[0]], vh, c] + x_dst[vi, vh, c], slope)

    @T.prim_func(private=True, s_tir=True)
    def gatv2(x: T.Buffer((M, H, C), "float32"), score_a: T.Buffer((N, H, C), "float32"),
              score_b: T.Buffer((1, H, C), "float32"), src: T.Buffer((EC,), "int32"),
              dst: T.Buffer((EC,), "int32"), w: T.Buffer((EC,), "float32"),
              ne: T.Buffer((1,), "int32"), out: T.Buffer((N, H, C), "float32")) -> None:
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.sblock_attr({"schedule_rule": "None"})  # no default parallel/vectorize
            body(edge_score, x, score_a, score_b, src, dst, w, ne, out)

    return gatv2


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
SPACES = sampled_spaces(SCHEDULES, Sampled)
schedule_fixed = fixed_schedule(
    SCHEDULES, lambda kind, _cores: Fixed(rows=8 if kind == "cuda" else 16))


# ------------------------------------------------------------------------------- lower
def relax_params(graph: fx.GraphModule) -> tuple[list[Any], dict[fx.Node, Any]]:
    """Relax parameters for the kernel graph's placeholders (a data-dependent size, such as
    the edge count, becomes one named symbolic dim shared by every input that has it), and
    the placeholder -> parameter map."""
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    dims: dict[str, Any] = {}
    params = [relax.Var(p.name, _struct_info(p, dims)) for p in placeholders]
    return params, dict(zip(placeholders, params, strict=True))


def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph -> Relax `main`: edge glue (pad to E_cap, int32) + one sparse kernel."""
    register_spaces(RULE, SPACES)
    matches = _matches(graph)
    if len(matches) != 1:
        raise ValueError(f"gnn.lower: expected one aggregation in the kernel graph, "
                         f"found {len(matches)}")
    match = matches[0]
    params, var_of = relax_params(graph)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            shapes = _shapes(match, edge_capacity(edge_bound(match) or 0))
            args = [_tensor(bb, n, var_of, graph) for n in _dense_inputs(match)]
            edges = _edge_glue(bb, match, var_of, graph, name)
            func = spmm_func(shapes, match.reduce) if match.kind == "spmm" else \
                gat_func(shapes, match.slope) if match.kind == "gat" else \
                gatv2_func(shapes, match.slope)
            gv = bb.add_func(func, name)
            out = bb.emit(relax.call_tir(gv, [*args, *edges], _out_info(match)))
            result = bb.emit_output(relax.Tuple([out]))
        bb.emit_func_output(result)
    return bb.finalize()


def _dense_inputs(match: Match) -> list[fx.Node]:
    dense: dict[str, list[fx.Node | None]] = {
        "spmm": [match.x], "gat": [match.x, match.a_src, match.a_dst],
        "gatv2": [match.x, match.x_dst, match.att]}
    return [n for n in dense[match.kind] if n is not None]


def _shapes(match: Match, capacity: int) -> Shapes:
    x = _val(match.x)
    n = int(_val(match.out).shape[0])
    h, c = (1, int(x.shape[1])) if match.kind == "spmm" else (int(x.shape[1]), int(x.shape[2]))
    return Shapes(int(x.shape[0]), n, h, c, capacity)


def _out_info(match: Match) -> Any:
    return relax.TensorType([int(s) for s in _val(match.out).shape], "float32")


def _struct_info(node: fx.Node, dims: dict[str, Any]) -> Any:
    """The placeholder's shape, a symbolic dim as one tir.Var per distinct expression."""
    val = _val(node)
    shape = [s if isinstance(s, int) else dims.setdefault(str(s), tirx.Var(f"e{len(dims)}",
                                                                               "int64"))
             for s in val.shape]
    return relax.TensorType(shape, str(val.dtype).removeprefix("torch."))


def _tensor(bb: Any, node: fx.Node, var_of: dict[fx.Node, Any], graph: fx.GraphModule) -> Any:
    """A kernel input as a Relax value: a parameter, or a weight as a constant."""
    if node in var_of:
        return var_of[node]
    value: Any = graph
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return relax.const(value.detach().cpu().contiguous().numpy())


def _edge_glue(bb: Any, match: Match, var_of: dict[fx.Node, Any], graph: fx.GraphModule,
               name: str) -> list[Any]:
    """src, dst (int32), weight and the edge count, padded to the kernel's edge capacity."""
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
