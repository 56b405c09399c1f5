"""A tuning session killed with SIGKILL at several points (start-up, task extraction and building,
measuring and committing) leaves a sound database, and resuming measures only what is missing;
`hwaware compile` killed while it builds the model and while it saves it leaves the database
whole and no half-written model (`hwaware.load` refuses the unfinished folder, the earlier save
stays loadable), and rerunning it measures nothing again. Records that no longer replay (a
garbage trace) are skipped by a compile with a warning; another target's records, even fast
or broken ones, are never read by a build."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import hwaware
from hwaware import manifest
from hwaware.db import RecordRow, TuningDatabase
from hwaware.manifest import ManifestError
from hwaware.target import get_target
from hwaware.tvm.database import StoredRecordWarning
from hwaware.tvm.setup import TVM_VERSION
from tests.helpers import assert_close_to_eager, tiny_conv
from tests.test_db_reliability import REPO
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


# ------------------------------------------------------------------ the model-build phase
def copy_of(path: Path, dst: Path) -> Path:
    """A snapshot of the database at `path` (its WAL included) as a new file `dst`."""
    with sqlite3.connect(path) as src, sqlite3.connect(dst) as out:
        src.backup(out)
    return dst


def records_of(path: Path) -> list[tuple[int, str]]:
    with TuningDatabase(path, read_only=True) as db:
        assert db.integrity_check() == "ok"
        return [(int(i), str(c)) for i, c in
                db.db.execute("SELECT id, candidate FROM records ORDER BY id").fetchall()]


def start_compile(db: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hwaware.cli", "compile", "tests.helpers:tiny_conv", "--trials",
         str(TRIALS), "--db", str(db), "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def kill_compile_when(db: Path, out: Path, ready: Callable[[], bool],
                      timeout_s: float = 300) -> bool:
    """Start `hwaware compile`, SIGKILL it (and its workers) as soon as `ready()`; True if it
    was still running then (False: it finished first)."""
    proc = start_compile(db, out)
    deadline = time.time() + timeout_s
    try:
        while proc.poll() is None and not ready() and time.time() < deadline:
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err
    return proc.returncode == -signal.SIGKILL


def unfinished_saves(out: Path) -> list[Path]:
    """The hidden folders a killed save of `out` left beside it, still without a manifest."""
    return [p for p in out.parent.glob(f".{out.name}.partial-*")
            if not (p / manifest.MANIFEST_FILE).exists()]


def count_rows(db: Path, table: str) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    except sqlite3.Error:
        return 0


def kill_mid_save(db: Path, out: Path, tries: int = 3) -> list[Path]:
    """Kill `hwaware compile` while it writes the saved model (retried when the save, ~0.1 s,
    finished before the kill landed); the unfinished folders it left."""
    for _ in range(tries):
        if kill_compile_when(db, out, lambda: bool(unfinished_saves(out))) and \
                unfinished_saves(out):
            return unfinished_saves(out)
    raise AssertionError(f"no kill landed while {out} was being saved in {tries} tries")


def test_sigkill_while_building_and_saving_the_model_then_rerun(
        resumed: tuple[Path, list[int], object], tmp_path: Path) -> None:
    db = copy_of(resumed[0], tmp_path / "tuned.db")
    out = tmp_path / "model"
    measured = records_of(db)
    assert len(measured) >= TRIALS  # the tuned records (and any a test before added)
    # 1. while building: the TVM-vs-PyTorch choice of each kernel is being committed
    assert kill_compile_when(db, out, lambda: count_rows(db, "kernel_measurements") > 0)
    assert records_of(db) == measured and not out.exists()
    # 2. while saving: nothing at `out`, and the unfinished folder is refused by name
    (partial, *_) = kill_mid_save(db, out)
    assert records_of(db) == measured and not out.exists()
    with pytest.raises(ManifestError, match=f"{partial.name}: .*an unfinished save"):
        hwaware.load(partial)
    with pytest.raises(ManifestError, match="no such folder"):
        hwaware.load(out)
    # 3. rerun: completes, measures nothing again, removes what the killed save left
    assert not kill_compile_when(db, out, lambda: False)
    assert records_of(db) == measured
    assert not partial.exists()
    model, inputs = tiny_conv()
    saved = (out / "kernels.so").read_bytes()
    assert_close_to_eager(model, hwaware.load(out), *inputs)
    # 4. killed while saving over that save: the earlier save is still there, whole
    kill_mid_save(db, out)
    assert (out / "kernels.so").read_bytes() == saved
    assert_close_to_eager(model, hwaware.load(out), *inputs)


def test_a_build_never_reads_another_targets_records(
        resumed: tuple[Path, list[int], object], tmp_path: Path) -> None:
    db = copy_of(resumed[0], tmp_path / "shared.db")
    (task,) = resumed[2].tasks  # type: ignore[attr-defined]
    bad_block = json.dumps([[["GetSBlock", [], ["no_such_block", "main"], ["b0"]]], []])
    with TuningDatabase(db) as shared:  # a team's other device: fastest of all, and broken
        for trace, us in (("not a trace", 0.001), (bad_block, 0.002)):
            assert shared.commit_record(RecordRow(
                task.workload_hash, "llvm-another-device", trace, "[]", [us * 1e-6], us,
                None, "elsewhere", "theirs", TVM_VERSION, time.time()))
    model, inputs = tiny_conv()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StoredRecordWarning)  # reading them would warn
        compiled = hwaware.compile(model, inputs, db=db, trials=0)
    assert task.workload_hash in compiled.info.tuned_workloads
    assert_close_to_eager(model, compiled, *inputs)
    with TuningDatabase(db) as shared:  # and they are kept
        assert len(shared.records_for_target("llvm-another-device")) == 2
