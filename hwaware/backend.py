"""The torch.compile backend `hwaware` (registered through the `torch_dynamo_backends` entry point).

Goes in: the FX graph and example inputs Dynamo hands a backend, plus `options`. Comes out: a
callable with Dynamo's calling convention. Enters the pipeline after capture: the Dynamo graph is
exported to ATen (parameters frozen into constants), then rewrite -> partition -> tune -> build.
Options: `target` (default "host"), `db` (path, default tuning_logs/hwaware.db), `trials`
(default 0: use the records already in the database), `fuse` (default True: fused conv-block,
GNN and attention kernels), `fallback` (default True: if compiling a graph fails, run it eagerly
with one warning instead of raising), `max_shapes` (default 8) and `max_weight_sets` (default
32, see below). A bad option value (an unknown target, a corrupt database, `trials=-1`) raises
before any graph is compiled, naming the option: `fallback` covers graphs that fail to compile,
not configuration mistakes.

Variants: a build is static, with the parameters frozen into it, but one Dynamo graph is called
with other sizes (a second input shape makes Dynamo recompile the frame with symbolic sizes, or
`dynamic=True` / `mark_dynamic`) and with other parameters (repeated blocks behind a graph
break share one graph; weights change in place). The backend returns a `GraphVariants`, which
compiles one static build per distinct set of sizes and of frozen parameters, on its first use,
and checks on every call which one applies; past `max_shapes` size sets or `max_weight_sets`
parameter sets, a new variant runs eagerly (one warning), so an unbounded stream of shapes or
of weight updates never compiles unboundedly, and never runs a build of stale weights.
"""

from __future__ import annotations

import logging
import operator
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from hwaware.db import DEFAULT_DB_PATH

log = logging.getLogger(__name__)

CAPTURE_FLAG_VARIABLE = "TORCHDYNAMO_CAPTURE_DYNAMIC_OUTPUT_SHAPE_OPS"


def capture_dynamic_output_shapes() -> None:
    """Let Dynamo keep ops whose output size depends on the data (`nonzero`, a boolean mask)
    inside the graph, with unbacked sizes, as `torch.export` does for `hwaware.compile`,
    instead of breaking the graph there. PyTorch Geometric removes self loops with a boolean
    mask in every GCN-normalised layer: a 2-layer GCN was 9 Dynamo graphs with eager ops
    between them (1 with the flag), and the torch.compile entry point ran slower than eager.
    Set when this backend is loaded (`torch.compile(backend="hwaware")` loads it through its
    entry point, before tracing), unless the environment sets it: then it stays the user's.
    Not `capture_scalar_outputs`: with it, Dynamo itself raised on a top-1 MoE router of the
    conformance corpus (a `.item()` used as an index) and split a counted while loop into 5
    graphs."""
    from torch._dynamo import config

    if CAPTURE_FLAG_VARIABLE not in os.environ:
        config.capture_dynamic_output_shape_ops = True


capture_dynamic_output_shapes()

OPTIONS = {"target": "host", "db": str(DEFAULT_DB_PATH), "trials": 0, "fallback": True,
           "fuse": True, "max_shapes": 8, "max_weight_sets": 32, "verify": 0,
           "show_progress": False}


def hwaware_backend(gm: fx.GraphModule, example_inputs: list[Any],
                    options: dict[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """Compile one Dynamo graph with hwaware."""
    opts = _check_options({**(options or {}), **kwargs})
    return GraphVariants(gm, example_inputs, opts)


class GraphVariants:
    """One Dynamo graph, compiled once per variant of what hwaware bakes into a static build:
    the concrete input sizes (for a graph with symbolic sizes) and the frozen parameters.

    Dynamo passes parameters as graph inputs and calls one graph with different ones: a
    `ModuleList` of identical blocks behind a graph break calls the block's graph once per
    block, each with its own weights; a weight updated in place changes between calls. A
    variant is keyed by the identity, storage and version counter of every frozen tensor (and
    the variant keeps those tensors alive, so an identity is never reused while it is a key),
    so a call with other or modified weights never runs a build of stale ones. Static graphs
    compile their first variant when Dynamo hands them over; the rest on first use. Past
    `max_shapes` distinct size sets or `max_weight_sets` distinct weight sets, a new variant
    runs eagerly (one warning), so an unbounded stream never compiles unboundedly."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list[Any], opts: dict[str, Any]):
        from hwaware.capture import frozen_positions
        from hwaware.verify import Verifier, describe_graph

        self.gm, self.opts = gm, opts
        self.verifier = Verifier(gm.forward, opts["verify"], describe_graph(gm)) \
            if opts["verify"] else None
        self.symbolic = any(_is_symbolic(value) for value in example_inputs)
        self.frozen = [i for i in frozen_positions(gm, example_inputs)
                       if isinstance(example_inputs[i], torch.Tensor)]
        # per call, the key's arguments picked in C (a static graph's sizes are none)
        self.pick_frozen = _picker(self.frozen)
        self.pick_sizes = _picker([i for i, a in enumerate(example_inputs) if type(a) is int])
        self.variants: dict[tuple[Any, ...], tuple[Callable[..., Any], list[Any]]] = {}
        self.shapes: set[tuple[Any, ...]] = set()
        self.weight_sets: set[tuple[Any, ...]] = set()
        if not self.symbolic:
            self._specialize(list(example_inputs))

    def __call__(self, *args: Any) -> Any:
        entry = self.variants.get(self._key(args))
        if entry is None:
            entry = self._specialize(list(args))
        if self.verifier is not None:
            return self.verifier.check(entry[0], args, lambda: _differing_kernel(entry[0], args))
        return entry[0](*args)

    def compiled(self) -> list[Any]:
        """The hwaware models of the variants compiled so far (eager ones left out)."""
        return [run.hwaware_compiled for run, _ in self.variants.values()
                if hasattr(run, "hwaware_compiled")]

    def compiled_for(self, args: tuple[Any, ...] | list[Any]) -> Any:
        """The hwaware model that serves a call with `args` (None: not compiled yet, or that
        variant runs eagerly)."""
        entry = self.variants.get(self._key(args))
        return getattr(entry[0], "hwaware_compiled", None) if entry else None

    def _key(self, args: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
        sizes = _shape_key(args) if self.symbolic else self.pick_sizes(args)
        return sizes, _frozen_identity(self.pick_frozen(args))

    def _specialize(self, args: list[Any]) -> tuple[Callable[..., Any], list[Any]]:
        key = self._key(args)
        why = self._over_limit(key)
        if why:
            warnings.warn(f"hwaware: {why}", stacklevel=3)
            run: Callable[..., Any] = self.gm.forward
        else:
            log.info("compiling a graph variant (%d so far)", len(self.variants))
            # out of Dynamo's sight: a variant met at run time compiles inside the compiled
            # frame's call, where Dynamo would trace the compiler's own frames (a kernel graph's
            # forward) and trip its guards ("Guard failed on the same frame it was created")
            run = torch.compiler.disable(_compile_or_fall_back)(self.gm, self._copies(args),
                                                                self.opts)
        self.shapes.add(key[0])
        self.weight_sets.add(key[1])
        entry = self.variants[key] = (run, [args[i] for i in self.frozen])
        return entry

    def _copies(self, args: list[Any]) -> list[Any]:
        """The call's inputs for compiling: copies of its activations (the compiler runs the
        graph on them, and Dynamo guards on the originals it is about to run), the frozen
        parameters themselves (their identity is the variant's key)."""
        frozen = set(self.frozen)
        return [a.clone() if isinstance(a, torch.Tensor) and i not in frozen else a
                for i, a in enumerate(args)]

    def _over_limit(self, key: tuple[Any, ...]) -> str:
        if key[0] not in self.shapes and len(self.shapes) >= int(self.opts["max_shapes"]):
            return (f"this graph has been compiled for {len(self.shapes)} input shapes "
                    f"(max_shapes); running shape {key[0]} eagerly")
        if key[1] not in self.weight_sets and \
                len(self.weight_sets) >= int(self.opts["max_weight_sets"]):
            return (f"this graph has been compiled for {len(self.weight_sets)} sets of "
                    "parameters (max_weight_sets; they were replaced or changed in place); "
                    "running it eagerly with the new ones")
        return ""


def _compile_or_fall_back(gm: fx.GraphModule, inputs: list[Any],
                          opts: dict[str, Any]) -> Callable[..., Any]:
    from torch._guards import tracing

    try:
        # outside Dynamo's tracing context: the compiler's own torch.export runs would add
        # guards on its kernel graphs' inputs to the frame Dynamo is compiling ("Guard failed
        # on the same frame it was created", naming a kernel input such as in_3)
        with tracing(None):
            return _compile_graph(gm, inputs, opts)
    except Exception as err:
        if not opts["fallback"]:
            raise
        warnings.warn(f"hwaware: could not compile a graph ({type(err).__name__}: {err}); "
                      "running it eagerly", stacklevel=3)
        return gm.forward


def _is_symbolic(value: Any) -> bool:
    """A SymInt input, or a tensor with a symbolic size: the graph is dynamic."""
    if isinstance(value, torch.Tensor):
        return any(isinstance(size, torch.SymInt) for size in value.shape)
    return isinstance(value, torch.SymInt)


def _picker(positions: list[int]) -> Callable[[Any], tuple[Any, ...]]:
    """args -> the tuple of args[i] for i in `positions` (`operator.itemgetter`, which returns a
    bare item for one position and fails for none)."""
    if not positions:
        return lambda _: ()
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return operator.itemgetter(*positions)


def _frozen_identity(tensors: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a build frozen from `tensors` is valid for: the same tensor objects, storages and
    version counters (an in-place update bumps it). Checked on every call: builtins mapped
    over the list (about 30 us for 200 parameters)."""
    return (tuple(map(id, tensors)), tuple(map(_data_ptr, tensors)),
            tuple(map(_version, tensors)))


_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")


def _shape_key(args: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    """What one static compilation of a dynamic graph is specific to: every tensor input's
    shape and dtype, and every int input's value."""
    return tuple((tuple(a.shape), a.dtype) if hasattr(a, "shape") else a for a in args)


def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Every option checked before a graph is compiled: an unknown name or a bad value raises
    (naming it and the valid values) instead of running the model eagerly; the target is
    resolved and the database opened here (one connection per path and process)."""
    from hwaware import options
    from hwaware.verify import check_calls

    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown hwaware option(s) {unknown}; valid options: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **opts}
    check_calls(opts["verify"])
    for name in ("fallback", "fuse", "show_progress"):
        options.check_flag(name, opts[name])
    options.check_count("trials", opts["trials"])
    for name in ("max_shapes", "max_weight_sets"):
        options.check_count(name, opts[name], minimum=1)
    opts["target"] = options.check_target(opts["target"])
    opts["db"] = options.check_db(opts["db"])
    return opts


def _compile_graph(gm: fx.GraphModule, example_inputs: list[Any],
                   opts: dict[str, Any]) -> Callable[..., Any]:
    from hwaware.capture import capture_dynamo_graph
    from hwaware.pipeline import compile_captured
    captured, kept = capture_dynamo_graph(gm, list(example_inputs))
    compiled = compile_captured(captured, opts["target"], opts["db"], int(opts["trials"]),
                                bool(opts["show_progress"]), bool(opts["fuse"]))

    pick = _picker(kept)

    def run(*args: Any) -> Any:
        return compiled(*pick(args))

    run.hwaware_compiled = compiled  # type: ignore[attr-defined]
    run.hwaware_inputs = kept  # type: ignore[attr-defined]
    return run


def _differing_kernel(run: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """Verification: the first kernel of a variant's build that differs from PyTorch."""
    from hwaware.verify import differing_kernel

    compiled = getattr(run, "hwaware_compiled", None)
    if compiled is None:
        return None
    found = differing_kernel(compiled, [args[i] for i in run.hwaware_inputs])  # type: ignore
    return found
