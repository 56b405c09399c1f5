"""The untuned CPU schedule of a standalone convolution kernel (a conv2d and its epilogue).

Goes in: a fused TIR kernel whose one contraction is Relax's legalized NCHW convolution,
C[n, f, y, x] = sum_(c, ry, rx) P[n, g(f) + c, y * s + ry, x * s + rx] * W[f, c, ry, rx] (P the
zero-padded input or the input itself, g(f) the first input channel of f's group), followed by
element-wise epilogue blocks (bias, activation). Comes out: a schedule, or None where the kernel
is not of that form (the next rule, or PyTorch, takes it).

The convolutions this is for are the ones no fused block family takes: stems, downsampling
convs, grouped convs (RegNet, ResNeXt), patch embeddings, the convs of small models. Without it
they stayed in PyTorch, whose oneDNN call costs 10-30 us even for a conv of 0.1 MFLOP, two to
five times the whole work: on a tiny RegNet four such convs were two thirds of the model's time.

The schedule is a direct convolution with a register tile of `rows` output channels (of one
group) x one vector of output pixels (the map flattened, `pixels` lanes): for each (input
channel, ry, rx) step it loads the tile's input pixels once and broadcasts one weight per output
channel, so every loaded value feeds `rows` FMAs and the accumulators stay in registers for the
whole reduction. The padded input is written once, before the tiles. Kernels of fewer than
`PARALLEL_MACS` multiply-adds stay on the calling thread (waking the pool costs more than they
do); larger ones run their tiles in parallel. Larger convs (over `MAX_MACS`) are declined:
there oneDNN's blocked kernels win. The build times the result against PyTorch and keeps the
faster, as for every kernel.
"""

from __future__ import annotations

import logging
from typing import Any

from hwaware.tvm.dense import (
    PARALLEL_MACS,
    REDUCE,
    SPATIAL,
    epilogue_names,
    epilogue_per_tile,
    extent_of,
    macs,
    one_contraction,
)
from hwaware.tvm.isa import VectorUnit

log = logging.getLogger(__name__)

MAX_ROWS = 8  # output channels per register tile
MAX_VECTORS = 3  # vectors of pixels per register tile
# Above this the rule declines: on 2 Zen 5 cores it beat PyTorch 2-10x up to 0.6 M multiply-adds
# and by 0-2.3x from 1 to 10 M (losing on stride-2 convs, 7-pixel rows), and lost 1.6-2x at
# 14-115 M, where oneDNN's blocked kernels reach 170-225 GMAC/s to its 85-110.
MAX_MACS = 4 << 20


def find_conv(func: Any) -> tuple[Any, Any] | None:
    """(schedule, block) of the kernel's one contraction if it is an NCHW conv2d: spatial
    iters (n, f, y, x), reduction iters (c, ry, rx), reading a 4-D input and a 4-D weight
    W[f, c, ry, rx]."""
    found = one_contraction(func)
    if found is None:
        return None
    sch, block, reads = found
    iters = list(sch.get(block).iter_vars)
    if [int(v.iter_type) for v in iters] != [SPATIAL] * 4 + [REDUCE] * 3:
        return None
    f, c, ry, rx = (iters[i].var for i in (1, 4, 5, 6))
    weights = [r for r in reads if _indexes_are(r, [f, c, ry, rx])]
    if len(reads) != 2 or len(weights) != 1 or any(len(r.region) != 4 for r in reads):
        return None
    return sch, block


def schedule_direct_conv(func: Any, unit: VectorUnit) -> Any:
    """The direct-convolution schedule of a conv2d kernel for vector `unit`, or None (see the
    module docstring)."""
    planned = _plan(func, unit)
    if planned is None:
        return None
    sch, block, (rows, vectors, pixels) = planned
    from hwaware.kernels.lowering_common import accumulate_in_registers

    epilogue = epilogue_names(sch, block)
    _inline_producers_but_padding(sch, block)
    n, f, y, x, c, ry, rx = sch.get_loops(block)
    f0, f1 = sch.split(f, [None, rows])
    if pixels <= int(sch.get(x).extent):  # vectors along a row
        x0, x1, x2 = sch.split(x, [None, vectors, pixels])
        sch.reorder(n, f0, y, x0, c, ry, rx, f1, x1, x2)
        tile = sch.fuse(n, f0, y, x0)
    else:  # a vector of whole rows
        x0, x1, x2 = sch.split(sch.fuse(y, x), [None, vectors, pixels])
        sch.reorder(n, f0, x0, c, ry, rx, f1, x1, x2)
        tile = sch.fuse(n, f0, x0)
    if macs(sch, block) >= PARALLEL_MACS:
        sch.parallel(tile)
    sch.unroll(f1)
    sch.unroll(x1)
    sch.vectorize(x2)
    accumulate_in_registers(sch, block, tile, c)
    epilogue_per_tile(sch, block, epilogue, tile)
    return sch


def takes(func: Any, unit: VectorUnit) -> bool:
    """Whether `schedule_direct_conv` schedules this kernel (the match alone)."""
    return _plan(func, unit) is not None


def _plan(func: Any, unit: VectorUnit) -> tuple[Any, Any, tuple[int, int, int]] | None:
    found = find_conv(func)
    if found is None:
        return None
    sch, block = found
    if macs(sch, block) > MAX_MACS:
        return None
    _, f, y, x, *_ = sch.get_loops(block)
    groups = _groups(sch, block)
    per_group = extent_of(sch, f) // groups  # type: ignore[operator]
    rows = max(r for r in range(1, MAX_ROWS + 1) if per_group % r == 0)
    height, width = extent_of(sch, y), extent_of(sch, x)
    pixels = vector_of_pixels(height, width, unit.lanes)  # type: ignore[arg-type]
    along_row = width // pixels if pixels <= width else height * width // pixels  # type: ignore
    vectors = max(v for v in range(1, MAX_VECTORS + 1)
                  if along_row % v == 0 and rows * v <= unit.accumulators)
    return (sch, block, (rows, vectors, pixels)) if pixels >= min(4, unit.lanes) else None


def vector_of_pixels(height: int, width: int, lanes: int) -> int:
    """How many output pixels (of the flattened map) one vector holds: at most `lanes`, dividing
    the map, and either part of one row or whole rows (TVM's vectorizer computes a vector that
    crosses a row boundary part-way wrong)."""
    return max(v for v in range(1, lanes + 1) if height * width % v == 0 and
               (width % v == 0 or v % width == 0))


def _groups(sch: Any, block: Any) -> int:
    """How many groups the conv has: the output channels over how many share one input slice
    (1 unless the input's channel index depends on f)."""
    iters = list(sch.get(block).iter_vars)
    f_extent, c_extent = int(iters[1].dom.extent), int(iters[4].dom.extent)
    written = sch.get(block).writes[0].source
    data = next(r for r in sch.get(block).reads if not r.source.same_as(written)
                and not _indexes_are(r, [iters[i].var for i in (1, 4, 5, 6)]))
    channels = int(data.source.shape[1])
    return max(1, channels // c_extent) if f_extent % max(1, channels // c_extent) == 0 else 1


def _inline_producers_but_padding(sch: Any, block: Any) -> None:
    """The padding block (if any) stays a whole-buffer pass before the tiles (inlined, every
    load of the inner loop would test the borders); other producers are inlined."""
    for producer in sch.get_producers(block):
        if sch.get(producer).name_hint.startswith("pad"):
            continue
        sch.compute_inline(producer)


def _indexes_are(region: Any, variables: list[Any]) -> bool:
    dims = list(region.region)
    return len(dims) == len(variables) and all(
        d.min.same_as(v) and int(d.extent) == 1 for d, v in zip(dims, variables, strict=True))
