"""convnext_block: a ConvNeXt (or ConvFirst) block as ONE depth-first TIR kernel.

Pattern in (rewritten ATen graph, fp32, batch 1, input NCHW), "depthwise first, then a
pointwise MLP":
    kxk depthwise conv (k 3, 5 or 7, stride 1, padding k//2, bias)
    -> either channels-last: permute(0, 2, 3, 1) -> [layer_norm over channels] -> linear C->E
       or NCHW: 1x1 conv C->E                      (ConvFirst, BatchNorm folded into the convs)
    -> act (gelu, exact erf or tanh approximation; or relu, relu6, hardswish, silu)
    -> linear / 1x1 conv E->C' -> [* gamma (layer scale)] -> [permute(0, 3, 1, 2)]
    -> [+ block input (residual)]
The ConvNeXt block is the channels-last form with LayerNorm, GELU and gamma. The ConvFirst
block of Lavin, "On the Efficiency of Convolutional Neural Networks" (2024) puts the depthwise
conv first too, with 1x1 convs and BatchNorm (folded before this family sees it): the NCHW
form. Anything else (LayerNorm over other dims, other kernels or strides, a node used outside
the block, batch > 1, non-fp32, ...) is skipped with a debug log line (unfused path).

Kernel out: one PrimFunc, intermediates channel-last (pixel, channel) so every stage vectorizes
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

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hwaware.kernels import KernelFamily, accumulate_in_registers, fixed_schedule, register_spaces
from hwaware.kernels.conv import (
    ACTIVATIONS,
    CONV,
    CUDA_THREADS,
    Act,
    Conv,
    Decide,
    Fixed,
    NoMatch,
    Sampled,
    _act,
    _apply_act,
    _bias,
    _block,
    _constant,
    _conv,
    _conv_attrs,
    _dot,
    _only_user,
    _residual,
    _tile_proj,
    _val,
    emit_one_call,
    parallel_project_tiles,
    register_hints,
    split_lanes,
    vectorize_channels,
)

log = logging.getLogger(__name__)

RULE = "hw_convnext"
DW_KERNELS = (3, 5, 7)
PERMUTE = torch.ops.aten.permute.default
LAYER_NORM = torch.ops.aten.layer_norm.default
LINEAR = torch.ops.aten.linear.default
GELU = torch.ops.aten.gelu.default
MUL = torch.ops.aten.mul.Tensor
TO_CHANNELS_LAST, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
REDUCTIONS = ("mean", "var", "fc1")  # blocks whose innermost loop is a reduction


# ------------------------------------------------------------------------------- pattern
@dataclass
class Dense:
    """A pointwise layer (linear or 1x1 conv): weight [out, in], bias [out]."""

    node: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class Norm:
    """A LayerNorm over the channels: weight, bias, eps."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


@dataclass
class Block:
    """One matched depthwise-first block."""

    nodes: list[fx.Node]
    dw: Conv
    norm: Norm | None
    fc1: Dense
    act: Act
    fc2: Dense
    gamma: torch.Tensor | None
    residual: bool


def _ints(value: Any) -> list[int]:
    return [int(v) for v in value]


def _is(node: Any, target: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _next(node: fx.Node, what: str) -> fx.Node:
    """The only user of `node`, else NoMatch."""
    user = _only_user(node)
    if user is None:
        raise NoMatch(f"{node.name} has {len(node.users)} users where {what} should follow")
    return user


def _dense(gm: fx.GraphModule, node: fx.Node, channels_last: bool, c_in: int) -> Dense:
    """`node` as linear (channels-last) or 1x1 conv (NCHW) over `c_in` channels, else NoMatch."""
    if channels_last:
        if not _is(node, LINEAR):
            raise NoMatch(f"{node.name}: {node.target} where a linear should be")
        weight = _constant(gm, node.args[1])
        bias = _constant(gm, node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
        assert weight is not None
        if weight.dtype != torch.float32 or _val(node).dtype != torch.float32:
            raise NoMatch(f"{node.name}: dtype {weight.dtype} (only float32)")
    else:
        conv = _conv(gm, node, "pointwise")
        weight, bias = conv.weight.flatten(1), conv.bias
    if weight.dim() != 2 or weight.shape[1] != c_in:
        raise NoMatch(f"{node.name}: weight {tuple(weight.shape)} for {c_in} channels")
    return Dense(node, weight, bias if bias is not None else torch.zeros(weight.shape[0]))


def _layer_norm(gm: fx.GraphModule, node: fx.Node, channels: int) -> Norm:
    args: list[Any] = list(node.args) + [None] * (5 - len(node.args))
    shape = _ints(args[1])
    if shape != [channels]:
        raise NoMatch(f"{node.name}: LayerNorm over {shape}, not the {channels} channels")
    weight = _constant(gm, args[2] if args[2] is not None else node.kwargs.get("weight"))
    bias = _constant(gm, args[3] if args[3] is not None else node.kwargs.get("bias"))
    eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
    assert isinstance(eps, (int, float))
    return Norm(weight if weight is not None else torch.ones(channels),
                bias if bias is not None else torch.zeros(channels), float(eps))


def _activation(node: fx.Node) -> Act:
    if _is(node, GELU):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else
                                      "none")
        return Act("gelu_tanh" if approximate == "tanh" else "gelu")
    act = _act(node) if node.target in ACTIVATIONS else None
    if act is not None:
        return act
    raise NoMatch(f"{node.name}: {node.target} is not a supported activation")


def _gamma(gm: fx.GraphModule, mul: fx.Node, value: fx.Node, channels_last: bool,
           channels: int) -> torch.Tensor | None:
    """The per-channel layer scale of `mul(gamma, value)`, or None if `mul` is not one."""
    if not _is(mul, MUL) or len(mul.args) != 2 or value not in mul.args:
        return None
    other = mul.args[1 - mul.args.index(value)]
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None
    gamma = _constant(gm, other)
    assert gamma is not None
    dims = list(gamma.shape)
    want = [channels] if channels_last else [channels, 1, 1]
    while len(dims) > len(want) and dims[0] == 1:
        dims.pop(0)
    if dims != want or gamma.dtype != torch.float32:
        raise NoMatch(f"{mul.name}: scale of shape {tuple(gamma.shape)} is not per channel")
    return gamma.reshape(channels)


def _match(gm: fx.GraphModule, dw_node: fx.Node) -> Block:
    """The block starting at depthwise conv `dw_node`, or NoMatch naming why not."""
    dw = _conv(gm, dw_node, "depthwise", kernels=DW_KERNELS, strides=(1,))
    channels = int(dw.weight.shape[0])
    if _val(dw_node).shape[0] != 1:
        raise NoMatch(f"batch {_val(dw_node).shape[0]} (only batch 1)")
    nodes = [dw_node]
    node = _next(dw_node, "the MLP")
    channels_last = _is(node, PERMUTE) and _ints(node.args[1]) == TO_CHANNELS_LAST
    norm = None
    if channels_last:
        nodes.append(node)
        node = _next(node, "a LayerNorm or linear")
        if _is(node, LAYER_NORM):
            norm = _layer_norm(gm, node, channels)
            nodes.append(node)
            node = _next(node, "a linear")
    fc1 = _dense(gm, node, channels_last, channels)
    act_node = _next(fc1.node, "an activation")
    act = _activation(act_node)
    fc2 = _dense(gm, _next(act_node, "the second pointwise layer"), channels_last,
                 int(fc1.weight.shape[0]))
    nodes += [fc1.node, act_node, fc2.node]
    last = fc2.node
    user = _only_user(last)
    gamma = _gamma(gm, user, last, channels_last, int(fc2.weight.shape[0])) if user else None
    if gamma is not None and user is not None:
        nodes.append(user)
        last = user
    if channels_last:
        back = _next(last, "permute(0, 3, 1, 2)")
        if not _is(back, PERMUTE) or _ints(back.args[1]) != TO_NCHW:
            raise NoMatch(f"{back.name}: channels-last MLP not permuted back to NCHW")
        nodes.append(back)
        last = back
    add = _residual(last, dw_node.args[0])
    if add is not None:
        nodes.append(add)
    return Block(nodes, dw, norm, fc1, act, fc2, gamma, add is not None)


def find(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Every depthwise-first MLP block of `gm` this family can lower, as node groups."""
    groups: list[list[fx.Node]] = []
    for node in gm.graph.nodes:
        if not _is(node, CONV) or not isinstance(node.args[1], fx.Node) or \
                _conv_attrs(node)[3] == 1:
            continue  # not grouped: not the start of a block
        try:
            groups.append(_match(gm, node).nodes)
        except NoMatch as why:
            log.debug("convnext_block: %s not fused: %s", node.name, why)
    return groups


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
    from tvm import te, tirx

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
    from tvm import tirx

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
    from tvm import te, tirx

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
    from tvm import te, tirx

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
    register_schedule_rules()
    dw_node = next(n for n in graph.graph.nodes if _is(n, CONV) and _conv_attrs(n)[3] > 1)
    block = _match(graph, dw_node)
    return emit_one_call(graph, _weights(block), lambda x, c: block_compute(block, x, c), name)


# ------------------------------------------------------------------------------ schedules
def _schedule_fc1(sch: Any, decide: Decide) -> None:
    """fc1 per tile: (columns x hidden-channel vectors) register block, reduction outside it;
    the bias + activation runs on each register block as soon as its reduction ends."""
    fc1 = sch.get_sblock("fc1")
    _, i, j, f, r = sch.get_loops(fc1)
    channels, columns = register_hints(int(sch.get(f).extent))
    j0, j1 = sch.split(j, decide.tile(sch, j, 2, 8, [columns]))
    f0, f1 = sch.split(f, decide.tile(sch, f, 2, 64, [channels]))
    vectors, lanes = split_lanes(sch, decide, f1)
    sch.reorder(i, j0, f0, r, j1, vectors, lanes)
    sch.vectorize(lanes)
    sch.unroll(vectors)
    sch.unroll(j1)
    accumulate_in_registers(sch, fc1, f0, r)
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
    _, lanes = split_lanes(sch, decide, sch.get_loops(block)[-1])
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


def is_convnext_block(func: Any) -> bool:
    """Whether a PrimFunc is an (unscheduled or scheduled) convnext_block kernel."""
    from hwaware.tvm import ir

    return RULE in ir.schedule_rules(func)


schedule_fixed = fixed_schedule(SCHEDULES, lambda _kind, _cores: Fixed())


def register_schedule_rules() -> None:
    """Register the sampled schedule spaces MetaSchedule's ApplyCustomRule finds by the blocks'
    `schedule_rule` annotation (idempotent)."""
    register_spaces(RULE, SCHEDULES, Sampled)


FAMILY = KernelFamily(name="convnext_block", rule=RULE, find=find, lower=lower,
                      schedule_fixed=schedule_fixed,
                      register=register_schedule_rules)
