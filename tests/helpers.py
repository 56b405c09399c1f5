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



def checked_on_tvm(kernel: Any) -> bool:
    """Whether a kernel was built by TVM and matched PyTorch: it was then timed against its
    PyTorch ops (`tvm_us`), or it is the model as one TVM call (kept only if it matches).
    Where it runs is the timing's choice, which a busy machine can tip either way."""
    from hwaware.build import ONE_CALL

    return kernel.tvm_us is not None or kernel.name == ONE_CALL


def kernels_built(compiled: Any) -> list[Any]:
    """The kernels `compiled` was built as, one by one: where the build chose to run the whole
    model as one TVM call (a timing choice: `build.CHAINED` or `build.ONE_CALL` won by
    `MARGIN`), the kernels it was chosen over, which its `kernel_plan` keeps."""
    return list((compiled.kernel_plan or compiled).program.kernels.values())


def on_tvm(compiled: Any) -> Any:
    """`compiled` with every kernel that passed its check against PyTorch on TVM. Where each
    kernel runs is chosen by timing, which a busy machine (or the other test worker) can tip
    to PyTorch; a test of what the TVM kernels compute runs them whatever the timing said."""
    for kernel in compiled.program.kernels.values():
        if checked_on_tvm(kernel):
            kernel.impl = "tvm"
    compiled._run = None
    return compiled


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


def wrong_best_database(path: Path) -> tuple[Any, str, str]:
    """A database at `path` whose only workload (`tiny_conv`'s task) has two real records: a
    correct one (2 us) and, as the best (1 us), one whose trace stores the convolution's sums
    as int32 (`unsafe_set_dtype`): it replays and builds, and computes wrong numbers. Returns
    the task and the candidate keys of the wrong record and of the right one."""
    import json

    import tvm
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from hwaware.capture import capture
    from hwaware.db import candidate_key
    from hwaware.decompose import rewrite_and_partition
    from hwaware.target import get_target
    from hwaware.tune import extract_tasks
    from hwaware.tvm.database import record_row
    from hwaware.tvm.ir import plain_json, workload_json
    from hwaware.tvm.setup import TVM_VERSION

    model, (x,) = tiny_conv()
    target = get_target("host")
    _, part = rewrite_and_partition(capture(model, [x]), True)
    (task,) = extract_tasks(part, [x], target)
    good = tvm.s_tir.Schedule(task.workload)
    good.parallel(good.get_loops(good.get_sblock("conv2d_nchw"))[1])
    bad = tvm.s_tir.Schedule(task.workload)
    bad.unsafe_set_dtype(bad.get_sblock("conv2d_nchw"), 0, "int32")
    args = [plain_json(a.as_json()) for a in ArgInfo.from_entry_func(task.workload)]
    traces = {name: plain_json(s.trace.as_json()) for name, s in (("good", good), ("bad", bad))}
    with TuningDatabase(path) as db:
        db.commit_workload(task.workload_hash, TVM_VERSION, workload_json(task.workload))
        for name, us in (("good", 2.0), ("bad", 1.0)):
            db.commit_record(record_row(task.workload_hash, target.key, traces[name], args,
                                        [us * 1e-6], None, "test", None))
    return (task, candidate_key(json.dumps(traces["bad"])),
            candidate_key(json.dumps(traces["good"])))


def crashing_record_workload() -> tuple[Any, str, str]:
    """A workload and the traces of two records of it: one whose kernel segfaults (its trace
    stores computed indices as uint8: they lose their high bits and index >= 2 GB before the
    buffer) and a right one."""
    import json

    import tvm
    from tvm import te

    from hwaware.tvm.ir import plain_json

    a = te.placeholder((64,), "float32", name="A")
    far = 1 << 23  # i + (i + 64) * far = i (mod 256): the index, once its high bits are gone
    index = te.compute((64,), lambda i: i + (i + 64) * far, name="t")
    b = te.compute((64,), lambda i: a[index[i] - (i + 64) * far], name="b")
    workload = tvm.IRModule({"main": te.create_prim_func([a, b])})
    crash = tvm.s_tir.Schedule(workload)
    crash.unsafe_set_dtype(crash.get_sblock("t"), 0, "uint8")
    fine = tvm.s_tir.Schedule(workload)
    fine.compute_inline(fine.get_sblock("t"))
    crash_trace, fine_trace = (json.dumps(plain_json(s.trace.as_json())) for s in (crash, fine))
    return workload, crash_trace, fine_trace


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
