"""Objectives the search maximises beside latency: a user callable, `params`, or `synflow`.

- a callable `f(arch) -> float` (higher is better): the real use, a supernet's evaluation of
  the architecture (OFA's accuracy predictor, a validation run);
- `params`: parameter count (capacity), summed from the blocks' own counts (each block is
  built once, so a 1,000-evaluation search does not build 1,000 models);
- `synflow` (Tanaka et al., NeurIPS 2020): a training-free, data-free proxy of trainability,
  log of the sum over parameters of |theta * dR/dtheta| for R the output sum of the network
  with |weights| on an all-ones input, in float64 (the built-in demo's accuracy stand-in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch

from hwaware.nas.builders import Block
from hwaware.nas.space import Space

Objective = Callable[[Mapping[str, Any]], float]
BUILT_IN = ("params", "synflow")


def objective_of(space: Space, spec: str | Objective) -> tuple[str, Objective]:
    """(name, function) of a built-in objective's name or a user callable."""
    if callable(spec):
        return getattr(spec, "__name__", "objective"), spec
    if spec == "params":
        return "params", lambda arch: float(params(space, arch))
    if spec == "synflow":
        return "synflow", lambda arch: synflow(space, arch)
    raise ValueError(f"unknown objective {spec!r}; built in: {', '.join(BUILT_IN)} "
                     f"(or pass a callable arch -> float from Python)")


def params(space: Space, arch: Mapping[str, Any]) -> int:
    """Parameter count of `space.build(arch)`, from its blocks'."""
    return sum(_block_params(space, b) for b in space.blocks(arch) if b is not None)


def _block_params(space: Space, block: Block) -> int:
    return _params_cache(space.builder, block)


@lru_cache(maxsize=100_000)
def _params_cache(builder: Any, block: Block) -> int:
    return sum(p.numel() for p in builder.module(block).parameters())


def synflow(space: Space, arch: Mapping[str, Any]) -> float:
    """log10 of the SynFlow score of the architecture (see the module docstring)."""
    model = space.build(arch).double()
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    inputs = [torch.ones_like(x, dtype=torch.float64) if x.is_floating_point() else x
              for x in space.example_inputs(arch)]
    model(*inputs).sum().backward()
    score = sum(float((p * p.grad).abs().sum()) for p in model.parameters()
                if p.grad is not None)
    return math.log10(score) if score > 0 else float("-inf")
