"""Multi-objective architecture search: NSGA-II (pymoo) over (objective, latency on a device).

Goes in: a space, a target (its `LatencyTable`), an objective (`objectives.py`), a latency limit
and an evaluation budget. Each generation, pymoo's NSGA-II proposes encoded architectures
(integer genes: the choice index of each gene position); the table prices the whole generation
in one batched call; candidates over a hard limit (the latency limit, `max_params`) are
rejected before the objective ever runs on them (EEEA-Net) and count as infeasible by how far
they are over; the rest get the objective (cached per architecture: a survivor is never
evaluated twice).

Comes out: a `SearchResult`: the Pareto front (objective up, latency down) of the feasible
architectures, every evaluated point, and, written to `out_dir`, `front.csv`, `front.json`
(architectures ready for `space.build` -> `hwaware.compile`), `evaluated.jsonl` (the archive a
rerun resumes from: evaluated architectures are not evaluated again) and `pareto.png`. A limit
no architecture meets: the search says so and returns the fastest architecture it found, never
an empty front.

LINAS (DyNAS-T's outer loop), with `measure_every` = K: every K generations the front's
unmeasured members (a few, spread along it) are compiled and timed for real (`measure.py`),
stored in the database and `measured.jsonl`, and the table's predictor is refitted (the
database's measured kernels answer for themselves; from 3 measured models on, a correction
fitted to them); the archive is re-priced and the search goes on from its last population.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hwaware.nas.objectives import Objective, objective_of, params
from hwaware.nas.space import Arch, Space, get_space

log = logging.getLogger(__name__)
REJECTED = 1e12  # the objective of a candidate over a hard limit (never evaluated)


@dataclass
class Point:
    """One evaluated architecture."""

    arch: Arch
    objective: float
    latency_ms: float
    source: str
    params: int
    feasible: bool

    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, "objective": self.objective, "latency_ms": self.latency_ms,
                "source": self.source, "params": self.params, "feasible": self.feasible}


@dataclass
class SearchResult:
    """The front (feasible, non-dominated; or the fastest architecture when none is feasible)
    and everything evaluated."""

    space: Space
    objective: str
    front: list[Point]
    evaluated: list[Point]
    met_limit: bool
    measured: dict[Arch, float] = field(default_factory=dict)  # LINAS: measured ms
    files: dict[str, Path] = field(default_factory=dict)

    def build(self, index: int = 0) -> Any:
        """The `index`-th front architecture as a module, with its example inputs."""
        arch = self.front[index].arch
        return self.space.build(arch), self.space.example_inputs(arch)


class Archive:
    """Evaluated architectures by key, appended to `evaluated.jsonl` as they come (resume)."""

    def __init__(self, space: Space, path: Path | None):
        self.points: dict[Arch, Point] = {}
        self.path = path
        if path is not None and path.exists():
            for line in path.read_text().splitlines():
                doc = json.loads(line)
                point = Point(**{**doc, "arch": space.validate(doc["arch"])})
                self.points[point.arch] = point

    def add(self, point: Point) -> None:
        self.points[point.arch] = point
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(point.to_json(), sort_keys=True) + "\n")


class _Evaluator:
    """Prices a generation with the table and runs the objective on the feasible ones."""

    def __init__(self, space: Space, table: Any, objective: Objective, latency_ms: float | None,
                 max_params: int | None, archive: Archive):
        self.space, self.table, self.objective = space, table, objective
        self.latency_ms, self.max_params, self.archive = latency_ms, max_params, archive

    def __call__(self, encoded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Minimised objectives [-objective, latency] and constraint violations (<= 0 is ok)."""
        ms, sources = self.table.latency_ms_batch(encoded, return_source=True)
        f, g = np.zeros((len(encoded), 2)), np.zeros((len(encoded), 2))
        for i, row in enumerate(encoded):
            point = self._point(self.space.decode(row), float(ms[i]), str(sources[i]))
            f[i] = (-point.objective if point.feasible else REJECTED, point.latency_ms)
            g[i] = self._violations(point)
        return f, g

    def _point(self, arch: Arch, ms: float, source: str) -> Point:
        point = self.archive.points.get(arch)
        fresh = point is None
        if point is None:
            point = Point(arch, float("nan"), ms, source, params(self.space, arch), False)
        point.latency_ms, point.source = ms, source  # the table may have been refitted
        point.feasible = not any(v > 0 for v in self._violations(point))
        if point.feasible and math.isnan(point.objective):
            point.objective = float(self.objective(arch))  # rejected ones never get here
            fresh = True
        if fresh:
            self.archive.add(point)
        return point

    def refresh(self) -> None:
        """Every archived point re-priced by the table as it is now."""
        points = list(self.archive.points.values())
        if points:
            self(self.space.encode([p.arch for p in points]))

    def _violations(self, point: Point) -> tuple[float, float]:
        over_latency = point.latency_ms / self.latency_ms - 1 if self.latency_ms else -1.0
        over_params = point.params / self.max_params - 1 if self.max_params else -1.0
        return over_latency, over_params


def search(space: str | Space = "ofa-mbv3", target: Any = "host", *,
           objective: str | Objective = "params", latency_ms: float | None = None,
           max_params: int | None = None, evals: int = 1000, population: int = 50,
           seed: int = 0, db: Any = None, threads: int | None = None, table: Any = None,
           predictor: Any = None, out_dir: str | Path | None = None, progress: bool = False,
           measure_every: int | None = None, measure_top: int = 4) -> SearchResult:
    """NSGA-II over (objective, latency); see the module docstring. With `measure_every` = K,
    a LINAS loop: every K generations the front's `measure_top` unmeasured members are
    compiled and timed, stored, and the table's predictor refitted to them."""
    from hwaware.nas.table import LatencyTable

    chosen = space if isinstance(space, Space) else get_space(space)
    if evals < population:
        raise ValueError(f"evals ({evals}) must be at least the population ({population})")
    table = table or LatencyTable(target, db, space=chosen, threads=threads,
                                 predictor=predictor)
    name, function = objective_of(chosen, objective)
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    archive = Archive(chosen, out / "evaluated.jsonl" if out else None)
    evaluate = _Evaluator(chosen, table, function, latency_ms, max_params, archive)
    start = _start(chosen, archive, population)
    linas = None
    if measure_every is None:
        _run(chosen, evaluate, population, start, ("n_evals", evals), seed, progress)
    else:
        linas = Linas(chosen, table, target, threads, db, out, measure_top)
        generations = math.ceil(evals / population)  # the budget plain NSGA-II would get
        for segment in range(math.ceil(generations / measure_every)):
            seen = len(archive.points)
            start = _run(chosen, evaluate, population, start, ("n_gen", measure_every),
                         seed + segment, progress)
            linas.step(pareto_front(list(archive.points.values())))
            evaluate.refresh()
            if len(archive.points) >= evals or len(archive.points) == seen:
                break  # the budget is spent, or the search found nothing new (a small space)
    return _result(chosen, (name, function), list(archive.points.values()), latency_ms, out,
                   linas.measured if linas else {})


def _run(space: Space, evaluate: _Evaluator, population: int, start: Any,
         termination: tuple[str, int], seed: int, progress: bool) -> np.ndarray:
    """One NSGA-II run from `start`; returns its last population (encoded)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.optimize import minimize

    class _Problem(Problem):
        def __init__(self) -> None:
            upper = [len(g.choices) - 1 for g in space.genes]
            super().__init__(n_var=len(upper), n_obj=2, n_ieq_constr=2, xl=0, xu=upper,
                             vtype=int)

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kw: Any) -> None:
            out["F"], out["G"] = evaluate(np.asarray(x, dtype=np.int64))

    algorithm = NSGA2(pop_size=population, sampling=start,
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
                      eliminate_duplicates=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = minimize(_Problem(), algorithm, termination, seed=seed, verbose=progress)
    return np.asarray(res.pop.get("X"), dtype=float)


class Linas:
    """The LINAS outer loop (DyNAS-T): measure the front for real, refit, go on."""

    def __init__(self, space: Space, table: Any, target: Any, threads: int | None, db: Any,
                 out: Path | None, top: int):
        from hwaware.db import open_db

        self.space, self.table, self.top = space, table, top
        self.target, self.threads, self.db = target, threads, open_db(db)
        self.file = (out or Path(tempfile.mkdtemp(prefix="hwaware-linas-"))) / "measured.jsonl"
        self.base = table.predictor
        self.samples: list[Any] = []
        self.measured: dict[Arch, float] = {}

    def step(self, front: list[Point]) -> None:
        from hwaware.nas.measure import measure

        todo = [p.arch for p in front if p.arch not in self.measured]
        chosen = todo[:: max(1, len(todo) // self.top)][: self.top]
        if not chosen:
            return
        samples = measure(self.space, chosen, self.file, self.target, self.threads, self.db)
        for arch, sample in zip(chosen, samples, strict=True):
            if sample is not None:
                self.samples.append(sample)
                self.measured[arch] = sample.measured_us / 1e3
        self.table.use(self._refitted())
        log.info("LINAS: %d architectures measured; predictor refitted", len(self.samples))

    def _refitted(self) -> Any:
        """The base predictor with this session's database (its measured kernels now answer
        for themselves) and, from 3 measured models on, a correction fitted to them."""
        from hwaware.predict.features import Device
        from hwaware.target import get_target

        base = self.base
        device = Device.of(get_target(self.target), self.threads)
        if len([s for s in self.samples if s.device["key"] == device.key]) >= 3:
            base = base.adapt(self.samples, device)
        return base.with_db(self.db or base.db)


def _start(space: Space, archive: Archive, population: int) -> Any:
    """The first population: random, or the best of a resumed run's archive."""
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    if not archive.points:
        return IntegerRandomSampling()
    points = sorted(archive.points.values(), key=lambda p: (not p.feasible, -p.objective
                                                            if p.feasible else p.latency_ms))
    return space.encode([p.arch for p in points[:population]]).astype(float)


def pareto_front(points: list[Point]) -> list[Point]:
    """The non-dominated feasible points (objective higher, latency lower), by latency."""
    feasible = sorted((p for p in points if p.feasible), key=lambda p: (p.latency_ms,
                                                                        -p.objective))
    front, best = [], -np.inf
    for p in feasible:
        if p.objective > best:
            front.append(p)
            best = p.objective
    return front


def _result(space: Space, objective: tuple[str, Objective], points: list[Point],
            latency_ms: float | None, out: Path | None, measured: dict[Arch, float]
            ) -> SearchResult:
    name, function = objective
    front = pareto_front(points)
    met = bool(front)
    if not met:
        fastest = min(points, key=lambda p: p.latency_ms)
        warnings.warn(f"hwaware: no architecture of {space.name} met the limits (latency "
                      f"{latency_ms} ms); the fastest found runs in {fastest.latency_ms:.3f} "
                      f"ms and is returned instead", stacklevel=3)
        fastest.objective = float(function(fastest.arch))
        front = [fastest]
    result = SearchResult(space, name, front, points, met, measured)
    if out is not None:
        result.files = write_outputs(result, out, latency_ms)
    return result


def write_outputs(result: SearchResult, out: Path, latency_ms: float | None) -> dict[str, Path]:
    """front.csv, front.json and pareto.png in `out`."""
    files = {"csv": out / "front.csv", "json": out / "front.json", "png": out / "pareto.png"}
    with files["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "latency_ms", result.objective, "params", "source", "arch"])
        for i, p in enumerate(result.front):
            writer.writerow([i, f"{p.latency_ms:.4f}", p.objective, p.params, p.source,
                             json.dumps(p.arch, sort_keys=True)])
    files["json"].write_text(json.dumps(
        {"space": result.space.name, "objective": result.objective, "latency_limit_ms":
         latency_ms, "met_limit": result.met_limit,
         "front": [p.to_json() for p in result.front]}, indent=1, sort_keys=True))
    plot_front(result, files["png"], latency_ms, result.measured)
    return files


def plot_front(result: SearchResult, path: Path, latency_ms: float | None,
               measured: Mapping[Arch, float] | None = None) -> None:
    """Latency vs objective: every evaluated point, the front, the limit and any measured
    latencies (predicted -> measured arrows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    feasible = [p for p in result.evaluated if p.feasible]
    ax.scatter([p.latency_ms for p in feasible], [p.objective for p in feasible], s=6,
               c="0.7", label=f"evaluated ({len(feasible)} feasible)")
    ax.plot([p.latency_ms for p in result.front], [p.objective for p in result.front], "o-",
            c="tab:blue", ms=4, label="Pareto front (predicted latency)")
    for arch, ms in (measured or {}).items():
        point = next((p for p in result.evaluated if p.arch == arch), None)
        if point is not None:
            ax.annotate("", (ms, point.objective), (point.latency_ms, point.objective),
                        arrowprops={"arrowstyle": "->", "color": "tab:red"})
            ax.plot([ms], [point.objective], "x", c="tab:red")
    if latency_ms:
        ax.axvline(latency_ms, ls="--", c="tab:red", lw=1, label=f"limit {latency_ms} ms")
    ax.set_xlabel("latency on the device, ms (hwaware-compiled)")
    ax.set_ylabel(result.objective)
    ax.set_title(f"{result.space.name}: {result.objective} vs latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
