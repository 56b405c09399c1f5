"""Tuning sessions: records land in the database, builds use them, sessions resume, and a
session killed with SIGKILL leaves a sound database. Real MetaSchedule, real sqlite, tiny shapes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import hwaware
from hwaware.db import TuningDatabase
from hwaware.target import get_target
from hwaware.tvm.setup import TVM_VERSION
from tests.helpers import assert_close_to_eager, kernels_built


def tiny_conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval()
    return model, torch.randn(1, 4, 8, 8)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, hwaware.tune]:
    path = tmp_path_factory.mktemp("tune") / "tuned.db"
    model, x = tiny_conv()
    summary = hwaware.tune(model, (x,), trials=8, db=path, show_progress=False)
    return path, summary


def test_session_commits_every_measured_candidate(tuned: tuple[Path, object]) -> None:
    path, summary = tuned
    host = get_target("host")
    assert summary.trials_measured == 8 and summary.remeasured == 0  # type: ignore[attr-defined]
    (task,) = summary.tasks  # type: ignore[attr-defined]
    with TuningDatabase(path) as db:
        assert db.count_records(task.workload_hash, TVM_VERSION, host.key) == 8
        best = db.top_records(task.workload_hash, TVM_VERSION, host.key, 1)
        assert best and best[0].mean_us == pytest.approx(task.best_us)
        assert best[0].device and best[0].session_id == summary.session_id  # type: ignore
        assert db.top_records(task.workload_hash, TVM_VERSION, "another-target", 1) == []
    assert "conv2d" in summary.table()  # type: ignore[attr-defined]


def test_build_applies_the_tuned_records(tuned: tuple[Path, object]) -> None:
    path, summary = tuned
    model, x = tiny_conv()
    compiled = hwaware.compile(model, (x,), db=path, trials=0)
    (task,) = summary.tasks  # type: ignore[attr-defined]
    assert task.workload_hash in compiled.info.tuned_workloads
    assert {k.name: k for k in kernels_built(compiled)}[task.kernels[0]].tvm_us is not None
    assert_close_to_eager(model, compiled, x)


def test_resume_skips_tasks_that_have_their_budget(tuned: tuple[Path, object]) -> None:
    path, _ = tuned
    model, x = tiny_conv()
    again = hwaware.tune(model, (x,), trials=8, db=path, show_progress=False)
    assert again.trials_measured == 0
    assert again.tasks[0].trials_before == 8


def test_resume_with_a_larger_budget_measures_only_new_candidates(
    tuned: tuple[Path, object],
) -> None:
    path, _ = tuned
    model, x = tiny_conv()
    more = hwaware.tune(model, (x,), trials=16, db=path, show_progress=False)
    assert more.trials_measured == 8
    assert more.remeasured == 0
    assert more.tasks[0].trials_before + more.tasks[0].trials_now == 16


_KILLED_SESSION = """
import sys, torch
from torch import nn
import hwaware
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval()
hwaware.tune(model, (torch.randn(1, 4, 8, 8),), trials=64, db=sys.argv[1], show_progress=False)
"""


def test_sigkill_mid_session_keeps_a_sound_database(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SESSION, str(path)],
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        committed = 0
        while time.time() < deadline and proc.poll() is None and committed == 0:
            time.sleep(1.0)
            committed = _record_count(path)
        assert committed > 0, "the session committed nothing before the deadline"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the session and its builder/runner workers
        proc.wait()
    with TuningDatabase(path) as db:
        assert db.integrity_check() == "ok"
        kept = db.stats()["records"]
    assert kept >= committed  # everything committed before the kill is still there
    assert kept < 64


def _record_count(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with TuningDatabase(path) as db:
            return int(db.stats()["records"])
    except Exception:  # the file may be mid-creation
        return 0


def test_crashing_and_hanging_candidates_are_recorded_as_failed(
    tmp_path: Path, db: TuningDatabase
) -> None:
    from hwaware.aten_ops import supported_aten_ops
    from hwaware.capture import capture
    from hwaware.partition import partition
    from hwaware.rewrite import rewrite
    from hwaware.tune import extract_tasks
    from hwaware.tvm import database, search, setup

    model, x = tiny_conv()
    captured = capture(model, (x,))
    rewrite(captured)
    part = partition(captured, supported_aten_ops())
    host = get_target("host")
    (task,) = extract_tasks(part, [x], host)
    counter = str(tmp_path / "builds")

    def faulty_build(mod, target, params):  # runs in the builder's worker processes
        import os as _os
        import time as _time

        from hwaware.tvm.setup import fast_build

        fd = _os.open(counter, _os.O_WRONLY | _os.O_CREAT | _os.O_APPEND)
        _os.write(fd, b"x")
        _os.close(fd)
        calls = _os.path.getsize(counter)
        if calls == 1:
            _os._exit(3)  # the builder process dies
        if calls == 2:
            _time.sleep(600)  # the builder hangs
        return fast_build(mod, target, params)

    tgt = setup.tvm_target(host.tvm)
    adapter = database.SqliteDatabase(db, tgt, host.key)
    seen: list[int] = []
    search.tune_workloads({task.name: task.workload}, {task.name: 8}, tgt, adapter, "faults",
                              lambda _t, n, _new, _b: seen.append(n), str(tmp_path),
                              num_trials_per_iter=8, builder_timeout_s=15, f_build=faulty_build)
    rows = db.records_for_target(host.key)
    failed = [r for r in rows if r.mean_us is None]
    assert sum(seen) == 8 and len(rows) == 8
    assert len(failed) >= 2 and all(r.error for r in failed)
    assert any("Timeout" in (r.error or "") for r in failed)
    assert len(rows) - len(failed) >= 1  # the session went on and measured the rest


def test_budgets_follow_each_task_share_of_the_model() -> None:
    """A task's trials follow its FLOPs times the kernels that call it; half the budget is
    spread evenly, so the lightest task still gets a search; the same tasks always get the
    same budgets (what resuming relies on)."""
    from hwaware.tune import TRIALS_PER_ITER, TuningTask, task_budgets

    def task(name: str, flops: int, calls: int) -> TuningTask:
        return TuningTask(name, None, name, "matmul", [f"k{i}" for i in range(calls)], flops)

    tasks = [task("heavy", 10_000_000, 1), task("repeated", 1_000_000, 10),
             task("light", 10_000, 1)]
    budgets = task_budgets(tasks, 192)
    assert budgets == task_budgets(list(tasks), 192)
    assert budgets["heavy"] == budgets["repeated"] > budgets["light"] >= 192 // 2 // 3
    assert abs(sum(budgets.values()) - 192) <= len(tasks) * TRIALS_PER_ITER // 2
    assert task_budgets(tasks[:1], 8) == {"heavy": 8}


def test_each_task_stops_at_its_own_budget(tmp_path: Path) -> None:
    """A real session over two matmul workloads of different sizes: each task measures at most
    its budget, and the larger one gets the larger budget."""
    from hwaware.tune import task_budgets

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    x = torch.randn(1, 64)
    summary = hwaware.tune(model, (x,), trials=24, db=tmp_path / "t.db", show_progress=False)
    assert len(summary.tasks) == 2
    budgets = task_budgets(summary.tasks, 24)  # type: ignore[arg-type]  # name/flops/kernels
    heavy, light = sorted(summary.tasks, key=lambda t: -t.flops)
    assert budgets[heavy.name] > budgets[light.name]
    for t in summary.tasks:
        assert 0 < t.trials_now <= budgets[t.name]
