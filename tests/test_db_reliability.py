"""The tuning database under many writers, on every exit path, and fed bad files: real sqlite
files, real processes, no mocks. (Real tuning sessions: tests/test_db_sessions.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from hwaware.cli import main
from hwaware.db import DatabaseError, ModelMeasurement, RecordRow, TuningDatabase
from hwaware.tvm.setup import TVM_VERSION

REPO = Path(__file__).resolve().parent.parent
TVM = TVM_VERSION  # this install's: import keeps only rows of it
OLD_TVM = "0.19.0"


def trace_of(tag: str) -> str:
    return json.dumps([[["GetSBlock", [], [tag, "main"], ["b0"]]], []])


def row(tag: str, mean_us: float | None = 10.0, workload: str = "w1",
        target: str = "llvm-a") -> RecordRow:
    return RecordRow(
        workload_hash=workload, target_key=target, trace_json=trace_of(tag),
        args_info_json="[]", run_secs=[mean_us * 1e-6] if mean_us else [1e9], mean_us=mean_us,
        error=None if mean_us else "failed", device="here", session_id="s1",
        tvm_version=TVM, created_at=time.time())


def record_line(**changes: object) -> str:
    good = {"kind": "record", **json.loads(row("x").to_json())}
    good.pop("schema_version")
    return json.dumps({**good, **changes})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def count(path: Path, table: str = "records") -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


# ------------------------------------------------------------------------- many writers
def test_four_writer_processes_lose_and_duplicate_nothing() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "db_writers.py"), "--sessions", "4",
         "--records", "150", "--shared", "30", "--json"],
        capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["exit_codes"] == [0, 0, 0, 0]
    assert (result["errors"], result["first_error"]) == (0, "")
    assert result["lost"] == 0 and result["duplicated"] == 0
    assert result["rows"] == result["expected"] == 4 * 150 + 30 == result["new"]
    assert result["integrity_ok"] == 1


# ----------------------------------------------------------------------- every exit path
_WRITE_AND_EXIT = """
import ctypes, json, sys, time
from hwaware.db import RecordRow, open_db
db = open_db(sys.argv[1])   # never closed by hand: the exit path must do it
ctypes.pythonapi.Py_IncRef(ctypes.py_object(db))  # never freed, as when TVM's FFI holds it
for i in range(40):
    db.commit_record(RecordRow("w1", "llvm-a", json.dumps([[["GetSBlock", [], [f"t{i}", "m"],
        ["b0"]]], []]), "[]", [1e-5], 10.0, None, "here", "s1", "0.27.0.post1", time.time()))
if sys.argv[2] == "exception":
    raise RuntimeError("a bug")
if sys.argv[2] == "ctrl-c":
    raise KeyboardInterrupt
"""


@pytest.mark.parametrize("how", ["normal", "exception", "ctrl-c"])
def test_every_exit_path_leaves_the_records_in_the_db_file(tmp_path: Path, how: str) -> None:
    path = tmp_path / "x.db"
    done = subprocess.run([sys.executable, "-c", _WRITE_AND_EXIT, str(path), how],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (done.returncode == 0) == (how == "normal"), done.stderr
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    copy = tmp_path / "elsewhere" / "x.db"
    copy.parent.mkdir()
    shutil.copy(path, copy)  # the .db alone
    assert count(copy) == 40


def test_torch_compile_graphs_share_one_connection_per_path(tmp_path: Path) -> None:
    from hwaware import backend
    from hwaware.db import close_all

    path = tmp_path / "shared.db"
    first = backend._check_options({"db": str(path)})["db"]
    second = backend._check_options({"db": path})["db"]
    assert first is second and not first.closed
    first.commit_record(row("a"))
    close_all()
    assert first.closed
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    assert backend._check_options({"db": str(path)})["db"] is not first  # reopened


# --------------------------------------------------------------------- import and merge
BAD_RECORDS = [
    ({"run_secs": 5}, "field 'run_secs' must be a non-empty list"),
    ({"trace_json": "not a trace"}, "field 'trace_json' is not JSON"),
    ({"trace_json": "[1]"}, "field 'trace_json' is not a MetaSchedule trace"),
    ({"mean_us": "fast"}, "field 'mean_us' must be a finite number > 0"),
    ({"mean_us": -3.0}, "field 'mean_us' must be a finite number > 0"),
    ({"run_secs": [float("nan")]}, "field 'run_secs'"),
    ({"tvm_version": 27}, "field 'tvm_version' must be a TVM version"),
    ({"target_key": ""}, "field 'target_key' must be a non-empty string"),
    ({"created_at": True}, "field 'created_at' must be a finite number > 0"),
]


@pytest.mark.parametrize(("change", "message"), BAD_RECORDS,
                         ids=[f"{next(iter(c))}={next(iter(c.values()))!r}"
                              for c, _ in BAD_RECORDS])
def test_one_bad_record_imports_nothing_and_is_named_by_line(
        tmp_path: Path, db: TuningDatabase, change: dict[str, object], message: str) -> None:
    db.commit_record(row("kept"))
    src = tmp_path / "other.jsonl"
    src.write_text("\n".join([record_line(trace_json=trace_of("a")), record_line(**change),
                              record_line(trace_json=trace_of("b"))]) + "\n")
    with pytest.raises(DatabaseError, match=rf"other\.jsonl:2: record {message}"):
        db.import_files([src])
    assert count(db.path) == 1  # nothing was imported


def test_a_record_missing_a_field_is_named(tmp_path: Path, db: TuningDatabase) -> None:
    src = tmp_path / "other.jsonl"
    src.write_text(json.dumps({k: v for k, v in json.loads(record_line()).items()
                               if k != "device"}) + "\n")
    with pytest.raises(DatabaseError, match=r"other\.jsonl:1: record missing fields \['device'\]"):
        db.import_files([src])


def test_import_keeps_every_record_and_skips_exact_duplicates(tmp_path: Path) -> None:
    with TuningDatabase(tmp_path / "a.db") as a:
        for i in range(5):
            a.commit_record(row(f"a{i}", 10.0 + i))
        a.commit_record(row("failed", None))
        a.commit_model_measurement(ModelMeasurement("m", "llvm-a", "hwaware", 100.0, 1.0,
                                                    ["k0"], "here"))
        a.start_session("s1", "llvm-a", "m", 8)
        a.export_jsonl(tmp_path / "a.jsonl")
    with TuningDatabase(tmp_path / "b.db") as b:
        b.commit_record(row("a0", 10.0))  # already here
        added = b.import_files([tmp_path / "a.db"])
        assert added == {"records": 5, "model_measurements": 1, "sessions": 1,
                         "duplicates": 1, "other_tvm_version": 0}
        again = b.import_files([tmp_path / "a.jsonl"])
        assert again["duplicates"] == 8 and again["records"] == 0
    assert count(tmp_path / "b.db") == 6


def test_a_bad_row_in_another_database_is_named_by_table_and_rowid(tmp_path: Path) -> None:
    with TuningDatabase(tmp_path / "a.db") as a:
        a.commit_record(row("good"))
        a.commit_record(row("poisoned", 1.0))
    with sqlite3.connect(tmp_path / "a.db") as conn:  # as an old hwaware let it in
        conn.execute("UPDATE records SET mean_us = 'fast' WHERE id = 2")
    before = digest(tmp_path / "a.db")
    with TuningDatabase(tmp_path / "b.db") as b:
        with pytest.raises(DatabaseError, match=r"a\.db:records/rowid 2: record field "
                                                r"'mean_us' must be a finite number > 0"):
            b.import_files([tmp_path / "a.db"])
        assert b.stats()["records"] == 0
    assert digest(tmp_path / "a.db") == before  # the source is only read


def test_cli_merge_writes_a_new_database_of_both(tmp_path: Path, capsys) -> None:  # type: ignore
    for name, tags in (("a", ["x", "y"]), ("b", ["y", "z"])):
        with TuningDatabase(tmp_path / f"{name}.db") as db:
            for tag in tags:
                db.commit_record(row(tag))
    out = tmp_path / "c.db"
    assert main(["db", "merge", str(tmp_path / "a.db"), str(tmp_path / "b.db"),
                 "--out", str(out)]) == 0
    assert "3 rows (3 records); 1 exact duplicates skipped" in capsys.readouterr().out
    assert count(out) == 3
    assert main(["db", "merge", str(tmp_path / "a.db"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(record_line(mean_us="fast") + "\n")
    assert main(["db", "merge", str(tmp_path / "a.db"), str(bad), "--out",
                 str(tmp_path / "d.db")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "d.db").exists()


def test_import_rejects_rows_of_another_tvm_version_naming_file_and_line(
        tmp_path: Path, db: TuningDatabase, caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "other.jsonl"
    old_workload = {"kind": "workload", "hash": "w1", "tvm_version": OLD_TVM, "mod_json": "{}"}
    src.write_text("\n".join([
        record_line(trace_json=trace_of("a")),
        record_line(trace_json=trace_of("b"), tvm_version=OLD_TVM),
        json.dumps(old_workload),
        record_line(trace_json=trace_of("c"), target_key="llvm-other-device"),
    ]) + "\n")
    with caplog.at_level("WARNING", logger="hwaware.db"):
        added = db.import_files([src])
    assert added == {"records": 2, "duplicates": 0, "other_tvm_version": 2}
    (warning,) = [r.getMessage() for r in caplog.records]
    assert f"other.jsonl: 2 rows from TVM {OLD_TVM} not imported" in warning
    assert f"this install runs TVM {TVM}" in warning
    assert f"{src}:2, {src}:3" in warning
    with sqlite3.connect(db.path) as conn:
        kept = conn.execute("SELECT target_key, tvm_version FROM records ORDER BY id").fetchall()
        assert conn.execute("SELECT COUNT(*) FROM workloads").fetchone()[0] == 0
    # another target's records are a team's other device: kept (builds never read them)
    assert kept == [("llvm-a", TVM), ("llvm-other-device", TVM)]


def test_cli_import_and_merge_report_rows_of_another_tvm_version(
        tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore
    a = tmp_path / "a.db"
    with TuningDatabase(a) as db:
        db.commit_record(row("mine"))
        db.commit_record(dataclasses.replace(row("old"), tvm_version=OLD_TVM))
    before = digest(a)
    assert main(["db", "import", str(a), "--db", str(tmp_path / "b.db")]) == 0
    assert ("1 rows (1 records); 0 exact duplicates skipped; 1 rows of another TVM version "
            "rejected") in capsys.readouterr().out
    assert f"{a}:records/rowid 2" in caplog.text and f"from TVM {OLD_TVM}" in caplog.text
    assert main(["db", "merge", str(a), "--out", str(tmp_path / "c.db")]) == 0
    assert "1 rows of another TVM version rejected" in capsys.readouterr().out
    for out in ("b.db", "c.db"):
        with sqlite3.connect(tmp_path / out) as conn:
            assert conn.execute("SELECT tvm_version FROM records").fetchall() == [(TVM,)]
    assert digest(a) == before  # the source is only read


# ------------------------------------------------------------ truncated or corrupt files
def test_a_truncated_database_is_refused_naming_file_and_reason(tmp_path: Path) -> None:
    src = tmp_path / "a.db"
    with TuningDatabase(src) as db:
        for i in range(300):
            db.commit_record(row(f"t{i}"))
    data = src.read_bytes()
    cut = tmp_path / "cut.db"
    cut.write_bytes(data[: len(data) // 2])
    before = digest(cut)
    with pytest.raises(DatabaseError, match=r"cut\.db: truncated"):
        TuningDatabase(cut)
    with TuningDatabase(tmp_path / "mine.db") as mine:
        mine.commit_record(row("mine"))
        with pytest.raises(DatabaseError, match=r"cut\.db: truncated"):
            mine.import_files([cut])
        assert mine.stats()["records"] == 1
    assert digest(cut) == before


def test_a_corrupted_page_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "a.db"
    with TuningDatabase(src) as db:
        for i in range(300):
            db.commit_record(row(f"t{i}"))
    data = bytearray(src.read_bytes())
    data[4096 * 3: 4096 * 3 + 64] = b"\x13" * 64  # a b-tree page header smashed
    src.write_bytes(bytes(data))
    with pytest.raises(DatabaseError, match=r"a\.db: (integrity check failed|not a usable)"):
        TuningDatabase(src, read_only=True)


def test_a_truncated_jsonl_is_refused_naming_the_line(tmp_path: Path, db: TuningDatabase) -> None:
    src = tmp_path / "cut.jsonl"
    text = record_line(trace_json=trace_of("a")) + "\n" + record_line(trace_json=trace_of("b"))
    src.write_text(text[:-20])
    with pytest.raises(DatabaseError, match=r"cut\.jsonl:2: not JSON .*looks truncated"):
        db.import_files([src])
    src.write_bytes(b"\xff\xfe garbage\n")
    with pytest.raises(DatabaseError, match=r"cut\.jsonl:1: not UTF-8"):
        db.import_files([src])
    assert db.stats()["records"] == 0


# ------------------------------------------------------------------------------- views
def test_views_read_the_database_readably(db: TuningDatabase) -> None:
    for tag, us in (("a", 30.0), ("b", 10.0), ("c", None)):
        db.commit_record(row(tag, us))
    db.commit_record(row("d", 5.0, target="llvm-b"))
    db.start_session("s1", "llvm-a", "net", 3)
    db.finish_session("s1", "{}")
    db.commit_kernel_measurement("k0", "llvm-a", "tvm", 12.5, "conv2d")
    db.commit_model_measurement(ModelMeasurement("net", "llvm-a", "hwaware", 1500.0, 20.0,
                                                 ["k0", "k1"], "here"))
    view = sqlite_utils.Database(db.path)
    assert set(view.view_names()) >= {"best_records", "session_overview", "kernel_timings",
                                      "model_timings"}
    best = {r["target_key"]: r for r in view["best_records"].rows}
    assert best["llvm-a"]["best_us"] == 10.0 and best["llvm-a"]["trials"] == 3
    assert best["llvm-a"]["failed"] == 1 and best["llvm-b"]["best_us"] == 5.0
    (session,) = view["session_overview"].rows
    assert session["records"] == 4 and session["state"] == "finished"
    assert next(view["kernel_timings"].rows)["run_us"] == 12.5
    model = next(view["model_timings"].rows)
    assert model["latency_ms"] == 1.5 and model["kernels"] == 2
