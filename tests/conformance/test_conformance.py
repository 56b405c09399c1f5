"""A fast subset of the conformance corpus, through every entry point, in CI.

Each model goes through the same harness as `bench/conformance.py` (its own worker subprocess;
eager, hwaware.compile, save -> load in a fresh process, torch.compile, ONNX) and every entry
point must match eager PyTorch on every example input. An ONNX export that torch itself cannot
do, or whose exported graph differs from eager in ONNX Runtime, is `na` and allowed: that is the
exporter's limit, not hwaware's. The whole corpus, with coverage figures: bench/conformance.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch_geometric")

from tests.conformance.harness import ENTRY_POINTS, run_model  # noqa: E402
from tests.conformance.models import CASES  # noqa: E402

# a hang guard per entry point, not a timing assertion
TIMEOUT_S = 300.0
STATIC_MODELS = ["bert", "gpt2", "vit", "resnet", "mobilenet_v2", "gcn", "gat"]
DYNAMIC_MODELS = [n for n, f in CASES.items() if f.family == "dynamic"][:2]


def allowed(entry: str) -> set[str]:
    return {"pass", "na"} if entry == "onnx" else {"pass"}


@pytest.mark.parametrize("name", STATIC_MODELS + DYNAMIC_MODELS)
def test_every_entry_point_matches_eager(name: str, tmp_path: Path) -> None:
    row = run_model(name, TIMEOUT_S, tmp_path)
    assert set(row.entries) == set(ENTRY_POINTS)
    wrong = {e: f"{r.status}: {r.error}" for e, r in row.entries.items()
             if r.status not in allowed(e)}
    assert not wrong, f"{name}: {wrong}"
