"""The whole compiler in one place: capture -> rewrite -> partition -> tune -> build -> run.

`compile` is the first function a newcomer should read; every stage it calls lives in its own
module, named after the stage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from hwaware.build import build
from hwaware.capture import Captured, capture
from hwaware.db import DEFAULT_DB_PATH, TuningDatabase
from hwaware.partition import Partition, partition
from hwaware.rewrite import rewrite
from hwaware.runtime import BuildInfo, CompiledModel
from hwaware.target import Target, get_target
from hwaware.tune import SessionSummary
from hwaware.tune import tune as run_tuning_session

log = logging.getLogger(__name__)

DbArg = TuningDatabase | str | os.PathLike[str] | None


def compile(  # noqa: A001 - the verb users expect, as in torch.compile
    model: torch.nn.Module | str | os.PathLike[str],
    example_inputs: tuple[Any, ...] | None = None,
    *,
    target: str | Target = "host",
    db: DbArg = DEFAULT_DB_PATH,
    trials: int = 0,
    show_progress: bool = True,
) -> CompiledModel:
    """Compile a PyTorch model (or an ONNX file) for `target`; tune first if `trials` > 0."""
    if isinstance(model, (str, os.PathLike)):
        from hwaware.onnx_import import compile_onnx

        return compile_onnx(Path(model), target=target, db=db, trials=trials,
                            show_progress=show_progress)
    tgt = get_target(target)
    database = open_db(db)
    inputs = _as_tuple(example_inputs)
    captured = capture(model, inputs)                        # 1. model -> static ATen graph
    return compile_captured(captured, tgt, database, trials, show_progress)


def compile_captured(captured: Captured, target: Target, db: TuningDatabase | None,
                     trials: int = 0, show_progress: bool = True) -> CompiledModel:
    """Stages 2-6 for an already captured graph (the torch.compile backend enters here)."""
    rewrites, part = _rewrite_and_partition(captured)       # 2. rewrite; 3. kernels + host
    flat_inputs = captured.example_inputs
    if trials > 0 and db is not None:                        # 4. tune into the database
        summary = run_tuning_session(part, flat_inputs, target, db, trials, captured.name,
                                     show_progress)
        log.info("%s", summary.table())
    info = BuildInfo(target.name, target.key, part.host_ops, rewrites)
    return build(part, target, db, flat_inputs, info)        # 5. records -> library; 6. callable


def tune(model: torch.nn.Module, example_inputs: tuple[Any, ...], *, target: str | Target = "host",
         trials: int = 200, db: DbArg = DEFAULT_DB_PATH, show_progress: bool = True
         ) -> SessionSummary:
    """Run a tuning session for `model` and return its summary (records go to `db`)."""
    tgt = get_target(target)
    database = open_db(db)
    if database is None:
        raise ValueError("tuning needs a database (db=None was given)")
    captured = capture(model, _as_tuple(example_inputs))
    _, part = _rewrite_and_partition(captured)
    return run_tuning_session(part, captured.example_inputs, tgt, database, trials,
                              captured.name, show_progress)


def _rewrite_and_partition(captured: Captured) -> tuple[dict[str, int], Partition]:
    from hwaware import tvm_compat

    rewrites = rewrite(captured)
    return rewrites, partition(captured, tvm_compat.supported_aten_ops())


def open_db(db: DbArg) -> TuningDatabase | None:
    if db is None or isinstance(db, TuningDatabase):
        return db
    return TuningDatabase(db)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if example_inputs is None:
        raise ValueError("example_inputs are needed to compile a PyTorch model")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


