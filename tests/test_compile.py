"""hwaware.compile end to end: outputs equal eager PyTorch on every zoo model, save/load round
trips, and bad input gets a clear error."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hwaware
from hwaware import onednn
from hwaware.aten_ops import supported_aten_ops
from hwaware.capture import CaptureError, capture
from hwaware.partition import UnsupportedOpWarning, partition
from hwaware.runtime import InputMismatchError
from hwaware.target import UnknownTargetError
from hwaware.zoo import ZOO, get_model
from tests.helpers import assert_close_to_eager, checked_on_tvm, kernels_built, on_tvm


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
    """A conv too large for the untuned direct-conv schedule (12 M multiply-adds, over
    `direct_conv.MAX_MACS`) and no tuned record: it stays in PyTorch (eager's op, or oneDNN
    with its weight reordered once, whichever was faster)."""
    model = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 48, 24, 24)
    compiled = hwaware.compile(model, (x,), db=None)
    convs = [k for k in compiled.program.kernels.values() if k.family == "conv2d"]
    assert convs and all(k.impl in ("torch", onednn.IMPL) for k in convs), compiled.report()
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


def _repeated_layers() -> tuple[nn.Module, torch.Tensor]:
    """Three layers of one shape with their own weights: kernels that share signatures."""
    layers = [m for _ in range(3) for m in (nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16))]
    return nn.Sequential(*layers).eval(), torch.randn(4, 16)


def test_a_repeated_layer_is_timed_once_and_each_copy_checked(
        monkeypatch: pytest.MonkeyPatch, tvm_wins: None) -> None:
    from hwaware import build

    timed: list[str] = []
    checked: list[str] = []
    real_timed, real_check = build._timed_against_pytorch, build._matches_pytorch

    def timing(program: Any, name: str, *args: Any) -> Any:
        timed.append(program.kernels[name].signature)
        return real_timed(program, name, *args)

    def check(program: Any, name: str, *args: Any) -> bool:
        checked.append(name)
        return real_check(program, name, *args) and name != last  # the last copy differs

    model, x = _repeated_layers()
    program = partition(capture(model, (x,)), supported_aten_ops()).program
    last = list(program.kernels)[-1]
    monkeypatch.setattr(build, "_timed_against_pytorch", timing)
    monkeypatch.setattr(build, "_matches_pytorch", check)
    with pytest.warns(build.KernelMismatchWarning, match=last):
        compiled = hwaware.compile(model, (x,), db=None)
    kernels = (compiled.kernel_plan or compiled).program.kernels
    signatures = [k.signature for k in kernels.values()]
    assert len(timed) == len(set(timed)) == len(set(signatures)) < len(signatures)
    assert set(checked) >= set(kernels)  # every copy checked against its own PyTorch ops
    assert kernels[last].impl == "torch"
    for spec in (k for k in kernels.values() if k.name != last):
        first = next(k for k in kernels.values() if k.signature == spec.signature)
        assert spec.tvm_us == first.tvm_us is not None and spec.impl == first.impl
    assert_close_to_eager(model, compiled, torch.randn(4, 16))


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
    (q1,) = runner.time_in_blocks([lambda: None], 20, quantile=build.DECISION_QUANTILE)
    assert q1 == pytest.approx(1.0)
    durations = iter([1.0] * 10 + [9.0] * 10)
    (median,) = runner.time_in_blocks([lambda: None], 20)
    assert median == pytest.approx(5.0)


def _scripted_clock(monkeypatch: pytest.MonkeyPatch, durations: Any) -> None:
    """time.perf_counter as the runner reads it around each timed call: the call lasts
    next(durations) us, drawn when the call has run (so `durations` can see which one ran)."""
    from hwaware import runner

    clock, started = [0.0], [False]

    def perf_counter() -> float:
        if started[0]:
            clock[0] += next(durations) * 1e-6
        started[0] = not started[0]
        return clock[0]

    monkeypatch.setattr(runner.time, "perf_counter", perf_counter)


def _scripted_sides(monkeypatch: pytest.MonkeyPatch, first: list[float], second: list[float]
                    ) -> list[Any]:
    """Two sides to time on a scripted clock: each side's calls cycle through its durations
    (microseconds)."""
    import itertools

    calls = {"a": itertools.cycle(first), "b": itertools.cycle(second)}
    order: list[str] = []

    def durations() -> Any:
        while True:
            yield next(calls[order[-1]])

    _scripted_clock(monkeypatch, durations())
    return [lambda: order.append("a"), lambda: order.append("b")]


@pytest.mark.parametrize(("first", "second", "rounds"), [
    ([10.0], [20.0], 1),                 # steady and far apart: settled by the first round
    ([10.0, 10.4], [10.2, 10.6], 1),     # a near-tie measured precisely (spreads under 5%)
    ([10.0, 14.0], [11.0, 15.0], 4),     # a near-tie inside the noise: timed in every round
])
def test_a_choice_is_timed_again_until_noise_cannot_turn_it(
        first: list[float], second: list[float], rounds: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`time_until_clear` times again, in smaller alternating blocks, while the two sides'
    difference is within their spreads; each Timing keeps every round's samples and reports
    the spread. The clock is scripted (each side's calls cycle through its durations)."""
    from hwaware import runner

    a, b = runner.time_until_clear(_scripted_sides(monkeypatch, first, second), 20,
                                   quantile=0.25)
    assert a.samples == b.samples == 20 * rounds
    assert a.us == pytest.approx(min(first)) and b.us == pytest.approx(min(second))
    expected_spread = (max(first) - min(first)) / (sum(first) / len(first))
    assert a.spread == pytest.approx(expected_spread)


@pytest.mark.parametrize(("budget_s", "runs"), [(3.0, 10), (10.0, 40), (1e9, 80)])
def test_a_choice_between_slow_sides_stops_at_its_time_budget(
        budget_s: float, runs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two sides of 100-150 ms a run, inside each other's noise (never clear): the first block
    of 10 runs each tells what a run costs (2.5 s for both), and no more rounds are timed than
    the budget affords: 3 s, the first block alone; 10 s, the rest of the first round and one
    round of 20; no budget, the four rounds of 20."""
    from hwaware import runner

    fns = _scripted_sides(monkeypatch, [1e5, 1.4e5], [1.1e5, 1.5e5])
    a, b = runner.time_until_clear(fns, 20, quantile=0.25, budget_s=budget_s)
    assert a.samples == b.samples == runs


def test_is_clear_weighs_the_margin_and_the_spreads() -> None:
    from hwaware.runner import Timing, is_clear

    def t(us: float, spread: float) -> Timing:
        return Timing(us, spread, 30)

    assert is_clear([t(50, 0.2), t(100, 0.2)], margin=0.1)      # 2x apart, 20% spreads
    assert not is_clear([t(90, 0.1), t(100, 0.1)], margin=0.0)  # 10% apart, 10% spreads each
    assert not is_clear([t(90, 0.06), t(100, 0.06)], margin=0.1)  # right at the margin
    assert is_clear([t(90, 0.02), t(100, 0.02)], margin=0.1)    # precise: a tie is a tie


def test_a_loaded_model_redecides_on_this_machine(tmp_path: Path) -> None:
    """`redecide` re-checks and re-times every kernel of the library here (a model whose
    saved choices were all PyTorch gets timings and spreads for each TVM kernel again), and the
    model stays correct on other inputs; a model without TVM kernels says so."""
    model, inputs = get_model("resnet_basic_block", small=True)
    hwaware.compile(model, inputs, db=None).save(tmp_path / "m")
    loaded = hwaware.load(tmp_path / "m")
    # in the library and checked (on TVM, or in PyTorch where a busy machine timed TVM slower)
    built = [k for k in loaded.program.kernels.values() if checked_on_tvm(k)]
    assert built
    for k in built:  # 0: in the library, never timed
        k.tvm_us, k.torch_us, k.tvm_spread = 0.0, None, None
    assert loaded.redecide(*inputs) is loaded
    assert all(k.tvm_us and k.torch_us and k.tvm_spread is not None for k in built)
    assert "+-" in loaded.report()
    other = tuple(torch.randn_like(x) for x in inputs)
    assert_close_to_eager(model, loaded, *other)
    eager_only = hwaware.compile(model, inputs, db=None, target="host")
    eager_only.executable = None
    with pytest.raises(ValueError, match="no TVM kernels"):
        eager_only.redecide(*inputs)


def test_kernel_check_tolerance_scales_with_the_outputs(tvm_wins: None) -> None:
    """A kernel is checked against its PyTorch ops within an absolute tolerance scaled by the
    largest value (float32 rounding grows with it): large activations are not refused as
    'differs from PyTorch', a real difference still is."""
    from hwaware import build
    from hwaware.build import KernelMismatchWarning

    e = torch.randn(1000) * 1e4
    assert build._all_close([e + 1e-3 * torch.randn(1000)], [e])
    wrong = e.clone()
    wrong[7] += 1e-2 * e.abs().max()
    assert not build._all_close([wrong], [e])

    model, (x,) = get_model("resnet_basic_block")  # 64 channels at 56 x 56
    big = x * 1e3  # outputs up to ~5,000: a flat atol 1e-4 refused this kernel (12 values)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = hwaware.compile(model, (big,), db=None)
    assert not [w for w in caught if issubclass(w.category, KernelMismatchWarning)]
    assert any(k.family == "res_block" and k.tvm_us is not None  # checked, not refused
               for k in kernels_built(on_tvm(compiled)))
    with torch.no_grad():
        expected = model(big)
        torch.testing.assert_close(compiled(big), expected, rtol=1e-3,
                                   atol=1e-4 * float(expected.abs().max()))
