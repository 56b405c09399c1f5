"""Many tuning sessions on one database: N writer processes commit records at once.

Each writer is a separate process that commits measured candidates through
`TuningDatabase.commit_record`, the call the tuner's `RecordingCallback` makes for every
candidate (one transaction each). Every writer also commits the same `--shared` candidates, which
must be stored once. Checks: 0 lost, 0 duplicated, 0 errors (a `database is locked` reaching a
writer counts as one). Reports the records committed per second by all writers together.

    python bench/db_writers.py [--sessions 4] [--records 2000] [--shared 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's hwaware
TARGET = "llvm-bench-2c"
TVM_VERSION = "0.27.0.post1"


def trace_json(tag: str) -> str:
    """A MetaSchedule-shaped trace (what import validation accepts) told apart by `tag`."""
    return json.dumps([[["GetSBlock", [], [tag, "main"], ["b0"]]], []])


def writer(db_path: str, name: str, records: int, shared: int, go_file: str) -> dict[str, Any]:
    """One session: its own records then the shared ones, each committed on its own."""
    from hwaware.db import RecordRow, TuningDatabase

    tags = [f"{name}-{i}" for i in range(records)] + [f"shared-{i}" for i in range(shared)]
    db = TuningDatabase(db_path, device=name)
    Path(f"{go_file}.ready-{name}").touch()
    while not Path(go_file).exists():
        time.sleep(0.01)
    new = errors = 0
    first_error = ""
    start = time.perf_counter()
    for i, tag in enumerate(tags):
        row = RecordRow(
            workload_hash=f"bench-{i % 8}", target_key=TARGET, trace_json=trace_json(tag),
            args_info_json="[]", run_secs=[1e-5 * (1 + i % 7)], mean_us=10.0 * (1 + i % 7),
            error=None, device=name, session_id=name, tvm_version=TVM_VERSION,
            created_at=time.time())
        try:
            new += db.commit_record(row)
        except Exception as err:  # counted: no error may reach a session
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    db.close()
    return {"writer": name, "committed": len(tags), "new": new, "errors": errors,
            "first_error": first_error, "seconds": seconds}


def run(sessions: int, records: int, shared: int, db_path: Path) -> dict[str, Any]:
    """Start the writers, release them together, and check the database they leave."""
    go = str(db_path) + ".go"
    procs = [subprocess.Popen(
        [sys.executable, __file__, "--writer", str(db_path), f"s{k}", str(records), str(shared),
         go], stdout=subprocess.PIPE, text=True) for k in range(sessions)]
    while len(list(db_path.parent.glob(db_path.name + ".go.ready-*"))) < sessions:
        if any(p.poll() not in (None, 0) for p in procs):
            raise RuntimeError("a writer died before it started")
        time.sleep(0.05)
    start = time.perf_counter()
    Path(go).touch()
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - start
    return {**check(db_path, sessions, records, shared), "sessions": sessions,
            "records_per_session": records + shared, "wall_s": round(wall, 2),
            "records_per_s": round(sum(r["committed"] for r in results) / wall, 1),
            "new": sum(r["new"] for r in results), "errors": sum(r["errors"] for r in results),
            "first_error": next((r["first_error"] for r in results if r["errors"]), ""),
            "exit_codes": [p.returncode for p in procs]}


def check(db_path: Path, sessions: int, records: int, shared: int) -> dict[str, int]:
    """Lost and duplicated records, counted in the file (with a fresh connection)."""
    import sqlite3

    expected = {trace_json(f"s{k}-{i}") for k in range(sessions) for i in range(records)} | \
        {trace_json(f"shared-{i}") for i in range(shared)}
    with sqlite3.connect(db_path) as conn:
        rows = [r[0] for r in conn.execute("SELECT trace_json FROM records")]
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    return {"expected": len(expected), "rows": len(rows), "lost": len(expected - set(rows)),
            "duplicated": len(rows) - len(set(rows)), "integrity_ok": int(integrity == "ok")}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        db_path, name, records, shared, go = sys.argv[2:7]
        print(json.dumps(writer(db_path, name, int(records), int(shared), go)))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--records", type=int, default=2000, help="own records per session")
    p.add_argument("--shared", type=int, default=100, help="records every session commits")
    p.add_argument("--db", default=None, help="database file (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hwaware-writers-") as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "shared.db"
        result = run(args.sessions, args.records, args.shared, path)
    result["cpu"] = _cpu()
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['sessions']} sessions x {result['records_per_session']} records on "
          f"{result['cpu']}: {result['records_per_s']} records/s committed "
          f"({result['wall_s']} s); lost {result['lost']}, duplicated {result['duplicated']}, "
          f"errors {result['errors']}, integrity {'ok' if result['integrity_ok'] else 'FAILED'}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} vCPUs"
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
