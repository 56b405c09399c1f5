"""Saved models return their output containers in a fresh process (hwaware/outputs.py): the
same type as eager when its module can be imported there (Hugging Face ModelOutputs), a dict
with the same keys and one warning when not (a module that exists only at save time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import transformers
from torch.utils import _pytree as pytree

import hwaware
from hwaware import outputs
from tests.helpers import resign

REPO = Path(__file__).resolve().parents[1]

# Runs in a new process that imports only torch and hwaware: loads the model, runs it on each
# saved input, compares the leaves with eager's and prints what it got back.
FRESH_SCRIPT = """
import json, sys, warnings
import torch
from torch.utils import _pytree as pytree
import hwaware
from hwaware.outputs import OutputTypeWarning
before = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "savetime_outputs"))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = hwaware.load(sys.argv[1])
case = torch.load(sys.argv[2], weights_only=True)
specs = []
for inputs, leaves in zip(case["inputs"], case["leaves"], strict=True):
    out = model(*inputs)
    torch.testing.assert_close(pytree.tree_leaves(out), leaves, rtol=1e-3, atol=1e-4)
    specs.append(str(pytree.tree_structure(out)))
print(json.dumps({"type": f"{type(out).__module__}.{type(out).__qualname__}", "specs": specs,
                  "warnings": [str(w.message) for w in caught
                               if issubclass(w.category, OutputTypeWarning)],
                  "imported_before_load": before}))
"""

# A module that exists only in the saving process: output containers registered with pytree
# (a class with key paths, a namedtuple, a dataclass) and models that return them.
SAVETIME_MODULE = '''
import collections
import dataclasses

import torch
from torch import nn
from torch.utils import _pytree as pytree
from transformers.modeling_outputs import SequenceClassifierOutput


class Pair:
    def __init__(self, first, second):
        self.first, self.second = first, second


pytree.register_pytree_node(
    Pair, lambda p: ([p.first, p.second], None), lambda values, _: Pair(*values),
    serialized_type_name="savetime_outputs.Pair",
    flatten_with_keys_fn=lambda p: ([(pytree.GetAttrKey("first"), p.first),
                                     (pytree.GetAttrKey("second"), p.second)], None))

Stats = collections.namedtuple("Stats", "mean peak")
pytree._register_namedtuple(Stats, serialized_type_name="savetime_outputs.Stats")


@dataclasses.dataclass
class ExitOut:
    score: torch.Tensor
    hidden: torch.Tensor


pytree.register_dataclass(ExitOut, serialized_type_name="savetime_outputs.ExitOut")


class NestedOutputs(nn.Module):
    """Static: a tuple of a Pair, a dict holding a Pair, and a namedtuple."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return (Pair(h, h * 2), {"sum": h.sum(-1), "pair": Pair(h + 1, h - 1)},
                Stats(h.mean(), h.sum()))


Plain = collections.namedtuple("Plain", "low high")  # not registered with pytree


class ReturnsPlainNamedtuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        return Plain(h.amin(-1), h.amax(-1))


class EarlyExitOutputs(nn.Module):
    """Dynamic: an early exit when the input's mean is positive; both exits return a
    transformers ModelOutput and an ExitOut."""

    def __init__(self):
        super().__init__()
        self.a, self.exit = nn.Linear(8, 8), nn.Linear(8, 3)
        self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.mean() > 0:
            return SequenceClassifierOutput(logits=self.exit(h)), ExitOut(h.mean(), h)
        h = torch.relu(self.b(h))
        return SequenceClassifierOutput(logits=self.head(h)), ExitOut(h.mean(), h)
'''


@pytest.fixture(scope="module")
def savetime(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The save-time-only module, importable in this process (never in the fresh ones)."""
    folder = tmp_path_factory.mktemp("savetime")
    (folder / "savetime_outputs.py").write_text(textwrap.dedent(SAVETIME_MODULE))
    sys.path.insert(0, str(folder))
    try:
        import savetime_outputs

        yield savetime_outputs
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("savetime_outputs", None)


def run_fresh(saved: Path, model: torch.nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]],
              tmp_path: Path, pythonpath: str | None = None) -> dict[str, Any]:
    """Load `saved` in a new Python process and run it on `inputs` there; their eager outputs'
    leaves travel in a weights-only file. Returns what the process printed."""
    with torch.no_grad():
        leaves = [pytree.tree_leaves(model(*x)) for x in inputs]
    case = tmp_path / "case.pt"
    torch.save({"inputs": list(inputs), "leaves": leaves}, case)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, str(saved), str(case)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def qualified_type(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def tiny_resnet() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                       depths=[1, 1], layer_type="basic")
    return transformers.ResNetModel(config).eval(), torch.randn(1, 3, 32, 32), \
        torch.randn(1, 3, 32, 32)


def tiny_bert() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    return transformers.BertModel(config).eval(), torch.randint(0, 100, (1, 8)), \
        torch.randint(0, 100, (1, 8))


@pytest.mark.parametrize("make", [tiny_resnet, tiny_bert], ids=["resnet", "bert"])
def test_transformers_output_comes_back_as_its_type_in_a_fresh_process(make: Any,
                                                                       tmp_path: Path) -> None:
    model, example, other = make()
    saved = hwaware.compile(model, (example,), db=None, show_progress=False).save(
        tmp_path / "saved")
    with torch.no_grad():
        eager = model(other)
    got = run_fresh(saved, model, [(other,)], tmp_path)
    assert got["imported_before_load"] == []  # the load imported transformers, nothing else
    assert got["type"] == qualified_type(eager)
    assert got["specs"] == [str(pytree.tree_structure(eager))]
    assert got["warnings"] == []
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["outputs"]["modules"] == {
        f"transformers.modeling_outputs.{type(eager).__name__}": "transformers.modeling_outputs"}


def as_dicts(model: torch.nn.Module, x: torch.Tensor) -> Any:
    """NestedOutputs' eager output with each registered container as a dict of its keys."""
    with torch.no_grad():
        first, holder, stats = model(x)
    pair = {"first": first.first, "second": first.second}
    return (pair, {"sum": holder["sum"], "pair": pair}, {"mean": stats.mean, "peak": stats.peak})


def test_container_whose_module_is_gone_comes_back_as_a_dict_with_one_warning(
        savetime: ModuleType, tmp_path: Path) -> None:
    model = savetime.NestedOutputs().eval()
    x, other = torch.randn(2, 8), torch.randn(2, 8)
    saved = hwaware.compile(model, (x,), db=None, show_progress=False).save(tmp_path / "saved")
    got = run_fresh(saved, model, [(other,)], tmp_path)
    assert got["type"] == "builtins.tuple"
    assert got["specs"] == [str(pytree.tree_structure(as_dicts(model, other)))]
    assert len(got["warnings"]) == 1
    for name in ("savetime_outputs.Pair", "savetime_outputs.Stats", "a dict"):
        assert name in got["warnings"][0]
    # where the module can be imported, the load imports it and gives the eager types back
    with torch.no_grad():
        eager = model(other)
    module_dir = os.path.dirname(str(savetime.__file__))
    got = run_fresh(saved, model, [(other,)], tmp_path, pythonpath=module_dir)
    assert got["specs"] == [str(pytree.tree_structure(eager))] and got["warnings"] == []


def test_a_plain_namedtuple_output_compiles_and_loads(savetime: ModuleType,
                                                     tmp_path: Path) -> None:
    """A namedtuple pytree cannot serialize (never registered): compiling failed on it."""
    model = savetime.ReturnsPlainNamedtuple().eval()
    x, other = torch.randn(2, 8), torch.randn(2, 8)
    compiled = hwaware.compile(model, (x,), db=None, show_progress=False)
    got, want = compiled(other), model(other)
    assert type(got) is savetime.Plain
    torch.testing.assert_close(tuple(got), tuple(want.detach() for want in want))
    saved = compiled.save(tmp_path / "saved")
    module_dir = os.path.dirname(str(savetime.__file__))
    fresh = run_fresh(saved, model, [(other,)], tmp_path, pythonpath=module_dir)
    assert fresh["type"] == "savetime_outputs.Plain" and fresh["warnings"] == []
    fresh = run_fresh(saved, model, [(other,)], tmp_path)
    assert fresh["type"] == "builtins.dict" and len(fresh["warnings"]) == 1


def test_dynamic_model_keeps_known_containers_and_warns_once_for_the_gone_one(
        savetime: ModuleType, tmp_path: Path) -> None:
    model = savetime.EarlyExitOutputs().eval()
    early, late = torch.full((1, 8), 0.5), torch.full((1, 8), -0.5)
    cm = hwaware.compile(model, (early,), db=None, show_progress=False)
    assert isinstance(cm, hwaware.DynamicModel)
    saved = cm.save(tmp_path / "saved")
    carriers = [m for m in saved.glob("regions/*/*/meta.json") if "ExitOut" in m.read_text()]
    assert len(carriers) == 2  # both exits' regions return it: still one warning
    inputs = [(early + 0.25,), (late,)]
    got = run_fresh(saved, model, inputs, tmp_path)
    with torch.no_grad():
        expected = [(out, {"score": extra.score, "hidden": extra.hidden})
                    for out, extra in (model(*x) for x in inputs)]
    assert got["specs"] == [str(pytree.tree_structure(e)) for e in expected]
    assert "SequenceClassifierOutput" in got["specs"][0]  # transformers' type, imported
    assert len(got["warnings"]) == 1 and "savetime_outputs.ExitOut" in got["warnings"][0]


def test_a_save_without_output_metadata_still_loads(savetime: ModuleType,
                                                    tmp_path: Path) -> None:
    """Format 1 (before output metadata) loads as before, here where its types are known."""
    model = savetime.NestedOutputs().eval()
    x = torch.randn(2, 8)
    saved = hwaware.compile(model, (x,), db=None, show_progress=False).save(tmp_path / "saved")
    meta = json.loads((saved / "meta.json").read_text())
    del meta["outputs"]
    (saved / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    resign(saved)
    loaded = hwaware.load(saved)
    with torch.no_grad():
        assert str(pytree.tree_structure(loaded(x))) == str(pytree.tree_structure(model(x)))


def test_load_imports_only_recorded_modules_of_installed_packages(
        savetime: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recorded module whose package is not installed is never imported; one whose import
    fails gives a dict; a type already registered needs no import."""
    spec = pytree.tree_structure((savetime.Pair(1, 2), savetime.Stats(3, 4)))
    saved = outputs.describe(spec)
    assert saved.modules == {"savetime_outputs.Pair": "savetime_outputs",
                                "savetime_outputs.Stats": "savetime_outputs"}
    text = pytree.treespec_dumps(spec)
    gone = text.replace("savetime_outputs.Pair", "gone.Pair").replace(
        "savetime_outputs.Stats", "gone.Stats")
    saved = outputs.OutputTypes({"gone.Pair": "not_an_installed_package.defs",
                                 "gone.Stats": "hwaware.no_such_module"}, saved.portable)
    imported: list[str] = []
    monkeypatch.setattr(outputs.importlib, "import_module", lambda m: imported.append(m))
    missing: dict[str, str] = {}
    loadable = outputs.loadable_spec(gone, saved, missing)
    assert imported == ["hwaware.no_such_module"]  # installed package: tried; the other: never
    assert missing == saved.modules
    tree = pytree.tree_unflatten([1, 2, 3, 4], pytree.treespec_loads(loadable))
    assert tree == ({"first": 1, "second": 2}, {"mean": 3, "peak": 4})
    missing.clear()
    assert outputs.loadable_spec(text, outputs.describe(spec), missing) == text
    assert imported == ["hwaware.no_such_module"] and missing == {}


def test_a_decoder_of_kernels_only_runs_as_one_chained_tvm_call(tmp_path: Path,
                                                              tvm_wins: None) -> None:
    """transformers' GPT-2 (kernels only, no host op, fused attention among them) is offered as
    one TVM call chaining its library's kernels, the fused ones kept: it computes eager's
    outputs on other inputs, and does in a fresh process after a save."""
    from hwaware import build
    from tests.conformance.models import get_case

    case = get_case("gpt2")
    compiled = hwaware.compile(case.model, case.inputs[0], db=None, show_progress=False)
    assert build.CHAINED in compiled.info.plan_us, compiled.report()  # offered and timed
    per_kernel = compiled.kernel_plan or compiled
    assert any(k.family == "attention" for k in per_kernel.program.kernels.values())
    chained = build._chained_model(per_kernel, compiled.info.built_for(), list(case.inputs[0]))
    assert chained is not None and list(chained.program.kernels) == [build.ONE_CALL]
    others = [tuple(x) for x in case.inputs[1:]]
    for inputs in others:
        with torch.no_grad():
            torch.testing.assert_close(pytree.tree_leaves(chained(*inputs)),
                                       pytree.tree_leaves(case.model(*inputs)),
                                       rtol=1e-3, atol=1e-4)
    result = run_fresh(chained.save(tmp_path / "gpt2"), case.model, others, tmp_path)
    assert result["type"] == qualified_type(case.model(*others[0]))
