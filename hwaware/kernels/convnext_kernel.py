"""The lowering half of convnext_block: its TE definition, lowering and schedule spaces.

`convnext.py` (TVM-free) finds the block; this module, imported only when a kernel is lowered
or scheduled, re-derives it from the kernel graph and turns it into one PrimFunc (built with
`conv_kernel`'s helpers), intermediates channel-last (pixel, channel) so every stage vectorizes
over channels; the LayerNorm affine is folded into fc1 and gamma into fc2. Blocks:
    pad (zero halo) -> dw (k*k taps + bias) -> [mean, var, norm] -> fc1 (reduction over C)
    -> act (bias + activation) -> proj (reduction over E) -> out (bias [+ residual], NCHW,
    carries the `schedule_rule` annotation)
The CPU space (`s_tir.meta_schedule.cpu.hw_convnext`) tiles the output spatially (parallel
tiles) and computes every stage for the tile (plus the depthwise halo) inside the tile loop,
depth-first, so the E-wide hidden activation only ever exists as a tile-sized buffer in cache.
Both GEMMs are register-blocked (pixels x channel vectors); the activation runs on fc1's
register block right after its reduction. Sampled: tile shape, both register blocks, vector
widths and the unroll depth. The cuda space binds tiles to thread blocks with the tile's
intermediates in shared memory. `schedule_fixed` uses the same schedules with fixed decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from tvm import te, tirx

from hwaware.kernels.conv import CONV, Act, _conv_attrs
from hwaware.kernels.conv_kernel import (
    CUDA_THREADS,
    Decide,
    Fixed,
    Sampled,
    _apply_act,
    _bias,
    _block,
    _dot,
    _tile_proj,
    emit_one_call,
    parallel_project_tiles,
    register_tile_gemm,
    split_whole_lanes,
    vectorize_channels,
)
from hwaware.kernels.convnext import RULE, Block, _is, _match
from hwaware.kernels.lowering_common import (
    fixed_schedule,
    register_spaces,
    sampled_spaces,
)

REDUCTIONS = ("mean", "var", "fc1")  # blocks whose innermost loop is a reduction


# ------------------------------------------------------------------------------- compute
# Rational approximations of erf and tanh for float32 (the forms Eigen vectorizes; error a few
# ulp): TVM's LLVM backend lowers tirx.erf to a scalar libm call per element.
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
         -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
         -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
         -7.37332916720468e-03, -1.42647390514189e-02)
TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
          5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
          4.89352455891786e-03)
TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
          4.89352518554385e-03)


def _rational(x: Any, clamp: float, p: tuple[float, ...], q: tuple[float, ...]) -> Any:
    """x * P(x^2) / Q(x^2) on x clamped to [-clamp, clamp] (Horner; vectorizes, no calls)."""
    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    x = te.min(te.max(x, c(-clamp)), c(clamp))
    x2 = x * x
    num, den = c(p[0]), c(q[0])
    for a in p[1:]:
        num = num * x2 + c(a)
    for b in q[1:]:
        den = den * x2 + c(b)
    return x * num / den


def _gelu(x: Any, tanh: bool) -> Any:
    """GELU as the graph has it: exact (erf) or the tanh approximation."""
    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    if tanh:
        inner = c(math.sqrt(2.0 / math.pi)) * (x + c(0.044715) * x * x * x)
        return c(0.5) * x * (c(1.0) + _rational(inner, 7.90531110763549805, TANH_P, TANH_Q))
    return c(0.5) * x * (c(1.0) + _rational(x * c(1.0 / math.sqrt(2.0)), 4.0, ERF_P, ERF_Q))


def _activate(x: Any, act: Act) -> Any:
    if act.kind.startswith("gelu"):
        return _gelu(x, act.kind == "gelu_tanh")
    return _apply_act(x, act)


def block_compute(block: Block, x: Any, consts: dict[str, Any]) -> Any:
    """The TE definition of the fused block on NCHW input `x`; `consts` holds the weights in
    the kernel's layouts (see `_weights`). Returns the NCHW output tensor."""
    _, c_in, h, w = (int(s) for s in x.shape)
    k = int(block.dw.weight.shape[-1])
    p = k // 2
    e, c_out = int(block.fc1.weight.shape[0]), int(block.fc2.weight.shape[0])
    none = {"schedule_rule": "None"}
    zero = tirx.const(0.0, "float32")

    pad = te.compute(
        (h + 2 * p, w + 2 * p, c_in),
        lambda i, j, c: tirx.if_then_else(tirx.all(i >= p, i < h + p, j >= p, j < w + p),
                                          x[0, c, i - p, j - p], zero),
        name="pad", attrs=none)
    taps = [(a, b) for a in range(k) for b in range(k)]
    dw = te.compute(
        (h, w, c_in), lambda i, j, c: _dot([pad[i + a, j + b, c] for a, b in taps],
                                           [consts["wd"][a, b, c] for a, b in taps])
        + consts["bd"][c], name="dw", attrs=none)
    normed = dw if block.norm is None else _normalized(dw, block.norm.eps)
    r = te.reduce_axis((0, c_in), name="r")
    fc1 = te.compute((h, w, e), lambda i, j, f: te.sum(normed[i, j, r] * consts["w1"][r, f],
                                                       axis=r), name="fc1", attrs=none)
    hidden = te.compute((h, w, e), lambda i, j, f: _activate(fc1[i, j, f] + consts["b1"][f],
                                                             block.act), name="act", attrs=none)
    r2 = te.reduce_axis((0, e), name="r2")
    proj = te.compute((h, w, c_out),
                      lambda i, j, o: te.sum(hidden[i, j, r2] * consts["w2"][r2, o], axis=r2),
                      name="proj", attrs=none)

    def output(n: Any, o: Any, i: Any, j: Any) -> Any:
        v = proj[i, j, o] + consts["b2"][o]
        return v + x[n, o, i, j] if block.residual else v

    return te.compute((1, c_out, h, w), output, name="out", attrs={"schedule_rule": RULE})


def _normalized(dw: Any, eps: float) -> Any:
    """LayerNorm over the channel axis of `dw` (h, w, c) without its affine (folded into fc1):
    two-pass mean and variance, as PyTorch computes them."""
    h, w, c = (int(s) for s in dw.shape)
    none = {"schedule_rule": "None"}
    inv = tirx.const(1.0 / c, "float32")
    r = te.reduce_axis((0, c), name="rm")
    mean = te.compute((h, w), lambda i, j: te.sum(dw[i, j, r], axis=r), name="mean", attrs=none)
    rv = te.reduce_axis((0, c), name="rv")

    def centred(i: Any, j: Any, f: Any) -> Any:
        return dw[i, j, f] - mean[i, j] * inv

    var = te.compute((h, w), lambda i, j: te.sum(centred(i, j, rv) * centred(i, j, rv), axis=rv),
                     name="var", attrs=none)
    return te.compute(
        (h, w, c), lambda i, j, f: centred(i, j, f) * te.rsqrt(
            var[i, j] * inv + tirx.const(eps, "float32")), name="norm", attrs=none)


def _weights(block: Block) -> dict[str, torch.Tensor]:
    """The block's constants in the kernel's layouts, LayerNorm affine folded into fc1 and the
    layer scale into fc2 (weights are constants, free to re-lay out)."""
    c = int(block.dw.weight.shape[0])
    k = int(block.dw.weight.shape[-1])
    w1, b1 = block.fc1.weight.double(), block.fc1.bias.double()
    if block.norm is not None:
        b1 = b1 + w1 @ block.norm.bias.double()
        w1 = w1 * block.norm.weight.double()[None, :]
    w2, b2 = block.fc2.weight.double(), block.fc2.bias.double()
    if block.gamma is not None:
        w2, b2 = w2 * block.gamma.double()[:, None], b2 * block.gamma.double()
    return {
        "wd": block.dw.weight.reshape(c, k, k).permute(1, 2, 0).contiguous(),
        "bd": _bias(block.dw),
        "w1": w1.t().float().contiguous(), "b1": b1.float(),
        "w2": w2.t().float().contiguous(), "b2": b2.float(),
    }


def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph of one block -> an IRModule whose `main` makes one call_tir."""
    register_spaces(RULE, SPACES)
    dw_node = next(n for n in graph.graph.nodes if _is(n, CONV) and _conv_attrs(n)[3] > 1)
    block = _match(graph, dw_node)
    return emit_one_call(graph, _weights(block), lambda x, c: block_compute(block, x, c), name)


# ------------------------------------------------------------------------------ schedules
def _schedule_fc1(sch: Any, decide: Decide) -> None:
    """fc1 per tile: (columns x hidden-channel vectors) register block, reduction outside it;
    the bias + activation runs on each register block as soon as its reduction ends."""
    f0 = register_tile_gemm(sch, decide, sch.get_sblock("fc1"))
    act = sch.get_sblock("act")
    sch.reverse_compute_at(act, f0, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(act)[-1])


def schedule_cpu(sch: Any, decide: Decide) -> Any:
    """The depth-first CPU schedule: per output tile (parallel), every stage for the tile
    (the depthwise conv with its halo) into tile-sized buffers, then the project GEMM with a
    (columns x channels) register block vectorized over channels."""
    partials = [_vector_partial_sums(sch, decide, block)
                for block in (_block(sch, "mean"), _block(sch, "var")) if block is not None]
    tile = parallel_project_tiles(sch, decide)
    for name in ("act", "fc1", "norm", "var", "var_rf", "mean", "mean_rf", "dw", "pad"):
        block = _block(sch, name)  # depth-first: the tile's producers inside its loop
        if block is not None:
            sch.compute_at(block, tile, preserve_unit_loops=True)
    _schedule_fc1(sch, decide)
    for name in ("norm", "dw", "pad"):
        block = _block(sch, name)
        if block is not None:
            vectorize_channels(sch, decide, block)
    for partial in partials:  # loops (tile, lanes, rows, columns, vectors)
        _, lanes, rows, columns, vectors = sch.get_loops(partial)
        sch.reorder(rows, columns, vectors, lanes)
        sch.vectorize(lanes)
    return sch


def _vector_partial_sums(sch: Any, decide: Decide, block: Any) -> Any:
    """A sum over the channels (the innermost loop) as lane-wise partial sums over channel
    vectors (the rfactor block returned, to vectorize once placed), then one horizontal sum
    per pixel: a scalar sum of C channels is a chain of C dependent adds."""
    _, lanes = split_whole_lanes(sch, decide, sch.get_loops(block)[-1])
    return sch.rfactor(lanes, 2)  # partial sums [rows, columns, lanes]


def schedule_cuda(sch: Any, decide: Decide) -> Any:
    """The depth-first CUDA schedule: one thread block per output tile; every stage of the tile
    goes to shared memory (the zero padding inlined into the depthwise conv); reductions
    (LayerNorm statistics, both GEMMs) accumulate in registers."""
    threads = decide.choose(sch, CUDA_THREADS, [1.0 / len(CUDA_THREADS)] * len(CUDA_THREADS))
    tile, (oh1, ow1, o0, o1, r) = _tile_proj(sch, decide, {"oh": [2], "ow": [2], "o": [64]}, 8)
    t0, t1 = sch.split(sch.fuse(oh1, ow1, o0, o1), [None, threads])
    sch.reorder(t0, t1, r)
    sch.bind(tile, "blockIdx.x")
    sch.bind(t1, "threadIdx.x")
    sch.set_scope(sch.get_sblock("proj"), 0, "local")
    sch.reverse_compute_at(sch.get_sblock("out"), t1)
    sch.compute_inline(sch.get_sblock("pad"))
    for name in ("act", "fc1", "norm", "var", "mean", "dw"):
        block = _block(sch, name)
        if block is None:
            continue
        sch.compute_at(block, tile, preserve_unit_loops=True)
        sch.set_scope(block, 0, "shared")
        loops = sch.get_loops(block)[1:]
        spatial = loops[:-1] if name in REDUCTIONS else loops
        _, b1 = sch.split(sch.fuse(*spatial), [None, threads])
        sch.bind(b1, "threadIdx.x")
        if name in REDUCTIONS:  # accumulate in a register, store to shared memory once
            sch.reverse_compute_at(sch.cache_write(block, 0, "local"), b1)
    return sch


SCHEDULES: dict[str, Callable[[Any, Decide], Any]] = {"cpu": schedule_cpu, "cuda": schedule_cuda}
SPACES = sampled_spaces(SCHEDULES, Sampled)
schedule_fixed = fixed_schedule(SCHEDULES, lambda _kind, _cores: Fixed())
