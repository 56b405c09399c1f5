"""Faulty candidate kernels, injected for real (real TVM builds, real runs, no mocks):
one that segfaults and one that hangs are recorded as failed and the session goes on; a best
record that computes wrong numbers is caught before a build applies it, and excluded."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import hwaware
from hwaware.db import TuningDatabase
from hwaware.target import get_target
from tests.helpers import (
    assert_close_to_eager,
    crashing_record_workload,
    kernels_built,
    tiny_conv,
    wrong_best_database,
)

tvm = pytest.importorskip("tvm")

N = 16


def _matmul() -> Any:
    from tvm import te

    a, b = te.placeholder((N, N), name="A"), te.placeholder((N, N), name="B")
    k = te.reduce_axis((0, N), name="k")
    c = te.compute((N, N), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    return tvm.IRModule({"main": te.create_prim_func([a, b, c])})


def _bad_kernels() -> dict[str, str]:
    """Two PrimFuncs with the matmul's signature, as JSON: one writes ~6 GB past its output
    (SIGSEGV), one never returns."""
    from tvm.script import tirx as T

    @T.prim_func
    def segfault(A: T.Buffer((16, 16), "float32"), B: T.Buffer((16, 16), "float32"),
                 C: T.Buffer((16, 16), "float32")) -> None:
        for i in range(16):
            C[i * 1003 + 100000000, 0] = A[i, 0]

    @T.prim_func
    def hang(A: T.Buffer((16, 16), "float32"), B: T.Buffer((16, 16), "float32"),
             C: T.Buffer((16, 16), "float32")) -> None:
        C[0, 0] = T.float32(0)
        while A[0, 0] < T.float32(1e30):
            C[0, 0] = C[0, 0] + T.float32(1)

    return {name: tvm.ir.save_json(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}))
            for name, f in (("segfault", segfault), ("hang", hang))}


def _poisoning_builder(claims: str) -> Any:
    """A MetaSchedule builder function (it runs in the builder's worker processes) that builds
    the first candidate it is given as the segfaulting kernel, the second as the hanging one,
    and every later one as scheduled. Workers number their builds by creating files."""
    bad = _bad_kernels()

    def f_build(mod: Any, target: Any, params: Any) -> Any:
        import os

        import tvm

        from hwaware.tvm.setup import fast_build

        n = 0
        while True:
            try:
                os.close(os.open(os.path.join(claims, str(n)), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                n += 1
        if n < 2:
            mod = tvm.ir.load_json(bad["segfault" if n == 0 else "hang"])
        return fast_build(mod, target, params)

    return f_build


def test_segfaulting_and_hanging_candidates_are_recorded_failed(tmp_path: Path) -> None:
    from hwaware.tvm import database, setup
    from hwaware.tvm.ir import workload_hash
    from hwaware.tvm.search import tune_workloads

    target = get_target("host")
    resolved = setup.resolve(target)
    claims = tmp_path / "claims"
    claims.mkdir()
    workload = _matmul()
    db = TuningDatabase(tmp_path / "t.db")
    db.start_session("s", target.key, "matmul", 6)
    measured: list[int] = []
    start = time.monotonic()
    tune_workloads({"mm": workload}, {"mm": 6}, resolved.tvm,
                   database.SqliteDatabase.of(db, resolved), "s",
                   lambda _task, n, _new, _best: measured.append(n), str(tmp_path),
                   num_trials_per_iter=6, runner_timeout_s=2.0, population=32,
                   f_build=_poisoning_builder(str(claims)))
    assert time.monotonic() - start < 120  # the hang cost its timeout, not the session
    assert sum(measured) == 6
    rows = db.db.execute(
        "SELECT rowid, mean_us, error FROM records WHERE workload_hash = ? ORDER BY rowid",
        [workload_hash(workload)]).fetchall()
    assert len(rows) == 6
    failed = [(rowid, error) for rowid, mean_us, error in rows if mean_us is None]
    errors = sorted(error for _, error in failed)
    assert len(failed) == 2, rows
    assert "Subprocess terminated" in errors[0]  # the segfault: its worker died
    assert "Timeout, killed after 2" in errors[1]  # the hang: its worker was killed
    # candidates run after both faults were measured: the worker was replaced each time
    ok = [rowid for rowid, mean_us, _ in rows if mean_us is not None]
    assert len(ok) == 4 and max(ok) > max(rowid for rowid, _ in failed)
    best = db.top_records(workload_hash(workload), setup.TVM_VERSION, target.key, 1)
    assert best and best[0].mean_us is not None and best[0].error is None
    db.close()


@pytest.fixture()
def wrong_best(tmp_path: Path) -> tuple[Path, Any, str, str]:
    """`tests.helpers.wrong_best_database`: the tiny conv's task with a right record and, as
    the best, a wrong one; (path, task, the wrong one's candidate key, the right one's)."""
    path = tmp_path / "wrong.db"
    return (path, *wrong_best_database(path))


def test_record_check_tells_the_wrong_record_from_the_right_one(
    wrong_best: tuple[Path, Any, str, str],
) -> None:
    from tvm.s_tir import meta_schedule as ms

    from hwaware.tvm.check import record_mismatch
    from hwaware.tvm.database import replay_records
    from hwaware.tvm.setup import TVM_VERSION, resolve

    path, task, bad_key, good_key = wrong_best
    tgt = resolve(get_target("host")).tvm
    with TuningDatabase(path) as db:
        rows = db.top_records(task.workload_hash, TVM_VERSION, get_target("host").key, 2)
    verdicts = [record_mismatch(task.workload, record, tgt) for _, record in
                replay_records(rows, ms.database.Workload(task.workload), tgt)]
    assert verdicts[1] is None  # the correct record (2 us)
    assert verdicts[0] is not None and "max abs error" in verdicts[0] and "rtol 0.001" in \
        verdicts[0]


def test_a_wrong_best_record_is_excluded_before_the_build_uses_it(
    wrong_best: tuple[Path, Any, str, str],
) -> None:
    from hwaware.build import KernelMismatchWarning
    from hwaware.tvm.database import WrongRecordWarning
    from hwaware.tvm.setup import TVM_VERSION

    path, task, bad_key, good_key = wrong_best
    model, (x,) = tiny_conv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = hwaware.compile(model, (x,), db=path, trials=0)
    wrong = [w for w in caught if issubclass(w.category, WrongRecordWarning)]
    assert len(wrong) == 1 and bad_key in str(wrong[0].message)
    assert task.workload_hash in str(wrong[0].message)
    assert not [w for w in caught if issubclass(w.category, KernelMismatchWarning)]
    # the next best record is the one applied, and the kernel passed the build's own check
    assert task.workload_hash in compiled.info.tuned_workloads
    assert {k.name: k for k in kernels_built(compiled)}[task.kernels[0]].tvm_us is not None
    assert_close_to_eager(model, compiled, x)
    with TuningDatabase(path) as db:
        (best,) = db.top_records(task.workload_hash, TVM_VERSION, get_target("host").key, 5)
        assert best.mean_us == pytest.approx(2.0)
        error = db.db.execute("SELECT error FROM records WHERE candidate = ?",
                              [bad_key]).fetchone()[0]
    assert error.startswith("wrong results")
    # excluded for good: a later build does not see it again
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        hwaware.compile(model, (x,), db=path, trials=0)
    assert not [w for w in again if issubclass(w.category, WrongRecordWarning)]


def test_a_tuning_session_re_ranks_only_records_that_compute(
    wrong_best: tuple[Path, Any, str, str],
) -> None:
    """The re-measure at the end of a tuning session checks the records it re-ranks: the
    wrong best one is marked failed, not re-timed, and the session's best is the right one."""
    from hwaware.tvm import database, search
    from hwaware.tvm.setup import TVM_VERSION, resolve

    path, task, bad_key, _ = wrong_best
    with TuningDatabase(path) as db:
        checked = database.SqliteDatabase.checked(db, resolve(get_target("host")))
        with warnings.catch_warnings():  # WrongRecordWarning, once a process (see above)
            warnings.simplefilter("ignore", database.WrongRecordWarning)
            search.remeasure_top_records(task.workload, checked)
        (best,) = db.top_records(task.workload_hash, TVM_VERSION, get_target("host").key, 5)
        assert best.mean_us == pytest.approx(2.0)
        error = db.db.execute("SELECT error FROM records WHERE candidate = ?",
                              [bad_key]).fetchone()[0]
    assert error.startswith("wrong results")

def test_fault_tests_leave_no_worker_behind() -> None:
    """The killed workers of the first test are gone (none of this process's children is a
    popen worker still running)."""
    psutil = pytest.importorskip("psutil")
    time.sleep(0.5)
    alive = [p for p in psutil.Process(os.getpid()).children(recursive=True)
             if "popen_worker" in " ".join(p.cmdline()) and p.status() == "running"]
    assert not alive


def test_a_crashing_best_record_is_excluded_and_the_check_survives(tmp_path: Path) -> None:
    """A best record whose kernel segfaults (`tests.helpers.crashing_record_workload`) is
    excluded by the check, which runs in a worker process; the next best record is handed
    out."""
    import json

    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from hwaware.db import candidate_key
    from hwaware.tvm import database, setup
    from hwaware.tvm.ir import plain_json, workload_hash, workload_json

    workload, *traces = crashing_record_workload()
    target = get_target("host")
    resolved = setup.resolve(target)
    whash = workload_hash(workload)
    args = [plain_json(x.as_json()) for x in ArgInfo.from_entry_func(workload)]
    db = TuningDatabase(tmp_path / "c.db")
    db.commit_workload(whash, setup.TVM_VERSION, workload_json(workload))
    for trace, us in zip(traces, (1.0, 2.0), strict=True):
        db.commit_record(database.record_row(whash, target.key, json.loads(trace), args,
                                             [us * 1e-6], None, "test", None))
    adapter = database.SqliteDatabase.of(db, resolved, verify=True)
    with pytest.warns(database.WrongRecordWarning, match=candidate_key(traces[0])) as caught:
        (record,) = adapter.get_top_k(ms.database.Workload(workload), 1)
    assert "crashed" in str(caught[0].message)
    assert json.dumps(plain_json(record.trace.as_json())) == traces[1]
    (best,) = db.top_records(whash, setup.TVM_VERSION, target.key, 5)
    assert best.mean_us == pytest.approx(2.0)
    db.close()
