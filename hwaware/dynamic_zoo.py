"""Dynamic model zoo: small networks whose forward has data-dependent control flow.

Not a pipeline stage: the models that the control-flow tests compile. Goes in: a model name.
Comes out: a `DynamicCase` with an eval-mode `nn.Module` (batch 1, float32, tiny shapes), the
example inputs a user would pass to compile it, and for every path through its `forward` a
labelled set of inputs that forces that path, plus the submodule call counts that prove it.

The forwards are ordinary PyTorch as a user would write it (early `return` and `break` in loops,
`if` on tensors, `.item()`, `while` loops with Python counters, ModuleList indexing with a
data-dependent int, branching on input shape), because the compiler reads their source with
`inspect.getsource` + `ast`. They stay plain: no decorators, lambdas, comprehensions, printing,
or mutation of `self` or of Python lists.

Every builder seeds `torch.manual_seed`, so a model, its weights and its inputs are the same on
every call. The weights are random except where a builder wires a gate, router or exit head so
that *inputs* choose the path with a wide margin (far from every threshold, so small numeric
differences in a compiled model cannot flip a decision):

* Exit-head models built only from bias-free convs/linears and ReLU are positively homogeneous:
  scaling the input scales every logit. Each exit head is rescaled so that its top-1 logit gap
  on a base input is `8 * 10**k` (k = exit index); the input `base * 10**-k` then exits at k
  (gap 8, confidence >= 0.997) while every earlier exit sees a gap <= 0.8 (confidence <= 0.69).
* Gates, routers and the other exit heads read a few reserved "control" channels / features of
  the input with a strong weight (the rest of their weights are shrunk); residual blocks leave
  those channels untouched, so a control value set in the input reaches every decision.
* Recurrent halting models copy one input feature into one hidden unit, whose value sets the
  halting probability of every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Inputs = tuple[torch.Tensor, ...]
SEED = 0

EXIT_THRESHOLD = 0.9  # softmax-max confidence needed to leave at an exit head
EXIT_GAP = 8.0  # top-1 logit gap of a taken exit (confidence >= 0.997 with 10 classes)
EXIT_SCALE = 10.0  # per-exit input scale ratio for the homogeneous exit models
CONTROL_GAIN = 10.0  # weight of a control feature in a gate / exit head
GATE_BIAS = -5.0  # gate logit is -5 with the control off (0) and +5 with it on (1)
SHRINK = 0.05  # factor on the random weights of wired gates / heads / routers


@dataclass
class DynamicCase:
    """One dynamic model with inputs for each of its paths.

    `expected_calls[label]` maps dotted submodule names (as in `model.named_modules()`) to the
    number of times the submodule's forward runs for `branch_inputs[label]`; a 0 proves that
    part of the model was skipped.
    """

    name: str
    model: nn.Module  # eval mode
    example_inputs: Inputs  # what a user would pass to compile
    branch_inputs: dict[str, Inputs]  # label -> inputs forcing that path
    expected_calls: dict[str, dict[str, int]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- models
def _pool_linear(cin: int, classes: int, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes, bias=bias))


class BranchyCNN(nn.Module):
    """BranchyNet: conv stages, each followed by an exit head; leave at the first confident one."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32), in_channels: int = 3,
                 num_classes: int = 10, threshold: float = EXIT_THRESHOLD):
        super().__init__()
        self.threshold = threshold
        stages: list[nn.Module] = []
        exits: list[nn.Module] = []
        cin = in_channels
        for i, c in enumerate(channels):
            conv = nn.Conv2d(cin, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False)
            stages.append(nn.Sequential(conv, nn.ReLU()))
            exits.append(_pool_linear(c, num_classes, bias=False))
            cin = c
        self.stages = nn.ModuleList(stages)
        self.exits = nn.ModuleList(exits)
        self.head = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1), nn.ReLU(),
                                  _pool_linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, exit_head in zip(self.stages, self.exits):  # noqa: B905
            x = stage(x)
            logits = exit_head(x)
            if torch.softmax(logits, dim=-1).max() > self.threshold:
                return logits
        return self.head(x)


class ShallowDeepMLP(nn.Module):
    """Shallow-deep MLP: three internal classifiers checked one after another, no loop."""

    def __init__(self, in_dim: int = 32, hidden: int = 64, num_classes: int = 10,
                 threshold: float = EXIT_THRESHOLD):
        super().__init__()
        self.threshold = threshold
        self.fc1 = nn.Linear(in_dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden, bias=False)
        self.fc3 = nn.Linear(hidden, hidden, bias=False)
        self.fc4 = nn.Linear(hidden, hidden, bias=False)
        self.exit1 = nn.Linear(hidden, num_classes, bias=False)
        self.exit2 = nn.Linear(hidden, num_classes, bias=False)
        self.exit3 = nn.Linear(hidden, num_classes, bias=False)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        logits = self.exit1(h)
        if torch.softmax(logits, dim=-1).max() > self.threshold:
            return logits
        h = torch.relu(self.fc2(h))
        logits = self.exit2(h)
        if torch.softmax(logits, dim=-1).max() > self.threshold:
            return logits
        h = torch.relu(self.fc3(h))
        logits = self.exit3(h)
        if torch.softmax(logits, dim=-1).max() > self.threshold:
            return logits
        h = torch.relu(self.fc4(h))
        return self.head(h)


class ResidualBlock(nn.Module):
    """conv3x3-relu-conv3x3 with an identity add and a final relu."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SkipNet(nn.Module):
    """SkipNet: a small gate network per residual block decides whether the block runs."""

    def __init__(self, ch: int = 16, num_blocks: int = 4, num_classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList([ResidualBlock(ch) for _ in range(num_blocks)])
        self.gates = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, 1), nn.Sigmoid())
            for _ in range(num_blocks)
        ])
        self.head = _pool_linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, gate in zip(self.blocks, self.gates):  # noqa: B905
            if gate(x) > 0.5:
                x = block(x)
        return self.head(x)


class GatedResidualBlock(nn.Module):
    """Residual block that decides by itself (from pooled features) whether to run its body."""

    def __init__(self, ch: int):
        super().__init__()
        self.gate = nn.Linear(ch, 1)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        if g > 0.5:
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        return x


class GatedBlockResNet(nn.Module):
    """ResNet of `GatedResidualBlock`s: the control flow lives inside the submodule."""

    def __init__(self, ch: int = 16, num_blocks: int = 3, num_classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList([GatedResidualBlock(ch) for _ in range(num_blocks)])
        self.head = _pool_linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class BlockDrop(nn.Module):
    """BlockDrop: a policy network picks, up front, which residual blocks run."""

    def __init__(self, ch: int = 16, size: int = 8, num_blocks: int = 4, num_classes: int = 10):
        super().__init__()
        self.policy = nn.Linear(ch * size * size, num_blocks)
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(ch, ch, 3, padding=1))
            for _ in range(num_blocks)
        ])
        self.head = _pool_linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.policy(x.flatten(1)))
        for i, block in enumerate(self.blocks):
            if mask[0, i] > 0.5:
                x = x + block(x)
        return self.head(x)


class _RecurrentHalting(nn.Module):
    """What ACT and PonderNet share: an encoder, a recurrent cell, a halting unit, a head."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, max_steps: int,
                 threshold: float):
        super().__init__()
        self.max_steps = max_steps
        self.threshold = threshold
        self.encoder = nn.Linear(in_dim, hidden)
        self.ih = nn.Linear(in_dim, hidden)
        self.hh = nn.Linear(hidden, hidden)
        self.halt = nn.Linear(hidden, 1)
        self.out = nn.Linear(hidden, out_dim)


class ACTRNN(_RecurrentHalting):
    """Adaptive Computation Time: ponder an RNN cell until the halting mass reaches 1 - eps."""

    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 10,
                 max_steps: int = 6, eps: float = 0.01):
        super().__init__(in_dim, hidden, out_dim, max_steps, 1.0 - eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(x))
        acc = torch.zeros_like(h)
        total = 0.0
        steps = 0
        while total < self.threshold and steps < self.max_steps:
            h = torch.tanh(self.ih(x) + self.hh(h))
            p = torch.sigmoid(self.halt(h)).item()
            acc = acc + p * h
            total = total + p
            steps = steps + 1
        return self.out(acc)


class PonderNet(_RecurrentHalting):
    """PonderNet-style inference: refine a state each step, stop once lambda > threshold."""

    def __init__(self, in_dim: int = 16, hidden: int = 32, out_dim: int = 10,
                 max_steps: int = 6, threshold: float = 0.5):
        super().__init__(in_dim, hidden, out_dim, max_steps, threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(x))
        for _ in range(self.max_steps):
            h = h + torch.tanh(self.ih(x) + self.hh(h))
            lam = torch.sigmoid(self.halt(h))
            if lam > self.threshold:
                break
        return self.out(h)


class EncoderLayer(nn.Module):
    """Pre-LN transformer encoder layer written out: multi-head attention, then a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(out)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class EarlyExitTransformer(nn.Module):
    """Encoder with a classifier after every layer; leave once its prediction entropy is low."""

    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 4, mlp_dim: int = 64,
                 num_classes: int = 8, threshold: float = 0.3):
        super().__init__()
        self.threshold = threshold
        self.layers = nn.ModuleList([EncoderLayer(dim, heads, mlp_dim) for _ in range(depth)])
        self.exits = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, exit_head in zip(self.layers, self.exits):  # noqa: B905
            x = layer(x)
            logits = exit_head(x.mean(1))
            probs = torch.softmax(logits, dim=-1)
            entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum()
            if entropy < self.threshold:
                return logits
        return self.head(self.norm(x).mean(1))


class MoELayer(nn.Module):
    """Top-1 mixture of experts at batch 1: the router picks one expert MLP for the sequence."""

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.router = nn.Linear(dim, num_experts)
        self.norm = nn.LayerNorm(dim)
        self.experts = nn.ModuleList([
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(num_experts)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x.mean(1))
        idx = logits.argmax(-1).item()
        return x + self.experts[idx](self.norm(x))


class MoETop1(nn.Module):
    """Two top-1 MoE layers in sequence, then a pooled classifier."""

    def __init__(self, dim: int = 32, hidden: int = 64, num_experts: int = 4,
                 num_layers: int = 2, num_classes: int = 10):
        super().__init__()
        self.layers = nn.ModuleList([MoELayer(dim, hidden, num_experts)
                                     for _ in range(num_layers)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


class ShapeBranchNet(nn.Module):
    """Sequence model that merges token pairs (a strided path) for long inputs only."""

    def __init__(self, dim: int = 32, hidden: int = 64, num_classes: int = 10,
                 max_short: int = 32):
        super().__init__()
        self.max_short = max_short
        self.short_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.merge = nn.Linear(2 * dim, dim)
        self.long_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.max_short:
            b, n, d = x.shape
            x = self.merge(x.reshape(b, n // 2, 2 * d))
            x = x + self.long_mlp(x)
        else:
            x = x + self.short_mlp(x)
        return self.head(self.norm(x).mean(1))


class GatedMLPBlock(nn.Module):
    """Residual MLP block behind a scalar sigmoid gate computed from its input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, 1)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.sigmoid(self.gate(x)) > 0.5:
            x = x + self.fc2(torch.relu(self.fc1(x)))
        return x


class GatedEarlyExitMLP(nn.Module):
    """Gated residual MLP blocks, each followed by an exit head: both kinds of dynamism."""

    def __init__(self, dim: int = 32, hidden: int = 64, num_blocks: int = 3,
                 num_classes: int = 10, threshold: float = EXIT_THRESHOLD):
        super().__init__()
        self.threshold = threshold
        self.blocks = nn.ModuleList([GatedMLPBlock(dim, hidden) for _ in range(num_blocks)])
        self.exits = nn.ModuleList([nn.Linear(dim, num_classes) for _ in range(num_blocks)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, exit_head in zip(self.blocks, self.exits):  # noqa: B905
            x = block(x)
            logits = exit_head(x)
            if torch.softmax(logits, dim=-1).max() > self.threshold:
                return logits
        return self.head(x)


# --------------------------------------------------------------------------------- wiring
def _linear(m: nn.Module) -> nn.Linear:
    assert isinstance(m, nn.Linear), type(m)
    return m


@torch.no_grad()
def _set_exit_gap(head: nn.Linear, logits: torch.Tensor, gap: float) -> None:
    """Rescale a bias-free head so that `logits` (its output on some input) gets top-1 gap `gap`."""
    assert head.bias is None, "homogeneous exits need bias-free heads"
    top2 = logits.flatten().topk(2).values
    head.weight.mul_(gap / float(top2[0] - top2[1]))


@torch.no_grad()
def _wire(linear: nn.Linear, rows_to_features: dict[int, int], gain: float = CONTROL_GAIN,
          bias: float | None = None) -> None:
    """Shrink a linear layer's random weights; give output row r a strong weight on feature f."""
    linear.weight.mul_(SHRINK)
    if linear.bias is not None:
        linear.bias.mul_(SHRINK)
        if bias is not None:
            linear.bias.fill_(bias)
    for row, feature in rows_to_features.items():
        linear.weight[row, feature] += gain


@torch.no_grad()
def _protect(out_layer: nn.Module, n: int) -> None:
    """Zero the first `n` output rows of a conv/linear, so a residual add leaves them alone."""
    assert isinstance(out_layer, nn.Conv2d | nn.Linear)
    out_layer.weight[:n] = 0.0
    if out_layer.bias is not None:
        out_layer.bias[:n] = 0.0


def _with_controls(base: torch.Tensor, dim: int, controls: dict[int, float]) -> torch.Tensor:
    """A copy of `base` with index `i` along `dim` set to the constant `controls[i]`."""
    x = base.clone()
    for i, value in controls.items():
        x.select(dim, i).fill_(value)
    return x


def _exit_calls(steps: list[list[str]], tail: list[str], taken: int | None) -> dict[str, int]:
    """Call counts for "run steps 0..taken, leave there" (taken=None: all steps, then the tail)."""
    last = len(steps) - 1 if taken is None else taken
    calls = {name: int(i <= last) for i, names in enumerate(steps) for name in names}
    calls.update(dict.fromkeys(tail, int(taken is None)))
    return calls


def _bits(n: int, on: tuple[int, ...]) -> list[int]:
    return [int(i in on) for i in range(n)]


def _case(name: str, model: nn.Module, example: Inputs, branches: Mapping[str, Inputs],
          calls: dict[str, dict[str, int]]) -> DynamicCase:
    def detach(inputs: Inputs) -> Inputs:
        return tuple(t.detach() for t in inputs)

    return DynamicCase(name, model.eval(), detach(example),
                       {label: detach(inputs) for label, inputs in branches.items()}, calls)


# -------------------------------------------------------------------------------- builders
def build_branchy_cnn() -> DynamicCase:
    torch.manual_seed(SEED)
    model = BranchyCNN().eval()
    base = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        h = base
        for k, (stage, exit_head) in enumerate(zip(model.stages, model.exits, strict=True)):
            assert isinstance(exit_head, nn.Sequential)
            h = stage(h)
            _set_exit_gap(_linear(exit_head[-1]), exit_head(h), EXIT_GAP * EXIT_SCALE**k)
    n = len(model.stages)
    steps = [[f"stages.{i}", f"exits.{i}"] for i in range(n)]
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for k in range(n):
        branches[f"exit{k}"] = (base * EXIT_SCALE**-k,)
        calls[f"exit{k}"] = _exit_calls(steps, ["head"], k)
    branches["final"] = (base * EXIT_SCALE**-n,)
    calls["final"] = _exit_calls(steps, ["head"], None)
    return _case("branchy_cnn", model, (torch.randn(1, 3, 16, 16),), branches, calls)


def build_shallow_deep_mlp() -> DynamicCase:
    torch.manual_seed(SEED)
    model = ShallowDeepMLP().eval()
    base = torch.randn(1, 32)
    fcs = [model.fc1, model.fc2, model.fc3]
    exits = [model.exit1, model.exit2, model.exit3]
    with torch.no_grad():
        h = base
        for k, (fc, exit_head) in enumerate(zip(fcs, exits, strict=True)):
            h = torch.relu(fc(h))
            _set_exit_gap(exit_head, exit_head(h), EXIT_GAP * EXIT_SCALE**k)
    steps = [[f"fc{k}", f"exit{k}"] for k in (1, 2, 3)]
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for k in range(3):
        branches[f"exit{k + 1}"] = (base * EXIT_SCALE**-k,)
        calls[f"exit{k + 1}"] = _exit_calls(steps, ["fc4", "head"], k)
    branches["final"] = (base * EXIT_SCALE**-3,)
    calls["final"] = _exit_calls(steps, ["fc4", "head"], None)
    return _case("shallow_deep_mlp", model, (torch.randn(1, 32),), branches, calls)


# label -> indices of the gated blocks that run (None: all; negative: counted from the end)
_GATE_PATTERNS: dict[str, tuple[int, ...] | None] = {
    "skip_all": (), "skip_none": None, "mixed": (0, 2), "last_only": (-1,),
}


def _gate_labels(n: int) -> dict[str, list[int]]:
    """label -> which of `n` gated blocks run."""
    out = {}
    for label, on in _GATE_PATTERNS.items():
        out[label] = [1] * n if on is None else _bits(n, tuple(i % n for i in on))
    return out


def build_skipnet() -> DynamicCase:
    torch.manual_seed(SEED)
    model = SkipNet().eval()
    n = len(model.blocks)
    base = torch.randn(1, 16, 8, 8)
    for i, (block, gate) in enumerate(zip(model.blocks, model.gates, strict=True)):
        assert isinstance(block, ResidualBlock) and isinstance(gate, nn.Sequential)
        _protect(block.conv2, n)  # channels 0..n-1 carry the gate controls through the blocks
        _wire(_linear(gate[2]), {0: i}, bias=GATE_BIAS)
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for label, run in _gate_labels(n).items():
        branches[label] = (_with_controls(base, 1, {i: float(r) for i, r in enumerate(run)}),)
        calls[label] = {"head": 1}
        for i, r in enumerate(run):
            calls[label] |= {f"gates.{i}": 1, f"blocks.{i}": r}
    return _case("skipnet", model, (torch.randn(1, 16, 8, 8),), branches, calls)


def build_gated_block_resnet() -> DynamicCase:
    torch.manual_seed(SEED)
    model = GatedBlockResNet().eval()
    n = len(model.blocks)
    base = torch.randn(1, 16, 12, 12)
    for i, block in enumerate(model.blocks):
        assert isinstance(block, GatedResidualBlock)
        _protect(block.conv2, n)
        _wire(block.gate, {0: i}, bias=GATE_BIAS)
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for label, run in _gate_labels(n).items():
        branches[label] = (_with_controls(base, 1, {i: float(r) for i, r in enumerate(run)}),)
        calls[label] = {"head": 1}
        for i, r in enumerate(run):
            calls[label] |= {f"blocks.{i}": 1, f"blocks.{i}.gate": 1, f"blocks.{i}.conv1": r,
                             f"blocks.{i}.conv2": r}
    return _case("gated_block_resnet", model, (torch.randn(1, 16, 12, 12),), branches, calls)


def build_blockdrop() -> DynamicCase:
    torch.manual_seed(SEED)
    ch, size = 16, 8
    model = BlockDrop(ch=ch, size=size).eval()
    n = len(model.blocks)
    with torch.no_grad():
        model.policy.weight.mul_(SHRINK)
        model.policy.bias.fill_(GATE_BIAS)
        for i in range(n):  # block i runs when channel i of the input averages 1
            model.policy.weight[i, i * size * size:(i + 1) * size * size] += CONTROL_GAIN / size**2
    base = torch.randn(1, ch, size, size)
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for label, run in _gate_labels(n).items():
        branches[label] = (_with_controls(base, 1, {i: float(r) for i, r in enumerate(run)}),)
        calls[label] = {"policy": 1, "head": 1} | {f"blocks.{i}": r for i, r in enumerate(run)}
    return _case("blockdrop", model, (torch.randn(1, ch, size, size),), branches, calls)


@torch.no_grad()
def _wire_halting_unit(encoder: nn.Linear, ih: nn.Linear, hh: nn.Linear, halt: nn.Linear,
                       halt_gain: float, halt_bias: float) -> None:
    """Hidden unit 0 becomes tanh(x[0]) (ACT) or grows by tanh(x[0]) a step (PonderNet), starting
    at 0; the halting logit is `halt_gain * h[0] + halt_bias` plus a tiny random rest."""
    encoder.weight[0] = 0.0
    encoder.bias[0] = 0.0
    ih.weight[0] = 0.0
    ih.weight[0, 0] = 1.0
    ih.bias[0] = 0.0
    hh.weight[0] = 0.0
    hh.bias[0] = 0.0
    halt.weight.mul_(0.01 * SHRINK)
    halt.weight[0, 0] = halt_gain
    halt.bias.fill_(halt_bias)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _recurrent_case(name: str, model: ACTRNN | PonderNet, controls: dict[str, float],
                    steps: dict[str, int]) -> DynamicCase:
    base = 0.5 * torch.randn(1, 16)
    branches = {label: (_with_controls(base, 1, {0: c}),) for label, c in controls.items()}
    calls = {label: {"encoder": 1, "ih": s, "hh": s, "halt": s, "out": 1}
             for label, s in steps.items()}
    return _case(name, model, (torch.randn(1, 16),), branches, calls)


def build_act_rnn() -> DynamicCase:
    torch.manual_seed(SEED)
    model = ACTRNN().eval()
    gain, bias = 8.0, -2.0  # p = sigmoid(8 tanh(x0) - 2), the same every step
    _wire_halting_unit(model.encoder, model.ih, model.hh, model.halt, gain, bias)
    # p = 0.4 a step: halting mass 0.4, 0.8, 1.2 -> three steps
    three = math.atanh((_logit(0.4) - bias) / gain)
    controls = {"steps1": 3.0, "steps3": three, "max_steps": -3.0}
    steps = {"steps1": 1, "steps3": 3, "max_steps": model.max_steps}
    return _recurrent_case("act_rnn", model, controls, steps)


def build_pondernet() -> DynamicCase:
    torch.manual_seed(SEED)
    model = PonderNet().eval()
    gain, bias = 6.0, -3.0  # lambda_t = sigmoid(6 t tanh(x0) - 3): halts once t tanh(x0) > 0.5
    _wire_halting_unit(model.encoder, model.ih, model.hh, model.halt, gain, bias)
    controls = {"steps1": 3.0, "steps3": math.atanh(0.2), "max_steps": -3.0}
    steps = {"steps1": 1, "steps3": 3, "max_steps": model.max_steps}
    return _recurrent_case("pondernet", model, controls, steps)


def build_early_exit_transformer() -> DynamicCase:
    torch.manual_seed(SEED)
    model = EarlyExitTransformer().eval()
    depth = len(model.layers)
    scale = 20.0  # input value of a control feature; exit k's class-k logit is ~0.5 * scale
    for k, exit_head in enumerate(model.exits):
        _wire(_linear(exit_head), {k: k}, gain=0.5)
    base = 0.5 * torch.randn(1, 16, 32)
    steps = [[f"layers.{k}", f"exits.{k}"] for k in range(depth)]
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for k in range(depth):
        branches[f"exit{k}"] = (_with_controls(base, 2, {k: scale}),)
        calls[f"exit{k}"] = _exit_calls(steps, ["norm", "head"], k)
    branches["final"] = (base,)
    calls["final"] = _exit_calls(steps, ["norm", "head"], None)
    return _case("early_exit_transformer", model, (torch.randn(1, 16, 32),), branches, calls)


def build_moe_top1() -> DynamicCase:
    torch.manual_seed(SEED)
    model = MoETop1().eval()
    num_layers = len(model.layers)
    num_experts = 4
    for layer_index, layer in enumerate(model.layers):
        assert isinstance(layer, MoELayer)
        # expert e of layer l is chosen when feature l * E + e of the input is large
        _wire(layer.router, {e: layer_index * num_experts + e for e in range(num_experts)},
              gain=1.0)
    base = 0.5 * torch.randn(1, 8, 32)
    routes = {f"expert{e}": [e] * num_layers for e in range(num_experts)}
    routes["mixed"] = [(1 + 2 * layer_index) % num_experts for layer_index in range(num_layers)]
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for label, route in routes.items():
        controls = {layer_index * num_experts + e: 10.0 for layer_index, e in enumerate(route)}
        branches[label] = (_with_controls(base, 2, controls),)
        calls[label] = {"head": 1}
        for layer_index, chosen in enumerate(route):
            calls[label][f"layers.{layer_index}.router"] = 1
            for e in range(num_experts):
                calls[label][f"layers.{layer_index}.experts.{e}"] = int(e == chosen)
    return _case("moe_top1", model, (torch.randn(1, 8, 32),), branches, calls)


def build_shape_branch() -> DynamicCase:
    torch.manual_seed(SEED)
    model = ShapeBranchNet().eval()
    lengths = {"short": 16, "boundary": model.max_short, "long": 48}
    branches = {label: (torch.randn(1, n, 32),) for label, n in lengths.items()}
    calls = {}
    for label, n in lengths.items():
        long = int(n > model.max_short)
        calls[label] = {"short_mlp": 1 - long, "merge": long, "long_mlp": long, "head": 1}
    return _case("shape_branch", model, (torch.randn(1, 24, 32),), branches, calls)


def build_gated_early_exit_mlp() -> DynamicCase:
    torch.manual_seed(SEED)
    model = GatedEarlyExitMLP().eval()
    n = len(model.blocks)
    # features 0..n-1 switch gate i on; features n..2n-1 make exit i confident
    for i, (block, exit_head) in enumerate(zip(model.blocks, model.exits, strict=True)):
        assert isinstance(block, GatedMLPBlock)
        _protect(block.fc2, 2 * n)
        _wire(block.gate, {0: i}, bias=GATE_BIAS)
        _wire(_linear(exit_head), {i: n + i})
    base = 0.5 * torch.randn(1, 32)
    # label -> (blocks whose gate is on, exit taken or None)
    paths: dict[str, tuple[tuple[int, ...], int | None]] = {
        "skip_all_final": ((), None),
        "run_all_final": (tuple(range(n)), None),
        "skip_all_exit0": ((), 0),
        "run_all_exit1": (tuple(range(n)), 1),
        "mixed_exit2": ((1,), 2),
    }
    steps = [[f"blocks.{i}", f"blocks.{i}.gate", f"exits.{i}"] for i in range(n)]
    branches: dict[str, Inputs] = {}
    calls: dict[str, dict[str, int]] = {}
    for label, (on, taken) in paths.items():
        controls = {i: float(i in on) for i in range(n)}
        controls |= {n + i: float(i == taken) for i in range(n)}
        branches[label] = (_with_controls(base, 1, controls),)
        calls[label] = _exit_calls(steps, ["head"], taken)
        last = n - 1 if taken is None else taken
        for i in range(n):
            calls[label][f"blocks.{i}.fc1"] = int(i <= last and i in on)
    return _case("gated_early_exit_mlp", model, (torch.randn(1, 32),), branches, calls)


DYNAMIC_MODELS: dict[str, Callable[[], DynamicCase]] = {
    "branchy_cnn": build_branchy_cnn,
    "shallow_deep_mlp": build_shallow_deep_mlp,
    "skipnet": build_skipnet,
    "gated_block_resnet": build_gated_block_resnet,
    "blockdrop": build_blockdrop,
    "act_rnn": build_act_rnn,
    "pondernet": build_pondernet,
    "early_exit_transformer": build_early_exit_transformer,
    "moe_top1": build_moe_top1,
    "shape_branch": build_shape_branch,
    "gated_early_exit_mlp": build_gated_early_exit_mlp,
}


def get_dynamic_case(name: str) -> DynamicCase:
    """Build dynamic zoo model `name` (a fresh model on every call)."""
    if name not in DYNAMIC_MODELS:
        raise KeyError(f"unknown dynamic zoo model {name!r}; "
                       f"valid names: {', '.join(sorted(DYNAMIC_MODELS))}")
    return DYNAMIC_MODELS[name]()
