"""Builders of the search spaces: an architecture -> its blocks -> a plain `torch.nn.Module`.

Every space's network is a chain of blocks (`Chain`): each block a module of its own taking the
previous block's output (and the model's extra inputs, a GNN's edge index), so that the latency
table can decompose one block at a time and cache it (`Block`: what the block computes, and the
shape it takes; equal blocks share their kernels). A builder says:
- `blocks(arch)`: one `Block` per slot, in order (None where the slot is inactive: a block past
  its stage's depth); the same number of slots for every architecture of the space;
- `slot_genes()`: the gene positions each slot's block depends on (the table's batched path
  reads only those columns, so this must be complete: a test checks it against `blocks`);
- `module(block)`: the block's module; `block_inputs(block)`: example inputs for it alone;
- `example_inputs(arch)`: the whole model's inputs.

Add a space: a data file in `hwaware/nas/spaces/` naming a builder here, registered in
`BUILDERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from hwaware.predict.spaces import EncoderLayer, conv_bn_act, randomize_batchnorm
from hwaware.zoo import SqueezeExcite, random_graph

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}


@dataclass(frozen=True)
class Block:
    """One block: its kind, the numbers that define its module, and its input's shape."""

    kind: str
    params: tuple[Any, ...]
    input_shape: tuple[int, ...]


@dataclass(frozen=True)
class Path:
    """One way a dynamic network runs: the chain of blocks it goes through (`trunk`), the side
    blocks it also runs (exit heads it evaluated and did not take) and how often it is taken."""

    name: str
    trunk: tuple[Block, ...]
    side: tuple[Block, ...]
    probability: float


class Chain(nn.Module):
    """The blocks in order; each takes the previous output and the model's extra inputs."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, *context)
        return x


class Builder:
    """Shared by the builders: the whole model is the chain of its blocks' modules."""

    def __init__(self, space: Any):
        self.constants: dict[str, Any] = space.constants

    def blocks(self, arch: Any) -> list[Block | None]:
        raise NotImplementedError

    def slot_genes(self) -> list[list[str]]:
        raise NotImplementedError

    def module(self, block: Block) -> nn.Module:
        raise NotImplementedError

    def block_inputs(self, block: Block) -> tuple[torch.Tensor, ...]:
        return (torch.randn(block.input_shape),)

    def example_inputs(self, arch: Any) -> tuple[torch.Tensor, ...]:
        first = next(b for b in self.blocks(arch) if b is not None)
        return self.block_inputs(first)

    def build(self, arch: Any) -> nn.Module:
        return randomize_batchnorm(Chain([self.module(b) for b in self.blocks(arch)
                                          if b is not None]))

    dynamic = False  # True: `paths` has more than the one static path

    def paths(self, arch: Any, rates: Any = None) -> list[Path]:
        """The ways the network runs (a static network: one, through all its blocks). `rates`:
        a dynamic network's calibration, `rates(arch)` -> each exit's leave probability."""
        return [Path("all", tuple(b for b in self.blocks(arch) if b is not None), (), 1.0)]


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of `divisor` not below 90% of `value` (MobileNet's rule)."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


# ------------------------------------------------------------------------ OFA MobileNetV3
class MBConv(nn.Module):
    """Inverted residual as Once-for-All writes it: 1x1 expand (none at ratio 1), kxk depthwise,
    optional squeeze-excite (hardsigmoid), 1x1 project; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, k: int, mid: int, stride: int, act: str, se: bool):
        super().__init__()
        a = ACTIVATIONS[act]
        layers = conv_bn_act(cin, mid, 1, act=a) if mid != cin else []
        layers += conv_bn_act(mid, mid, k, stride, groups=mid, act=a)
        if se:
            layers.append(SqueezeExcite(mid, make_divisible(mid // 4)))
        layers += conv_bn_act(mid, cout, 1, act=None)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV3Head(nn.Module):
    """OFA MobileNetV3's tail: 1x1 expand + hardswish, global pool, 1x1 feature mix (no BN) +
    hardswish, classifier."""

    def __init__(self, cin: int, expand: int, feature: int, classes: int):
        super().__init__()
        self.expand = nn.Sequential(*conv_bn_act(cin, expand, 1, act=nn.Hardswish))
        self.mix = nn.Sequential(nn.Conv2d(expand, feature, 1, bias=False), nn.Hardswish())
        self.classifier = nn.Linear(feature, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.expand(x).mean((2, 3), keepdim=True))
        return self.classifier(torch.flatten(x, 1))


class OfaMbv3(Builder):
    """OFA MobileNetV3: stem (3x3 s2 conv + the fixed first block), 5 stages x up to 4 blocks,
    head. Genes: image_size, d[5], ks[20], e[20] (OFA's dict form)."""

    DEPTH = 4

    def blocks(self, arch: Any) -> list[Block | None]:
        c, r = self.constants, arch["image_size"]
        size = _conv_out(r, 2)
        out: list[Block | None] = [Block("stem", (c["stem_width"],), (1, 3, r, r))]
        cin = c["stem_width"]
        for s, (width, stride) in enumerate(zip(c["widths"], c["strides"], strict=True)):
            for j in range(self.DEPTH):
                i = s * self.DEPTH + j
                if j >= arch["d"][s]:
                    out.append(None)
                    continue
                step = stride if j == 0 else 1
                mid = make_divisible(round(cin * arch["e"][i]))
                out.append(Block("mbconv", (cin, width, arch["ks"][i], mid, step, c["acts"][s],
                                            c["se"][s]), (1, cin, size, size)))
                size, cin = _conv_out(size, step), width
        out.append(Block("head", (cin, c["final_expand"], c["feature_width"], c["classes"]),
                         (1, cin, size, size)))
        return out

    def slot_genes(self) -> list[list[str]]:
        stages = len(self.constants["widths"])
        per_block = [["image_size", f"d[{i // self.DEPTH}]", f"ks[{i}]", f"e[{i}]"]
                     for i in range(stages * self.DEPTH)]
        return [["image_size"], *per_block, ["image_size"]]

    def module(self, block: Block) -> nn.Module:
        if block.kind == "stem":
            (width,) = block.params
            return nn.Sequential(*conv_bn_act(3, width, 3, 2, act=nn.Hardswish),
                                 MBConv(width, width, 3, width, 1, "relu", False))
        if block.kind == "mbconv":
            return MBConv(*block.params)
        return MobileNetV3Head(*block.params)


def _conv_out(size: int, stride: int) -> int:
    return math.ceil(size / stride)


class PoolClassify(nn.Module):
    """Global average pool and a linear classifier (ResNet's head, an early exit's)."""

    def __init__(self, cin: int, classes: int):
        super().__init__()
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean((2, 3)))  # type: ignore[no-any-return]


class EarlyExitNet(nn.Module):
    """Stages of blocks with exit classifiers after some: an input leaves at the first exit
    whose softmax confidence reaches that exit's threshold (batch 1), else runs to the head."""

    def __init__(self, stem: nn.Module, stages: list[list[nn.Module]], head: nn.Module,
                 exits: dict[int, tuple[nn.Module, float]]):
        super().__init__()
        self.stem, self.head = stem, head
        self.stages = nn.ModuleList(nn.Sequential(*blocks) for blocks in stages)
        self.exit_heads = nn.ModuleDict({str(s): m for s, (m, _) in exits.items()})
        self.thresholds = {str(s): t for s, (_, t) in exits.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if str(s) in self.exit_heads:
                logits = self.exit_heads[str(s)](x)
                if torch.softmax(logits, dim=-1).max() >= self.thresholds[str(s)]:
                    return logits  # type: ignore[no-any-return]
        return self.head(x)  # type: ignore[no-any-return]


class OfaMbv3Exit(OfaMbv3):
    """OFA MobileNetV3 with early exits (a dynamic network): genes of `ofa-mbv3` plus `exit`
    (an exit classifier after each of `exit_stages`, on or off) and `threshold` (its softmax
    confidence threshold). How often an exit is taken comes from a calibration: by default the
    space's `exit_confidence` (a Beta distribution of the exit's top softmax probability per
    exit position, a stand-in for a trained supernet's), or a user's callable."""

    dynamic = True

    def _exits(self, arch: Any) -> list[tuple[int, float, int]]:
        """(stage, threshold, exit position) of each exit that is on."""
        c = self.constants
        return [(s, t, i) for i, (s, on, t) in enumerate(
            zip(c["exit_stages"], arch["exit"], arch["threshold"], strict=True)) if on]

    def _stage_ends(self, arch: Any) -> dict[int, int]:
        """Stage -> how many active blocks (stem included) run up to its end."""
        blocks, ends, count = self.blocks(arch), {}, 1
        for s in range(len(self.constants["widths"])):
            count += sum(b is not None for b in blocks[1 + s * self.DEPTH:1 + (s + 1) * self.DEPTH])
            ends[s] = count
        return ends

    def exit_rate(self, position: int, threshold: float) -> float:
        """P(an input reaching exit `position` leaves there) from the space's calibration."""
        from scipy.stats import beta

        a, b = self.constants["exit_confidence"][position]
        return float(beta.sf(threshold, a, b))

    def paths(self, arch: Any, rates: Any = None) -> list[Path]:
        active = tuple(b for b in self.blocks(arch) if b is not None)
        ends, reach, out = self._stage_ends(arch), 1.0, []
        side: tuple[Block, ...] = ()
        for stage, threshold, position in self._exits(arch):
            trunk = active[:ends[stage]]
            head = self._exit_block(trunk[-1])
            leave = rates(arch)[position] if rates else self.exit_rate(position, threshold)
            out.append(Path(f"exit{stage}", (*trunk, head), side, reach * leave))
            side, reach = (*side, head), reach * (1 - leave)
        return [*out, Path("all", active, side, reach)]

    def _exit_block(self, last: Block) -> Block:
        width, size = last.params[1], _conv_out(last.input_shape[-1], last.params[4])
        return Block("exit", (width, self.constants["classes"]), (1, width, size, size))

    def module(self, block: Block) -> nn.Module:
        return PoolClassify(*block.params) if block.kind == "exit" else super().module(block)

    def build(self, arch: Any) -> nn.Module:
        blocks = self.blocks(arch)
        stages = [[self.module(b) for b in blocks[1 + s * self.DEPTH:1 + (s + 1) * self.DEPTH]
                   if b is not None] for s in range(len(self.constants["widths"]))]
        trunk = [b for b in blocks if b is not None]
        ends = self._stage_ends(arch)
        exits = {s: (self.module(self._exit_block(trunk[ends[s] - 1])), t)
                 for s, t, _ in self._exits(arch)}
        return randomize_batchnorm(EarlyExitNet(self.module(trunk[0]), stages,
                                                self.module(trunk[-1]), exits))


# ------------------------------------------------------------------------------ OFA ResNet
class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1, 3x3 (stride), 1x1; 1x1 projection shortcut when the shape
    changes; ReLU after the sum."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn_act(cin, mid, 1), *conv_bn_act(mid, mid, 3, stride),
                                  *conv_bn_act(mid, cout, 1, act=None))
        self.shortcut = nn.Sequential(*conv_bn_act(cin, cout, 1, stride, act=None)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetStem(nn.Module):
    """OFA-ResNet's input stem: 3x3 s2 conv, an optional residual 3x3 conv, 3x3 conv, max pool."""

    def __init__(self, mid: int, keep_residual: bool, width: int):
        super().__init__()
        self.first = nn.Sequential(*conv_bn_act(3, mid, 3, 2))
        self.residual = nn.Sequential(*conv_bn_act(mid, mid, 3)) if keep_residual else None
        self.last = nn.Sequential(*conv_bn_act(mid, width, 3), nn.MaxPool2d(3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        if self.residual is not None:
            x = x + self.residual(x)
        return self.last(x)  # type: ignore[no-any-return]


class OfaResNet(Builder):
    """OFA-ResNet50: stem, 4 bottleneck stages of base depth + d extra blocks, head. Genes:
    image_size, d[5] (d[0]: stem residual kept at 0), e[18], w[6] (width multiplier index of
    the stem's two convs and the four stages)."""

    def _width(self, base: int, w: int) -> int:
        return make_divisible(base * self.constants["width_mults"][w])

    def _depths(self) -> list[int]:
        return [b + 2 for b in self.constants["base_depths"]]

    def blocks(self, arch: Any) -> list[Block | None]:
        c, r, w = self.constants, arch["image_size"], arch["w"]
        cin = self._width(c["stem_widths"][1], w[1])
        stem = Block("stem", (self._width(c["stem_widths"][0], w[0]), arch["d"][0] == 0, cin),
                     (1, 3, r, r))
        out: list[Block | None] = [stem]
        size, i = _conv_out(_conv_out(r, 2), 2), 0
        for s, (slots, stride) in enumerate(zip(self._depths(), c["strides"], strict=True)):
            width = self._width(c["stage_widths"][s], w[2 + s])
            for j in range(slots):
                if j >= c["base_depths"][s] + arch["d"][1 + s]:
                    out.append(None)
                else:
                    step = stride if j == 0 else 1
                    mid = make_divisible(round(width * arch["e"][i]))
                    out.append(Block("bottleneck", (cin, mid, width, step), (1, cin, size, size)))
                    size, cin = _conv_out(size, step), width
                i += 1
        return [*out, Block("head", (cin, c["classes"]), (1, cin, size, size))]

    def slot_genes(self) -> list[list[str]]:
        stages = [s for s, slots in enumerate(self._depths()) for _ in range(slots)]
        blocks = [["image_size", f"d[{1 + s}]", f"e[{i}]", f"w[{2 + s}]", f"w[{1 + s}]"]
                  for i, s in enumerate(stages)]
        return [["image_size", "d[0]", "w[0]", "w[1]"], *blocks, ["image_size", "w[5]"]]

    def module(self, block: Block) -> nn.Module:
        kinds: dict[str, type[nn.Module]] = {"stem": ResNetStem, "bottleneck": Bottleneck,
                                             "head": PoolClassify}
        return kinds[block.kind](*block.params)


# ----------------------------------------------------------------------------- transformer
class Embed(nn.Module):
    """Token and learned position embeddings."""

    def __init__(self, vocab: int, hidden: int, seq: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.positions = nn.Parameter(torch.randn(1, seq, hidden) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions  # type: ignore[no-any-return]


class NormPoolClassify(nn.Module):
    """Final LayerNorm, mean over the sequence, linear classifier."""

    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(x).mean(1))  # type: ignore[no-any-return]


class Transformer(Builder):
    """Encoder-only transformer: embedding, up to 6 pre-norm encoder layers (heads and MLP
    ratio per layer), pooled classifier. Genes: layers, hidden, seq, heads[6], mlp_ratio[6]."""

    def blocks(self, arch: Any) -> list[Block | None]:
        c, h, seq = self.constants, arch["hidden"], arch["seq"]
        out: list[Block | None] = [Block("embed", (c["vocab"], h, seq), (1, seq))]
        for i, (heads, ratio) in enumerate(zip(arch["heads"], arch["mlp_ratio"], strict=True)):
            active = i < arch["layers"]
            out.append(Block("encoder", (h, heads, h * ratio), (1, seq, h)) if active else None)
        return [*out, Block("classify", (h, c["classes"]), (1, seq, h))]

    def slot_genes(self) -> list[list[str]]:
        return [["hidden", "seq"],
                *[["layers", "hidden", "seq", f"heads[{i}]", f"mlp_ratio[{i}]"]
                  for i in range(6)], ["hidden", "seq"]]

    def module(self, block: Block) -> nn.Module:
        kinds: dict[str, type[nn.Module]] = {"embed": Embed, "encoder": EncoderLayer,
                                             "classify": NormPoolClassify}
        return kinds[block.kind](*block.params)

    def block_inputs(self, block: Block) -> tuple[torch.Tensor, ...]:
        if block.kind == "embed":
            return (torch.randint(0, block.params[0], block.input_shape),)
        return super().block_inputs(block)


# ------------------------------------------------------------------------------------ GNN
class GNNLayer(nn.Module):
    """One PyTorch Geometric message-passing layer, ReLU after it unless it is the last."""

    def __init__(self, aggregator: str, cin: int, cout: int, heads: int, last: bool):
        super().__init__()
        import torch_geometric.nn as pyg

        if aggregator == "attention":
            self.conv: nn.Module = pyg.GATConv(cin, cout // heads, heads=heads)
        elif aggregator == "sum":
            self.conv = pyg.GraphConv(cin, cout, aggr="add")
        else:
            self.conv = pyg.SAGEConv(cin, cout, aggr=aggregator)
        self.last = last

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        y = self.conv(x, edge_index)
        return y if self.last else torch.relu(y)


class Gnn(Builder):
    """A stack of 1-4 message-passing layers on a fixed random graph. Genes: aggregator,
    hidden, layers, heads (GATConv's, for the attention aggregator)."""

    SLOTS = 4

    def blocks(self, arch: Any) -> list[Block | None]:
        c, n = self.constants, arch["layers"]
        heads = arch["heads"] if arch["aggregator"] == "attention" else 1
        out: list[Block | None] = []
        for i in range(self.SLOTS):
            cin = c["features"] if i == 0 else arch["hidden"]
            cout = c["classes"] if i == n - 1 else arch["hidden"]
            out.append(Block("gnn", (arch["aggregator"], cin, cout, heads, i == n - 1),
                             (c["nodes"], cin)) if i < n else None)
        return out

    def slot_genes(self) -> list[list[str]]:
        return [["aggregator", "hidden", "layers", "heads"]] * self.SLOTS

    def module(self, block: Block) -> nn.Module:
        try:
            return GNNLayer(*block.params)
        except ImportError as e:
            raise ImportError("the gnn space builds PyTorch Geometric layers: "
                              "pip install torch_geometric") from e

    def block_inputs(self, block: Block) -> tuple[torch.Tensor, ...]:
        return (torch.randn(block.input_shape), self.edges())

    def edges(self) -> torch.Tensor:
        return _graph(self.constants["nodes"], self.constants["edges"])


@lru_cache(maxsize=8)
def _graph(nodes: int, edges: int) -> torch.Tensor:
    """The space's fixed random graph (seeded, the same on every machine)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return random_graph(nodes, edges)
    finally:
        torch.random.set_rng_state(state)


BUILDERS: dict[str, type[Builder]] = {
    "ofa_mbv3": OfaMbv3,
    "ofa_mbv3_exit": OfaMbv3Exit,
    "ofa_resnet": OfaResNet,
    "transformer": Transformer,
    "gnn": Gnn,
}
