"""Benchmark hwaware against its peers on zoo models at batch 1; ratios measured in one run.

Per model: eager PyTorch (for GNNs that is PyTorch Geometric itself), torch.compile (Inductor),
ONNX Runtime, hwaware untuned (trials=0, no database) and hwaware tuned (a tuning session of
`--trials` into `--db`, then a compile from that database). All are timed round-robin
(interleaved) and each alone (solo); medians of `--repeats` calls. Every output is checked
against eager. Ratios are eager_ms / impl_ms: above 1 is faster than eager.

    python bench/run.py --models resnet_basic_block,mobilenetv2_block,\
transformer_encoder_layer,gcn_2layer --trials 2000 --db tuning_logs/bench.db \
--out bench/results/latest.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
os.environ.setdefault("TVM_NUM_THREADS", str(CORES))  # before tvm is imported anywhere
os.environ.setdefault("OMP_NUM_THREADS", str(CORES))

import torch  # noqa: E402

import hwaware  # noqa: E402
from hwaware.runner import time_in_blocks, time_interleaved  # noqa: E402
from hwaware.zoo import ZOO, get_model  # noqa: E402

DEFAULT_MODELS = "resnet_basic_block,mobilenetv2_block,transformer_encoder_layer,gcn_2layer"
RTOL, ATOL = 1e-3, 1e-4
QUICK_TRIALS, QUICK_REPEATS = 16, 20
SOLO_BLOCK = 10  # back-to-back calls per solo block


@dataclass
class Impl:
    """One implementation of a model: a zero-argument call, or why there is none."""

    name: str
    fn: Callable[[], Any] | None
    note: str = ""
    correct: bool | None = None
    interleaved_ms: float | None = None
    solo_ms: float | None = None
    compiled: Any = None  # hwaware's compiled model, for its report


@dataclass
class ModelResult:
    name: str
    impls: list[Impl] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------- helpers
def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a (possibly nested) output, in order: tuples, lists, dicts and Hugging
    Face `ModelOutput`s (None fields left out, as `ModelOutput` leaves them out)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    raise TypeError(f"unexpected output type {type(out).__name__}")


def outputs_match(got: Any, expected: Any) -> bool:
    """allclose on every tensor, rtol RTOL and atol ATOL x max(1, max |eager|) (a full-size
    network's outputs reach the hundreds; float32 sums in another order differ there)."""
    g, e = flat_tensors(got), flat_tensors(expected)
    return len(g) == len(e) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=RTOL,
                                              atol=ATOL * max(1.0, _largest(b)))
        for a, b in zip(g, e, strict=True)
    )


def _largest(t: torch.Tensor) -> float:
    return float(t.float().abs().max()) if t.numel() and t.is_floating_point() else 0.0


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def library_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The hwaware warnings worth a note: ops left on the host, kernels that fell back."""
    host_ops, other = set(), set()
    for w in caught:
        text = str(w.message)
        m = re.match(r"hwaware: TVM cannot import (.+?); it runs in PyTorch", text)
        if m:
            host_ops.add(m.group(1))
        elif "hwaware" in text:
            other.add(text)
    notes = [f"on host: {', '.join(sorted(host_ops))}"] if host_ops else []
    return notes + sorted(other)


# --------------------------------------------------------------------------------- peers
def make_eager(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Impl:
    return Impl("eager", lambda: model(*inputs))


def make_inductor(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Impl:
    start = time.perf_counter()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(*inputs)
    except Exception as err:  # any compile failure is a result to report, not a crash
        return Impl("inductor", None, f"failed: {first_line(err)}")
    note = f"compile {time.perf_counter() - start:.0f} s"
    return Impl("inductor", lambda: compiled(*inputs), note)


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> str:
    """Export with the torch.export-based exporter, else the TorchScript one; return which."""
    try:
        with quiet():
            torch.onnx.export(model, inputs, str(path), dynamo=True)
        return "dynamo exporter"
    except Exception:  # e.g. onnxscript not installed, or an op it cannot export
        with quiet():
            torch.onnx.export(model, inputs, str(path), dynamo=False)
        return "torchscript exporter"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings and file descriptor 1 (exporters dump whole graphs there on failure)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def make_ort(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], work: Path,
             export: Callable[..., str] = export_onnx) -> Impl:
    """ONNX Runtime on `export(model, inputs, path)`'s graph; inputs named in0, in1, ... are
    fed by index (an exporter may drop an input the graph does not use)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return Impl("onnxruntime", None, "skipped: onnxruntime not installed")
    try:
        exporter = export(model, inputs, work / "model.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = CORES
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(work / "model.onnx"), opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as err:
        return Impl("onnxruntime", None, f"skipped, export failed: {first_line(err)}")
    names = [i.name for i in sess.get_inputs()]
    if all(re.fullmatch(r"in\d+", n) for n in names):
        feeds = {n: inputs[int(n[2:])].numpy() for n in names}
    elif len(names) == len(inputs):
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
    else:
        return Impl("onnxruntime", None, f"skipped: ONNX graph has {len(names)} inputs, "
                    f"model has {len(inputs)}")

    def run() -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in sess.run(None, feeds)]

    return Impl("onnxruntime", run, exporter)


def make_hwaware(name: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
                 db: str | None, fuse: bool = True, target: str = "host") -> Impl:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = hwaware.compile(model, inputs, target=target, db=db, trials=0, fuse=fuse)
    except Exception as err:
        return Impl(name, None, f"failed: {first_line(err)}")
    counts = kernel_counts(compiled.report())
    note = "; ".join([counts, *library_warnings(caught)])
    impl = Impl(name, lambda: compiled(*inputs), note)
    impl.compiled = compiled
    return impl


def kernel_counts(report: str) -> str:
    """'2/5 kernels on TVM, 4 host ops' from the report's summary line."""
    m = re.search(r"(\d+) kernels \((\d+) on TVM, \d+ on PyTorch\), (\d+) host ops", report)
    if m is None:
        return report.splitlines()[1] if len(report.splitlines()) > 1 else report
    return f"{m.group(2)}/{m.group(1)} kernels on TVM, {m.group(3)} host ops"


def run_tuning(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], trials: int,
               db: str, fuse: bool = True, target: str = "host") -> str:
    """Tune into `db` (records already there count towards the budget); summarize."""
    if trials <= 0:
        return "no tuning (trials 0)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the compile after tuning reports them
            summary = hwaware.tune(model, inputs, target=target, trials=trials, db=db, fuse=fuse)
    except Exception as err:
        return f"tuning failed: {first_line(err)}"
    print(summary.table())
    return (f"tuning: {trials} trials asked, {summary.trials_measured} measured now over "
            f"{len(summary.tasks)} tasks in {summary.elapsed_s:.0f} s")


# ------------------------------------------------------------------------------- timing
def measure(impls: list[Impl], expected: Any, repeats: int) -> None:
    """Check outputs against eager, time interleaved and solo (medians, ms), check again
    (a model whose state drifts across calls is marked incorrect). Solo: each implementation's
    calls back to back, in blocks of 10 that alternate between the implementations, so that a
    slow phase of a shared machine (seconds long) does not fall on one implementation alone."""
    live = [(impl, impl.fn) for impl in impls if impl.fn is not None]
    live = [(impl, fn) for impl, fn in live if check(impl, fn, expected)]
    fns = [fn for _, fn in live]
    medians = time_interleaved(fns, repeats)
    solo = time_in_blocks(fns, max(repeats, SOLO_BLOCK), block=SOLO_BLOCK)
    for (impl, fn), us, solo_us in zip(live, medians, solo, strict=True):
        impl.interleaved_ms, impl.solo_ms = us / 1e3, solo_us / 1e3
        check(impl, fn, expected)


def check(impl: Impl, fn: Callable[[], Any], expected: Any) -> bool:
    """Run once and compare with eager; False (with a note) if it cannot run at all."""
    try:
        with torch.no_grad():
            ok = outputs_match(fn(), expected)
    except Exception as err:
        impl.note = f"{impl.note}; run failed: {first_line(err)}".lstrip("; ")
        return False
    if impl.correct is not None and impl.correct and not ok:
        impl.note = f"{impl.note}; output changed across calls".lstrip("; ")
    impl.correct = ok if impl.correct is None else impl.correct and ok
    return True


def bench_model(name: str, args: argparse.Namespace, work: Path) -> ModelResult:
    model, inputs = get_model(name, small=args.small)
    result = ModelResult(name)
    with torch.no_grad():
        expected = model(*inputs)
    eager = make_eager(model, inputs)
    if any(type(m).__module__.startswith("torch_geometric") for m in model.modules()):
        eager.note = "PyTorch Geometric"
    result.impls.append(eager)
    if not args.skip_inductor:
        result.impls.append(make_inductor(model, inputs))
    if not args.skip_ort:
        result.impls.append(make_ort(model, inputs, work))
    result.impls.append(make_hwaware("hwaware untuned", model, inputs, None))
    if not args.skip_tuned:
        tuning = run_tuning(model, inputs, args.trials, args.db)
        result.notes.append(tuning)
        tuned = make_hwaware("hwaware tuned", model, inputs, args.db)
        result.impls.append(tuned)
    measure(result.impls, expected, args.repeats)
    return result


# ------------------------------------------------------------------------------ reporting
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ratio(base: float | None, v: float | None) -> str:
    return "-" if base is None or v is None else f"{base / v:.2f}x"


def _mark(correct: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: "-"}[correct]


def markdown(results: list[ModelResult], args: argparse.Namespace) -> str:
    lines = [
        "# hwaware benchmark", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {_cpu_name()}, {CORES} cores; "
        f"threads per runtime: {CORES}",
        f"- torch {torch.__version__}, hwaware {hwaware.__version__}, {_versions()}",
        f"- batch 1; {'small' if args.small else 'full'} shapes; medians of {args.repeats} "
        f"calls; {_budget(args)}",
        f"- ratio = eager ms / impl ms (>1 is faster than eager); correct = allclose to eager "
        f"(rtol {RTOL}, atol {ATOL})", "",
        "| model | implementation | interleaved ms | vs eager | solo ms | vs eager (solo) "
        "| correct | notes |",
        "|---|---|---:|---:|---:|---:|:---:|---|",
    ]
    for r in results:
        base = r.impls[0]
        for impl in r.impls:
            lines.append(
                f"| {r.name} | {impl.name} | {_ms(impl.interleaved_ms)} "
                f"| {_ratio(base.interleaved_ms, impl.interleaved_ms)} | {_ms(impl.solo_ms)} "
                f"| {_ratio(base.solo_ms, impl.solo_ms)} | {_mark(impl.correct)} "
                f"| {impl.note.replace('|', '/')} |"
            )
    notes = [f"- {r.name}: {n}" for r in results for n in r.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _budget(args: argparse.Namespace) -> str:
    if args.skip_tuned:
        return "no tuning"
    return f"tuning budget {args.trials} trials per model (db {args.db})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    found = []
    for mod in ("tvm", "onnxruntime", "torch_geometric"):
        try:
            found.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            found.append(f"{mod} missing")
    return ", ".join(found)


# ----------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated zoo names (valid: {', '.join(sorted(ZOO))})")
    p.add_argument("--trials", type=int, default=2000, help="tuning budget per model")
    p.add_argument("--db", default="tuning_logs/bench.db", help="tuning database for 'tuned'")
    p.add_argument("--out", default="bench/results/latest.md", help="Markdown file to write")
    p.add_argument("--repeats", type=int, default=200, help="timed calls per implementation")
    p.add_argument("--skip-inductor", action="store_true")
    p.add_argument("--skip-ort", action="store_true")
    p.add_argument("--skip-tuned", action="store_true", help="no tuning, no 'hwaware tuned'")
    p.add_argument("--small", action="store_true", help="the zoo's tiny shapes")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: at most {QUICK_TRIALS} trials and {QUICK_REPEATS} repeats")
    args = p.parse_args(argv)
    if args.quick:
        args.trials = min(args.trials, QUICK_TRIALS)
        args.repeats = min(args.repeats, QUICK_REPEATS)
    unknown = [m for m in args.models.split(",") if m not in ZOO]
    if unknown:
        p.error(f"unknown models {', '.join(unknown)}; valid: {', '.join(sorted(ZOO))}")
    return args


def run_each(names: list[str], args: argparse.Namespace,
             bench_one: Callable[[str, argparse.Namespace, Path], Any],
             report: Callable[[list[Any]], str] | None = None) -> list[Any]:
    """`bench_one(name, args, work_dir)` for each name in turn, with threads and db set up;
    `report(results so far)` is written to `args.out` after each (a long run that is stopped
    keeps what it measured)."""
    torch.set_num_threads(CORES)
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="hwaware-bench-") as tmp:
        for name in names:
            print(f"== {name}", flush=True)
            work = Path(tmp) / name
            work.mkdir()
            results.append(bench_one(name, args, work))
            if report is not None:
                write_report(report(results), args.out, echo=False)
    return results


def write_report(text: str, out_path: str, echo: bool = True) -> None:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if echo:
        print(text)
        print(f"written to {out}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_each(args.models.split(","), args, bench_model,
                       lambda done: markdown(done, args))
    write_report(markdown(results, args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
