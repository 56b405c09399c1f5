"""Real tuning sessions (`hwaware tune` in a subprocess) and the database file they leave:
beside three other writer processes, and interrupted with Ctrl-C. The `.db` file alone, copied
elsewhere, must hold every committed record."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.test_db_reliability import REPO, count, trace_of


def start_tune(db: Path, trials: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hwaware.cli", "tune", "tests.helpers:tiny_conv", "--trials",
         str(trials), "--db", str(db)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)


def wait_for(path: Path, sql: str, minimum: int, proc: subprocess.Popen[str],
             timeout_s: float = 240) -> int:
    """Poll `sql` (a count) on the file until it reaches `minimum` or the process ends."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
                found = int(conn.execute(sql).fetchone()[0])
            if found >= minimum:
                return found
        except sqlite3.Error:  # not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{sql!r} did not reach {minimum} (exit code {proc.poll()})")


def copy_db_alone(path: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy" / path.name
    copy.parent.mkdir()
    shutil.copy(path, copy)
    return copy


def test_a_cli_session_beside_three_writers_leaves_every_record_in_the_db_file(
        tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    tune = start_tune(path, trials=2)
    go = tmp_path / "go"
    writers = [subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "db_writers.py"), "--writer", str(path),
         f"s{k}", "200", "20", str(go)], stdout=subprocess.PIPE, text=True) for k in range(3)]
    try:
        wait_for(path, "SELECT COUNT(*) FROM sessions", 1, tune)  # the session has started
        go.touch()
        outs = [w.communicate(timeout=240)[0] for w in writers]
        _, err = tune.communicate(timeout=300)
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
        if tune.poll() is None:
            os.killpg(tune.pid, signal.SIGKILL)  # the session and its builder/runner workers
    assert tune.returncode == 0, err
    assert "locked" not in err
    assert all('"errors": 0' in out for out in outs), outs
    copy = copy_db_alone(path, tmp_path)
    with sqlite3.connect(copy) as conn:
        tuned = conn.execute("SELECT COUNT(*) FROM records WHERE target_key NOT LIKE "
                             "'llvm-bench%'").fetchone()[0]
        finished = conn.execute("SELECT COUNT(*) FROM sessions WHERE finished_at IS NOT NULL"
                                ).fetchone()[0]
        shared = conn.execute("SELECT COUNT(*) FROM records WHERE trace_json = ?",
                              [trace_of("shared-0")]).fetchone()[0]
    assert tuned == 2 and finished == 1
    assert count(copy) == 2 + 3 * 200 + 20 and shared == 1


def test_ctrl_c_mid_session_keeps_every_committed_record_in_the_db_file(
        tmp_path: Path) -> None:
    path = tmp_path / "interrupted.db"
    tune = start_tune(path, trials=64)
    try:
        seen = wait_for(path, "SELECT COUNT(*) FROM records", 1, tune)
        tune.send_signal(signal.SIGINT)  # Ctrl-C: to the session's own process
        _, err = tune.communicate(timeout=120)
    finally:
        if tune.poll() is None:
            os.killpg(tune.pid, signal.SIGKILL)
            tune.wait()
    assert tune.returncode == 130, err
    assert "interrupted" in err
    copy = copy_db_alone(path, tmp_path)
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert seen <= count(copy) < 64
