"""Dynamic networks: every zoo model compiles, every path equals eager, save/load, bad input."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

import hwaware
from hwaware.dynamic.driver import plan_model
from hwaware.dynamic.model import DynamicCaptureError, DynamicModel, EagerRegionWarning
from hwaware.dynamic_zoo import DYNAMIC_MODELS, DynamicCase, get_dynamic_case
from hwaware.runtime import InputMismatchError
from hwaware.zoo import ZOO, get_model
from tests.helpers import assert_close_to_eager, checked_on_tvm


@functools.cache
def compiled_case(name: str) -> tuple[DynamicCase, DynamicModel]:
    """Each zoo model compiled once per test session (untuned, no database)."""
    case = get_dynamic_case(name)
    cm = hwaware.compile(case.model, case.example_inputs, db=None, show_progress=False)
    assert isinstance(cm, DynamicModel)
    return case, cm


@pytest.mark.parametrize("name", sorted(DYNAMIC_MODELS))
def test_zoo_model_every_path_equals_eager_and_survives_save_load(name: str, tmp_path: Path
                                                                  ) -> None:
    case, cm = compiled_case(name)
    specs_before = _specializations(cm)
    for label, inputs in case.branch_inputs.items():
        try:
            assert_close_to_eager(case.model, cm, *inputs)
        except AssertionError as err:
            raise AssertionError(f"{name}/{label}: {err}") from err
    if name != "shape_branch":  # same shapes: exploration compiled every path up front
        assert _specializations(cm) == specs_before
    report = cm.report()
    assert "static subgraphs" in report and "host decisions" in report
    assert "torch.compile (Dynamo)" in report
    loaded = hwaware.load(cm.save(tmp_path / "saved"))
    for inputs in case.branch_inputs.values():
        assert_close_to_eager(case.model, loaded, *inputs)
    assert (tmp_path / "saved" / "host_program.py").read_text().count("def forward") == 1


def _specializations(cm: DynamicModel) -> int:
    return sum(len(r.compiled) for r in cm.runners.values())


def test_exploration_takes_every_branch_direction(tmp_path: Path) -> None:
    case, cm = compiled_case("skipnet")
    stats = cm.info.explore
    assert stats.sites > 0 and stats.directions_covered == 2 * stats.sites


def test_loaded_model_runs_without_the_user_class(tmp_path: Path) -> None:
    case, cm = compiled_case("moe_top1")
    out = cm.save(tmp_path / "moe")
    for label, inputs in case.branch_inputs.items():
        with torch.no_grad():
            torch.save({"x": inputs[0], "y": case.model(*inputs)}, tmp_path / f"{label}.pt")
    script = (
        "import sys, torch, hwaware\n"
        f"m = hwaware.load({str(out)!r})\n"
        "assert 'hwaware.dynamic_zoo' not in sys.modules\n"
        f"for label in {sorted(case.branch_inputs)!r}:\n"
        f"    d = torch.load({str(tmp_path)!r} + f'/{{label}}.pt')\n"
        "    torch.testing.assert_close(m(d['x']), d['y'], rtol=1e-3, atol=1e-4)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ok" in done.stdout
    assert "region_" in (out / "host_program.py").read_text()
    doc = json.loads((out / "dynamic.json").read_text())
    assert all(r["specializations"] for r in doc["regions"])


def test_regions_of_the_same_structure_share_workloads(tmp_path: Path) -> None:
    case, cm = compiled_case("skipnet")
    signatures = [
        tuple(sorted(k.signature for k in spec.program.kernels.values()))
        for r in cm.runners.values() for spec in r.compiled.values()
    ]
    assert len(set(signatures)) < len(signatures)  # the residual blocks share their kernels


def test_static_models_keep_the_static_path() -> None:
    for name in ZOO:
        model, _ = get_model(name, small=True)
        assert plan_model(model) is None, name


# ------------------------------------------------------------------------ bad input
class _OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)


class PrintsInForward(_OneLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:
            print("positive")
            h = h * 2
        return torch.relu(h)


class NonzeroInForward(_OneLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.max() > -100:
            kept = h[torch.nonzero(h > 0, as_tuple=True)]
            h = h + kept.sum()
        return F.relu(h)


class NumpyInForward(_OneLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.max() > -100:
            h = h + torch.from_numpy(np.sort(h.detach().numpy(), axis=-1))
        return F.relu(h)


def test_data_dependent_output_shapes_compile_and_equal_eager() -> None:
    model = NonzeroInForward().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerRegionWarning)
        cm = hwaware.compile(model, (torch.randn(1, 4),), db=None, show_progress=False)
    for x in [torch.randn(1, 4), -torch.ones(1, 4), torch.ones(1, 4), torch.randn(1, 4)]:
        assert_close_to_eager(model, cm, x)


def _line_of(cls: type, text: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(cls)
    return start + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize(("cls", "marker"), [(PrintsInForward, "print("),
                                             (NumpyInForward, "np.sort")])
def test_region_that_cannot_be_static_runs_eager_with_one_warning_naming_its_line(
        cls: type, marker: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = cls().eval()
    x = torch.randn(1, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = hwaware.compile(model, (x,), db=None, show_progress=False)
    ours = [w for w in caught if issubclass(w.category, EagerRegionWarning)]
    assert len(ours) == 1
    assert f"{Path(__file__).name}:{_line_of(cls, marker)}" in str(ours[0].message)
    for inputs in [(x,), (-x,), (torch.ones(1, 4),)]:
        assert_close_to_eager(model, cm, *inputs)
    assert "eager" in cm.report()
    saved = cm.save(tmp_path / "saved")  # the eager region as its source: load needs model=
    eager = next(r.info.name for r in cm.runners.values() if r.eager_reason is not None)
    with pytest.raises(ValueError, match=f"{eager} .*model="):
        hwaware.load(saved)
    loaded = hwaware.load(saved, model=model)
    for inputs in [(x,), (-x,), (torch.ones(1, 4),)]:
        assert_close_to_eager(model, loaded, *inputs)


@pytest.mark.parametrize(("cls", "marker"), [(PrintsInForward, "print("),
                                             (NumpyInForward, "np.sort")])
def test_strict_mode_raises_naming_the_line(cls: type, marker: str) -> None:
    with pytest.raises(DynamicCaptureError, match=f"{Path(__file__).name}:"
                                                  f"{_line_of(cls, marker)}"):
        hwaware.compile(cls().eval(), (torch.randn(1, 4),), db=None, show_progress=False,
                        strict=True)


def test_loaded_model_refuses_shapes_it_was_not_compiled_for(tmp_path: Path) -> None:
    case, cm = compiled_case("shape_branch")
    loaded = hwaware.load(cm.save(tmp_path / "m"))
    assert_close_to_eager(case.model, loaded, *case.example_inputs)
    with pytest.raises(InputMismatchError, match=r"region_\d+ \(.*dynamic_zoo.py:\d+\) was "
                                                 r"not compiled for inputs"):
        loaded(torch.randn(1, 40, case.example_inputs[0].shape[2]))
    with pytest.raises(InputMismatchError, match="expected 1 input"):
        loaded(*case.example_inputs, *case.example_inputs)


def test_tuning_shares_records_between_regions_of_the_same_structure(tmp_path: Path) -> None:
    case = get_dynamic_case("skipnet")
    db = tmp_path / "t.db"
    summary = hwaware.tune(case.model, case.example_inputs, trials=8, db=db,
                           show_progress=False)
    assert summary.tasks and summary.trials_measured > 0
    cm = hwaware.compile(case.model, case.example_inputs, db=db, show_progress=False)
    assert isinstance(cm, DynamicModel)
    tuned = {w for r in cm.runners.values() for spec in r.compiled.values()
             for w in spec.info.tuned_workloads}
    users = [r.info.name for r in cm.runners.values() for spec in r.compiled.values()
             if spec.info.tuned_workloads]
    assert tuned <= {t.workload_hash for t in summary.tasks}
    assert len(users) > len(summary.tasks)  # the blocks' regions use the same tuned records
    for inputs in case.branch_inputs.values():
        assert_close_to_eager(case.model, cm, *inputs)


def test_a_loaded_dynamic_model_redecides_every_region_its_inputs_reach(tmp_path: Path
                                                                        ) -> None:
    """`redecide` on a loaded dynamic model re-times the kernels of every compiled region the
    given inputs run (their timings and spreads filled again), and every path stays equal to
    eager."""
    case, cm = compiled_case("branchy_cnn")
    loaded = hwaware.load(cm.save(tmp_path / "saved"))
    assert isinstance(loaded, DynamicModel)
    kernels = [k for r in loaded.runners.values() for c in r.compiled.values()
               for k in c.program.kernels.values() if checked_on_tvm(k)]
    assert kernels
    for k in kernels:  # 0: in the library, never timed
        k.tvm_us, k.tvm_spread = 0.0, None
    for inputs in case.branch_inputs.values():
        assert loaded.redecide(*inputs) is loaded
    assert all(k.tvm_us and k.tvm_spread is not None for k in kernels)
    for inputs in case.branch_inputs.values():
        assert_close_to_eager(case.model, loaded, *inputs)
