"""Dynamic networks in other people's styles (`tests/conformance/dynamic_styles.py`): each one
compiles, every input's output equals eager's, each input takes its own path, and what cannot be
static runs in eager with exactly one warning naming its line."""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hwaware
from hwaware.dynamic import driver
from hwaware.dynamic.model import DynamicCaptureError, DynamicModel, EagerRegionWarning
from tests.conformance import dynamic_styles
from tests.conformance.dynamic_styles import CASES, PonderLoop
from tests.helpers import assert_close_to_eager

REPO = Path(__file__).resolve().parents[1]

# case -> text of the one line its eager warning must name (the other cases: no warning)
EAGER_LINES = {"numpy_clamp": "np.clip(", "star_args_gate": "if h.sum() > 0:"}


@functools.cache
def compiled(name: str) -> tuple[nn.Module, list[tuple[torch.Tensor, ...]], DynamicModel,
                                 list[str]]:
    """The case compiled once (untuned, no database) and run on every input, with the eager
    region warnings that compiling and running raised."""
    model, inputs = CASES[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = hwaware.compile(model, inputs[0], db=None, show_progress=False)
        for x in inputs:
            cm(*x)
    assert isinstance(cm, DynamicModel), type(cm)
    return model, inputs, cm, [str(w.message) for w in caught
                               if issubclass(w.category, EagerRegionWarning)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_input_equals_eager(name: str) -> None:
    model, inputs, cm, _ = compiled(name)
    for i, x in enumerate(inputs):
        try:
            assert_close_to_eager(model, cm, *x)
        except AssertionError as err:
            raise AssertionError(f"{name}, input {i}: {err}") from err


@pytest.mark.parametrize("name", sorted(CASES))
def test_only_what_cannot_be_static_runs_eager_with_one_warning_naming_its_line(
        name: str) -> None:
    _, _, cm, caught = compiled(name)
    eager = [r.info.name for r in cm.runners.values() if r.eager_reason is not None]
    if name not in EAGER_LINES:
        assert caught == [] and eager == [], cm.report()
        return
    assert len(caught) == 1 and len(eager) == 1, caught
    assert caught[0].startswith(f"{dynamic_styles.__file__}:{_line_of(EAGER_LINES[name])}:")
    assert "eager" in cm.report()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_input_takes_its_own_path(name: str) -> None:
    """Submodule call counts differ between any two inputs of a case."""
    model, inputs = CASES[name]()
    paths = [tuple(sorted(_call_counts(model, x).items())) for x in inputs]
    assert len(set(paths)) == len(paths)


def test_ponder_loop_halts_at_each_step_count_and_stays_dynamic() -> None:
    model, inputs, cm, _ = compiled("ponder_loop")
    assert isinstance(model, PonderLoop)
    with torch.no_grad():
        steps = [model._run(*x)[1] for x in inputs]
    assert steps == [1, 4, model.max_steps]
    assert cm.info.explore.sites > 0 and len(cm.runners) > 1
    assert all(r.compiled for r in cm.runners.values())  # every region has a static graph


def test_rewrite_failing_unexpectedly_falls_back_to_eager_not_to_a_wrong_static_graph(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Split raising something other than StagingError: no host plan; export then refuses the
    `while` on the `.item()` flag, so the whole model runs eager, with one warning naming the
    line that decides."""
    def broken(*_: Any) -> None:
        raise KeyError("a bug in split")

    monkeypatch.setattr(driver, "split", broken)
    model, inputs = CASES["counted_while"]()
    cm, caught = _compile_recording(model, inputs[0])
    assert len(caught) == 1 and "all of it is one region" in caught[0]
    line = _line_of("while i < self.n and not done:")
    assert caught[0].startswith(f"{dynamic_styles.__file__}:{line}:")
    for x in inputs:
        assert_close_to_eager(model, cm, *x)


class DefaultedArguments(nn.Module):
    """PyG's GraphUNet style: `forward(x, edge_index, batch=None, edge_weight=None)`, called
    with the first two, filling the rest in the body, and deciding on a tensor value."""

    def forward(self, x: torch.Tensor, batch: torch.Tensor | None = None, scale: float = 2.0,
                name: str = "relu") -> torch.Tensor:
        if batch is None:
            batch = x.new_zeros(x.shape[0])
        h = x * scale + batch[:, None]
        return torch.relu(h) if name == "relu" and bool(h.sum() > 0) else h


def test_a_whole_eager_forward_keeps_its_defaulted_arguments(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A forward that runs as one eager region is called as its user calls it: with its
    defaulted arguments left out (GraphUNet's compiled model raised "missing 2 required
    positional arguments"), given, or saved and loaded."""
    def broken(*_: Any) -> None:
        raise KeyError("a bug in split")

    monkeypatch.setattr(driver, "split", broken)
    model = DefaultedArguments().eval()
    cm, caught = _compile_recording(model, (torch.randn(4, 3),))
    assert len(caught) == 1 and "all of it is one region" in caught[0]
    loaded = hwaware.load(cm.save(tmp_path / "saved"), model=model)
    for args in [(torch.randn(4, 3),), (-torch.rand(4, 3) - 1,),
                 (torch.randn(4, 3), torch.ones(4), 0.5), (torch.randn(4, 3), None, 3.0, "id")]:
        for compiled_model in (cm, loaded):
            torch.testing.assert_close(compiled_model(*args), model(*args))


def test_host_program_disagreeing_with_eager_falls_back_to_eager(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = driver.explore

    def off_by_one(*args: Any) -> tuple[Any, Any]:
        stats, out = real(*args)
        return stats, out + 1

    monkeypatch.setattr(driver, "explore", off_by_one)
    model, inputs = CASES["counted_while"]()
    cm, caught = _compile_recording(model, inputs[0])
    assert len(caught) == 1 and "disagrees with eager PyTorch" in caught[0]
    for x in inputs:
        assert_close_to_eager(model, cm, *x)
    with pytest.raises(DynamicCaptureError, match="disagrees with eager"):
        hwaware.compile(model, inputs[0], db=None, show_progress=False, strict=True)


def _compile_recording(model: nn.Module, inputs: tuple[torch.Tensor, ...]
                       ) -> tuple[DynamicModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = hwaware.compile(model, inputs, db=None, show_progress=False)
    assert isinstance(cm, DynamicModel)
    return cm, [str(w.message) for w in caught if issubclass(w.category, EagerRegionWarning)]


def _line_of(text: str) -> int:
    lines = inspect.getsource(dynamic_styles).splitlines()
    found = [i for i, line in enumerate(lines, start=1) if text in line]
    assert len(found) == 1, text
    return found[0]


def _call_counts(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}

    def bump(name: str, *_: Any) -> None:
        counts[name] = counts.get(name, 0) + 1

    handles = [m.register_forward_hook(functools.partial(bump, n))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


# Runs in a new process: the case's model, built again (same seed, same weights), rebinds the
# saved model's eager regions; without it, load names the regions and the argument.
FRESH_LOAD = """
import json, sys, torch
import hwaware
from tests.conformance.dynamic_styles import CASES
model, inputs = CASES[sys.argv[2]]()
try:
    hwaware.load(sys.argv[1])
    refusal = ""
except ValueError as err:
    refusal = str(err)
loaded = hwaware.load(sys.argv[1], model=model)
inputs += [tuple(-0.7 * x for x in xs) for xs in inputs]  # other inputs than compile's
worst = 0.0
with torch.no_grad():
    for xs in inputs:
        got, want = loaded(*xs), model(*xs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
print(json.dumps({"refusal": refusal, "checked": len(inputs)}))
"""


@pytest.mark.parametrize("name", sorted(EAGER_LINES))
def test_eager_regions_save_and_load_in_a_fresh_process_with_the_model(
        name: str, tmp_path: Path) -> None:
    _, _, cm, _ = compiled(name)
    saved = cm.save(tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(saved), name], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    eager = [r.info.name for r in cm.runners.values() if r.eager_reason is not None]
    assert eager and all(region in result["refusal"] for region in eager)
    assert "model=" in result["refusal"] and result["checked"] >= 4


@pytest.mark.parametrize("name", sorted(EAGER_LINES))
def test_a_model_with_other_weights_is_refused_for_the_eager_regions(
        name: str, tmp_path: Path) -> None:
    _, _, cm, _ = compiled(name)
    saved = cm.save(tmp_path / name)
    other, _ = CASES[name]()
    with torch.no_grad():
        next(iter(other.parameters())).add_(0.5)
    with pytest.raises(ValueError, match="differ from"):
        hwaware.load(saved, model=other)


@pytest.mark.parametrize("name", ["numpy_clamp", "ponder_loop"])
def test_compiling_leaves_every_submodule_in_eval_mode(name: str) -> None:
    """Capturing a region (a training-mode wrapper around the user's module) restored only the
    wrapper's flag, recursively: the user's model came back in training mode (dropout on in
    its eager regions)."""
    model, _, _, _ = compiled(name)
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------ forwards of other shapes
# Early exits written the ways the rewrite used to assume away: a module not called `self`,
# keyword-only and unread *args parameters, a forward defined outside the class, a helper with its
# own receiver name, a static method, a class made inside a function or closing over an outer
# `self`. `a` has no bias, so x and -x take opposite branches.
def _layers(m: nn.Module) -> None:
    m.a = nn.Linear(8, 8, bias=False)
    m.head = nn.Linear(8, 4, bias=False)
    m.tail = nn.Linear(8, 4, bias=False)


class ReceiverS(nn.Module):
    def __init__(s) -> None:
        super().__init__()
        _layers(s)

    def forward(s, x):
        h = s.a(x)
        if h.mean() > 0:
            return s.head(h)
        return s.tail(h) * 2


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    def forward(self, x, *unused, scale=3.0):
        h = self.a(x)
        if h.mean() > 0:
            return self.head(h) * scale
        return self.tail(h)


def _forward_outside(me, x):
    h = me.a(x)
    return me.head(h) if h.mean() > 0 else me.tail(h) - 1


class ForwardAssigned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    forward = _forward_outside


class HelperReceiver(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    def _decide(me, h):
        if h.mean() > 0:
            return me.head(h)
        return me.tail(h)

    def forward(this, x):
        return this._decide(this.a(x)) + 1


class StaticHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    @staticmethod
    def _pick(h, head, tail):
        if h.mean() > 0:
            return head(h)
        return tail(h)

    def forward(self, x):
        m = self
        return m._pick(m.a(x), m.head, m.tail)


def _local_class() -> nn.Module:
    class Local(nn.Module):
        def __init__(s) -> None:
            super().__init__()
            _layers(s)

        def forward(s, x):
            h = s.a(x)
            if h.mean() > 0:
                return s.head(h)
            return s.tail(h)

    return Local()


class _Builder:
    k = 3.0

    def build(self) -> nn.Module:
        class Closed(nn.Module):
            def __init__(m) -> None:
                super().__init__()
                _layers(m)

            def forward(s, x):
                h = s.a(x)
                if h.mean() > 0:
                    return s.head(h) * self.k
                return s.tail(h)

        return Closed()


SHAPES = {"receiver_s": ReceiverS, "keyword_only": KeywordOnly,
          "forward_assigned": ForwardAssigned, "helper_receiver": HelperReceiver,
          "static_helper": StaticHelper, "local_class": _local_class,
          "closure_self": lambda: _Builder().build()}


def _shape(make: Any) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    """The model (seeded), its compile example and other inputs taking both branches."""
    torch.manual_seed(5)
    model = make().eval()
    x, other = torch.randn(2, 8), 2.0 * torch.randn(2, 8)
    with torch.no_grad():
        assert (model.a(other).mean() > 0) != (model.a(-other).mean() > 0)
    return model, x, [other, -other, -x]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forwards_of_other_shapes_compile_to_eager_outputs_on_both_branches(name: str) -> None:
    model, x, others = _shape(SHAPES[name])
    cm, caught = _compile_recording(model, (x,))
    assert caught == [], caught
    assert all(r.compiled and r.eager_reason is None for r in cm.runners.values()), cm.report()
    assert cm.info.explore.sites > 0
    for i, xi in enumerate(others):
        try:
            assert_close_to_eager(model, cm, xi)
        except AssertionError as err:
            raise AssertionError(f"{name}, input {i}: {err}") from err


def test_a_module_not_called_self_compiles_with_torch_compile_too() -> None:
    model, x, others = _shape(ReceiverS)
    compiled_model = torch.compile(model, backend="hwaware")
    for xi in [x, *others]:
        assert_close_to_eager(model, compiled_model, xi)


def _pass_through(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(self: Any, x: torch.Tensor) -> Any:
        return fn(self, x) * 10  # what reading `fn`'s source alone would leave out
    return wrapper


class WrappedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    @_pass_through
    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            return self.head(h)
        return self.tail(h)


class ReadsStarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        _layers(self)

    def forward(self, x, **options):
        h = self.a(x) * options.get("scale", 1.0)
        if h.mean() > 0:
            return self.head(h)
        return self.tail(h)


EXECUTED = """
class Executed(nn.Module):
    def __init__(self):
        super().__init__()
        _layers(self)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            return self.head(h)
        return self.tail(h)
"""


def _executed() -> nn.Module:
    namespace: dict[str, Any] = {"nn": nn, "_layers": _layers}
    exec(EXECUTED, namespace)  # noqa: S102 - a class whose source inspect cannot find
    return namespace["Executed"]()  # type: ignore[no-any-return]


class UnreadKwargs(ReadsStarArgs):
    def forward(self, x, **unused):
        h = self.a(x)
        if h.mean() > 0:
            return self.head(h)
        return self.tail(h)


REFUSED = {"wrapped_forward": (WrappedForward, "wrapped by a decorator"),
           "reads_kwargs": (ReadsStarArgs, "**options"),
           "unread_kwargs": (UnreadKwargs, "**unused"),
           "executed": (_executed, "source of Executed.forward is not available")}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_forwards_the_rewrite_refuses_run_eager_with_one_warning_saying_why(name: str) -> None:
    make, why = REFUSED[name]
    model, x, others = _shape(make)
    cm, caught = _compile_recording(model, (x,))
    assert len(caught) == 1 and why in caught[0], caught
    assert f"{type(model).__name__}.forward" in caught[0] and not caught[0].startswith("None:")
    for xi in [x, *others]:
        assert_close_to_eager(model, cm, xi)


# ------------------------------------------------------------------ static models stay static
# Hugging Face forwards take **kwargs and branch on flag parameters (return_dict,
# output_hidden_states, labels is None); planned as host programs they were split at every
# such branch (MobileNetV2: a region per layer, compile 32 s -> over 300 s). They must reach
# the static path, which specializes the flags at the call's values.
def _hf_mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    return MobileNetV2ForImageClassification(
        MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=4)).eval()


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, num_labels=3)).eval()


@pytest.mark.parametrize("make", [_hf_mobilenet_v2, _hf_bert], ids=["mobilenet_v2", "bert"])
def test_hugging_face_forwards_are_not_planned_as_dynamic(make: Any) -> None:
    pytest.importorskip("transformers")
    assert driver.plan_model(make()) is None
