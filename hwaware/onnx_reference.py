"""The un-accelerated way to run an ONNX graph: ONNX's own reference evaluator (numpy).

Stage: 6 (run), for an ONNX model TVM could not import or build. Goes in: the serialized
(folded) ONNX graph, kept in the host program as a uint8 constant so that `save` and
`hwaware.load` carry it in `weights.pt` like any weight. Comes out: a host-program action that
feeds the kernel's input slots to `onnx.reference.ReferenceEvaluator` and writes its outputs back
as torch tensors. Correct, never fast: `onnx_import` warns once when a model ends up here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

IMPL = "onnx-reference"  # KernelSpec.impl of a kernel run this way


def model_constant(kernel: str) -> str:
    """The name of the program constant holding `kernel`'s serialized ONNX graph."""
    return f"{kernel}.onnx"


def as_constant(model_bytes: bytes) -> torch.Tensor:
    """Serialized ONNX graph -> the uint8 tensor stored among the program's constants."""
    return torch.frombuffer(bytearray(model_bytes), dtype=torch.uint8)


def reference_action(kernel: str, inputs: list[int], outputs: list[int],
                     constants: dict[str, torch.Tensor]) -> Callable[[list[Any]], None]:
    """A host-program action running `kernel`'s ONNX graph on its slots."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load_from_string(constants[model_constant(kernel)].numpy().tobytes())
    initializers = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in initializers]
    evaluator = ReferenceEvaluator(model)

    def action(slots: list[Any]) -> None:
        xs = [slots[i] for i in inputs]
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, xs, strict=True)}
        device = xs[0].device if xs else torch.device("cpu")
        for slot, value in zip(outputs, evaluator.run(None, feeds), strict=True):
            slots[slot] = torch.from_numpy(np.array(value)).to(device)

    return action
