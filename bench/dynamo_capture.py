"""torch.compile(backend="hwaware") with Dynamo's data-dependent output shapes captured (the
backend's default since session 36) and without (TORCHDYNAMO_CAPTURE_DYNAMIC_OUTPUT_SHAPE_OPS=0,
which the backend leaves alone): Dynamo graphs per model, correctness against eager on every
input of the case, and medians of calls beside eager, interleaved in blocks, one process per
model and setting.

    python bench/dynamo_capture.py --models gcn,gat,appnp
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"captured": {}, "graph breaks": {"TORCHDYNAMO_CAPTURE_DYNAMIC_OUTPUT_SHAPE_OPS": "0"}}


def measure(name: str, blocks: int = 5, calls: int = 30) -> dict[str, Any]:
    """In this process: compile corpus model `name`, check it, time it beside eager."""
    import torch
    from torch._dynamo.utils import counters

    from tests.conformance.models import GNNS, dynamic_cases

    case = {**GNNS, **dynamic_cases()}[name].build()
    model = case.model.eval()
    db = Path(tempfile.mkdtemp()) / "bench.db"
    compiled = torch.compile(model, backend="hwaware", options={"db": str(db)})
    with torch.no_grad():
        for inputs in case.inputs:
            torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-3, atol=1e-4)
        times: dict[str, list[float]] = {"hwaware": [], "eager": []}
        for _ in range(blocks):
            for label, fn in (("hwaware", compiled), ("eager", model)):
                for _ in range(calls):
                    start = time.perf_counter()
                    fn(*case.inputs[0])
                    times[label].append((time.perf_counter() - start) * 1e6)
    return {"graphs": counters["stats"]["unique_graphs"],
            **{f"{k}_us": statistics.median(v) for k, v in times.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gcn,gat,appnp")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one model, JSON out
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    print("| model | setting | Dynamo graphs | hwaware us | eager us | vs eager |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for setting, env in SETTINGS.items():
            done = subprocess.run([sys.executable, __file__, "--one", name], cwd=ROOT,
                                  env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                                  capture_output=True, text=True)
            if done.returncode:
                print(f"| {name} | {setting} | failed: {done.stderr.strip()[-200:]} | | | |")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {name} | {setting} | {r['graphs']} | {r['hwaware_us']:.0f} | "
                  f"{r['eager_us']:.0f} | {r['eager_us'] / r['hwaware_us']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
