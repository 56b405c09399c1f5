"""Stage 6, run: a compiled model as a callable that takes and returns torch tensors.

Goes in: a `Program` (host steps + kernels) and the TVM executable holding the kernels chosen to
run on TVM. Comes out: `CompiledModel`, which checks its inputs, runs the host program (PyTorch
ops on the host, TVM kernels through the Relax VM with zero-copy DLPack), and saves to / loads
from a folder: `kernels.so` (TVM library), `program.json` (host program + kernel choices),
`weights.pt` (constants, loaded with `weights_only=True`), `program.py` (readable host program,
never executed), `meta.json` (build info, and since format 2 the modules defining the output
containers: a new process imports them to return the same container types, see `outputs.py`)
and `manifest.json` (a SHA-256 of each, checked by `hwaware.load` first: `manifest.py`). No
pickle anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.utils import _pytree as pytree

from hwaware import manifest, onednn, onnx_reference, outputs
from hwaware.index_guard import out_of_range
from hwaware.program import (
    KernelSpec,
    KernelStep,
    OpStep,
    Program,
    bind_arg,
    load_tree_spec,
    resolve_op,
    slots_read,
    torch_dtype,
)

log = logging.getLogger(__name__)

SAVE_FORMAT_VERSION = 2  # 2: meta.json has "outputs" (output container modules)
READ_FORMAT_VERSIONS = (1, 2)
LIBRARY_FILE = "kernels.so"  # linked here; a build-only target gets object files to link there
CROSS_LIBRARY_FILE = "kernels.tar"
STEP_TIMING_WARMUP = 3  # untimed whole runs before `CompiledModel.step_times_us` times steps


class InputMismatchError(ValueError):
    """A call's inputs do not match the shapes/dtypes the model was compiled for."""


@dataclass
class BuildInfo:
    """What the compiler decided and measured; shown by `CompiledModel.report()`."""

    target_name: str
    target_key: str
    host_ops: list[str]
    rewrites: dict[str, int]
    tuned_workloads: list[str] = field(default_factory=list)
    plan: str = "per-kernel"  # which whole-program assignment won (see build.py)
    plan_us: dict[str, float] = field(default_factory=dict)
    plan_spread: dict[str, float] = field(default_factory=dict)  # each plan's timing spread
    # fused kernels built as ordinary kernels instead: signature -> why
    dissolved: dict[str, str] = field(default_factory=dict)
    # the Target itself: a target file may lie anywhere, and `host` is another CPU elsewhere
    target_json: str = ""
    # each kernel's nodes of the captured graph (`Partition.kernel_nodes`), by kernel name: how
    # the profiler charges a built kernel's time to the kernels `hwaware.decompose` reports
    kernel_nodes: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def for_target(cls, target: Any, host_ops: list[str], rewrites: dict[str, int],
                   tuned_workloads: list[str] | None = None) -> BuildInfo:
        """A build's record for `target` (a `hwaware.target.Target`), which it keeps whole."""
        return cls(target.name, target.key, host_ops, rewrites, list(tuned_workloads or []),
                   target_json=target.to_json())

    def built_for(self) -> Any:
        """The `Target` the kernels were built for (by name for saves that predate target_json)."""
        from hwaware.target import Target, get_target

        return Target.from_json(self.target_json) if self.target_json else \
            get_target(self.target_name)


class CompiledModel:
    """A model compiled by hwaware: call it like the original module."""

    def __init__(self, program: Program, executable: Any, info: BuildInfo,
                 device_kind: str = "cpu"):
        self.program = program
        self.executable = executable
        self.info = info
        self._device_kind = device_kind
        self.out_spec = load_tree_spec(program.out_spec)
        self._run: Callable[[list[Any]], list[Any]] | None = None
        self._vm: Any = None
        self.verifier: Any = None  # hwaware.verify.Verifier while calls are being verified
        # the per-kernel build a one-call plan won over (in memory only: profiling times its
        # kernels one by one, which the one TVM call cannot show)
        self.kernel_plan: CompiledModel | None = None
        self._expected = [(torch.Size(s["shape"]), torch_dtype(s["dtype"]))
                          for s in program.input_specs]
        n_out = len(program.output_slots)
        self._out_kind = (
            "leaf" if self.out_spec == pytree.tree_structure(0) else
            "tuple" if self.out_spec == pytree.tree_structure(tuple(range(n_out))) else "tree"
        )

    # ------------------------------------------------------------------ calls
    def __call__(self, *args: Any) -> Any:
        if self.verifier is not None:
            return self.verifier.check(
                self._call, args,
                lambda: self.verifier.differing_kernel(self, pytree.tree_leaves(args)))
        return self._call(*args)

    def _call(self, *args: Any) -> Any:
        flat = list(args) if all(isinstance(a, torch.Tensor) for a in args) \
            else pytree.tree_leaves(args)
        self._check_inputs(flat)
        outputs = self.run_flat(flat)
        if self._out_kind == "leaf":
            return outputs[0]
        if self._out_kind == "tuple":
            return tuple(outputs)
        return pytree.tree_unflatten(outputs, self.out_spec)

    def run_flat(self, flat: list[Any]) -> list[Any]:
        """Run on flat input tensors already known to match; flat outputs (no checks: the
        dynamic runtime's callers have matched shapes and dtypes already)."""
        if self._run is None:
            self._run = self._make_runner()
        return self._run(flat)

    def _check_inputs(self, flat: list[Any]) -> None:
        if len(flat) == len(self._expected) and all(
            isinstance(x, torch.Tensor) and x.shape == shape and x.dtype == dtype
            for x, (shape, dtype) in zip(flat, self._expected, strict=True)
        ):
            return
        specs = self.program.input_specs
        if len(flat) != len(specs):
            raise InputMismatchError(
                f"expected {len(specs)} input tensor(s), got {len(flat)}"
            )
        for i, (x, spec) in enumerate(zip(flat, specs, strict=True)):
            want = f"{spec['dtype']}{spec['shape']}"
            if not isinstance(x, torch.Tensor):
                raise InputMismatchError(
                    f"input {i}: expected tensor {want}, got {type(x).__name__}"
                )
            got = f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
            if got != want:
                raise InputMismatchError(f"input {i}: expected {want}, got {got}")

    def _make_runner(self) -> Callable[[list[Any]], list[Any]]:
        program = self.program
        vm = self._virtual_machine()
        direct = self._direct_call(vm)
        if direct is not None:
            return direct
        actions = self._actions(vm)
        num, input_slots, output_slots = program.num_slots, program.input_slots, \
            program.output_slots

        def run(flat: list[Any]) -> list[Any]:
            slots = _filled_slots(num, input_slots, flat)
            _without_grad(_run_actions, actions, slots)
            return [slots[i] for i in output_slots]

        return run

    def _virtual_machine(self) -> Any:
        """The Relax VM running this model's TVM kernels (None when every kernel runs in
        PyTorch), made on first use."""
        if self._vm is not None or self.executable is None or not any(
            k.impl == "tvm" for k in self.program.kernels.values()
        ):
            return self._vm
        from hwaware.tvm import vm as tvm_vm

        if not self.info.built_for().can_run_here:
            raise RuntimeError(
                f"this model was built for target {self.info.target_name}, whose kernels "
                "cannot run on this machine; load it on the device"
            )
        self._vm = tvm_vm.make_vm(self.executable, self._device_kind, share_threads=True)
        return self._vm

    def kernel_callable(self, name: str) -> Callable[..., list[Any]]:
        """One TVM kernel of this model as a torch -> list of torch call (verification)."""
        from hwaware.tvm import vm as tvm_vm

        spec = self.program.kernels[name]
        return tvm_vm.torch_callable(self._virtual_machine(), name, len(spec.outputs))

    def _direct_call(self, vm: Any) -> Callable[[list[Any]], list[Any]] | None:
        """A program that is one TVM kernel from inputs to outputs runs without slots."""
        steps, program = self.program.steps, self.program
        if vm is None or len(steps) != 1 or not isinstance(steps[0], KernelStep):
            return None
        step = steps[0]
        if program.kernels[step.kernel].impl != "tvm" or step.inputs != program.input_slots \
                or step.outputs != program.output_slots:
            return None
        from hwaware.tvm import vm as tvm_vm

        call = tvm_vm.torch_callable(vm, step.kernel, len(step.outputs))
        spec = program.kernels[step.kernel]
        checks = spec.index_checks

        def run(flat: list[Any]) -> list[Any]:
            why = checks and out_of_range(checks, flat)
            if why:  # in PyTorch, which raises, or wraps negatives
                if not spec.steps:
                    _raise_out_of_range(spec, why)
                return _without_grad(run_kernel_in_torch, program, step.kernel, flat)
            return _without_grad(call, *flat)

        return run

    def _actions(self, vm: Any) -> list[Callable[[list[Any]], None]]:
        channels_last = channels_last_slots(self.program)
        return [self._action(step, vm, channels_last) for step in self.program.steps]

    def _action(self, step: OpStep | KernelStep, vm: Any, channels_last: set[int]
                ) -> Callable[[list[Any]], None]:
        if isinstance(step, OpStep):
            return _op_action(step, self.program.constants)
        spec = self.program.kernels[step.kernel]
        if spec.impl == "tvm" and vm is not None:
            from hwaware.tvm import vm as tvm_vm

            call = tvm_vm.torch_callable(vm, spec.name, len(step.outputs))
            return _tvm_action(call, step, spec, self.program.constants)
        if spec.impl == onednn.IMPL:  # a convolution with its weight reordered once
            return onednn.action(spec, self.program.constants,
                                 keep_channels_last=set(step.outputs) <= channels_last)
        if spec.impl == onnx_reference.IMPL:  # an ONNX graph TVM could not import or build
            return onnx_reference.reference_action(spec.name, step.inputs, step.outputs,
                                                   self.program.constants)
        if not spec.steps:  # a kernel with no PyTorch steps (an ONNX graph) never runs in torch
            return _no_torch_action(spec.name)
        return torch_steps_action(spec.steps, self.program.constants)

    def step_times_us(self, flat: list[Any], runs: int, quantile: float) -> list[float]:
        """Each step's microseconds where it runs: inside `runs` back-to-back whole runs of
        the program on `flat` (after `STEP_TIMING_WARMUP` untimed ones), a `quantile` of each
        step's times. Unlike a kernel timed alone, which finds its weights and inputs in cache
        from its previous call, a step timed here pays for what the steps before it evicted:
        large models run 1.3-1.6x the sum of their kernels timed alone, and the sum of these
        times is the model's latency."""
        from hwaware.runner import quantile_of

        vm = self._virtual_machine()
        actions = self._actions(vm)
        times: list[list[float]] = [[] for _ in actions]
        program = self.program
        for run in range(STEP_TIMING_WARMUP + runs):
            slots = _filled_slots(program.num_slots, program.input_slots, flat)
            kept = _without_grad(_run_actions_timed, actions, slots)
            if run >= STEP_TIMING_WARMUP:
                for step_times, ns in zip(times, kept, strict=True):
                    step_times.append(ns / 1e3)
        return [quantile_of(t, quantile) for t in times]

    # ---------------------------------------------------------------- report
    def redecide(self, *example_inputs: Any, repeats: int = 30) -> CompiledModel:
        """Time again, on this machine and `example_inputs`, where each kernel runs (TVM or
        PyTorch) and which whole-model plan wins, and run by the new choices (`report()`
        shows them): for a model saved on another machine, or compiled while this one was
        busy. Returns the model itself."""
        from hwaware.build import redecide

        with torch.no_grad():
            redecide(self, pytree.tree_leaves(example_inputs), repeats)
        self._run = None  # made again from the new choices on the next call
        return self

    def report(self) -> str:
        """What runs where: kernels, their implementation and measured times."""
        kernels = list(self.program.kernels.values())
        on_tvm = sum(k.impl == "tvm" for k in kernels)
        host_steps = sum(isinstance(s, OpStep) for s in self.program.steps)
        lines = [
            f"target {self.info.target_name} ({self.info.target_key})",
            f"{len(kernels)} kernels ({on_tvm} on TVM, {len(kernels) - on_tvm} on PyTorch), "
            f"{host_steps} host ops, {on_tvm} TVM calls per inference, "
            f"{len(self.info.tuned_workloads)} fused workloads with tuned records",
        ]
        if self.info.plan_us:
            timings = ", ".join(f"{k} {v:.0f} us{_spread(self.info.plan_spread.get(k))}"
                                for k, v in self.info.plan_us.items())
            lines.append(f"whole-model check chose {self.info.plan} ({timings})")
        for signature, why in self.info.dissolved.items():
            lines.append(f"fused kernel {signature} {why}: its ops are built as ordinary kernels")
        if self.info.host_ops:
            lines.append(f"ops TVM cannot import (run in PyTorch): {', '.join(self.info.host_ops)}")
        if self.kernel_plan is not None:  # one TVM call: show the kernels it was chosen over
            kernels = list(self.kernel_plan.program.kernels.values())
            lines.append(f"one TVM call won over calling these {len(kernels)} kernels one by one:")
        lines.append(f"{'kernel':<22}{'family':<12}{'runs on':<9}{'tvm us':>10}{'':<7}"
                     f"{'torch us':>10}")
        for k in kernels:
            lines.append(f"{k.name:<22}{k.family:<12}{k.impl:<9}{_us(k.tvm_us):>10}"
                         f"{_spread(k.tvm_spread):<7}{_us(k.torch_us):>10}"
                         f"{_spread(k.torch_spread)}")
        if any(k.tvm_spread is not None for k in kernels):
            lines.append("(+-N%: the timings' interquartile range over their median)")
        return "\n".join(lines)

    # ------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model to `directory` (its own folder: `hwaware.load` refuses files that
        the save did not write), with `manifest.json` over every file. Atomic: written beside
        it and renamed into place (`manifest.save_atomically`), so a save killed part-way
        leaves `directory` as it was."""
        return manifest.save_atomically(directory, "compiled", SAVE_FORMAT_VERSION,
                                        self.write_files)

    def write_files(self, out: Path) -> list[str]:
        """Write the model's files into the new, empty folder `out` (no manifest: the caller
        writes one, a dynamic model over all of its regions); the names written, relative to
        `out`."""
        written = ["program.json", "program.py", "weights.pt", "meta.json"]
        if self.executable is not None:
            from hwaware.tvm import vm as tvm_vm

            cross = not self.info.built_for().can_run_here
            library = CROSS_LIBRARY_FILE if cross else LIBRARY_FILE
            tvm_vm.export_executable(self.executable, str(out / library), cross)
            written.append(library)
        (out / "program.json").write_text(self.program.to_json())
        (out / "program.py").write_text(self.program.to_python())
        torch.save(self.program.constants, out / "weights.pt")
        meta = {"format_version": SAVE_FORMAT_VERSION, "device_kind": self._device_kind,
                "has_library": self.executable is not None,
                "outputs": outputs.describe(self.out_spec).to_json(),
                "operator_modules": self.program.custom_operator_modules(),
                **self.info.__dict__}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        return written


def load_compiled(src: Path, missing: dict[str, str]) -> CompiledModel:
    """Load one saved `CompiledModel` from a folder `hwaware.load` has checked against its
    manifest; the output container types it returns as dicts go into `missing` (name ->
    module), for the caller's one warning. The program's ops are checked against the allowlist
    (`program.resolve_op`) before the kernel library is loaded."""
    meta_file = src / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{src}: not a saved hwaware model (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") not in READ_FORMAT_VERSIONS:
        raise ValueError(f"{src}: save format {meta.get('format_version')} is not supported "
                         f"(this hwaware reads {list(READ_FORMAT_VERSIONS)})")
    constants = torch.load(src / "weights.pt", weights_only=True)
    outputs.import_recorded_modules(meta.get("operator_modules", []), "custom operators")
    program_file = src / "program.json"
    program = Program.from_json(program_file.read_text(), constants, str(program_file))
    saved = outputs.OutputTypes.from_json(meta["outputs"]) if "outputs" in meta else None
    program.out_spec = outputs.loadable_spec(program.out_spec, saved, missing)
    executable = None
    if meta["has_library"]:
        from hwaware.tvm import vm as tvm_vm

        library = src / LIBRARY_FILE
        executable = tvm_vm.load_executable(
            str(library if library.exists() else src / CROSS_LIBRARY_FILE))
    fields = {k: meta[k] for k in BuildInfo.__dataclass_fields__ if k in meta}
    info = BuildInfo(**fields)
    return CompiledModel(program, executable, info, meta["device_kind"])


def _without_grad(fn: Callable[..., Any], *args: Any) -> Any:
    """Call under no_grad; skips the context manager when grad is off already (the dynamic
    runtime calls many small programs from inside one no_grad)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return fn(*args)
    return fn(*args)


def channels_last_slots(program: Program) -> set[int]:
    """The slots that only oneDNN convolutions read (they take channels-last tensors as they
    come: `onednn.channels_last_inputs`), not program outputs. Any other reader wants
    NCHW-contiguous memory, made once where the value is written: a PyTorch view needs it,
    and a TVM kernel would copy each time it reads."""
    readers: dict[int, list[OpStep | KernelStep]] = {}
    for step in program.steps:
        for slot in step.inputs if isinstance(step, KernelStep) else slots_read(step):
            readers.setdefault(slot, []).append(step)
    outputs = set(program.output_slots)
    takes = {name: onednn.channels_last_inputs(spec, program.constants)
             for name, spec in program.kernels.items() if spec.impl == onednn.IMPL}
    return {slot for slot, steps in readers.items() if slot not in outputs and all(
        isinstance(s, KernelStep) and slot in takes.get(s.kernel, ()) for s in steps)}


def _run_actions(actions: list[Callable[[list[Any]], None]], slots: list[Any]) -> None:
    for action in actions:
        action(slots)


def _filled_slots(num_slots: int, input_slots: list[int], flat: list[Any]) -> list[Any]:
    """A run's slots with the inputs in place."""
    slots: list[Any] = [None] * num_slots
    for slot, x in zip(input_slots, flat, strict=True):
        slots[slot] = x
    return slots


def _run_actions_timed(actions: list[Callable[[list[Any]], None]], slots: list[Any]
                       ) -> list[int]:
    """`_run_actions`, with each action's nanoseconds."""
    clock = time.perf_counter_ns
    elapsed = []
    for action in actions:
        start = clock()
        action(slots)
        elapsed.append(clock() - start)
    return elapsed


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _spread(v: float | None) -> str:
    return "" if v is None else f" +-{100 * v:.0f}%"


def _op_action(step: OpStep, constants: dict[str, torch.Tensor]) -> Callable[[list[Any]], None]:
    fn = resolve_op(step.op, in_process=True)  # a program read from a file was checked then
    out = step.out
    args = [bind_arg(a, constants) for a in step.args]
    kwargs = {k: bind_arg(v, constants) for k, v in step.kwargs.items()}
    if not kwargs:
        def action(slots: list[Any]) -> None:
            slots[out] = fn(*[g(slots) if d else g for d, g in args])
        return action

    def action_with_kwargs(slots: list[Any]) -> None:
        slots[out] = fn(*[g(slots) if d else g for d, g in args],
                        **{k: g(slots) if d else g for k, (d, g) in kwargs.items()})

    return action_with_kwargs


def torch_steps_action(steps: Sequence[OpStep], constants: dict[str, torch.Tensor]
                       ) -> Callable[[Any], None]:
    """PyTorch ops run one by one on the slots (a list, or a dict of the slots they use)."""
    actions = [_op_action(s, constants) for s in steps]

    def action(slots: list[Any]) -> None:
        for a in actions:
            a(slots)

    return action


def _no_torch_action(kernel: str) -> Callable[[list[Any]], None]:
    def action(slots: list[Any]) -> None:
        raise RuntimeError(f"kernel {kernel} has no PyTorch implementation and its TVM library "
                           "is not loaded (a build-only target, or a model saved without "
                           "kernels.so): run it where the target's device is")

    return action


def _tvm_action(call: Callable[..., list[Any]], step: KernelStep, spec: KernelSpec,
                constants: dict[str, torch.Tensor]) -> Callable[[list[Any]], None]:
    """Run the TVM kernel; where an index among its inputs is out of range
    (`index_guard`), its PyTorch ops instead, which raise PyTorch's error (or wrap negative
    indices as PyTorch does)."""
    inputs, outputs, checks = step.inputs, step.outputs, spec.index_checks
    in_torch = torch_steps_action(spec.steps, constants) if checks and spec.steps else None

    def action(slots: list[Any]) -> None:
        args = [slots[i] for i in inputs]
        why = checks and out_of_range(checks, args)
        if why:
            if in_torch is None:
                _raise_out_of_range(spec, why)
            in_torch(slots)
            return
        results = call(*args)
        for slot, value in zip(outputs, results, strict=True):
            slots[slot] = value

    return action


def _raise_out_of_range(spec: KernelSpec, why: str) -> NoReturn:
    """An out-of-range index of a kernel with no PyTorch ops (an ONNX graph): the error ONNX
    Runtime and PyTorch give, never a read past the end."""
    raise IndexError(f"kernel {spec.name}: {why}")


def run_kernel_in_torch(program: Program, kernel: str, inputs: list[Any]) -> list[Any]:
    """Run one kernel's PyTorch steps on given inputs (reference and fallback timing)."""
    spec = program.kernels[kernel]
    slots: list[Any] = [None] * program.num_slots
    for slot, x in zip(spec.inputs, inputs, strict=True):
        slots[slot] = x
    torch_steps_action(spec.steps, program.constants)(slots)
    return [slots[i] for i in spec.outputs]


def kernel_inputs(program: Program, example_inputs: list[Any]) -> dict[str, list[Any]]:
    """Run the whole program in PyTorch once, keeping each kernel's real input values."""
    seen: dict[str, list[Any]] = {}
    for step, slots in step_through(program, example_inputs):
        if isinstance(step, KernelStep):
            spec = program.kernels[step.kernel]
            seen[spec.name] = [slots[i] for i in spec.inputs]
    return seen


def step_through(program: Program, inputs: list[Any]
                 ) -> Iterator[tuple[OpStep | KernelStep, list[Any]]]:
    """Run the whole program in PyTorch, yielding each step with the slots as they are just
    before it runs."""
    slots = _filled_slots(program.num_slots, program.input_slots, inputs)
    with torch.no_grad():
        for step in program.steps:
            yield step, slots
            if isinstance(step, KernelStep):
                spec = program.kernels[step.kernel]
                torch_steps_action(spec.steps, program.constants)(slots)
            else:
                _op_action(step, program.constants)(slots)
