"""The save -> load check, in a fresh process: `hwaware.load` a saved model and compare its
outputs with eager PyTorch's, without the model's own code (except a dynamic model with regions
in eager PyTorch: CASE_FILE's `model_case` names the corpus model to build again and pass as
`hwaware.load(..., model=)`, as its user would).

    python -m tests.conformance.load_check MODEL_DIR CASE_FILE RESULT_FILE

CASE_FILE (written by the harness with `torch.save`, read with `weights_only=True`) holds
`inputs` (a list of input tuples) and `expected` (the eager `Reference` of each, as
`leaves` and `structure`). RESULT_FILE gets a JSON object: `status` (pass/fail), `error`,
`detail`, `load_s`, `tvm_flops` (on the first input), hwaware's warnings, and which
third-party model libraries the load imported. This process imports torch, hwaware and this
package's torch-only helpers, never `transformers`, `torch_geometric` or the corpus (but for
the `model_case` above).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tests.conformance.compare import Reference, mismatch
from tests.conformance.observe import (
    describe_error,
    error_detail,
    hwaware_warnings,
    tvm_flops_on,
)

MODEL_LIBRARIES = ("transformers", "torch_geometric")


def check(model_dir: str, case: dict[str, Any]) -> dict[str, Any]:
    """Load the model saved in `model_dir` and run it on every input of `case`."""
    result: dict[str, Any] = {"status": "pass", "error": ""}
    with hwaware_warnings() as caught:
        try:
            result.update(_load_and_run(model_dir, case))
        except Exception as err:  # a failure is the result, reported by the harness
            result.update(status="fail", error=describe_error(err), detail=error_detail(err))
    result.update(caught.as_dict())
    result["imported"] = [m for m in MODEL_LIBRARIES if m in sys.modules]
    return result


def _load_and_run(model_dir: str, case: dict[str, Any]) -> dict[str, Any]:
    import hwaware

    original = _original_model(case.get("model_case", ""))
    start = time.perf_counter()
    model = hwaware.load(model_dir, model=original)
    load_s = time.perf_counter() - start
    for i, (inputs, ref) in enumerate(zip(case["inputs"], case["expected"], strict=True)):
        with torch.no_grad():
            out = model(*inputs)
        problem = mismatch(out, Reference(ref["leaves"], ref["structure"]))
        if problem:
            return {"status": "fail", "error": f"input {i}: {problem}", "load_s": load_s}
    return {"load_s": load_s, "tvm_flops": tvm_flops_on(model, case["inputs"][0])}


def _original_model(name: str) -> torch.nn.Module | None:
    """The corpus model `name`, built again (seeded: the same weights), for a saved model whose
    regions run in eager PyTorch; None when the case names none."""
    if not name:
        return None
    from tests.conformance.models import get_case

    return get_case(name).model


def main(argv: list[str]) -> int:
    model_dir, case_file, result_file = argv
    case = torch.load(case_file, weights_only=True)
    Path(result_file).write_text(json.dumps(check(model_dir, case)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
