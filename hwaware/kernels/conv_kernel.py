"""The lowering half of conv_block: its TE definition, lowering and schedule spaces.

`conv.py` (TVM-free) finds the inverted-residual block; this module, imported only when a
kernel is lowered or scheduled, re-derives the block from the kernel graph and turns it into
one PrimFunc. Internally the intermediates are channel-last (h, w, channel) so that every stage
vectorizes over channels; the input and output stay NCHW. Blocks:
    expand  (1x1 conv, reduction over input channels)         [absent for expand ratio 1]
    pad     (bias + act of expand, zero halo: top, left, bottom, right, TF-same's too)
    dw      (depthwise conv + bias + act, k*k terms, no reduction axis)
    proj    (1x1 conv, reduction over expanded channels)
    out     (bias [+ residual], back to NCHW; carries the `schedule_rule` annotation)
With a squeeze-excite, between dw and proj (the pool needs the whole depthwise output):
    pool    (channel sums of dw), squeeze / excite (the SE's two small FCs),
    gated   (the project weights scaled by the gate: the channel scale costs no extra pass)
The schedule space (`s_tir.meta_schedule.cpu.hw_conv_block`) tiles the output spatially and
computes expand, pad and dw for each tile (plus halo) inside the tile loop, depth-first, so the
expanded intermediate stays in cache. With a squeeze-excite it has two phases in the one
kernel: parallel tiles of the depthwise output (each computing its expand conv and padding
depth-first, so only the depthwise output is materialized), the pool and SE, then the tiled
project conv reading the depthwise output and the gated weights. A map of at most
`SMALL_MAP` output pixels (28x28) on a CPU has two phases too, over whole maps: the first
phase's parallel tiles are groups of expanded channels (no halo to recompute; the expand conv
is then a reduction, register-tiled like the project conv), the second's are (row band,
output-channel) tiles. MobileNetV2 blocks on Zen 5, 2 threads, vs depth-first row tiles:
64 channels at 14x14 48 vs 119 us, 160 at 7x7 80 vs 210 (one row tile left a core idle),
32 at 28x28 68 vs 81, 24 at 56x56 no faster (its depthwise output would not stay in L2).
Sampled: the tile shape (a full-width tile is a row band), the register blocks and vector
widths, the producers' vector widths and the unroll depth. A cuda space binds tiles to thread
blocks and keeps the tile's intermediates in shared memory. `schedule_fixed` applies the same
schedules with fixed decisions (untuned). `convnext_kernel` reuses the compute and schedule
helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import tvm
from torch import fx
from tvm import relax, te, tirx

from hwaware.kernels.conv import (
    CONV,
    RULE,
    Act,
    Block,
    Conv,
    NoMatch,
    SqueezeExcite,
    _conv_attrs,
    _match,
    _val,
)
from hwaware.kernels.lowering_common import (
    accumulate_in_registers,
    fixed_schedule,
    register_spaces,
    sampled_spaces,
)
from hwaware.tvm.isa import VectorUnit, current_vector_unit

# Explicit-unroll steps the schedule samples from. Not 256 or 512: LLVM took over 40 s to build
# 2 of 3 MobileNetV2 blocks unrolled 512 steps (5 of 10 at 256) against 0.1-10 s otherwise, so
# they timed out in the tuning builder, and no fused conv block's best record used them.
UNROLL = [16, 0, 64]
UNROLL_P = [1 / len(UNROLL)] * len(UNROLL)
CUDA_THREADS = [64, 128, 256]
OPAQUE = 8  # relax OpPatternKind::kOpaque
SMALL_MAP = 784  # output pixels (28x28) at or below which a block runs in two whole-map phases


# ------------------------------------------------------------------------------- compute
def _apply_act(x: Any, act: Act | None) -> Any:
    if act is None:
        return x
    if act.kind == "relu":
        return te.max(x, tirx.const(0.0, "float32"))
    if act.kind == "clamp":
        return te.min(te.max(x, tirx.const(act.lo, "float32")), tirx.const(act.hi, "float32"))
    if act.kind == "hardswish":
        three, six = tirx.const(3.0, "float32"), tirx.const(6.0, "float32")
        zero = tirx.const(0.0, "float32")
        return x * te.min(te.max(x + three, zero), six) / six
    if act.kind == "silu":
        return x * te.sigmoid(x)
    raise ValueError(f"unknown activation {act.kind}")


DOT_CHAINS = 4  # independent partial sums of an unrolled dot product


def _dot(xs: list[Any], ws: list[Any]) -> Any:
    """sum(x * w) as DOT_CHAINS interleaved partial sums added at the end: one chain of 49
    depthwise taps is 49 dependent FMAs (latency-bound); four chains overlap."""
    chains: list[Any] = []
    for k, (a, b) in enumerate(zip(xs, ws, strict=True)):
        if k < DOT_CHAINS:
            chains.append(a * b)
        else:
            chains[k % DOT_CHAINS] = chains[k % DOT_CHAINS] + a * b
    while len(chains) > 1:
        chains = [chains[i] + chains[i + 1] if i + 1 < len(chains) else chains[i]
                  for i in range(0, len(chains), 2)]
    return chains[0]


def _bias(conv: Conv) -> torch.Tensor:
    out = int(conv.weight.shape[0])
    return conv.bias if conv.bias is not None else torch.zeros(out, dtype=torch.float32)


def block_compute(block: Block, x: Any, consts: dict[str, Any], cpu: bool = True) -> Any:
    """The TE definition of the fused block on NCHW input `x`; `consts` holds the weights in
    the kernel's layouts (see `_weights`). Returns the NCHW output tensor. On a CPU target a
    small map's expand conv is a reduction (`_expand_te`)."""
    _, c_in, h, w = (int(s) for s in x.shape)
    k = int(block.dw.weight.shape[-1])
    s = block.stride
    top, left, bottom, right = block.pad
    e = int(block.dw.weight.shape[0])
    c_out = int(block.project.weight.shape[0])
    ph, pw = h + top + bottom, w + left + right
    oh, ow = (ph - k) // s + 1, (pw - k) // s + 1
    none = {"schedule_rule": "None"}
    zero = tirx.const(0.0, "float32")

    def inside(i: Any, j: Any) -> Any:
        return tirx.all(i >= top, i < h + top, j >= left, j < w + left)

    if block.expand is not None:
        expanded = _expand_te(x, consts["w1"], e, whole=cpu and oh * ow <= SMALL_MAP)
        act1 = block.expand_act

        def padded(i: Any, j: Any, f: Any) -> Any:
            v = _apply_act(expanded[i - top, j - left, f] + consts["b1"][f], act1)
            return tirx.if_then_else(inside(i, j), v, zero)
    else:
        def padded(i: Any, j: Any, f: Any) -> Any:
            return tirx.if_then_else(inside(i, j), x[0, f, i - top, j - left], zero)

    pad = te.compute((ph, pw, e), padded, name="pad", attrs=none)

    def depthwise(i: Any, j: Any, f: Any) -> Any:
        taps = [(a, b) for a in range(k) for b in range(k)]
        acc = _dot([pad[i * s + a, j * s + b, f] for a, b in taps],
                   [consts["wd"][a, b, f] for a, b in taps])
        return _apply_act(acc + consts["bd"][f], block.dw_act)

    dw = te.compute((oh, ow, e), depthwise, name="dw", attrs=none)
    w2 = consts["w2"] if block.se is None else _gated_weights(block.se, dw, consts)
    r = te.reduce_axis((0, e), name="r")
    proj = te.compute((oh, ow, c_out),
                      lambda i, j, o: te.sum(dw[i, j, r] * w2[r, o], axis=r),
                      name="proj", attrs=none)

    def output(n: Any, o: Any, i: Any, j: Any) -> Any:
        v = proj[i, j, o] + consts["b2"][o]
        return v + x[n, o, i, j] if block.residual else v

    return te.compute((1, c_out, oh, ow), output, name="out", attrs={"schedule_rule": RULE})


def _expand_te(x: Any, w1: Any, e: int, whole: bool) -> Any:
    """The expand (1x1) conv, channel-last (h, w, e). `whole` (a small map, computed whole per
    channel group): a reduction the schedule register-tiles like the project conv. Otherwise
    an explicit sum, not a reduction: TIR cannot vectorize a reduction block that compute_at
    clipped to the tile's halo; the sum stays in registers too."""
    _, c_in, h, w = (int(v) for v in x.shape)
    if whole:
        rc = te.reduce_axis((0, c_in), name="rc")
        return te.compute((h, w, e), lambda i, j, f: te.sum(x[0, rc, i, j] * w1[rc, f], axis=rc),
                          name="expand", attrs={"schedule_rule": "None"})
    return te.compute(
        (h, w, e), lambda i, j, f: _dot([x[0, c, i, j] for c in range(c_in)],
                                        [w1[c, f] for c in range(c_in)]),
        name="expand", attrs={"schedule_rule": "None"})


def _gated_weights(se: SqueezeExcite, dw: Any, consts: dict[str, Any]) -> Any:
    """The project weights [e, c_out] scaled per input channel by the squeeze-excite gate of
    the depthwise output `dw` (h, w, e); the pool's 1/(h*w) is folded into `wr`."""
    h, w, e = (int(s) for s in dw.shape)
    q = int(se.reduce.weight.shape[0])
    none = {"schedule_rule": "None"}
    ri, rj = te.reduce_axis((0, h), name="ri"), te.reduce_axis((0, w), name="rj")
    pool = te.compute((e,), lambda f: te.sum(dw[ri, rj, f], axis=[ri, rj]), name="pool",
                      attrs=none)
    rf = te.reduce_axis((0, e), name="rf")
    squeeze = te.compute((q,), lambda t: te.sum(pool[rf] * consts["wr"][rf, t], axis=rf),
                         name="squeeze", attrs=none)
    rt = te.reduce_axis((0, q), name="rt")
    excite = te.compute(
        (e,), lambda f: te.sum(_apply_act(squeeze[rt] + consts["br"][rt], se.act)
                               * consts["we"][rt, f], axis=rt), name="excite", attrs=none)

    def gate(f: Any) -> Any:
        v = excite[f] + consts["be"][f]
        if se.gate == "sigmoid":
            return te.sigmoid(v)
        return _apply_act(v + tirx.const(3.0, "float32"), Act("clamp", 0.0, 6.0)) / \
            tirx.const(6.0, "float32")

    return te.compute((e, int(consts["w2"].shape[1])),
                      lambda f, o: gate(f) * consts["w2"][f, o], name="gated", attrs=none)


def _weights(block: Block) -> dict[str, torch.Tensor]:
    """The block's constants in the kernel's layouts (weights are free to re-lay out)."""
    e = int(block.dw.weight.shape[0])
    k = int(block.dw.weight.shape[-1])
    out = {
        "wd": block.dw.weight.reshape(e, k, k).permute(1, 2, 0).contiguous(),
        "bd": _bias(block.dw),
        "w2": block.project.weight.reshape(block.project.weight.shape[0], e).t().contiguous(),
        "b2": _bias(block.project),
    }
    if block.expand is not None:
        w1 = block.expand.weight
        out["w1"] = w1.reshape(w1.shape[0], w1.shape[1]).t().contiguous()
        out["b1"] = _bias(block.expand)
    if block.se is not None:
        wr, we = block.se.reduce.weight.flatten(1), block.se.expand.weight.flatten(1)
        out["wr"] = (wr / (_pixels(block))).t().contiguous()
        out["br"] = _bias(block.se.reduce)
        out["we"] = we.t().contiguous()
        out["be"] = _bias(block.se.expand)
    return out


def _pixels(block: Block) -> int:
    """The pixel count of the depthwise output (what the squeeze-excite's pool averages)."""
    shape = _val(block.dw.node).shape
    return int(shape[-2]) * int(shape[-1])


def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph of one block -> an IRModule whose `main` makes one call_tir."""
    register_spaces(RULE, SPACES)
    dw_node = next(n for n in graph.graph.nodes
                   if n.op == "call_function" and n.target is CONV and _conv_attrs(n)[3] > 1)
    block = _match(graph, dw_node)
    cpu = getattr(target, "kind", "cpu") != "cuda"
    return emit_one_call(graph, _weights(block), lambda x, c: block_compute(block, x, c, cpu),
                         name)


def emit_one_call(graph: fx.GraphModule, weights: dict[str, torch.Tensor],
                  compute: Callable[[Any, dict[str, Any]], Any], name: str) -> Any:
    """An IRModule whose Relax `main` takes the kernel graph's one input and returns a 1-tuple:
    `compute(x, consts)` (TE, `weights` embedded as constants) as PrimFunc `name`, marked
    opaque so that FuseOps merges no neighbouring op into it (its schedule names blocks)."""
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise NoMatch(f"expected one input, got {len(placeholders)}")
    x_val = _val(placeholders[0])
    bb = relax.BlockBuilder()
    x = relax.Var(placeholders[0].name, relax.TensorType(list(x_val.shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            consts = {k: relax.const(v.cpu().numpy()) for k, v in weights.items()}
            names = sorted(consts)

            def te_fn(x_te: Any, *const_te: Any) -> Any:
                return compute(x_te, dict(zip(names, const_te, strict=True)))

            y = bb.emit_te(te_fn, x, *[consts[n] for n in names], primfunc_name_hint=name)
            out = bb.emit_output(relax.Tuple([y]))
        bb.emit_func_output(out)
    mod: tvm.IRModule = bb.get()
    gv = mod.get_global_var(name)
    mod[gv] = mod[gv].with_attr("op_pattern", OPAQUE)
    return mod


# ------------------------------------------------------------------------------ schedules
class Decide(Protocol):
    """Where a schedule's tunable decisions come from: sampled (search space) or fixed. Hints
    (the fixed decisions) may follow `cores`, the cores the parallel loops run on."""

    cores: int

    def tile(self, sch: Any, loop: Any, n: int, max_inner: int, hint: list[int]) -> list[Any]:
        ...

    def choose(self, sch: Any, options: list[int], probs: list[float]) -> Any: ...


class Sampled:
    """Decisions as MetaSchedule sampling instructions (replayed from the database)."""

    cores = 1  # hints are not used

    def tile(self, sch: Any, loop: Any, n: int, max_inner: int, hint: list[int]) -> list[Any]:
        return list(sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_inner))

    def choose(self, sch: Any, options: list[int], probs: list[float]) -> Any:
        return sch.sample_categorical(options, probs)


class Fixed:
    """Fixed decisions for an untuned build: from the innermost factor out, the largest divisor
    of what is left that is <= the hint; the first option of a choice. They are sampling
    instructions with these decisions, so the untuned default is a point of the tuned space
    (tuning measures it first and mutates from it)."""

    def __init__(self, cores: int = 1):
        self.cores = cores

    def tile(self, sch: Any, loop: Any, n: int, max_inner: int, hint: list[int]) -> list[Any]:
        extent = int(sch.get(loop).extent)
        factors: list[int] = []
        for k, limit in enumerate(reversed(hint[-(n - 1):])):
            limit = min(limit, max_inner) if k == 0 else limit
            f = max(d for d in range(1, min(limit, extent) + 1) if extent % d == 0)
            factors.insert(0, f)
            extent //= f
        return list(sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_inner,
                                            decision=[extent, *factors]))

    def choose(self, sch: Any, options: list[int], probs: list[float]) -> Any:
        return sch.sample_categorical(options, probs, decision=0)


def _block(sch: Any, name: str) -> Any | None:
    try:
        return sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses; absent block
        return None


def _tile_proj(sch: Any, decide: Decide, hints: dict[str, list[int]], max_inner: int
               ) -> tuple[Any, list[Any]]:
    """Split the project conv's output (rows, columns, channels) by `hints`/samples; returns
    the fused spatial tile loop and the loops inside it (row, col parts, then o, r)."""
    proj = sch.get_sblock("proj")
    oh, ow, o, r = sch.get_loops(proj)
    oh0, oh1 = sch.split(oh, decide.tile(sch, oh, 2, max_inner, hints["oh"]))
    ow_parts = sch.split(ow, decide.tile(sch, ow, len(hints["ow"]) + 1, 8, hints["ow"]))
    o_parts = sch.split(o, decide.tile(sch, o, 2, 64, hints["o"]))
    sch.reorder(oh0, ow_parts[0], oh1, *ow_parts[1:], *o_parts, r)
    return sch.fuse(oh0, ow_parts[0]), [oh1, *ow_parts[1:], *o_parts, r]


def split_lanes(sch: Any, decide: Decide, loop: Any) -> list[Any]:
    """Split a channel loop into (vectors, lanes), a perfect tile: fixed decisions take the
    largest power of two <= the target's lanes (`isa.current_vector_unit`) dividing its extent
    (LLVM keeps a register tile of such vectors in registers; a 12- or 48-lane vector
    accumulator compiles to lane shuffles), the search any divisor <= those lanes.

    Perfect, not a categorical lane count: the loop is often a sampled tile, whose extent the
    search mutates while a categorical decision stays as it was. A lane count that no longer
    divides the extent left a predicated split, whose cache-write copy and reverse_compute_at
    stages TVM sizes by the loop extents, not the predicate: they wrote other parallel tiles'
    outputs, a race that gave wrong results on 2 threads (session 34: 23 of 128 records of one
    MobileNetV2 block). A perfect-tile decision stays perfect when an outer tile changes."""
    widest = _power_of_two_lanes(int(sch.get(loop).extent))[0]
    max_lanes = current_vector_unit().lanes
    return list(sch.split(loop, decide.tile(sch, loop, 2, max_lanes, [widest])))


def split_whole_lanes(sch: Any, decide: Decide, loop: Any) -> list[Any]:
    """Split a loop of the workload's own extent (no sampled tile sets it, so no mutation
    changes it) into (vectors, lanes): lanes a power of two <= the target's dividing it, sampled
    (the widest for fixed decisions). Not `split_lanes`: its perfect tile may pick 1 lane, and
    ConvNeXt's vector partial sums (rfactor) with 1 lane failed LLVM's verifier (1 candidate
    in 90)."""
    lanes = _power_of_two_lanes(int(sch.get(loop).extent))
    return list(sch.split(loop, [None, decide.choose(sch, lanes, [1.0 / len(lanes)] * len(lanes))]))


def _power_of_two_lanes(extent: int) -> list[int]:
    """The powers of two <= the target's lanes dividing `extent` (1 when none does), widest
    first."""
    max_lanes = current_vector_unit().lanes
    return [v for v in (16, 8, 4, 2) if v <= max_lanes and extent % v == 0] or [1]


def vectorize_channels(sch: Any, decide: Decide, block: Any) -> None:
    """Vectorize an element-wise stage over its innermost (channel) loop, `split_lanes` wide."""
    sch.vectorize(split_lanes(sch, decide, sch.get_loops(block)[-1])[1])


def register_hints(channels: int, columns: int, unit: VectorUnit) -> tuple[int, int]:
    """Fixed (channel tile, columns) of a (columns x channel vectors) register tile for a GEMM
    with `channels` outputs over `columns` output columns (0: any) on vector `unit`: up to 5
    vectors of the widest power-of-two lanes (up to the unit's) and up to 8 columns, each
    dividing its extent (the fixed tile decisions are divisors), with the most accumulators up
    to `unit.accumulators`, then the most vectors. (40 channels: 5 vectors x 4 columns ran
    1.1x the 1 x 7 that a 3-vector bound left, too few accumulators to hide FMA latency. A
    64-channel MobileNetV2 block at 14x14: 2 x 7 ran 1.5x the 4 x 2 that fixing the vectors
    first left, 132 vs 203 us on Zen 5.)"""
    lanes = max(v for v in (16, 8, 4, 2, 1) if channels % v == 0 and v <= unit.lanes)
    vector_options = [d for d in range(1, 6) if (channels // lanes) % d == 0]
    column_options = [c for c in range(1, 9) if not columns or columns % c == 0]
    vectors, cols = max(((v, c) for v in vector_options for c in column_options
                         if v * c <= unit.accumulators), key=lambda vc: (vc[0] * vc[1], vc[0]))
    return lanes * vectors, cols


def parallel_project_tiles(sch: Any, decide: Decide, by_channels: bool = False) -> Any:
    """The project conv (GEMM) split into parallel output tiles, each a (columns x channel
    vectors) register block accumulating in registers, with the output epilogue inside; the
    tile loop (where a depth-first schedule computes the earlier stages). `by_channels`: the
    parallel tiles are (spatial tile, output-channel tile) pairs, for maps too small to give
    every core a spatial tile."""
    _, ow, o, _ = sch.get_loops(sch.get_sblock("proj"))
    channels, columns = register_hints(int(sch.get(o).extent), int(sch.get(ow).extent),
                                       current_vector_unit())
    tile, (oh1, ow1, ow2, o0, o1, r) = _tile_proj(
        sch, decide, {"oh": [8], "ow": [2, columns], "o": [channels]}, 64)
    vectors, lanes = split_lanes(sch, decide, o1)
    if by_channels:
        sch.reorder(o0, oh1, ow1, r, ow2, vectors, lanes)
        tile, register_tile = sch.fuse(tile, o0), ow1
    else:
        sch.reorder(oh1, ow1, o0, r, ow2, vectors, lanes)
        register_tile = o0
    sch.vectorize(lanes)
    sch.unroll(vectors)
    sch.unroll(ow2)
    sch.parallel(tile)
    accumulate_in_registers(sch, sch.get_sblock("proj"), register_tile, r)
    sch.annotate(tile, "pragma_auto_unroll_max_step", decide.choose(sch, UNROLL, UNROLL_P))
    sch.annotate(tile, "pragma_unroll_explicit", 1)
    sch.reverse_compute_at(sch.get_sblock("out"), tile, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(sch.get_sblock("out"))[-1])  # NCHW rows, not scalars
    # MetaSchedule's parallel/vectorize/unroll rule would annotate the root too, and its
    # postprocessor then fails on the decomposed reduction inside this parallel loop: opt out
    sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
    return tile


def is_small_map(sch: Any) -> bool:
    """Is the project conv's output map at most SMALL_MAP pixels (the whole-map phases)?"""
    oh, ow = sch.get_loops(sch.get_sblock("proj"))[:2]
    return int(sch.get(oh).extent) * int(sch.get(ow).extent) <= SMALL_MAP


def schedule_cpu(sch: Any, decide: Decide) -> Any:
    """The depth-first CPU schedule: per output tile (parallel), the expand conv for the tile
    plus halo, the padded activation and the depthwise conv into tile-sized buffers, then the
    project conv with a (columns x channels) register block vectorized over channels.
    Two phases instead (the depthwise output materialized, then the project conv's tiles) with
    a squeeze-excite, whose pool needs the whole depthwise output, and on a small map, where
    the first phase's parallel tiles are channel groups over the whole map (the expand conv
    then has no halo to recompute) and the second's are output-channel tiles."""
    small = is_small_map(sch)
    tile = parallel_project_tiles(sch, decide, by_channels=small)
    two_phase = small or _block(sch, "pool") is not None
    anchor = tile
    if small:
        anchor = _dw_channel_tiles(sch, decide)
    elif two_phase:
        anchor = _dw_tiles(sch, decide, _one_row_tile_per_core(sch, decide))
    for name in ("pad", "expand") if two_phase else ("dw", "pad", "expand"):
        block = _block(sch, name)  # depth-first: the tile's producers inside its loop
        if block is not None:
            sch.compute_at(block, anchor, preserve_unit_loops=True)
    if two_phase:
        sch.parallel(anchor)
    pool = _block(sch, "pool")
    if pool is not None:
        f, ri, rj = sch.get_loops(pool)
        sch.reorder(ri, rj, f)
    expand = _block(sch, "expand")
    whole_expand = expand is not None and _is_reduction(sch, expand)
    if whole_expand:
        _register_tile_expand(sch, decide, expand)
    for name in ("dw", "pad", "pool", "gated") + (() if whole_expand else ("expand",)):
        block = _block(sch, name)
        if block is None:
            continue
        vectorize_channels(sch, decide, block)
    return sch


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(int(v.iter_type) == 2 for v in sch.get(block).iter_vars)  # 2: kCommReduce


def _register_tile_expand(sch: Any, decide: Decide, expand: Any) -> None:
    """A small map's expand conv (a reduction, computed whole per channel group), register-
    tiled like the project conv."""
    register_tile_gemm(sch, decide, expand)


def register_tile_gemm(sch: Any, decide: Decide, block: Any) -> Any:
    """A channel-last GEMM block (loops ..., rows, columns, channels, reduction): a (columns x
    channel vectors) register tile (`register_hints`) accumulating in registers over the
    reduction; returns the loop that runs one register tile."""
    *_, i, j, f, r = sch.get_loops(block)
    channels, columns = register_hints(int(sch.get(f).extent), int(sch.get(j).extent),
                                       current_vector_unit())
    j0, j1 = sch.split(j, decide.tile(sch, j, 2, 8, [columns]))
    f0, f1 = sch.split(f, decide.tile(sch, f, 2, 64, [channels]))
    vectors, lanes = split_lanes(sch, decide, f1)
    sch.reorder(i, j0, f0, r, j1, vectors, lanes)
    sch.vectorize(lanes)
    sch.unroll(vectors)
    sch.unroll(j1)
    accumulate_in_registers(sch, block, f0, r)
    return f0


def _dw_channel_tiles(sch: Any, decide: Decide) -> Any:
    """Tile the depthwise output by channel groups (whole map per tile; up to 64 channels,
    the largest dividing group for fixed decisions); returns the group loop."""
    i, j, f = sch.get_loops(sch.get_sblock("dw"))
    f0, f1 = sch.split(f, decide.tile(sch, f, 2, 64, [64]))
    sch.reorder(f0, i, j, f1)
    return f0


def _one_row_tile_per_core(sch: Any, decide: Decide) -> list[int]:
    """The depthwise tile hint (rows, columns) of a squeeze-excite's first phase: whole rows,
    as few row tiles as keep every core busy, since each tile recomputes the expand conv on a
    halo of kernel - 1 rows (28 rows, 5x5, 2 cores: 14-row tiles ran 1.07x 7-row ones)."""
    rows = int(sch.get(sch.get_loops(sch.get_sblock("dw"))[0]).extent)
    return [max(1, -(-rows // decide.cores)), 64]


def _dw_tiles(sch: Any, decide: Decide, hint: list[int]) -> Any:
    """Tile the depthwise output (rows x columns, all channels per tile) by `hint` (rows,
    columns; a wide tile wastes less of the expand conv on halos) or samples; returns the
    fused tile loop (a squeeze-excite's first phase)."""
    i, j, f = sch.get_loops(sch.get_sblock("dw"))
    i0, i1 = sch.split(i, decide.tile(sch, i, 2, 64, hint[:1]))
    j0, j1 = sch.split(j, decide.tile(sch, j, 2, 64, hint[1:]))
    sch.reorder(i0, j0, i1, j1, f)
    return sch.fuse(i0, j0)


def schedule_cuda(sch: Any, decide: Decide) -> Any:
    """The depth-first CUDA schedule: one thread block per output tile; the tile's expand conv
    (plus halo) and depthwise conv go to shared memory, the zero padding is inlined into the
    depthwise conv, and each thread accumulates project outputs in registers."""
    threads = decide.choose(sch, CUDA_THREADS, [1.0 / len(CUDA_THREADS)] * len(CUDA_THREADS))
    tile, (oh1, ow1, o0, o1, r) = _tile_proj(sch, decide, {"oh": [2], "ow": [2], "o": [64]}, 8)
    inner = sch.fuse(oh1, ow1, o0, o1)
    t0, t1 = sch.split(inner, [None, threads])
    sch.reorder(t0, t1, r)
    sch.bind(tile, "blockIdx.x")
    sch.bind(t1, "threadIdx.x")
    proj = sch.get_sblock("proj")
    sch.set_scope(proj, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("out"), t1)
    sch.compute_inline(sch.get_sblock("pad"))
    two_phase = _block(sch, "pool") is not None
    if two_phase:  # squeeze-excite: dw tiles of its own, written to global memory
        dw_tile = _dw_tiles(sch, decide, [2, 2])
        sch.bind(dw_tile, "blockIdx.x")
        _, b1 = sch.split(sch.fuse(*sch.get_loops(sch.get_sblock("dw"))[1:]), [None, threads])
        sch.bind(b1, "threadIdx.x")
        _bind_se_cuda(sch, threads)
    for name in ("expand",) if two_phase else ("dw", "expand"):
        block = _block(sch, name)
        if block is None:
            continue
        sch.compute_at(block, dw_tile if two_phase else tile, preserve_unit_loops=True)
        sch.set_scope(block, 0, "shared")
        _, b1 = sch.split(sch.fuse(*sch.get_loops(block)[1:]), [None, threads])
        sch.bind(b1, "threadIdx.x")
    return sch


def _bind_se_cuda(sch: Any, threads: int) -> None:
    """The pool and the SE's small FCs: one thread per output element (the reductions run
    serially in each thread); the gated weights likewise."""
    for name, spatial in (("pool", 1), ("squeeze", 1), ("excite", 1), ("gated", 2)):
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)[:spatial]
        b0, b1 = sch.split(sch.fuse(*loops) if spatial > 1 else loops[0], [None, threads])
        sch.bind(b0, "blockIdx.x")
        sch.bind(b1, "threadIdx.x")


SCHEDULES: dict[str, Callable[[Any, Decide], Any]] = {"cpu": schedule_cpu, "cuda": schedule_cuda}
SPACES = sampled_spaces(SCHEDULES, Sampled)
schedule_fixed = fixed_schedule(SCHEDULES, lambda _kind, cores: Fixed(cores))
