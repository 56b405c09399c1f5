"""The untuned CPU schedule of a dense matmul kernel (a Linear layer and its epilogue).

Goes in: a fused TIR kernel whose one contraction is C[..., i, j] = sum_k A[..., i, k] *
B[..., k, j] (the weight already laid out k-major, as Relax legalizes `linear`), followed by
element-wise epilogue blocks (bias, activation). Comes out: a schedule, or None where the kernel
is not of that form (the next rule, or PyTorch, takes it).

The schedule is the classic register-blocked GEMM: the output is split into (rows x column
vectors) micro-tiles whose accumulators stay in registers for the whole k loop (`rows` A values
broadcast and `vectors` B vectors loaded per k step), the tiles run in parallel with column
panels outermost (a panel of B stays in L2 while the rows of A stream past), and the epilogue
runs on each micro-tile as soon as its sums are done. Without it, a Linear layer whose
contraction has no tuned record stays in PyTorch (on AMD CPUs PyTorch's CPU GEMM reaches a
third of the cores' peak).
"""

from __future__ import annotations

import logging
from typing import Any

import tvm

from hwaware.tvm.isa import VectorUnit

log = logging.getLogger(__name__)

MAX_ROWS = 6  # rows of A per micro-tile
MAX_VECTORS = 4  # vectors of B (output columns) per micro-tile
MIN_ROWS = 4  # fewer rows (a GEMV) are DLight's GEMV rule's
SPATIAL, REDUCE = 0, 2  # TIR iter types
PARALLEL_MACS = 1 << 20  # smaller kernels stay on the calling thread (a pool wake-up costs more)


def one_contraction(func: Any) -> tuple[Any, Any, list[Any]] | None:
    """(schedule, block, operand reads) of a kernel with exactly one reduction block and static
    loop extents; the reads are the block's other than its own accumulator."""
    from tvm.s_tir import Schedule

    if not isinstance(func, tvm.tirx.PrimFunc):
        return None
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root")) if has_root(sch) else []
    reductions = [b for b in blocks
                  if any(int(v.iter_type) == REDUCE for v in sch.get(b).iter_vars)]
    if len(reductions) != 1 or \
            any(extent_of(sch, loop) is None for loop in sch.get_loops(reductions[0])):
        return None
    block = reductions[0]
    written = sch.get(block).writes[0].source
    return sch, block, [r for r in sch.get(block).reads if not r.source.same_as(written)]


def find_matmul(func: Any) -> tuple[Any, Any, Any, Any] | None:
    """(schedule, block, i, j) of the kernel's one contraction if it is a dense matmul
    vectorizable over its output columns: the last spatial iter j indexes the last dims of B
    and C, the reduction k the last dim of A and the second-to-last of B."""
    found = one_contraction(func)
    if found is None:
        return None
    sch, block, reads = found
    iters = list(sch.get(block).iter_vars)
    kinds = [int(v.iter_type) for v in iters]
    if len(iters) < 3 or kinds[-1] != REDUCE or any(k != SPATIAL for k in kinds[:-1]):
        return None
    i, j, k = (v.var for v in iters[-3:])
    if len(reads) != 2 or not any(_last_index_is(r, k) for r in reads) or \
            not any(_last_index_is(r, j) and _index_is(r, -2, k) for r in reads):
        return None
    loops = sch.get_loops(block)
    return sch, block, loops[-3], loops[-2]


def schedule_dense(func: Any, unit: VectorUnit) -> Any:
    """The register-blocked schedule of a dense matmul kernel for vector `unit`, or None (see
    the module docstring)."""
    from hwaware.kernels.lowering_common import accumulate_in_registers

    planned = _plan(func, unit)
    if planned is None:
        return None
    sch, block, i, j, (rows, vectors) = planned
    *batch, _, _, k = sch.get_loops(block)
    i0, i1 = sch.split(i, [None, rows])
    j0, j1, j2 = sch.split(j, [None, vectors, unit.lanes])
    sch.reorder(j0, i0, k, i1, j1, j2)
    tile = sch.fuse(*batch, j0, i0)
    if macs(sch, block) >= PARALLEL_MACS:
        sch.parallel(tile)
    sch.vectorize(j2)
    sch.unroll(j1)
    sch.unroll(i1)
    epilogue = epilogue_names(sch, block)
    accumulate_in_registers(sch, block, tile, k)
    epilogue_per_tile(sch, block, epilogue, tile)
    return sch


def takes(func: Any, unit: VectorUnit) -> bool:
    """Whether `schedule_dense` schedules this kernel (the match alone, no schedule built)."""
    return _plan(func, unit) is not None


def _plan(func: Any, unit: VectorUnit) -> tuple[Any, Any, Any, Any, tuple[int, int]] | None:
    """(schedule, matmul block, i loop, j loop, micro-tile) of a kernel this rule takes."""
    found = find_matmul(func)
    if found is None:
        return None
    sch, block, i, j = found
    tile = micro_tile(int(sch.get(i).extent), int(sch.get(j).extent), unit)
    return None if tile[0] < MIN_ROWS or tile[1] == 0 else (sch, block, i, j, tile)


def micro_tile(m: int, n: int, unit: VectorUnit) -> tuple[int, int]:
    """(rows, vectors) of the micro-tile: the vectors dividing n (in vectors of `unit`'s
    lanes), the rows dividing m, for the most accumulators up to `unit.accumulators`, then the
    most rows. Where no
    divisor of m gives MIN_ROWS (17 tokens, a ViT's 197: patches and a class token), rows that
    do not divide it, the fewest padded rows in the last tile (TVM guards them). (0, 0) if n is
    not a whole number of vectors."""
    if n % unit.lanes:
        return 0, 0
    rows = [r for r in range(1, MAX_ROWS + 1) if m % r == 0]
    if max(rows) < MIN_ROWS <= m:
        waste = {r: -m % r for r in range(MIN_ROWS, MAX_ROWS + 1)}
        rows = [min(waste, key=lambda r: (waste[r], -r))]
    options = [(r, v) for r in rows for v in range(1, MAX_VECTORS + 1)
               if (n // unit.lanes) % v == 0 and r * v <= unit.accumulators]
    return max(options, key=lambda rv: (rv[0] * rv[1], rv[0]))


def epilogue_names(sch: Any, block: Any) -> list[str]:
    """The blocks after the matmul (its element-wise epilogue), by name."""
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return names[names.index(sch.get(block).name_hint) + 1:]


def epilogue_per_tile(sch: Any, block: Any, epilogue: list[str], tile: Any) -> None:
    """The element-wise blocks after the contraction `block`: all inlined into the last, which
    runs on each tile right after its sums, vectorized over the tile's columns. An epilogue
    whose output is not the contraction's shape (a padding for the next layer, as ONNX graphs
    fuse it) stays one pass after the tiles: per tile it would never write the border, whose
    values no tile computes."""
    if not epilogue:
        return
    for name in epilogue[:-1]:
        sch.compute_inline(sch.get_sblock(name))
    last = sch.get_sblock(epilogue[-1])
    if _output_shape(sch, last) != _output_shape(sch, block):
        return
    sch.reverse_compute_at(last, tile, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(last)[-1])


def _output_shape(sch: Any, block: Any) -> list[int]:
    return [int(d) for d in sch.get(block).writes[0].source.shape]


def macs(sch: Any, block: Any) -> int:
    """Multiply-adds of a contraction block: the product of its iteration extents."""
    total = 1
    for v in sch.get(block).iter_vars:
        total *= int(v.dom.extent)
    return total


def has_root(sch: Any) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses
        return False


def _last_index_is(region: Any, var: Any) -> bool:
    return _index_is(region, -1, var)


def _index_is(region: Any, position: int, var: Any) -> bool:
    dims = list(region.region)
    return len(dims) >= -position and dims[position].min.same_as(var) and \
        int(dims[position].extent) == 1


def extent_of(sch: Any, loop: Any) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tvm.tirx.IntImm) else None
