"""The whole compiler in one place: capture -> rewrite -> partition -> tune -> build -> run.

`compile` is the first function a newcomer should read; every stage it calls lives in its own
module, named after the stage.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from hwaware.build import build
from hwaware.capture import Captured, CaptureError, capture
from hwaware.db import DEFAULT_DB_PATH, DbArg, TuningDatabase, open_db
from hwaware.decompose import as_inputs, rewrite_and_partition
from hwaware.dynamic.driver import compile_dynamic, eager_model, plan_model, tune_dynamic
from hwaware.dynamic.model import DynamicModel
from hwaware.farm import Farm, farm_of
from hwaware.options import check_count, check_flag
from hwaware.partition import Partition
from hwaware.runtime import BuildInfo, CompiledModel
from hwaware.target import Target, get_target
from hwaware.tune import SessionSummary, TuningTask, extract_tasks, require_runnable, tune_tasks
from hwaware.verify import check_calls, verify_compiled

log = logging.getLogger(__name__)



def compile(  # noqa: A001 - the verb users expect, as in torch.compile
    model: torch.nn.Module | str | os.PathLike[str],
    example_inputs: tuple[Any, ...] | None = None,
    *,
    target: str | Target = "host",
    db: DbArg = DEFAULT_DB_PATH,
    trials: int = 0,
    show_progress: bool = True,
    strict: bool = False,
    fuse: bool = True,
    verify: int = 0,
) -> CompiledModel | DynamicModel:
    """Compile a PyTorch model (or an ONNX file) for `target`; tune first if `trials` > 0.

    Conv blocks, GNN message passing and attention become fused kernels (`hwaware.kernels`)
    wherever the database has tuned records for them; `fuse=False` leaves them out.

    A model whose forward branches or loops on tensor values (early exits, gates, adaptive
    loops, routing) becomes a host program around static regions (`hwaware.dynamic`); a region
    that cannot be made static runs in eager with a warning naming its line, or raises with
    `strict=True`. Such a forward that can be neither rewritten nor captured runs in eager as a
    whole, with one warning naming the line that decides.

    `verify=N` runs `model` in eager PyTorch beside the first N calls and raises
    `hwaware.verify.VerificationError` naming the first kernel (or region) whose output
    differs."""
    if check_calls(verify) and isinstance(model, (str, os.PathLike)):
        raise ValueError("verify=N compares with eager PyTorch: it needs the nn.Module, not a "
                         f"model file ({model})")
    if isinstance(model, (str, os.PathLike)):
        from hwaware.onnx_import import compile_onnx

        return compile_onnx(Path(model), target=target, db=db, trials=trials,
                            show_progress=show_progress)
    check_count("trials", trials)
    tgt = get_target(target)
    database = open_db(db)
    inputs = as_inputs(example_inputs)
    planned = plan_model(model)                              # 0. control flow -> host program
    if planned is not None:
        compiled: Any = compile_dynamic(model, *planned, inputs, tgt, database, trials,
                                        show_progress, strict, partial(compile_graphs, fuse=fuse))
    else:
        try:
            captured = capture(model, inputs)                # 1. model -> static ATen graph
        except CaptureError as err:                          #    branches it could not rewrite:
            return eager_model(model, inputs, tgt, err, strict)  # eager, one warning (or raise)
        compiled = compile_captured(captured, tgt, database, trials, show_progress, fuse)
    return verify_compiled(compiled, model, verify)          # eager beside the first calls


def compile_captured(captured: Captured, target: Target, db: TuningDatabase | None,
                     trials: int = 0, show_progress: bool = True, fuse: bool = True
                     ) -> CompiledModel:
    """Stages 2-6 for an already captured graph (the torch.compile backend enters here)."""
    rewrites, part = rewrite_and_partition(captured, fuse)  # 2. rewrite; 3. kernels + host
    flat_inputs = captured.example_inputs
    if trials > 0 and db is not None:                        # 4. tune into the database
        summary = _tune_parts([captured], [part], target, db, trials, show_progress)
        log.info("%s", summary.table())
    info = BuildInfo.for_target(target, part.host_ops, rewrites)
    return build(part, target, db, flat_inputs, info)        # 5. records -> library; 6. callable


def tune(model: torch.nn.Module, example_inputs: tuple[Any, ...], *, target: str | Target = "host",
         trials: int = 200, db: DbArg = DEFAULT_DB_PATH, show_progress: bool = True,
         fuse: bool = True, rpc: str | None = None, key: str | None = None,
         cold_start: bool = False) -> SessionSummary:
    """Run a tuning session for `model` and return its summary (records go to `db`).

    `rpc="HOST:PORT"` and `key`: measure on the devices registered under `key` with that TVM
    RPC tracker (`hwaware farm`), building here; else measure on this machine.
    `cold_start=True`: the search's cost model starts untrained instead of from the one
    earlier sessions left for this target (`cost_models/<target key>/metaschedule/`), and this
    session's is not saved."""
    check_count("trials", trials)
    check_flag("cold_start", cold_start)
    farm = farm_of(rpc, key)
    tgt = get_target(target)
    database = open_db(db)
    if database is None:
        raise ValueError("tuning needs a database (db=None was given)")
    inputs = as_inputs(example_inputs)
    planned = plan_model(model)
    if planned is not None:
        return tune_dynamic(model, *planned, inputs, tgt, database, trials, show_progress,
                            partial(tune_graphs, fuse=fuse, farm=farm, cold_start=cold_start))
    return tune_graphs([capture(model, inputs)], tgt, database, trials, show_progress, fuse, farm,
                       cold_start)


def compile_graphs(graphs: list[Captured], target: Target, db: TuningDatabase | None,
                   trials: int = 0, show_progress: bool = True, fuse: bool = True
                   ) -> list[CompiledModel]:
    """Stages 2-6 for several captured graphs, tuned together (a workload shared by several
    graphs is tuned once)."""
    parts = [rewrite_and_partition(c, fuse) for c in graphs]
    if trials > 0 and db is not None and graphs:
        summary = _tune_parts(graphs, [p for _, p in parts], target, db, trials, show_progress)
        log.info("%s", summary.table())
    return [build(part, target, db, c.example_inputs,
                  BuildInfo.for_target(target, part.host_ops, rewrites))
            for c, (rewrites, part) in zip(graphs, parts, strict=True)]


def tune_graphs(graphs: list[Captured], target: Target, db: TuningDatabase, trials: int,
                show_progress: bool = True, fuse: bool = True, farm: Farm | None = None,
                cold_start: bool = False) -> SessionSummary:
    """One tuning session over the contraction workloads of several captured graphs (with
    `fuse`, a fused family kernel is one workload in place of its parts), measured on `farm`
    if one is given; `cold_start`: see `tune`."""
    parts = [rewrite_and_partition(c, fuse)[1] for c in graphs]
    return _tune_parts(graphs, parts, target, db, trials, show_progress, farm, cold_start)


def _tune_parts(graphs: list[Captured], parts: list[Partition], target: Target,
                db: TuningDatabase, trials: int, show_progress: bool, farm: Farm | None = None,
                cold_start: bool = False) -> SessionSummary:
    require_runnable(target, farm)
    tasks: dict[str, TuningTask] = {}
    for c, part in zip(graphs, parts, strict=True):
        for t in extract_tasks(part, c.example_inputs, target):
            tasks.setdefault(t.workload_hash, t)
    name = graphs[0].name.split(".")[0] if graphs else ""
    return tune_tasks(list(tasks.values()), target, db, trials, name, show_progress, farm,
                      cold_start)
