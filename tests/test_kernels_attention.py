"""Fused attention family: find() on captured models, lower()+build equal to eager, tuning."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.interpreter import Interpreter

from hwaware import capture, rewrite
from hwaware.aten_ops import supported_aten_ops
from hwaware.db import TuningDatabase
from hwaware.kernels import attention
from hwaware.partition import _external_inputs, _kernel_graph, partition
from hwaware.target import get_target
from hwaware.tvm import database, ir, schedules, search, setup
from hwaware.tvm import vm as tvm_vm
from tests.helpers import default_schedule


class SDPA(nn.Module):
    def __init__(self, causal: bool = False, scale: float | None = None):
        super().__init__()
        self.causal, self.scale = causal, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal,
                                              scale=self.scale)


class _Heads(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 1, 3).contiguous()
        return x.view(x.shape[0], x.shape[1], -1)


class BertSelfAttention(_Heads):
    """As Hugging Face BERT writes it: additive padding mask, eval dropout."""

    def __init__(self, hidden: int = 48, heads: int = 2):
        super().__init__(hidden, heads)
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        probs = self.drop(F.softmax(scores, dim=-1))
        return self.merge(torch.matmul(probs, v))


class GPT2Attention(_Heads):
    """As Hugging Face GPT-2 writes it: fused qkv projection, `where(tril, w, min)`."""

    def __init__(self, hidden: int = 48, heads: int = 2, positions: int = 128):
        super().__init__(hidden, heads)
        self.c_attn = nn.Linear(hidden, 3 * hidden)
        tril = torch.tril(torch.ones(positions, positions, dtype=torch.bool))
        self.register_buffer("bias", tril.view(1, 1, positions, positions), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.split(t) for t in self.c_attn(x).split(x.shape[-1], dim=2))
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype)
        ql, kl = q.size(-2), k.size(-2)
        causal = self.bias[:, :, kl - ql:kl, :kl]
        w = torch.where(causal, w.to(w.dtype), torch.full([], torch.finfo(w.dtype).min))
        return self.merge(torch.matmul(F.softmax(w, dim=-1), v))


class ScaledMaskAttention(nn.Module):
    """Hand-written with `* scale` and a [S, S] mask: a mask shape the kernel takes too."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        w = torch.matmul(q, k.transpose(-1, -2)) * 0.3 + bias
        return torch.matmul(w.softmax(-1), v)


class SoftmaxOverRows(nn.Module):
    """softmax over dim -2: not attention's reduction, must stay unfused."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        w = torch.matmul(q, k.transpose(-1, -2))
        return torch.matmul(w.softmax(-2), v)


def _captured(model: nn.Module, inputs: tuple[Any, ...]) -> fx.GraphModule:
    c = capture.capture(model, inputs)
    rewrite.rewrite(c)
    return c.graph_module


def _names(groups: list[list[fx.Node]]) -> list[list[str]]:
    return [[n.name for n in g] for g in groups]


def _kernel(model: nn.Module, inputs: tuple[Any, ...]
            ) -> tuple[fx.GraphModule, list[torch.Tensor], torch.Tensor]:
    """The kernel graph partition would cut for the one attention in `model`, the tensors it
    gets and the eager result."""
    gm = _captured(model, inputs)
    (group,) = attention.find(gm)
    ins = _external_inputs(group, set(group))
    outs = [n for n in group if any(u not in group for u in n.users)]
    graph = _kernel_graph(gm, group, ins, outs)
    assert graph is not None
    values: dict[fx.Node, Any] = {}

    class Record(Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Record(gm).run(*inputs)
        args = [values[i].contiguous() for i in ins]
        return graph, args, graph(*args)[0]


@pytest.fixture(scope="module")
def host() -> tuple[Any, Any]:
    t = get_target("host")
    return t, setup.tvm_target(t.tvm, t.host_tvm)


def _run(mod: Any, tgt: Any, adapter: Any, args: list[torch.Tensor]) -> tuple[torch.Tensor, set]:
    exe, applied = schedules.build_executable(mod, tgt, adapter)
    call = tvm_vm.torch_callable(tvm_vm.make_vm(exe, "cpu"), "main", 1)
    return call(*args)[0], applied


# ------------------------------------------------------------------------------ find
def test_find_bert_groups_views_mask_and_output_views() -> None:
    gm = _captured(BertSelfAttention(), (torch.randn(2, 17, 48), torch.ones(2, 17)))
    (group,) = _names(attention.find(gm))
    for name in ("matmul", "div", "unsqueeze", "rsub", "mul", "add", "softmax", "dropout",
                 "matmul_1", "permute_3", "contiguous", "view_3", "transpose"):
        assert name in group
    assert not any(n.startswith("linear") for n in group)
    assert group[-1] == "view_3"


def test_find_gpt2_and_sdpa_variants() -> None:
    gm = _captured(GPT2Attention(), (torch.randn(1, 9, 48),))
    (group,) = _names(attention.find(gm))
    assert {"matmul", "where", "softmax", "matmul_1", "view_3"} <= set(group)
    q = torch.randn(1, 2, 5, 8)
    for model, extra in ((SDPA(), ()), (SDPA(causal=True), ()),
                         (SDPA(), (torch.randn(5, 5),)), (SDPA(), (torch.rand(5, 5) > 0.5,))):
        assert _names(attention.find(_captured(model, (q, q, q, *extra)))) == \
            [["scaled_dot_product_attention"]]


def test_find_skips_unsupported_variants(caplog: pytest.LogCaptureFixture) -> None:
    q = torch.randn(1, 2, 5, 8)
    caplog.set_level(logging.DEBUG, logger=attention.__name__)
    assert attention.find(_captured(SDPA(), (q.double(), q.double(), q.double()))) == []
    assert "not float32" in caplog.text
    k_broadcast = torch.randn(1, 1, 5, 8)  # one kv head for two q heads: broadcast
    assert attention.find(_captured(SDPA(), (q, k_broadcast, k_broadcast))) == []
    assert "broadcast" in caplog.text
    assert attention.find(_captured(SDPA(), (q, q, q, torch.randn(1, 2, 1, 5, 5)))) == []
    assert attention.find(_captured(SoftmaxOverRows(), (q, q, q))) == []
    assert "softmax not over the last dim" in caplog.text


# ----------------------------------------------------------------- lower + build = eager
CASES = {
    "sdpa_q17_kv9_d24": (SDPA(), (torch.randn(1, 2, 17, 24), torch.randn(1, 2, 9, 24),
                                  torch.randn(1, 2, 9, 24))),
    "sdpa_seq1": (SDPA(), (torch.randn(2, 3, 1, 64),) * 3),
    "sdpa_causal_77_d64": (SDPA(causal=True), (torch.randn(1, 2, 77, 64),) * 3),
    # head dims that 32 does not divide: p.v's vectorised tile is 16 (80, 48), 4 (36) or the
    # whole head dim (12)
    "sdpa_causal_33_d80": (SDPA(causal=True), (torch.randn(1, 3, 33, 80),) * 3),
    "sdpa_40_d48": (SDPA(), (torch.randn(1, 2, 40, 48),) * 3),
    "sdpa_causal_21_d36": (SDPA(causal=True), (torch.randn(1, 2, 21, 36),) * 3),
    "sdpa_19_d12": (SDPA(), (torch.randn(1, 3, 19, 12),) * 3),
    "sdpa_additive_mask_scale": (SDPA(scale=0.2), (torch.randn(2, 2, 17, 24),
                                                   torch.randn(2, 2, 33, 24),
                                                   torch.randn(2, 2, 33, 16),
                                                   torch.randn(2, 1, 17, 33))),
    "sdpa_bool_mask": (SDPA(), (torch.randn(1, 2, 17, 24),) * 3
                       + ((torch.rand(17, 17) > 0.3) | torch.eye(17, dtype=torch.bool),)),
    "bert_padding_b2_s17": (BertSelfAttention(),
                            (torch.randn(2, 17, 48),
                             torch.tensor([[1.0] * 17, [1.0] * 10 + [0.0] * 7]))),
    "gpt2_causal_77": (GPT2Attention(hidden=48, heads=2), (torch.randn(1, 77, 48),)),
    # more keys than one key block takes: the online softmax rescales across blocks
    "sdpa_kv600_two_key_blocks": (SDPA(), (torch.randn(1, 1, 5, 8), torch.randn(1, 1, 600, 8) * 3,
                                           torch.randn(1, 1, 600, 8), torch.randn(5, 600))),
    # peaked scores (spread ~+-100): most softmax weights tiny (their products with V
    # subnormal), across two key blocks (the online rescale factor underflows too)
    "sdpa_peaked_scores_kv600": (SDPA(), (torch.randn(1, 2, 17, 24) * 6,
                                          torch.randn(1, 2, 600, 24) * 6,
                                          torch.randn(1, 2, 600, 24))),
    "handwritten_scale_bias": (ScaledMaskAttention(), (torch.randn(1, 3, 17, 24),) * 3
                               + (torch.randn(17, 17),)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lower_default_schedule_matches_eager(case: str, host: tuple[Any, Any]) -> None:
    target, tgt = host
    torch.manual_seed(0)
    graph, args, expected = _kernel(*CASES[case])
    mod = attention.FAMILY.lower(graph, args, target, f"hw_attention_test_{case}")
    calls = [b for b in mod["main"].body.blocks[0].bindings]
    assert len(calls) == 1 and len(ir.prim_funcs(mod)) == 1
    got, _ = _run(default_schedule(mod, tgt), tgt, None, args)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


def test_gpt2_causal_mask_becomes_an_index_test() -> None:
    graph, _, _ = _kernel(GPT2Attention(), (torch.randn(1, 20, 48),))
    plan = attention.plan_of(graph)
    assert plan.causal_offset == 0
    assert not plan.constants  # the [1, 1, S, S] tril constant is not read by the kernel


@pytest.mark.parametrize(("model", "kept"), [
    (SDPA(), 81), (SDPA(causal=True), 45), (GPT2Attention(), 45), (ScaledMaskAttention(), 81)])
def test_a_causal_kernel_counts_the_flops_of_the_pairs_it_computes(
        model: nn.Module, kept: int) -> None:
    """Causal: the 45 (query, key) pairs on or below the diagonal of 9 x 9, not all 81."""
    seq, head_dim = 9, 24
    if isinstance(model, GPT2Attention):
        inputs: tuple[Any, ...] = (torch.randn(1, seq, 2 * head_dim),)
    else:
        q = torch.randn(1, 2, seq, head_dim)
        inputs = (q, q, q, torch.randn(seq, seq)) if isinstance(model, ScaledMaskAttention) \
            else (q, q, q)
    captured = capture.capture(model, inputs)
    rewrite.rewrite(captured)
    kernels = partition(captured, supported_aten_ops(), fuse=True).program.kernels.values()
    (fused,) = [k for k in kernels if k.family == "attention"]
    assert fused.flops == 2 * 2 * (2 * kept * head_dim)  # heads x (q.k + p.v) x 2 per MAC


def test_unscheduled_kernel_matches_eager(host: tuple[Any, Any]) -> None:
    target, tgt = host
    graph, args, expected = _kernel(*CASES["bert_padding_b2_s17"])
    got, _ = _run(attention.FAMILY.lower(graph, args, target, "hw_attention_test_plain"), tgt, None,
                  args)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------ tuning
def test_tuning_stores_records_and_build_applies_them(tmp_path: Any,
                                                      host: tuple[Any, Any]) -> None:
    target, tgt = host
    graph, args, expected = _kernel(GPT2Attention(), (torch.randn(1, 33, 48),))
    mod = attention.FAMILY.lower(graph, args, target, "hw_attention_test_tuned")
    fused = ir.fuse_for_tuning(mod, tgt)
    funcs = ir.prim_funcs(fused)
    assert list(funcs) == ["hw_attention_test_tuned"]  # kept whole
    workloads = {n: ir.workload_of(f) for n, f in funcs.items()}
    db = TuningDatabase(tmp_path / "t.db")
    db.start_session("sess", target.key, "attention", 8)
    adapter = database.SqliteDatabase(db, tgt, target.key)
    search.tune_workloads(workloads, {n: 8 for n in workloads}, tgt, adapter, "sess",
                              lambda *a: None, str(tmp_path), num_trials_per_iter=8,
                              population=32)
    (whash,) = {ir.workload_hash(w) for w in workloads.values()}
    assert db.count_records(whash, setup.TVM_VERSION, target.key) > 0
    assert db.top_records(whash, setup.TVM_VERSION, target.key), \
        [r.error for r in db.records_for_target(target.key)][:1]
    got, applied = _run(mod, tgt, adapter, args)
    assert applied == {whash}
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------- cross targets
@pytest.mark.parametrize("name", ["cuda-sm90", "arm64-neon"])
def test_builds_for_other_targets(name: str) -> None:
    target = get_target(name)
    tgt = setup.tvm_target(target.tvm, target.host_tvm)
    graph, args, _ = _kernel(GPT2Attention(), (torch.randn(1, 17, 48),))
    mod = attention.FAMILY.lower(graph, args, target, f"hw_attention_test_{name.replace('-', '_')}")
    exe, _ = schedules.build_executable(default_schedule(mod, tgt), tgt, None)
    assert exe is not None
