"""Configuration checks shared by every entry point (torch.compile's `options`, `hwaware.compile`,
`hwaware.tune`, the command line): a bad value raises at once, naming the option, the value and
the valid values, before any graph is compiled.

Goes in: the raw option values. Comes out: the same values checked (a target resolved, a
database opened), or a `ValueError` / `hwaware.db.DatabaseError`.
"""

from __future__ import annotations

from typing import Any

from hwaware.db import DatabaseError, DbArg, TuningDatabase, open_db
from hwaware.target import Target, get_target


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer option (not a bool, a float or a string) of at least `minimum`."""
    if type(value) is not int or value < minimum:
        raise ValueError(f"hwaware option {name!r} must be an integer >= {minimum}, "
                         f"got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"hwaware option {name!r} must be True or False, got {value!r}")
    return value


def check_target(value: Any) -> Target:
    """A target name, a target JSON file or a `Target` (see `hwaware.target.get_target`)."""
    try:
        return get_target(value)
    except ValueError as err:
        raise ValueError(f"hwaware option 'target': {err}") from err


def check_db(value: Any) -> TuningDatabase | None:
    """The database `value` names (None: none), opened now so a corrupt, foreign or newer file
    is refused before anything is compiled."""
    if value is not None and not isinstance(value, (str, TuningDatabase)) and \
            not hasattr(value, "__fspath__"):
        raise ValueError(f"hwaware option 'db' must be a path to a tuning database, a "
                         f"TuningDatabase or None, got {value!r}")
    db: DbArg = value
    try:
        return open_db(db)
    except DatabaseError as err:
        raise DatabaseError(f"hwaware option 'db': {err}") from err
