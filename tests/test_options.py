"""Configuration mistakes raise at once, naming the option and its valid values, before any graph
is compiled: under torch.compile (no silent eager run), in hwaware.tune, and in target files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn

import hwaware
from hwaware.target import get_target


@pytest.fixture(autouse=True)
def _reset_dynamo() -> None:
    torch._dynamo.reset()


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every graph the backend starts compiling (none may be, for a bad option)."""
    from hwaware import backend

    seen: list[Any] = []
    real = backend._compile_graph
    monkeypatch.setattr(backend, "_compile_graph",
                        lambda gm, inputs, opts: seen.append(gm) or real(gm, inputs, opts))
    return seen


def _corrupt_db(tmp_path: Path) -> str:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    return str(path)


BAD_OPTIONS = [
    ({"target": "nope"}, r"'target'.*unknown target 'nope'.*valid targets: .*host"),
    ({"target": 123}, r"'target'.*not 123.*valid targets: .*host"),
    ({"db": 123}, r"'db' must be a path to a tuning database, a TuningDatabase or None, got 123"),
    ({"trials": "abc"}, r"'trials' must be an integer >= 0, got 'abc'"),
    ({"trials": -1}, r"'trials' must be an integer >= 0, got -1"),
    ({"max_shapes": -1}, r"'max_shapes' must be an integer >= 1, got -1"),
    ({"max_weight_sets": 0}, r"'max_weight_sets' must be an integer >= 1, got 0"),
    ({"fallback": "yes"}, r"'fallback' must be True or False"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS,
                         ids=[next(iter(o)) + "=" + repr(v) for o, _ in BAD_OPTIONS
                              for v in o.values()])
def test_a_bad_option_raises_before_any_graph_is_compiled(
        options: dict[str, Any], message: str, compiles: list[Any]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": None, **options})
    with pytest.raises(Exception, match=message):
        compiled(torch.randn(2, 4))
    assert compiles == []


def test_a_corrupt_database_raises_naming_the_file(tmp_path: Path, compiles: list[Any]) -> None:
    path = _corrupt_db(tmp_path)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="hwaware", options={"db": path})
    with pytest.raises(Exception, match=r"option 'db': .*corrupt\.db"):
        compiled(torch.randn(2, 4))
    assert compiles == []
    assert Path(path).read_bytes().startswith(b"SQLite format 3\x00\xff")  # left untouched


def test_good_options_still_compile(compiles: list[Any]) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="hwaware",
                             options={"db": None, "trials": 0, "max_shapes": 1})
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), model(x))
    assert len(compiles) == 1


@pytest.mark.parametrize("trials", [-1, "8", 2.5])
def test_tune_and_compile_refuse_a_bad_trial_budget(trials: Any, tmp_path: Path) -> None:
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"'trials' must be an integer >= 0"):
        hwaware.tune(model, (x,), trials=trials, db=tmp_path / "t.db")
    with pytest.raises(ValueError, match=r"'trials' must be an integer >= 0"):
        hwaware.compile(model, (x,), trials=trials, db=None)


def test_a_target_file_with_missing_fields_is_refused_naming_them(tmp_path: Path) -> None:
    data = json.loads(get_target("x86-avx512").to_json())
    for name in ("cores", "tvm"):
        del data[name]
    data["colour"] = "blue"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"mine\.json: missing fields \['tvm', 'cores'\]; "
                                         r"unknown fields \['colour'\]"):
        get_target(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"mine\.json: not readable JSON"):
        get_target(str(path))
