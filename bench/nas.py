"""Architecture search benchmark: latency-table speed and accuracy, NSGA-II against random search.

    python bench/nas.py [--target host] [--predictor DIR] [--measure N] [--out FILE.md]

Reports, on this CPU, with the latency predictor shipped for the target:
1. table speed on `ofa-mbv3`: the cold warm-up (every block in context decomposed once, then
   kept on disk), architectures per second batched (100,000 random ones), a single cached query
   and a single query of a new architecture whose blocks are known;
2. table vs measured: N held-out random architectures per space compiled by hwaware and timed
   (`hwaware.nas.measure`, the profiler), the table's answer beside the measured latency;
3. (`--between-sessions FILE`, alone) the stored architectures (`--stored`, default the CPU's
   `bench/nas-<cpu>.jsonl`) compiled and timed again now: how far ground truth moves between
   sessions, beside the noise of two timings in one, and the table against the new timings;
4. search on `ofa-mbv3` (objective: parameters, a stand-in any callable replaces): hypervolume
   of NSGA-II against random search at equal evaluations (median of 5 seeds), the time of a
   1,000-evaluation search, and the latency-constrained result against the best of 1,000
   random samples under the same limit; a Pareto plot (`bench/nas-pareto-<cpu>.png`), with
   measured latencies of front members marked when `--measure` > 0.
No figure here is an assertion.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwaware.nas import LatencyTable, search  # noqa: E402
from hwaware.nas.evolve import Point, SearchResult, pareto_front, plot_front  # noqa: E402
from hwaware.nas.measure import measure  # noqa: E402
from hwaware.nas.objectives import params  # noqa: E402
from hwaware.predict import COST_MODELS_DIR  # noqa: E402
from hwaware.predict.profile import Sample, cpu_kind  # noqa: E402

SPACES = ("ofa-mbv3", "resnet", "transformer", "gnn")
SEEDS = 5
EVALS = 1000


def table_speed(table: LatencyTable) -> str:
    space = table.space
    start = time.perf_counter()
    warmed = 0
    for seed in range(100):  # until a batch of random architectures brings nothing new
        new = table.warm(space.sample(100, seed=10_000 + seed))
        warmed += new
        if not new:
            break
    cold_s = time.perf_counter() - start
    encoded = space.encode(space.sample(100_000, seed=1))
    table.latency_ms_batch(encoded[:1000])
    batch_s = min(_timed(lambda: table.latency_ms_batch(encoded)) for _ in range(3))
    arch = space.sample(1, seed=2)[0]
    table.latency_ms(arch)
    cached_us = _per_call_us(lambda: table.latency_ms(arch), 10_000)
    fresh = space.sample(200, seed=3)
    table.warm(fresh)
    start = time.perf_counter()
    for a in fresh:
        table.latency_ms(a)
    new_us = (time.perf_counter() - start) / len(fresh) * 1e6
    return (f"## Latency table speed (`ofa-mbv3`)\n\n"
            f"| measure | value |\n|---|---|\n"
            f"| warm-up: blocks in context decomposed (once, then on disk) | {warmed} in "
            f"{cold_s:.0f} s |\n"
            f"| batched, 100,000 random architectures | {len(encoded) / batch_s:,.0f} "
            f"architectures/s ({batch_s:.2f} s) |\n"
            f"| single cached query | {cached_us:.1f} us |\n"
            f"| single query, new architecture, known blocks | {new_us:.0f} us |\n")


def table_accuracy(predictor: str | None, samples: int, target: str, out: Path) -> str:
    """The table against `samples` new random architectures per space, measured now (or read
    back from `out`)."""
    measured = []
    for name in SPACES:
        space = LatencyTable(target, space=name, predictor=predictor).space
        measured += filter(None, measure(space, space.sample(samples, seed=777), out, target))
    return accuracy_of(predictor, target, measured)


def accuracy_of(predictor: str | None, target: str, measured: list) -> str:
    """The table's answers (db=None: no measured kernel answers for itself) against measured
    samples of the spaces."""
    rows, lines = [], []
    for name in SPACES:
        table = LatencyTable(target, space=name, predictor=predictor, db=None)
        for s in (s for s in measured if s.space == f"nas:{name}"):
            arch = table.space.validate(s.arch["config"])
            rows.append((name, table.latency_ms(arch), s.measured_us / 1e3,
                         abs(s.latency_us - s.latency2_us) / s.measured_us))
    for name in SPACES:
        errors = [abs(t / m - 1) for n, t, m, _ in rows if n == name]
        noise = [z for n, _, _, z in rows if n == name]
        if errors:
            lines.append(f"| {name} | {len(errors)} | {_share(errors, 0.10):.0%} | "
                         f"{_share(errors, 0.05):.0%} | {statistics.mean(errors):.1%} | "
                         f"{statistics.median(noise):.1%} |")
    return ("## Table vs measured compiled latency (held-out random architectures)\n\n"
            "| space | models | within ±10% | within ±5% | MAPE | noise (two timings) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def between_sessions(predictor: str | None, target: str, stored: list, out: Path) -> str:
    """`stored` samples timed again now (into `out`): how far one architecture's ground truth
    moves between sessions, beside the two-timings noise of one session, and the table against
    both measurements."""
    again: list = []
    for name in SPACES:
        space = LatencyTable(target, space=name, predictor=predictor).space
        then = [s for s in stored if s.space == f"nas:{name}"]
        timed = measure(space, [s.arch["config"] for s in then], out, target)
        again += zip(then, timed, strict=True)
    pairs = [(old, new) for old, new in again if new is not None]
    lines = []
    for name in SPACES:
        moved = [abs(new.measured_us / old.measured_us - 1) for old, new in pairs
                 if old.space == f"nas:{name}"]
        within = [abs(s.latency_us - s.latency2_us) / s.measured_us
                  for pair in pairs if pair[0].space == f"nas:{name}" for s in pair]
        if moved:
            lines.append(f"| {name} | {len(moved)} | {_share(moved, 0.10):.0%} | "
                         f"{_share(moved, 0.05):.0%} | {statistics.median(moved):.1%} | "
                         f"{max(moved):.1%} | {statistics.median(within):.1%} |")
    return ("## Between sessions: the same architectures compiled and timed again\n\n"
            "Stored ground truth (`bench/nas-<cpu>.jsonl`) against a new measurement of each "
            "architecture now (new build, new timing).\n\n"
            "| space | models | now within ±10% of then | within ±5% | median change | "
            "largest change | noise in one session (two timings) |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
            + accuracy_of(predictor, target, [new for _, new in pairs])
            .replace("(held-out random architectures)", "(the same architectures, timed now)"))


def search_figures(table: LatencyTable) -> tuple[str, SearchResult]:
    space = table.space
    randoms = space.sample(EVALS, seed=99)
    random_ms = table.latency_ms_batch(randoms)
    limit = float(np.median(random_ms))
    reference = (float(np.max(random_ms)) * 1.1, 0.0)
    hv_nsga, hv_random, times = [], [], []
    result = None
    for seed in range(SEEDS):
        start = time.perf_counter()
        run = search(space, table=table, objective="params", evals=EVALS, population=50,
                     seed=seed)
        times.append(time.perf_counter() - start)
        hv_nsga.append(_hypervolume(run.evaluated, reference))
        sampled = space.sample(EVALS, seed=1000 + seed)
        hv_random.append(_hypervolume(_points(table, sampled), reference))
    constrained = search(space, table=table, objective="params", latency_ms=limit,
                         evals=EVALS, population=50, seed=0)
    result = constrained
    best_search = max(p.objective for p in constrained.front)
    under = [params(space, a) for a, ms in zip(randoms, random_ms, strict=True) if ms <= limit]
    text = (f"## Search on `ofa-mbv3` (objective: parameters; latency from the table)\n\n"
            f"| measure | value |\n|---|---|\n"
            f"| hypervolume, NSGA-II, {EVALS} evaluations (median of {SEEDS} seeds) | "
            f"{statistics.median(hv_nsga):.4g} |\n"
            f"| hypervolume, random search, {EVALS} samples (median of {SEEDS} seeds) | "
            f"{statistics.median(hv_random):.4g} |\n"
            f"| time of a {EVALS}-evaluation search (warm table; median) | "
            f"{statistics.median(times):.1f} s |\n"
            f"| latency limit {limit:.3f} ms: best parameters, NSGA-II | {best_search:,.0f} |\n"
            f"| latency limit {limit:.3f} ms: best parameters of {EVALS} random samples | "
            f"{max(under):,.0f} |\n")
    return text, result


def device_spaces(predictors: list[str], keep: float) -> str:
    """`hwaware nas space` on `ofa-mbv3` for each predictor folder: the derived spaces side by
    side (choices kept per device)."""
    from hwaware.nas.specialize import specialize

    rows = []
    for folder in predictors:
        key = Path(folder).name
        table = LatencyTable(space="ofa-mbv3", predictor=folder)
        result = specialize(table.space, table, samples=100, keep=keep)
        for c in result.choices:
            rows.append(f"| {key} | {c.gene} | {c.choice} | {c.roofline_share:.0%} | "
                        f"{c.gflops:.0f} | {'kept' if c.kept else 'dropped'} |")
    return (f"## Device-specific spaces (`hwaware nas space --space ofa-mbv3 --keep {keep}`)\n\n"
            "| device | gene | choice | share of roofline | GFLOP/s | |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _points(table: LatencyTable, archs: list) -> list[Point]:
    ms = table.latency_ms_batch(archs)
    return [Point(a, float(params(table.space, a)), float(m), "", 0, True)
            for a, m in zip(archs, ms, strict=True)]


def _hypervolume(points: list[Point], reference: tuple[float, float]) -> float:
    """Area dominated by the front in (latency down, objective up), bounded by `reference`
    (latency, objective)."""
    front = pareto_front([p for p in points if p.feasible])
    area, last_ms = 0.0, reference[0]
    for p in reversed(front):  # slowest (highest objective) first
        if p.latency_ms < last_ms:
            area += (last_ms - p.latency_ms) * max(p.objective - reference[1], 0.0)
            last_ms = p.latency_ms
    return area


def _share(errors: list[float], bound: float) -> float:
    return sum(e <= bound for e in errors) / len(errors)


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def _per_call_us(fn: object, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - start) / calls * 1e6


def _read_samples(path: Path) -> list:
    return [Sample.from_json(line) for line in path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="host")
    parser.add_argument("--predictor", default=None, help="folder of a saved predictor")
    parser.add_argument("--measure", type=int, default=10,
                        help="architectures per space to compile and time (0: none)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device-predictors", nargs="*", default=[],
                        help="predictor folders of other devices, for the device-specific "
                        "spaces section (e.g. from `hwaware predictor train --target x86-avx2`)")
    parser.add_argument("--keep", type=float, default=0.8)
    parser.add_argument("--accuracy-only", nargs="?", const="", metavar="FILE.jsonl",
                        help="only the table against every architecture already measured in "
                        "FILE.jsonl (default: bench/nas-<cpu>.jsonl; none of them is in the "
                        "predictor's data)")
    parser.add_argument("--between-sessions", type=Path, metavar="FILE.jsonl",
                        help="only time every stored architecture (--stored) again, into "
                        "FILE.jsonl (those already in it are read back), and report how far "
                        "its latency moved")
    parser.add_argument("--stored", type=Path, metavar="FILE.jsonl",
                        help="the timed architectures --between-sessions starts from "
                        "(default: bench/nas-<cpu>.jsonl)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    kind = cpu_kind()
    out = Path(args.out or Path(__file__).parent / f"nas-{kind}.md")
    timed = Path(__file__).parent / f"nas-{kind}.jsonl"  # architectures timed on this CPU kind
    if args.accuracy_only is not None:
        samples = _read_samples(Path(args.accuracy_only or timed))
        print(accuracy_of(args.predictor, args.target, samples))
        return
    if args.between_sessions:
        stored = _read_samples(args.stored or timed)
        print(between_sessions(args.predictor, args.target, stored, args.between_sessions))
        return
    table = LatencyTable(args.target, space="ofa-mbv3", predictor=args.predictor)
    sections = [f"# Architecture search on {kind} ({platform.processor() or platform.machine()}"
                f", predictor {table.predictor.key})\n\nCommand: `python bench/nas.py "
                f"{' '.join(sys.argv[1:])}`\n", table_speed(table)]
    text, result = search_figures(table)
    sections.append(text)
    measured: dict = {}
    if args.measure:
        data = out.with_suffix(".jsonl")
        sections.append(table_accuracy(args.predictor, args.measure, args.target, data))
        front = result.front[:: max(1, len(result.front) // 5)]
        samples = measure(table.space, [p.arch for p in front], data, args.target)
        for p, s in zip(front, samples, strict=True):
            if s is not None:
                measured[p.arch] = s.measured_us / 1e3
    if args.device_predictors:
        own = args.predictor or str(COST_MODELS_DIR / table.predictor.key)
        sections.append(device_spaces([own, *args.device_predictors], args.keep))
    plot_front(result, out.with_name(f"nas-pareto-{kind}.png"), None, measured)
    out.write_text("\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
