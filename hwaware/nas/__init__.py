"""Hardware-aware architecture search: search spaces as data, latency lookup for NAS loops, and
multi-objective search (NSGA-II) over (objective, latency on a device as hwaware compiles it).

- `get_space(name)` (`space.py`, data in `spaces/`, builders in `builders.py`);
- `LatencyTable(target, db=...)` (`table.py`): an architecture's latency from its blocks'
  kernels, measured where the database has them and predicted otherwise;
- `search(...)` (`evolve.py`): NSGA-II from pymoo, with hard limits and the outputs.
"""

from hwaware.nas.space import Arch, Space, SpaceError, get_space, space_names

__all__ = ["Arch", "Space", "SpaceError", "get_space", "space_names", "LatencyTable", "search"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "LatencyTable":
        from hwaware.nas.table import LatencyTable

        return LatencyTable
    if name == "search":
        from hwaware.nas.evolve import search

        return search
    raise AttributeError(name)
