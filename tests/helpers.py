"""Assertions and helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hwaware.db import TuningDatabase
from hwaware.target import Target


def assert_close_to_eager(model: torch.nn.Module, compiled: object, *inputs: torch.Tensor) -> None:
    """Compiled outputs equal eager PyTorch's (rtol 1e-3, atol 1e-4), whatever their nesting."""
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        expected = pytree.tree_leaves(model(*inputs))
        got = pytree.tree_leaves(compiled(*inputs))  # type: ignore[operator]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        if not isinstance(e, torch.Tensor):  # a Python value returned with the tensors
            assert type(g) is type(e) and g == e
            continue
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-4)



def tune_kernel_module(mod: Any, target: Target, tgt: Any, db_path: Path, trials: int,
                       **search: int) -> tuple[TuningDatabase, Any, dict[str, Any]]:
    """A real tuning session of `trials` per family workload of the lowered module `mod` into
    a sqlite database at `db_path` (the edge glue functions of GNN kernels are not tuned).
    Returns the database, its MetaSchedule adapter and the tuned workloads by name."""
    from hwaware.kernels import fixed_schedules
    from hwaware.tvm import database, ir
    from hwaware.tvm.search import tune_workloads

    db = TuningDatabase(db_path)
    db.start_session("sess", target.key, "kernel", trials)
    adapter = database.SqliteDatabase(db, tgt, target.key)
    fused = ir.fuse_for_tuning(mod, tgt)
    workloads = {n: ir.workload_of(f) for n, f in ir.prim_funcs(fused).items()
                 if not n.endswith("_edges")}
    tune_workloads(workloads, {n: trials for n in workloads}, tgt, adapter, "sess",
                   lambda *a: None, str(db_path.parent), num_trials_per_iter=trials,
                   fixed_schedules=fixed_schedules(), **search)
    return db, adapter, workloads


def tvm_supported_aten_ops() -> frozenset[str]:
    """The aten op names TVM's exported-program importer translates, asked of the installed TVM
    (what `hwaware.aten_ops.SUPPORTED_ATEN_OPS` must equal)."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map().keys())


def default_schedule(mod: Any, target: Any) -> Any:
    """`mod` with every unscheduled fused family PrimFunc given its family's fixed schedule."""
    from hwaware.kernels import fixed_schedules
    from hwaware.tvm import schedules

    return schedules.apply_fixed_schedules(mod, target, fixed_schedules())


def resign(directory: Path) -> None:
    """Write a saved model's manifest again over its folder as it is now (a test that edits a
    saved file on purpose; `hwaware.load` refuses the edit otherwise)."""
    from hwaware import manifest

    old = manifest.Manifest.from_json((directory / manifest.MANIFEST_FILE).read_text(), directory)
    files = [p.relative_to(directory).as_posix() for p in directory.rglob("*")
             if p.is_file() and p.name != manifest.MANIFEST_FILE]
    manifest.write(directory, old.kind, old.format_version, files)


def tiny_conv() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A one-task model for real tuning sessions (`hwaware tune tests.helpers:tiny_conv`)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU()).eval()
    return model, (torch.randn(1, 4, 8, 8),)


def fused_kernels(model: torch.nn.Module, x: torch.Tensor, tgt: Any) -> Any:
    """`model` exported and imported into Relax, its kernels fused for tuning (an IRModule)."""
    import tvm

    from hwaware.tvm import ir

    exported = torch.export.export(model.eval(), (x,))
    return ir.fuse_for_tuning(tvm.IRModule({"main": ir.import_torch_program(exported)}), tgt)


def built_callable(mod: Any, tgt: Any) -> Any:
    """`mod`'s kernels scheduled by the default rules (nothing tuned), built, as a torch
    callable of its one input."""
    from hwaware.tvm import schedules
    from hwaware.tvm import vm as tvm_vm

    exe, _ = schedules.build_executable(mod, tgt, None)
    return tvm_vm.torch_callable(tvm_vm.make_vm(exe, "cpu"), "main", 1)


def assert_searched_schedules_split_perfectly(workload: Any, target: Any, count: int = 12,
                                             built: int = 4) -> None:
    """`count` searched schedules of `workload` (`hwaware.tvm.space_audit`) have no predicated
    block, and the first `built` of them, built and run on this machine's threads, compute
    the workload's outputs."""
    from hwaware.tvm.space_audit import audit

    found = audit(workload, target, count, built)
    assert found.predicated == [0] * count
    assert found.wrong == [None] * built
