"""A kernel TVM cannot import, build or run stays in PyTorch alone; sort and scan ops (cumsum,
sort, topk, ...) build on TVM; ops with tuple outputs (svd, sort, topk) run right on the host;
decoder language models (GPT-2, Llama) compile and match eager."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import hwaware
from hwaware import build
from hwaware.program import KernelSpec, OpStep, Program
from hwaware.runtime import CompiledModel
from tests.helpers import checked_on_tvm, kernels_built

Fn = Callable[[nn.Module, torch.Tensor], Any]


class OneOp(nn.Module):
    """`fn(self, x)`, with a linear layer at hand for the cases that mix in a matmul."""

    def __init__(self, fn: Fn):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self, x)


# name -> (the model's forward, the op its kernel holds, whether that op is imported into TVM)
CASES: dict[str, tuple[Fn, str, bool]] = {
    "cumsum": (lambda m, x: torch.cumsum(x, 1), "cumsum", True),
    "cumprod": (lambda m, x: torch.cumprod(x, 1), "cumprod", True),
    "bool_cumsum": (lambda m, x: (x > 0).cumsum(-1), "cumsum", True),  # int64: position ids
    "sort": (lambda m, x: torch.sort(x, 1), "sort", True),
    "argsort": (lambda m, x: torch.argsort(x, 1, descending=True), "sort", True),
    "topk": (lambda m, x: torch.topk(x, 3, 1), "topk", True),
    "svd": (lambda m, x: torch.linalg.svd(x), "linalg_svd", False),
    "matmul_cumsum": (lambda m, x: torch.cumsum(m.lin(x).relu(), 1), "cumsum", True),
    "matmul_topk": (lambda m, x: torch.topk(m.lin(x), 2).values * 2, "topk", True),
    "svd_matmul": (lambda m, x: torch.linalg.svd(x).U @ m.lin(x), "linalg_svd", False),
}


def _compile(model: nn.Module, *inputs: torch.Tensor) -> tuple[CompiledModel, list[str]]:
    """`hwaware.compile` without a database, and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = hwaware.compile(model, inputs, db=None, show_progress=False)
    assert isinstance(compiled, CompiledModel)
    return compiled, [str(w.message) for w in record]


def _assert_matches(name: str, got: Any, expected: Any, x: torch.Tensor) -> None:
    """Equal outputs; indices (sort, argsort, topk) compared by the values they pick (ties may
    pick either of two equal values)."""
    got_leaves, expected_leaves = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    assert len(got_leaves) == len(expected_leaves)
    for g, e in zip(got_leaves, expected_leaves, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        if name in ("sort", "argsort", "topk") and e.dtype == torch.int64:
            g, e = torch.gather(x, 1, g), torch.gather(x, 1, e)
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)


def _checked_on_tvm(compiled: CompiledModel, op: str) -> bool:
    """Whether a kernel holding `op` was built by TVM and matched PyTorch (`checked_on_tvm`)."""
    return any(any(op in s.op for s in k.steps) and checked_on_tvm(k)
               for k in compiled.program.kernels.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_op_models_match_eager_on_another_input(name: str) -> None:
    fn, op, imported = CASES[name]
    model = OneOp(fn).eval()
    compiled, messages = _compile(model, torch.randn(4, 8))
    x = torch.randn(4, 8)
    with torch.no_grad():
        _assert_matches(name, compiled(x), model(x), x)
    if imported:  # built on TVM: no warning about it
        assert _checked_on_tvm(compiled, op), compiled.report()
        assert not [m for m in messages if op in m], messages
    else:  # runs in PyTorch, with a warning naming it
        assert [m for m in messages if op in m and "PyTorch" in m], messages


def test_tuple_outputs_keep_their_type_through_save_and_load(tmp_path: Path) -> None:
    model = OneOp(lambda m, x: torch.topk(m.lin(x), 3)).eval()
    compiled, _ = _compile(model, torch.randn(4, 8))
    loaded = hwaware.load(compiled.save(tmp_path / "topk"))
    x = torch.randn(4, 8)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert type(got) is type(expected)  # torch.return_types.topk: .values, .indices
    torch.testing.assert_close(got.values, expected.values, rtol=1e-3, atol=1e-4)


def test_a_kernel_that_does_not_build_runs_in_pytorch_and_the_rest_on_tvm() -> None:
    """TVM imports a bool + bool but its LLVM codegen refuses it. It is fused with the matmul
    after it into one kernel, which then fails to build: the build cuts that kernel around its
    contraction and builds the pieces again, so only the bool + bool's piece falls back, with
    one warning naming its ops, and the matmul is still built on TVM."""
    model = OneOp(lambda m, x: m.lin(((x > 0) + (x < 0.5)).float() * x).relu()).eval()
    with pytest.warns(build.KernelFallbackWarning, match=r"aten\.add\.Tensor.*could not be "
                      r"built") as record:
        compiled = hwaware.compile(model, (torch.randn(4, 8),), db=None, show_progress=False)
    assert len([w for w in record if w.category is build.KernelFallbackWarning]) == 1
    assert isinstance(compiled, CompiledModel)
    assert _checked_on_tvm(compiled, "linear"), compiled.report()
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-4)


def test_a_fused_kernel_that_does_not_build_is_built_unfused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused family kernel whose schedule raises at build: dissolved into ordinary kernels,
    with a warning naming its ops; the model still matches eager."""
    from hwaware.kernels import fixed_schedules

    def broken(func: Any, target: Any) -> Any:
        raise RuntimeError("broken fixed schedule")

    monkeypatch.setattr(build, "fixed_schedules",
                        lambda: {rule: broken for rule in fixed_schedules()})

    class Attention(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with pytest.warns(build.KernelFallbackWarning, match="scaled_dot_product_attention.*fused"):
        compiled = hwaware.compile(Attention(), (q, k, v), db=None, show_progress=False)
    assert isinstance(compiled, CompiledModel)
    assert compiled.info.dissolved, compiled.report()
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), Attention()(q, k, v), rtol=1e-3,
                                   atol=1e-4)


# ------------------------------------------------------- finding the kernels that fail
def _program(names: list[str]) -> Program:
    kernels = {n: KernelSpec(n, "elementwise", f"sig:{n}", [0], [1],
                             [OpStep(f"aten.{n}.default", [{"v": 0}], {}, 1)]) for n in names}
    return Program([0], [], [1], "", [], kernels, 2)


def _kernels(names: list[str]) -> dict[str, build.KernelTasks]:
    return {n: build.KernelTasks(None, {}, set()) for n in names}


def test_a_library_that_builds_is_built_once() -> None:
    names = [f"op{i}" for i in range(8)]
    calls: list[set[str]] = []
    library, built = build._build_library(_program(names), _kernels(names),
                                          lambda ks: calls.append(set(ks)) or "lib")
    assert library == "lib" and list(built) == names and len(calls) == 1


@pytest.mark.parametrize("bad", [{"op3"}, {"op3", "op12"}])
def test_a_failed_build_finds_each_failing_kernel_in_few_builds(bad: set[str]) -> None:
    names = [f"op{i}" for i in range(16)]
    calls: list[set[str]] = []

    def build_fn(kernels: dict[str, Any]) -> str:
        calls.append(set(kernels))
        if bad & set(kernels):
            raise RuntimeError(f"cannot emit {sorted(bad & set(kernels))}")
        return "lib"

    kernels = _kernels(names)
    with pytest.warns(build.KernelFallbackWarning, match=r"op3 \(aten\.op3\.default\)"):
        library, built = build._build_library(_program(names), kernels, build_fn)
    assert library == "lib" and set(built) == set(names) - bad
    assert calls[-1] == set(names) - bad  # the rest, built together again
    # halves: each failing kernel is found in 2 builds per halving, not one build per kernel
    assert len(calls) <= 2 + 2 * len(bad) * math.log2(len(names))
    assert {n for n, k in kernels.items() if not k.builds} == bad  # left out of later builds


def test_kernels_that_build_alone_but_not_together_all_stay_in_pytorch() -> None:
    names = ["a", "b"]

    def build_fn(kernels: dict[str, Any]) -> str:
        if len(kernels) > 1:
            raise RuntimeError("duplicate symbol")
        return "lib"

    with pytest.warns(build.KernelFallbackWarning, match="duplicate symbol"):
        library, built = build._build_library(_program(names), _kernels(names), build_fn)
    assert library is None and not built


# ------------------------------------------------------------------ decoder models
def _decoder(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    if kind == "gpt2":  # default attention (sdpa)
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                                         n_positions=32, use_cache=False,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2Model(config)
    else:  # eager attention; 2 key/value heads for 4 query heads (GQA)
        config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64,
                                          intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=100,
                                          max_position_embeddings=32, use_cache=False,
                                          attn_implementation="eager")
        model = transformers.LlamaModel(config)
    return LastHidden(model).eval()


class LastHidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_decoder_models_compile_and_match_eager(kind: str) -> None:
    model = _decoder(kind)
    compiled, _ = _compile(model, torch.randint(0, 100, (1, 16)))
    for _ in range(2):
        ids = torch.randint(0, 100, (1, 16))
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-3, atol=1e-4)
    kernels = kernels_built(compiled)
    assert _checked_on_tvm(compiled, "cumsum"), compiled.report()  # the position ids
    # a contraction (a small matmul, or the fused attention) too: the untuned large ones stay
    # in PyTorch by design
    assert any(k.family in build.CONTRACTION_FAMILIES and k.tvm_us is not None
               for k in kernels), compiled.report()


@pytest.mark.parametrize("rows, cols", [(512, 80), (1280, 128), (200, 200)])
def test_default_gemv_schedules_never_vectorize_wider_than_llvm_can_build(
        rows: int, cols: int) -> None:
    """DLight's CPU GEMV vectorized 128 rows of a 1x1 conv on a 1x1 image (MobileNetV2's last
    conv): LLVM then built that one kernel for over 10 minutes."""
    import tvm
    from tvm import te

    from hwaware.tvm import schedules, setup

    x, w = te.placeholder((1, cols), name="x"), te.placeholder((rows, cols), name="w")
    k = te.reduce_axis((0, cols), "k")
    y = te.compute((1, rows), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="y")
    target = setup.tvm_target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    with target:
        scheduled = schedules.default_schedule(
            tvm.IRModule({"main": te.create_prim_func([x, w, y])}), target)
    assert schedules.widest_vector(scheduled["main"].body) <= schedules.MAX_VECTOR_LANES < 128
