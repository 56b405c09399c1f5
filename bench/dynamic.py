"""Benchmark dynamic networks (early exits, gates, adaptive loops, routing, shape branches).

Per zoo model of `hwaware.dynamic_zoo`: eager PyTorch, torch.compile (Inductor, with whatever
graph breaks Dynamo makes) and hwaware (host program + compiled regions; untuned, or tuned
with `--trials` into `--db`). One timed call runs the model once on the inputs of EVERY path
label of the model (exit early, exit late, skip all, ...), so a ratio covers all paths, not the
lucky one. Timed round-robin (interleaved) and each alone (solo); medians of `--repeats`. Every
output is checked against eager. Also reported: Dynamo's graphs / graph breaks on the example
inputs, and hwaware's regions, subgraph calls and host decisions per inference.

    python bench/dynamic.py --out bench/results/dynamic.md
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # noqa: E402 - bench/run.py: timing, checks, machine description
import torch  # noqa: E402

import hwaware  # noqa: E402
from hwaware.dynamic.driver import dynamo_explain  # noqa: E402
from hwaware.dynamic_zoo import DYNAMIC_MODELS, get_dynamic_case  # noqa: E402


@dataclass
class Row:
    name: str
    labels: int
    impls: list[common.Impl] = field(default_factory=list)
    dynamo: str = ""
    hwaware: str = ""


def all_paths(fn: Any, inputs: list[tuple[torch.Tensor, ...]]) -> Any:
    return lambda: [fn(*x) for x in inputs]


def bench_case(name: str, args: argparse.Namespace) -> Row:
    case = get_dynamic_case(name)
    model, inputs = case.model, list(case.branch_inputs.values())
    row = Row(name, len(inputs))
    with torch.no_grad():
        expected = [model(*x) for x in inputs]
    row.impls.append(common.Impl("eager", all_paths(model, inputs)))
    graphs, breaks = dynamo_explain(model, case.example_inputs)
    row.dynamo = f"{graphs} graphs, {breaks} breaks"
    start = time.perf_counter()
    inductor = torch.compile(model)
    with torch.no_grad():
        for x in inputs:  # compile every path (and recompiles) before timing
            inductor(*x)
    row.impls.append(common.Impl("inductor", all_paths(inductor, inputs),
                                 f"compile {time.perf_counter() - start:.0f} s"))
    if args.trials > 0:
        hwaware.tune(model, case.example_inputs, trials=args.trials, db=args.db,
                     show_progress=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = hwaware.compile(model, case.example_inputs, db=args.db if args.trials else None,
                             show_progress=False)
    label = "hwaware tuned" if args.trials > 0 else "hwaware"
    row.impls.append(common.Impl(label, all_paths(cm, inputs),
                                 f"compile {time.perf_counter() - start:.0f} s"))
    stats = getattr(cm, "info", None)
    if stats is not None and hasattr(stats, "explore"):
        s = stats.explore
        row.hwaware = (f"{len(cm.runners)} regions, {s.region_calls} subgraph calls + "  # type: ignore[union-attr]
                       f"{s.decisions} host decisions")
    common.measure(row.impls, expected, args.repeats)
    return row


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def markdown(rows: list[Row], args: argparse.Namespace) -> str:
    budget = f"tuned with {args.trials} trials per model" if args.trials else "untuned"
    lines = [
        "# hwaware on dynamic networks", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {common._cpu_name()}, "
        f"{common.CORES} cores; torch {torch.__version__}, hwaware {hwaware.__version__}",
        f"- batch 1; one call = one inference on each path label's inputs; medians of "
        f"{args.repeats}; {budget}",
        "- ratio = eager ms / impl ms (>1 is faster than eager); correct = allclose to eager "
        f"(rtol {common.RTOL}, atol {common.ATOL}) on every path", "",
        "| model | paths | impl | interleaved ms | vs eager | vs inductor | solo ms | vs eager "
        "| vs inductor | correct | graphs / round trips |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|:---:|---|",
    ]
    ratios: dict[str, list[float]] = {}
    for r in rows:
        eager, inductor = r.impls[0], r.impls[1]
        for impl in r.impls:
            extra = r.dynamo if impl.name == "inductor" else \
                r.hwaware if impl.name.startswith("hwaware") else ""
            lines.append(
                f"| {r.name} | {r.labels} | {impl.name} | {common._ms(impl.interleaved_ms)} "
                f"| {common._ratio(eager.interleaved_ms, impl.interleaved_ms)} "
                f"| {common._ratio(inductor.interleaved_ms, impl.interleaved_ms)} "
                f"| {common._ms(impl.solo_ms)} | {common._ratio(eager.solo_ms, impl.solo_ms)} "
                f"| {common._ratio(inductor.solo_ms, impl.solo_ms)} "
                f"| {common._mark(impl.correct)} | {extra} |")
            for base, mode in ((eager, "eager"), (inductor, "inductor")):
                for kind in ("interleaved", "solo"):
                    b, v = getattr(base, f"{kind}_ms"), getattr(impl, f"{kind}_ms")
                    if b and v and impl.name.startswith("hwaware"):
                        ratios.setdefault(f"hwaware vs {mode} ({kind})", []).append(b / v)
    lines += ["", "| geomean over models | ratio | min |", "|---|---:|---:|"]
    for k, v in ratios.items():
        lines.append(f"| {k} | {geomean(v):.2f}x | {min(v):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DYNAMIC_MODELS))
    p.add_argument("--trials", type=int, default=0, help="tuning budget per model (0: untuned)")
    p.add_argument("--db", default="tuning_logs/bench-dynamic.db")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", default="bench/results/dynamic.md")
    args = p.parse_args(argv)
    torch.set_num_threads(common.CORES)
    # compile Inductor's kernels in this process: a pool of compile workers still busy after
    # `torch.compile` returns would steal the cores the timings run on
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="hwaware-bench-"):
        for name in args.models.split(","):
            print(f"== {name}", flush=True)
            rows.append(bench_case(name, args))
    text = markdown(rows, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
