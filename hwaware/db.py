"""The tuning database: every measurement hwaware makes, in one sqlite file.

Goes in: workloads (a fused TIR kernel as TVM JSON plus its structural hash), tuning records
(one measured candidate schedule for one workload on one target), kernels (the schema of each
partitioned kernel by its signature: family, shapes, attributes, FLOPs, bytes, and the TVM
workloads it maps to), kernel measurements (a whole kernel timed as TVM or as PyTorch) and
model measurements (a whole compiled model timed).
Comes out: the best records per (workload, target), kernel and model measurements per target
(what the latency predictor trains on), statistics, JSONL export/import of every table.

Schema versions: 1 had no `kernels`, `kernel_workloads` or `model_measurements` tables; a
version-1 file is migrated in place when opened (tables added, nothing rewritten).

Design rules (see ROADMAP.md): keys are made in one place (`workload_key`), queries always name a
target so one target never sees another's records, every record says which device and session
measured it, and the file is safe under several writer processes (WAL + busy timeout, one
transaction per committed candidate).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

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
    """A sqlite tuning database on disk (sqlite-utils, WAL, schema version)."""

    def __init__(self, path: str | os.PathLike[str] = DEFAULT_DB_PATH, *,
                 device: str | None = None):
        self.path = Path(path)
        self.device = device or socket.gethostname()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_file_before_open()
        conn = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        try:
            self.db.execute("PRAGMA busy_timeout = 60000")
            self._open_or_create()
        except sqlite3.DatabaseError as err:
            conn.close()
            raise DatabaseError(f"{self.path}: not a usable hwaware database ({err})") from err

    # ----------------------------------------------------------------- opening
    def _check_file_before_open(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb") as f:
            header = f.read(16)
        if header != b"SQLite format 3\x00":
            raise DatabaseError(
                f"{self.path}: not an sqlite database (corrupt or foreign file); "
                "refusing to open or overwrite it"
            )

    def _open_or_create(self) -> None:
        app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
        tables = set(self.db.table_names())
        if app_id == 0 and not tables:
            self._create_schema()
            return
        if app_id != APPLICATION_ID:
            raise DatabaseError(
                f"{self.path}: a foreign sqlite database (tables: {sorted(tables) or 'none'}); "
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
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        """Bring an older file up to this schema: version 1 lacks the kernel schema and model
        measurement tables, which are added (its rows stay as they are)."""
        log.info("%s: migrating the database from schema %d to %d", self.path, version,
                 SCHEMA_VERSION)
        self._create_tables()
        with self.db.conn:
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _create_schema(self) -> None:
        self.db.enable_wal()
        with self.db.conn:
            self.db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._create_tables()

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

    def close(self) -> None:
        self.db.conn.close()

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
        with self.db.conn:
            self.db.execute(
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
        with self.db.conn:
            cur = self.db.execute(
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
        with self.db.conn:
            self.db.execute(
                "UPDATE records SET run_secs = ?, mean_us = ?, device = COALESCE(?, device) "
                "WHERE workload_hash = ? AND tvm_version = ? AND target_key = ? AND candidate = ?",
                [json.dumps(run_secs), statistics.median(run_secs) * 1e6, device, row.workload_hash,
                 row.tvm_version, row.target_key, candidate_key(row.trace_json)])

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
        with self.db.conn:
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
        with self.db.conn:
            self.db.table("kernel_measurements").insert({
                "signature": signature, "target_key": target_key, "impl": impl,
                "run_us": run_us, "device": self.device, "family": family,
                "created_at": time.time(),
            })

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
        with self.db.conn:
            self.db.table("model_measurements").insert({
                "model": m.model, "target_key": m.target_key, "impl": m.impl,
                "latency_us": m.latency_us, "spread_us": m.spread_us,
                "kernels_json": json.dumps(m.kernels), "device": m.device,
                "session_id": m.session_id, "created_at": m.created_at or time.time(),
            })

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
        with self.db.conn:
            self.db.table("sessions").insert({
                "id": session_id, "target_key": target_key, "model": model, "trials": trials,
                "device": self.device, "started_at": time.time(),
            })

    def finish_session(self, session_id: str, summary_json: str) -> None:
        with self.db.conn:
            self.db.table("sessions").update(
                session_id, {"finished_at": time.time(), "summary_json": summary_json}
            )

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
        for kind, (table, _) in EXPORT_KINDS.items():
            drop = {"candidate"} | ({"id"} if self.db[table].columns_dict.get("id") is int
                                    else set())  # derived from the row, or its local number
            for row in self.db[table].rows:
                row = {k: v for k, v in row.items() if k not in drop}
                if kind == "record":
                    row["run_secs"] = json.loads(row["run_secs"])
                yield json.dumps({"kind": kind, **row}, sort_keys=True)

    def import_jsonl(self, path: str | os.PathLike[str]) -> dict[str, int]:
        """Merge an export into this database, in one transaction after every line was
        validated (nothing is half-imported). Returns the rows added per table found in the
        file, and the exact duplicates of measurements and sessions skipped (a workload or
        kernel definition already there is shared, not counted)."""
        lines = _read_jsonl(Path(path))
        added = {EXPORT_KINDS[obj["kind"]][0]: 0 for obj in lines}
        added["duplicates"] = 0
        with self.db.conn:
            for obj in lines:
                if self._insert_exported(obj):
                    added[EXPORT_KINDS[obj["kind"]][0]] += 1
                elif obj["kind"] not in DEFINITIONS:
                    added["duplicates"] += 1
        return added

    def _insert_exported(self, obj: dict[str, Any]) -> bool:
        """One exported row into its table, inside the caller's transaction; False for an
        exact duplicate of a stored row."""
        kind, row = obj["kind"], {k: v for k, v in obj.items() if k != "kind"}
        table = EXPORT_KINDS[kind][0]
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


_RECORD_FIELDS = (
    "workload_hash", "target_key", "trace_json", "args_info_json", "run_secs", "mean_us",
    "error", "device", "session_id", "tvm_version", "created_at",
)
_WORKLOAD_FIELDS = ("hash", "tvm_version", "mod_json")
# export kind -> (table, fields a line of that kind must have)
EXPORT_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "workload": ("workloads", _WORKLOAD_FIELDS),
    "record": ("records", _RECORD_FIELDS),
    "kernel": ("kernels", ("signature", "family", "record_json", "flops", "bytes_moved")),
    "kernel_workload": ("kernel_workloads",
                        ("signature", "workload_hash", "tvm_version", "target_key")),
    "kernel_measurement": ("kernel_measurements",
                           ("signature", "target_key", "impl", "run_us", "device")),
    "model_measurement": ("model_measurements",
                          ("model", "target_key", "impl", "latency_us", "device")),
    "session": ("sessions", ("id", "target_key", "model", "trials", "device")),
}

DEFINITIONS = {"workload", "kernel", "kernel_workload"}  # shared by content, not measured


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


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse and validate a whole export before anything is written (nothing half-imported)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatabaseError(f"{path}:{lineno}: not JSON ({err.msg})") from err
            kind = obj.get("kind") if isinstance(obj, dict) else None
            if kind not in EXPORT_KINDS:
                raise DatabaseError(f"{path}:{lineno}: unknown kind {kind!r} (expected one "
                                    f"of {', '.join(EXPORT_KINDS)})")
            missing = [k for k in EXPORT_KINDS[kind][1] if k not in obj]
            if missing:
                raise DatabaseError(f"{path}:{lineno}: {kind} is missing fields {missing}")
            out.append(obj)
    return out


DbArg = TuningDatabase | str | os.PathLike[str] | None  # what the public entry points take


def open_db(db: DbArg) -> TuningDatabase | None:
    """The database a `db` argument names: None, an open one, or one opened at a path."""
    if db is None or isinstance(db, TuningDatabase):
        return db
    return TuningDatabase(db)
