"""The tuning database: round trips, target isolation, cross-process commits, bad files."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hwaware.db import DatabaseError, ModelMeasurement, RecordRow, TuningDatabase
from hwaware.decompose import KernelRecord
from hwaware.tvm.setup import TVM_VERSION

TVM = TVM_VERSION  # what import keeps (rows of another TVM version are left out)


def trace_of(tag: str) -> str:
    """A MetaSchedule-shaped trace (one instruction) told apart by `tag`."""
    return json.dumps([[["GetSBlock", [], [tag, "main"], ["b0"]]], []])


def _row(workload: str = "123", target: str = "llvm-a", trace: str = "[1]",
         mean_us: float | None = 10.0) -> RecordRow:
    return RecordRow(
        workload_hash=workload, target_key=target, trace_json=trace_of(trace),
        args_info_json="[]",
        run_secs=[mean_us * 1e-6] if mean_us else [1e9], mean_us=mean_us,
        error=None if mean_us else "builder crashed", device="test", session_id="s1",
        tvm_version=TVM, created_at=time.time(),
    )


def test_records_round_trip_best_first(db: TuningDatabase) -> None:
    db.commit_workload("123", TVM, "{}", "conv2d", "")
    for i, us in enumerate([30.0, 10.0, 20.0]):
        assert db.commit_record(_row(trace=f"[{i}]", mean_us=us))
    db.commit_record(_row(trace="[9]", mean_us=None))
    best = db.top_records("123", TVM, "llvm-a", 2)
    assert [r.mean_us for r in best] == [10.0, 20.0]
    assert db.count_records("123", TVM, "llvm-a") == 4
    assert db.stats()["targets"] == [
        {"target": "llvm-a", "records": 4, "workloads": 1, "failed": 1}
    ]


def test_same_candidate_is_stored_once(db: TuningDatabase) -> None:
    assert db.commit_record(_row(trace="[1]"))
    assert not db.commit_record(_row(trace="[1]", mean_us=5.0))
    assert db.has_candidate("123", TVM, "llvm-a", trace_of("[1]"))
    assert db.count_records("123", TVM, "llvm-a") == 1


def test_query_never_returns_another_targets_records(db: TuningDatabase) -> None:
    db.commit_record(_row(target="llvm-a", mean_us=50.0))
    db.commit_record(_row(target="llvm-b", mean_us=1.0))
    assert [r.target_key for r in db.top_records("123", TVM, "llvm-a", 10)] == ["llvm-a"]
    assert db.top_records("123", TVM, "cuda-x", 10) == []
    assert [r.target_key for r in db.records_for_target("llvm-b")] == ["llvm-b"]


def test_reopen_keeps_records_and_uses_wal(db_path: Path) -> None:
    with TuningDatabase(db_path) as db:
        db.commit_record(_row())
    with TuningDatabase(db_path) as db:
        assert db.count_records("123", TVM, "llvm-a") == 1
        assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.integrity_check() == "ok"


_WRITER = """
import sys, time
from hwaware.db import RecordRow, TuningDatabase
db = TuningDatabase(sys.argv[1])
for i in range(int(sys.argv[2])):
    db.commit_record(RecordRow("w", "llvm-a", f"[{sys.argv[3]}, {i}]", "[]", [1e-5], 10.0, None,
                               "proc", None, sys.argv[4], time.time()))
"""


def test_concurrent_writer_processes_lose_nothing(db_path: Path) -> None:
    TuningDatabase(db_path).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(db_path), "40", str(p), TVM])
             for p in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    with TuningDatabase(db_path) as db:
        assert db.count_records("w", TVM, "llvm-a") == 120
        assert db.integrity_check() == "ok"


def test_commit_is_visible_to_another_process_at_once(db: TuningDatabase) -> None:
    db.commit_record(_row(trace="[7]"))
    reader = ("import sys; from hwaware.db import TuningDatabase; "
              "print(TuningDatabase(sys.argv[1]).count_records('123', sys.argv[2], 'llvm-a'))")
    out = subprocess.run([sys.executable, "-c", reader, str(db.path), TVM], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "1"


def test_corrupt_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    bad = tmp_path / "broken.db"
    bad.write_bytes(b"this is not a database" * 100)
    before = bad.read_bytes()
    with pytest.raises(DatabaseError, match="broken.db"):
        TuningDatabase(bad)
    assert bad.read_bytes() == before


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(DatabaseError, match="foreign"):
        TuningDatabase(foreign)
    with sqlite3.connect(foreign) as conn:  # nothing was added
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["customers"]


def test_newer_schema_is_refused(db_path: Path) -> None:
    TuningDatabase(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(DatabaseError, match="schema version 99"):
        TuningDatabase(db_path)


def test_export_import_round_trip(tmp_path: Path, db: TuningDatabase) -> None:
    db.commit_workload("123", TVM, '{"mod": 1}', "conv2d", "")
    db.commit_record(_row(trace="[1]", mean_us=12.0))
    db.commit_record(_row(trace="[2]", mean_us=None))
    export = tmp_path / "records.jsonl"
    assert db.export_jsonl(export) == 3
    with TuningDatabase(tmp_path / "copy.db") as copy:
        assert copy.import_jsonl(export) == {"workloads": 1, "records": 2, "duplicates": 0,
                                                 "other_tvm_version": 0}
        assert copy.import_jsonl(export)["duplicates"] == 2
        assert copy.top_records("123", TVM, "llvm-a", 1)[0].mean_us == 12.0
        assert copy.workload_json("123", TVM) == '{"mod": 1}'


def test_malformed_import_adds_nothing(tmp_path: Path, db: TuningDatabase) -> None:
    export = tmp_path / "bad.jsonl"
    good = json.dumps({"kind": "workload", "hash": "1", "tvm_version": TVM, "mod_json": "{}"})
    export.write_text(good + "\n{not json\n")
    with pytest.raises(DatabaseError, match="bad.jsonl:2"):
        db.import_jsonl(export)
    assert db.stats()["workloads"] == 0


def _kernel_record(signature: str = "matmul:abc") -> KernelRecord:
    return KernelRecord(signature=signature, family="matmul", ops=("aten.linear.default",),
                        input_shapes=((8, 64),), output_shapes=((8, 64),),
                        dtypes=("float32", "float32"), attributes="[]", flops=65536,
                        bytes_moved=20480, weight_bytes=16640)


def test_a_schema_1_file_is_migrated_in_place(tmp_path: Path) -> None:
    """tests/data/schema_v1.db was made by hwaware's schema-1 code (a 4-trial session and a
    compile); opening it adds the new tables and keeps every row."""
    path = tmp_path / "old.db"
    shutil.copy(Path(__file__).parent / "data" / "schema_v1.db", path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        before = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                  for t in ("workloads", "records", "sessions", "kernel_measurements")}
    with TuningDatabase(path) as db:
        stats = db.stats()
        assert {t: stats[t] for t in before} == before and before["records"] == 4
        assert stats["kernels"] == 0 and stats["model_measurements"] == 0
        target = db.records_for_target(stats["targets"][0]["target"])[0].target_key
        assert len(db.kernel_measurements(target)) == before["kernel_measurements"]
        db.commit_kernel(_kernel_record())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    with TuningDatabase(path) as db:  # reopening a migrated file changes nothing
        assert db.kernel("matmul:abc") == _kernel_record()


def test_kernel_schema_and_measurements_are_read_back_per_target(db: TuningDatabase) -> None:
    record = _kernel_record()
    db.commit_kernel(record, ["w1", "w2"], TVM, "llvm-a")
    db.commit_kernel(record, ["w1"], TVM, "llvm-a")  # again: stored once
    assert db.kernel(record.signature) == record and db.kernel("nope") is None
    assert db.kernel_workloads(record.signature, TVM, "llvm-a") == ["w1", "w2"]
    assert db.kernel_workloads(record.signature, TVM, "llvm-b") == []
    db.commit_kernel_measurement(record.signature, "llvm-a", "tvm", 12.5, "matmul")
    db.commit_kernel_measurement(record.signature, "llvm-b", "tvm", 99.0, "matmul")
    got = db.kernel_measurements("llvm-a")
    assert [(m.signature, m.impl, m.run_us) for m in got] == [(record.signature, "tvm", 12.5)]
    db.commit_model_measurement(ModelMeasurement("bert", "llvm-a", "hwaware", 310.0, 4.0,
                                                 [record.signature], "test"))
    (model,) = db.model_measurements("llvm-a", "bert")
    assert model.kernels == [record.signature] and model.latency_us == 310.0
    assert db.model_measurements("llvm-b") == []


def test_every_table_survives_export_and_import(tmp_path: Path, db: TuningDatabase) -> None:
    db.commit_workload("123", TVM, '{"mod": 1}', "conv2d", "")
    db.commit_record(_row(trace="[1]", mean_us=12.0))
    db.start_session("s1", "llvm-a", "bert", 8)
    db.commit_kernel(_kernel_record(), ["123"], TVM, "llvm-a")
    db.commit_kernel_measurement("matmul:abc", "llvm-a", "torch", 20.0, "matmul")
    db.commit_model_measurement(ModelMeasurement("bert", "llvm-a", "hwaware", 310.0, 4.0,
                                                 ["matmul:abc"], "test", "s1"))
    export = tmp_path / "all.jsonl"
    assert db.export_jsonl(export) == 7
    with TuningDatabase(tmp_path / "copy.db") as copy:
        added = copy.import_jsonl(export)
        assert added == {"workloads": 1, "records": 1, "sessions": 1, "kernels": 1,
                         "kernel_workloads": 1, "kernel_measurements": 1,
                         "model_measurements": 1, "duplicates": 0,
                         "other_tvm_version": 0}
        assert copy.import_jsonl(export)["duplicates"] == 4  # measurements and the session
        assert copy.kernel("matmul:abc") == _kernel_record()
        assert copy.kernel_measurements("llvm-a")[0].run_us == 20.0
        assert copy.model_measurements("llvm-a")[0].session_id == "s1"
        copy.export_jsonl(tmp_path / "again.jsonl")
    assert sorted(export.read_text().splitlines()) == \
        sorted((tmp_path / "again.jsonl").read_text().splitlines())
