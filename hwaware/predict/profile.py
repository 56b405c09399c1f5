"""Profiling: measure sampled architectures as hwaware compiles them (the predictor's data).

Goes in: architectures (`hwaware.predict.spaces`), a target and a thread count, a tuning
database. For each architecture: capture -> rewrite -> partition (the kernels
`hwaware.decompose` reports), then the real build (each kernel on TVM or PyTorch as the build
chooses, fused families dissolved where they lose), then three measurements on this machine:
the whole compiled model, every built kernel and every host op step where it runs (timed
inside whole runs of the model: alone, a kernel finds its weights in cache from its previous
call, and a large model ran 1.3-1.6x the sum of its kernels timed so), and the whole model
again (two timings of one compiled model: the noise floor the predictor is judged beside).

Comes out: one `Sample` per architecture, appended to a JSONL file kept in the repository
(`cost_models/data/<cpu kind>.jsonl`: the machines change CPU kind between sessions, and
measured data must outlive them) and to the database (`kernels`, `kernel_measurements` with
impl "as-built", `model_measurements` with impl "hwaware"). A built kernel's time is charged to
the decomposed kernels it runs ops of (a contraction cut from its epilogue because it has no
tuned schedule is two built kernels for one decomposed one), so labels match what `decompose`
reports before any build. A model the build runs as one TVM call (`build.ONE_CALL`) has its
kernels timed as the per-kernel build it was chosen over runs them: their own times, which the
whole-model term then relates to the one call's. Profiling resumes: architectures already in
the file for this device are skipped, and each sample is written as soon as it is measured.

Timing is `runner.time_in_blocks` (blocks of back-to-back calls, as `bench/` does), reporting
the lower quartile of the calls: on a shared machine, bursts of other work only add time, and
the lower quartile is what the model costs when it has the cores (the median moved by up to 5%
between two timings of one model while other jobs ran here; two timings 10x apart were seen).
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from hwaware.build import CHAINED, KERNEL_CALLS, ONE_CALL
from hwaware.decompose import KernelRecord
from hwaware.predict import DATA_DIR
from hwaware.predict.features import Device


class Measurable(Protocol):
    """What the profiler measures: an `Architecture`, or a search space's architecture
    (`hwaware.nas.measure.SpaceArchitecture`)."""

    @property
    def id(self) -> str: ...

    def build(self) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]: ...

    def to_json(self) -> dict[str, Any]: ...

log = logging.getLogger(__name__)

SAMPLE_SCHEMA_VERSION = 3  # 2: `kernels` ends with the host ops' records and times; 3: each
# kernel's and host op's time is taken inside whole runs of the model, not alone
AS_BUILT = "as-built"  # kernel_measurements.impl of a decomposed kernel's measured time
TIMING_QUANTILE = 0.25
# The build's plans that run the whole model as one TVM call, chosen over the kernel calls
# where `hwaware.build.MARGIN` faster
ONE_CALL_PLANS = (CHAINED, ONE_CALL)
# The machine's speed, checked around each model with fixed reference workloads
# (`machine_slowdown`): on this shared 2-vCPU machine whole minutes ran 1.3-2x slower (a
# model re-timed later: 154 -> 93 us, every kernel alike), which a quantile of one model's
# calls cannot see. Two references, as the slow states hurt two kinds of work unequally: a
# matmul and a convolution ("compute"), and a gather and scatter-add over a node table
# ("gather"): in the host's slow state the gather ran 1000-1400 us where it runs 235-270 us,
# and a GNN model 2x slower, while the compute reference moved only 1.25-1.35x (two threads
# sharing cache lines suffer from the vCPUs' placement; one thread does not). Before a model,
# the profiler waits while a reference is more than
# `CALM_TOLERANCE` over the fastest seen on this device (not less: right after a large model
# the reference itself runs 1.15-1.4x slower in the same process, and a tolerance of 1.3 made
# large models wait and be measured twice for nothing); a model whose reference was slow
# before or after its timing is measured once more, and a sample still slow is kept but
# marked (`Sample.slowdown`), and left out of training and evaluation (`Sample.timed_calm`).
CALM_TOLERANCE = 1.5
# A sample's own consistency: its kernels' in-run times sum to at most 1.6x its latency (over 1
# only where one TVM call runs faster than its kernels built one by one; under 1 where a
# model's own call costs count); a machine that stalled between the model's first timing and
# the rest left a sample timed at 110 us whose second timing and kernels took 16 ms, and the
# reference check did not see it
LABEL_TOLERANCE = 2.0
CALM_WAIT_S = 2.0
CALM_TRIES = 30  # a slow state lasted from seconds to minutes
REFERENCE_WORKLOADS = ("compute", "gather")
# (threads, reference workload) -> the fastest microseconds seen
_FASTEST_REFERENCE: dict[tuple[int, str], float] = {}


@dataclass
class Sample:
    """One profiled architecture on one device."""

    id: str
    arch: dict[str, Any]
    split: str  # "train" (sampled in range), "ood" (beyond it) or "real" (zoo models)
    device: dict[str, Any]
    cpu: str
    kernels: list[dict[str, Any]]  # KernelRecord fields plus "us": its measured time; the
    # kernels, then the host ops (family "host")
    host_steps: int
    latency_us: float  # the whole compiled model
    latency2_us: float  # the same compiled model timed again (noise)
    eager_us: float
    unattributed_us: float  # built kernels running ops of no decomposed kernel
    compile_s: float
    versions: dict[str, str]
    created_at: float = field(default_factory=time.time)
    schema_version: int = SAMPLE_SCHEMA_VERSION
    plan: str = "per-kernel"  # the build's whole-model plan ("k_whole": one TVM call)
    reference_us: float = 0.0  # the compute reference just before the timing (0: not taken)
    slowdown: float = 0.0  # the references' worst time around the timing over their fastest
    gather_reference_us: float = 0.0  # the gather reference just before it (0: not taken)
    # the build's timings of each whole-model plan it weighed (`BuildInfo.plan_us`: the
    # kernel-by-kernel assignments, then the one-call plans beside the chosen kernel calls,
    # "kernel-calls"), microseconds; empty in samples from before it was kept
    plan_us: dict[str, float] = field(default_factory=dict)

    @property
    def timed_calm(self) -> bool:
        """Whether the machine ran at its usual speed while this model was timed: the
        reference workload around it (samples from before that check pass it), the model's two
        timings within `CALM_TOLERANCE` of each other, and its kernels' times summing to at
        most `LABEL_TOLERANCE` times its latency."""
        timings = max(self.latency_us, self.latency2_us) / max(self.measured_us, 1e-9)
        labels = sum(self.kernel_us) / max(self.measured_us, 1e-9)
        return (self.slowdown <= CALM_TOLERANCE and timings <= CALM_TOLERANCE
                and labels <= LABEL_TOLERANCE)

    @functools.cached_property
    def records(self) -> list[KernelRecord]:
        return [KernelRecord.from_json({k: v for k, v in d.items() if k != "us"})
                for d in self.kernels]

    @property
    def measured_us(self) -> float:
        """The model's ground-truth latency: the lower of its two timings (each a lower
        quartile; noise on a shared machine only adds time). Their gap is the noise floor."""
        return min(self.latency_us, self.latency2_us)

    def plan_latencies(self) -> tuple[float | None, float | None]:
        """The model's latency as kernel calls (the build's best kernel-by-kernel program) and
        as its fastest one-call plan (`ONE_CALL_PLANS`), from the build's timings of the plans
        it weighed scaled to `measured_us`; None where that plan was not timed. Samples from
        before `plan_us` was kept: the chosen plan's latency stands for the kernel calls (the
        whole-model regressor learns both plans as one), and none for one call."""
        if not self.plan_us:
            return self.measured_us, None
        calls = self.plan_us.get(KERNEL_CALLS)
        one_calls = [self.plan_us[p] for p in ONE_CALL_PLANS if p in self.plan_us]
        if self.plan in ONE_CALL_PLANS:
            chosen = self.plan_us.get(self.plan)
            return (self.measured_us * calls / chosen if calls and chosen else None,
                    self.measured_us)
        return (self.measured_us,
                self.measured_us * min(one_calls) / calls if one_calls and calls else None)

    @property
    def kernel_us(self) -> list[float]:
        return [float(d["us"]) for d in self.kernels]

    @property
    def space(self) -> str:
        return str(self.arch["space"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Sample:
        doc = json.loads(text)
        if doc.get("schema_version") != SAMPLE_SCHEMA_VERSION:
            raise ValueError(f"profile sample schema {doc.get('schema_version')} is not "
                             f"supported (expected {SAMPLE_SCHEMA_VERSION})")
        return Sample(**doc)


def cpu_kind() -> str:
    """This machine's CPU kind, as data files are named: LLVM's core name and the core count
    (`znver5-2c`, `cascadelake-2c`)."""
    from hwaware.target import get_target

    host = get_target("host")
    return f"{host.tvm.get('mcpu', platform.machine())}-{host.cores}c"


def data_file(data_dir: Path = DATA_DIR) -> Path:
    return data_dir / f"{cpu_kind()}.jsonl"


def read_samples(paths: Iterable[Path], device_key: str | None = None) -> list[Sample]:
    """Every sample in the files (of one device, with `device_key`); a line that does not
    parse is skipped with a warning naming the file and line."""
    samples = []
    for path in paths:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                sample = Sample.from_json(line)
            except (ValueError, TypeError, KeyError) as err:
                warnings.warn(f"hwaware: {path}:{number}: skipped ({err})", stacklevel=2)
                continue
            if device_key is None or sample.device["key"] == device_key:
                samples.append(sample)
    return samples


def all_data_files(data_dir: Path = DATA_DIR) -> list[Path]:
    return sorted(data_dir.glob("*.jsonl"))


# ------------------------------------------------------------------------------ measuring
@contextmanager
def threads(n: int) -> Iterator[None]:
    """PyTorch's (and so the shared kernel team's, see `hwaware.threads`) thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def measure(arch: Measurable, target: Any, device: Device, db: Any, split: str = "train",
            repeats: int = 60) -> Sample:
    """Compile `arch` for `target` and time it (see module docstring)."""
    from hwaware.build import build
    from hwaware.capture import capture
    from hwaware.decompose import decomposition_of, rewrite_and_partition
    from hwaware.runner import time_in_blocks
    from hwaware.runtime import BuildInfo

    model, inputs = arch.build()
    with threads(device.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before, reference = wait_until_calm(device.threads)
        start = time.perf_counter()
        captured = capture(model, inputs)
        rewrites, part = rewrite_and_partition(captured)
        decomposition = decomposition_of(part)
        info = BuildInfo.for_target(target, part.host_ops, rewrites)
        compiled = build(part, target, db, captured.example_inputs, info)
        compile_s = time.perf_counter() - start
        flat = list(captured.example_inputs)
        run_compiled, run_eager = partial(compiled.run_flat, flat), partial(model, *inputs)
        first, eager = time_in_blocks([run_compiled, run_eager], repeats,
                                      quantile=TIMING_QUANTILE)
        timed = compiled.kernel_plan or compiled  # one TVM call: its kernels built one by one
        built_us, host_us = _time_kernels(timed, flat, repeats)
        (second,) = time_in_blocks([run_compiled], repeats, quantile=TIMING_QUANTILE)
        after, _ = machine_slowdown(device.threads)
    labels, unattributed = attribute(part.kernel_nodes, timed.info.kernel_nodes, built_us)
    kernels = [{**asdict(r), "us": labels.get(name, 0.0)}
               for name, r in zip(_decomposed_names(part), decomposition.kernels, strict=True)]
    kernels += [{**asdict(r), "us": us} for r, us in zip(decomposition.host_records, host_us,
                                                         strict=False)]
    unattributed += sum(host_us[len(decomposition.host_records):])  # constant outputs' copies
    return Sample(arch.id, arch.to_json(), split, device.to_json(), cpu_kind(), kernels,
                  decomposition.host_steps, first, second, eager, unattributed, compile_s,
                  versions(), plan=compiled.info.plan, reference_us=reference["compute"],
                  slowdown=max(before, after), gather_reference_us=reference["gather"],
                  plan_us=dict(compiled.info.plan_us))


@functools.cache
def _reference_work(workload: str) -> Callable[[], None]:
    """A reference workload (`REFERENCE_WORKLOADS`) as a call: "compute", a 192x192 matmul
    and a 3x3 convolution of 32 channels at 28x28; "gather", rows of a 4096x64 table gathered
    along 16384 edges and scatter-added back (a GNN layer's message passing)."""
    generator = torch.Generator().manual_seed(0)
    if workload == "compute":
        a = torch.randn(192, 192, generator=generator)
        x, w = torch.randn(1, 32, 28, 28, generator=generator), torch.randn(32, 32, 3, 3)

        def compute() -> None:
            with torch.no_grad():
                torch.mm(a, a)
                torch.nn.functional.conv2d(x, w, padding=1)
        return compute
    table, out = torch.randn(4096, 64, generator=generator), torch.zeros(4096, 64)
    edges = torch.randint(0, 4096, (16384,), generator=generator)

    def gather() -> None:
        out.zero_()
        out.index_add_(0, edges, table.index_select(0, edges))
    return gather


def reference_us(workload: str = "compute") -> float:
    """A reference workload's microseconds (lower quartile) at PyTorch's current thread
    count."""
    from hwaware.runner import time_in_blocks

    (us,) = time_in_blocks([_reference_work(workload)], 40, quantile=TIMING_QUANTILE)
    return us


def machine_slowdown(n_threads: int) -> tuple[float, dict[str, float]]:
    """The worst of the reference workloads' times now over the fastest seen at `n_threads`
    (>= 1), and those times. With more than one thread, also the gather reference's time over
    its time on one thread: threads that slow each other down are the slow placement, seen
    without any history (a new device's first models; 1300 vs 390 us there, 265 vs 390 us in
    the fast state)."""
    times = {w: reference_us(w) for w in REFERENCE_WORKLOADS}
    slowdown = max(us / _note_reference(n_threads, w, us) for w, us in times.items())
    if n_threads > 1:
        with threads(1):
            slowdown = max(slowdown, times["gather"] / reference_us("gather"))
    return slowdown, times


def _note_reference(n_threads: int, workload: str, us: float) -> float:
    """The fastest time of a reference workload at `n_threads`, `us` included."""
    key = (n_threads, workload)
    fastest = _FASTEST_REFERENCE[key] = min(us, _FASTEST_REFERENCE.get(key, us))
    return fastest


def wait_until_calm(n_threads: int) -> tuple[float, dict[str, float]]:
    """The slowdown and reference times once the machine runs within `CALM_TOLERANCE` of its
    fastest (or after `CALM_TRIES` tries `CALM_WAIT_S` apart)."""
    slowdown, times = machine_slowdown(n_threads)
    for _ in range(CALM_TRIES - 1):
        if slowdown <= CALM_TOLERANCE:
            break
        log.info("profile: the machine runs %.2fx slower than its fastest; waiting", slowdown)
        time.sleep(CALM_WAIT_S)
        slowdown, times = machine_slowdown(n_threads)
    return slowdown, times


def _decomposed_names(part: Any) -> list[str]:
    """The kernel names of `part` in the order `decomposition_of` lists their records."""
    return [n for n in part.program.kernels if n in part.kernel_graphs]


def _time_kernels(compiled: Any, flat: list[Any], repeats: int
                  ) -> tuple[dict[str, float], list[float]]:
    """Each kernel of the built program (TVM or PyTorch, as built) and each of its host op
    steps, timed where it runs: inside whole runs of the program on `flat`
    (`CompiledModel.step_times_us`); the host op steps in program order (the decomposition's
    host records, then any copies of constant outputs)."""
    from hwaware.program import KernelStep

    steps = compiled.program.steps
    times = compiled.step_times_us(flat, repeats, TIMING_QUANTILE)
    kernels: dict[str, float] = {}
    hosts: list[float] = []
    for step, us in zip(steps, times, strict=True):
        if isinstance(step, KernelStep):
            kernels[step.kernel] = kernels.get(step.kernel, 0.0) + us
        else:
            hosts.append(us)
    return kernels, hosts


def attribute(decomposed: dict[str, tuple[str, ...]], built: dict[str, list[str]],
              built_us: dict[str, float]) -> tuple[dict[str, float], float]:
    """Charge each built kernel's time to the decomposed kernels whose ops it runs, in
    proportion to how many of its ops each holds; time of ops no decomposed kernel holds (a
    dissolved fused kernel's ops merged with a neighbour run) is returned apart."""
    owner = {node: name for name, nodes in decomposed.items() for node in nodes}
    labels: dict[str, float] = dict.fromkeys(decomposed, 0.0)
    unattributed = 0.0
    for name, us in built_us.items():
        owners = [owner[n] for n in built.get(name, ()) if n in owner]
        if not owners:
            unattributed += us
            continue
        for o in owners:
            labels[o] += us / len(owners)
    return labels, unattributed


def versions() -> dict[str, str]:
    """The versions a measurement depends on (read from the installed packages: no TVM
    import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tvm = version("apache-tvm")
    except PackageNotFoundError:
        tvm = "none"
    return {"torch": torch.__version__, "tvm": tvm}


# ------------------------------------------------------------------------------ sessions
def profile(archs: Sequence[Measurable], target: Any, device: Device, db: Any, out: Path,
            split: str = "train", repeats: int = 60, show_progress: bool = True) -> list[Sample]:
    """Measure every architecture not yet in `out` for this device; append each sample to
    `out` and the database as soon as it is measured. Returns the new samples."""
    known = read_samples([out], device.key)
    done = {s.id for s in known}
    _remember_fastest_reference(known, device.threads)
    todo = [a for a in archs if a.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    new = []
    for arch in _progress(todo, show_progress, f"profile {device.key}"):
        try:
            sample = measure(arch, target, device, db, split, repeats)
            if not sample.timed_calm:  # once more; the calmer of the two is kept
                again = measure(arch, target, device, db, split, repeats)
                sample = min(sample, again, key=lambda s: s.slowdown)
        except Exception as err:  # noqa: BLE001 - one architecture must not stop a session
            log.warning("profile: %s failed (%s: %s); skipped", arch.id, type(err).__name__,
                        err)
            continue
        with out.open("a") as f:
            f.write(sample.to_json() + "\n")
        if db is not None:
            store(db, sample)
        new.append(sample)
    return new


def calm_samples(samples: Sequence[Sample]) -> list[Sample]:
    """The samples timed while the machine ran at its usual speed: `Sample.timed_calm`, and
    their references before the timing within `CALM_TOLERANCE` of the fastest of any sample
    of their device (judged again with the whole data set: a profiling process that started
    on a slow machine judged its first models by their own slow references)."""
    fastest: dict[tuple[str, str], float] = {}
    for s in samples:
        for workload, us in _references(s).items():
            key = (s.device["key"], workload)
            fastest[key] = min(us, fastest.get(key, us))
    return [s for s in samples if s.timed_calm and all(
        us <= CALM_TOLERANCE * fastest[(s.device["key"], w)] for w, us in _references(s).items())]


def _references(sample: Sample) -> dict[str, float]:
    """The reference times taken before a sample's timing (those it has)."""
    taken = {"compute": sample.reference_us, "gather": sample.gather_reference_us}
    return {w: us for w, us in taken.items() if us > 0}


def _remember_fastest_reference(samples: Sequence[Sample], n_threads: int) -> None:
    """The fastest references of earlier samples of this device (from other processes): a
    process that starts on a slow machine is then still judged by the machine's usual
    speed."""
    for s in samples:
        for workload, us in _references(s).items():
            _note_reference(n_threads, workload, us)


def store(db: Any, sample: Sample) -> None:
    """A sample's kernels, kernel times and whole-model time in the tuning database."""
    from hwaware.db import ModelMeasurement

    key = sample.device["key"]
    for record, us in zip(sample.records, sample.kernel_us, strict=True):
        db.commit_kernel(record)
        db.commit_kernel_measurement(record.signature, key, AS_BUILT, us, record.family)
    db.commit_model_measurement(ModelMeasurement(
        model=sample.id, target_key=key, impl="hwaware", latency_us=sample.measured_us,
        spread_us=abs(sample.latency_us - sample.latency2_us),
        kernels=[r.signature for r in sample.records], device=socket.gethostname()))


def _progress(items: list[Measurable], show: bool, what: str) -> Iterable[Measurable]:
    if not show:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=what, unit="model")
