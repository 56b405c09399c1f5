"""The tuning database: every measurement hwaware makes, in one sqlite file.

Goes in: workloads (a fused TIR kernel as TVM JSON plus its structural hash), tuning records
(one measured candidate schedule for one workload on one target), kernels (the schema of each
partitioned kernel by its signature: family, shapes, attributes, FLOPs, bytes, and the TVM
workloads it maps to), kernel measurements (a whole kernel timed as TVM or as PyTorch) and
model measurements (a whole compiled model timed).
Comes out: the best records per (workload, target), kernel and model measurements per target
(what the latency predictor trains on), statistics, JSONL export of every table, import and
merge of other databases or exports (every row validated first: `db_validate`; rows of
another TVM version left out, named in a warning: `rows_to_import`), and readable
views (`VIEWS`: best records, sessions, kernel and model timings) for sqlite-utils/datasette.

Schema versions: 1 had no `kernels`, `kernel_workloads` or `model_measurements` tables; a
version-1 file is migrated in place when opened (tables added, nothing rewritten).

Design rules (see ROADMAP.md): keys are made in one place (`workload_key`), queries always name a
target so one target never sees another's records, every record says which device and session
measured it, and the file is safe under several writer processes (WAL, busy timeout, one
`BEGIN IMMEDIATE` transaction per committed candidate, retried with backoff on SQLITE_BUSY).
A process holds one connection per file (`open_db`); every connection is closed at exit
(`close_all`), and closing checkpoints the WAL, so the `.db` file alone holds every record.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import socket
import sqlite3
import statistics
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from hwaware.db_validate import KINDS, RecordError, check_row

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
APPLICATION_ID = 0x68776172  # "hwar": marks the file as an hwaware database
DEFAULT_DB_PATH = Path("tuning_logs") / "hwaware.db"
FAILED_RUN_SECS = 1e9  # MetaSchedule's convention for a candidate that did not run


class DatabaseError(RuntimeError):
    """The database file cannot be used (corrupt, foreign, or from a newer hwaware)."""


@dataclass(frozen=True)
class RecordRow:
    """One measured candidate, as stored. `mean_us` is None when the candidate failed."""

    workload_hash: str
    target_key: str
    trace_json: str
    args_info_json: str
    run_secs: list[float]
    mean_us: float | None
    error: str | None
    device: str
    session_id: str | None
    tvm_version: str
    created_at: float
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class KernelMeasurement:
    """One timing of a whole partitioned kernel on one target, as TVM or as PyTorch."""

    signature: str
    target_key: str
    impl: str  # "tvm" or "torch"
    run_us: float
    family: str
    device: str
    created_at: float


@dataclass(frozen=True)
class ModelMeasurement:
    """One timing of a whole compiled model on one target (`impl`: "hwaware", "eager", ...).
    `kernels` lists its kernels' signatures in program order; `spread_us` is the timing's
    interquartile range."""

    model: str
    target_key: str
    impl: str
    latency_us: float
    spread_us: float
    kernels: list[str]
    device: str
    session_id: str | None = None
    created_at: float = 0.0


def candidate_key(trace_json: str) -> str:
    """The key that identifies a candidate schedule within a workload (its trace)."""
    import hashlib

    return hashlib.sha256(trace_json.encode()).hexdigest()[:32]


class TuningDatabase:
    """A sqlite tuning database on disk (sqlite-utils, WAL, schema version).

    Every write is one `BEGIN IMMEDIATE` transaction, retried with backoff while another
    process holds the write lock (`_write`); `close` checkpoints the WAL into the file, so the
    `.db` alone holds every record once the database is closed. `read_only=True` opens another
    machine's file for reading (import, merge) without changing a byte of it."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB_PATH, *,
                 device: str | None = None, read_only: bool = False):
        self.path = Path(path)
        self.device = device or socket.gethostname()
        self.read_only = read_only
        self.closed = False
        if read_only and not self.path.is_file():
            raise DatabaseError(f"{self.path}: no such database file")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_file_before_open()
        conn = _connect(self.path, read_only)
        self.db = sqlite_utils.Database(conn)
        try:
            _retry_busy(self._open_or_create, self.path)
        except sqlite3.DatabaseError as err:
            conn.close()
            raise DatabaseError(f"{self.path}: not a usable hwaware database ({err})") from err
        except BaseException:
            conn.close()
            raise
        _OPEN.add(self)

    # ----------------------------------------------------------------- opening
    def _check_file_before_open(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            if self.read_only:
                raise DatabaseError(f"{self.path}: empty file, not an hwaware database")
            return
        with open(self.path, "rb") as f:
            header = f.read(100)
        if header[:16] != SQLITE_HEADER:
            raise DatabaseError(
                f"{self.path}: not an sqlite database (corrupt or foreign file); "
                "refusing to open or overwrite it"
            )
        pages = int.from_bytes(header[28:32], "big")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        wal = Path(f"{self.path}-wal")
        if pages and page_size and self.path.stat().st_size < pages * page_size and \
                not (wal.exists() and wal.stat().st_size > 0):
            raise DatabaseError(
                f"{self.path}: truncated ({self.path.stat().st_size} bytes, its header says "
                f"{pages * page_size}); refusing to open or overwrite it")

    def _open_or_create(self) -> None:
        if self._is_fresh():
            self._write(self._create_schema_if_fresh)
            with self.db.ensure_autocommit_on():
                self.db.execute("PRAGMA journal_mode = WAL")
        app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
        if app_id != APPLICATION_ID:
            tables = sorted(self.db.table_names())
            raise DatabaseError(
                f"{self.path}: a foreign sqlite database (tables: {tables or 'none'}); "
                "refusing to use or overwrite it"
            )
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise DatabaseError(
                f"{self.path}: schema version {version} is newer than this hwaware "
                f"understands ({SCHEMA_VERSION}); upgrade hwaware"
            )
        integrity = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            raise DatabaseError(f"{self.path}: integrity check failed: {integrity}")
        if not self.read_only and (version < SCHEMA_VERSION or not self._has_views()):
            self._write(self._migrate)

    def _is_fresh(self) -> bool:
        """A new (or empty) file: no application id and no tables yet."""
        app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
        return not self.read_only and app_id == 0 and not self.db.table_names()

    def _create_schema_if_fresh(self) -> None:
        """Inside the write transaction: another process may have created it meanwhile."""
        if self.db.execute("PRAGMA application_id").fetchone()[0] != 0 or \
                self.db.table_names():
            return
        self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._create_tables()
        self._create_views()

    def _migrate(self) -> None:
        """Bring an older file up to this schema: version 1 lacks the kernel schema and model
        measurement tables, which are added (its rows stay as they are); a file of this
        version made before the views gets them."""
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version < SCHEMA_VERSION:
            log.info("%s: migrating the database from schema %d to %d", self.path, version,
                     SCHEMA_VERSION)
        self._create_tables()
        self._create_views()
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _execute_write(self, sql: str, args: list[Any]) -> sqlite3.Cursor:
        """One write statement in its own transaction (`_write`)."""
        return self._write(lambda: self.db.execute(sql, args))

    def _write(self, body: Callable[[], T]) -> T:
        """Run `body` in one write transaction (BEGIN IMMEDIATE ... COMMIT), retried with
        backoff while another process holds the write lock; rolled back if it raises."""
        if self.read_only:
            raise DatabaseError(f"{self.path}: opened read-only")

        def attempt() -> T:
            self.db.conn.execute("BEGIN IMMEDIATE")
            try:
                result = body()
                self.db.conn.execute("COMMIT")
            except BaseException:
                if self.db.conn.in_transaction:
                    self.db.conn.execute("ROLLBACK")
                raise
            return result

        return _retry_busy(attempt, self.path)

    def checkpoint(self) -> None:
        """Copy every committed transaction from the `-wal` file into the database file and
        empty the WAL (when no other process is reading; else the last one to close does)."""
        if self.closed or self.read_only:
            return
        try:
            self.db.conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
            busy = self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:
                self.db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as err:  # another process is mid-write: its close checkpoints
            log.debug("%s: checkpoint deferred (%s)", self.path, err)
        finally:
            self.db.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _create_tables(self) -> None:
        """Every table and index of this schema (each only if it is not there yet)."""
        self.db.table("workloads").create(
            {"hash": str, "tvm_version": str, "mod_json": str, "family": str, "shapes": str},
            pk=("hash", "tvm_version"),
            if_not_exists=True,
        )
        self.db.table("records").create(
            {
                "id": int, "workload_hash": str, "tvm_version": str, "target_key": str,
                "candidate": str, "trace_json": str, "args_info_json": str, "run_secs": str,
                "mean_us": float, "error": str, "device": str, "session_id": str,
                "created_at": float,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db.table("records").create_index(
            ["workload_hash", "tvm_version", "target_key", "candidate"], unique=True,
            if_not_exists=True,
        )
        self.db.table("records").create_index(
            ["target_key", "workload_hash", "mean_us"], if_not_exists=True
        )
        self.db.table("kernel_measurements").create(
            {
                "id": int, "signature": str, "target_key": str, "impl": str, "run_us": float,
                "device": str, "family": str, "created_at": float,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db.table("kernel_measurements").create_index(
            ["target_key", "signature"], if_not_exists=True
        )
        self.db.table("sessions").create(
            {
                "id": str, "target_key": str, "model": str, "trials": int, "device": str,
                "started_at": float, "finished_at": float, "summary_json": str,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db.table("kernels").create(
            {"signature": str, "family": str, "record_json": str, "flops": int,
             "bytes_moved": int, "created_at": float},
            pk="signature",
            if_not_exists=True,
        )
        self.db.table("kernel_workloads").create(
            {"signature": str, "workload_hash": str, "tvm_version": str, "target_key": str},
            pk=("signature", "workload_hash", "tvm_version", "target_key"),
            if_not_exists=True,
        )
        self.db.table("model_measurements").create(
            {
                "id": int, "model": str, "target_key": str, "impl": str, "latency_us": float,
                "spread_us": float, "kernels_json": str, "device": str, "session_id": str,
                "created_at": float,
            },
            pk="id",
            if_not_exists=True,
        )
        self.db.table("model_measurements").create_index(
            ["target_key", "model"], if_not_exists=True
        )

    def _create_views(self) -> None:
        """Readable views for sqlite-utils and datasette (see README, "The tuning database")."""
        for name, sql in VIEWS.items():
            self.db.execute(f"CREATE VIEW IF NOT EXISTS {name} AS {sql}")

    def _has_views(self) -> bool:
        names = ", ".join(f"'{n}'" for n in VIEWS)
        found = self.db.execute(
            f"SELECT COUNT(*) FROM sqlite_master WHERE type = 'view' AND name IN ({names})"
        ).fetchone()[0]
        return int(found) == len(VIEWS)

    def close(self) -> None:
        """Checkpoint the WAL into the file and close (idempotent)."""
        if self.closed:
            return
        self.checkpoint()
        self.db.conn.close()
        self.closed = True

    def __enter__(self) -> TuningDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- workloads
    def has_workload(self, workload_hash: str, tvm_version: str) -> bool:
        rows = self.db.execute(
            "SELECT 1 FROM workloads WHERE hash = ? AND tvm_version = ?",
            [workload_hash, tvm_version],
        ).fetchone()
        return rows is not None

    def commit_workload(
        self, workload_hash: str, tvm_version: str, mod_json: str,
        family: str = "", shapes: str = "",
    ) -> None:
        self._execute_write(
            "INSERT OR IGNORE INTO workloads (hash, tvm_version, mod_json, family, shapes) "
            "VALUES (?, ?, ?, ?, ?)",
            [workload_hash, tvm_version, mod_json, family, shapes],
        )

    def workload_json(self, workload_hash: str, tvm_version: str) -> str | None:
        row = self.db.execute(
            "SELECT mod_json FROM workloads WHERE hash = ? AND tvm_version = ?",
            [workload_hash, tvm_version],
        ).fetchone()
        return row[0] if row else None

    # ----------------------------------------------------------------- records
    def commit_record(self, row: RecordRow) -> bool:
        """Commit one measured candidate at once (its own transaction). False if already there."""
        cur = self._execute_write(
            "INSERT OR IGNORE INTO records (workload_hash, tvm_version, target_key, candidate, "
            "trace_json, args_info_json, run_secs, mean_us, error, device, session_id, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                row.workload_hash, row.tvm_version, row.target_key,
                candidate_key(row.trace_json), row.trace_json, row.args_info_json,
                json.dumps(row.run_secs), row.mean_us, row.error, row.device,
                row.session_id, row.created_at,
            ],
        )
        return cur.rowcount == 1

    def remeasure(self, row: RecordRow, run_secs: list[float], device: str | None = None
                  ) -> None:
        """Replace a stored record's measurement by a new one of the same candidate on the same
        target (`search.remeasure_top_records`); its mean_us becomes their median, its device
        the one that re-measured it (`device`, default: unchanged)."""
        self._execute_write(
            "UPDATE records SET run_secs = ?, mean_us = ?, device = COALESCE(?, device) "
            "WHERE workload_hash = ? AND tvm_version = ? AND target_key = ? AND candidate = ?",
            [json.dumps(run_secs), statistics.median(run_secs) * 1e6, device, row.workload_hash,
             row.tvm_version, row.target_key, candidate_key(row.trace_json)])

    def mark_failed(self, row: RecordRow, error: str) -> None:
        """Mark a stored record failed (its mean_us cleared, `error` kept): a record whose
        kernel computes wrong outputs (`hwaware.tvm.check`) is never used again."""
        self._execute_write(
            "UPDATE records SET mean_us = NULL, error = ? WHERE workload_hash = ? AND "
            "tvm_version = ? AND target_key = ? AND candidate = ?",
            [error[:2000], row.workload_hash, row.tvm_version, row.target_key,
             candidate_key(row.trace_json)])

    def has_candidate(self, workload_hash: str, tvm_version: str, target_key: str,
                      trace_json: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM records WHERE workload_hash = ? AND tvm_version = ? AND target_key = ? "
            "AND candidate = ?",
            [workload_hash, tvm_version, target_key, candidate_key(trace_json)],
        ).fetchone()
        return row is not None

    def count_records(self, workload_hash: str, tvm_version: str, target_key: str) -> int:
        return int(self.db.execute(
            "SELECT COUNT(*) FROM records WHERE workload_hash = ? AND tvm_version = ? "
            "AND target_key = ?",
            [workload_hash, tvm_version, target_key],
        ).fetchone()[0])

    def count_target_records(self, target_key: str, tvm_version: str) -> int:
        return int(self.db.execute(
            "SELECT COUNT(*) FROM records WHERE target_key = ? AND tvm_version = ?",
            [target_key, tvm_version],
        ).fetchone()[0])

    def top_records(
        self, workload_hash: str, tvm_version: str, target_key: str, k: int = 1
    ) -> list[RecordRow]:
        """The k fastest successful records of one workload on one target (never another's)."""
        cursor = self.db.execute(
            "SELECT * FROM records WHERE workload_hash = ? AND tvm_version = ? AND target_key = ? "
            "AND mean_us IS NOT NULL ORDER BY mean_us ASC LIMIT ?",
            [workload_hash, tvm_version, target_key, k],
        )
        return [_row_from_cursor(cursor.description, r) for r in cursor.fetchall()]

    def records_for_target(self, target_key: str, tvm_version: str | None = None
                           ) -> list[RecordRow]:
        sql = "SELECT * FROM records WHERE target_key = ?"
        args: list[Any] = [target_key]
        if tvm_version is not None:
            sql += " AND tvm_version = ?"
            args.append(tvm_version)
        cursor = self.db.execute(sql + " ORDER BY id", args)
        return [_row_from_cursor(cursor.description, r) for r in cursor.fetchall()]

    # ----------------------------------------------------------------- kernels
    def commit_kernel(self, record: Any, workload_hashes: Iterable[str] = (),
                      tvm_version: str = "", target_key: str = "") -> None:
        """Store a kernel's schema (a `hwaware.decompose.KernelRecord`) under its signature,
        and the TVM workloads its build holds on `target_key`."""

        def _body() -> None:
            self.db.execute(
                "INSERT OR IGNORE INTO kernels (signature, family, record_json, flops, "
                "bytes_moved, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                [record.signature, record.family, record.to_json(), record.flops,
                 record.bytes_moved, time.time()])
            for whash in workload_hashes:
                self.db.execute(
                    "INSERT OR IGNORE INTO kernel_workloads (signature, workload_hash, "
                    "tvm_version, target_key) VALUES (?, ?, ?, ?)",
                    [record.signature, whash, tvm_version, target_key])
        self._write(_body)

    def kernel(self, signature: str) -> Any:
        """The stored `KernelRecord` of a signature, or None."""
        from hwaware.decompose import KernelRecord

        row = self.db.execute("SELECT record_json FROM kernels WHERE signature = ?",
                              [signature]).fetchone()
        return KernelRecord.from_json(row[0]) if row else None

    def kernel_workloads(self, signature: str, tvm_version: str, target_key: str) -> list[str]:
        """The TVM workload hashes a kernel's build holds on one target."""
        rows = self.db.execute(
            "SELECT workload_hash FROM kernel_workloads WHERE signature = ? AND "
            "tvm_version = ? AND target_key = ? ORDER BY workload_hash",
            [signature, tvm_version, target_key]).fetchall()
        return [r[0] for r in rows]

    # ------------------------------------------------------ kernel measurements
    def commit_kernel_measurement(
        self, signature: str, target_key: str, impl: str, run_us: float, family: str
    ) -> None:
        self._write(lambda: self.db.table("kernel_measurements").insert({
            "signature": signature, "target_key": target_key, "impl": impl,
            "run_us": run_us, "device": self.device, "family": family,
            "created_at": time.time(),
        }))

    def kernel_measurements(self, target_key: str, signature: str | None = None
                            ) -> list[KernelMeasurement]:
        """Every kernel timing on one target (of one kernel, with `signature`), oldest first."""
        sql = "SELECT * FROM kernel_measurements WHERE target_key = ?"
        args = [target_key]
        if signature is not None:
            sql += " AND signature = ?"
            args.append(signature)
        rows = self.db.execute(sql + " ORDER BY id", args)
        names = [c[0] for c in rows.description]
        return [KernelMeasurement(**{k: v for k, v in zip(names, r, strict=True) if k != "id"})
                for r in rows.fetchall()]

    # ------------------------------------------------------- model measurements
    def commit_model_measurement(self, m: ModelMeasurement) -> None:
        self._write(lambda: self.db.table("model_measurements").insert({
            "model": m.model, "target_key": m.target_key, "impl": m.impl,
            "latency_us": m.latency_us, "spread_us": m.spread_us,
            "kernels_json": json.dumps(m.kernels), "device": m.device,
            "session_id": m.session_id, "created_at": m.created_at or time.time(),
        }))

    def model_measurements(self, target_key: str, model: str | None = None
                           ) -> list[ModelMeasurement]:
        """Every whole-model timing on one target (of one model, with `model`), oldest first."""
        sql = "SELECT * FROM model_measurements WHERE target_key = ?"
        args = [target_key]
        if model is not None:
            sql += " AND model = ?"
            args.append(model)
        rows = self.db.execute(sql + " ORDER BY id", args)
        names = [c[0] for c in rows.description]
        return [_model_measurement(dict(zip(names, r, strict=True))) for r in rows.fetchall()]

    # ---------------------------------------------------------------- sessions
    def start_session(self, session_id: str, target_key: str, model: str, trials: int) -> None:
        self._write(lambda: self.db.table("sessions").insert({
            "id": session_id, "target_key": target_key, "model": model, "trials": trials,
            "device": self.device, "started_at": time.time(),
        }))

    def finish_session(self, session_id: str, summary_json: str) -> None:
        self._write(lambda: self.db.table("sessions").update(
            session_id, {"finished_at": time.time(), "summary_json": summary_json}))

    # ------------------------------------------------------------- inspection
    def stats(self) -> dict[str, Any]:
        per_target = self.db.execute(
            "SELECT target_key, COUNT(*), COUNT(DISTINCT workload_hash), "
            "SUM(mean_us IS NULL) FROM records GROUP BY target_key ORDER BY target_key"
        ).fetchall()
        return {
            "path": str(self.path),
            "schema_version": SCHEMA_VERSION,
            "workloads": self.db["workloads"].count,
            "records": self.db["records"].count,
            "sessions": self.db["sessions"].count,
            "kernel_measurements": self.db["kernel_measurements"].count,
            "kernels": self.db["kernels"].count,
            "model_measurements": self.db["model_measurements"].count,
            "targets": [
                {"target": t, "records": n, "workloads": w, "failed": int(f or 0)}
                for t, n, w, f in per_target
            ],
        }

    def integrity_check(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    def export_jsonl(self, path: str | os.PathLike[str]) -> int:
        """Write every table as JSON lines (workloads first, records after them, ...); returns
        the number of lines."""
        n = 0
        with open(path, "w", encoding="utf-8") as out:
            for line in self._iter_export_lines():
                out.write(line + "\n")
                n += 1
        return n

    def _iter_export_lines(self) -> Iterator[str]:
        for _, obj in self.export_rows():
            yield json.dumps(obj, sort_keys=True)

    def export_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every row of every table as an export object (its `kind` added, its local `id` and
        derived `candidate` left out), with where it is: `FILE:table/rowid N`."""
        present = set(self.db.table_names())
        for kind, spec in KINDS.items():
            if spec.table not in present:  # a schema-1 file opened read-only
                continue
            columns = self.db[spec.table].columns_dict
            drop = {"candidate"} | ({"id"} if columns.get("id") is int else set())
            cursor = self.db.execute(f"SELECT rowid AS _rowid, * FROM {spec.table} ORDER BY rowid")
            names = [c[0] for c in cursor.description]
            for values in cursor:
                row = dict(zip(names, values, strict=True))
                where = f"{self.path}:{spec.table}/rowid {row.pop('_rowid')}"
                row = {k: v for k, v in row.items() if k not in drop}
                if kind == "record":
                    row["run_secs"] = _json_or_text(row["run_secs"])
                yield where, {"kind": kind, **row}

    def import_jsonl(self, path: str | os.PathLike[str]) -> dict[str, int]:
        """`import_files` of one file (kept for the existing API)."""
        return self.import_files([path])

    def import_files(self, paths: Iterable[str | os.PathLike[str]]) -> dict[str, int]:
        """Merge other databases (.db files) or JSONL exports into this one, in one transaction
        after every row of every file was validated (`db_validate`): a bad row raises
        `DatabaseError` naming its file and line (or table and rowid) and nothing is imported.
        Rows of another TVM version are left out with a warning naming the file, the rows and
        both versions (`rows_to_import`); the rest is imported. Returns the rows added per
        table found, the exact duplicates of measurements and sessions skipped (a workload or
        kernel definition already there is shared, not counted) and `other_tvm_version`."""
        rows, rejected = rows_to_import(paths)
        return self._write(lambda: self._insert_rows(rows, rejected))

    def _insert_rows(self, rows: list[dict[str, Any]], rejected: int) -> dict[str, int]:
        added = {KINDS[obj["kind"]].table: 0 for obj in rows}
        added["duplicates"] = 0
        added[OTHER_TVM] = rejected
        for obj in rows:
            if self._insert_exported(obj):
                added[KINDS[obj["kind"]].table] += 1
            elif obj["kind"] not in DEFINITIONS:
                added["duplicates"] += 1
        return added

    def _insert_exported(self, obj: dict[str, Any]) -> bool:
        """One exported row into its table, inside the caller's transaction; False for an
        exact duplicate of a stored row."""
        kind, row = obj["kind"], {k: v for k, v in obj.items() if k != "kind"}
        table = KINDS[kind].table
        if kind == "record":
            row["candidate"] = candidate_key(row["trace_json"])
            row["run_secs"] = json.dumps(row["run_secs"])
        columns = [c for c in self.db[table].columns_dict if c in row]
        if "id" in self.db[table].columns_dict:  # no natural key: skip an identical row
            where = " AND ".join(f"{c} IS ?" for c in columns)
            if self.db.execute(f"SELECT 1 FROM {table} WHERE {where}",
                               [row[c] for c in columns]).fetchone():
                return False
        cur = self.db.execute(
            f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)})", [row[c] for c in columns])
        return cur.rowcount == 1


DEFINITIONS = {"workload", "kernel", "kernel_workload"}  # shared by content, not measured

_WHEN = "datetime({}, 'unixepoch')"  # a readable UTC time of a created_at/started_at column
# readable views (name -> SELECT), made with the schema; see README, "The tuning database"
VIEWS: dict[str, str] = {
    "best_records": f"""
        SELECT target_key, workload_hash, family, tvm_version, mean_us AS best_us, trials,
               failed, device, session_id, {_WHEN.format("created_at")} AS measured_at,
               id AS record_id
        FROM (SELECT r.*, w.family,
                     ROW_NUMBER() OVER (PARTITION BY r.target_key, r.workload_hash,
                         r.tvm_version ORDER BY r.mean_us IS NULL, r.mean_us, r.id) AS pos,
                     COUNT(*) OVER (PARTITION BY r.target_key, r.workload_hash,
                         r.tvm_version) AS trials,
                     SUM(r.mean_us IS NULL) OVER (PARTITION BY r.target_key, r.workload_hash,
                         r.tvm_version) AS failed
              FROM records r LEFT JOIN workloads w
                   ON w.hash = r.workload_hash AND w.tvm_version = r.tvm_version)
        WHERE pos = 1 AND mean_us IS NOT NULL""",
    "session_overview": f"""
        SELECT s.id AS session_id, s.target_key, s.model, s.trials AS trials_requested,
               (SELECT COUNT(*) FROM records r WHERE r.session_id = s.id) AS records,
               (SELECT MIN(r.mean_us) FROM records r WHERE r.session_id = s.id) AS best_us,
               s.device, {_WHEN.format("s.started_at")} AS started_at,
               {_WHEN.format("s.finished_at")} AS finished_at,
               ROUND(s.finished_at - s.started_at, 1) AS elapsed_s,
               CASE WHEN s.finished_at IS NULL THEN 'unfinished' ELSE 'finished' END AS state
        FROM sessions s""",
    "kernel_timings": f"""
        SELECT m.target_key, m.signature, m.family, m.impl, m.run_us, m.device,
               {_WHEN.format("m.created_at")} AS measured_at,
               k.flops, k.bytes_moved,
               CASE WHEN k.flops > 0 THEN ROUND(k.flops / m.run_us / 1e3, 2) END AS gflops
        FROM kernel_measurements m LEFT JOIN kernels k ON k.signature = m.signature""",
    "model_timings": f"""
        SELECT target_key, model, impl, ROUND(latency_us / 1e3, 3) AS latency_ms,
               ROUND(spread_us / 1e3, 3) AS spread_ms, json_array_length(kernels_json)
               AS kernels, device, session_id, {_WHEN.format("created_at")} AS measured_at
        FROM model_measurements""",
}


def _model_measurement(d: dict[str, Any]) -> ModelMeasurement:
    return ModelMeasurement(
        model=d["model"], target_key=d["target_key"], impl=d["impl"],
        latency_us=d["latency_us"], spread_us=d["spread_us"],
        kernels=json.loads(d["kernels_json"] or "[]"), device=d["device"],
        session_id=d["session_id"], created_at=d["created_at"])


def _row_from_cursor(description: Any, values: tuple[Any, ...]) -> RecordRow:
    d = dict(zip([c[0] for c in description], values, strict=True))
    return RecordRow(
        workload_hash=d["workload_hash"], target_key=d["target_key"], trace_json=d["trace_json"],
        args_info_json=d["args_info_json"], run_secs=json.loads(d["run_secs"]),
        mean_us=d["mean_us"], error=d["error"], device=d["device"], session_id=d["session_id"],
        tvm_version=d["tvm_version"], created_at=d["created_at"],
    )


def read_rows(path: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every row of an hwaware database file or JSONL export, each validated, with where it is
    (`FILE:LINE` or `FILE:table/rowid N`). Raises `DatabaseError` naming the file and the
    reason for a file that is missing, truncated, corrupt or foreign, or the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise DatabaseError(f"{path}: no such file")
    with open(path, "rb") as f:
        is_sqlite = f.read(16) == SQLITE_HEADER
    try:
        if is_sqlite:
            with TuningDatabase(path, read_only=True) as src:
                return [(where, check_row(where, obj)) for where, obj in src.export_rows()]
        return [(where, check_row(where, obj)) for where, obj in _jsonl_objects(path)]
    except RecordError as err:
        raise DatabaseError(f"{err}; nothing was imported") from err
    except sqlite3.DatabaseError as err:
        raise DatabaseError(f"{path}: unreadable database ({err})") from err


OTHER_TVM = "other_tvm_version"  # import counts: rows left out for their TVM version
_NAMED_PER_FILE = 3  # rows of another TVM version named in each file's warning


def rows_to_import(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[dict[str, Any]], int]:
    """The rows of `paths` (each read and validated by `read_rows`) that this install can use,
    and how many were left out because they carry another TVM version than this install's
    `tvm.__version__` (records, workloads and kernel-workload links are keyed by it, so no
    build here would ever read them). Each file with such rows gets one warning naming the
    file, the first rows (`FILE:LINE` or `FILE:table/rowid N`) and both versions."""
    mine = this_tvm_version()
    kept: list[dict[str, Any]] = []
    foreign: dict[tuple[Path, str], list[str]] = {}
    for path in paths:
        for where, obj in read_rows(path):
            version = obj.get("tvm_version", mine)
            if version == mine:
                kept.append(obj)
            else:
                foreign.setdefault((Path(path), version), []).append(where)
    for (path, version), places in foreign.items():
        more = len(places) - _NAMED_PER_FILE
        log.warning("%s: %d rows from TVM %s not imported (this install runs TVM %s; records "
                    "are kept per TVM version and these would never be used here): %s%s",
                    path, len(places), version, mine, ", ".join(places[:_NAMED_PER_FILE]),
                    f" and {more} more" if more > 0 else "")
    return kept, sum(len(p) for p in foreign.values())


def this_tvm_version() -> str:
    """This install's `tvm.__version__`, the version builds key their records by (imports TVM,
    ~3 s, so only import and merge call it)."""
    from hwaware.tvm.setup import TVM_VERSION

    return TVM_VERSION


def _jsonl_objects(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatabaseError(f"{where}: not UTF-8 text ({err.reason})") from err
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                cut = "" if raw.endswith(b"\n") else "; the file looks truncated"
                raise DatabaseError(f"{where}: not JSON ({err.msg}){cut}") from err


def merge_databases(sources: list[str | os.PathLike[str]], out: str | os.PathLike[str]
                    ) -> dict[str, int]:
    """A new database `out` holding every valid row of `sources` (databases or JSONL), exact
    duplicates once, rows of another TVM version left out (`rows_to_import`). Every source is
    validated first; `out` appears only when complete."""
    out = Path(out)
    if out.exists():
        raise DatabaseError(f"{out}: already exists; merge writes a new database")
    rows, rejected = rows_to_import(sources)
    partial = out.with_name(out.name + ".partial")
    _remove_database_files(partial)
    try:
        with TuningDatabase(partial) as db:
            counts = db._write(lambda: db._insert_rows(rows, rejected))
        os.replace(partial, out)
    finally:
        _remove_database_files(partial)
    return counts


def _remove_database_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _json_or_text(text: Any) -> Any:
    """A stored JSON column parsed, or left as it is when it does not parse (validation then
    names it)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


SQLITE_HEADER = b"SQLite format 3\x00"
BUSY_TIMEOUT_MS = 10_000  # sqlite waits this long for a lock before a retry with backoff
BUSY_GIVE_UP_S = 600.0
CHECKPOINT_WAIT_MS = 1_000
T = TypeVar("T")


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit: `TuningDatabase._write`)."""
    target, uri = str(path), False
    if read_only:
        target, uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro", True
    conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_MS / 1000,
                           check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    # WAL + NORMAL: a commit survives the process being killed (not a power cut right after
    # it) and no fsync per record; the file is never corrupted either way
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _is_busy(err: sqlite3.OperationalError) -> bool:
    text = str(err).lower()
    return "locked" in text or "busy" in text


def _retry_busy(attempt: Callable[[], T], path: Path) -> T:
    """`attempt()`, again after a randomised, growing pause while sqlite reports the database
    locked by another process (SQLITE_BUSY), for up to BUSY_GIVE_UP_S."""
    delay, deadline = 0.005, time.monotonic() + BUSY_GIVE_UP_S
    while True:
        try:
            return attempt()
        except sqlite3.OperationalError as err:
            if not _is_busy(err):
                raise
            if time.monotonic() > deadline:
                raise DatabaseError(f"{path}: still locked by another process after "
                                    f"{BUSY_GIVE_UP_S:.0f} s ({err})") from err
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, 0.5)


DbArg = TuningDatabase | str | os.PathLike[str] | None  # what the public entry points take


_OPEN: weakref.WeakSet[TuningDatabase] = weakref.WeakSet()  # closed (checkpointed) at exit
_SHARED: dict[Path, TuningDatabase] = {}


def open_db(db: DbArg) -> TuningDatabase | None:
    """The database a `db` argument names: None, an open one, or the process's one connection
    to the file at a path (shared by every compile, tune and torch.compile graph; closed,
    with its WAL checkpointed into the file, when the process exits)."""
    if db is None or isinstance(db, TuningDatabase):
        return db
    if not isinstance(db, (str, os.PathLike)):
        raise TypeError(f"db must be a path, a TuningDatabase or None, not {db!r}")
    key = Path(db).resolve()
    shared = _SHARED.get(key)
    if shared is None or shared.closed:
        shared = _SHARED[key] = TuningDatabase(db)
    return shared


@atexit.register
def close_all() -> None:
    """Close every database this process opened (normal exit, an uncaught exception, Ctrl-C):
    each close checkpoints its WAL, so the `.db` file alone holds every record."""
    for db in list(_OPEN):
        db.close()
    _SHARED.clear()
