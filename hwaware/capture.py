"""Stage 1, capture: a PyTorch model (or a Dynamo FX graph) -> one static ATen FX graph.

Goes in: an `nn.Module` with example inputs, or the `GraphModule` + example inputs Dynamo hands a
backend. Comes out: a `Captured` graph whose nodes call ATen ops (`torch.ops.aten.*`), whose
weights are `get_attr` constants, and whose every value carries its shape and dtype in
`node.meta["val"]`, plus the input signature that calls are checked against.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from hwaware.outputs import make_serializable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one graph input; calls are checked against it."""

    shape: tuple[int, ...]
    dtype: str

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(int(s) for s in t.shape), str(t.dtype).removeprefix("torch."))

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass
class Captured:
    """A captured model: an ATen graph with constant weights, and its calling convention."""

    graph_module: fx.GraphModule
    input_specs: list[TensorSpec]
    out_spec: pytree.TreeSpec
    name: str
    example_inputs: list[torch.Tensor]


class CaptureError(RuntimeError):
    """The model could not be captured as a static graph."""


def capture(model: torch.nn.Module, example_inputs: tuple[Any, ...], name: str = "") -> Captured:
    """Export `model` on `example_inputs` to a static ATen graph with weights as constants."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    flat_inputs = [x for x in pytree.tree_leaves(example_inputs)]
    bad = [type(x).__name__ for x in flat_inputs if not isinstance(x, torch.Tensor)]
    if bad:
        raise TypeError(f"example inputs must be tensors, got {', '.join(bad)}")
    modes = {m: m.training for m in model.modules()}  # each one: a wrapper (a dynamic
    model.eval()                                       # region) may differ from what it wraps
    try:
        with torch.no_grad(), _export_friendly_libraries():
            exported = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as err:  # torch raises many types; name the model and the cause
        raise CaptureError(
            f"could not capture {name or type(model).__name__} as a static graph: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    finally:
        for module, training in modes.items():
            module.training = training
    gm = exported.module()
    make_serializable(exported.call_spec.out_spec)
    _drop_guards(gm)
    _require_tensor_outputs(gm, name or type(model).__name__)
    return Captured(
        graph_module=gm,
        input_specs=[TensorSpec.of(t) for t in flat_inputs],
        out_spec=exported.call_spec.out_spec,
        name=name or type(model).__name__,
        example_inputs=[t.detach() for t in flat_inputs],
    )


@contextlib.contextmanager
def _export_friendly_libraries() -> Iterator[None]:
    """Library settings that only pick between equal code paths, set so the path taken can be
    exported. PyTorch Geometric's RGCNConv, with `backend.use_segment_matmul` left at None,
    reads `int(segment_count.max())` to pick pyg-lib's segment matmul, a data-dependent guard
    torch.export refuses; without pyg-lib (`typing.WITH_SEGMM` false) both choices run the same
    per-relation loop, so the choice is fixed to that loop while exporting."""
    pyg = sys.modules.get("torch_geometric")
    if pyg is None or pyg.typing.WITH_SEGMM or pyg.backend.use_segment_matmul is not None:
        yield
        return
    pyg.backend.use_segment_matmul = False
    try:
        yield
    finally:
        pyg.backend.use_segment_matmul = None


def _require_tensor_outputs(gm: fx.GraphModule, name: str) -> None:
    """A static graph returns tensors; a Python value it returns (a bool, None) would be baked
    in as a constant of this capture."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for leaf in pytree.tree_leaves(output.args[0]):
        if not isinstance(leaf, fx.Node):
            raise CaptureError(f"could not capture {name} as a static graph: it returns "
                               f"{type(leaf).__name__} {leaf!r}, not a tensor")


def capture_dynamo_graph(
    gm: fx.GraphModule, example_inputs: list[Any]
) -> tuple[Captured, list[int]]:
    """Capture the graph Dynamo gives a backend. Parameters that Dynamo passes as inputs are
    frozen into constants (as Inductor's freezing does), and plain int inputs (the concrete
    values of a dynamic graph's symbolic sizes) become constants of this static graph; returns
    the kept input positions. Frozen values belong to THIS call: Dynamo calls one graph with
    other parameters too (a ModuleList of identical blocks behind a graph break), so the
    caller must check `frozen_positions` on every call (`backend.GraphVariants` does)."""
    frozen, kept = _freeze_parameter_inputs(gm, example_inputs)
    inputs = tuple(example_inputs[i] for i in kept)
    return capture(frozen, inputs, name="dynamo_graph"), kept


def frozen_positions(gm: fx.GraphModule, example_inputs: list[Any]) -> list[int]:
    """The input positions `capture_dynamo_graph` freezes into constants: module parameters and
    buffers (tensors) and plain ints."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True))
            if type(value) is int or _is_frozen_tensor(node.name, value)]


def _freeze_parameter_inputs(
    gm: fx.GraphModule, example_inputs: list[Any]
) -> tuple[fx.GraphModule, list[int]]:
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # Dynamo still needs the original
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    kept: list[int] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True)):
        if type(value) is int:
            _bind_constant(gm.graph, node, value)
        elif _is_frozen_tensor(node.name, value):
            attr = f"_frozen_{i}"
            gm.register_buffer(attr, value.detach())
            with gm.graph.inserting_before(node):
                const = gm.graph.get_attr(attr)
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
        else:
            kept.append(i)
    gm.recompile()
    return gm, kept


def _bind_constant(graph: fx.Graph, placeholder: fx.Node, value: int) -> None:
    """Replace every use of `placeholder` by the literal `value`, then drop it."""

    def bound(arg: fx.Node) -> Any:
        return value if arg is placeholder else arg

    for user in list(placeholder.users):
        user.args = fx.node.map_arg(user.args, bound)
        user.kwargs = fx.node.map_arg(user.kwargs, bound)
    graph.erase_node(placeholder)


def _is_frozen_tensor(name: str, value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or _is_module_state(name, value)


def _is_module_state(name: str, value: Any) -> bool:
    """Dynamo names inputs that are module parameters/buffers `L_self_...` (inlined modules)."""
    lowered = name.lower()
    return isinstance(value, torch.Tensor) and (
        lowered.startswith("l_self_") or "_modules_" in lowered and "_buffers_" in lowered
    )


def _drop_guards(gm: fx.GraphModule) -> None:
    """Remove export's input-guard call: hwaware checks inputs itself, with its own message."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
