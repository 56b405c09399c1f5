"""Constant folding of an ONNX graph for the static input shapes hwaware compiles it for.

Stage: the first step of the ONNX frontend, before TVM imports the graph. Goes in: a ModelProto
and the static shape of each graph input. Comes out: an equivalent ModelProto in which every
node whose inputs are all known has become an initializer.

Known means: an initializer, the output of a `Constant`, the output of an already folded node,
or `Shape`/`Size` of a tensor whose shape shape inference proved fully static. Exporters compute
shapes at run time (Shape -> Gather -> Concat -> Expand chains); with static input shapes those
chains are constants, and folding them spares TVM's importer its dynamic-shape paths, some of
which are wrong (its `Expand` ignores ONNX's right-aligned broadcasting for a run-time shape).

Nodes are evaluated with `onnx.reference.ReferenceEvaluator`. Bounded: a node whose result would
exceed `MAX_FOLD_BYTES` stays in the graph, and random or stateful ops, ops with subgraphs and
ops of other domains are never folded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger(__name__)

MAX_FOLD_BYTES = 16 << 20
MAX_FOLD_ROUNDS = 64  # folding and shape inference rounds (it stops when a round folds nothing)
NEVER_FOLD = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout",  # Dropout: training mode and its mask output
})
Shapes = dict[str, tuple[int, ...]]
# tensor name -> value: an initializer as stored (decoded only when a node reads it), or a
# folded result
Known = dict[str, "onnx.TensorProto | np.ndarray"]


def fold_constants(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]
                   ) -> onnx.ModelProto:
    """`model` with every foldable node replaced by an initializer (a new model; the argument
    is not changed). The result has its value infos inferred again. Folding and shape inference
    alternate until nothing more folds: a shape that becomes static only once an earlier
    computed shape is folded (Phi-3's second layer slices a projection by a size computed from
    the first) needs another round."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    _set_input_shapes(folded.graph, input_shapes)
    folded = _infer(folded)
    for _ in range(MAX_FOLD_ROUNDS):
        before = len(folded.graph.node)
        folded = _infer(_fold_once(folded))
        if len(folded.graph.node) == before:
            break
    n_folded = len(model.graph.node) - len(folded.graph.node)
    log.debug("folded %d of %d ONNX nodes into constants", n_folded, len(model.graph.node))
    return folded


def _fold_once(folded: onnx.ModelProto) -> onnx.ModelProto:
    """One pass over the nodes in order, folding each whose inputs are known (in place)."""
    known: Known = {t.name: t for t in folded.graph.initializer}
    shapes = _static_shapes(folded.graph)
    opsets = {o.domain or "": o.version for o in folded.opset_import}
    outputs = {o.name for o in folded.graph.output}
    kept: list[onnx.NodeProto] = []
    for node in folded.graph.node:
        values = None if outputs & set(node.output) else _fold_node(node, known, shapes, opsets)
        if values is None:
            kept.append(node)
        else:
            known.update(zip(node.output, values, strict=True))
    _rewrite_graph(folded.graph, kept, known)
    return folded


def _set_input_shapes(graph: onnx.GraphProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    for vi in graph.input:
        if vi.name in input_shapes and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for size in input_shapes[vi.name]:
                dims.add().dim_value = int(size)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference, or the model as it is where ONNX's inference gives up on it."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # inference raises several error types on odd graphs
        log.debug("ONNX shape inference failed: %s", err)
        return model


def _static_shapes(graph: onnx.GraphProto) -> Shapes:
    """Tensor name -> shape, for every tensor whose shape inference found fully static."""
    shapes: Shapes = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tensor_type.HasField("shape") and all(
                d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[vi.name] = tuple(int(d.dim_value) for d in tensor_type.shape.dim)
    return shapes


def _fold_node(node: onnx.NodeProto, known: Known, shapes: Shapes,
               opsets: dict[str, int]) -> list[np.ndarray] | None:
    """The node's output values when they can be computed now and are small enough, else None."""
    if node.domain not in ("", "ai.onnx") or node.op_type in NEVER_FOLD or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute):
        return None
    if node.op_type in ("Shape", "Size") and node.input[0] not in known:
        shape = shapes.get(node.input[0])
        return None if shape is None else [_shape_value(node, shape)]
    if not all(name in known for name in node.input if name) or _too_big(node, shapes):
        return None
    try:
        values = _evaluate(node, opsets, known)
    except Exception as err:  # an op the reference evaluator lacks, or rejects: leave it
        log.debug("not folding %s (%s): %s", node.name, node.op_type, err)
        return None
    if sum(np.asarray(v).nbytes for v in values) > MAX_FOLD_BYTES:
        return None
    return [np.asarray(v) for v in values]


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """What `Shape` (with its start/end attributes) or `Size` returns for a tensor of `shape`."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)


def _too_big(node: onnx.NodeProto, shapes: Shapes) -> bool:
    """Whether an output inference sized statically would exceed the folding limit (checked
    before evaluating, so that a huge ConstantOfShape is never materialized; 8 bytes an
    element, the widest numeric type)."""
    return any(name in shapes and int(np.prod(shapes[name])) * 8 > MAX_FOLD_BYTES
               for name in node.output)


def _evaluate(node: onnx.NodeProto, opsets: dict[str, int], known: Known
              ) -> list[np.ndarray]:
    """Run one node with `onnx.reference.ReferenceEvaluator` on known numpy values."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(node, opsets=opsets)
    return list(evaluator.run(None, {name: _array(known[name]) for name in node.input if name}))


def _array(value: onnx.TensorProto | np.ndarray) -> np.ndarray:
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _rewrite_graph(graph: onnx.GraphProto, kept: list[onnx.NodeProto], known: Known) -> None:
    """Keep the live nodes of `kept`; the constants they (or the graph outputs) read become
    initializers; value infos of folded tensors are dropped (inference finds them again)."""
    live = _live_nodes(graph, kept)
    used = {name for node in live for name in _reads(node)} | {o.name for o in graph.output}
    initializers = [_tensor(known[name], name) for name in sorted(used & set(known))]
    del graph.node[:]
    graph.node.extend(live)
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [vi for vi in graph.input if vi.name not in known or vi.name in used]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.value_info[:]


def _tensor(value: onnx.TensorProto | np.ndarray, name: str) -> onnx.TensorProto:
    return value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(value, name)


def _live_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on, in their original order."""
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(nodes):
        if needed & set(node.output):
            live.append(node)
            needed.update(_reads(node))
    return live[::-1]


def _reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads: its inputs, and the outer names its subgraphs use."""
    names = set(node.input)
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            names.update(name for inner in graph.node for name in _reads(inner))
    return names
