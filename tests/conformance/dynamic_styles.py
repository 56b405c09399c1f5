"""Dynamic networks written the way people outside the hwaware team write them.

`hwaware/dynamic_zoo.py` is the team's own style (decisions in `forward`, one idiom per model).
These models put their decisions where other code bases do: in helper methods returning tuples
(`_run(x) -> (out, steps)`, `_maybe_exit(h, i) -> (logits, done)`), in gate submodules and
their methods (`blk.decide(h)`), in `while` loops with counters and flags, in `.item()` /
`.tolist()` reads, Python lists appended in a loop, dict and tuple returns, shape and
`isinstance` checks, `getattr(self, f"head{i}")`, top-1 routing through a local naming the
expert, recursion (a module holding a smaller copy of itself; a method calling itself),
`for ... else`, `a if c else b` on tensors, `with torch.no_grad()` blocks and decorators,
keyword arguments, returns from inside loops, an optional `mask=None` parameter, one region
that cannot be static (numpy) and one forward hwaware cannot rewrite (`*inputs`).

`CASES[name]()` returns (the model in eval mode with seeded random weights, a list of input
tuples that together take every path; the first one is the compile example). Each input takes
a different path: decisions read a few "control" features of the input through strongly
weighted units whose other weights are shrunk, so every decision is far from its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

Inputs = tuple[torch.Tensor, ...]
Case = tuple[nn.Module, list[Inputs]]


# ------------------------------------------------------------------------------ wiring
@torch.no_grad()
def _wire(linear: nn.Linear, rows_to_features: dict[int, int], gain: float = 10.0,
          bias: float | None = None, shrink: float = 0.01) -> None:
    """Shrink a linear layer's random weights; give output row r a strong weight on feature f."""
    linear.weight.mul_(shrink)
    if linear.bias is not None:
        linear.bias.mul_(shrink)
        if bias is not None:
            linear.bias.fill_(bias)
    for row, feature in rows_to_features.items():
        linear.weight[row, feature] += gain


@torch.no_grad()
def _protect(layer: nn.Linear | nn.Conv2d, n: int) -> None:
    """Zero the first `n` output rows, so a residual add leaves those features alone."""
    layer.weight[:n] = 0.0
    if layer.bias is not None:
        layer.bias[:n] = 0.0


def _controlled(base: torch.Tensor, dim: int, controls: dict[int, float]) -> torch.Tensor:
    x = base.clone()
    for i, value in controls.items():
        x.select(dim, i).fill_(value)
    return x


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# --------------------------------------------------------------------- 1. ponder loop
class PonderLoop(nn.Module):
    """ACT / PonderNet: a GRU cell pondered until the halting mass reaches 1 - eps; the output
    is the halting-weighted mean of the states (the last one takes the remainder)."""

    def __init__(self, dim: int = 8, hidden: int = 16, classes: int = 4, max_steps: int = 5,
                 eps: float = 0.05):
        super().__init__()
        self.cell = nn.GRUCell(dim, hidden)
        self.halt = nn.Linear(hidden + dim, 1)
        self.out = nn.Linear(hidden, classes)
        self.max_steps = max_steps
        self.eps = eps

    def _run(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        spent = x.new_zeros(x.shape[0], 1)
        mean = torch.zeros_like(h)
        steps = 0
        while True:
            h = self.cell(x, h)
            p = torch.sigmoid(self.halt(torch.cat([h, x], dim=-1)))
            steps += 1
            if steps >= self.max_steps or (spent + p >= 1.0 - self.eps).all():
                mean = mean + (1.0 - spent) * h
                break
            mean = mean + p * h
            spent = spent + p
        return self.out(mean), steps

    def forward(self, x):
        return self._run(x)[0]


def ponder_loop() -> Case:
    torch.manual_seed(0)
    model = PonderLoop().eval()
    _wire(model.halt, {0: model.cell.hidden_size}, shrink=1e-3, bias=0.0)  # p ~ sigmoid(10 x0)
    base = 0.5 * torch.randn(1, 8)
    # x0 = 1: halts at step 1; p = 0.28: 0.84 after 3 steps, halts at 4; x0 = -1: max_steps
    controls = [1.0, _logit(0.28) / 10.0, -1.0]
    return model, [(_controlled(base, 1, {0: c}),) for c in controls]


# ------------------------------------------------------- 2. early exit in a helper method
class HelperExitNet(nn.Module):
    """Residual MLP with an exit head per layer; the exit test lives in `_maybe_exit`."""

    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 5, thr: float = 0.8):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])
        self.heads = nn.ModuleList([nn.Linear(dim, classes) for _ in range(depth)])
        self.final = nn.Linear(dim, classes)
        self.thr = thr

    def _maybe_exit(self, h, i):
        logits = self.heads[i](h)
        conf = F.softmax(logits, dim=-1)
        return logits, conf.max() > self.thr

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.layers):
            h = h + F.relu(layer(h))
            logits, done = self._maybe_exit(h, i)
            if done:
                return logits
        return self.final(h)


def helper_exit() -> Case:
    torch.manual_seed(1)
    model = HelperExitNet().eval()
    depth = len(model.layers)
    for i, (layer, head) in enumerate(zip(model.layers, model.heads, strict=True)):
        _protect(layer, depth)
        _wire(head, {0: i}, shrink=0.05)
    base = 0.5 * torch.randn(1, 16)
    off = dict.fromkeys(range(depth), 0.0)
    inputs = [(_controlled(base, 1, off | {k: 1.0}),) for k in range(depth)]
    return model, [*inputs, (_controlled(base, 1, off),)]


# ----------------------------------------------------------- 3. while loop with counters
class CountedWhile(nn.Module):
    """A `while` loop with a counter and a stop flag read by `.item()`."""

    def __init__(self, dim: int = 12, n: int = 4, thr: float = 0.5):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(n)])
        self.halt = nn.Linear(dim, 1)
        self.head = nn.Linear(dim, 3)
        self.n = n
        self.thr = thr

    def forward(self, x):
        h = x
        i = 0
        done = False
        while i < self.n and not done:
            h = h + F.relu(self.blocks[i](h))
            done = torch.sigmoid(self.halt(h)).item() > self.thr
            i += 1
        return self.head(h) * i


def counted_while() -> Case:
    torch.manual_seed(2)
    model = CountedWhile().eval()
    with torch.no_grad():
        for block in model.blocks:
            _protect(block, 1)
            block.bias[0] = 1.0  # feature 0 grows by one a step
    _wire(model.halt, {0: 0}, gain=4.0, bias=-10.0)  # stop once feature 0 > 2.5
    base = 0.5 * torch.randn(1, 12)
    return model, [(_controlled(base, 1, {0: c}),) for c in (0.0, 2.0, 1.0, -10.0)]


# ------------------------------------------- 4. SkipNet: gates in submodules, blk.decide(h)
class Gate(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.fc = nn.Linear(ch, 1)

    def forward(self, h):
        return torch.sigmoid(self.fc(h.mean(dim=(2, 3)))) > 0.5


class SkipBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(ch, ch, 3, padding=1))
        self.gate = Gate(ch)

    def decide(self, h):
        return bool(self.gate(h))


class DecideSkipNet(nn.Module):
    """Identical blocks in a ModuleList; each block's gate decides whether its body runs."""

    def __init__(self, ch: int = 8, n: int = 3, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(n, ch, 3, padding=1)
        self.blocks = nn.ModuleList([SkipBlock(ch) for _ in range(n)])
        self.head = nn.Linear(ch, classes)

    def forward(self, x):
        h = self.stem(x)
        for blk in self.blocks:
            if blk.decide(h):
                h = F.relu(h + blk.body(h))
        return self.head(h.mean(dim=(2, 3)))


def decide_skipnet() -> Case:
    torch.manual_seed(3)
    model = DecideSkipNet().eval()
    n = len(model.blocks)
    with torch.no_grad():
        model.stem.weight.mul_(0.05)
        model.stem.bias.zero_()
        for c in range(n):  # stem channel c = input channel c
            model.stem.weight[c, c, 1, 1] = 1.0
    for i, blk in enumerate(model.blocks):
        _protect(blk.body[2], n)
        _wire(blk.gate.fc, {0: i}, bias=-5.0)
    base = 0.05 * torch.randn(1, n, 6, 6)
    patterns = [(1, 0, 1), (0, 0, 0), (1, 1, 1), (0, 1, 0)]
    return model, [(_controlled(base, 1, dict(enumerate(map(float, p)))),) for p in patterns]


# ------------------------------ 5. Python-bool gates via .item(), keyword args, no_grad blocks
class ItemGate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, h, threshold=0.0):
        with torch.no_grad():
            s = self.score(h)
        return s.item() > threshold


class ItemGatedMLP(nn.Module):
    """Residual MLP blocks behind gates that return a Python bool."""

    def __init__(self, dim: int = 16, n: int = 3):
        super().__init__()
        self.gates = nn.ModuleList([ItemGate(dim) for _ in range(n)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(dim, 32), nn.GELU(),
                                                 nn.Linear(32, dim)) for _ in range(n)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        h = x
        for gate, mlp in zip(self.gates, self.mlps):  # noqa: B905 - a user's code
            if gate(h, threshold=0.5):
                h = h + mlp(self.norm(h))
        return h


def item_gates() -> Case:
    torch.manual_seed(4)
    model = ItemGatedMLP().eval()
    n = len(model.gates)
    for i, (gate, mlp) in enumerate(zip(model.gates, model.mlps, strict=True)):
        _protect(mlp[2], n)
        _wire(gate.score, {0: i}, bias=-5.0)
    base = 0.5 * torch.randn(1, 16)
    patterns = [(0, 1, 1), (1, 1, 1), (0, 0, 0), (1, 0, 0)]
    return model, [(_controlled(base, 1, dict(enumerate(map(float, p)))),) for p in patterns]


# ------------------------------------- 6. list of states appended, stacked; dict return
class StopRNN(nn.Module):
    """An RNN that stops reading once its stop unit fires; returns every state it made."""

    def __init__(self, dim: int = 6, hidden: int = 12):
        super().__init__()
        self.cell = nn.RNNCell(dim, hidden)
        self.stop = nn.Linear(hidden, 1)
        self.proj = nn.Linear(hidden, 4)

    def forward(self, x):
        h = torch.zeros(x.size(0), self.cell.hidden_size)
        states = []
        for t in range(x.size(1)):
            h = self.cell(x[:, t], h)
            states.append(h)
            if self.stop(h).item() > 0:
                break
        seq = torch.stack(states, dim=1)
        return {"out": self.proj(seq), "last": h, "steps": len(states)}


def stop_rnn() -> Case:
    torch.manual_seed(5)
    model = StopRNN().eval()
    with torch.no_grad():  # hidden unit 0 = tanh(3 x_t[0])
        for w in (model.cell.weight_ih, model.cell.weight_hh):
            w[0] = 0.0
        model.cell.weight_ih[0, 0] = 3.0
        model.cell.bias_ih[0] = model.cell.bias_hh[0] = 0.0
    _wire(model.stop, {0: 0}, bias=-5.0)
    base = 0.3 * torch.randn(1, 5, 6)
    stops = [2, 0, None]  # the step whose feature 0 fires the stop unit

    def sequence(stop: int | None) -> torch.Tensor:
        x = _controlled(base, 2, {0: -2.0})
        if stop is not None:
            x[0, stop, 0] = 2.0
        return x

    return model, [(sequence(s),) for s in stops]


# ---------------------------------------------------- 7. .tolist() decisions, tuple return
class ListRouter(nn.Module):
    """Reads routing probabilities with `.tolist()` and unpacks them into Python floats."""

    def __init__(self, dim: int = 10):
        super().__init__()
        self.scorer = nn.Linear(dim, 3)
        self.small = nn.Linear(dim, dim)
        self.wide = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        probs = self.scorer(x).softmax(-1)
        p_small, p_wide = probs[0].tolist()[:2]
        if p_small > 0.5:
            h = self.small(x)
        elif p_wide > 0.5:
            h = self.wide(x)
        else:
            h = x
        return h, probs


def list_router() -> Case:
    torch.manual_seed(6)
    model = ListRouter().eval()
    _wire(model.scorer, {0: 0, 1: 1})
    base = 0.3 * torch.randn(1, 10)
    controls = [{0: 1.0, 1: 0.0}, {0: 0.0, 1: 1.0}, {0: 0.0, 1: 0.0}]
    return model, [(_controlled(base, 1, c),) for c in controls]


# ------------------------------------ 8. shape branch, isinstance, getattr(self, f"head{i}")
class ShapeHeads(nn.Module):
    """Pools long sequences; heads are attributes `head0`, `head1`, ... found by getattr."""

    def __init__(self, dim: int = 8, n_heads: int = 3, max_len: int = 8):
        super().__init__()
        self.n_heads = n_heads
        self.max_len = max_len
        for i in range(n_heads):
            setattr(self, f"head{i}", nn.Linear(dim, 4))
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Conv1d(dim, dim, 2, stride=2)

    def forward(self, x):
        if isinstance(self.norm, nn.LayerNorm):
            x = self.norm(x)
        if isinstance(x, (tuple, list)):
            x = x[0]
        if x.shape[1] > self.max_len:
            x = self.pool(x.transpose(1, 2)).transpose(1, 2)
        outs = []
        for i in range(self.n_heads):
            head = getattr(self, f"head{i}")
            outs.append(head(x.mean(1)))
        return torch.cat(outs, dim=-1)


def shape_heads() -> Case:
    torch.manual_seed(7)
    return ShapeHeads().eval(), [(torch.randn(1, 12, 8),), (torch.randn(1, 6, 8),)]


# ---------------------------------------------- 9. top-1 MoE through a local naming the expert
class Top1MoE(nn.Module):
    def __init__(self, dim: int = 16, n_experts: int = 3, hidden: int = 24):
        super().__init__()
        self.router = nn.Linear(dim, n_experts)
        self.experts = nn.ModuleList([
            nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
            for _ in range(n_experts)])

    def forward(self, x):
        logits = self.router(x.mean(dim=1))
        idx = logits.argmax(dim=-1).item()
        weight = torch.softmax(logits, dim=-1)[0, idx]
        expert = self.experts[idx]
        return x + weight * expert(x)


def top1_moe() -> Case:
    torch.manual_seed(8)
    model = Top1MoE().eval()
    n = len(model.experts)
    _wire(model.router, {e: e for e in range(n)})
    base = 0.3 * torch.randn(1, 5, 16)
    order = [2, 0, 1]
    return model, [(_controlled(base, 2, {e: float(e == k) for e in range(n)}),) for k in order]


# ------------------------------------------- 10. recursion: a module holding a smaller copy
class AdaptiveDepth(nn.Module):
    """Recurses into its child while feature 0 exceeds the level it sits at."""

    def __init__(self, dim: int = 8, depth: int = 3, level: int = 0):
        super().__init__()
        self.level = level
        self.fc = nn.Linear(dim, dim)
        self.child = AdaptiveDepth(dim, depth - 1, level + 1) if depth > 0 else None

    def forward(self, x):
        h = x + torch.tanh(self.fc(x))
        if self.child is not None and h[:, 0].sum() > self.level:
            h = self.child(h)
        return h


def adaptive_depth() -> Case:
    torch.manual_seed(9)
    model = AdaptiveDepth().eval()
    module: AdaptiveDepth | None = model
    while module is not None:
        _protect(module.fc, 1)  # feature 0 passes unchanged through every level
        module = module.child
    base = 0.3 * torch.randn(1, 8)
    return model, [(_controlled(base, 1, {0: c}),) for c in (1.5, -0.5, 0.5, 2.5)]


# -------------------------- 11. recursion: a method calling itself; `a if c else b` on tensors
class RecursiveRefiner(nn.Module):
    def __init__(self, dim: int = 8, max_depth: int = 3):
        super().__init__()
        self.step = nn.Linear(dim, dim)
        self.alt = nn.Linear(dim, dim)
        self.max_depth = max_depth

    def refine(self, h, depth=3):
        if depth == 0:
            return h
        delta = torch.tanh(self.step(h))
        if h[:, 0].mean() > 0:
            return h + delta
        return self.refine(h + delta, depth - 1)

    def forward(self, x):
        y = self.refine(x, self.max_depth)
        return self.alt(y) if y[:, 1].sum() > 0 else -y


def recursive_refiner() -> Case:
    torch.manual_seed(10)
    model = RecursiveRefiner().eval()
    with torch.no_grad():
        _protect(model.step, 2)
        model.step.bias[0] = 1.0  # feature 0 grows by tanh(1) = 0.76 per level
    base = 0.3 * torch.randn(1, 8)
    # feature 0 decides the depth (0.3: 1 level, -0.5: 2, -1.2: 3, -3: all); feature 1 the tail
    controls = [(-0.5, 1.0), (0.3, -1.0), (-1.2, 1.0), (-3.0, -1.0)]
    return model, [(_controlled(base, 1, {0: a, 1: b}),) for a, b in controls]


# --------------------------------------------------------------- 12. for ... else exits
class ForElseExit(nn.Module):
    """`for ...: if confident: out = head(h); break` / `else: out = final(h)`."""

    def __init__(self, dim: int = 12, depth: int = 3, classes: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])
        self.heads = nn.ModuleList([nn.Linear(dim, classes) for _ in range(depth)])
        self.final = nn.Linear(dim, classes)

    def forward(self, x):
        h = x
        for layer, head in zip(self.layers, self.heads):  # noqa: B905 - a user's code
            h = h + torch.relu(layer(h))
            logits = head(h)
            if logits.softmax(-1).max().item() > 0.9:
                out = logits
                break
        else:
            out = self.final(h)
        return out


def for_else_exit() -> Case:
    torch.manual_seed(11)
    model = ForElseExit().eval()
    depth = len(model.layers)
    for i, (layer, head) in enumerate(zip(model.layers, model.heads, strict=True)):
        _protect(layer, depth)
        _wire(head, {0: i}, shrink=0.05)
    base = 0.5 * torch.randn(1, 12)
    off = dict.fromkeys(range(depth), 0.0)
    return model, [(_controlled(base, 1, off | {1: 1.0}),), (_controlled(base, 1, off),),
                   (_controlled(base, 1, off | {0: 1.0}),), (_controlled(base, 1, off | {2: 1.0}),)]


# -------------------------------------------- 13. a region that cannot be static (numpy)
class NumpyClamp(nn.Module):
    """Clips large activations with numpy in one branch: that region runs in eager."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.enc = nn.Linear(dim, dim)
        self.post = nn.Linear(dim, dim)
        self.dec = nn.Linear(dim, 3)

    def _clip(self, h):
        return torch.from_numpy(np.clip(h.numpy(), -0.5, 0.5))

    def forward(self, x):
        h = self.enc(x)
        if h.abs().max() > 5.0:
            h = self.post(self._clip(h))
        return self.dec(h)


def numpy_clamp() -> Case:
    torch.manual_seed(12)
    model = NumpyClamp().eval()
    with torch.no_grad():
        model.enc.weight.mul_(0.1)
        model.enc.weight[0, 0] = 10.0
    base = 0.3 * torch.randn(1, 8)
    return model, [(_controlled(base, 1, {0: 1.0}),), (_controlled(base, 1, {0: 0.0}),)]


# ------------- 14. a decorated helper returning from inside a loop; optional mask; tensor while
class DecoratedSearch(nn.Module):
    """Searches for the first step whose mean passes 0.5 in a `@torch.no_grad()` helper that
    returns from inside its loop; then halves the state while its norm is large."""

    def __init__(self, dim: int = 8, k: int = 4):
        super().__init__()
        self.f = nn.Linear(dim, dim)
        self.k = k
        self.scale = 0.5

    @torch.no_grad()
    def _search(self, h, scale=1.0):
        for k in range(self.k):
            h = torch.tanh(self.f(h)) * scale + h
            if h.mean() > 0.5:
                return h, k
        return h, -1

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        h, k = self._search(x, scale=self.scale)
        steps = 0
        while (h.norm() > 1) and steps < 10:
            h = h * 0.5
            steps += 1
        return h, k, steps


def decorated_search() -> Case:
    torch.manual_seed(14)
    model = DecoratedSearch().eval()
    _wire(model.f, {}, bias=1.0)  # every feature grows by 0.5 tanh(1) = 0.38 a step
    base = 0.05 * torch.randn(1, 8)
    return model, [(base + m,) for m in (-0.5, 0.3, -3.0)]  # found at step 2, 0; never


# ---------------------------- 15. a forward hwaware cannot rewrite (*args): eager as a whole
class StarArgsGate(nn.Module):
    """A forward taking *inputs: not rewritten, and export refuses its data-dependent `if`."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)

    def forward(self, *inputs):
        h = self.a(inputs[0])
        if h.sum() > 0:
            h = self.b(h)
        return h


def star_args_gate() -> Case:
    torch.manual_seed(13)
    model = StarArgsGate().eval()
    with torch.no_grad():
        model.a.bias.fill_(0.0)  # h(-x) = -h(x): x and -x take opposite branches
    x = torch.randn(1, 8)
    return model, [(x,), (-x,)]


CASES: dict[str, Callable[[], Case]] = {
    "ponder_loop": ponder_loop,
    "helper_exit": helper_exit,
    "counted_while": counted_while,
    "decide_skipnet": decide_skipnet,
    "item_gates": item_gates,
    "stop_rnn": stop_rnn,
    "list_router": list_router,
    "shape_heads": shape_heads,
    "top1_moe": top1_moe,
    "adaptive_depth": adaptive_depth,
    "recursive_refiner": recursive_refiner,
    "for_else_exit": for_else_exit,
    "numpy_clamp": numpy_clamp,
    "decorated_search": decorated_search,
    "star_args_gate": star_args_gate,
}
