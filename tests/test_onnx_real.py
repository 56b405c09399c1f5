"""ONNX frontend on real exports: constants are folded before TVM imports a graph (tiny Hugging
Face transformers compile on TVM), and a graph TVM cannot import still runs, correctly, on ONNX's
reference evaluator, with one warning, and saves and loads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnx import helper as oh
from onnx.reference import ReferenceEvaluator

import hwaware
from hwaware import onnx_import, onnx_reference
from hwaware.onnx_fold import fold_constants
from hwaware.onnx_import import TvmUnsupportedError

RTOL, ATOL = 1e-3, 1e-4


def make_model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]],
               outputs: dict[str, list[int]], initializers: dict[str, np.ndarray]
               ) -> onnx.ModelProto:
    """A float32 ONNX model (opset 17) from nodes, input/output shapes and initializers."""
    def infos(shapes: dict[str, list[int]]) -> list[onnx.ValueInfoProto]:
        return [oh.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]

    graph = oh.make_graph(nodes, "g", infos(inputs), infos(outputs),
                          [numpy_helper.from_array(v, n) for n, v in initializers.items()])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def shape_chain_model() -> onnx.ModelProto:
    """y = x + expand(b, [x.shape[2]]): the target shape computed at run time, with fewer dims
    than b (ONNX broadcasts it right-aligned; TVM's dynamic Expand does not)."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Gather", ["s", "idx"], ["last"], axis=0),
        oh.make_node("Concat", ["last"], ["target"], axis=0),
        oh.make_node("Expand", ["b", "target"], ["bb"]),
        oh.make_node("Add", ["x", "bb"], ["y"]),
    ]
    return make_model(nodes, {"x": [2, 3, 4]}, {"y": [2, 3, 4]},
                      {"idx": np.array([2], np.int64), "b": np.array([[1.5]], np.float32)})


def two_round_chain_model() -> onnx.ModelProto:
    """y = h[:h.shape[0] // 2] where h = x + expand(b, where(keep, x.shape, [4, 1])) and x is
    1 x 6: shape inference cannot see through the `Where`, so h's first dim is known only once
    the first chain is folded, and the slice's end folds in a second round (Phi-3's torchscript
    export: its causal mask's `Expand` takes a `Where`-computed shape)."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Where", ["keep", "s", "rows"], ["target"]),
        oh.make_node("Expand", ["b", "target"], ["e"]),
        oh.make_node("Add", ["x", "e"], ["h"]),
        oh.make_node("Shape", ["h"], ["s2"]),
        oh.make_node("Gather", ["s2", "axis"], ["height"], axis=0),
        oh.make_node("Div", ["height", "two"], ["half"]),
        oh.make_node("Slice", ["h", "axis", "half", "axis"], ["y"]),
    ]
    ints = {"axis": [0], "two": [2], "rows": [4, 1]}
    constants: dict[str, np.ndarray] = {k: np.array(v, np.int64) for k, v in ints.items()}
    constants |= {"keep": np.array([False, True]), "b": np.arange(6, dtype=np.float32)[None]}
    return make_model(nodes, {"x": [1, 6]}, {"y": [2, 6]}, constants)


def det_model() -> onnx.ModelProto:
    """y = det(x) * w: `Det` is an op TVM 0.27's ONNX importer lacks."""
    nodes = [oh.make_node("Det", ["x"], ["d"]), oh.make_node("Mul", ["d", "w"], ["y"])]
    return make_model(nodes, {"x": [2, 3, 3]}, {"y": [2]},
                      {"w": np.array([2.0, -0.5], np.float32)})


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def reference(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ReferenceEvaluator(model).run(None, {"x": x.numpy()})[0])


# ------------------------------------------------------------------------- folding
def test_shape_chain_folds_to_a_constant() -> None:
    model = shape_chain_model()
    folded = fold_constants(model, {"x": (2, 3, 4)})
    assert [n.op_type for n in folded.graph.node] == ["Add"]
    constants = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert set(constants) == {"bb"} and constants["bb"].shape == (1, 4)
    assert [vi.name for vi in folded.graph.input] == ["x"]
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(reference(folded, x), reference(model, x))
    assert len(model.graph.node) == 5  # the argument is left as it was


def test_shapes_known_only_after_a_fold_fold_in_later_rounds(tmp_path: Path) -> None:
    model = two_round_chain_model()
    folded = fold_constants(model, {"x": (1, 6)})
    assert [n.op_type for n in folded.graph.node] == ["Add", "Slice"]
    compiled = hwaware.compile(save(model, tmp_path / "chain2.onnx"), db=None)
    assert compiled.program.kernels[onnx_import.KERNEL_NAME].impl == "tvm"
    x = torch.randn(1, 6)
    torch.testing.assert_close(compiled(x), reference(model, x))


def test_folding_is_bounded_and_skips_random_ops() -> None:
    nodes = [
        oh.make_node("ConstantOfShape", ["big_shape"], ["big"]),  # 36 MB of float32
        oh.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        oh.make_node("RandomNormalLike", ["x"], ["noise"]),
        oh.make_node("Mul", ["noise", "total"], ["scaled"]),
        oh.make_node("Add", ["x", "scaled"], ["y"]),
    ]
    model = make_model(nodes, {"x": [2]}, {"y": [2]},
                       {"big_shape": np.array([3000, 3000], np.int64)})
    folded = fold_constants(model, {"x": (2,)})
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in nodes]


def test_unfolded_chain_fails_in_tvm_naming_the_op(tmp_path: Path) -> None:
    """Without folding, TVM's importer fails on the chain; the error names the op."""
    path = save(shape_chain_model(), tmp_path / "chain.onnx")
    graph = onnx_import.read_onnx(path)
    graph.model = shape_chain_model()  # undo the folding
    with pytest.raises(TvmUnsupportedError, match=r"failed on op Expand.*broadcast_to"):
        onnx_import.import_graph(graph, hwaware.get_target("host"))


def test_shape_chain_compiles_on_tvm(tmp_path: Path) -> None:
    compiled = hwaware.compile(save(shape_chain_model(), tmp_path / "chain.onnx"), db=None)
    assert compiled.program.kernels[onnx_import.KERNEL_NAME].impl == "tvm"
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(compiled(x), reference(shape_chain_model(), x))


# ------------------------------------------------------------------------ fallback
def test_op_tvm_lacks_runs_on_the_reference_evaluator(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = save(det_model(), tmp_path / "det.onnx")
    with caplog.at_level(logging.WARNING, logger="hwaware"):
        compiled = hwaware.compile(path, target="host", db=None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "op Det" in warnings[0] and "OpNotImplemented" in warnings[0]
    assert "un-accelerated" in warnings[0] and str(path) in warnings[0]
    assert compiled.program.kernels[onnx_import.KERNEL_NAME].impl == onnx_reference.IMPL

    x = torch.randn(2, 3, 3)
    expected = torch.linalg.det(x) * torch.tensor([2.0, -0.5])
    torch.testing.assert_close(compiled(x), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(compiled(x), reference(det_model(), x))

    out_dir = compiled.save(tmp_path / "saved")
    assert not (out_dir / "kernels.so").exists()
    loaded = hwaware.load(out_dir)
    assert loaded.program.kernels[onnx_import.KERNEL_NAME].impl == onnx_reference.IMPL
    torch.testing.assert_close(loaded(x), expected, rtol=RTOL, atol=ATOL)


def test_tuning_a_graph_tvm_lacks_raises(tmp_path: Path) -> None:
    path = save(det_model(), tmp_path / "det.onnx")
    with pytest.raises(TvmUnsupportedError, match="op Det"):
        onnx_import.tune_onnx(path, db=tmp_path / "t.db", trials=2, show_progress=False)


# ------------------------------------------------------------- Hugging Face exports
class LastHiddenState(torch.nn.Module):
    """input_ids -> last hidden state, with an all-ones attention mask (the mask's shape
    arithmetic is what the exporter computes at run time)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
                         return_dict=False)
        return out[0]  # type: ignore[no-any-return]


def tiny_transformer(kind: str) -> torch.nn.Module:
    transformers: Any = pytest.importorskip("transformers")
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64))
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_tiny_transformer_export_compiles_on_tvm(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LastHiddenState(tiny_transformer(kind)).eval()
    example, other = torch.randint(0, 100, (1, 16)), torch.randint(0, 100, (1, 16))
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input_ids"])
    compiled = hwaware.compile(path, target="host", db=None)
    assert compiled.program.kernels[onnx_import.KERNEL_NAME].impl == "tvm"
    with torch.no_grad():
        torch.testing.assert_close(compiled(other), model(other), rtol=RTOL, atol=ATOL)
