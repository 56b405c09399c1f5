"""`LatencyTable`: an architecture's latency on a device, as hwaware compiles it, in microseconds.

Goes in: architectures of one search space (`Arch`s, OFA-style dicts, or the encoded matrix),
a target and optionally a tuning database. Comes out: milliseconds per architecture and where
each answer comes from (`measured`: every kernel's as-built time is in the database or the
predictor's measured table; `predicted`: some kernel's time comes from the learned model;
`unknown`: some kernel is of a kind the predictor never saw).

How, without `torch.export` per architecture: a space's network is a chain of blocks
(`builders.py`). A block's kernels depend on the block and, where the partitioner fuses across
a block boundary (a transformer layer's residual add with the next layer's norm), on its
neighbours' kind and input shape. So the unit of caching is the block in that context: its
kernels are read once from the real decomposition (capture -> rewrite -> partition) of the
chain (previous block, block, next block), keeping the kernels whose first op the block owns.
Each such unit holds its kernels' times (measured or predicted) as additive totals
(`features.model_totals`); an architecture's totals are the sums over its blocks, and the
predictor's whole-model term turns them into a latency (`total_us_of_totals`), for one
architecture or a whole batch at once in numpy. Tests check the blocks' kernels against the
real decomposition of built architectures.

`get_efficiency(arch_dict)` is the method Once-for-All's `EvolutionFinder` calls.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hwaware.decompose import HOST_FAMILY, KernelRecord
from hwaware.nas.builders import Block, Chain
from hwaware.nas.space import Space, get_space
from hwaware.predict.cache import KernelRecordCache, code_fingerprint
from hwaware.predict.features import LARGEST_KERNEL, model_totals

log = logging.getLogger(__name__)

SOURCES = ("measured", "predicted", "unknown")  # an answer's source is its blocks' worst
Boundary = tuple[str, tuple[int, ...]] | None
BlockKey = tuple[Boundary, Block, Boundary]


@dataclass(frozen=True)
class BlockCost:
    """A block's kernels (in context) and what they add to a model's totals."""

    records: tuple[KernelRecord, ...]
    host_steps: int
    totals: np.ndarray
    source: int  # index into SOURCES


class LatencyTable:
    """Latency lookup for NAS loops over one search space (see the module docstring)."""

    def __init__(self, target: Any = "host", db: Any = None, *, space: str | Space = "ofa-mbv3",
                 threads: int | None = None, predictor: Any = None, exit_rates: Any = None):
        """`predictor`: a `LatencyPredictor`, or the folder of a saved one (default: the one
        saved for `target` and `threads` in `cost_models/`). `exit_rates`: for a dynamic space,
        `exit_rates(arch)` -> the probability of leaving at each exit position (measured on
        your supernet with calibration data); default: the space file's calibration."""
        self.exit_rates = exit_rates
        from hwaware.predict.predictor import LatencyPredictor

        self.space = space if isinstance(space, Space) else get_space(space)
        if predictor is None or isinstance(predictor, (str, Path)):  # a saved predictor's folder
            predictor = LatencyPredictor.load(target, db=db, threads=threads,
                                              directory=predictor)
        self.predictor = predictor
        self.costs: dict[BlockKey, BlockCost] = {}
        self.answers: dict[Any, tuple[float, str]] = {}
        self.kernel_cache = BlockKernelCache(self.space)
        self._slots = _SlotIndex(self.space)

    def use(self, predictor: Any) -> None:
        """Answer with another predictor from now on (a refitted one): blocks' kernels stay,
        their prices and every cached answer go."""
        self.predictor = predictor
        self.costs.clear()
        self.answers.clear()
        self._slots = _SlotIndex(self.space)

    # ------------------------------------------------------------------ lookups
    def latency_ms(self, arch: Mapping[str, Any]) -> float:
        """Predicted milliseconds of `arch` compiled by hwaware on this table's device."""
        return self.latency(arch)[0]

    def latency(self, arch: Mapping[str, Any]) -> tuple[float, str]:
        """(milliseconds, source) of one architecture; answers are cached per architecture."""
        key = _arch_key(arch)
        answer = self.answers.get(key)
        if answer is None:
            paths = self.path_latencies(arch)
            ms = sum(p.probability * path_ms for p, path_ms, _ in paths)
            source = SOURCES[max(SOURCES.index(s) for _, _, s in paths)]
            answer = self.answers[key] = (ms, source)
        return answer

    def path_latencies(self, arch: Mapping[str, Any]) -> list[tuple[Any, float, str]]:
        """(path, milliseconds, source) of each way the architecture runs: one path for a
        static network; for a dynamic one (early exits) each path, whose probabilities weight
        `latency` into the expected latency."""
        paths = self.space.builder.paths(self.space.validate(arch), self.exit_rates)
        costs = [[self.cost(k, ctx) for k, ctx in self._contexts(p.trunk)]
                 + [self.cost((None, b, None), (b,)) for b in p.side] for p in paths]
        totals = np.concatenate([_reduce(np.stack([c.totals for c in path])[None])
                                 for path in costs])
        ms = self.predictor.total_us_of_totals(totals) / 1e3
        return [(p, float(m), SOURCES[max(c.source for c in path)])
                for p, m, path in zip(paths, ms, costs, strict=True)]

    def get_efficiency(self, arch_dict: Mapping[str, Any]) -> float:
        """Once-for-All's efficiency-predictor interface: latency in milliseconds."""
        return self.latency_ms(arch_dict)

    def latency_ms_batch(self, archs: np.ndarray | Sequence[Mapping[str, Any]],
                         return_source: bool = False) -> Any:
        """Milliseconds of many architectures: an encoded matrix (`space.encode`) or a list of
        architectures in, a numpy vector out (with `return_source`, also a vector of sources)."""
        encoded = np.atleast_2d(archs if isinstance(archs, np.ndarray)
                                else self.space.encode(archs))
        if self.space.builder.dynamic:  # several paths each: priced one architecture at a time
            answers = [self.latency(self.space.decode(row)) for row in encoded]
            ms, sources = np.asarray([a[0] for a in answers]), [a[1] for a in answers]
            return (ms, np.asarray(sources)) if return_source else ms
        totals, source_ids = self._slots.totals(encoded, self)
        ms = self.predictor.total_us_of_totals(totals) / 1e3
        sources = np.asarray(SOURCES)[source_ids]
        return (ms, sources) if return_source else ms

    def kernels(self, arch: Mapping[str, Any]) -> list[KernelRecord]:
        """The kernels the table charges `arch` for, block by block."""
        return [r for k, ctx in self.contexts(arch) for r in self.cost(k, ctx).records]

    # ------------------------------------------------------------------- blocks
    def contexts(self, arch: Mapping[str, Any]) -> list[tuple[BlockKey, tuple[Block, ...]]]:
        """Each active block's cache key and its context (previous, block, next)."""
        return self._contexts([b for b in self.space.blocks(arch) if b is not None])

    def _contexts(self, blocks: Sequence[Block]) -> list[tuple[BlockKey, tuple[Block, ...]]]:
        out = []
        for i, block in enumerate(blocks):
            prev = blocks[i - 1] if i else None
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            context = tuple(b for b in (prev, block, nxt) if b is not None)
            out.append(((_boundary(prev), block, _boundary(nxt)), context))
        return out

    def cost(self, key: BlockKey, context: tuple[Block, ...]) -> BlockCost:
        """The block's cost, decomposed and timed at its first use."""
        cost = self.costs.get(key)
        if cost is None:
            found = self.kernel_cache.get(key)
            if found is None:
                found = block_kernels(self.space, context, key[0] is not None)
                self.kernel_cache.put(key, *found)
            cost = self.costs[key] = self._price(*found, key[1])
        return cost

    def warm(self, archs: Iterable[Mapping[str, Any]]) -> int:
        """Decompose, one whole architecture at a time, every block in context of `archs` the
        table has not seen (one export for all of an architecture's blocks instead of one per
        block); returns how many were new."""
        before = len(self.costs)
        for arch in archs:
            contexts = self.contexts(arch)
            missing = [k for k, _ in contexts
                       if k not in self.costs and self.kernel_cache.get(k) is None]
            if len(missing) > 1:
                blocks = [ctx[1 if k[0] is not None else 0] for k, ctx in contexts]
                per_block = chain_kernels(self.space, blocks)
                for (key, _), records in zip(contexts, per_block, strict=True):
                    if key in missing:
                        self.kernel_cache.put(key, records, host_steps_of(records))
            for key, context in contexts:
                self.cost(key, context)
        return len(self.costs) - before

    def _price(self, records: list[KernelRecord], host_steps: int, block: Block) -> BlockCost:
        us, sources = self.predictor.kernel_times(records)
        if "unknown" in sources:
            warnings.warn(f"hwaware: block {block.kind}{block.params} has kernels of a kind the "
                          f"latency predictor was not trained on (estimated anyway)",
                          stacklevel=4)
        source = max((SOURCES.index(s) for s in sources), default=0)
        return BlockCost(tuple(records), host_steps, model_totals(records, host_steps, list(us)),
                         source)


def block_kernels(space: Space, context: tuple[Block, ...], has_prev: bool
                  ) -> tuple[list[KernelRecord], int]:
    """The kernels and host ops the middle block of `context` owns in the real decomposition
    of the chain, and how many host op steps it has."""
    records = chain_kernels(space, context)[1 if has_prev else 0]
    return records, host_steps_of(records)


def host_steps_of(records: Sequence[KernelRecord]) -> int:
    return sum(r.family == HOST_FAMILY for r in records)


def chain_kernels(space: Space, blocks: Sequence[Block]) -> list[list[KernelRecord]]:
    """The real decomposition (capture -> rewrite -> partition) of the chain of `blocks`: each
    block's kernels and host ops (those whose first op it owns)."""
    from hwaware.capture import capture
    from hwaware.decompose import records_by_module, rewrite_and_partition

    builder = space.builder
    chain = Chain([builder.module(b) for b in blocks]).eval()
    with torch.no_grad():
        captured = capture(chain, builder.block_inputs(blocks[0]))
    _, part = rewrite_and_partition(captured)
    per_block: list[list[KernelRecord]] = [[] for _ in blocks]
    for path, record in records_by_module(part):
        parts = path.split(".")
        if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
            per_block[int(parts[1])].append(record)
        else:
            log.warning("kernel %s of a %s chain has no block; not charged", record.signature,
                        space.name)
    return per_block


class BlockKernelCache(KernelRecordCache):
    """Blocks' kernels (device-independent) kept on disk across runs, one JSONL file per
    builder and version of the code that decomposes (`fingerprint`). A key names the block's
    parameters and shapes, so spaces of one builder (a space and its device-specific versions)
    share the file."""

    def __init__(self, space: Space, directory: Path | None = None):
        from hwaware.threads import cache_dir

        base = directory or Path(os.environ.get("HWAWARE_NAS_CACHE", cache_dir() / "nas"))
        super().__init__(base / f"{space.builder_name}-{fingerprint(space)}.jsonl")

    def get(self, key: BlockKey) -> tuple[list[KernelRecord], int] | None:
        return self.lookup(_key_text(key))

    def put(self, key: BlockKey, records: list[KernelRecord], host_steps: int) -> None:
        self.store(_key_text(key), records, host_steps)


def fingerprint(space: Space) -> str:
    """A hash of the code and versions a decomposition of the space's blocks depends on."""
    return code_fingerprint(space.builder_name)


def _key_text(key: BlockKey) -> str:
    prev, block, nxt = key
    return json.dumps([prev, [block.kind, block.params, block.input_shape], nxt])


class _SlotIndex:
    """The batched path: per slot, the block (in context) of each combination of the gene
    positions that slot depends on (`Builder.slot_genes`), found on first sight."""

    def __init__(self, space: Space):
        self.space = space
        self.columns = [[space.column[g] for g in genes]
                        for genes in space.builder.slot_genes()]
        radix = [np.asarray([len(space.genes[c].choices) for c in cols]) for cols in self.columns]
        self.strides = [np.concatenate([np.cumprod(r[::-1])[::-1][1:], [1]]) for r in radix]
        self.rows = [np.full(int(np.prod(r)), -2, dtype=np.int64) for r in radix]  # -2: unseen
        self.totals_rows: list[np.ndarray] = []
        self.sources: list[int] = []
        self.table: tuple[np.ndarray, np.ndarray] | None = None  # the two lists as arrays

    def totals(self, encoded: np.ndarray, table: LatencyTable) -> tuple[np.ndarray, np.ndarray]:
        n, width = len(encoded), len(self._empty())
        sums, largest = np.zeros((n, width)), np.zeros(n)
        source = np.zeros(n, dtype=np.int64)
        for slot, cols in enumerate(self.columns):
            ids = encoded[:, cols] @ self.strides[slot]
            self._fill(slot, ids, encoded, table)
            rows = self.rows[slot][ids]
            active = rows >= 0
            all_totals, all_sources = self._arrays()
            block_totals = all_totals[rows[active]]
            sums[active] += block_totals
            largest[active] = np.maximum(largest[active], block_totals[:, LARGEST_KERNEL])
            source[active] = np.maximum(source[active], all_sources[rows[active]])
        sums[:, LARGEST_KERNEL] = largest
        return sums, source

    def _fill(self, slot: int, ids: np.ndarray, encoded: np.ndarray, table: LatencyTable
              ) -> None:
        unseen, first = np.unique(ids[self.rows[slot][ids] == -2], return_index=True)
        if not len(unseen):
            return
        positions = np.flatnonzero(self.rows[slot][ids] == -2)[first]
        table.warm(self.space.decode(encoded[at]) for at in positions)
        for block_id, at in zip(unseen, positions, strict=True):
            self.rows[slot][block_id] = self._row(slot, self.space.decode(encoded[at]), table)

    def _row(self, slot: int, arch: Any, table: LatencyTable) -> int:
        blocks = self.space.blocks(arch)
        if blocks[slot] is None:
            return -1
        active = sum(b is not None for b in blocks[:slot])
        key, context = table.contexts(arch)[active]
        cost = table.cost(key, context)
        self.totals_rows.append(cost.totals)
        self.sources.append(cost.source)
        self.table = None
        return len(self.totals_rows) - 1

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self.table is None:
            width = len(self._empty())
            self.table = (np.asarray(self.totals_rows).reshape(-1, width),
                          np.asarray(self.sources, dtype=np.int64))
        return self.table

    def _empty(self) -> np.ndarray:
        return model_totals([], 0, [])


def _boundary(block: Block | None) -> Boundary:
    """What of a neighbouring block can change a block's kernels: its kind and input shape."""
    return None if block is None else (block.kind, block.input_shape)


def _reduce(stacked: np.ndarray) -> np.ndarray:
    """Totals of chains of blocks ([models, blocks, totals] -> [models, totals])."""
    out = stacked.sum(axis=1)
    out[:, LARGEST_KERNEL] = stacked[:, :, LARGEST_KERNEL].max(axis=1)
    return out


def _arch_key(arch: Mapping[str, Any]) -> Any:
    """A hashable key of an architecture (an `Arch`, or a plain dict of lists)."""
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(arch.items()))
