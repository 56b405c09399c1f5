"""The torch.compile backend `hwaware` (registered through the `torch_dynamo_backends` entry point).

Goes in: the FX graph and example inputs Dynamo hands a backend, plus `options`. Comes out: a
callable with Dynamo's calling convention. Enters the pipeline after capture: the Dynamo graph is
exported to ATen (parameters frozen into constants), then rewrite -> partition -> tune -> build.
Options: `target` (default "host"), `db` (path, default tuning_logs/hwaware.db), `trials`
(default 0: use the records already in the database), `fuse` (default True: fused conv-block,
GNN and attention kernels), `fallback` (default True: if compiling a graph fails, run it eagerly
with one warning instead of raising).
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
           "fuse": True,
           "show_progress": False}


def hwaware_backend(gm: fx.GraphModule, example_inputs: list[Any],
                    options: dict[str, Any] | None = None, **kwargs: Any) -> Callable[..., Any]:
    """Compile one Dynamo graph with hwaware."""
    opts = _check_options({**(options or {}), **kwargs})
    try:
        return _compile_graph(gm, example_inputs, opts)
    except Exception as err:
        if not opts["fallback"]:
            raise
        warnings.warn(f"hwaware: could not compile a graph ({type(err).__name__}: {err}); "
                      "running it eagerly", stacklevel=2)
        return gm.forward


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
