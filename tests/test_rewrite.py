"""Rewrite passes (hwaware/rewrite/): string-padded convolutions get explicit padding,
conversions to the dtype and device a tensor already has disappear, and so do the metadata
assertions torch.export leaves beside them; each model still equals eager PyTorch on inputs
other than the compile inputs, with those ops no longer on the host."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx, nn

import hwaware
from tests.helpers import assert_close_to_eager, checked_on_tvm, on_tvm


class SamePadded(nn.Module):
    """padding="same" with an odd kernel, an even one (the extra column goes right), a dilated
    depthwise one (EfficientNet's), a 1-d one, and a "valid" one."""

    def __init__(self) -> None:
        super().__init__()
        self.odd = nn.Conv2d(3, 8, 3, padding="same")
        self.even = nn.Conv2d(8, 8, (4, 2), padding="same", bias=False)
        self.depthwise = nn.Conv2d(8, 8, 5, padding="same", dilation=2, groups=8)
        self.valid = nn.Conv2d(8, 4, 3, padding="valid")
        self.seq = nn.Conv1d(4, 4, 4, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.depthwise(self.even(self.odd(x))))
        h = self.valid(h)
        return self.seq(h.flatten(2))


class MaskConversions(nn.Module):
    """BERT's mask handling: an int64 mask moved to the input's device and cast to bool in one
    `.to`, casts to the dtype and device a tensor has, and a cast of a result (kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = (x > 0).to(torch.int64).to(x.device, torch.bool)
        h = self.fc(x).to(dtype=x.dtype, device=x.device, copy=False)
        h = torch.where(mask.to(dtype=torch.bool, device=x.device), h, -h)
        return h + h.cumsum(-1).to(torch.float64).to(h.dtype)


class StatedDtypes(nn.Module):
    """`.to(dtype)` a tensor already has, as Llama's rotary embeddings write it: export leaves an
    `aten._assert_tensor_metadata` beside each one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x)).to(torch.float32)
        return (h * 2).to(x.dtype)


@pytest.mark.parametrize(("make", "shape", "gone"), [
    (SamePadded, (1, 3, 12, 12), "aten.conv2d.padding"),
    (MaskConversions, (2, 8), "aten.to."),
    (StatedDtypes, (2, 8), "aten._assert_tensor_metadata"),
])
def test_rewritten_model_matches_eager_with_the_op_off_the_host(
        make: type, shape: tuple[int, ...], gone: str) -> None:
    torch.manual_seed(0)
    model = make().eval()
    compiled = hwaware.compile(model, (torch.randn(shape),), db=None, show_progress=False)
    assert not any(gone in op for op in compiled.info.host_ops), compiled.info.host_ops
    for _ in range(2):
        assert_close_to_eager(model, compiled, torch.randn(shape))


def test_a_metadata_assertion_the_graph_breaks_is_kept() -> None:
    """Only assertions the traced tensors satisfy go: one stating another dtype (it would fail)
    stays in the graph."""
    from hwaware.rewrite.metadata_asserts import ASSERT_METADATA, drop_metadata_asserts

    gm = torch.export.export(StatedDtypes().eval(), (torch.randn(2, 8),)).module()
    asserts = [n for n in gm.graph.nodes if n.target is ASSERT_METADATA]
    assert len(asserts) == 2
    asserts[0].kwargs = {**asserts[0].kwargs, "dtype": torch.float64}
    assert drop_metadata_asserts(gm) == 1
    assert [n for n in gm.graph.nodes if n.target is ASSERT_METADATA] == asserts[:1]


class LogBucketedPositions(nn.Module):
    """DeBERTa-v2's own log-bucketed relative positions (transformers' code) over positions that
    come in as an integer input, beside PyTorch's other integer-to-float promotions: an int
    tensor times a float scalar, a bool mask times a float, `where` mixing int and float."""

    def __init__(self) -> None:
        super().__init__()
        # imported here, not in forward: transformers imported while torch.export traces
        # leaves its output classes unregistered as pytrees, and later exports of transformers
        # models in this process fail on their outputs
        from transformers.models.deberta_v2 import modeling_deberta_v2

        self.log_buckets = modeling_deberta_v2.make_log_bucket_position

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        relative = positions[:, None] - positions[None, :]
        buckets = self.log_buckets(relative, bucket_size=8, max_position=64)
        scaled = torch.exp(positions * -0.25)[None, :] + (relative > 2) * 1.5
        return x + buckets + scaled + torch.where(relative > 0, relative, x)


def test_integer_inputs_of_float_ops_are_promoted_and_stay_on_tvm() -> None:
    """PyTorch promotes an int or bool input of a float element-wise op; TVM's importer did not,
    and DeBERTa's embedding kernel (`log(int_positions / mid)`) fell back to PyTorch."""

    from hwaware.build import KernelFallbackWarning

    torch.manual_seed(0)
    model = LogBucketedPositions().eval()
    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(12, 12), torch.randperm(40)[:12] * 3 - 50
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        compiled = hwaware.compile(model, inputs(), db=None, show_progress=False)
    assert not compiled.info.host_ops, compiled.info.host_ops
    for _ in range(3):
        assert_close_to_eager(model, compiled, *inputs())


class IntegerIndexArithmetic(nn.Module):
    """Index arithmetic as Mixtral's and Qwen2-MoE's routers write it (transformers' MoE code):
    `perm // top_k` and a rounding `div` on int64, an integer `clamp` with one bound, and an
    int64 0-d count added to int32 positions (PyTorch keeps int32: a 0-d tensor does not promote
    a dimensioned one)."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        _, perm = torch.sort(ids)
        rows = (perm // 2).clamp(max=x.shape[0] - 1)
        buckets = torch.div(ids, 3, rounding_mode="floor").clamp(min=0)
        shifted = positions + (ids > 4).sum() + positions * 2
        return x[rows] * buckets[:, None], shifted


def test_integer_operands_keep_pytorchs_dtypes_and_stay_on_tvm() -> None:
    """TVM's importer made `int64 // 2`'s 2 an int32 constant (Mixtral's router kernel failed to
    import), filled an integer clamp's missing bound with infinity, and promoted `int64_0d +
    int32` to int64 (the kernel differed from PyTorch): each kernel ran in PyTorch."""
    from hwaware.build import KernelFallbackWarning

    model = IntegerIndexArithmetic().eval()
    def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(16, 4, generator=g), torch.randint(-5, 20, (16,), generator=g),
                torch.randint(0, 9, (6,), generator=g, dtype=torch.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        compiled = hwaware.compile(model, inputs(0), db=None, show_progress=False)
    assert all(checked_on_tvm(k) for k in on_tvm(compiled).program.kernels.values()), \
        compiled.report()
    for seed in (1, 2, 3):
        got, want = compiled(*inputs(seed)), model(*inputs(seed))
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)


class AliasesAndScalarWheres(nn.Module):
    """Ops TVM's importer lacks, as third-party models write them: ConvBERT's `torch.multiply`,
    other aliases, and `where` with a Python scalar branch (MPNet's, BLOOM's), on float and
    integer tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = torch.multiply(self.fc(x), torch.sigmoid(x))
        h = torch.subtract(h, torch.divide(x, 3.0))
        h = torch.where(torch.greater(h, 0), h, -1e4)
        h = h + torch.where(torch.less_equal(ids, 2), 0.5, ids)
        return h + torch.where(torch.not_equal(ids, 1), 2.0, -2.0) + torch.absolute(x)


def test_aliases_and_scalar_wheres_run_on_tvm_and_match_eager() -> None:
    torch.manual_seed(0)
    model = AliasesAndScalarWheres().eval()

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(4, 8), torch.randint(0, 5, (4, 8))
    compiled = hwaware.compile(model, inputs(), db=None, show_progress=False)
    assert not compiled.info.host_ops, compiled.info.host_ops
    for _ in range(3):
        assert_close_to_eager(model, compiled, *inputs())
    with torch.no_grad():
        model.fc.weight.mul_(-2.0)
    compiled = hwaware.compile(model, inputs(), db=None, show_progress=False)
    assert_close_to_eager(model, compiled, *inputs())


class NegativeIndices(nn.Module):
    """Falcon's fused-QKV split (`qkv[:, :, :, [-2]]`, `[-1]`), a negative `select` and a
    constant index list mixing signs: TVM's gather read the negative entries out of bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x).view(1, x.shape[1], 2, 4, 8)
        query = qkv[:, :, :, :-2]
        key = torch.broadcast_to(qkv[:, :, :, [-2]], query.shape)
        value = torch.broadcast_to(qkv[:, :, :, [-1]], query.shape)
        mixed = qkv[:, :, :, [-3, 0, -1]].flatten(2) + qkv.select(3, -4).flatten(2).sum(-1,
                                                                                         True)
        return torch.cat([t.flatten(2) for t in (query * key, value)], -1).sum(-1) + \
            mixed.sum(-1)


def test_negative_indices_are_counted_from_the_start_on_tvm() -> None:
    from hwaware.build import KernelFallbackWarning, KernelMismatchWarning

    torch.manual_seed(0)
    model = NegativeIndices().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        warnings.simplefilter("error", KernelMismatchWarning)
        compiled = hwaware.compile(model, (torch.randn(1, 6, 32),), db=None, show_progress=False)
    assert not compiled.info.host_ops, compiled.info.host_ops
    for _ in range(3):
        assert_close_to_eager(model, compiled, torch.randn(1, 6, 32))


class LastTokenPooling(nn.Module):
    """Last-token pooling as sentence-embedding code writes it (`hidden[arange(b), mask.sum(-1)
    - 1]`): an all-padding row's index is -1 at run time, which PyTorch counts from the end."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(x)
        last = mask.sum(-1) - 1
        rows = torch.arange(x.shape[0])
        return hidden[rows, last] + hidden[:, last - 1].sum(1)


def test_indices_computed_at_run_time_count_negative_entries_from_the_end() -> None:
    torch.manual_seed(0)
    model = LastTokenPooling().eval()
    full = torch.ones(3, 5, dtype=torch.int64)
    compiled = hwaware.compile(model, (torch.randn(3, 5, 16), full), db=None,
                               show_progress=False)
    empty_rows = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    for mask in (empty_rows, full, torch.zeros(3, 5, dtype=torch.int64)):
        assert_close_to_eager(model, compiled, torch.randn(3, 5, 16), mask)


def _gcn(layers: int) -> nn.Module:
    from torch_geometric.nn import models

    torch.manual_seed(0)
    return models.GCN(8, 16, num_layers=layers, out_channels=4).eval()


def _graph(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(12, 8, generator=generator), \
        torch.randint(0, 12, (2, 40), generator=generator)


def test_each_layers_recomputed_normalisation_runs_once() -> None:
    """PyG's GCN normalises the same edges in every layer (self loops dropped and added, a
    data-dependent edge count, so on the host): three layers run the host ops of one."""
    from hwaware.program import OpStep

    pytest.importorskip("torch_geometric")
    host_steps = []
    for layers in (1, 3):
        model = _gcn(layers)
        compiled = hwaware.compile(model, _graph(0), db=None, show_progress=False)
        assert compiled.info.rewrites["merge_common_subexpressions"] > 0 or layers == 1
        host_steps.append(sum(isinstance(step, OpStep) for step in compiled.program.steps))
        for seed in (1, 2):
            assert_close_to_eager(model, compiled, *_graph(seed))
    # the asserts on the edge count are one pair for all layers, as the rest of the host part
    assert host_steps[1] == host_steps[0], host_steps


class TwoDraws(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand_like(x) + x, torch.rand_like(x) + x


def test_random_ops_are_never_merged() -> None:
    from hwaware.capture import capture
    from hwaware.rewrite.common_subexpressions import merge_common_subexpressions

    graph = capture(TwoDraws(), (torch.randn(4, 4),)).graph_module
    draws = [n for n in graph.graph.nodes if "rand" in str(n.target)]
    assert len(draws) == 2 and merge_common_subexpressions(graph) == 0


def test_a_pass_that_fails_is_undone_and_the_model_still_compiles(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite pass that raises halfway, after changing the graph, is undone with one warning
    naming it, and the model compiles to the right numbers without it."""
    from hwaware import rewrite as rewrite_module

    def breaks_halfway(gm: fx.GraphModule) -> int:
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.relu.default:
                node.target = torch.ops.aten.sigmoid.default  # wrong, and left behind
        raise RuntimeError("a pass bug on a graph it did not expect")

    monkeypatch.setattr(rewrite_module, "PASSES",
                        [("breaks_halfway", breaks_halfway), *rewrite_module.PASSES])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with pytest.warns(rewrite_module.RewriteSkippedWarning, match="breaks_halfway.*RuntimeError"):
        compiled = hwaware.compile(model, (torch.randn(2, 8),), db=None, show_progress=False)
    for _ in range(3):
        assert_close_to_eager(model, compiled, torch.randn(2, 8) * 3)


class Powers(nn.Module):
    """Powers as real models write them: GPT-2's GELU (`pow(x, 3.0)`), RMSNorm's `pow(2)`, a
    square root, an inverse square root and a reciprocal written as powers, one exponent with
    no cheaper form (2.5), and an integer tensor raised to a float power (promoted: kept)."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gelu = 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3.0))))
        variance = x.pow(2).mean(-1, keepdim=True)
        roots = x.abs().pow(0.5) + (variance + 1e-6).pow(-0.5) + (x.abs() + 1).pow(-1)
        return gelu * roots + x.abs().pow(2.5) + ids.pow(2.0)


def test_powers_become_the_products_pytorch_computes_them_with() -> None:
    """`pow` to 2, 3, 0.5, -0.5 and -1 is rewritten into the ops ATen's own kernels use for
    those exponents, so the rewritten graph gives eager's numbers bit for bit (TVM would call
    `powf` per element, unvectorized); other exponents and promoted integer bases stay `pow`."""
    from hwaware.capture import capture
    from hwaware.rewrite.canonical_ops import canonical_ops

    model = Powers().eval()
    example = (torch.randn(4, 16), torch.randint(0, 5, (4, 16)))
    graph = capture(model, example).graph_module
    assert canonical_ops(graph) == 5
    graph.recompile()
    left = [n.args[1] for n in graph.graph.nodes if n.target is torch.ops.aten.pow.Tensor_Scalar]
    assert sorted(left) == [2.0, 2.5]  # the integer base's 2.0, and 2.5
    for _ in range(3):
        inputs = (torch.randn(4, 16) * 3, torch.randint(-4, 5, (4, 16)))
        with torch.no_grad():
            got = graph(*inputs)
            assert torch.equal(got[0] if isinstance(got, tuple | list) else got,
                               model(*inputs))
    compiled = hwaware.compile(model, example, db=None, show_progress=False)
    assert not compiled.info.host_ops, compiled.info.host_ops
    assert_close_to_eager(model, compiled, torch.randn(4, 16), torch.randint(-4, 5, (4, 16)))
