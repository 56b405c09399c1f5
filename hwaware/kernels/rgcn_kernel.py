# mypy: disable-error-code="valid-type"
# (TVMScript buffer annotations `T.Buffer((M, F), "float32")` are not Python types)
"""The lowering half of the rgcn family: one segmented-GEMM PrimFunc and its schedule spaces.

`rgcn.py` (TVM-free) finds the relational layer; this module, imported only when a kernel is
lowered or scheduled, turns it into a Relax `main` (edge glue + one PrimFunc).

Kernel out (compact materialisation): mean is linear, so sum_r mean_r(x_j) W_r = H W where
H[i] = [mean_0(x_j) | ... | mean_{R-1}(x_j) | x_i] (N x (R+1) x F_in) and W = [W_0; ..; root].
One PrimFunc sorts the edges by (dst, relation) into CSR (gnn's in-kernel counting sort over
N*R segments, keyed in the edge glue), then per tile of TB destination rows gathers the tile's
H (TB x (R+1) x F_in, never all of it) and multiplies it by W in registers, adding the bias.
Nothing of size E x F is made, let alone an E x F_in x F_out weight copy (what PyG's
FastRGCNConv gathers). Edge counts, E_cap buckets and MetaSchedule's random index inputs are
handled as in `gnn_kernel` (its CSR macro, masks and capacity helpers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from tvm import relax, te, tirx
from tvm.script import tirx as T

from hwaware.kernels import gnn, gnn_kernel
from hwaware.kernels.gnn import _val
from hwaware.kernels.gnn_kernel import Decide, Fixed, Sampled
from hwaware.kernels.lowering_common import (
    fixed_schedule,
    keep_default_rules_off,
    register_spaces,
    sampled_spaces,
)
from hwaware.kernels.rgcn import RULE, Layer, _layers

# H's feature loops, the accumulation inside the `while` first (see `gnn_kernel._feature_blocks`)
AGG_BLOCKS = ("agg_acc", "agg_init", "agg_out", "agg_root")
GPU_AGG_BLOCKS = ("agg_feature", "agg_root")  # rgcn_func(gpu=True)


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
    N, R, S, FI, FO, EC, TB, is_mean = s.N, s.R, s.S, s.FI, s.FO, s.EC, s.TB, s.mean  # noqa: N806
    h_scope = "shared" if gpu else "global"
    # sorted by key = dst * R + relation; key N*R: a dropped edge
    csr = gnn_kernel._csr_macro(gnn_kernel.Shapes(N, N * R + 1, 1, FI, EC))

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
        lanes = decide.choose(sch, gnn_kernel._lanes(int(sch.get(fin).extent), 16), 16)
        _, vec = sch.split(fin, [None, lanes])
        sch.vectorize(vec)


def schedule_cpu(sch: Any, decide: Decide) -> Any:
    """Chunks of row tiles in parallel; per tile, H's rows gathered (vectorized over features),
    then H times W in registers: the tile's rows unrolled, a column tile of vectors."""
    _vectorize_agg(sch, decide)
    gemm = sch.get_sblock("rgcn_gemm")
    row, o, t, f = sch.get_loops(gemm)[-4:]
    lanes = decide.choose(sch, gnn_kernel._lanes(int(sch.get(o).extent), 16), 16)
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
    threads = decide.choose(sch, gnn_kernel._lanes(width, 32), 32)  # one count for every block
    for loop in [o, *(sch.get_loops(sch.get_sblock(n))[-1] for n in GPU_AGG_BLOCKS)]:
        _, lane = sch.split(loop, [None, threads])
        sch.bind(lane, "threadIdx.x")
    for name in GPU_AGG_BLOCKS:
        keep_default_rules_off(sch, sch.get_sblock(name))
    return sch


SCHEDULES: dict[str, Callable[[Any, Decide], Any]] = {"cpu": schedule_cpu, "cuda": schedule_cuda}
SPACES = sampled_spaces(SCHEDULES, Sampled)
schedule_fixed = fixed_schedule(
    SCHEDULES, lambda kind, _cores: Fixed(rows=4 if kind == "cpu" else 8))


# ------------------------------------------------------------------------------- lower
def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph -> Relax `main`: edge glue (keys, pad to E_cap) + one rgcn kernel."""
    register_spaces(RULE, SPACES)
    layers = _layers(graph)
    if len(layers) != 1:
        raise ValueError(f"rgcn.lower: expected one relational layer in the kernel graph, "
                         f"found {len(layers)}")
    layer = layers[0]
    params, var_of = gnn_kernel.relax_params(graph)
    shapes = _shapes(layer)
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            x, edge_index, edge_type = (gnn_kernel._tensor(bb, n, var_of, graph)
                                        for n in layer.inputs())
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
    rows, count = edge_index.ty.shape
    return relax.call_pure_packed("vm.builtin.reshape", edge_index, relax.ShapeExpr(
        [rows * count]), ty_args=relax.TensorType([rows * count], "int64"))


def _shapes(layer: Layer) -> Shapes:
    n, f_in = (int(s) for s in _val(layer.x).shape)
    r = len(layer.weights)
    bound = gnn.size_bound(_val(layer.edge_type).shape[0]) or 0
    return Shapes(n, r, r + (layer.root is not None), f_in, int(_val(layer.out).shape[1]),
                  gnn_kernel.edge_capacity(bound), layer.reduce == "mean")


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
