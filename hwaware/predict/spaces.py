"""Architecture families the latency predictor is trained and checked on.

Goes in: a family name ("cnn", "mobilenet", "resnet", "transformer", "gnn", "block"), a random
generator and whether to sample in the training range or beyond it (`ood`: wider, deeper,
larger inputs, the predictor's out-of-distribution split). Comes out: an `Architecture`, a
JSON config that builds the same `nn.Module` with the same random weights and example inputs
on every machine.

These are parametric families in the style of the usual NAS spaces (plain CNNs, MobileNetV2
inverted residuals with optional squeeze-excite, ResNet basic/bottleneck stages, pre-norm
transformer encoders, GCN stacks), small whole networks; and "block": one block of the kinds
real networks are made of (convolution, residual, inverted residual, ConvNeXt, encoder layer,
attention, MLP, GNN layer) at the sizes they run at (ImageNet stages, BERT-base-sized layers,
graphs of thousands of nodes), as nn-Meter samples its kernels, so that kernels as large as
real models' are measured, not extrapolated to. Every model is eval-mode, batch 1, float32.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hwaware.zoo import ZOO, HandwrittenGCNConv, SqueezeExcite, pyg_layer, random_graph

Config = dict[str, Any]


@dataclass(frozen=True)
class Architecture:
    """One sampled network: its family and the config that builds it."""

    space: str
    config: Config

    @property
    def id(self) -> str:
        """A stable name: the family and a hash of the config."""
        text = json.dumps(self.config, sort_keys=True)
        return f"{self.space}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        """The eval-mode module with seeded random weights, and its example inputs."""
        torch.manual_seed(int(self.id.rsplit("-", 1)[1], 16) % (2**31))
        space = ZOO_SPACE if self.space == "zoo" else SPACES[self.space]
        model, inputs = space.build(self.config)
        return model.eval(), inputs

    def to_json(self) -> dict[str, Any]:
        return {"space": self.space, "config": self.config}


# ------------------------------------------------------------------------------ CNN blocks
def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return layers


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random BN statistics: fresh BN layers are the identity and would fold into nothing."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None \
                and m.running_var is not None:
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand (skipped at ratio 1), kxk depthwise, optional SE, 1x1
    project; a residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, se: bool):
        super().__init__()
        hid = cin * expand
        layers = conv_bn_act(cin, hid, 1, act=nn.ReLU6) if expand > 1 else []
        layers += conv_bn_act(hid, hid, k, stride, groups=hid, act=nn.ReLU6)
        if se:
            layers.append(SqueezeExcite(hid, max(4, hid // 4), gate=torch.sigmoid))
        layers += conv_bn_act(hid, cout, 1, act=None)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class _ResBlock(nn.Module):
    """ResNet basic (bottleneck=0) or bottleneck block, projection shortcut when needed."""

    def __init__(self, cin: int, cout: int, stride: int, bottleneck: int):
        super().__init__()
        if bottleneck:
            mid = max(8, cout // bottleneck)
            body = [*conv_bn_act(cin, mid, 1), *conv_bn_act(mid, mid, 3, stride),
                    *conv_bn_act(mid, cout, 1, act=None)]
        else:
            body = [*conv_bn_act(cin, cout, 3, stride), *conv_bn_act(cout, cout, 3, act=None)]
        self.body = nn.Sequential(*body)
        self.shortcut = nn.Sequential(*conv_bn_act(cin, cout, 1, stride, act=None)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _head(ch: int, classes: int = 10) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, classes)]


def _image(cfg: Config, channels: int = 3) -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, channels, cfg["resolution"], cfg["resolution"]),)


def build_cnn(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    layers: list[nn.Module] = []
    cin = 3
    for stage in cfg["stages"]:
        for i in range(stage["depth"]):
            layers += conv_bn_act(cin, stage["width"], stage["kernel"], 2 if i == 0 else 1)
            cin = stage["width"]
    model = nn.Sequential(*layers, *_head(cin))
    return randomize_batchnorm(model), _image(cfg)


def build_mobilenet(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    layers: list[nn.Module] = conv_bn_act(3, cfg["stem"], 3, 2, act=nn.ReLU6)
    cin = cfg["stem"]
    for b in cfg["blocks"]:
        layers.append(_MBConv(cin, b["width"], b["expand"], b["kernel"], b["stride"], b["se"]))
        cin = b["width"]
    model = nn.Sequential(*layers, *_head(cin))
    return randomize_batchnorm(model), _image(cfg)


def build_resnet(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    layers: list[nn.Module] = conv_bn_act(3, cfg["stem"], 3, 2)
    cin = cfg["stem"]
    for s, stage in enumerate(cfg["stages"]):
        for i in range(stage["depth"]):
            stride = 2 if i == 0 and s > 0 else 1
            layers.append(_ResBlock(cin, stage["width"], stride, cfg["bottleneck"]))
            cin = stage["width"]
    model = nn.Sequential(*layers, *_head(cin))
    return randomize_batchnorm(model), _image(cfg)


# ---------------------------------------------------------------------------- transformer
class EncoderLayer(nn.Module):
    """Pre-norm encoder layer written out as BERT-style code does: Q/K/V linears, scaled
    softmax attention, output linear, GELU MLP."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (f(h).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def build_transformer(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    d = cfg["d_model"]
    layers = [EncoderLayer(d, cfg["heads"], d * cfg["ffn_ratio"]) for _ in range(cfg["layers"])]
    model = nn.Sequential(*layers, nn.LayerNorm(d))
    return model, (torch.randn(1, cfg["seq"], d),)


# ------------------------------------------------------------------------------------ GNN
class _GNNStack(nn.Module):
    """Message-passing layers of one kind (handwritten GCN, or PyG's GCN, SAGE, GAT), ReLU
    between them."""

    def __init__(self, kind: str, dims: list[int]):
        super().__init__()
        pairs = zip(dims, dims[1:], strict=False)
        self.convs = nn.ModuleList(_gnn_layer(kind, a, b) for a, b in pairs)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = torch.relu(x)
        return x


def _gnn_layer(kind: str, cin: int, cout: int) -> nn.Module:
    return HandwrittenGCNConv(cin, cout) if kind == "handwritten" else pyg_layer(kind, cin, cout)


def build_gnn(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    model = _GNNStack(cfg["kind"], [cfg["features"], *cfg["hidden"], cfg["classes"]])
    edges = random_graph(cfg["nodes"], cfg["nodes"] * cfg["degree"])
    return model, (torch.randn(cfg["nodes"], cfg["features"]), edges)


# ------------------------------------------------------------------------ real-scale blocks
# Written here in their own style, not taken from the zoo: the zoo's models are the real models
# held out of training.
class _ConvNeXtStyle(nn.Module):
    """A ConvNeXt block: kxk depthwise conv, channels-last LayerNorm, 4x Linear MLP with GELU,
    layer scale, residual."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.scale = nn.Parameter(torch.empty(dim).uniform_(0.1, 0.6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.depthwise(x).permute(0, 2, 3, 1))) * self.scale
        return x + y.permute(0, 3, 1, 2)


class _AttentionOnly(nn.Module):
    """Scaled dot-product attention on per-head q, k, v [1, H, S, D], written out, with the
    causal mask as a boolean buffer applied by `masked_fill`."""

    def __init__(self, seq: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.register_buffer("future", torch.ones(seq, seq, dtype=torch.bool).triu(1))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if self.causal:
            future: torch.Tensor = self.future  # type: ignore[assignment]
            scores = scores.masked_fill(future, float("-inf"))
        return torch.matmul(scores.softmax(dim=-1), v)


def _build_conv_block(cfg: Config) -> nn.Module:
    groups = cfg["cin"] if cfg["depthwise"] else 1
    return nn.Sequential(*conv_bn_act(cfg["cin"], cfg["cout"], cfg["kernel"], cfg["stride"],
                                      groups))


BLOCK_BUILDERS: dict[str, Callable[[Config], nn.Module]] = {
    "conv": _build_conv_block,
    "res": lambda c: _ResBlock(c["cin"], c["cout"], c["stride"], c["bottleneck"]),
    "mbconv": lambda c: _MBConv(c["cin"], c["cout"], c["expand"], c["kernel"], c["stride"],
                                c["se"]),
    "convnext": lambda c: _ConvNeXtStyle(c["cin"], c["kernel"]),
    "encoder": lambda c: EncoderLayer(c["d_model"], c["heads"], c["d_model"] * c["ffn_ratio"]),
    "attention": lambda c: _AttentionOnly(c["seq"], c["causal"]),
    "mlp": lambda c: nn.Sequential(nn.Linear(c["d_model"], c["hidden"]), nn.GELU(),
                                   nn.Linear(c["hidden"], c["d_model"])),
    "gnn": lambda c: _GNNStack(c["kind"], [c["features"], c["out"]]),
}
IMAGE_BLOCKS = ("conv", "res", "mbconv", "convnext")  # blocks of an image [1, cin, res, res]


def build_block(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """One block of a real network at real scale (`sample_block`)."""
    model = randomize_batchnorm(BLOCK_BUILDERS[cfg["block"]](cfg))
    if cfg["block"] in IMAGE_BLOCKS:
        return model, _image(cfg, cfg["cin"])
    if cfg["block"] in ("encoder", "mlp"):
        return model, (torch.randn(1, cfg["tokens"], cfg["d_model"]),)
    if cfg["block"] == "attention":
        shape = (1, cfg["heads"], cfg["seq"], cfg["head_dim"])
        return model, tuple(torch.randn(shape) for _ in range(3))
    edges = random_graph(cfg["nodes"], cfg["nodes"] * cfg["degree"])  # "gnn"
    return model, (torch.randn(cfg["nodes"], cfg["features"]), edges)


# ------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Space:
    """A family: how to sample a config (in range, or `ood` beyond it) and build it."""

    name: str
    sample: Callable[[random.Random, bool], Config]
    build: Callable[[Config], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _pick(rng: random.Random, ood: bool, normal: list[Any], beyond: list[Any]) -> Any:
    return rng.choice(beyond if ood else normal)


def sample_cnn(rng: random.Random, ood: bool) -> Config:
    stages = [{"width": _pick(rng, ood, [8, 16, 24, 32, 48], [64, 96]),
               "kernel": rng.choice([1, 3, 3, 5]), "depth": rng.choice([1, 2])}
              for _ in range(rng.randint(2, 4))]
    return {"resolution": _pick(rng, ood, [32, 48, 64, 96], [128, 160]), "stages": stages}


def sample_mobilenet(rng: random.Random, ood: bool) -> Config:
    blocks = []
    for _ in range(_pick(rng, ood, [2, 3, 4, 5, 6], [8, 9])):
        blocks.append({"width": _pick(rng, ood, [8, 16, 24, 32, 40], [48, 64]),
                       "expand": rng.choice([1, 2, 3, 4, 6]), "kernel": rng.choice([3, 5]),
                       "stride": rng.choice([1, 1, 2]), "se": rng.random() < 0.3})
    return {"resolution": _pick(rng, ood, [32, 48, 64, 96], [128, 160]),
            "stem": rng.choice([8, 16]), "blocks": blocks}


def sample_resnet(rng: random.Random, ood: bool) -> Config:
    stages = [{"width": _pick(rng, ood, [16, 24, 32, 48, 64], [96, 128]),
               "depth": _pick(rng, ood, [1, 2], [3])} for _ in range(rng.randint(1, 3))]
    return {"resolution": _pick(rng, ood, [32, 48, 64, 96], [128]), "stem": rng.choice([16, 24]),
            "bottleneck": rng.choice([0, 0, 4]), "stages": stages}


def sample_transformer(rng: random.Random, ood: bool) -> Config:
    heads = rng.choice([2, 4])
    return {"d_model": heads * _pick(rng, ood, [8, 16, 24, 32], [48, 64]),
            "heads": heads, "ffn_ratio": rng.choice([2, 4]),
            "layers": _pick(rng, ood, [1, 2, 3], [4, 5]),
            "seq": _pick(rng, ood, [16, 32, 64, 128], [192, 256])}


def sample_gnn(rng: random.Random, ood: bool) -> Config:
    layers = _pick(rng, ood, [1, 2, 3], [4])
    return {"kind": rng.choice(["handwritten", "gcn", "sage", "gat"]),
            "nodes": _pick(rng, ood, [200, 400, 800, 1600], [3000, 5000]),
            "degree": rng.choice([4, 8]), "features": rng.choice([16, 32, 64]),
            "hidden": [_pick(rng, ood, [16, 32, 64], [128]) for _ in range(layers - 1)],
            "classes": rng.choice([4, 8, 16])}


# One block of the size real networks run (ImageNet CNN stages, BERT-base-sized layers,
# graphs of thousands of nodes), where the families above are small whole networks; at most
# this many multiply-accumulates, so that profiling one stays within seconds
BLOCK_MACS = 400e6
CHANNELS = [16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512]
RESOLUTIONS = [7, 14, 28, 56, 112]


def _conv_config(rng: random.Random, ood: bool) -> Config:
    cin = _pick(rng, ood, CHANNELS, [640, 768, 1024])
    depthwise = rng.random() < 0.3
    return {"cin": cin, "cout": cin if depthwise else rng.choice(CHANNELS),
            "kernel": rng.choice([1, 1, 3, 3, 5, 7]), "stride": rng.choice([1, 1, 2]),
            "depthwise": depthwise}


def _res_config(rng: random.Random, ood: bool) -> Config:
    cout = _pick(rng, ood, [32, 64, 96, 128, 192, 256, 384, 512], [768, 1024])
    stride = rng.choice([1, 1, 2])
    return {"cin": cout // stride if rng.random() < 0.7 else cout, "cout": cout,
            "stride": stride, "bottleneck": rng.choice([0, 4])}


def _mbconv_config(rng: random.Random, ood: bool) -> Config:
    widths = [16, 24, 32, 40, 48, 64, 80, 96, 112, 160, 192, 320]
    cin = _pick(rng, ood, widths, [384, 448])
    return {"cin": cin, "cout": rng.choice([cin, cin, rng.choice(widths)]),
            "expand": rng.choice([1, 3, 4, 6]), "kernel": rng.choice([3, 5, 7]),
            "stride": rng.choice([1, 1, 2]), "se": rng.random() < 0.4}


def _encoder_config(rng: random.Random, ood: bool) -> Config:
    d = _pick(rng, ood, [128, 192, 256, 384, 512, 768], [1024])
    return {"d_model": d, "heads": d // rng.choice([32, 64]), "ffn_ratio": rng.choice([2, 4]),
            "tokens": _pick(rng, ood, [16, 32, 64, 128, 197, 256], [384, 512])}


BLOCK_SAMPLERS: dict[str, Callable[[random.Random, bool], Config]] = {
    "conv": _conv_config,
    "res": _res_config,
    "mbconv": _mbconv_config,
    "convnext": lambda rng, ood: {"cin": _pick(rng, ood, [48, 64, 96, 128, 192, 256, 384],
                                               [512, 768]), "kernel": rng.choice([3, 5, 7])},
    "encoder": _encoder_config,
    "attention": lambda rng, ood: {
        "heads": rng.choice([2, 4, 8, 12, 16]), "head_dim": rng.choice([32, 64, 64, 80, 128]),
        "seq": _pick(rng, ood, [32, 64, 128, 197, 256, 384], [512, 768]),
        "causal": rng.random() < 0.5},
    "mlp": lambda rng, ood: {"d_model": (d := _pick(rng, ood, [256, 384, 512, 768], [1024])),
                             "hidden": d * rng.choice([2, 4]),
                             "tokens": rng.choice([1, 8, 32, 64, 128, 256])},
    "gnn": lambda rng, ood: {
        "kind": rng.choice(["handwritten", "gcn", "sage", "gat"]),
        "nodes": _pick(rng, ood, [2000, 5000, 10000, 20000], [40000]),
        "degree": rng.choice([4, 8, 10]), "features": rng.choice([32, 64, 128]),
        "out": rng.choice([16, 32, 64, 128])},
}


def block_macs(c: Config) -> float:
    """About how many multiply-accumulates a block's config costs (for `BLOCK_MACS`)."""
    kind = c["block"]
    pixels = c.get("resolution", 1) ** 2
    out_pixels = pixels / c.get("stride", 1) ** 2
    if kind == "conv":
        per_output = c["kernel"] ** 2 * (1 if c["depthwise"] else c["cin"])
        return float(c["cout"] * per_output * out_pixels)
    if kind == "res":
        mid = max(8, c["cout"] // c["bottleneck"]) if c["bottleneck"] else c["cout"]
        return float(9 * mid * (c["cin"] + mid) * out_pixels + 2 * c["cin"] * c["cout"] * pixels)
    if kind == "mbconv":
        hidden = c["cin"] * c["expand"]
        return float(hidden * (c["cin"] * pixels + (c["kernel"] ** 2 + c["cout"]) * out_pixels))
    if kind == "convnext":
        return float(c["cin"] * (c["kernel"] ** 2 + 8 * c["cin"]) * pixels)
    if kind in ("encoder", "mlp"):
        d, tokens = c["d_model"], c["tokens"]
        hidden = c["hidden"] if kind == "mlp" else d * c["ffn_ratio"]
        attention = 4 * d * d + 2 * tokens * d if kind == "encoder" else 0
        return float(tokens * (attention + 2 * d * hidden))
    if kind == "attention":
        return float(2 * c["heads"] * c["seq"] ** 2 * c["head_dim"])
    return float(c["nodes"] * c["features"] * c["out"] * (1 + c["degree"] / c["out"]))


def sample_block(rng: random.Random, ood: bool) -> Config:
    """One block of a real network's kind and size (`BLOCK_SAMPLERS`), its input resolution
    drawn among those that keep it under `BLOCK_MACS`."""
    while True:
        kind = rng.choice(list(BLOCK_SAMPLERS))
        cfg = {"block": kind, **BLOCK_SAMPLERS[kind](rng, ood)}
        if kind in IMAGE_BLOCKS:
            fitting = [r for r in RESOLUTIONS if block_macs({**cfg, "resolution": r}) <= BLOCK_MACS]
            if not fitting:
                continue
            cfg["resolution"] = rng.choice(fitting)
        if block_macs(cfg) <= BLOCK_MACS:
            return cfg


def build_zoo(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return ZOO[cfg["name"]].build()


SPACES: dict[str, Space] = {s.name: s for s in (
    Space("cnn", sample_cnn, build_cnn),
    Space("mobilenet", sample_mobilenet, build_mobilenet),
    Space("resnet", sample_resnet, build_resnet),
    Space("transformer", sample_transformer, build_transformer),
    Space("gnn", sample_gnn, build_gnn),
    Space("block", sample_block, build_block),
)}
# What "all" samples: the whole networks. "block" is profiled when asked for by name: trained
# on, its one-block models taught the whole-model regressor noise (`bench/data/README.md`)
NETWORK_FAMILIES = ("cnn", "mobilenet", "resnet", "transformer", "gnn")
# The built-in zoo's models at their real shapes: held out of training entirely.
REAL_MODELS = ("resnet_basic_block", "resnet_bottleneck", "mobilenetv2_block",
               "mobilenetv3_block_se", "convnext_block", "small_cnn", "transformer_encoder_layer",
               "bert_like_attention", "attention_core", "causal_attention_core", "mlp",
               "gcn_2layer", "gcn_2layer_handwritten", "gcn_layer", "sage_layer", "gat_layer")
ZOO_SPACE = Space("zoo", lambda rng, ood: {"name": rng.choice(REAL_MODELS)}, build_zoo)


def real_models() -> list[Architecture]:
    """The zoo models the predictor is checked on and never trained on."""
    return [Architecture("zoo", {"name": n}) for n in REAL_MODELS]


def sample(space: str, count: int, seed: int = 0, ood: bool = False) -> list[Any]:
    """`count` distinct architectures of `space` ("all": round-robin over `NETWORK_FAMILIES`;
    "nas:<name>": of an architecture-search space, `hwaware.nas.get_space(name)`)."""
    if space.startswith(NAS_PREFIX):
        return _sample_search_space(space.removeprefix(NAS_PREFIX), count, seed, ood)
    names = list(NETWORK_FAMILIES) if space == "all" else [space]
    unknown = [n for n in names if n not in SPACES]
    if unknown:
        raise ValueError(f"unknown search space {unknown[0]!r}; valid: all, {', '.join(SPACES)}"
                         f", or {NAS_PREFIX}<a space of `hwaware nas`>")
    rng = random.Random(f"{space}-{seed}-{ood}")
    found: dict[str, Architecture] = {}
    for _ in range(count * 20):
        name = names[len(found) % len(names)]
        arch = Architecture(name, SPACES[name].sample(rng, ood))
        found.setdefault(arch.id, arch)
        if len(found) == count:
            break
    return list(found.values())


NAS_PREFIX = "nas:"


def _sample_search_space(name: str, count: int, seed: int, ood: bool) -> list[Any]:
    """`count` distinct architectures of the architecture-search space `name`, in the form the
    profiler measures (`hwaware.nas.measure.SpaceArchitecture`). A search space has no range
    to go beyond: `ood` is refused."""
    from hwaware.nas.measure import SpaceArchitecture
    from hwaware.nas.space import get_space

    if ood:
        raise ValueError(f"{NAS_PREFIX}{name}: a search space has no out-of-range split; "
                         "profile it with --split train")
    space = get_space(name)
    found = {a.id: a for a in (SpaceArchitecture(space, arch)
                               for arch in space.sample(count * 2, seed))}
    return list(found.values())[:count]
