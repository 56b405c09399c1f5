"""hwaware.compile end to end: outputs equal eager PyTorch on every zoo model, save/load round
trips, and bad input gets a clear error."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hwaware
from hwaware.aten_ops import supported_aten_ops
from hwaware.capture import CaptureError, capture
from hwaware.partition import UnsupportedOpWarning, partition
from hwaware.runtime import InputMismatchError
from hwaware.target import UnknownTargetError
from hwaware.zoo import ZOO, get_model
from tests.helpers import assert_close_to_eager


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_eager(name: str) -> None:
    model, inputs = get_model(name, small=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        compiled = hwaware.compile(model, inputs, db=None)
    for _ in range(2):  # twice: no state may leak between calls
        assert_close_to_eager(model, compiled, *inputs)


def test_untuned_model_runs_kernels_on_tvm_with_default_schedules() -> None:
    model, inputs = get_model("transformer_encoder_layer", small=True)
    compiled = hwaware.compile(model, inputs, db=None)
    on_tvm = [k for k in compiled.program.kernels.values() if k.impl == "tvm"]
    assert on_tvm, compiled.report()  # built, checked against PyTorch, timed, and faster
    assert_close_to_eager(model, compiled, *inputs)


def test_untuned_large_contractions_stay_in_pytorch() -> None:
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 16, 16, 16)
    compiled = hwaware.compile(model, (x,), db=None)
    convs = [k for k in compiled.program.kernels.values() if k.family == "conv2d"]
    assert convs and all(k.impl == "torch" for k in convs), compiled.report()
    assert_close_to_eager(model, compiled, x)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model, inputs = get_model("bert_like_attention", small=True)
    compiled = hwaware.compile(model, inputs, db=None)
    folder = compiled.save(tmp_path / "saved")
    assert {"program.json", "program.py", "weights.pt", "meta.json"} <= {
        p.name for p in folder.iterdir()}
    del model  # the loaded model needs neither the class nor pickle
    loaded = hwaware.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), compiled(*inputs), rtol=0, atol=0)
    assert "def forward" in (folder / "program.py").read_text()


def test_wrong_input_shape_or_dtype_names_expected_and_given() -> None:
    model = nn.Linear(8, 4).eval()
    compiled = hwaware.compile(model, (torch.randn(2, 8),), db=None)
    with pytest.raises(InputMismatchError, match=r"expected float32\[2, 8\], got float32\[3, 8\]"):
        compiled(torch.randn(3, 8))
    with pytest.raises(InputMismatchError, match=r"got float64\[2, 8\]"):
        compiled(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(InputMismatchError, match="expected 1 input"):
        compiled(torch.randn(2, 8), torch.randn(2, 8))


def test_unknown_target_lists_valid_names() -> None:
    with pytest.raises(UnknownTargetError, match="valid targets: .*x86-avx512"):
        hwaware.compile(nn.ReLU(), (torch.randn(2),), target="x86-avx1024", db=None)


def test_op_tvm_cannot_import_runs_in_eager_with_one_warning() -> None:
    model, inputs = get_model("searchsorted_embedding", small=True)
    with pytest.warns(UnsupportedOpWarning, match="searchsorted") as record:
        compiled = hwaware.compile(model, inputs, db=None)
    assert len([w for w in record if issubclass(w.category, UnsupportedOpWarning)]) == 1
    assert "searchsorted" in " ".join(compiled.info.host_ops)
    assert_close_to_eager(model, compiled, *inputs)


def test_uncapturable_model_gets_a_clear_error() -> None:
    class CallsNumpy(nn.Module):  # straight-line, so not a dynamic network; export fails
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.sort(x.numpy()))

    with pytest.raises(CaptureError, match="CallsNumpy"):
        hwaware.compile(CallsNumpy(), (torch.randn(4),), db=None)


def test_non_tensor_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="example inputs must be tensors"):
        hwaware.compile(nn.ReLU(), (3,), db=None)


def test_build_only_target_builds_a_library(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)).eval()
    compiled = hwaware.compile(model, (torch.randn(1, 8),), target="arm64-neon", db=None)
    assert compiled.executable is not None
    compiled.save(tmp_path / "arm")
    assert (tmp_path / "arm" / "kernels.tar").stat().st_size > 0  # objects, linked on the device
    with pytest.raises(RuntimeError, match="built for target arm64-neon"):
        compiled(torch.randn(1, 8))


def test_a_target_file_outside_targets_compiles_runs_and_loads(tmp_path: Path) -> None:
    """A user's own target file (here: this host under another name): the model runs, and a
    saved one knows its target without the file."""
    import dataclasses
    import json

    from hwaware.target import detect_host

    mine = dataclasses.replace(detect_host(), name="my-box")
    target_file = tmp_path / "my-box.json"
    target_file.write_text(json.dumps(dataclasses.asdict(mine)))
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)).eval()
    x = torch.randn(1, 8)
    compiled = hwaware.compile(model, (x,), target=str(target_file), db=None)
    assert compiled.info.target_name == "my-box" and compiled.info.target_key == mine.key
    assert_close_to_eager(model, compiled, x)
    folder = compiled.save(tmp_path / "saved")
    target_file.unlink()
    assert_close_to_eager(model, hwaware.load(folder), x)


def test_repeated_blocks_with_different_weights_stay_distinct() -> None:
    # two kernels with one signature (same shapes) but their own weights
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16),
                          nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16)).eval()
    x = torch.randn(4, 16)
    part = partition(capture(model, (x,)), supported_aten_ops())
    signatures = [k.signature for k in part.program.kernels.values()]
    assert len(signatures) > len(set(signatures))
    compiled = hwaware.compile(model, (x,), db=None)
    assert_close_to_eager(model, compiled, x)


def test_build_decisions_use_the_lower_quartile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel placement compares lower quartiles: a slow phase of the machine (noise only adds
    time) that takes up to half of one function's samples does not flip the choice. The clock
    is scripted, so this checks the statistic, not the machine's speed."""
    from hwaware import build, runner

    # per function, 20 samples: 10 at 1 us and 10 slow-phase samples at 9 us
    durations = iter([1.0] * 10 + [9.0] * 10)
    clock = [0.0]
    ticks: list[float] = []

    def perf_counter() -> float:
        if not ticks:  # a call's start: schedule its end
            ticks.append(clock[0] + next(durations) * 1e-6)
            return clock[0]
        clock[0] = ticks.pop()
        return clock[0]

    monkeypatch.setattr(runner.time, "perf_counter", perf_counter)
    (q1,) = build.time_in_blocks([lambda: None], 20, quantile=build.DECISION_QUANTILE)
    assert q1 == pytest.approx(1.0)
    durations = iter([1.0] * 10 + [9.0] * 10)
    (median,) = build.time_in_blocks([lambda: None], 20)
    assert median == pytest.approx(5.0)
