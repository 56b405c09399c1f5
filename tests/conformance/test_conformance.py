"""A fast subset of the conformance corpus, through every entry point, in CI.

Each model goes through the same harness as `bench/conformance.py` (its own worker subprocess;
eager, hwaware.compile, save -> load in a fresh process, torch.compile, ONNX) and every entry
point must match eager PyTorch on every example input. An ONNX export that torch itself cannot
do, or whose exported graph differs from eager in ONNX Runtime, is `na` and allowed: that is the
exporter's limit, not hwaware's. The whole corpus, with coverage figures: bench/conformance.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.conformance.harness import ENTRY_POINTS, run_model  # noqa: E402
from tests.conformance.models import CASES  # noqa: E402

# a hang guard per entry point, not a timing assertion
TIMEOUT_S = 300.0
# one or more per family: encoder, decoder, vision transformer, CNNs, GNNs, dynamic networks
# (numpy_clamp: a region in eager PyTorch, saved and loaded with model=); the whole corpus runs
# in bench/conformance.py
SUBSET = ["bert", "gpt2", "vit", "resnet", "mobilenet_v2", "gcn", "gat", "helper_exit",
          "top1_moe", "numpy_clamp"]


def allowed(entry: str) -> set[str]:
    return {"pass", "na"} if entry == "onnx" else {"pass"}


@pytest.mark.parametrize("name", SUBSET)
def test_every_entry_point_matches_eager(name: str, tmp_path: Path) -> None:
    if name not in CASES:
        pytest.skip(f"{name} is not in the corpus (tests/conformance/dynamic_styles.py absent)")
    library = CASES[name].source.split(".")[0]
    if library in ("transformers", "torch_geometric") and not importlib.util.find_spec(library):
        pytest.skip(f"{library} is not installed")
    row = run_model(name, TIMEOUT_S, tmp_path)
    assert set(row.entries) == set(ENTRY_POINTS)
    wrong = {e: f"{r.status}: {r.detail or r.error}" for e, r in row.entries.items()
             if r.status not in allowed(e)}
    assert not wrong, f"{name}: {wrong}"
