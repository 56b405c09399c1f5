"""Architecture families the latency predictor is trained and checked on.

Goes in: a family name ("cnn", "mobilenet", "resnet", "transformer", "gnn"), a random generator
and whether to sample in the training range or beyond it (`ood`: wider, deeper, larger inputs,
the predictor's out-of-distribution split). Comes out: an `Architecture`, a JSON config that
builds the same `nn.Module` with the same random weights and example inputs on every machine.

These are parametric families in the style of the usual NAS spaces (plain CNNs, MobileNetV2
inverted residuals with optional squeeze-excite, ResNet basic/bottleneck stages, pre-norm
transformer encoders, GCN stacks); the architecture-search issue replaces them with its
device-specific spaces. Every model is eval-mode, batch 1, float32.
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


def _image(cfg: Config) -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, 3, cfg["resolution"], cfg["resolution"]),)


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


def build_zoo(cfg: Config) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    return ZOO[cfg["name"]].build()


SPACES: dict[str, Space] = {s.name: s for s in (
    Space("cnn", sample_cnn, build_cnn),
    Space("mobilenet", sample_mobilenet, build_mobilenet),
    Space("resnet", sample_resnet, build_resnet),
    Space("transformer", sample_transformer, build_transformer),
    Space("gnn", sample_gnn, build_gnn),
)}
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
    """`count` distinct architectures of `space` ("all": round-robin over every family;
    "nas:<name>": of an architecture-search space, `hwaware.nas.get_space(name)`)."""
    if space.startswith(NAS_PREFIX):
        return _sample_search_space(space.removeprefix(NAS_PREFIX), count, seed, ood)
    names = list(SPACES) if space == "all" else [space]
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
