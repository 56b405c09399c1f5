"""The lowering half of fused attention: its TIR template, tile sizes and schedule spaces.

`attention.py` (TVM-free) finds the pattern and derives a `Plan` (how to read q, k, v, the
score function, the causal offset, where the output goes); this module, imported only when a
kernel is lowered or scheduled, turns a plan into ONE PrimFunc, lowers the kernel graph to a
Relax `main` that calls it, and registers and applies its schedule spaces.

Template: for each (leading index n = batch*heads, query tile of `tq` rows) it loops over key
blocks of `tk` keys keeping FlashAttention's running max `m`, running sum `l_sum` and a
rescaled accumulator `acc`, so no Sq x Sk matrix exists; with a causal mask, key blocks above
the diagonal are skipped. The scores of a block are kept TRANSPOSED, `s[key, row]`, with the
query tile packed as `q_t[d, row]`, so that
- q.k is a rank-1-update GEMM vectorised over the tile's rows (broadcast k[key, d]);
- the softmax's row max and row sum are vertical (vectorised over rows, no horizontal
  reduction) and exp is a vectorised polynomial (LLVM would call expf per lane for T.exp);
- p.v is vectorised over the head dim (broadcast p[key, row], load v[key, :]) and
  accumulates straight into `acc`: the online rescale `acc *= alpha` is its init.
Tile sizes come from `tile_sizes`: without a causal mask and for short key lengths one key
block holds every key (plain softmax, the online rescale runs once); causal kernels use square
blocks so that about half of them are skipped. The CPU space (`schedule_rule` "hw_attention")
samples the register tiles of both contractions (from `QK_TILES`, `PV_TILES`) and the unroll
depth; the CUDA space binds (n, query tile) to threads (a correct baseline, not a tuned GPU
FlashAttention).
"""

from __future__ import annotations

import math
from typing import Any

import tvm
from torch import fx
from tvm import relax

from hwaware.kernels.attention import (
    NEG,
    RULE,
    Index,
    Plan,
    _dtype,
    _val_shape,
    delinear,
    plan_of,
)
from hwaware.kernels.lowering_common import Space, register_spaces
from hwaware.tvm.isa import current_vector_unit

ONE_BLOCK_MAX_KEYS = 512  # up to this many keys, one key block (K and V of a head fit in L2)
QUERY_TILE = 64           # rows per query tile: K and V blocks are loaded once per tile
CAUSAL_BLOCK = 32         # query tile and key block of causal kernels: about half of the
                          # blocks (those above the diagonal) are skipped
# (measured on 12 heads x 128 x 64, single thread: 64 x 128 beat 32 x 128 by ~10% without a
# mask; with a causal mask 32 x 32 beat 64 x 64, 64 x 32 and 16 x 16 by 8-15%)


# --------------------------------------------------------------------------- tile sizes
def tile_sizes(plan: Plan, target: Any) -> tuple[int, int]:
    """Query tile and key block. CUDA: one query row per thread. CPU: `QUERY_TILE` rows (fewer
    for short queries); one key block for short non-causal keys, else blocks balanced to waste
    little on the last one."""
    if target.kind == "cuda":
        return 1, min(16, _round_up(plan.sk, 4))
    causal = plan.causal_offset is not None
    tq = plan.sq if plan.sq < 16 else _balanced(plan.sq, CAUSAL_BLOCK if causal else QUERY_TILE,
                                                  16)
    if causal:
        return tq, _balanced(plan.sk, CAUSAL_BLOCK, 16)
    if plan.sk <= ONE_BLOCK_MAX_KEYS:
        return tq, _round_up(plan.sk, 16)
    return tq, _balanced(plan.sk, 256, 16)


def _balanced(n: int, cap: int, multiple: int) -> int:
    tiles = -(-n // cap)
    return min(_round_up(-(-n // tiles), multiple), _round_up(n, multiple))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ------------------------------------------------------------------------- the template
LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
            1.6666665459e-1, 5.0000001201e-1)
NONE = '{"schedule_rule": "None"}'


def exp_nonpositive(x: str) -> str:
    """exp(x) for x <= 0 as a vectorisable polynomial (TVM's fast_exp; LLVM would call expf
    per lane). Below -88.38 it returns 0."""
    xc = f"T.max({x}, T.float32(-88.3762626647949))"
    n = f"T.floor({xc} * T.float32({LOG2E}) + T.float32(0.5))"
    f = f"({xc} - {n} * T.float32({LN2}))"
    poly = f"T.float32({EXP_POLY[0]})"
    for c in EXP_POLY[1:]:
        poly = f"({poly} * {f} + T.float32({c}))"
    y = f"({poly} * {f} * {f} + {f} + T.float32(1.0))"
    two_n = f"T.reinterpret('float32', T.shift_left(T.Cast('int32', {n}) + 127, 23))"
    return f"({y} * {two_n})"


def _key_block(plan: Plan, lead: Index, tq: int, tk: int, nk: int) -> str:
    """One key block: load K and V, s = K q_t, scores, online-softmax update of m, l, acc."""
    row, key = f"vqo * {tq} + vi", f"vkb * {tk} + vj"
    row_c, key_c = f"T.min({row}, {plan.sq - 1})", f"T.min({key}, {plan.sk - 1})"
    valid = f"{key} < {plan.sk}"
    if plan.causal_offset is not None:
        valid = f"{valid} and {key} <= {row} + {plan.causal_offset}"
    score = plan.score([*lead, row_c, key_c], "s[vj, vi]")
    return f"""
for j, d in T.grid({tk}, {plan.d}):
    with T.sblock("k_load"):
        vkb = T.axis.spatial({nk}, kb)
        vj, vd = T.axis.remap("SS", [j, d])
        T.sblock_attr({NONE})
        k_tile[vj, vd] = {plan.k.read([*lead, key_c, "vd"])}
for j, d in T.grid({tk}, {plan.dv}):
    with T.sblock("v_load"):
        vkb = T.axis.spatial({nk}, kb)
        vj, vd = T.axis.remap("SS", [j, d])
        T.sblock_attr({NONE})
        v_tile[vj, vd] = {plan.v.read([*lead, key_c, "vd"])}
for j, i, d in T.grid({tk}, {tq}, {plan.d}):
    with T.sblock("qk"):
        vj, vi, vd = T.axis.remap("SSR", [j, i, d])
        T.sblock_attr({NONE})
        with T.init():
            s[vj, vi] = T.float32(0)
        s[vj, vi] = s[vj, vi] + k_tile[vj, vd] * q_t[vd, vi]
for j, i in T.grid({tk}, {tq}):
    with T.sblock("score"):
        vkb = T.axis.spatial({nk}, kb)
        vj, vi = T.axis.remap("SS", [j, i])
        T.sblock_attr({NONE})
        scores[vj, vi] = T.if_then_else({valid}, {score}, {NEG})
for j, i in T.grid({tk}, {tq}):
    with T.sblock("row_max"):
        vj, vi = T.axis.remap("RS", [j, i])
        T.sblock_attr({NONE})
        with T.init():
            m_new[vi] = m[vi]
        m_new[vi] = T.max(m_new[vi], scores[vj, vi])
for j, i in T.grid({tk}, {tq}):
    with T.sblock("exp"):
        vj, vi = T.axis.remap("SS", [j, i])
        T.sblock_attr({NONE})
        p[vj, vi] = {exp_nonpositive("scores[vj, vi] - m_new[vi]")}
for j, i in T.grid({tk}, {tq}):
    with T.sblock("row_sum"):
        vj, vi = T.axis.remap("RS", [j, i])
        T.sblock_attr({NONE})
        with T.init():
            l_blk[vi] = T.float32(0)
        l_blk[vi] = l_blk[vi] + p[vj, vi]
for i in range({tq}):
    with T.sblock("rescale"):
        vi = T.axis.spatial({tq}, i)
        T.sblock_attr({NONE})
        alpha[vi] = {exp_nonpositive("m[vi] - m_new[vi]")}
        l_sum[vi] = l_sum[vi] * alpha[vi] + l_blk[vi]
        m[vi] = m_new[vi]
for i, d, j in T.grid({tq}, {plan.dv}, {tk}):
    with T.sblock("pv"):
        vkb = T.axis.spatial({nk}, kb)
        vi, vd, vj = T.axis.remap("SSR", [i, d, j])
        T.sblock_attr({NONE})
        with T.init():
            acc[vi, vd] = T.if_then_else(vkb == 0, T.float32(0), acc[vi, vd] * alpha[vi])
        acc[vi, vd] = acc[vi, vd] + p[vj, vi] * v_tile[vj, vd]"""


def prim_func(plan: Plan, name: str, tq: int, tk: int, scope: str) -> tvm.tirx.PrimFunc:
    """The attention of `plan` as one PrimFunc with query tile `tq` and key block `tk`; its
    per-tile buffers live in `scope` ("global" on CPU, "local" on CUDA)."""
    n_lead = math.prod(plan.lead)
    nq, nk = -(-plan.sq // tq), -(-plan.sk // tk)
    lead = delinear("vn", plan.lead) if plan.lead else []
    block = _key_block(plan, lead, tq, tk, nk).strip("\n")
    if plan.causal_offset is not None:  # skip key blocks above the diagonal (block 0
        # always runs: it initialises acc)
        block = (f"if kb == 0 or kb * {tk} <= vqo * {tq} + {tq - 1 + plan.causal_offset}:\n"
                 + _indent(block, 4))
    buffers = {"q_t": (plan.d, tq), "k_tile": (tk, plan.d), "v_tile": (tk, plan.dv),
               "s": (tk, tq), "scores": (tk, tq), "p": (tk, tq),
               "acc": (tq, plan.dv), **{b: (tq,) for b in ("m", "m_new", "l_blk", "alpha",
                                                             "l_sum")}}
    allocs = "\n".join(f'{b} = T.sblock_alloc_buffer({shape}, scope="{scope}")'
                       for b, shape in buffers.items())
    row_c = f"T.min(vqo * {tq} + vi, {plan.sq - 1})"
    out_idx = ", ".join(plan.out_index([*lead, f"vqo * {tq} + vi", "vd"]))
    body = f"""
for n, qo in T.grid({n_lead}, {nq}):
    with T.sblock("attention"):
        vn, vqo = T.axis.remap("SS", [n, qo])
        T.sblock_attr({{"schedule_rule": "{RULE}"}})
{_indent(allocs, 8)}
        for d, i in T.grid({plan.d}, {tq}):
            with T.sblock("q_load"):
                vd, vi = T.axis.remap("SS", [d, i])
                T.sblock_attr({NONE})
                q_t[vd, vi] = {plan.q.read([*lead, row_c, "vd"])}
        for i in range({tq}):
            with T.sblock("state_init"):
                vi = T.axis.spatial({tq}, i)
                T.sblock_attr({NONE})
                m[vi] = {NEG}
                l_sum[vi] = T.float32(0)
        for kb in range({nk}):
{_indent(block, 12)}
        for i, d in T.grid({tq}, {plan.dv}):
            with T.sblock("store"):
                vi, vd = T.axis.remap("SS", [i, d])
                T.where(vqo * {tq} + i < {plan.sq})
                T.sblock_attr({NONE})
                out[{out_idx}] = acc[vi, vd] * (T.float32(1) / l_sum[vi])"""
    args = ", ".join(f'{n}: T.Buffer({tuple(s)}, "{dt}")' for n, s, dt in plan.params)
    source = f"""
@T.prim_func(s_tir=True, private=True)
def {name}({args}, out: T.Buffer({tuple(plan.out_shape)}, "float32")):
    T.func_attr({{"tirx.noalias": True}})
    with T.sblock("root"):
        T.sblock_attr({NONE})
{_indent(body.strip(chr(10)), 8)}
"""
    return tvm.script.from_source(source)  # type: ignore[no-any-return]


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else line for line in text.split("\n"))


# ---------------------------------------------------------------------- schedule spaces
# Register-tile factors the CPU space samples (the first that fits is the untuned default);
# every pair keeps 4-16 AVX-512 accumulators, so no sample spills; on a smaller register file
# the p.v widths that would spill are left out (`_fitting_widths`).
QK_TILES = ((8, 4), (32, 16))  # q.k: keys (unrolled) x query rows (vectorised)
PV_TILES = ((4, 2), (64, 32, 16, 8, 4))  # p.v: query rows (unrolled) x head dim (vectorised)
# (16, 8 and 4 for head dims that 32 does not divide: a tile of the whole head dim, 20 to 80
# wide, ran these kernels 1.1-2.2x slower, slower than eager; at most `ONE_VECTOR` wide, the
# whole head dim is one tile: 12 ran 1.25x faster as one tile than as three of 4)
ONE_VECTOR = 16  # FP32 lanes of an AVX-512 register


def _tile(sch: Any, loop: Any, candidates: tuple[int, ...], fixed: bool,
          whole_up_to: int = 0) -> list[Any]:
    """Split `loop` by an inner factor sampled from `candidates` (those that divide its extent;
    the first is the fixed decision), else by its largest divisor <= the largest candidate;
    a loop of at most `whole_up_to` iterations is one tile."""
    extent = int(sch.get(loop).extent)
    if extent <= whole_up_to:
        candidates = (extent,)
    fits = [c for c in candidates if extent % c == 0] or \
        [max(f for f in range(1, min(max(candidates), extent) + 1) if extent % f == 0)]
    inner = sch.sample_categorical(fits, [1 / len(fits)] * len(fits),
                                   decision=0 if fixed else None)
    return list(sch.split(loop, [None, inner]))


def _fitting_widths(tiles: tuple[tuple[int, ...], tuple[int, ...]]
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`tiles` without the vectorised widths whose register tile, at the most unrolled rows,
    holds more accumulators than the target's vector registers do (`isa`): AVX2's 12 keep p.v
    widths of 16, 8 and 4 lanes, AVX-512's 24 all of them."""
    unit = current_vector_unit()
    rows, widths = tiles
    fit = tuple(w for w in widths if max(rows) * -(-w // unit.lanes) <= unit.accumulators)
    return rows, fit or widths[-1:]


def _loops(sch: Any, name: str, count: int) -> tuple[Any, list[Any]]:
    block = sch.get_sblock(name)
    return block, list(sch.get_loops(block))[-count:]


def _register_tile(sch: Any, name: str, tiles: tuple[tuple[int, ...], tuple[int, ...]],
                   fixed: bool) -> None:
    """Contraction `name` with loops (a, b, reduction): an (a1 x b1) register tile, a1
    unrolled, b1 vectorised, the reduction between the tile loops and the tile."""
    block, (a, b, r) = _loops(sch, name, 3)
    a0, a1 = _tile(sch, a, tiles[0], fixed)
    b0, b1 = _tile(sch, b, tiles[1], fixed, whole_up_to=ONE_VECTOR)
    sch.reorder(a0, b0, r, a1, b1)
    sch.unroll(a1)
    sch.vectorize(b1)
    init = sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(init)[-1])


def _vertical_reduction(sch: Any, name: str) -> None:
    """Reduction over keys with loops (key, row): vectorised over rows."""
    block, (key, row) = _loops(sch, name, 2)
    sch.vectorize(row)
    init = sch.decompose_reduction(block, key)
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_cpu(sch: Any, block: Any, fixed: bool = False) -> list[Any]:
    """CPU space: parallel over (leading dims x query tiles); register tiles of q.k (keys x
    vectorised rows) and p.v (rows x vectorised head dim), sampled; vertical softmax
    reductions; vectorised element-wise stages; sampled unrolling."""
    if sch.get(block).name_hint != "attention":
        return [sch]
    outer = sch.fuse(*sch.get_loops(block))
    sch.parallel(outer)
    _register_tile(sch, "qk", QK_TILES, fixed)
    _register_tile(sch, "pv", _fitting_widths(PV_TILES), fixed)
    for name in ("row_max", "row_sum"):
        _vertical_reduction(sch, name)
    for name in ("q_load", "k_load", "v_load", "score", "exp", "store"):
        _, (inner,) = _loops(sch, name, 1)
        sch.vectorize(inner)
    unroll = sch.sample_categorical([0, 16, 64, 256], [0.25] * 4, decision=2 if fixed else None)
    sch.annotate(outer, "pragma_auto_unroll_max_step", unroll)
    sch.annotate(outer, "pragma_unroll_explicit", 1)
    # The Q tile's load transposes it: a strided load of `tq` lanes per head dim. Unrolled over
    # the head dim (64 loads of 64 lanes in BERT's attention) LLVM took 230-250 s to compile the
    # kernel, against 0.6 s rolled, and ran it no faster (289 vs 301 us); the tuning builder's
    # timeout dropped every candidate unrolled that far, and a build waited minutes for one.
    _, (head_dims, _rows) = _loops(sch, "q_load", 2)
    sch.annotate(head_dims, "pragma_auto_unroll_max_step", 0)
    return [sch]


def schedule_cuda(sch: Any, block: Any, fixed: bool = False) -> list[Any]:
    """CUDA space: one (leading index, query tile) per thread; threads per block sampled. A
    baseline that builds and runs correctly, not a tuned GPU FlashAttention."""
    if sch.get(block).name_hint != "attention":
        return [sch]
    outer = sch.fuse(*sch.get_loops(block))
    threads = sch.sample_categorical([32, 64, 128], [1 / 3] * 3, decision=1 if fixed else None)
    bx, tx = sch.split(outer, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return [sch]


SPACES: dict[str, Space] = {"cpu": schedule_cpu, "cuda": schedule_cuda}


def schedule_fixed(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> Any:
    """An attention PrimFunc scheduled by its space's fixed default decisions (the Schedule)."""
    from tvm.s_tir import Schedule

    space = schedule_cuda if target.kind.name == "cuda" else schedule_cpu
    sch = Schedule(func)
    with target:  # its vector registers bound the register tiles
        space(sch, sch.get_sblock("attention"), fixed=True)
    return sch


def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> tvm.IRModule:
    """The kernel graph -> a Relax `main` with one call_tir to the fused attention PrimFunc."""
    register_spaces(RULE, SPACES)
    plan = plan_of(graph)
    tq, tk = tile_sizes(plan, target)
    func = prim_func(plan, name, tq, tk, "local" if target.kind == "cuda" else "global")
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    args = {p.name: relax.Var(p.name, relax.TensorType(_val_shape(p), _dtype(p)))
            for p in placeholders}
    bb = relax.BlockBuilder()
    with bb.function("main", list(args.values())):
        gv = bb.add_func(func, name)
        call_args = [args[n.removeprefix("p_")] if n not in plan.constants
                     else relax.const(plan.constants[n].cpu().numpy()) for n, _, _ in plan.params]
        out = bb.emit(relax.call_tir(gv, call_args,
                                     relax.TensorType(plan.out_shape, "float32")))
        bb.emit_func_output(relax.Tuple([out]))
    return bb.get()
