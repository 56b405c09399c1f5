"""Where a tuning session's time goes: MetaSchedule's profiler scopes summed into phases.

Goes in: the body of a tuning run, inside `with phase_times() as phases:`. Comes out: `phases`,
filled in when the block ends with seconds per phase: `search` (evolutionary search: sampling,
mutation, cost-model scoring), `build` (compiling candidates), `run` (sending candidates to the
runner and waiting for it), `cost_model` (refitting XGBoost on new results) and `database`
(hwaware's commit callback). What no MetaSchedule scope covers (Python-side glue, the runner's
results being collected) is not in any phase; the caller reports it as the remainder.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tvm.s_tir import meta_schedule as ms

# phase -> the profiler scope names (exact, or a prefix ending in "/") that make it up
PHASE_SCOPES: dict[str, tuple[str, ...]] = {
    "search": ("EvoSearch/", "InitializeTask"),
    "build": ("SendToBuilder",),
    "run": ("SendToRunner", "JoinRunnerFutures"),
    "cost_model": ("MeasureCallback/UpdateCostModel",),
    "database": ("MeasureCallback/PyMeasureCallback",),
}


def phase_of(scope: str) -> str | None:
    """The phase a profiler scope belongs to, or None (e.g. "Total")."""
    for phase, names in PHASE_SCOPES.items():
        for name in names:
            if scope == name or (name.endswith("/") and scope.startswith(name)):
                return phase
    return None


def sum_phases(scopes: dict[str, float]) -> dict[str, float]:
    """Seconds per phase from MetaSchedule's profiler totals (nested scopes counted once)."""
    out = dict.fromkeys(PHASE_SCOPES, 0.0)
    for scope, secs in scopes.items():
        phase = phase_of(scope)
        nested = any(scope.startswith(other + "/") for other in scopes if other != scope)
        if phase is not None and not nested:
            out[phase] += float(secs)
    return out


@contextmanager
def phase_times() -> Iterator[dict[str, float]]:
    """Profile the block with MetaSchedule's profiler; the yielded dict gets the phases."""
    phases: dict[str, float] = {}
    with ms.Profiler() as profiler:
        yield phases
    phases.update(sum_phases({str(k): float(v) for k, v in profiler.get().items()}))
