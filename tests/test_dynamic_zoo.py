"""The dynamic model zoo in eager mode: every labelled input takes the path it claims to take."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

import pytest
import torch
from torch import nn

from hwaware import dynamic_zoo
from hwaware.dynamic_zoo import DYNAMIC_MODELS, DynamicCase, get_dynamic_case

NAMES = sorted(DYNAMIC_MODELS)
VARIABLE_LENGTH = {"shape_branch"}  # labels use different sequence lengths on purpose


@functools.cache
def _case(name: str) -> DynamicCase:
    return get_dynamic_case(name)


def _run_counting(model: nn.Module, names: list[str], inputs: tuple[torch.Tensor, ...],
                  ) -> tuple[dict[str, int], torch.Tensor]:
    """Run `model` on `inputs`, counting the forward calls of the submodules `names`."""
    modules = dict(model.named_modules())
    counts = dict.fromkeys(names, 0)

    def bump(name: str, *_: object) -> None:
        counts[name] += 1

    handles = [modules[n].register_forward_hook(functools.partial(bump, n)) for n in names]
    try:
        with torch.no_grad():
            out = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts, out


def test_zoo_has_enough_models() -> None:
    assert len(DYNAMIC_MODELS) >= 10


def test_unknown_name_raises_key_error_naming_the_models() -> None:
    with pytest.raises(KeyError) as info:
        get_dynamic_case("nope")
    message = str(info.value)
    assert "nope" in message
    for name in NAMES:
        assert name in message


@pytest.mark.parametrize("name", NAMES)
def test_case_is_well_formed(name: str) -> None:
    case = _case(name)
    assert case.name == name
    assert not any(m.training for m in case.model.modules())
    assert case.branch_inputs and set(case.expected_calls) == set(case.branch_inputs)
    modules = dict(case.model.named_modules())
    for label, inputs in case.branch_inputs.items():
        assert len(inputs) == len(case.example_inputs), label
        for got, example in zip(inputs, case.example_inputs, strict=True):
            assert got.dtype == example.dtype == torch.float32 and got.shape[0] == 1, label
            assert not got.requires_grad, label
            if name in VARIABLE_LENGTH:
                assert got.dim() == example.dim(), label
            else:
                assert got.shape == example.shape, label
        assert case.expected_calls[label], label
        for submodule in case.expected_calls[label]:
            assert submodule in modules, (label, submodule)


@pytest.mark.parametrize("name", NAMES)
def test_every_label_takes_its_path(name: str) -> None:
    case = _case(name)
    for label, inputs in case.branch_inputs.items():
        expected = case.expected_calls[label]
        counts, out = _run_counting(case.model, list(expected), inputs)
        assert counts == expected, label
        assert isinstance(out, torch.Tensor) and bool(torch.isfinite(out).all()), label


@pytest.mark.parametrize("name", NAMES)
def test_paths_keep_a_margin(name: str) -> None:
    """A 1% relative jitter of the inputs must not change any path: decisions are far from their
    thresholds, so small numeric differences (a compiled model) cannot flip them either."""
    case = _case(name)
    gen = torch.Generator().manual_seed(1)
    for label, inputs in case.branch_inputs.items():
        jittered = tuple(x * (1 + 0.01 * torch.randn(x.shape, generator=gen)) for x in inputs)
        expected = case.expected_calls[label]
        counts, _ = _run_counting(case.model, list(expected), jittered)
        assert counts == expected, label


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_run(name: str) -> None:
    case = _case(name)
    with torch.no_grad():
        out = case.model(*case.example_inputs)
    assert isinstance(out, torch.Tensor) and out.shape[0] == 1
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", NAMES)
def test_builders_are_deterministic_and_fresh(name: str) -> None:
    first, second = DYNAMIC_MODELS[name](), DYNAMIC_MODELS[name]()
    assert first.model is not second.model
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.branch_inputs.keys() == second.branch_inputs.keys()
    for label, inputs in first.branch_inputs.items():
        for x, y in zip(inputs, second.branch_inputs[label], strict=True):
            assert torch.equal(x, y), label
    for x, y in zip(first.example_inputs, second.example_inputs, strict=True):
        assert torch.equal(x, y)


def _zoo_module_classes() -> list[type[nn.Module]]:
    return [cls for _, cls in inspect.getmembers(dynamic_zoo, inspect.isclass)
            if issubclass(cls, nn.Module) and cls.__module__ == dynamic_zoo.__name__
            and "forward" in cls.__dict__]


@pytest.mark.parametrize("cls", _zoo_module_classes(), ids=lambda cls: cls.__name__)
def test_forward_is_plain_python(cls: type[nn.Module]) -> None:
    """What the source-reading compiler relies on: a plain, undecorated forward without lambdas,
    comprehensions, printing, or mutation of `self` / Python lists."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    func = tree.body[0]
    assert isinstance(func, ast.FunctionDef) and func.name == "forward"
    assert not func.decorator_list
    banned = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp,
              ast.Global, ast.Nonlocal)
    for node in ast.walk(func):
        assert not isinstance(node, banned), ast.dump(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in {"append", "extend", "insert", "pop", "setattr"}
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                assert not (isinstance(sub, ast.Attribute | ast.Subscript)), ast.dump(target)
