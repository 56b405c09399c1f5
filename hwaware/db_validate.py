"""What a row of the tuning database must look like when it comes from outside (import, merge).

Goes in: one exported row (a dict, from a JSONL line or another database's table) and where it
came from. Comes out: nothing, or a `RecordError` naming the place, the field and what is wrong.
Every table's fields are listed once, in `KINDS`, with a checker each: types, required fields,
JSON that must parse (a MetaSchedule trace's shape is checked without importing TVM), numbers
that must be finite and positive. TVM-free, so `hwaware db import` starts fast.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], str | None]  # the value's problem, or None


class RecordError(ValueError):
    """A row that may not enter the database (the message names where it came from)."""


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _opt_text(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "must be a string or null"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _positive(value: Any) -> str | None:
    return None if _is_number(value) and value > 0 else "must be a finite number > 0"


def _opt_positive(value: Any) -> str | None:
    return None if value is None else _positive(value)


def _non_negative(value: Any) -> str | None:
    return None if _is_number(value) and value >= 0 else "must be a finite number >= 0"


def _opt_non_negative(value: Any) -> str | None:
    return None if value is None else _non_negative(value)


def _count(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be an integer >= 0"


def _run_secs(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(_positive(v) is None for v in value)
    return None if ok else "must be a non-empty list of finite numbers > 0 (seconds)"


def _json_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string holding JSON"
    try:
        json.loads(value)
    except ValueError as err:
        return f"is not JSON ({err})"
    return None


def _json_list(value: Any) -> str | None:
    problem = _json_text(value)
    if problem is None and not isinstance(json.loads(value), list):
        problem = "must be a JSON list"
    return problem


def _trace(value: Any) -> str | None:
    """A MetaSchedule trace as JSON: [[instruction, ...], [decision, ...]], each instruction
    [name, inputs, attrs, outputs], each decision [instruction index, value]."""
    problem = _json_text(value)
    if problem is not None:
        return problem
    doc = json.loads(value)
    shaped = isinstance(doc, list) and len(doc) == 2 and all(isinstance(p, list) for p in doc)
    insts = doc[0] if shaped else []
    decisions = doc[1] if shaped else []
    shaped = shaped and bool(insts) and all(
        isinstance(i, list) and len(i) == 4 and isinstance(i[0], str) and i[0]
        and all(isinstance(part, list) for part in i[1:]) for i in insts) and all(
        isinstance(d, list) and len(d) == 2 and isinstance(d[0], int)
        and 0 <= d[0] < len(insts) for d in decisions)
    return None if shaped else "is not a MetaSchedule trace ([[instructions], [decisions]])"


_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?([.+-]?[A-Za-z0-9.+-]*)?$")


def _tvm_version(value: Any) -> str | None:
    ok = isinstance(value, str) and _VERSION.match(value) is not None
    return None if ok else "must be a TVM version such as '0.27.0.post1'"


def _opt_json(value: Any) -> str | None:
    return None if value is None else _json_text(value)


@dataclass(frozen=True)
class Kind:
    """One table's rows: the table, and each field's checker (required ones first)."""

    table: str
    required: dict[str, Check]
    optional: dict[str, Check]

    def check(self, row: dict[str, Any]) -> str | None:
        missing = [f for f in self.required if f not in row]
        if missing:
            return f"missing fields {missing}"
        for name, check in {**self.required, **self.optional}.items():
            problem = check(row[name]) if name in row else None
            if problem is not None:
                return f"field {name!r} {problem} (got {_short(row[name])})"
        return None


_RECORD = Kind("records", {
    "workload_hash": _text, "target_key": _text, "trace_json": _trace,
    "args_info_json": _json_list, "run_secs": _run_secs, "mean_us": _opt_positive,
    "error": _opt_text, "device": _text, "session_id": _opt_text, "tvm_version": _tvm_version,
    "created_at": _positive}, {})

# export kind -> its table and fields, in the order an export writes them
KINDS: dict[str, Kind] = {
    "workload": Kind("workloads", {"hash": _text, "tvm_version": _tvm_version,
                                   "mod_json": _json_text},
                     {"family": _opt_text, "shapes": _opt_text}),
    "record": _RECORD,
    "kernel": Kind("kernels", {"signature": _text, "family": _text, "record_json": _json_text,
                               "flops": _count, "bytes_moved": _count},
                   {"created_at": _opt_positive}),
    "kernel_workload": Kind("kernel_workloads", {
        "signature": _text, "workload_hash": _text, "tvm_version": _tvm_version,
        "target_key": _text}, {}),
    "kernel_measurement": Kind("kernel_measurements", {
        "signature": _text, "target_key": _text, "impl": _text, "run_us": _positive,
        "device": _text}, {"family": _opt_text, "created_at": _opt_positive}),
    "model_measurement": Kind("model_measurements", {
        "model": _text, "target_key": _text, "impl": _text, "latency_us": _positive,
        "device": _text}, {"spread_us": _opt_non_negative, "kernels_json": _json_list,
                           "session_id": _opt_text, "created_at": _opt_positive}),
    "session": Kind("sessions", {"id": _text, "target_key": _text, "model": _opt_text,
                                 "trials": _count, "device": _text},
                    {"started_at": _opt_positive, "finished_at": _opt_positive,
                     "summary_json": _opt_json}),
}


def check_row(where: str, obj: Any) -> dict[str, Any]:
    """`obj` (one exported row with its `kind`) if it may enter the database; else a
    `RecordError` naming `where` (file:line, or file:table/rowid), the field and the problem."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in KINDS:
        raise RecordError(f"{where}: unknown kind {kind!r} (expected one of "
                          f"{', '.join(KINDS)})")
    problem = KINDS[kind].check(obj)
    if problem is not None:
        raise RecordError(f"{where}: {kind} {problem}")
    return obj


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
