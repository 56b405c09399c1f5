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


# An operator registered through `torch.library.Library` (how C++ extensions such as
# torchvision's `nms` register theirs), not `custom_op`: a saved program cannot name it.
_LIBRARY = torch.library.Library("hwaware_test_lib", "DEF")
_LIBRARY.define("clipped_square(Tensor x) -> Tensor")


def _clipped_square(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x * x, max=4.0)


_LIBRARY.impl("clipped_square", _clipped_square, "CompositeExplicitAutograd")
torch.library.register_fake("hwaware_test_lib::clipped_square", lambda x: torch.empty_like(x))
