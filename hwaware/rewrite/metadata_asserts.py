"""Metadata assertions that the traced graph already satisfies are removed.

torch.export leaves `aten._assert_tensor_metadata` next to the tensors whose dtype (and device,
layout, sizes) a model states, as Hugging Face's Llama does with `.to(dtype)` on its rotary
embeddings: 17 of them in a two-layer Llama. They have no value and nothing uses them, but each
was a host op run in PyTorch on every call, and any host op keeps the whole model from running
as one TVM call. In a compiled program every tensor's metadata is fixed by the input specs,
which the runtime checks on each call, so an assertion that held when the graph was traced
holds on every call. Kept: one whose stated metadata differs from the traced tensor's (it
would fail; PyTorch raises when it runs) or that cannot be checked here.
"""

from __future__ import annotations

import torch
from torch import fx

ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default


def drop_metadata_asserts(gm: fx.GraphModule) -> int:
    """Remove every metadata assertion the traced tensors satisfy. Returns the count."""
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is ASSERT_METADATA and not node.users \
                and _holds(node):
            gm.graph.erase_node(node)
            dropped += 1
    return dropped


def _holds(node: fx.Node) -> bool:
    """Whether the traced tensor has the metadata the assertion states."""
    tensor = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) \
        else None
    if not isinstance(tensor, torch.Tensor):
        return False
    stated = dict(zip(("size", "stride", "dtype"), node.args[1:], strict=False)) | node.kwargs
    actual = {"size": list(tensor.shape), "stride": list(tensor.stride()), "dtype": tensor.dtype,
              "device": tensor.device, "layout": tensor.layout}
    return all(value is None or _same(value, actual[name]) for name, value in stated.items()
               if name in actual)


def _same(stated: object, actual: object) -> bool:
    if isinstance(stated, (list, tuple)):
        return [int(s) for s in stated] == list(actual)  # type: ignore[call-overload]
    if isinstance(stated, (str, torch.device)) and isinstance(actual, torch.device):
        return torch.device(stated) == actual
    return stated == actual
