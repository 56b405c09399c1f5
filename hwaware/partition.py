"""Stage 3, partition: cut the rewritten ATen graph into kernels and a host program.

Goes in: a `Captured` graph and the set of ATen ops TVM can import. Comes out: a `Partition`:
the `Program` (host steps + kernel specs) and, per kernel, a small FX graph to hand to TVM.

Rules, in order:
1. Each fused kernel family (`hwaware.kernels`: conv blocks, residual blocks, GNN message
   passing, attention) finds its pattern; each group it finds becomes ONE kernel of that family.
2. An op TVM cannot import runs on the host in PyTorch (one warning per op name), and so does
   taking an element of the tuple such an op returns (`linalg_svd`'s U, S, Vh).
3. The rest is cut into contiguous runs of importable ops (contiguous in topological order, so a
   run is always a valid subgraph), and each run is cut again before every contraction
   (convolution, matmul, linear, attention). A kernel is thus one contraction and the
   element-wise/reduction epilogue after it - what one fused TVM kernel can hold.
4. Each kernel gets a stable signature (op sequence + shapes + attributes): the key by which the
   database and, later, latency tables know it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from hwaware import onednn
from hwaware.capture import Captured
from hwaware.index_guard import index_checks
from hwaware.program import (
    KernelSpec,
    KernelStep,
    OpStep,
    Program,
    dump_tree_spec,
    encode_arg,
    op_name,
)

log = logging.getLogger(__name__)

CONTRACTIONS = {
    "aten.conv1d.default": "conv1d", "aten.conv2d.default": "conv2d",
    "aten.conv3d.default": "conv3d", "aten.convolution.default": "conv2d",
    "aten.linear.default": "matmul", "aten.matmul.default": "matmul", "aten.mm.default": "matmul",
    "aten.addmm.default": "matmul", "aten.bmm.default": "matmul", "aten.baddbmm.default": "matmul",
    "aten.einsum.default": "matmul", "aten.scaled_dot_product_attention.default": "sdpa",
}
REDUCTIONS = ("softmax", "layer_norm", "mean", "sum", "max", "min", "norm", "var", "std",
              "pool", "amax", "group_norm")
# Ops whose value is a view in PyTorch; a kernel made only of these is left to PyTorch.
VIEW_OPS = {"aten.view.default", "aten.reshape.default", "aten.permute.default",
            "aten.transpose.int", "aten.unsqueeze.default", "aten.squeeze.dim",
            "aten.flatten.using_ints", "aten.unflatten.int", "aten.expand.default",
            "aten.contiguous.default", "aten.dropout.default", "aten.detach.default",
            "aten.select.int", "aten.slice.Tensor", "getitem", "aten.alias.default",
            "aten.squeeze.dims", "aten.t.default", "aten.split.Tensor", "aten.chunk.default"}


FUSED_META = "hwaware_fused"  # node.meta key: the fused family a node's kernel belongs to


class UnsupportedOpWarning(UserWarning):
    """An op TVM cannot import; hwaware runs it in PyTorch instead."""


@dataclass
class Partition:
    program: Program
    kernel_graphs: dict[str, fx.GraphModule]
    host_ops: list[str]
    captured: Captured
    supported_ops: frozenset[str]
    fuse: bool = True
    unfuse_signatures: frozenset[str] = frozenset()
    dissolved: frozenset[str] = frozenset()
    # each kernel's nodes of the captured graph, by name: which ops a kernel runs, so that a
    # kernel of a later partition (unfused, dissolved) can be traced to the kernels it came from
    kernel_nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    split_signatures: frozenset[str] = frozenset()

    def unfuse(self, signatures: set[str]) -> Partition:
        """The same graph, with each kernel named in `signatures` cut after its contraction:
        the contraction alone (left to PyTorch while it has no tuned schedule) and its epilogue
        (element-wise/reduction ops that TVM's rule-based schedules handle well). Fused family
        kernels always have a schedule (their family's fixed one) and stay whole."""
        return partition(self.captured, self.supported_ops, self.unfuse_signatures | signatures,
                         warn=False, fuse=self.fuse, dissolve=self.dissolved,
                         split=self.split_signatures)

    def dissolve(self, signatures: set[str]) -> Partition:
        """The same graph, with the fused family kernels named in `signatures` not formed: their
        ops become ordinary kernels, each built and chosen on its own (the build's fallback for
        a fused kernel that is wrong or slower than PyTorch on this target)."""
        return partition(self.captured, self.supported_ops, self.unfuse_signatures, warn=False,
                         fuse=self.fuse, dissolve=self.dissolved | signatures,
                         split=self.split_signatures)

    def split(self, signatures: set[str]) -> Partition:
        """The same graph, with each kernel named in `signatures` cut around its contraction:
        the ops before it, the contraction and the ops after it, each a kernel of its own (the
        build's fallback for a kernel TVM failed to build: an op TVM cannot build then takes
        only its own piece to PyTorch, not the contraction it was fused with)."""
        return partition(self.captured, self.supported_ops, self.unfuse_signatures, warn=False,
                         fuse=self.fuse, dissolve=self.dissolved,
                         split=self.split_signatures | signatures)


def partition(captured: Captured, supported_ops: frozenset[str],
              unfuse: Collection[str] | None = None,
              warn: bool = True, fuse: bool = True, dissolve: frozenset[str] = frozenset(),
              split: frozenset[str] = frozenset()) -> Partition:
    """Cut `captured` into kernels (see module docstring) and build the host program.
    `fuse=False` leaves out the fused kernel families (the unfused baseline); `dissolve` names
    fused kernels (by signature) to leave out; `unfuse` and `split` name kernels to cut after
    their contraction, or before and after it."""
    gm = captured.graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in nodes:
        node.meta.pop(FUSED_META, None)
    groups = find_fused_groups(gm, dissolve) if fuse else []
    grouped = {n for group in groups for n in group}
    host_ops = _find_host_ops([n for n in nodes if n not in grouped], supported_ops, warn)
    runs = groups + _kernel_runs(nodes, host_ops, grouped)
    if unfuse:
        runs = [piece for run in runs for piece in _cut_at_contraction(run, unfuse, gm)]
    if split:
        runs = [piece for run in runs
                for piece in _cut_at_contraction(run, split, gm, before=True)]
    builder = _ProgramBuilder(gm, captured)
    in_kernel = {n: i for i, run in enumerate(runs) for n in run}
    emitted: set[int] = set()
    kernel_graphs = {}
    kernel_nodes = {}
    for node in nodes:
        idx = in_kernel.get(node)
        if idx is None:
            builder.emit_host_op(node)
        elif idx not in emitted:
            emitted.add(idx)
            name, sub_gm = builder.emit_kernel(runs[idx], idx)
            kernel_nodes[name] = tuple(n.name for n in runs[idx])
            if sub_gm is not None:
                kernel_graphs[name] = sub_gm
    return Partition(builder.finish(), kernel_graphs, sorted(host_ops), captured, supported_ops,
                     fuse, frozenset(unfuse or ()), dissolve, kernel_nodes, split)


def find_fused_groups(gm: fx.GraphModule, dissolve: frozenset[str] = frozenset()
                      ) -> list[list[fx.Node]]:
    """Every fused family's groups, in graph order, each node tagged with its family. A group
    that overlaps an earlier one, reads a value computed after its first node, or whose kernel
    signature is in `dissolve` is left to the ordinary kernels."""
    from hwaware.kernels import families

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    claimed: set[fx.Node] = set()
    groups: list[list[fx.Node]] = []
    for family in families().values():
        for found in family.find(gm):
            group = sorted(found, key=order.__getitem__)
            if not _valid_group(group, claimed, order, family.name):
                continue
            for node in group:
                node.meta[FUSED_META] = family.name
            if kernel_signature(group, _external_inputs(group, set(group)), gm) in dissolve:
                for node in group:
                    del node.meta[FUSED_META]
                continue
            claimed.update(group)
            groups.append(group)
    return sorted(groups, key=lambda g: order[g[0]])


def _valid_group(group: list[fx.Node], claimed: set[fx.Node], order: dict[fx.Node, int],
                 family: str) -> bool:
    if not group or claimed.intersection(group):
        log.debug("%s group at %s overlaps another fused kernel: left unfused", family,
                  group[0] if group else None)
        return False
    members = set(group)
    used_outside = [n for n in group if _used_outside(n, members)]
    if used_outside != [group[-1]]:
        log.debug("%s group at %s: only its last value may be used outside it: left unfused",
                  family, group[0])
        return False
    first = order[group[0]]
    late = [i for i in _external_inputs(group, set(group)) if order[i] > first]
    if late:
        log.debug("%s group at %s reads %s, computed after its first node: left unfused",
                  family, group[0], late[0])
        return False
    return True


def _find_host_ops(nodes: list[fx.Node], supported_ops: frozenset[str], warn: bool) -> set[str]:
    host_ops: set[str] = set()
    for node in nodes:
        name = op_name(node.target)
        short = name.removeprefix("aten.")
        if name == "getitem" or short in supported_ops and not _has_symbolic_shape(node):
            continue
        if not _tensor_valued(node):  # size arithmetic and runtime asserts stay on the host
            continue
        if short in supported_ops:  # importable, but its shape depends on the data
            node.meta["hwaware_host"] = "data-dependent shape"
            continue
        if warn and name not in host_ops:
            warnings.warn(
                f"hwaware: TVM cannot import {name}; it runs in PyTorch (eager) instead",
                UnsupportedOpWarning, stacklevel=4,
            )
        host_ops.add(name)
    return host_ops


def _has_symbolic_shape(node: fx.Node) -> bool:
    """Does the node produce or read a tensor whose shape depends on the data (e.g. a sum
    over the result of `nonzero`)? A kernel imported with the example's shape would be wrong."""
    return any(_symbolic(n) for n in [node, *node.all_input_nodes])


def _symbolic(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(not isinstance(s, int) for s in val.shape)


def _kernel_runs(nodes: list[fx.Node], host_ops: set[str], grouped: set[fx.Node]
                 ) -> list[list[fx.Node]]:
    runs: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in nodes:
        name = op_name(node.target)
        if node in grouped or name in host_ops or "hwaware_host" in node.meta or \
                not _tensor_valued(node) or _indexes_outside(node, current):
            _close(runs, current)
            current = []
            continue
        if name in CONTRACTIONS and any(op_name(n.target) in CONTRACTIONS for n in current):
            _close(runs, current)
            current = []
        current.append(node)
    _close(runs, current)
    return runs


def _indexes_outside(node: fx.Node, run: list[fx.Node]) -> bool:
    """Whether `node` takes an element of a tuple computed outside `run` (by a host op such as
    `linalg_svd`): it runs on the host, as a kernel's inputs are tensors."""
    return op_name(node.target) == "getitem" and node.args[0] not in run


def _cut_at_contraction(run: list[fx.Node], signatures: Collection[str], gm: fx.GraphModule,
                        before: bool = False) -> list[list[fx.Node]]:
    """`run` cut after its first contraction (and `before` it too) if its signature is in
    `signatures`; else whole. Cut after (not `before`), a convolution keeps the ops oneDNN
    applies as it writes its output (`_post_op_count`): the piece left to PyTorch then runs
    as one oneDNN call where the build finds that faster. Pieces of views alone are left to
    the host."""
    if kernel_signature(run, _external_inputs(run, set(run)), gm) not in signatures:
        return [run]
    at = next((i for i, n in enumerate(run) if op_name(n.target) in CONTRACTIONS), None)
    if at is None:
        return [run]
    end = at + 1 if before else at + 1 + _post_op_count(run, at)
    bounds = [0, at, end, len(run)] if before else [0, end, len(run)]
    pieces: list[list[fx.Node]] = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        _close(pieces, run[start:stop])
    return pieces


def _post_op_count(run: list[fx.Node], at: int) -> int:
    """How many ops after the convolution `run[at]` oneDNN can apply as it writes its output
    (`onednn`): each reads the one before, which nothing else reads; a binary op with a
    tensor of the output's shape, then an activation."""
    value, count, binary, unary = run[at], 0, False, False
    if op_name(value.target) != onednn.CONV:
        return 0
    for node in run[at + 1:]:
        name = op_name(node.target)
        if list(value.users) != [node]:
            break
        if not binary and not unary and onednn.binary_post_op(name, dict(node.kwargs)) and \
                _same_shape_operand(node, value):
            binary = True
        elif not unary and node.args[:1] == (value,) and onednn.unary_post_op(
                name, node.args[1:], dict(node.kwargs)):
            unary = True
        else:
            break
        value, count = node, count + 1
    return count


def _same_shape_operand(node: fx.Node, value: fx.Node) -> bool:
    """Whether the binary op `node` reads `value` (first, for a subtraction) and a tensor of
    its shape and dtype."""
    if len(node.args) != 2 or value not in node.args or node.args[0] is node.args[1] or \
            (op_name(node.target) == "aten.sub.Tensor" and node.args[0] is not value):
        return False
    other = node.args[1] if node.args[0] is value else node.args[0]
    mine = value.meta.get("val")
    theirs = other.meta.get("val") if isinstance(other, fx.Node) else None
    return isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and \
        mine.shape == theirs.shape and mine.dtype == theirs.dtype


def _close(runs: list[list[fx.Node]], run: list[fx.Node]) -> None:
    if run and not all(op_name(n.target) in VIEW_OPS for n in run):
        runs.append(run)


def _tensor_valued(node: fx.Node) -> bool:
    val = node.meta.get("val")
    leaves = pytree.tree_leaves(val)
    return bool(leaves) and all(isinstance(v, torch.Tensor) for v in leaves)


def kernel_family(run: list[fx.Node]) -> str:
    if FUSED_META in run[0].meta:
        return str(run[0].meta[FUSED_META])
    for node in run:
        family = CONTRACTIONS.get(op_name(node.target))
        if family:
            return family
    if any(r in op_name(n.target) for n in run for r in REDUCTIONS):
        return "reduction"
    return "elementwise"


class _ProgramBuilder:
    """Numbers the graph's values into slots and emits host and kernel steps."""

    def __init__(self, gm: fx.GraphModule, captured: Captured):
        self.gm = gm
        self.slots: dict[fx.Node, int] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.steps: list[OpStep | KernelStep] = []
        self.kernels: dict[str, KernelSpec] = {}
        self.captured = captured
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_slots = [self.slot(n) for n in self.placeholders]

    def slot(self, node: fx.Node) -> int:
        if node not in self.slots:
            self.slots[node] = len(self.slots)
        return self.slots[node]

    def const(self, node: fx.Node) -> str | None:
        if node.op != "get_attr":
            return None
        name = str(node.target)
        if name not in self.constants:
            value: Any = self.gm
            for part in name.split("."):
                value = getattr(value, part)
            # a copy: the compiled model is a snapshot of the weights, as its TVM kernels
            # are (they hold their own); sharing the module's storage, a weight changed in
            # place after compiling reached the kernels that run in PyTorch and not the rest
            self.constants[name] = value.detach().clone()
        return name

    def op_step(self, node: fx.Node) -> OpStep:
        args = encode_arg(list(node.args), self.slot, self.const)
        kwargs = {k: encode_arg(v, self.slot, self.const) for k, v in node.kwargs.items()}
        return OpStep(op_name(node.target), args, kwargs, self.slot(node))

    def emit_host_op(self, node: fx.Node) -> None:
        self.steps.append(self.op_step(node))

    def emit_kernel(self, run: list[fx.Node], idx: int) -> tuple[str, fx.GraphModule | None]:
        members = set(run)
        inputs = _external_inputs(run, members)
        outputs = [n for n in run if _used_outside(n, members)]
        family = kernel_family(run)
        name = f"k{idx}_{family}"
        steps = [self.op_step(n) for n in run]
        spec = KernelSpec(
            name=name, family=family, signature=kernel_signature(run, inputs, self.gm),
            inputs=[self.slot(n) for n in inputs], outputs=[self.slot(n) for n in outputs],
            steps=steps, flops=kernel_flops(run, self.gm),
            index_checks=index_checks(run, inputs),
        )
        self.kernels[name] = spec
        self.steps.append(KernelStep(name, spec.inputs, spec.outputs))
        return name, _kernel_graph(self.gm, run, inputs, outputs)

    def finish(self) -> Program:
        output_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        flat_outputs = pytree.tree_leaves(output_node.args[0])
        output_slots = []
        for out in flat_outputs:
            if isinstance(out, fx.Node) and out.op == "get_attr":
                # a constant output: copy it into a slot with a host step
                step = OpStep("aten.clone.default", [{"c": self.const(out)}], {}, self.slot(out))
                self.steps.append(step)
            output_slots.append(self.slot(out))
        return Program(
            input_slots=self.input_slots,
            input_specs=[{"shape": list(s.shape), "dtype": s.dtype}
                         for s in self.captured.input_specs],
            output_slots=output_slots,
            out_spec=dump_tree_spec(self.captured.out_spec),
            steps=self.steps, kernels=self.kernels, num_slots=len(self.slots),
            constants=self.constants,
        )


def _external_inputs(run: list[fx.Node], members: set[fx.Node]) -> list[fx.Node]:
    seen: list[fx.Node] = []
    for node in run:
        for inp in node.all_input_nodes:
            if inp not in members and inp.op != "get_attr" and inp not in seen:
                seen.append(inp)
    return seen


def _used_outside(node: fx.Node, members: set[fx.Node]) -> bool:
    return any(u not in members for u in node.users)


def _kernel_graph(gm: fx.GraphModule, run: list[fx.Node], inputs: list[fx.Node],
                  outputs: list[fx.Node]) -> fx.GraphModule | None:
    """The kernel as a standalone GraphModule (inputs -> outputs, weights as attributes)."""
    graph = fx.Graph()
    root = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for i, inp in enumerate(inputs):
        env[inp] = graph.placeholder(f"in_{i}")
        env[inp].meta = dict(inp.meta)

    def lookup(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            attr = f"w{len(env)}"
            value: Any = gm
            for part in str(n.target).split("."):
                value = getattr(value, part)
            root.register_buffer(attr, value.detach())
            env[n] = graph.get_attr(attr)
            env[n].meta = dict(n.meta)
            return env[n]
        raise KeyError(n)

    for node in run:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, graph)


def kernel_signature(run: list[fx.Node], inputs: list[fx.Node], gm: fx.GraphModule,
                     family: str | None = None) -> str:
    """A stable name for what a kernel computes: ops, argument structure, shapes and dtypes
    (prefixed with `family`, by default the run's kernel family)."""
    index = {n: f"in{i}" for i, n in enumerate(inputs)}
    index.update({n: f"n{i}" for i, n in enumerate(run)})

    def describe(a: Any) -> Any:
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            shape = [str(s) for s in val.shape] if isinstance(val, torch.Tensor) else None
            dtype = str(val.dtype) if isinstance(val, torch.Tensor) else None
            return [index.get(a, "const"), shape, dtype]
        if isinstance(a, (list, tuple)):
            return [describe(x) for x in a]
        return repr(a)

    body = [[op_name(n.target), describe(list(n.args)), describe(sorted(n.kwargs.items()))]
            for n in run]
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return f"{family or kernel_family(run)}:{digest}"


def kernel_flops(run: list[fx.Node], gm: fx.GraphModule) -> int:
    """Multiply-accumulates x2 of the contraction in a kernel (0 for element-wise kernels); of a
    fused kernel, only the share its family says the kernel computes (a causal attention's)."""
    total = 0
    for node in run:
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        name = op_name(node.target)
        if name in ("aten.conv2d.default", "aten.convolution.default", "aten.conv1d.default"):
            weight = node.args[1].meta["val"] if isinstance(node.args[1], fx.Node) else None
            if weight is not None:
                total += 2 * out.numel() * int(weight[0].numel())
        elif CONTRACTIONS.get(name) == "matmul":
            first = node.args[1] if name in ("aten.addmm.default", "aten.baddbmm.default") \
                else node.args[0]
            a = first.meta.get("val") if isinstance(first, fx.Node) else None
            if isinstance(a, torch.Tensor):
                total += 2 * out.numel() * int(a.shape[-1])
        elif name == "aten.scaled_dot_product_attention.default":
            q = node.args[0].meta["val"] if isinstance(node.args[0], fx.Node) else None
            k = node.args[1].meta["val"] if isinstance(node.args[1], fx.Node) else None
            if q is not None and k is not None:
                total += 4 * q.numel() * int(k.shape[-2])
    if FUSED_META in run[0].meta:
        from hwaware.kernels import families

        share = families()[kernel_family(run)].computed_share
        return round(total * share(run, gm)) if share is not None else total
    return total

