"""The torch.compile backend `hwaware` (registered through the `torch_dynamo_backends` entry point).

Goes in: the FX graph and example inputs Dynamo hands a backend, plus `options`. Comes out: a
callable with Dynamo's calling convention. Enters the pipeline after capture: the Dynamo graph is
exported to ATen (parameters frozen into constants), then rewrite -> partition -> tune -> build.
Options: `target` (default "host"), `db` (path, default tuning_logs/hwaware.db), `trials`
(default 0: use the records already in the database), `fuse` (default True: fused conv-block,
GNN and attention kernels), `fallback` (default True: if compiling a graph fails, run it eagerly
with one warning instead of raising), `max_shapes` (default 8, see below).

Dynamic graphs: when a second input shape makes Dynamo recompile the frame with symbolic sizes
(or with `dynamic=True` / `mark_dynamic`), the graph comes with SymInt inputs. hwaware kernels
are static, so the backend then returns a callable that compiles the graph once per distinct
set of concrete sizes, on that set's first call, and reuses it after; past `max_shapes` sets, a
new set runs eagerly (one warning), so an unbounded stream of shapes never compiles unboundedly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

from torch import fx

from hwaware.db import DEFAULT_DB_PATH

log = logging.getLogger(__name__)

OPTIONS = {"target": "host", "db": str(DEFAULT_DB_PATH), "trials": 0, "fallback": True,
           "fuse": True, "max_shapes": 8,
           "show_progress": False}


def hwaware_backend(gm: fx.GraphModule, example_inputs: list[Any],
                    options: dict[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """Compile one Dynamo graph with hwaware."""
    opts = _check_options({**(options or {}), **kwargs})
    if any(_is_symbolic(value) for value in example_inputs):
        return PerShape(gm, opts)
    return _compile_or_fall_back(gm, example_inputs, opts)


def _compile_or_fall_back(gm: fx.GraphModule, inputs: list[Any],
                          opts: dict[str, Any]) -> Callable[..., Any]:
    try:
        return _compile_graph(gm, inputs, opts)
    except Exception as err:
        if not opts["fallback"]:
            raise
        warnings.warn(f"hwaware: could not compile a graph ({type(err).__name__}: {err}); "
                      "running it eagerly", stacklevel=3)
        return gm.forward


def _is_symbolic(value: Any) -> bool:
    """A SymInt input, or a tensor with a symbolic size: the graph is dynamic."""
    import torch

    if isinstance(value, torch.Tensor):
        return any(isinstance(size, torch.SymInt) for size in value.shape)
    return isinstance(value, torch.SymInt)


class PerShape:
    """A dynamic Dynamo graph run as static hwaware graphs, one per distinct set of concrete
    input sizes, each compiled on its first call (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, opts: dict[str, Any]) -> None:
        self.gm, self.opts = gm, opts
        self.by_shape: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        key = _shape_key(args)
        run = self.by_shape.get(key)
        if run is None:
            run = self.by_shape[key] = self._specialize(list(args), key)
        return run(*args)

    def _specialize(self, args: list[Any], key: tuple[Any, ...]) -> Callable[..., Any]:
        compiled = sum(hasattr(run, "hwaware_compiled") for run in self.by_shape.values())
        if compiled >= int(self.opts["max_shapes"]):
            warnings.warn(f"hwaware: this graph has been compiled for {compiled} input "
                          f"shapes (max_shapes); running shape {key} eagerly", stacklevel=3)
            return self.gm.forward
        log.info("compiling a dynamic graph for shape %s", key)
        return _compile_or_fall_back(self.gm, args, self.opts)


def _shape_key(args: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    """What one static compilation of a dynamic graph is specific to: every tensor input's
    shape and dtype, and every int input's value."""
    return tuple((tuple(a.shape), a.dtype) if hasattr(a, "shape") else a for a in args)


def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown hwaware option(s) {unknown}; valid options: {sorted(OPTIONS)}")
    return {**OPTIONS, **opts}


def _compile_graph(gm: fx.GraphModule, example_inputs: list[Any],
                   opts: dict[str, Any]) -> Callable[..., Any]:
    from hwaware.capture import capture_dynamo_graph
    from hwaware.pipeline import compile_captured, open_db
    from hwaware.target import get_target

    target = get_target(opts["target"])
    captured, kept = capture_dynamo_graph(gm, list(example_inputs))
    compiled = compile_captured(captured, target, open_db(opts["db"]), int(opts["trials"]),
                                bool(opts["show_progress"]), bool(opts["fuse"]))

    def run(*args: Any) -> Any:
        return compiled(*[args[i] for i in kept])

    run.hwaware_compiled = compiled  # type: ignore[attr-defined]
    return run
