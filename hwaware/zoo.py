"""Model zoo: reference networks built from configs with random weights (no downloads).

Not a pipeline stage: the models that tests, `bench/` and examples compile. Goes in: a model name.
Comes out: an eval-mode `nn.Module` and its example inputs at batch 1, from `ZooEntry.build`
(real shapes, for benchmarks) or `ZooEntry.build_small` (tiny shapes, for tests).

Every builder seeds `torch.manual_seed`, so a model and its inputs are the same on every call.
BatchNorm layers get random running statistics and affine weights, so BN folding is exercised
(fresh BN layers are the identity and would hide folding bugs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]
SEED = 0


@dataclass(frozen=True)
class ZooEntry:
    """One reference model: its name, family, and builders for real and tiny shapes."""

    name: str
    family: str  # "conv", "transformer", "gnn", "mlp", "host_op", ...
    description: str
    build: Callable[[], Built]
    build_small: Callable[[], Built]


def get_model(name: str, small: bool = False) -> Built:
    """Build zoo model `name` (tiny shapes if `small`): (eval-mode module, example inputs)."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(sorted(ZOO))}")
    entry = ZOO[name]
    return entry.build_small() if small else entry.build()


# --------------------------------------------------------------------------------- helpers
def _finish(model: nn.Module, *inputs: torch.Tensor) -> Built:
    """Randomize BatchNorm statistics, switch to eval mode, detach the inputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _randomize_bn(m)
    return model.eval(), tuple(t.detach() for t in inputs)


def _randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    assert bn.running_mean is not None and bn.running_var is not None  # set by track_running_stats
    bn.running_mean.normal_(0.0, 0.1)
    bn.running_var.uniform_(0.5, 1.5)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_(0.0, 0.1)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


# ------------------------------------------------------------------------------ conv blocks
class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-bn-relu-conv3x3-bn, identity add, relu."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(ch, ch, 3), nn.ReLU(), *_conv_bn(ch, ch, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck: 1x1 reduce, 3x3, 1x1 expand, each with BN; identity add, relu."""

    def __init__(self, ch: int, mid: int):
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(ch, mid, 1), nn.ReLU(), *_conv_bn(mid, mid, 3), nn.ReLU(),
            *_conv_bn(mid, ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project (BN each, ReLU6), residual."""

    def __init__(self, ch: int, expand: int):
        super().__init__()
        hid = ch * expand
        self.body = nn.Sequential(
            *_conv_bn(ch, hid, 1), nn.ReLU6(), *_conv_bn(hid, hid, 3, groups=hid), nn.ReLU6(),
            *_conv_bn(hid, ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SqueezeExcite(nn.Module):
    """MobileNetV3 squeeze-excite: global pool, 1x1 reduce, ReLU, 1x1 expand, hardsigmoid (or
    another `gate`: EfficientNet-style blocks use sigmoid)."""

    def __init__(self, ch: int, squeeze: int,
                 gate: Callable[[torch.Tensor], torch.Tensor] = nn.functional.hardsigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(ch, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, ch, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * self.gate(self.expand(s))


class MobileNetV3Block(nn.Module):
    """MobileNetV3-Large block: 1x1 expand, 5x5 depthwise, SE, hardswish, 1x1 project, residual."""

    def __init__(self, ch: int, hid: int, squeeze: int):
        super().__init__()
        self.expand = nn.Sequential(*_conv_bn(ch, hid, 1), nn.Hardswish())
        self.depthwise = nn.Sequential(*_conv_bn(hid, hid, 5, groups=hid), nn.Hardswish())
        self.se = SqueezeExcite(hid, squeeze)
        self.project = nn.Sequential(*_conv_bn(hid, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: 7x7 depthwise, channels-last LayerNorm, 4x MLP (GELU), layer scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) * 0.5 + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(nn.functional.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def small_cnn_net(cin: int, width: int, classes: int) -> nn.Module:
    """A whole tiny CNN: three conv-bn-relu stages, max pool, global pool, linear head."""
    return nn.Sequential(
        *_conv_bn(cin, width, 3), nn.ReLU(),
        *_conv_bn(width, 2 * width, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
        *_conv_bn(2 * width, 4 * width, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes),
    )


def _image(ch: int, hw: int) -> torch.Tensor:
    return torch.randn(1, ch, hw, hw)


def build_resnet_basic_block(ch: int = 64, hw: int = 56) -> Built:
    torch.manual_seed(SEED)
    return _finish(BasicBlock(ch), _image(ch, hw))


def build_resnet_bottleneck(ch: int = 256, mid: int = 64, hw: int = 56) -> Built:
    torch.manual_seed(SEED)
    return _finish(Bottleneck(ch, mid), _image(ch, hw))


def build_mobilenetv2_block(ch: int = 24, expand: int = 6, hw: int = 56) -> Built:
    torch.manual_seed(SEED)
    return _finish(InvertedResidual(ch, expand), _image(ch, hw))


def build_mobilenetv3_block_se(ch: int = 40, hid: int = 120, squeeze: int = 32,
                               hw: int = 28) -> Built:
    torch.manual_seed(SEED)
    return _finish(MobileNetV3Block(ch, hid, squeeze), _image(ch, hw))


def build_convnext_block(dim: int = 96, hw: int = 56) -> Built:
    torch.manual_seed(SEED)
    return _finish(ConvNeXtBlock(dim), _image(dim, hw))


def build_small_cnn(width: int = 32, hw: int = 32, classes: int = 10) -> Built:
    torch.manual_seed(SEED)
    return _finish(small_cnn_net(3, width, classes), _image(3, hw))


# ---------------------------------------------------------------------------- transformers
class BertLikeAttention(nn.Module):
    """Hugging Face BERT attention written out: Q/K/V linears, softmax(QK^T/sqrt(d) + mask)V,
    output dense, residual, LayerNorm. `mask` is 1 for tokens, 0 for padding, shape [B, S]."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        additive = (1.0 - mask[:, None, None, :]) * -10000.0
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + additive
        ctx = torch.softmax(scores, dim=-1) @ v
        ctx = ctx.permute(0, 2, 1, 3).reshape(x.shape)
        return self.norm(self.dense(ctx) + x)


def build_transformer_encoder_layer(d_model: int = 256, nhead: int = 4, ff: int = 1024,
                                    seq: int = 64) -> Built:
    torch.manual_seed(SEED)
    layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True)
    return _finish(layer, torch.randn(1, seq, d_model))


def build_bert_like_attention(hidden: int = 256, heads: int = 4, seq: int = 64) -> Built:
    torch.manual_seed(SEED)
    mask = torch.ones(1, seq)
    mask[:, seq - seq // 8:] = 0.0  # the last eighth is padding
    return _finish(BertLikeAttention(hidden, heads), torch.randn(1, seq, hidden), mask)


class AttentionCore(nn.Module):
    """BERT's attention core on per-head q, k, v [B, H, S, D], as Hugging Face writes it:
    softmax(QK^T/sqrt(d) + padding mask) V, `mask` [B, S] (1 = token, 0 = padding). With `sdpa`
    the same through `F.scaled_dot_product_attention`: PyTorch's fused kernel, the peer."""

    def __init__(self, sdpa: bool = False):
        super().__init__()
        self.sdpa = sdpa

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask[:, None, None, :]) * -10000.0
        if self.sdpa:
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive
        return torch.softmax(scores, dim=-1) @ v


class CausalAttentionCore(nn.Module):
    """GPT-2's attention core: scores where(tril, QK^T/sqrt(d), finfo.min), softmax, V; with
    `sdpa`, `F.scaled_dot_product_attention(is_causal=True)`."""

    def __init__(self, seq: int, sdpa: bool = False):
        super().__init__()
        self.sdpa = sdpa
        self.register_buffer("tril", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.sdpa:
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        tril: torch.Tensor = self.tril  # type: ignore[assignment]
        scores = torch.where(tril, scores, torch.finfo(scores.dtype).min)
        return torch.softmax(scores, dim=-1) @ v


def build_attention_core(heads: int = 12, seq: int = 128, head_dim: int = 64,
                         causal: bool = False, sdpa: bool = False) -> Built:
    torch.manual_seed(SEED)
    q, k, v = (torch.randn(1, heads, seq, head_dim) for _ in range(3))
    if causal:
        return _finish(CausalAttentionCore(seq, sdpa), q, k, v)
    mask = torch.ones(1, seq)
    mask[:, seq - seq // 8:] = 0.0  # the last eighth is padding
    return _finish(AttentionCore(sdpa), q, k, v, mask)


# ------------------------------------------------------------------------------ mlp, misc
def build_mlp(d_in: int = 256, hidden: int = 1024, d_out: int = 256) -> Built:
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                          nn.GELU(), nn.Linear(hidden, d_out))
    return _finish(model, torch.randn(1, d_in))


class SearchsortedEmbedding(nn.Module):
    """Recommendation-style bucketized features: linear, `torch.searchsorted` into fixed bucket
    boundaries (an op TVM's importer lacks, so it runs on the host between two TVM kernels),
    one embedding table per feature, MLP head."""

    boundaries: torch.Tensor
    offsets: torch.Tensor

    def __init__(self, d_in: int, features: int, buckets: int, dim: int):
        super().__init__()
        self.features, self.buckets = features, buckets
        self.proj = nn.Linear(d_in, features)
        self.register_buffer("boundaries", torch.linspace(-2.0, 2.0, buckets - 1))
        self.register_buffer("offsets", torch.arange(features) * buckets)
        self.table = nn.Embedding(features * buckets, dim)
        self.head = nn.Sequential(nn.Linear(features * dim, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(self.boundaries, self.proj(x).contiguous()) + self.offsets
        return self.head(self.table(idx).flatten(1))


def build_searchsorted_embedding(d_in: int = 64, features: int = 16, buckets: int = 32,
                                 dim: int = 8) -> Built:
    torch.manual_seed(SEED)
    return _finish(SearchsortedEmbedding(d_in, features, buckets, dim), torch.randn(1, d_in))


# ------------------------------------------------------------------------------------- gnn
def random_graph(nodes: int, edges: int, seed: int = SEED) -> torch.Tensor:
    """A random undirected graph without self loops or duplicates, as a [2, edges] index
    (both directions of each of edges // 2 pairs)."""
    gen = torch.Generator().manual_seed(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < edges // 2:
        drawn = torch.randint(0, nodes, (edges // 2 - len(pairs), 2), generator=gen).tolist()
        pairs.update((min(a, b), max(a, b)) for a, b in drawn if a != b)
    src, dst = torch.tensor(sorted(pairs)[: edges // 2]).t()
    return torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])


class HandwrittenGCNConv(nn.Module):
    """GCN layer without PyG: D^-1/2 (A + I) D^-1/2 X W + b, with `index_add_` aggregation.
    Static shapes (PyG's `GCNConv` drops existing self loops with a data-dependent mask)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.lin = nn.Linear(cin, cout, bias=False)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        loops = torch.arange(n, device=x.device)
        src = torch.cat([edge_index[0], loops])
        dst = torch.cat([edge_index[1], loops])
        deg = torch.zeros(n, dtype=x.dtype).index_add_(0, dst, torch.ones_like(dst, dtype=x.dtype))
        norm = deg.rsqrt()[src] * deg.rsqrt()[dst]
        h = self.lin(x)
        out = torch.zeros_like(h).index_add_(0, dst, h[src] * norm[:, None])
        return out + self.bias


class GCN(nn.Module):
    """Two-layer GCN (Kipf & Welling) for node classification: conv, ReLU, conv. Uses PyG's
    `GCNConv` when `pyg` and PyTorch Geometric imports, else `HandwrittenGCNConv`."""

    def __init__(self, cin: int, hidden: int, classes: int, pyg: bool = True):
        super().__init__()
        conv = _pyg_gcn_conv() if pyg else None
        if conv is None:
            conv = HandwrittenGCNConv
        self.conv1 = conv(cin, hidden)
        self.conv2 = conv(hidden, classes)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)


def pyg_layer(kind: str, cin: int, cout: int) -> nn.Module:
    import torch_geometric.nn as pyg

    layers: dict[str, Callable[[], nn.Module]] = {
        "gcn": lambda: pyg.GCNConv(cin, cout),
        "sage": lambda: pyg.SAGEConv(cin, cout, aggr="mean"),
        "sage_max": lambda: pyg.SAGEConv(cin, cout, aggr="max"),
        "gat": lambda: pyg.GATConv(cin, cout // 4, heads=4),
    }
    if kind not in layers:
        raise ValueError(f"unknown PyG layer {kind!r}; valid: {', '.join(sorted(layers))}")
    return layers[kind]()


class PygLayer(nn.Module):
    """One PyTorch Geometric layer on (x, edge_index), built by name from a config: gcn
    (GCNConv), sage / sage_max (SAGEConv, mean / max aggregation), gat (GATConv, 4 heads)."""

    def __init__(self, kind: str, cin: int, cout: int):
        super().__init__()
        self.layer = pyg_layer(kind, cin, cout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.layer(x, edge_index)  # type: ignore[no-any-return]


def build_pyg_layer(kind: str = "gcn", nodes: int = 10000, edges: int = 100000, cin: int = 64,
                    cout: int = 64) -> Built:
    torch.manual_seed(SEED)
    x, edge_index = torch.randn(nodes, cin), random_graph(nodes, edges)
    return _finish(PygLayer(kind, cin, cout), x, edge_index)


class PygRGCNLayer(nn.Module):
    """PyTorch Geometric's `RGCNConv` (mean per relation, root weight, bias) on (x, edge_index,
    edge_type). Its default segment-matmul heuristic reads `int(segment_count.max())`, which
    torch.export cannot capture; `capture` fixes that choice while exporting (see there)."""

    def __init__(self, cin: int, cout: int, relations: int):
        super().__init__()
        from torch_geometric.nn import RGCNConv

        self.layer = RGCNConv(cin, cout, relations)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor
                ) -> torch.Tensor:
        return self.layer(x, edge_index, edge_type)  # type: ignore[no-any-return]


def build_rgcn_layer(nodes: int = 10000, edges: int = 100000, cin: int = 64, cout: int = 64,
                     relations: int = 8) -> Built:
    torch.manual_seed(SEED)
    x, edge_index = torch.randn(nodes, cin), random_graph(nodes, edges)
    gen = torch.Generator().manual_seed(SEED + 1)
    edge_type = torch.randint(0, relations, (edge_index.shape[1],), generator=gen)
    return _finish(PygRGCNLayer(cin, cout, relations), x, edge_index, edge_type)


def _pyg_gcn_conv() -> type[nn.Module] | None:
    try:
        from torch_geometric.nn import GCNConv
    except ImportError:
        return None
    return GCNConv  # type: ignore[no-any-return]


def build_gcn_2layer(nodes: int = 200, edges: int = 1000, cin: int = 64, hidden: int = 64,
                     classes: int = 16, pyg: bool = True) -> Built:
    torch.manual_seed(SEED)
    model = GCN(cin, hidden, classes, pyg)
    return _finish(model, torch.randn(nodes, cin), random_graph(nodes, edges))


# -------------------------------------------------------------------------------- registry
def _entry(name: str, family: str, description: str, build: Callable[..., Built],
           **small: int) -> ZooEntry:
    return ZooEntry(name, family, description, build, partial(build, **small))


ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    _entry("resnet_basic_block", "conv", "ResNet-18 basic block, 64 ch, 56x56",
           build_resnet_basic_block, ch=8, hw=8),
    _entry("resnet_bottleneck", "conv", "ResNet-50 bottleneck 256->64->256, 56x56",
           build_resnet_bottleneck, ch=32, mid=8, hw=8),
    _entry("mobilenetv2_block", "conv", "MobileNetV2 inverted residual 24->144->24, 56x56",
           build_mobilenetv2_block, ch=8, hw=8),
    _entry("mobilenetv3_block_se", "conv", "MobileNetV3 block 40->120->40, 5x5 dw, SE, 28x28",
           build_mobilenetv3_block_se, ch=8, hid=24, squeeze=8, hw=8),
    _entry("convnext_block", "conv", "ConvNeXt-T block, 96 ch, 56x56",
           build_convnext_block, dim=16, hw=8),
    _entry("small_cnn", "conv", "whole tiny CNN: 3 conv stages, pools, linear head, 3x32x32",
           build_small_cnn, width=8, hw=16),
    _entry("transformer_encoder_layer", "transformer",
           "nn.TransformerEncoderLayer d=256, 4 heads, ff 1024, seq 64",
           build_transformer_encoder_layer, d_model=32, nhead=2, ff=64, seq=8),
    _entry("bert_like_attention", "transformer",
           "HF BERT attention written out, hidden 256, 4 heads, seq 64, padding mask",
           build_bert_like_attention, hidden=32, heads=2, seq=8),
    _entry("attention_core", "attention",
           "BERT-base attention core: softmax(QK^T/sqrt(d) + padding mask) V, 12 heads, 128x64",
           build_attention_core, heads=2, seq=9, head_dim=8),
    _entry("causal_attention_core", "attention",
           "GPT-2 attention core: causal where(tril, QK^T/sqrt(d), min), softmax, V; 12x128x64",
           partial(build_attention_core, causal=True), heads=2, seq=9, head_dim=8),
    _entry("sdpa_attention", "attention",
           "F.scaled_dot_product_attention with a padding mask, 12 heads, 128x64",
           partial(build_attention_core, sdpa=True), heads=2, seq=9, head_dim=8),
    _entry("mlp", "mlp", "3 linear layers with GELU, 256->1024->1024->256",
           build_mlp, d_in=16, hidden=32, d_out=8),
    _entry("gcn_2layer", "gnn", "2-layer GCN, 200 nodes, 1000 edges, 64->64->16",
           build_gcn_2layer, nodes=20, edges=60, cin=8, hidden=8, classes=4),
    _entry("gcn_2layer_handwritten", "gnn",
           "gcn_2layer without PyG: normalized adjacency with index_add_, static shapes",
           partial(build_gcn_2layer, pyg=False), nodes=20, edges=60, cin=8, hidden=8, classes=4),
    *[_entry(f"{kind}_layer", "gnn", f"one PyG {kind} layer, 10k nodes, 100k edges, 64->64",
             partial(build_pyg_layer, kind), nodes=12, edges=40, cin=7, cout=20)
      for kind in ("gcn", "sage", "sage_max", "gat")],
    _entry("rgcn_layer", "gnn", "PyG RGCNConv, 10k nodes, 100k edges, 8 relations, 64->64",
           build_rgcn_layer, nodes=12, edges=40, cin=7, cout=5, relations=3),
    _entry("searchsorted_embedding", "host_op",
           "bucketized features via torch.searchsorted (no TVM import), embeddings, MLP",
           build_searchsorted_embedding, d_in=8, features=4, buckets=8, dim=4),
]}
