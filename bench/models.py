"""Whole real models through both hwaware entry points against their peers, in one run.

Per model: eager PyTorch, Inductor (`torch.compile`), ONNX Runtime, `hwaware.compile` and
`torch.compile(backend="hwaware")`, both hwaware entry points untuned (trials=0, no database:
what a new user gets), or with `--trials N` tuned first (N measurements per model, into a
fresh database both entry points compile with). Models: the conformance corpus
(`tests/conformance/models.py`: tiny configurations of transformers and PyTorch Geometric
models, batch 1) and, with `--full`, the
full-size ResNet-50 and MobileNetV2 1.0 at 224 px and BERT-base at sequence 128 (transformers'
default configurations, random weights). Each model runs in its own process (a compile that
hangs or crashes costs that model only, under `--timeout`); its implementations are timed
interleaved in blocks (turns of `BLOCK` back-to-back calls after one untimed call, the
implementations' turns alternating; medians of `--repeats` calls) and checked against eager
before and after. Blocks, not strict round robin: a runtime's worker threads spin for a while
after each call (ONNX Runtime's, TVM's, PyTorch's OpenMP pool), and on 2 cores a call made right
after another runtime's ran at a fraction of its speed (Dynamo's own per-call cost measured
656 us interleaved call by call against 128 us in blocks on the tiny MobileNetV2); a user's
model runs back to back. The report gives, per model, the ratios to eager and to the fastest
correct peer, the share of eager's FLOPs on TVM kernels and, for CNNs, of the convolution FLOPs
in fused block kernels; and per family the geometric means of those ratios.

    python bench/models.py --families cnn,attention --full --out bench/models-<cpu>.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# bench/ is sys.path[0] when run as a script: its kernels.py would shadow the `kernels` package
# transformers imports. The repository root instead, for tests.conformance.
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bench_run() -> Any:
    """bench/run.py as a module (bench/ is not on sys.path, see above)."""
    spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).with_name("run.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = _bench_run()
CORES, Impl, check, first_line = run.CORES, run.Impl, run.check, run.first_line

import torch  # noqa: E402

from hwaware.runner import time_in_blocks  # noqa: E402

PEERS = ("inductor", "onnxruntime")
BLOCK = 10  # back-to-back timed calls per turn
ENTRY_POINTS = ("hwaware.compile", "torch.compile hwaware")
FUSED_CONV_FAMILIES = ("conv_block", "res_block", "convnext_block")


# ---------------------------------------------------------------------------------- models
def full_size_cases() -> dict[str, tuple[str, Any]]:
    """Full-size models: name -> (family, zero-argument builder of (model, inputs))."""
    def vision(model_cls: str, config_cls: str) -> Any:
        def build() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
            import transformers

            from tests.conformance.models import randomize
            torch.manual_seed(0)
            config = getattr(transformers, config_cls)()
            model = randomize(getattr(transformers, model_cls)(config).eval())
            return model, (torch.randn(1, 3, 224, 224),)
        return build

    def bert() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
        import transformers
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig()).eval()
        ids = torch.randint(0, 30522, (1, 128))
        return model, (ids, torch.ones(1, 128, dtype=torch.long))

    return {"resnet50_224": ("cnn", vision("ResNetForImageClassification", "ResNetConfig")),
            "mobilenet_v2_224": ("cnn", vision("MobileNetV2ForImageClassification",
                                               "MobileNetV2Config")),
            "bert_base_128": ("attention", bert)}


def build_case(name: str) -> tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]:
    full = full_size_cases()
    if name in full:
        family, build = full[name]
        model, inputs = build()
        return family, model, inputs
    from tests.conformance.models import CASES
    case = CASES[name]()
    return CASES[name].family, case.model, tuple(case.inputs[0])


# --------------------------------------------------------------------------- one model
def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> str:
    """The conformance harness's export (through `forward(*args)` for the TorchScript exporter:
    it fills a Hugging Face forward's other parameters positionally, which their decorators
    reject), inputs named in0, in1, ... Exported from a copy: the export changed transformers'
    BERT so that eager itself no longer gave its first output."""
    from tests.conformance.harness import export_onnx as harness_export
    with run.quiet():  # on a copy: exporting a transformers model can change its config
        return harness_export(copy.deepcopy(model), inputs, path)


def make_dynamo_hwaware(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                        db: str | None = None) -> Impl:
    """`torch.compile(model, backend="hwaware")` with the records in `db` (None: untuned, no
    database): the registered backend as users call it (no wrapper on the timed calls)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = torch.compile(model, backend="hwaware", options={"db": db, "trials": 0})
            with torch.no_grad():
                compiled(*inputs)
    except Exception as err:  # a failure is a result to report
        return Impl(ENTRY_POINTS[1], None, f"failed: {first_line(err)}")
    graphs = counters["stats"]["unique_graphs"]
    note = f"{graphs} graph(s); compile {time.perf_counter() - start:.0f} s"
    return Impl(ENTRY_POINTS[1], lambda: compiled(*inputs), note)


def dynamo_floor(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    """What Dynamo itself costs per call of this model: `torch.compile` with a backend whose
    graphs return the outputs they computed when compiled (guards, argument passing and output
    rebuilding only). Timed with the others; not an implementation (its outputs are stale)."""
    def cached_outputs(gm: torch.fx.GraphModule, example: list[Any]) -> Any:
        outputs: list[Any] = []  # computed on the first call: a dynamic graph's example
        # inputs have symbolic sizes, which the graph cannot run on

        def run(*args: Any) -> Any:
            if not outputs:
                with torch.no_grad():
                    outputs.append(gm.forward(*args))
            return outputs[0]
        return run
    torch._dynamo.reset()
    floor = torch.compile(model, backend=cached_outputs)
    with torch.no_grad():
        floor(*inputs)
    return lambda: floor(*inputs)


def dynamo_floors(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                  compiled: Any) -> list[Any]:
    """`dynamo_floor` timed alone, and (with `compiled`, hwaware.compile's model) right after
    a call of the compiled model: called back to back, Dynamo's guards and argument passing
    find the module tree and its parameters in the caches; in a real call, the model's own
    computation has just evicted them. On the full-size MobileNetV2 (263 graph inputs), Zen 3:
    about 0.5 ms alone, 1.4-2.4 ms after the model or after streaming 16 MB."""
    floor = dynamo_floor(model, inputs)
    if compiled is None:
        return [floor]
    return [floor, lambda: (compiled(), floor())]


def coverage(compiled: Any, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
             ) -> dict[str, float | None]:
    """% of eager FLOPs on TVM kernels, and % in fused conv block kernels (inverted residual,
    ResNet and ConvNeXt blocks: their 1x1 convs, written as Linear in ConvNeXt, count too)."""
    from tests.conformance.observe import compiled_programs, coverage_pct, eager_flops
    programs = compiled_programs(compiled)
    kernels = [k for cm in programs for k in cm.program.kernels.values() if k.impl == "tvm"]
    total = eager_flops(model, inputs)
    fused = sum(k.flops for k in kernels if k.family in FUSED_CONV_FAMILIES)
    return {"tvm_flops_pct": coverage_pct(sum(k.flops for k in kernels), total),
            "fused_conv_pct": coverage_pct(fused, total) if fused else None}


def bench_one(name: str, repeats: int, trials: int = 0) -> dict[str, Any]:
    """Every implementation of one model, checked and timed interleaved; a JSON-able row.
    With `trials`, the model is first tuned (`hwaware.tune`, that many measurements in all)
    into a fresh database that both entry points then compile with."""
    torch.set_num_threads(CORES)
    family, model, inputs = build_case(name)
    with torch.no_grad():
        expected = model(*inputs)
    with tempfile.TemporaryDirectory(prefix="hwaware-models-") as tmp:
        db = str(Path(tmp) / "tuned.db") if trials else None
        tuning = run.run_tuning(model, inputs, trials, db) if db else ""
        impls = [run.make_eager(model, inputs), run.make_inductor(model, inputs),
                 run.make_ort(model, inputs, Path(tmp), export_onnx)]
        start = time.perf_counter()
        impls.append(run.make_hwaware(ENTRY_POINTS[0], model, inputs, db))
        impls[-1].note += f"; compile {time.perf_counter() - start:.0f} s"
        if tuning:
            impls[-1].note += f"; {tuning}"
        impls.append(make_dynamo_hwaware(model, inputs, db))
        live = [(i, i.fn) for i in impls if i.fn is not None]
        live = [(i, fn) for i, fn in live if check(i, fn, expected)]
        floors = dynamo_floors(model, inputs, impls[3].fn) if impls[4].fn is not None else []
        medians = time_in_blocks([fn for _, fn in live] + floors, repeats, block=BLOCK)
        for (impl, fn), us in zip(live, medians, strict=False):
            impl.interleaved_ms = us / 1e3
            check(impl, fn, expected)
    row: dict[str, Any] = {"model": name, "family": family, "impls": {
        i.name: {"ms": i.interleaved_ms, "correct": i.correct, "note": i.note} for i in impls}}
    if floors:
        row["dynamo_floor_ms"] = medians[len(live)] / 1e3
    if len(floors) == 2 and impls[3].interleaved_ms:
        row["dynamo_after_model_ms"] = medians[-1] / 1e3 - impls[3].interleaved_ms
    if impls[3].compiled is not None:
        row.update(coverage(impls[3].compiled, model, inputs))
    return row


# ------------------------------------------------------------------------------ report
def ratio(row: dict[str, Any], name: str, base: float | None) -> float | None:
    """base ms / impl ms for a correct implementation (above 1: faster than base)."""
    impl = row["impls"].get(name, {})
    if base is None or not impl.get("correct") or not impl.get("ms"):
        return None
    return base / impl["ms"]


def fastest_peer(row: dict[str, Any]) -> tuple[str | None, float | None]:
    """The fastest correct peer (Inductor or ONNX Runtime) and its ms."""
    timed = [(n, row["impls"][n]["ms"]) for n in PEERS
             if row["impls"].get(n, {}).get("correct") and row["impls"][n].get("ms")]
    return min(timed, key=lambda t: t[1]) if timed else (None, None)


def geomean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in kept) / len(kept)) if kept else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _us(ms: float | None) -> str:
    return "-" if ms is None else f"{ms * 1e3:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def model_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | family | eager ms | inductor | onnxruntime | hwaware.compile "
             "| torch.compile hwaware | fastest peer | compile vs peer | torch.compile vs "
             "peer | Dynamo us | Dynamo us after the model | TVM FLOPs | fused block FLOPs "
             "| notes |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['family']} | | | | | | | | | | | | | "
                         f"{r['error']} |")
            continue
        eager = r["impls"]["eager"]["ms"]
        peer, peer_ms = fastest_peer(r)
        cells = [_x(ratio(r, n, eager)) for n in (*PEERS, *ENTRY_POINTS)]
        vs_peer = [_x(ratio(r, n, peer_ms)) for n in ENTRY_POINTS]
        notes = "; ".join(f"{n}: {i['note']}" for n, i in r["impls"].items()
                          if i["note"] and n != "eager" or i["correct"] is False)
        lines.append(f"| {r['model']} | {r['family']} | {eager:.3f} | {' | '.join(cells)} "
                     f"| {peer or '-'} | {' | '.join(vs_peer)} | {_us(r.get('dynamo_floor_ms'))} "
                     f"| {_us(r.get('dynamo_after_model_ms'))} | {_pct(r.get('tvm_flops_pct'))} "
                     f"| {_pct(r.get('fused_conv_pct'))} | {notes.replace('|', '/')} |")
    return lines


def _beyond_dynamo(row: dict[str, Any]) -> float | None:
    """hwaware.compile ms / (torch.compile hwaware ms - Dynamo's own per-call ms): how the
    backend's graphs compare with hwaware.compile once the frame's guards are paid. Dynamo's
    cost is the larger of its two figures: after a model of 100 ms, the difference of two
    medians (model + Dynamo, model) is within the model's noise and can come out negative."""
    compiled, dynamo = (row["impls"][n] for n in ENTRY_POINTS)
    floor = max(row.get("dynamo_after_model_ms") or 0, row.get("dynamo_floor_ms") or 0)
    if not (floor and compiled.get("correct") and dynamo.get("correct") and dynamo.get("ms")):
        return None
    return float(compiled["ms"]) / max(float(dynamo["ms"]) - floor, 1e-9)


def family_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| family | models | hwaware.compile vs eager | torch.compile hwaware vs eager "
             "| fastest peer vs eager | hwaware.compile vs peer | torch.compile hwaware vs "
             "peer | torch.compile vs hwaware.compile | the same, Dynamo's own cost removed "
             "| slower than eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    done = [r for r in rows if "error" not in r]
    for family in sorted({r["family"] for r in done}):
        fam = [r for r in done if r["family"] == family]
        eager = [r["impls"]["eager"]["ms"] for r in fam]
        peers = [fastest_peer(r)[1] for r in fam]
        cols = [geomean([ratio(r, n, e) for r, e in zip(fam, eager, strict=True)])
                for n in ENTRY_POINTS]
        peer_vs_eager = geomean([e / p if p else None for e, p in zip(eager, peers,
                                                                         strict=True)])
        vs_peer = [geomean([ratio(r, n, p) for r, p in zip(fam, peers, strict=True)])
                   for n in ENTRY_POINTS]
        gap = geomean([ratio(r, ENTRY_POINTS[1], r["impls"][ENTRY_POINTS[0]]["ms"])
                       for r in fam if r["impls"][ENTRY_POINTS[0]]["correct"]])
        gap_beyond_dynamo = geomean([_beyond_dynamo(r) for r in fam])
        slower = sorted(r["model"] for r in fam for n in ENTRY_POINTS
                        if (ratio(r, n, r["impls"]["eager"]["ms"]) or 1) < 1)
        lines.append(f"| {family} | {len(fam)} | {_x(cols[0])} | {_x(cols[1])} "
                     f"| {_x(peer_vs_eager)} | {_x(vs_peer[0])} | {_x(vs_peer[1])} | {_x(gap)} "
                     f"| {_x(gap_beyond_dynamo)} "
                     f"| {', '.join(sorted(set(slower))) or 'none'} |")
    return lines


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, wall_s: float) -> str:
    head = [
        "# hwaware on whole real models, both entry points, against their peers", "",
        f"- cpu: {run._cpu_name()}, {CORES} cores (every runtime uses {CORES} threads)",
        f"- torch {torch.__version__}; batch 1; "
        + (f"tuned first ({args.trials} trials per model, a fresh database each)"
           if args.trials else "untuned (trials=0, no database)")
        + f"; medians of {args.repeats} calls, interleaved in blocks of {BLOCK}"
        + f"; {wall_s / 60:.0f} min",
        f"- command: python bench/models.py {' '.join(sys.argv[1:])}",
        "- ratios: eager ms / implementation ms (above 1 is faster than eager); vs peer: "
        "the fastest correct peer's ms / hwaware's (above 1: hwaware is faster); only "
        "correct outputs (rtol 1e-3, atol 1e-4 x max(1, max |eager|)) are ratioed",
        "- TVM FLOPs: share of eager's FLOPs on TVM kernels; fused block FLOPs: share of "
        "eager's FLOPs in fused conv block kernels (hwaware.compile)",
        "- Dynamo us: what Dynamo itself costs per call of the model (torch.compile with a "
        "backend returning cached outputs: guards, argument passing, output rebuilding), "
        "timed with the others: alone (back to back, warm caches) and right after a call of "
        "hwaware.compile's model (the caches its computation left: what a real call pays; "
        "this one is removed in 'Dynamo's own cost removed')", "",
        "## Per family (geometric means)", ""]
    return "\n".join(head + family_lines(rows) + ["", "## Per model", ""] +
                     model_lines(rows)) + "\n"


# -------------------------------------------------------------------------------- main
def run_isolated(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """bench_one(name) in a child process, under the timeout."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--one", name, "--json", out.name,
               "--repeats", str(args.repeats), "--trials", str(args.trials)]
        try:
            proc = subprocess.run(cmd, timeout=args.timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {"model": name, "family": "?", "error": f"timed out after {args.timeout} s"}
        text = Path(out.name).read_text()
        if proc.returncode != 0 or not text:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            return {"model": name, "family": "?", "error": f"exit {proc.returncode}: {tail[0]}"}
        return json.loads(text)  # type: ignore[no-any-return]


def selected(args: argparse.Namespace) -> list[str]:
    from tests.conformance.models import CASES
    if args.models:
        return args.models.split(",")
    families = args.families.split(",") if args.families else ["cnn", "attention", "decoder",
                                                               "encdec", "gnn"]
    names = [n for n, c in CASES.items() if c.family in families]
    return names + (list(full_size_cases()) if args.full else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated corpus or full-size names")
    p.add_argument("--families", help="corpus families (default: all but dynamic)")
    p.add_argument("--full", action="store_true", help="add ResNet-50, MobileNetV2, BERT-base")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--trials", type=int, default=0,
                   help="tune each model first with this many measurements (default 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--out", default="bench/results/models.md")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        Path(args.json).write_text(json.dumps(bench_one(args.one, args.repeats, args.trials)))
        return 0
    start, rows = time.perf_counter(), []
    for name in selected(args):
        print(f"== {name}", flush=True)
        rows.append(run_isolated(name, args))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(rows, args, time.perf_counter() - start))
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
