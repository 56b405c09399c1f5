"""A tuning session killed with SIGKILL at several points (start-up, task extraction and building,
measuring and committing) leaves a sound database, and resuming measures only what is missing;
records that no longer replay (a garbage trace) are skipped by a compile with a warning."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

import hwaware
from hwaware.db import RecordRow, TuningDatabase
from hwaware.target import get_target
from hwaware.tvm.database import StoredRecordWarning
from hwaware.tvm.setup import TVM_VERSION
from tests.helpers import assert_close_to_eager, tiny_conv
from tests.test_db_sessions import start_tune, wait_for

TRIALS = 16
RECORDS = "SELECT COUNT(*) FROM records"
SESSIONS = "SELECT COUNT(*) FROM sessions"


def kill_when(path: Path, sql: str | None, minimum: int) -> int:
    """Start a session, SIGKILL it (and its workers) once `sql` reaches `minimum` (after 3 s
    with no `sql`), and return the records the file then holds (checked sound)."""
    proc = start_tune(path, TRIALS)
    try:
        if sql is None:
            time.sleep(3)
        else:
            wait_for(path, sql, minimum, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not path.exists():
        return 0
    with TuningDatabase(path) as db:
        assert db.integrity_check() == "ok"
        return int(db.stats()["records"])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], object]:
    path = tmp_path_factory.mktemp("killed") / "killed.db"
    kept = [kill_when(path, None, 0)]                   # start-up
    kept.append(kill_when(path, SESSIONS, 1))           # extracting tasks, building candidates
    kept.append(kill_when(path, RECORDS, kept[-1] + 1))  # measuring, committing
    model, inputs = tiny_conv()
    summary = hwaware.tune(model, inputs, trials=TRIALS, db=path, show_progress=False)
    return path, kept, summary


def test_sigkill_at_every_phase_then_resume_measures_only_the_rest(
        resumed: tuple[Path, list[int], object]) -> None:
    path, kept, summary = resumed
    assert kept[-1] > 0, "the last kill came before any record was committed"
    (task,) = summary.tasks  # type: ignore[attr-defined]
    assert task.trials_before == kept[-1]                       # nothing committed was lost
    assert summary.trials_measured == TRIALS - kept[-1]          # type: ignore[attr-defined]
    assert summary.remeasured == 0                               # type: ignore[attr-defined]
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT candidate FROM records").fetchall()
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(rows) == len(set(rows)) == TRIALS


def test_a_stored_record_that_does_not_replay_is_skipped_with_a_warning(
        resumed: tuple[Path, list[int], object]) -> None:
    path, _, summary = resumed
    (task,) = summary.tasks  # type: ignore[attr-defined]
    bad_block = json.dumps([[["GetSBlock", [], ["no_such_block", "main"], ["b0"]]], []])
    with TuningDatabase(path) as db:  # as an old hwaware's import let them in, fastest of all
        for trace, us in (("not a trace", 0.001), (bad_block, 0.002)):
            db.commit_record(RecordRow(
                task.workload_hash, get_target("host").key, trace, "[]", [us * 1e-6], us,
                None, "elsewhere", "poisoned", TVM_VERSION, time.time()))
    model, inputs = tiny_conv()
    with pytest.warns(StoredRecordWarning, match=f"workload {task.workload_hash}"):
        compiled = hwaware.compile(model, inputs, db=path, trials=0)
    assert task.workload_hash in compiled.info.tuned_workloads
    assert_close_to_eager(model, compiled, *inputs)
