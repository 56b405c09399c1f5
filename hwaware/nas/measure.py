"""Real measurements of a space's architectures: compile with hwaware and time on this machine.

Goes in: a space, architectures, a target and thread count, optionally a tuning database and
a JSONL file. Each architecture goes through the latency predictor's profiler
(`hwaware.predict.profile`: capture -> rewrite -> partition -> build -> time the whole model
twice and each built kernel), so a searched architecture's measurement is stored exactly like
the predictor's training data (kernel and model measurements in the database, a `Sample` line in
the file) and can train or adapt it. Comes out: the `Sample`s, in the order given.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hwaware.nas.space import Arch, Space


@dataclass(frozen=True)
class SpaceArchitecture:
    """An architecture of a search space in the form the profiler measures."""

    space: Space
    arch: Arch

    @property
    def id(self) -> str:
        text = json.dumps(self.arch, sort_keys=True)
        return f"nas-{self.space.name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"

    def build(self) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        return self.space.build(self.arch), self.space.example_inputs(self.arch)

    def to_json(self) -> dict[str, Any]:
        return {"space": f"nas:{self.space.name}", "config": self.arch.to_dict()}


def measure(space: Space, archs: Sequence[Mapping[str, Any]], out: Path, target: Any = "host",
            threads: int | None = None, db: Any = None, repeats: int = 60) -> list[Any | None]:
    """Samples of `archs` (measured now, or read back from `out` where measured before), in
    order; None for an architecture whose build or run failed (the profiler logs why)."""
    from hwaware.predict.features import Device
    from hwaware.predict.profile import profile, read_samples
    from hwaware.target import get_target

    tgt = get_target(target)
    device = Device.of(tgt, threads)
    wanted = [SpaceArchitecture(space, space.validate(a)) for a in archs]
    profile(wanted, tgt, device, db, out, split="nas", repeats=repeats, show_progress=False)
    by_id = {s.id: s for s in read_samples([out], device.key)}
    return [by_id.get(a.id) for a in wanted]
