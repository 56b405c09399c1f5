"""The lowering half of res_block: its blocked TE definition, lowering and schedule spaces.

`resblock.py` (TVM-free) finds the residual block; this module, imported only when a kernel is
lowered or scheduled, re-derives it from the kernel graph (`block_def`) and turns it into one
PrimFunc.

Kernel out: one PrimFunc in a blocked (NCHWc) layout with `lanes` channels per block (the
target's fp32 vector width; channel counts are zero-padded up to a multiple of it). Weights are
constants, so they are stored pre-blocked as [OCB, ICB, KH, KW, ici, oci]. Blocks:
`xpack` (input -> padded NCHWc), `conv<k>` / `act<k>` (conv, then bias + relu + zero border for
the next conv), `downsample`, and `output` (bias + residual + relu, back to NCHW).

Schedule space (`schedule_rule` "res_block" on the last conv): the output is split into row
tiles run in parallel; every earlier conv is computed per tile, with its halo rows, into a small
cache-resident buffer (compute_at), then the last conv, downsample and epilogue run tile by tile.
Every conv's inner kernel is register-blocked over (output-channel blocks x output columns) and
vectorized over the channels of a block; its accumulators live in a "local" buffer of exactly
that micro-tile, which LLVM promotes to registers (accumulating in the tile buffer itself made
every FMA load and store its accumulator: 2.3x slower). A k x k conv (k > 1) runs its input-
channel blocks outermost (per row for the last conv, per tile for an earlier one), adding each
block's window sums from the register tile into its buffer: one input block's weights then stay
in L1 across the columns (2-5% faster than all input blocks per register tile, which streams
every weight from L2 for each tile). Tunable: tile rows, output-channel and
column blocking per conv, and an unroll step. The cuda space binds each block's spatial loops
to threads.

Winograd (CPU targets): a basic block's 3x3 stride-1 convs are Winograd F(4x4, 3x3) convs
(Lavin & Gray 2016): the weights are transformed once at lowering, each 6x6 input tile is
transformed (B^T d B), multiplied per tile position by the transformed weights (36 GEMMs over
the input channels, register-tiled like a direct conv) and transformed back (A^T M A): 4x fewer
multiplies than the direct conv. The block's row tiles are then whole rows of output tiles, and
each conv's stages run one row of tiles at a time into small buffers; the first conv tiles the
zero-bordered buffer the second reads (`plan`), so a row tile of the second needs one more row
of tiles of the first, not a misaligned halo. Max error against PyTorch: ~5e-6 on a 64-channel
56x56 block (outputs of order 1). A bottleneck's 3x3 conv stays direct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx
from tvm import relax, s_tir, te, tirx
from tvm.topi.nn.winograd_util import _cook_toom_convolution, _interpolation_points

from hwaware.kernels.lowering_common import (
    Space,
    accumulate_in_registers,
    register_spaces,
    target_cores,
)
from hwaware.kernels.resblock import ADD_OPS, RULE, Conv, _match_add, _op, _tensor_meta
from hwaware.tvm.isa import current_vector_unit

MAX_REGISTER_TILE = 16  # output columns per micro-kernel
MAX_CHANNEL_BLOCKS = 4  # output-channel vectors per micro-kernel
SPARE_REGISTERS = 4  # beside a micro-kernel's accumulators: 28 of AVX-512's 32, 12 of AVX2's 16
UNROLL_STEPS = (0, 16, 64)
WINOGRAD_TILE = 4  # output tile m of Winograd F(m x m, 3 x 3) on CPU targets (0: direct only)


# ------------------------------------------------------------------------ compute
@dataclass(frozen=True)
class ConvLayer:
    """A conv in kernel terms: blocked weights [OCB, ICB, K, K, L, L], bias [OCB, L]; or, for a
    Winograd F(m x m, 3 x 3) conv (`winograd` = m), its weights transformed once, at lowering,
    into [A, A, OCB, ICB, L, L] (G g G^T, A = m + 2 the input tile)."""

    weight: np.ndarray
    bias: np.ndarray
    out_channels: int
    stride: int
    padding: int
    winograd: int = 0

    @property
    def kernel(self) -> int:
        return 3 if self.winograd else int(self.weight.shape[2])


@dataclass(frozen=True)
class BlockDef:
    """Everything the TE definition needs: shapes, blocked weights, vector lanes."""

    channels: int
    height: int
    width: int
    lanes: int
    main: tuple[ConvLayer, ...]
    downsample: ConvLayer | None


def _blocks(n: int, lanes: int) -> int:
    return -(-n // lanes)


def _get_attr(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value.detach()


def winograd_matrices(tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, G) of Winograd F(tile x tile, 3 x 3), float64: output = A^T [(G g G^T) * (B^T d
    B)] A for a (tile + 2)^2 input tile d and a 3 x 3 filter g (TVM's Cook-Toom points)."""
    a, b, g = _cook_toom_convolution(_interpolation_points(tile + 2), tile, 3)
    return (np.asarray(a, dtype="float64"), np.asarray(b, dtype="float64"),
            np.asarray(g, dtype="float64"))


def _layer(gm: fx.GraphModule, conv: Conv, lanes: int, winograd: int = 0) -> ConvLayer:
    """The conv's blocked weights and bias; Winograd-transformed weights when `winograd` (the
    output tile) is set and the conv is a 3 x 3 of stride 1."""
    w = _get_attr(gm, conv.weight).float().cpu().numpy()
    oc, ic, k, _ = w.shape
    ocb, icb = _blocks(oc, lanes), _blocks(ic, lanes)
    padded = np.zeros((ocb * lanes, icb * lanes, k, k), dtype="float32")
    padded[:oc, :ic] = w
    bias = np.zeros(ocb * lanes, dtype="float32")
    if conv.bias is not None:
        bias[:oc] = _get_attr(gm, conv.bias).float().cpu().numpy()
    winograd = winograd if (k, conv.stride) == (3, 1) else 0
    if winograd:
        g = winograd_matrices(winograd)[2]
        u = np.einsum("ak,oikl,bl->aboi", g, padded.astype("float64"), g)
        alpha = winograd + 2
        blocked = u.reshape(alpha, alpha, ocb, lanes, icb, lanes).transpose(0, 1, 2, 4, 5, 3)
    else:
        blocked = padded.reshape(ocb, lanes, icb, lanes, k, k).transpose(0, 2, 4, 5, 3, 1)
    return ConvLayer(np.ascontiguousarray(blocked, dtype="float32"), bias.reshape(ocb, lanes),
                     oc, conv.stride, conv.padding, winograd)


def block_def(graph: fx.GraphModule, lanes: int, winograd: int = 0) -> BlockDef:
    """Re-derive the block from a kernel graph that partition cut from a `find` group. With
    `winograd` (an output tile), a basic block's 3 x 3 stride-1 convs are Winograd convs."""
    adds = [n for n in graph.graph.nodes if _op(n) in ADD_OPS]
    if len(adds) != 1:
        raise ValueError(f"res_block kernel graph has {len(adds)} adds, expected 1")
    match = _match_add(adds[0])
    _, channels, height, width = (int(s) for s in _tensor_meta(match.source).shape)
    winograd = winograd if len(match.main) == 2 else 0
    return BlockDef(
        channels, height, width, lanes,
        tuple(_layer(graph, c, lanes, winograd) for c in match.main),
        _layer(graph, match.downsample, lanes) if match.downsample else None,
    )


def _out_size(size: int, layer: ConvLayer) -> int:
    return (size + 2 * layer.padding - layer.kernel) // layer.stride + 1


@dataclass(frozen=True)
class Geometry:
    """Where a conv reads its input, and how a Winograd conv tiles its output.

    `in_pad` zero rows (and columns) precede the input in the `in_size` buffer the conv reads.
    A Winograd conv's output is a grid of `tiles` (rows, columns) tiles of m x m; grid row g is
    conv output row g - `origin`: a conv whose consumer pads its output for the next conv tiles
    that padded buffer from its first row, so a row tile of the consumer is a row of tiles."""

    in_pad: int
    in_size: tuple[int, int]
    out_size: tuple[int, int]
    origin: int = 0
    tiles: tuple[int, int] = (0, 0)


def plan(block: BlockDef) -> list[Geometry]:
    """Each main-path conv's Geometry. From the last conv back: a Winograd conv's grid covers
    the buffer its consumer writes (the next conv's input), and reads one of (tiles x m + 2)
    rows and columns, its producer's zero border widened to match."""
    sizes = [(block.height, block.width)]
    for layer in block.main:
        sizes.append((_out_size(sizes[-1][0], layer), _out_size(sizes[-1][1], layer)))
    geometries: list[Geometry] = []
    for k in reversed(range(len(block.main))):
        layer, (rows, cols), out = block.main[k], sizes[k], sizes[k + 1]
        if not layer.winograd:
            pad = layer.padding
            geometries.insert(0, Geometry(pad, (rows + 2 * pad, cols + 2 * pad), out))
            continue
        m = layer.winograd
        origin, extent = (geometries[0].in_pad, geometries[0].in_size) if geometries else \
            (0, out)
        tiles = (-(-extent[0] // m), -(-extent[1] // m))
        pad = layer.padding + origin
        size = (max(rows + 2 * pad, tiles[0] * m + 2), max(cols + 2 * pad, tiles[1] * m + 2))
        geometries.insert(0, Geometry(pad, size, out, origin, tiles))
    return geometries


def block_te(block: BlockDef, x: Any, weights: list[Any], biases: list[Any]) -> Any:
    """The TE definition: x [1, C, H, W] -> relu(main(x) + residual(x)) [1, C', H', W']."""
    lanes, geometries = block.lanes, plan(block)
    pad = geometries[0].in_pad
    zero = tirx.const(0.0, "float32")
    xpack = te.compute(
        (_blocks(block.channels, lanes), *geometries[0].in_size, lanes),
        lambda cb, h, w, ci: tirx.if_then_else(
            tirx.all(h >= pad, h < block.height + pad, w >= pad, w < block.width + pad,
                     cb * lanes + ci < block.channels),
            x[0, cb * lanes + ci, h - pad, w - pad], zero),
        name="xpack", attrs={"schedule_rule": "None"})
    data = xpack
    for k, layer in enumerate(block.main):
        last = k == len(block.main) - 1
        conv = _conv_te(data, weights[k], layer, geometries[k], f"conv{k}", last)
        if not last:
            data = _act_te(conv, biases[k], geometries[k + 1], f"act{k}")
    residual = _residual_te(block, xpack, pad, weights, biases, conv.shape)
    outpack = te.compute(
        conv.shape, lambda cb, h, w, c: te.max(conv[cb, h, w, c] + residual[cb, h, w, c], zero),
        name="outpack", attrs={"schedule_rule": "None"})
    return te.compute(
        (1, block.main[-1].out_channels, *geometries[-1].out_size),
        lambda n, c, h, w: outpack[c // lanes, h, w, c % lanes],
        name="output", attrs={"schedule_rule": "None"})


def _conv_te(data: Any, weight: Any, layer: ConvLayer, geometry: Geometry, name: str,
             anchor: bool) -> Any:
    """A conv in blocked layout; the block's last conv carries the schedule rule. A k x k conv
    (k > 1) is two stages: `<name>_part`, the window sum over one input-channel block, and
    `<name>`, the sum of those over the input blocks; the schedule runs the input blocks
    outermost, so one block's weights (k*k*lanes*lanes per output block) stay in L1 across the
    columns of a row, and keeps each part in registers (it is never stored whole)."""
    if layer.winograd:
        return _winograd_te(data, weight, layer, geometry, name, anchor)
    height, width = geometry.out_size
    ocb, icb, k, _, lanes, _ = layer.weight.shape
    rcb = te.reduce_axis((0, icb), name="rcb")
    rh = te.reduce_axis((0, k), name="rh")
    rw = te.reduce_axis((0, k), name="rw")
    rci = te.reduce_axis((0, lanes), name="rci")
    s = layer.stride
    attrs = {"schedule_rule": RULE if anchor else "None"}
    if k == 1:
        return te.compute(
            (ocb, height, width, lanes),
            lambda cb, h, w, c: te.sum(
                data[rcb, h * s + rh, w * s + rw, rci] * weight[cb, rcb, rh, rw, rci, c],
                axis=[rcb, rh, rw, rci]),
            name=name, attrs=attrs)
    part = te.compute(
        (icb, ocb, height, width, lanes),
        lambda b, cb, h, w, c: te.sum(
            data[b, h * s + rh, w * s + rw, rci] * weight[cb, b, rh, rw, rci, c],
            axis=[rh, rw, rci]),
        name=f"{name}_part", attrs={"schedule_rule": "None"})
    return te.compute((ocb, height, width, lanes),
                      lambda cb, h, w, c: te.sum(part[rcb, cb, h, w, c], axis=[rcb]),
                      name=name, attrs=attrs)


def _const_matrix(matrix: np.ndarray, name: str) -> Any:
    """A constant matrix as a TE stage of nested selects; inlined into an unrolled loop, each
    use folds to its number (and a product with 0 to nothing)."""
    def value(i: Any, j: Any) -> Any:
        expr = tirx.const(0.0, "float32")
        for (r, c), v in np.ndenumerate(matrix):
            if v != 0:
                expr = tirx.Select(tirx.all(i == r, j == c), tirx.const(float(v), "float32"),
                                   expr)
        return expr

    return te.compute(matrix.shape, value, name=name, attrs={"schedule_rule": "None"})


def _winograd_te(data: Any, weight: Any, layer: ConvLayer, geometry: Geometry, name: str,
                 anchor: bool) -> Any:
    """A 3 x 3 stride-1 conv as Winograd F(m x m, 3 x 3) over the grid of `geometry`, five
    stages: `_bt` and `_v` transform each (m + 2)^2 input tile (B^T d B, rows then columns),
    `_m` multiplies the transformed tiles by the transformed weights (per tile position a GEMM
    over the input channels: the stage that carries the schedule rule of a last conv), `_at`
    and `_y` transform back (A^T M A). `<name>` is the view in conv output coordinates."""
    m, alpha, tiles = layer.winograd, layer.winograd + 2, geometry.tiles
    ocb, icb, lanes = (int(d) for d in layer.weight.shape[2:5])
    a_np, b_np, _ = winograd_matrices(m)
    at, bt = _const_matrix(a_np, f"{name}_a"), _const_matrix(b_np, f"{name}_b")
    r = [te.reduce_axis((0, alpha), name=f"r{i}") for i in range(4)]
    rcb, rci = te.reduce_axis((0, icb), name="rcb"), te.reduce_axis((0, lanes), name="rci")
    none = {"schedule_rule": "None"}
    rows = te.compute(
        (alpha, alpha, icb, *tiles, lanes),
        lambda a, j, cb, ty, tx, c: te.sum(bt[r[0], a] * data[cb, ty * m + r[0], tx * m + j, c],
                                           axis=[r[0]]),
        name=f"{name}_bt", attrs=none)
    v = te.compute(
        (alpha, alpha, icb, *tiles, lanes),
        lambda a, b, cb, ty, tx, c: te.sum(bt[r[1], b] * rows[a, r[1], cb, ty, tx, c],
                                           axis=[r[1]]),
        name=f"{name}_v", attrs=none)
    prod = te.compute(
        (alpha, alpha, ocb, *tiles, lanes),
        lambda a, b, cb, ty, tx, c: te.sum(
            v[a, b, rcb, ty, tx, rci] * weight[a, b, cb, rcb, rci, c], axis=[rcb, rci]),
        name=f"{name}_m", attrs={"schedule_rule": RULE if anchor else "None"})
    cols = te.compute(
        (ocb, *tiles, m, alpha, lanes),
        lambda cb, ty, tx, i, b, c: te.sum(at[r[2], i] * prod[r[2], b, cb, ty, tx, c],
                                           axis=[r[2]]),
        name=f"{name}_at", attrs=none)
    y = te.compute(
        (ocb, tiles[0] * m, tiles[1] * m, lanes),
        lambda cb, h, w, c: te.sum(at[r[3], w % m] * cols[cb, h // m, w // m, h % m, r[3], c],
                                   axis=[r[3]]),
        name=f"{name}_y", attrs=none)
    o = geometry.origin
    return te.compute((ocb, *geometry.out_size, lanes),
                      lambda cb, h, w, c: y[cb, h + o, w + o, c], name=name, attrs=none)


def _act_te(conv: Any, bias: Any, geometry: Geometry, name: str) -> Any:
    """bias + relu, in the buffer the next conv reads (`geometry` is the next conv's): a zero
    border of `in_pad` around the values, and zeros to its size."""
    zero, pad = tirx.const(0.0, "float32"), geometry.in_pad

    def value(cb: Any, h: Any, w: Any, c: Any) -> Any:
        return te.max(conv[cb, h - pad, w - pad, c] + bias[cb, c], zero)

    ocb, height, width, lanes = (int(s) for s in conv.shape)
    if pad == 0 and geometry.in_size == (height, width):
        return te.compute(conv.shape, value, name=name, attrs={"schedule_rule": "None"})
    return te.compute(
        (ocb, *geometry.in_size, lanes),
        lambda cb, h, w, c: tirx.if_then_else(
            tirx.all(h >= pad, h < height + pad, w >= pad, w < width + pad),
            value(cb, h, w, c), zero),
        name=name, attrs={"schedule_rule": "None"})


def _residual_te(block: BlockDef, xpack: Any, off: int, weights: list[Any], biases: list[Any],
                 shape: Any) -> Any:
    """The last conv's bias plus the block input or the downsample conv, blocked (`off`: the
    zero border of the packed input)."""
    lanes, layer = block.lanes, block.downsample
    bias = biases[len(block.main) - 1]
    if layer is None:  # the padded, blocked input the first conv reads: contiguous vectors
        return te.compute(
            shape, lambda cb, h, w, c: bias[cb, c] + xpack[cb, h + off, w + off, c],
            name="residual", attrs={"schedule_rule": "None"})
    weight, ds_bias = weights[-1], biases[-1]
    rcb = te.reduce_axis((0, int(layer.weight.shape[1])), name="rcb")
    rci = te.reduce_axis((0, lanes), name="rci")
    s = layer.stride
    ds = te.compute(
        shape, lambda cb, h, w, c: te.sum(
            xpack[rcb, h * s + off, w * s + off, rci] * weight[cb, rcb, 0, 0, rci, c],
            axis=[rcb, rci]),
        name="downsample", attrs={"schedule_rule": "None"})
    return te.compute(shape, lambda cb, h, w, c: ds[cb, h, w, c] + ds_bias[cb, c] + bias[cb, c],
                      name="residual", attrs={"schedule_rule": "None"})


def lanes_for(target: Any) -> int:
    """fp32 lanes of the target's vectors (the channel block of the blocked layout)."""
    if getattr(target, "kind", "cpu") == "cuda":
        return 16
    return max(4, int(getattr(target, "vector_bits", 128)) // 32)


def lower(graph: fx.GraphModule, inputs: list[Any], target: Any, name: str) -> Any:
    """The kernel graph of one block -> an IRModule whose `main` is one call_tir."""
    register_spaces(RULE, SPACES)
    winograd = 0 if getattr(target, "kind", "cpu") == "cuda" else WINOGRAD_TILE
    block = block_def(graph, lanes_for(target), winograd)
    layers = [*block.main, *([block.downsample] if block.downsample else [])]
    bb = relax.BlockBuilder()
    x = relax.Var("in_0", relax.TensorType(
        (1, block.channels, block.height, block.width), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            consts = [relax.const(a) for layer in layers for a in (layer.weight, layer.bias)]

            def te_fn(x_te: te.Tensor, *params: te.Tensor) -> te.Tensor:
                return block_te(block, x_te, list(params[0::2]), list(params[1::2]))

            out = bb.emit_te(te_fn, x, *consts, primfunc_name_hint=name)
            result = bb.emit_output(relax.Tuple([out]))
        bb.emit_func_output(result)
    return bb.get()


# ----------------------------------------------------------------------- schedule
Tiler = Callable[[Any, Any, int, int, str], list[Any]]  # (sch, loop, n, max_inner, kind)
Chooser = Callable[[Any, list[int]], Any]


def _sampled_tile(sch: Any, loop: Any, n: int, max_inner: int, _kind: str) -> list[Any]:
    return list(sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_inner))


def _sampled_choice(sch: Any, options: list[int]) -> Any:
    return sch.sample_categorical(options, [1.0 / len(options)] * len(options))


def _has_block(sch: Any, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 (TVM raises its own error types)
        return False
    return True


def _inner_convs(sch: Any) -> int:
    """How many convs precede the last one (1 for a basic block, 2 for a bottleneck)."""
    return sum(1 for k in range(2) if _has_block(sch, f"act{k}"))


def _micro_kernel(sch: Any, cb: Any, w: Any, c: Any) -> None:
    """The micro-kernel loops: (cb x w) accumulators of `c` lanes, unrolled and vectorized."""
    sch.unroll(cb)
    sch.unroll(w)
    sch.vectorize(c)


def _register_tile(sch: Any, block: Any, cb: Any, w: Any, c: Any, reduction: Any) -> None:
    """The micro-kernel of a block whose own buffer is the local register tile, its zero-init
    hoisted before the reduction loops."""
    _micro_kernel(sch, cb, w, c)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])


def _split_register_tile(sch: Any, cb: Any, w: Any, tile: Tiler) -> tuple[list[Any], Any]:
    """(cb_o, cb_i, w_o, w_i): channel blocks, then columns, of a micro-kernel of as many
    accumulators as the target's vector registers hold (`isa.current_vector_unit`, less
    SPARE_REGISTERS; the column bound follows the channel blocks chosen, so no sample spills
    its accumulators); and the sampled column factors."""
    cb_o, cb_i = sch.split(cb, tile(sch, cb, 2, MAX_CHANNEL_BLOCKS, "channels"))
    accumulators = current_vector_unit().registers - SPARE_REGISTERS
    columns = max(1, min(MAX_REGISTER_TILE, accumulators // int(sch.get(cb_i).extent)))
    column_factors = tile(sch, w, 2, columns, "columns")
    w_o, w_i = sch.split(w, column_factors)
    return [cb_o, cb_i, w_o, w_i], column_factors


def _tile_inner_conv(sch: Any, block: Any, tile: Tiler) -> None:
    """An earlier conv computed per row tile: split its channel blocks and columns itself."""
    if _has_block(sch, f"{sch.get(block).name_hint}_part"):
        cb, h, w, c, rcb = sch.get_loops(block)[-5:]
        (cb_o, cb_i, w_o, w_i), _ = _split_register_tile(sch, cb, w, tile)
        sch.reorder(cb_o, h, rcb, w_o, cb_i, w_i, c)
        _accumulate_input_blocks(sch, block, w_o, c, rcb)
        return
    cb, h, w, c, rcb, rh, rw, rci = sch.get_loops(block)[-8:]
    (cb_o, cb_i, w_o, w_i), _ = _split_register_tile(sch, cb, w, tile)
    sch.reorder(cb_o, h, w_o, rcb, rh, rw, rci, cb_i, w_i, c)
    _micro_kernel(sch, cb_i, w_i, c)
    accumulate_in_registers(sch, block, w_o, rcb)


def _accumulate_input_blocks(sch: Any, conv: Any, tile_loop: Any, c: Any, rcb: Any) -> None:
    """A k x k conv (see `_conv_te`) with its input blocks `rcb` outside the register tiles
    (`tile_loop`): its buffer, zeroed before `rcb`, adds up per input block the window sums its
    `_part` block computes into a local register tile."""
    part = sch.get_sblock(f"{sch.get(conv).name_hint}_part")
    sch.vectorize(c)
    init = sch.decompose_reduction(conv, rcb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.compute_at(part, tile_loop, preserve_unit_loops=True)
    sch.set_scope(part, 0, "local")
    p_cb, _, p_w, p_c, rh, rw, rci = sch.get_loops(part)[-7:]
    sch.reorder(rh, rw, rci, p_cb, p_w, p_c)
    _register_tile(sch, part, p_cb, p_w, p_c, rh)


def schedule_cpu(sch: Any, _anchor: Any, tile: Tiler = _sampled_tile,
                 choose: Chooser = _sampled_choice) -> Any:
    """The depth-first schedule space of the fused block on CPU (see the module docstring):
    the blocked output drives the tiling and every producer is computed inside its tiles."""
    last = _inner_convs(sch)
    winograd = _winograd_tile(sch, last)
    out = sch.get_sblock("outpack")
    cb, h, w, c = sch.get_loops(out)
    if winograd:  # row tiles of whole Winograd tiles, each computed into its own small buffers
        h_q, h_m = sch.split(h, [None, winograd])
        h_o, h_i = sch.split(h_q, tile(sch, h_q, 2, max(1, int(sch.get(h_q).extent) // 2),
                                       "rows"))
        sch.reorder(h_o, h_i, cb, h_m, w, c)
        tile_loop = h_i
    else:  # row tiles of at least two, so that the parallel loop has work for two cores
        h_o, h_i = sch.split(h, tile(sch, h, 2, max(1, int(sch.get(h).extent) // 2), "rows"))
        (cb_o, cb_i, w_o, w_i), column_factors = _split_register_tile(sch, cb, w, tile)
        sch.reorder(h_o, cb_o, h_i, w_o, cb_i, w_i, c)
        tile_loop = w_o
    sch.parallel(h_o)
    sch.annotate(h_o, "pragma_auto_unroll_max_step", choose(sch, list(UNROLL_STEPS)))
    sch.annotate(h_o, "pragma_unroll_explicit", 1)
    sch.vectorize(c)
    sch.reverse_compute_at(sch.get_sblock("output"), tile_loop, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(sch.get_sblock("output"))[-1])  # NCHW rows, not scalars
    sch.compute_inline(sch.get_sblock("residual"))
    anchor = sch.get_sblock(f"conv{last}")
    if winograd:
        _schedule_winograd(sch, last, h_i, tile)
    elif _has_block(sch, f"conv{last}_part"):  # a k x k conv: a row at a time, input blocks outer
        sch.compute_at(anchor, h_i, preserve_unit_loops=True)
        a_cb, _, a_w, a_c, rcb = sch.get_loops(anchor)[-5:]
        a_wo, a_wi = sch.split(a_w, column_factors)
        sch.reorder(rcb, a_wo, a_cb, a_wi, a_c)
        _accumulate_input_blocks(sch, anchor, a_wo, a_c, rcb)
    else:
        sch.compute_at(anchor, w_o, preserve_unit_loops=True)
        sch.set_scope(anchor, 0, "local")
        a_cb, _, a_w, a_c, rcb, rh, rw, rci = sch.get_loops(anchor)[-8:]
        sch.reorder(rcb, rh, rw, rci, a_cb, a_w, a_c)
        _register_tile(sch, anchor, a_cb, a_w, a_c, rcb)
    if _has_block(sch, "downsample"):
        ds = sch.get_sblock("downsample")
        sch.compute_at(ds, tile_loop, preserve_unit_loops=True)
        d_cb, _, d_w, d_c, rcb, rci = sch.get_loops(ds)[-6:]
        if winograd:  # a whole row tile: register tiles of its own
            (dcb_o, dcb_i, dw_o, dw_i), _ = _split_register_tile(sch, d_cb, d_w, tile)
            sch.reorder(dcb_o, dw_o, rcb, rci, dcb_i, dw_i, d_c)
            _micro_kernel(sch, dcb_i, dw_i, d_c)
            accumulate_in_registers(sch, ds, dw_o, rcb)
        else:
            sch.set_scope(ds, 0, "local")
            sch.reorder(rcb, rci, d_cb, d_w, d_c)
            _register_tile(sch, ds, d_cb, d_w, d_c, rcb)
    for k in reversed(range(last)):
        _tile_inner_layer(sch, k, h_o, tile)
    xpack = sch.get_sblock("xpack")
    sch.compute_at(xpack, h_o, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(xpack)[-1])  # the NCHW -> NCHWc pack, a vector per pixel
    # MetaSchedule's own parallel/vectorize rule would annotate the root next, and its
    # postprocessor then rejects loops this rule already made parallel: opt out
    sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
    return sch


def _winograd_tile(sch: Any, k: int) -> int:
    """The output tile m of conv `k` if it is a Winograd conv, else 0."""
    if not _has_block(sch, f"conv{k}_at"):
        return 0
    return int(sch.get(sch.get_loops(sch.get_sblock(f"conv{k}_at"))[3]).extent)


def _tile_inner_layer(sch: Any, k: int, h_o: Any, tile: Tiler) -> None:
    """An earlier conv and its activation, computed per row tile `h_o` (with halo rows)."""
    act = sch.get_sblock(f"act{k}")
    sch.compute_at(act, h_o, preserve_unit_loops=True)
    winograd = _winograd_tile(sch, k)
    if not winograd:
        sch.vectorize(sch.get_loops(act)[-1])
        conv = sch.get_sblock(f"conv{k}")
        sch.compute_at(conv, h_o, preserve_unit_loops=True)
        _tile_inner_conv(sch, conv, tile)
        return
    cb, h, w, c = sch.get_loops(act)[-4:]
    h_q, h_m = sch.split(h, [None, winograd])
    sch.reorder(h_q, cb, h_m, w, c)
    sch.vectorize(c)
    _schedule_winograd(sch, k, h_q, tile)


def _schedule_winograd(sch: Any, k: int, loop: Any, tile: Tiler) -> None:
    """Winograd conv `name` (see `_winograd_te`) computed at `loop`, the loop over its
    consumer's rows of tiles: the transformed input tiles, their products with the weights
    (register-tiled over output-channel blocks x tiles of a row, like a direct conv's
    micro-kernel over columns) and the inverse transform, each in a buffer of that row."""
    name, m = f"conv{k}", _winograd_tile(sch, k)
    for matrix in ("a", "b"):
        sch.compute_inline(sch.get_sblock(f"{name}_{matrix}"))
    sch.compute_inline(sch.get_sblock(name))
    y = sch.get_sblock(f"{name}_y")
    sch.compute_at(y, loop, preserve_unit_loops=True)
    cb, h, w, c, rb = sch.get_loops(y)[-5:]
    h_o, h_i = sch.split(h, [None, m])
    w_o, w_i = sch.split(w, [None, m])
    sch.reorder(h_o, w_o, cb, h_i, w_i, rb, c)
    _unrolled_sums(sch, y, [h_i, w_i, rb], c)
    cols = sch.get_sblock(f"{name}_at")
    sch.compute_at(cols, cb, preserve_unit_loops=True)
    sch.set_scope(cols, 0, "local")
    i, b, c2, ra = sch.get_loops(cols)[-4:]
    sch.reorder(i, b, ra, c2)
    _unrolled_sums(sch, cols, [i, b, ra], c2)
    prod = sch.get_sblock(f"{name}_m")
    sch.compute_at(prod, loop, preserve_unit_loops=True)
    p_cb, _, p_tx, p_c, rcb, rci = sch.get_loops(prod)[-6:]
    (cb_o, cb_i, tx_o, tx_i), _ = _split_register_tile(sch, p_cb, p_tx, tile)
    sch.reorder(cb_o, tx_o, rcb, rci, cb_i, tx_i, p_c)
    _micro_kernel(sch, cb_i, tx_i, p_c)
    accumulate_in_registers(sch, prod, tx_o, rcb)
    v = sch.get_sblock(f"{name}_v")
    sch.compute_at(v, loop, preserve_unit_loops=True)
    a, b2, v_cb, v_ty, v_tx, v_c, rj = sch.get_loops(v)[-7:]
    sch.reorder(v_cb, v_ty, v_tx, a, b2, rj, v_c)
    _unrolled_sums(sch, v, [b2, rj], v_c)
    rows = sch.get_sblock(f"{name}_bt")
    sch.compute_at(rows, a, preserve_unit_loops=True)
    sch.set_scope(rows, 0, "local")
    j, r_c, ri = (sch.get_loops(rows)[k] for k in (-6, -2, -1))
    sch.reorder(j, ri, r_c)
    _unrolled_sums(sch, rows, [j, ri], r_c)


def _unrolled_sums(sch: Any, block: Any, loops: list[Any], lanes: Any) -> None:
    """A transform stage: its `loops` (the last a reduction) unrolled, so that every
    coefficient folds to a number, over vectors of `lanes`; its zero-init before the
    reduction."""
    for loop in loops:
        sch.unroll(loop)
    sch.vectorize(lanes)
    init = sch.decompose_reduction(block, loops[-1])
    sch.vectorize(sch.get_loops(init)[-1])


def schedule_cuda(sch: Any, _anchor: Any, choose: Chooser = _sampled_choice) -> Any:
    """Every block on its own: spatial loops fused and bound to blocks x threads (sampled)."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    threads = choose(sch, [64, 128, 256])
    for block in blocks:
        loops = sch.get_loops(block)
        spatial = [lp for lp, kind in zip(loops, _iter_kinds(sch, block), strict=False)
                   if kind == 0]
        fused = sch.fuse(*spatial)
        bx, tx = sch.split(fused, [None, threads])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch


def _iter_kinds(sch: Any, block: Any) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _fixed_tile(cores: int) -> Tiler:
    """Decisions for the untuned default, as sampling instructions with these decisions (so the
    default is a point of the tuned space): row tiles, one per core where the rows divide
    evenly; 2 channel blocks x up to 8 columns of accumulators."""

    def tile(sch: Any, loop: Any, n: int, max_inner: int, kind: str) -> list[Any]:
        extent = int(sch.get(loop).extent)
        if kind == "rows":
            tiles = next((t for t in range(cores, extent + 1)
                          if extent % t == 0 and extent // t <= max_inner), extent)
            decision = [tiles, extent // tiles]
        else:
            limit = min(max_inner, 2 if kind == "channels" else 8)
            inner = max(d for d in range(1, min(limit, extent) + 1) if extent % d == 0)
            decision = [extent // inner, inner]
        return list(sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_inner,
                                            decision=decision))

    return tile


def _fixed_choice(value: int) -> Chooser:
    """`value` out of the options, as a sampling instruction with that decision."""

    def choose(sch: Any, options: list[int]) -> Any:
        return sch.sample_categorical(options, [1.0 / len(options)] * len(options),
                                      decision=options.index(value))

    return choose


def schedule_fixed(func: Any, target: Any) -> Any:
    """A res_block PrimFunc scheduled with fixed decisions (the Schedule); `target` is a TVM
    target."""
    sch = s_tir.Schedule(func)
    anchor = sch.get_sblock(f"conv{_inner_convs(sch)}")
    if target.kind.name == "cuda":
        schedule_cuda(sch, anchor, _fixed_choice(128))
    else:
        with target:  # its vector registers bound the micro-kernels
            schedule_cpu(sch, anchor, _fixed_tile(target_cores(target)),
                         _fixed_choice(UNROLL_STEPS[1]))
    return sch



def _already_scheduled(sch: Any, block: Any) -> bool:
    """MetaSchedule calls the rule again for the init/update blocks that decomposing the
    anchor's reduction leaves with its annotation: the first call scheduled everything.
    (Checked on the IR, not with schedule instructions, which would enter the trace.)"""
    if str(sch.get(block).name_hint).endswith(("_init", "_update")):
        return True
    sref = sch.get_sref(block).parent
    while sref is not None:  # cuda: its loops are bound already
        if getattr(sref.stmt, "thread_binding", None) is not None:
            return True
        sref = sref.parent
    return False


def _space(schedule: Callable[[Any, Any], Any]) -> Space:
    """The space of `schedule` (sampled decisions) for the anchor block; a block it has
    scheduled already (see `_already_scheduled`) is left as it is."""

    def space(sch: Any, block: Any) -> list[Any]:
        return [sch if _already_scheduled(sch, block) else schedule(sch, block)]

    return space


SPACES = {"cpu": _space(schedule_cpu), "cuda": _space(schedule_cuda)}
