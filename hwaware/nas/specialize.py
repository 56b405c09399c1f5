"""Device-specific spaces (SpaceEvo's lesson): keep the choices this device runs efficiently.

Goes in: a space, a latency table for the device (its predictor and database), a sample size
and a keep ratio. For every gene (a list gene's positions pooled: `ks`, `e`, ...), each choice
is charged the blocks whose cache key it decides (`Builder.slot_genes`), over the architectures
sampled: their kernels' time on this device (measured where the database has them, else
predicted) and their roofline time (each kernel at the device's peak compute or memory
bandwidth, whichever binds). A choice's efficiency is the share of the roofline its blocks
reach: small and memory-bound shapes are not penalised for being small, while shapes the device
and compiler handle badly (channel counts that leave vector lanes empty, kernel sizes whose
fused kernels run far from peak) are. A choice below `keep` x the best share of its gene is
dropped (at least `minimum` choices stay, the most efficient). Achieved GFLOP/s are reported
beside it. Genes marked `"specialize": false` in the space file (input sizes, depths: they
set how much work there is, not how well the device does it) keep every choice.

Comes out: a `Specialized` report (per gene: each choice's GFLOP/s and whether it stays) and a
new space file (the same builder and constants, the pruned choices), which `get_space(path)`
and every `hwaware nas` command take.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwaware.nas.space import Space, space_file_text
from hwaware.predict.features import MODEL_TOTAL_NAMES

FLOPS = MODEL_TOTAL_NAMES.index("flops")
KERNEL_US = MODEL_TOTAL_NAMES.index("kernel_sum_us")
FLOP, US, ROOFLINE = 0, 1, 2  # the charged sums per choice


@dataclass(frozen=True)
class ChoiceEfficiency:
    gene: str
    choice: Any
    roofline_share: float  # the blocks' roofline time over their kernels' time
    gflops: float  # achieved: the blocks' FLOPs per second of their kernels, 1e9
    kept: bool


@dataclass(frozen=True)
class Specialized:
    """The decisions and the new space's JSON document."""

    space: str
    device: str
    choices: list[ChoiceEfficiency]
    document: dict[str, Any]

    def table(self) -> str:
        lines = [f"{self.space} on {self.device}: each choice's share of the roofline "
                 f"(achieved GFLOP/s); kept: +, dropped: -"]
        by_gene: dict[str, list[ChoiceEfficiency]] = defaultdict(list)
        for c in self.choices:
            by_gene[c.gene].append(c)
        for gene, rows in by_gene.items():
            cells = "  ".join(f"{'+' if c.kept else '-'}{c.choice}: {c.roofline_share:.0%} "
                              f"({c.gflops:.0f})" for c in rows)
            lines.append(f"  {gene:12} {cells}")
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_text(space_file_text(self.document))
        return out


def specialize(space: Space, table: Any, samples: int = 300, keep: float = 0.6,
               minimum: int = 2, seed: int = 0) -> Specialized:
    """The device-specific version of `space` (see the module docstring)."""
    charged = _charge(space, table, space.sample(samples, seed=seed))
    choices = []
    for name, genes in space.groups.items():
        if name not in charged:
            continue
        sums = charged[name]
        share = {c: sums[c][ROOFLINE] / sums[c][US] for c in genes[0].choices
                 if sums.get(c) and sums[c][US] > 0}
        ranked = sorted(share, key=lambda c: -share[c])
        best = share[ranked[0]] if ranked else 0.0
        kept = {c for i, c in enumerate(ranked) if i < minimum or share[c] >= keep * best}
        choices += [ChoiceEfficiency(name, c, share[c], sums[c][FLOP] / sums[c][US] / 1e3,
                                     c in kept) for c in genes[0].choices if c in share]
    document = _pruned(space, {(c.gene, c.choice) for c in choices if not c.kept},
                       table.predictor.key)
    return Specialized(space.name, table.predictor.key, choices, document)


def _charge(space: Space, table: Any, archs: list[Any]) -> dict[str, dict[Any, list[float]]]:
    """Per gene and choice: [FLOPs, kernel microseconds, roofline microseconds] of the blocks
    that choice decides."""
    from hwaware.predict.features import roofline_us

    sums: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0] * 3))
    device = table.predictor.device
    table.warm(archs)
    slot_genes = space.builder.slot_genes()
    for arch in archs:
        contexts = iter(table.contexts(arch))
        for slot, block in enumerate(space.blocks(arch)):
            if block is None:
                continue
            cost = table.cost(*next(contexts))
            roofline = sum(roofline_us(r.flops, r.bytes_moved, device) for r in cost.records)
            charge = (float(cost.totals[FLOPS]), float(cost.totals[KERNEL_US]), roofline)
            for label in _deciding(space, slot_genes[slot]):
                gene = space.genes[space.column[label]]
                value = arch[gene.name] if gene.index is None else arch[gene.name][gene.index]
                totals = sums[gene.name][value]
                for i, amount in enumerate(charge):
                    totals[i] += amount
    return sums


def _deciding(space: Space, labels: list[str]) -> list[str]:
    """The gene positions of a slot that choose how its block computes (not input sizes or
    depths: genes marked `"specialize": false` in the space file)."""
    return [label for label in labels if space.genes[space.column[label]].specialize]


def _pruned(space: Space, dropped: set[tuple[str, Any]], device: str) -> dict[str, Any]:
    doc = json.loads(Path(space.source).read_text())
    doc["name"] = f"{space.name}@{device}"
    doc["description"] = (f"{space.name} specialised for {device} by `hwaware nas space`: "
                          f"choices its blocks run below the kept share of the best choice's "
                          f"GFLOP/s dropped. " + doc.get("description", ""))
    for gene in doc["genes"]:
        choices = gene["choices"]
        if choices and isinstance(choices[0], list):
            gene["choices"] = [[c for c in per if (gene["name"], c) not in dropped]
                               for per in choices]
        else:
            gene["choices"] = [c for c in choices if (gene["name"], c) not in dropped]
    return doc
