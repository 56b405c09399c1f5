"""The conformance harness: each corpus model through every hwaware entry point, compared with
eager PyTorch on every example input; each model in its own subprocess with a time limit.

Entry points, in the order a worker runs them (`ENTRY_POINTS`):
- `eager`: the reference. Outputs on every input (run twice: a model that is not deterministic
  cannot be checked) and the FLOPs of one forward (`observe.eager_flops`).
- `compile`: `hwaware.compile(model, inputs[0], db=None)`.
- `save_load`: `compiled.save(dir)`, then `hwaware.load(dir)` in a fresh process that imports
  torch and hwaware only (`load_check`); inputs and expected outputs go there as
  `torch.save` files read with `weights_only=True`. A dynamic model with regions in eager
  PyTorch loads with `model=` the case's model, built again there, as its user would.
- `torch_compile`: `torch.compile(model, backend=..., options={"db": None, "trials": 0})`,
  where the backend is the registered `hwaware` backend wrapped to record the graphs it compiles
  (`observe.RecordingBackend`): the coverage figure needs their programs. `na` when it raises
  and torch.compile with PyTorch's own `eager` backend raises on the model too (a Dynamo bug:
  PyG's GraphUNet trips one in Dynamo's stride bookkeeping).
- `onnx`: `torch.onnx.export`, then `hwaware.compile("model.onnx", db=None)`. `na` when the export
  fails, or when the exported file itself disagrees with eager in ONNX Runtime (when installed):
  those are torch's limits (a traced graph keeps one path of a dynamic model), not hwaware's.

Every output leaf is compared with eager's (rtol 1e-3, atol 1e-4), and the container type and
keys must match too (except for ONNX, whose outputs are a flat tuple by design).

Statuses: `pass`, `fail`, `na` (see onnx), `skip` (a prerequisite failed: no eager reference, or
no compiled model to save). Per entry point a row keeps the first error line, hwaware's warnings
(count and first text), the compile time, and the coverage: the share of eager FLOPs that ran on
hwaware's TVM kernels for the first input (see `observe`).

Supervision (`run_model`): a worker process (`python -m tests.conformance.harness worker ...`)
runs the entry points one after the other and writes its progress to a state file after each.
The supervisor gives each entry point `timeout` seconds; one that hangs is killed (with its
process group) and recorded as a FAIL; one that kills the interpreter (a segfault in a native
library) is a FAIL whose error is the signal and the innermost Python frame faulthandler
printed. Either way a new worker runs the remaining entry points.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.conformance.compare import Reference, mismatch
from tests.conformance.models import CASES, get_case
from tests.conformance.observe import (
    RecordingBackend,
    compiled_programs,
    coverage_pct,
    describe_error,
    eager_flops,
    error_detail,
    first_warning,
    hwaware_warnings,
    tvm_flops_on,
)

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("eager", "compile", "save_load", "torch_compile", "onnx")
TORCH_COMPILE_OPTIONS = {"db": None, "trials": 0}
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.5


@dataclass
class EntryResult:
    """One entry point's result for one model."""

    status: str  # pass | fail | na | skip
    error: str = ""
    seconds: float | None = None  # compile time (torch.compile: the first call; save_load:
    #                               save + load; onnx: export + compile)
    warnings: int = 0
    first_warning: str = ""  # the first that is not informational (observe.first_warning)
    warning_texts: list[str] = field(default_factory=list)  # distinct, at most 8
    coverage: float | None = None  # % of the eager FLOPs of inputs[0] run on TVM kernels
    flops: int | None = None  # on inputs[0]: eager's, the total; elsewhere the TVM kernels'
    fallbacks: int = 0  # graphs (torch.compile) or regions (a DynamicModel) run in eager
    notes: str = ""
    detail: str = ""  # a failure's innermost hwaware frame and whole message


@dataclass
class ModelRow:
    """Everything the report says about one model."""

    name: str
    family: str
    source: str
    entries: dict[str, EntryResult] = field(default_factory=dict)
    eager_flops: int | None = None
    wall_s: float = 0.0

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelRow:
        entries = {k: entry_from_dict(v) for k, v in doc.pop("entries").items()}
        return cls(**doc, entries=entries)


def entry_from_dict(doc: dict[str, Any]) -> EntryResult:
    """An `EntryResult` from JSON (fields it does not know are left out)."""
    known = EntryResult.__dataclass_fields__
    return EntryResult(**{k: v for k, v in doc.items() if k in known})


# =============================================================================== worker
class Worker:
    """Runs entry points for one model inside the worker process."""

    def __init__(self, name: str, work: Path, timeout: float, compile_failed: bool):
        self.name, self.work, self.timeout = name, work, timeout
        self.case = get_case(name)
        with torch.no_grad():
            self.refs = [Reference.of(self.case.model(*x)) for x in self.case.inputs]
        self.flops = eager_flops(self.case.model, self.case.inputs[0])
        self.compiled: Any = None
        self.compile_failed = compile_failed

    # ------------------------------------------------------------------ comparing
    def first_mismatch(self, fn: Callable[..., Any], containers: bool = True) -> str | None:
        """The first input on which `fn` differs from eager, described; None if none."""
        for i, (x, ref) in enumerate(zip(self.case.inputs, self.refs, strict=True)):
            with torch.no_grad():
                problem = mismatch(fn(*x), ref, containers=containers)
            if problem:
                return f"input {i}: {problem}"
        return None

    def add_coverage(self, result: EntryResult, tvm_flops: int | None) -> None:
        """Record the TVM FLOPs of an entry point and their share of eager's."""
        if tvm_flops is not None:
            result.flops, result.coverage = tvm_flops, coverage_pct(tvm_flops, self.flops)

    # --------------------------------------------------------------- entry points
    def eager(self) -> EntryResult:
        problem = self.first_mismatch(self.case.model)
        if problem:
            return EntryResult("fail", f"eager is not deterministic: {problem}")
        return EntryResult("pass", flops=self.flops)

    def compile(self) -> EntryResult:
        import hwaware

        def build() -> Any:
            self.compiled = hwaware.compile(self.case.model, self.case.inputs[0], db=None,
                                            show_progress=False)
            return self.compiled

        result = checked(build, self.first_mismatch)
        self.compile_failed = self.compiled is None
        if self.compiled is not None:
            self.add_coverage(result, tvm_flops_on(self.compiled, self.case.inputs[0]))
            result.notes = compiled_summary(self.compiled)
            runners = getattr(self.compiled, "runners", {})
            result.fallbacks = sum(r.eager_reason is not None for r in runners.values())
        return result

    def save_load(self) -> EntryResult:
        if self.compiled is None and not self.compile_failed:
            self.compile()  # a new worker after a crash: compile again, then save
        if self.compiled is None:
            return EntryResult("skip", "hwaware.compile failed: nothing to save")
        start = time.perf_counter()
        with hwaware_warnings() as caught:
            try:
                saved = self.compiled.save(fresh_dir(self.work / "saved"))
            except Exception as err:
                return EntryResult("fail", f"save: {describe_error(err)}",
                                   detail=error_detail(err), **caught.as_dict())
        result = self.load_in_fresh_process(Path(saved))
        result.seconds = time.perf_counter() - start
        texts = caught.texts + result.warning_texts
        result.warnings += len(caught.texts)
        result.first_warning = first_warning(texts)
        result.warning_texts = list(dict.fromkeys(texts))[:8]
        return result

    def load_in_fresh_process(self, saved: Path) -> EntryResult:
        case_file, result_file = self.work / "load_case.pt", self.work / "load_result.json"
        result_file.unlink(missing_ok=True)
        runners = getattr(self.compiled, "runners", {}).values()
        needs_model = any(r.eager_reason is not None for r in runners)  # eager regions
        torch.save({"inputs": self.case.inputs, "expected": [asdict(r) for r in self.refs],
                    "model_case": self.name if needs_model else ""}, case_file)
        with open(self.work / "load_check.log", "w") as log:
            proc = subprocess.run(
                [sys.executable, "-X", "faulthandler", "-m", "tests.conformance.load_check",
                 str(saved), str(case_file), str(result_file)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=self.timeout,
                check=False)
        if not result_file.exists():
            return EntryResult("fail", "load process " + describe_exit(
                proc.returncode, self.work / "load_check.log"))
        doc = json.loads(result_file.read_text())
        notes = f"load imported {', '.join(doc['imported'])}" if doc["imported"] else ""
        result = EntryResult(doc["status"], doc["error"], warnings=doc["warnings"],
                             first_warning=doc["first_warning"],
                             warning_texts=doc["warning_texts"], notes=notes,
                             detail=doc.get("detail", ""))
        self.add_coverage(result, doc.get("tvm_flops"))
        return result

    def torch_compile(self) -> EntryResult:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend = RecordingBackend("hwaware")
        compiled = torch.compile(self.case.model, backend=backend,
                                 options=dict(TORCH_COMPILE_OPTIONS))

        def first_call() -> Any:
            with torch.no_grad():
                compiled(*self.case.inputs[0])
            return compiled

        result = checked(first_call, self.first_mismatch)
        raised = result.status == "fail" and not result.error.startswith("input ")
        if raised and (dynamo_error := self.dynamo_alone_error()):
            return EntryResult("na", f"torch.compile fails with backend='eager' too (Dynamo's "
                               f"limit, not hwaware's): {dynamo_error}")
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        result.fallbacks = backend.fell_back()
        result.notes = (f"{len(backend.graphs)} graphs ({result.fallbacks} eager), "
                        f"{breaks} graph breaks")
        backend.reset_counts()
        try:
            with torch.no_grad():
                compiled(*self.case.inputs[0])
            self.add_coverage(result, backend.tvm_flops())
        except Exception:  # noqa: BLE001 - the failure is recorded above already
            pass
        return result

    def dynamo_alone_error(self) -> str | None:
        """The error torch.compile with PyTorch's own `eager` backend raises on this model's
        inputs (Dynamo's limit, not hwaware's), or None when it runs."""
        torch._dynamo.reset()
        try:
            compiled = torch.compile(self.case.model, backend="eager")
            with torch.no_grad():
                for x in self.case.inputs:
                    compiled(*x)
        except Exception as err:  # noqa: BLE001 - the error is the answer
            return describe_error(err)
        return None

    def onnx(self) -> EntryResult:
        import hwaware

        path = fresh_dir(self.work / "onnx") / "model.onnx"
        start = time.perf_counter()
        try:
            exporter = export_onnx(self.case.model, self.case.inputs[0], path)
        except Exception as err:
            return EntryResult("na", f"torch.onnx.export: {describe_error(err)}")
        used = onnx_input_indices(path)
        export_s = time.perf_counter() - start
        problem = self.ort_mismatch(path, used)
        if problem:
            return EntryResult("na", f"the exported graph differs from eager in onnxruntime: "
                                     f"{problem}", notes=exporter)

        def build() -> Callable[..., Any]:
            cm = hwaware.compile(str(path), db=None, show_progress=False)
            return lambda *x: cm(*[x[i] for i in used])

        result = checked(build, lambda fn: self.first_mismatch(fn, containers=False))
        result.seconds = None if result.seconds is None else result.seconds + export_s
        result.notes = exporter
        return result

    def ort_mismatch(self, path: Path, used: list[int]) -> str | None:
        """How ONNX Runtime's outputs of the exported file differ from eager; None if they
        match or onnxruntime is not installed."""
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime rejects the file
            return f"onnxruntime cannot load it: {describe_error(err)}"
        names = [i.name for i in session.get_inputs()]

        def run(*x: Any) -> tuple[Any, ...]:
            feed = {n: x[i].numpy() for n, i in zip(names, used, strict=True)}
            return tuple(torch.from_numpy(o) for o in session.run(None, feed))

        try:
            return self.first_mismatch(run, containers=False)
        except Exception as err:  # noqa: BLE001 - e.g. an input of another shape than exported
            return f"onnxruntime cannot run it on the example inputs: {describe_error(err)}"


def checked(build: Callable[[], Any], first_mismatch: Callable[[Any], str | None]
            ) -> EntryResult:
    """Time `build`, then compare what it returns with eager; hwaware's warnings recorded."""

    seconds, detail = None, ""
    with hwaware_warnings() as caught:
        start = time.perf_counter()
        try:
            fn = build()
            seconds = time.perf_counter() - start
            problem = first_mismatch(fn)
            status, error = ("fail", problem) if problem else ("pass", "")
        except Exception as err:  # the failure is the result
            status, error, detail = "fail", describe_error(err), error_detail(err)
    return EntryResult(status, error, seconds, detail=detail, **caught.as_dict())


def compiled_summary(compiled: Any) -> str:
    """A few words on what was built: kernels on TVM, or regions for a dynamic model."""

    programs = compiled_programs(compiled)
    kernels = [k for cm in programs for k in cm.program.kernels.values()]
    on_tvm = sum(k.impl == "tvm" for k in kernels)
    text = f"{on_tvm}/{len(kernels)} kernels on TVM"
    runners = getattr(compiled, "runners", None)
    if runners is not None:
        eager = sum(r.eager_reason is not None for r in runners.values())
        text += f"; {len(runners)} regions ({eager} eager), {len(programs)} specializations"
    return text


def export_onnx(model: Any, inputs: Sequence[Any], path: Path) -> str:
    """torch.onnx.export with the torch.export-based exporter, else the TorchScript one, with
    inputs named in0, in1, ...; returns which exporter wrote the file."""
    names = [f"in{i}" for i in range(len(inputs))]
    try:
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=True, input_names=names)
        return "dynamo exporter"
    except Exception:  # e.g. onnxscript not installed
        # through `forward(*args)`: the TorchScript exporter fills a forward's remaining
        # parameters with their defaults, positionally, which Hugging Face's decorators reject
        torch.onnx.export(ArgsOnly(model), tuple(inputs), str(path), dynamo=False,
                          input_names=names)
        return "torchscript exporter"


class ArgsOnly(torch.nn.Module):
    """`forward(*args)` calling the model with exactly those arguments."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        return self.model(*args)


def onnx_input_indices(path: Path) -> list[int]:
    """Which of the model's inputs the exported graph kept (an unused one is dropped)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return [int(i.name.removeprefix("in")) for i in model.graph.input
            if i.name not in initializers]


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


class StateFile:
    """The worker's progress, rewritten atomically as each entry point starts and ends."""

    def __init__(self, path: Path):
        self.path = path
        self.doc: dict[str, Any] = {"current": None, "started": None, "done": {},
                                    "setup_error": ""}

    def start(self, entry: str) -> None:
        self.doc.update(current=entry, started=time.time())
        self.write()

    def finish(self, entry: str, result: EntryResult) -> None:
        self.doc["done"][entry] = asdict(result)
        self.doc.update(current=None, started=None)
        self.write()

    def fail_setup(self, error: str) -> None:
        self.doc.update(setup_error=error, current=None)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc))
        tmp.replace(self.path)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        try:
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return {"current": "setup", "started": None, "done": {}, "setup_error": ""}


def worker_main(name: str, entries: list[str], work: Path, timeout: float,
                compile_failed: bool) -> int:
    """The worker process: build the case and its eager reference, then run `entries`."""
    import faulthandler


    faulthandler.enable()
    state = StateFile(work / "state.json")
    state.start("setup")
    try:
        worker = Worker(name, work, timeout, compile_failed)
    except Exception as err:
        state.fail_setup(f"building the model or its eager reference: {describe_error(err)}")
        return 0
    for entry in entries:
        state.start(entry)
        try:
            result = getattr(worker, entry)()
        except Exception as err:  # a harness step failed (writing files, a subprocess)
            result = EntryResult("fail", f"harness: {describe_error(err)}",
                                 detail=error_detail(err))
        state.finish(entry, result)
    return 0


# =========================================================================== supervisor
def run_model(name: str, timeout: float = DEFAULT_TIMEOUT_S, work: Path | None = None,
              entries: Sequence[str] = ENTRY_POINTS) -> ModelRow:
    """Run `entries` for the corpus model `name` in worker subprocesses (see the module
    docstring); every entry gets a result, whatever happens to the workers."""
    import tempfile


    factory = CASES[name]
    row = ModelRow(name, factory.family, factory.source)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"conformance-{name}-") as tmp:
        model_work = fresh_dir((work or Path(tmp)) / name)
        pending = [e for e in ENTRY_POINTS if e in entries]
        while pending:
            compile_failed = row.entries.get("compile", EntryResult("pass")).status == "fail"
            state, ended = run_worker(name, pending, model_work, timeout, compile_failed)
            row.entries.update({k: entry_from_dict(v) for k, v in state["done"].items()})
            pending = [e for e in pending if e not in row.entries]
            if not pending:
                break
            blocker = state["setup_error"] or ended or "the worker ended without running it"
            current = state["current"]
            if current in (None, "setup") or state["setup_error"]:
                _no_reference(row, pending, blocker)
                break
            row.entries[current] = EntryResult("fail", blocker)
            pending.remove(current)
    row.wall_s = round(time.time() - start, 1)
    row.eager_flops = row.entries["eager"].flops
    return row


def _no_reference(row: ModelRow, pending: list[str], error: str) -> None:
    for entry in pending:
        row.entries[entry] = EntryResult("fail", error) if entry == "eager" else \
            EntryResult("skip", "no eager reference")


def run_worker(name: str, entries: list[str], work: Path, timeout: float,
               compile_failed: bool) -> tuple[dict[str, Any], str]:
    """Start one worker and watch it. Returns its last state and, if it did not end by
    itself, why: a timeout or a crash."""
    state_file, log_file = work / "state.json", work / "worker.log"
    state_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-X", "faulthandler", "-m", "tests.conformance.harness", "worker",
           name, "--entries", ",".join(entries), "--work", str(work), "--timeout", str(timeout)]
    if compile_failed:
        cmd.append("--compile-failed")
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        timed_out = _watch(proc, state_file, timeout)
    finally:  # the supervisor itself stopped (Ctrl-C, SIGTERM): take the worker with it
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if timed_out:
        return StateFile.read(state_file), f"timed out after {timeout:.0f} s"
    ended = "" if proc.returncode == 0 else describe_exit(proc.returncode, log_file)
    return StateFile.read(state_file), ended


def _watch(proc: subprocess.Popen[bytes], state_file: Path, timeout: float) -> bool:
    """Wait for the worker to end; True if its current entry point ran out of time."""
    spawned = time.time()
    while proc.poll() is None:
        since = StateFile.read(state_file).get("started") or spawned
        if time.time() - since > timeout:
            return True
        time.sleep(POLL_S)
    return False


def describe_exit(returncode: int, log_file: Path) -> str:
    """`crashed (SIGSEGV) in schedules.py:63 build_executable` from a dead process's return
    code and the faulthandler traceback at the end of its log."""
    if returncode < 0:
        how = f"crashed ({signal.Signals(-returncode).name})"
    else:
        how = f"exited with code {returncode}"
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', _tail(log_file))
    if frames:
        path, line, func = frames[0]  # faulthandler prints the innermost frame first
        how += f" in {Path(path).name}:{line} {func}"
    return how


def _tail(path: Path, n: int = 20_000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    cut = text.rfind("Fatal Python error")
    return text[cut:] if cut >= 0 else text[-n:]


def run_corpus(names: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
               work: Path | None = None,
               on_row: Callable[[ModelRow], None] | None = None) -> list[ModelRow]:
    """Run every model of `names`, one after the other; `on_row` sees each row as it ends."""
    rows = []
    for name in names:
        row = run_model(name, timeout, work)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


# ================================================================================ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run entry points for one model (used by run_model)")
    w.add_argument("name")
    w.add_argument("--entries", default=",".join(ENTRY_POINTS))
    w.add_argument("--work", type=Path, required=True)
    w.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    w.add_argument("--compile-failed", action="store_true")
    args = parser.parse_args(argv)
    return worker_main(args.name, args.entries.split(","), args.work, args.timeout,
                       args.compile_failed)


if __name__ == "__main__":
    sys.exit(main())
