"""LINAS against NSGA-II with measurement in the loop: real measurements needed to reach a front.

    python bench/linas.py [--space gnn] [--population 10] [--generations 8] [--seeds 2]
                          [--out bench/linas-<cpu>.md]

Both searches run pymoo's NSGA-II over (parameters up, latency down) on one space, with the
same population, generations and seeds:
- plain: every architecture the search evaluates is compiled by hwaware and timed
  (`hwaware.nas.measure`, the profiler); the measured latency is the search's latency;
- LINAS (`hwaware.nas.search(measure_every=K)`): the latency table prices every candidate;
  every K generations the front's `--top` unmeasured members are compiled and timed and the
  predictor refitted; at the end the final front's unmeasured members are measured too (and
  counted), so both results are judged on measured latencies only.

Score: the hypervolume of the measured points (true latency, parameters) as measurements
accumulate; the figure is how many real measurements each needs to reach 90%, 95% and 99% of
the plain search's final hypervolume. Measurements of one architecture are kept in one file
and reused between the runs (the count is per run; the timing is done once). No figure here
is an assertion.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwaware.nas import LatencyTable, get_space, search  # noqa: E402
from hwaware.nas.evolve import Point, pareto_front  # noqa: E402
from hwaware.nas.measure import measure  # noqa: E402
from hwaware.nas.objectives import params  # noqa: E402
from hwaware.nas.space import Arch, Space  # noqa: E402
from hwaware.predict.profile import cpu_kind  # noqa: E402

SHARES = (0.90, 0.95, 0.99)


class MeasuredLatencies:
    """A stand-in for `LatencyTable` whose every answer is a real measurement (plain NSGA-II
    with measurement in the loop); remembers the order in which architectures were measured."""

    def __init__(self, space: Space, file: Path, target: str):
        self.space, self.file, self.target = space, file, target
        self.ms: dict[Arch, float] = {}
        self.order: list[Arch] = []

    def latency_ms_batch(self, archs: Any, return_source: bool = False) -> Any:
        decoded = [self.space.decode(row) for row in np.atleast_2d(archs)] \
            if isinstance(archs, np.ndarray) else [self.space.validate(a) for a in archs]
        self.measure(decoded)
        ms = np.asarray([self.ms.get(a, np.inf) for a in decoded])
        return (ms, np.asarray(["measured"] * len(ms))) if return_source else ms

    def measure(self, archs: Sequence[Arch]) -> None:
        todo = list(dict.fromkeys(a for a in archs if a not in self.ms))
        for arch, sample in zip(todo, measure(self.space, todo, self.file, self.target),
                                strict=True):
            self.ms[arch] = sample.measured_us / 1e3 if sample is not None else np.inf
            self.order.append(arch)


def plain(space: Space, args: argparse.Namespace, seed: int, file: Path
          ) -> list[tuple[Arch, float]]:
    """NSGA-II whose latencies are all measured: the measured points in measuring order."""
    measured = MeasuredLatencies(space, file, args.target)
    search(space, args.target, objective="params", evals=args.population * args.generations,
           population=args.population, seed=seed, table=measured)
    return [(a, measured.ms[a]) for a in measured.order]


def linas(space: Space, args: argparse.Namespace, seed: int, file: Path
          ) -> list[tuple[Arch, float]]:
    """LINAS, then its final front measured: the measured points in measuring order."""
    with tempfile.TemporaryDirectory() as out:
        table = LatencyTable(args.target, space=space)
        result = search(space, args.target, objective="params",
                        evals=args.population * args.generations, population=args.population,
                        seed=seed, table=table, out_dir=out, measure_every=args.every,
                        measure_top=args.top)
        points = list(result.measured.items())
        final = MeasuredLatencies(space, file, args.target)
        final.ms = dict(result.measured)
        final.measure([p.arch for p in result.front])
        return points + [(a, final.ms[a]) for a in final.order]


def hypervolume_curve(space: Space, measured: Sequence[tuple[Arch, float]],
                      reference_ms: float) -> list[float]:
    """The hypervolume of the measured points after each measurement."""
    curve, points = [], []
    for arch, ms in measured:
        if np.isfinite(ms):
            points.append(Point(arch, float(params(space, arch)), ms, "measured", 0, True))
        curve.append(_hypervolume(points, reference_ms))
    return curve


def _hypervolume(points: list[Point], reference_ms: float) -> float:
    area, last_ms = 0.0, reference_ms
    for p in reversed(pareto_front(points)):  # slowest (most parameters) first
        if p.latency_ms < last_ms:
            area += (last_ms - p.latency_ms) * p.objective
            last_ms = p.latency_ms
    return area


def needed(curve: Sequence[float], target: float) -> str:
    """Measurements until `curve` reaches `target` ("not reached" otherwise)."""
    hit = next((i + 1 for i, v in enumerate(curve) if v >= target), None)
    return str(hit) if hit else f"not reached ({len(curve)})"


def report(space: Space, runs: Mapping[int, Mapping[str, list[tuple[Arch, float]]]],
           args: argparse.Namespace) -> str:
    lines = [f"# LINAS vs NSGA-II with measurement in the loop on {cpu_kind()} "
             f"({platform.machine()})", "",
             f"Command: `python bench/linas.py --space {space.name} --population "
             f"{args.population} --generations {args.generations} --every {args.every} --top "
             f"{args.top} --seeds {args.seeds}`", "",
             "Objective: parameters (up); latency: hwaware-compiled, measured on this machine. "
             "Hypervolume of the measured points only (LINAS's final front is measured and "
             "counted).", "",
             "| seed | search | measurements | final HV | to 90% of plain's | to 95% | to 99% |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for seed, by_kind in runs.items():
        reference = 1.05 * max(ms for pts in by_kind.values() for _, ms in pts
                               if np.isfinite(ms))
        curves = {k: hypervolume_curve(space, pts, reference) for k, pts in by_kind.items()}
        goal = curves["plain"][-1]
        for kind, curve in curves.items():
            lines.append(f"| {seed} | {kind} | {len(curve)} | {curve[-1]:.4g} | "
                         + " | ".join(needed(curve, s * goal) for s in SHARES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="gnn")
    parser.add_argument("--target", default="host")
    parser.add_argument("--population", type=int, default=10)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--every", type=int, default=2, help="LINAS: measure every K gens")
    parser.add_argument("--top", type=int, default=3, help="LINAS: front members measured")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--samples", default=None, help="JSONL of measurements (reused)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    space = get_space(args.space)
    file = Path(args.samples) if args.samples else \
        Path(tempfile.mkdtemp(prefix="hwaware-linas-bench-")) / "measured.jsonl"
    runs = {seed: {"plain": plain(space, args, seed, file),
                   "LINAS": linas(space, args, seed, file)} for seed in range(args.seeds)}
    text = report(space, runs, args)
    print(text)
    out = Path(args.out or Path(__file__).parent / f"linas-{cpu_kind()}.md")
    out.write_text(text)


if __name__ == "__main__":
    main()
