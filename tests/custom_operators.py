"""A custom operator defined the way third-party libraries define theirs (Hugging Face's MoE
`transformers::grouped_mm_fallback`): `torch.library.custom_op` with a fake implementation, in a
module of its own, which a process must import before the operator exists."""

from __future__ import annotations

import torch


@torch.library.custom_op("hwaware_test::running_max", mutates_args=())
def running_max(x: torch.Tensor) -> torch.Tensor:
    """The running maximum along the last dimension (an op TVM's importer does not know)."""
    return torch.cummax(x, dim=-1).values


@running_max.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
