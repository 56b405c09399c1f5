"""MetaSchedule's database role over hwaware's sqlite file.

Goes in: a `TuningDatabase`, a TVM target and its database key. Comes out: `SqliteDatabase`
(what MetaSchedule reads records from and commits them to) and `RecordingCallback`, which
commits each candidate as it is measured, failed ones too, and drives the progress bar.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from hwaware.db import FAILED_RUN_SECS, RecordRow, TuningDatabase, candidate_key
from hwaware.tvm.ir import plain_json, workload_hash, workload_json
from hwaware.tvm.setup import TVM_VERSION, ResolvedTarget

log = logging.getLogger(__name__)


@derived_object
class SqliteDatabase(ms.database.PyDatabase):
    """MetaSchedule's database role over hwaware's sqlite file, for one target; the records it
    commits name `device` as where they were measured (default: the database's, this machine)."""

    def __init__(self, db: TuningDatabase, target: tvm.target.Target, target_key: str,
                 device: str | None = None, verify: bool = False, farm: Any = None):
        super().__init__()
        self.db = db
        self.target = target
        self.target_key = target_key
        self.device = device or db.device
        self.verify = verify
        self.farm = farm  # with `verify`: records are checked on this farm's device instead
        self._workloads: dict[str, ms.database.Workload] = {}

    @classmethod
    def of(cls, db: TuningDatabase, target: ResolvedTarget, device: str | None = None,
           verify: bool = False, farm: Any = None) -> SqliteDatabase:
        """The adapter of `db` for a resolved target (its TVM target and database key).
        `verify` (for a build on a CPU target that runs here, or one a `farm` runs): every
        record it hands out has been checked to compute its workload's outputs
        (`hwaware.tvm.check`, on the farm's device where a farm is given); one that does not
        is excluded, marked failed in the database, with one warning naming it."""
        return cls(db, target.tvm, target.key, device, verify, farm)

    @classmethod
    def checked(cls, db: TuningDatabase, target: ResolvedTarget, device: str | None = None,
                farm: Any = None) -> SqliteDatabase:
        """`of` with `verify` wherever it can check: on a CPU target that runs here, or on
        the device of `farm` (a CPU target; the records it measured are checked there)."""
        cpu = target.tvm.kind.name == "llvm"
        return cls.of(db, target, device, verify=cpu and (farm is not None
                                                          or target.target.can_run_here),
                      farm=farm)

    def has_workload(self, mod: tvm.IRModule) -> bool:
        return self.db.has_workload(workload_hash(mod), TVM_VERSION)

    def commit_workload(self, mod: tvm.IRModule) -> ms.database.Workload:
        key = workload_hash(mod)
        if key not in self._workloads:
            self.db.commit_workload(key, TVM_VERSION, workload_json(mod))
            self._workloads[key] = ms.database.Workload(mod)
        return self._workloads[key]

    def commit_tuning_record(self, record: ms.database.TuningRecord) -> None:
        trace, run_secs, _target, args_info = record.as_json()
        self.db.commit_record(record_row(
            workload_hash(record.workload.mod), self.target_key, trace, args_info,
            [float(s) for s in run_secs or [FAILED_RUN_SECS]], None, self.device, None,
        ))

    def get_top_k(self, workload: ms.database.Workload, top_k: int) -> list[Any]:
        """The k fastest stored records that replay on `workload`; one that does not (a
        garbage trace, say, imported from elsewhere) is skipped with a warning naming it.
        With `verify`, so is one whose outputs differ from the workload's (`_computes`)."""
        if top_k <= 0:
            return []
        whash = workload_hash(workload.mod)
        asked = top_k
        while True:
            rows = self.db.top_records(whash, TVM_VERSION, self.target_key, asked)
            usable = self.computing(rows, workload)
            if len(usable) >= top_k or len(rows) < asked:
                return [record for _, record in usable[:top_k]]
            asked *= 2

    def computing(self, rows: list[RecordRow], workload: ms.database.Workload
                  ) -> list[tuple[RecordRow, Any]]:
        """Those of `rows` that replay on `workload` (`replay_records`) and, with `verify`,
        compute its outputs (`_computes`: a wrong one is marked failed), as (row, record)."""
        return [(row, record) for row, record in replay_records(rows, workload, self.target)
                if not self.verify or self._computes(workload, row, record)]

    def check_best(self, workloads: Sequence[tvm.IRModule]) -> None:
        """With `verify`: check the best record of each workload now (`_computes`), so that a
        build in a forked child finds the verdicts made and writes nothing to the database."""
        for mod in workloads:
            self.get_top_k(ms.database.Workload(mod), 1)

    def _computes(self, workload: ms.database.Workload, row: RecordRow, record: Any) -> bool:
        """Whether `record` computes `workload`'s outputs (`check.contained_mismatch`, or
        `check.farm_mismatch` on the farm's device; once per record and process); one that
        does not is marked failed in this database, so that no later build or search uses it,
        with one warning (per process) naming it."""
        from hwaware.tvm.check import contained_mismatch, farm_mismatch

        key = (row.workload_hash, row.target_key, row.trace_json)
        if key not in _VERDICTS:
            try:
                _VERDICTS[key] = (
                    farm_mismatch(workload.mod, row.trace_json, self.target, self.farm)
                    if self.farm is not None else
                    contained_mismatch(workload.mod, row.trace_json, self.target))
            except Exception as err:  # the reference failed: the record stays, unchecked
                log.warning("could not check tuning record %s of workload %s: %s",
                            candidate_key(row.trace_json), row.workload_hash, err)
                _VERDICTS[key] = None
            if _VERDICTS[key] is not None:
                _warn_wrong(row, str(_VERDICTS[key]))
        if _VERDICTS[key] is not None and not self.db.read_only and row.mean_us is not None:
            # in every database it is found in, not only the first this process checked
            self.db.mark_failed(row, f"wrong results: {_VERDICTS[key]}")
        return _VERDICTS[key] is None

    def get_all_tuning_records(self) -> list[Any]:
        records: list[Any] = []
        for workload in self._workloads.values():
            records.extend(self.get_top_k(workload, 1 << 20))
        return records

    def __len__(self) -> int:
        return self.db.count_target_records(self.target_key, TVM_VERSION)


class StoredRecordWarning(UserWarning):
    """A stored tuning record that does not replay on its workload; it is skipped."""


class WrongRecordWarning(UserWarning):
    """A stored tuning record whose kernel computes wrong outputs; it is excluded."""


_WARNED: set[tuple[str, str, str]] = set()
_VERDICTS: dict[tuple[str, str, str], str | None] = {}  # record -> why it is wrong, or None


def replay_records(rows: list[RecordRow], workload: ms.database.Workload,
                   target: tvm.target.Target) -> list[tuple[RecordRow, Any]]:
    """Each stored record as MetaSchedule's `TuningRecord` (its trace replayed on the
    workload), with its row; a record that fails to parse or replay is left out, with one
    warning per record naming it."""
    target_json = target.export()
    out = []
    for row in rows:
        try:
            record = ms.database.TuningRecord.from_json(
                [json.loads(row.trace_json), row.run_secs, target_json,
                 json.loads(row.args_info_json)], workload)
        except Exception as err:  # json, TVM's parser and the replay raise many types
            _warn_unusable(row, err)
            continue
        out.append((row, record))
    return out


def _warn_unusable(row: RecordRow, err: Exception) -> None:
    key = (row.workload_hash, row.target_key, row.trace_json)
    if key in _WARNED:
        return
    _WARNED.add(key)
    reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
    warnings.warn(
        f"hwaware: skipping a stored tuning record that does not replay (candidate "
        f"{candidate_key(row.trace_json)} of workload {row.workload_hash}, target "
        f"{row.target_key}, session {row.session_id}, mean_us {row.mean_us}): {reason}",
        StoredRecordWarning, stacklevel=3)


def _warn_wrong(row: RecordRow, why: str) -> None:
    warnings.warn(
        f"hwaware: excluding tuning record (candidate {candidate_key(row.trace_json)} of "
        f"workload {row.workload_hash}, target {row.target_key}, session {row.session_id}, "
        f"mean_us {row.mean_us}): checked against its workload on random inputs, "
        f"{why}; the next best record is used", WrongRecordWarning, stacklevel=3)


def record_row(whash: str, target_key: str, trace: Any, args_info: Any, run_secs: list[float],
                error: str | None, device: str, session_id: str | None) -> RecordRow:
    ok = error is None and run_secs and max(run_secs) < FAILED_RUN_SECS
    return RecordRow(
        workload_hash=whash, target_key=target_key, trace_json=json.dumps(trace),
        args_info_json=json.dumps(args_info), run_secs=run_secs,
        mean_us=(sum(run_secs) / len(run_secs) * 1e6) if ok else None,
        error=None if ok else (error or "failed"), device=device, session_id=session_id,
        tvm_version=TVM_VERSION, created_at=time.time(),
    )


@derived_object
class RecordingCallback(ms.measure_callback.PyMeasureCallback):
    """Commits every measured candidate (failed ones too, with their error) as it is measured."""

    def __init__(self, database: SqliteDatabase, session_id: str,
                 on_measured: Callable[[str, int, int, float | None], None]):
        super().__init__()
        self.database = database
        self.session_id = session_id
        self.on_measured = on_measured

    def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Sequence[Any],
              builder_results: Sequence[Any], runner_results: Sequence[Any]) -> None:
        task = task_scheduler.tasks_[task_id].ctx
        workload = self.database.commit_workload(task.mod)
        whash = workload_hash(workload.mod)
        best: float | None = None
        new = 0
        for cand, built, ran in zip(measure_candidates, builder_results, runner_results,
                                    strict=True):
            error = built.error_msg or ran.error_msg
            run_secs = [float(s) for s in ran.run_secs] if ran.run_secs else [FAILED_RUN_SECS]
            row = record_row(
                whash, self.database.target_key, plain_json(cand.sch.trace.as_json()),
                [plain_json(a.as_json()) for a in cand.args_info], run_secs,
                str(error)[-2000:] if error else None, self.database.device, self.session_id,
            )
            new += self.database.db.commit_record(row)
            if row.mean_us is not None:
                best = row.mean_us if best is None else min(best, row.mean_us)
        self.on_measured(str(task.task_name), len(measure_candidates), new, best)
