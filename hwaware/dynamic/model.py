"""Dynamic networks, step 3 (run): the host program driving compiled regions.

`DynamicModel` executes the generated host program; each `region_k(...)` call goes to a
`RegionRunner`, which picks the compiled static graph built for those input shapes (a
*specialization*). Compile time explores the program (`explore`): it runs every region in eager
PyTorch on the example inputs and, branch site by branch site, forces the direction not yet
taken, so every region on every path gets real example inputs and is compiled before the first
call. A region met later with shapes never seen is compiled then (while the user's module is at
hand) or refused with a clear error (after `load`).

Saved as a folder: `host_program.json` (the host program's declarative form, `host.py`: what
load runs, after checking it), `host_program.py` (the same as Python, for people; never
executed), `regions/region_k.py` (the Python each region was captured from, for people),
`regions/region_k/<i>/` (one saved `CompiledModel` per specialization), `dynamic.json` (calling
conventions and statistics) and `manifest.json` (a SHA-256 of every file, checked first by
`hwaware.load`).
Output containers a region returns load as in `hwaware.load` (`outputs.py`), with one warning
for the whole model when some come back as dicts. A region that runs in eager PyTorch (numpy,
a forward that cannot be rewritten) is saved as its source (for people), with the model's class
and a fingerprint of its weights and attributes: `hwaware.load(path, model=m)` makes its Python
again from `m`'s own forward and binds it to `m`, and refuses an `m` of another class, with
other weights, or whose forward no longer gives that source; without `model=` load names the
regions and the argument.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hwaware import manifest, outputs
from hwaware.dynamic import host
from hwaware.program import torch_dtype
from hwaware.runtime import CompiledModel, InputMismatchError, load_compiled

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_DECISIONS_PER_RUN = 10_000
Key = tuple[Any, ...]


class DynamicCaptureError(RuntimeError):
    """strict=True and a region could not be compiled as a static graph."""


class EagerRegionWarning(UserWarning):
    """A region runs in eager PyTorch (named by file and line in the user's source)."""


@dataclass
class RegionInfo:
    """What is kept of a region: its calling convention and where it comes from."""

    name: str
    inputs: list[str]
    outputs: list[str]
    where: str
    source: str
    eager_reason: str | None = None
    arithmetic_inputs: list[str] = field(default_factory=list)
    globals_module: str = ""  # the module whose globals the region's source runs in


# ------------------------------------------------------------------ specializations
def specialization_key(info: RegionInfo, args: Sequence[Any]) -> Key:
    """Region inputs -> the key of the static graph that serves them. Each input's entry:
    ("t", shape, dtype) a tensor (a graph input); ("s", type) an int/float used only in
    arithmetic (a 0-d tensor graph input); ("v", value) another scalar (a constant of the
    graph); ("p", structure) a list/tuple/dict (its tensors are graph inputs, the rest is in
    the structure string); ("o", identity) a submodule, function, dtype or device (a constant);
    ("x", type) anything else: no static graph can take it without baking in its contents."""
    return tuple(_arg_key(a, name in info.arithmetic_inputs)
                 for name, a in zip(info.inputs, args, strict=True))


def _arg_key(a: Any, arithmetic: bool = False) -> tuple[Any, ...]:
    if isinstance(a, torch.Tensor):
        return ("t", tuple(a.shape), a.dtype)
    if arithmetic and type(a) in (int, float):
        return ("s", type(a).__name__)
    if isinstance(a, (bool, int, float, str, type(None))):
        return ("v", a)
    if type(a) in (list, tuple, dict):
        leaves, spec = pytree.tree_flatten(a)
        keys = [_arg_key(x) for x in leaves]
        if any(k[0] == "x" for k in keys):
            return ("x", type(a).__name__)
        return ("p", f"{spec} {', '.join(_describe(k) for k in keys)}")
    if callable(a):  # a submodule or a function: the graph calls that very object
        return ("o", f"{type(a).__name__}@{id(a):x}")
    if isinstance(a, (torch.dtype, torch.device, torch.Size, slice, type(Ellipsis))):
        return ("o", repr(a))
    return ("x", type(a).__name__)


def unspecializable(info: RegionInfo, key: Key) -> str | None:
    """Why no static graph can serve `key` (an input no key can describe), or None."""
    bad = [f"`{n}` ({k[1]})" for n, k in zip(info.inputs, key, strict=True) if k[0] == "x"]
    return f"takes Python objects a static graph would bake in: {', '.join(bad)}" if bad \
        else None


def graph_inputs(key: Key, args: Sequence[Any]) -> list[torch.Tensor]:
    """The tensors a region's static graph takes: tensor inputs, the tensors inside list /
    tuple / dict inputs, and arithmetic scalars as 0-d tensors (so one graph serves every value
    of a step counter)."""
    out = []
    for k, a in zip(key, args, strict=True):
        if k[0] == "t":
            out.append(a)
        elif k[0] == "s":
            out.append(torch.tensor(a, dtype=torch.float32 if k[1] == "float" else torch.int64))
        elif k[0] == "p":
            out.extend(x for x in pytree.tree_leaves(a) if isinstance(x, torch.Tensor))
    return out


def _refill(container: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """`container` with its tensors replaced, in order, by `tensors`."""
    leaves, spec = pytree.tree_flatten(container)
    return pytree.tree_unflatten([next(tensors) if isinstance(x, torch.Tensor) else x
                                  for x in leaves], spec)


def _snapshot(a: Any) -> Any:
    """A copy of a region input that later host work cannot change (lists get appended to)."""
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, a)


class RegionModule(torch.nn.Module):
    """One region specialization as a module of its graph inputs (what gets captured)."""

    def __init__(self, root: torch.nn.Module, fn: Callable[..., Any], key: Key,
                 args: Sequence[Any]):
        super().__init__()
        self.root = root
        self.fn = fn
        self.key = key
        self.fixed = [None if k[0] in ("t", "s") else a for k, a in zip(key, args, strict=True)]
        # a list/tuple/dict input keeps its structure here; its tensors come in as inputs

    def forward(self, *tensors: torch.Tensor) -> Any:
        it = iter(tensors)
        args = [next(it) if k[0] in ("t", "s") else _refill(f, it) if k[0] == "p" else f
                for k, f in zip(self.key, self.fixed, strict=True)]
        return self.fn(self.root, *args)


class RegionRunner:
    """Calls one region: its compiled specialization for these inputs, or eager PyTorch."""

    def __init__(self, info: RegionInfo, fn: Callable[..., Any] | None,
                 root: torch.nn.Module | None):
        self.info = info
        self.fn = fn          # the region's Python (None after load)
        self.root = root
        self.compiled: dict[Key, CompiledModel] = {}
        self.eager_reason = info.eager_reason
        self.calls = 0
        self.recorded: dict[Key, list[Any]] = {}  # exploration: first inputs per key
        self.forced_only: set[Key] = set()  # met only on forced paths (maybe infeasible)
        self.recording = False
        self.compile_new: Callable[[RegionRunner, Key, list[Any]], None] | None = None
        self.flat_outputs: set[Key] = set()  # specializations returning a flat tuple
        self.checking = False  # verification: check each compiled call against eager

    def add(self, key: Key, cm: CompiledModel) -> None:
        """Serve inputs matching `key` with `cm`."""
        self.compiled[key] = cm
        flat = pytree.tree_structure(tuple(range(len(self.info.outputs))))
        if cm.out_spec == flat:
            self.flat_outputs.add(key)

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        self.calls += 1
        if self.recording or self.eager_reason is not None:
            return self.eager(args)
        key = specialization_key(self.info, args)
        cm = self.compiled.get(key)
        if cm is None:
            self.specialize(key, args)  # compiles, or marks the region eager, or raises
            if self.eager_reason is not None:
                return self.eager(args)
            cm = self.compiled[key]
        out = cm.run_flat(graph_inputs(key, args))
        result = tuple(out) if key in self.flat_outputs else \
            pytree.tree_unflatten(out, cm.out_spec)
        if self.checking:
            self._check(cm, key, args, result)
        return result  # type: ignore[no-any-return]

    def _check(self, cm: CompiledModel, key: Key, args: Sequence[Any], result: Any) -> None:
        """Verification: this call's compiled result against the region's eager Python."""
        from hwaware.verify import VerificationError, difference, differing_kernel

        why = difference(result, self.eager(args)) if self.fn is not None else None
        if why:
            kernel = differing_kernel(cm, graph_inputs(key, args))
            raise VerificationError(f"first differing region: {self.info.name} "
                                    f"({self.info.where}), against its eager Python: {why}"
                                    f"{'; ' + kernel if kernel else ''}")

    def eager(self, args: Sequence[Any]) -> tuple[Any, ...]:
        if self.fn is None or self.root is None:
            raise RuntimeError(f"{self.info.name} ({self.info.where}) runs in eager PyTorch "
                               "and needs the original module")
        if not self.recording:
            return self.fn(self.root, *args)  # type: ignore[no-any-return]
        snapshot = [_snapshot(a) for a in args]
        out = self.fn(self.root, *args)
        self.recorded.setdefault(specialization_key(self.info, args), snapshot)  # it ran
        return out  # type: ignore[no-any-return]

    def specialize(self, key: Key, args: Sequence[Any]) -> None:
        reason = unspecializable(self.info, key)
        if reason is not None and self.fn is not None:
            self.mark_eager(reason, strict=False)
            return
        shapes = ", ".join(f"{n}={_describe(k)}" for n, k in zip(self.info.inputs, key,
                                                                   strict=True))
        if self.compile_new is None or self.fn is None:
            raise InputMismatchError(
                f"{self.info.name} ({self.info.where}) was not compiled for inputs {shapes}; "
                "compile the model with example inputs that reach it with these shapes")
        log.warning("compiling %s (%s) for new inputs %s", self.info.name, self.info.where,
                    shapes)
        self.forced_only.discard(key)  # met in a real call now
        self.compile_new(self, key, list(args))

    def module_for(self, key: Key, args: Sequence[Any]) -> RegionModule:
        assert self.fn is not None and self.root is not None
        return RegionModule(self.root, self.fn, key, args)

    def mark_eager(self, reason: str, strict: bool, where: str = "") -> None:
        """Run this region in eager PyTorch from now on, with one warning naming `where` (the
        line at fault, when known) or the region's first line; strict=True raises instead."""
        region = f"{self.info.name}" if where in ("", self.info.where) else \
            f"{self.info.name}, from {self.info.where}"
        message = f"{where or self.info.where}: {reason}; this region ({region}) runs in " \
                  "eager PyTorch"
        if strict:
            raise DynamicCaptureError(message)
        if self.eager_reason is None:
            warnings.warn(message, EagerRegionWarning, stacklevel=3)
        self.eager_reason = reason


def _describe(k: tuple[Any, ...]) -> str:
    if k[0] == "t":
        return f"{_dtype_name(k[2])}{list(k[1])}"
    return f"{k[1]!r}" if k[0] == "v" else str(k[1]) if k[0] == "p" else f"<{k[1]}>"


# ---------------------------------------------------------------------- exploration
class _Runaway(Exception):
    pass


class Explorer:
    """Decides branches while exploring. A run follows a policy: for each site it names, the
    direction to take the first time the site is reached; natural decisions elsewhere. To take
    an untaken direction at a site, replay the policy of the run that first reached the site."""

    def __init__(self) -> None:
        self.covered: set[tuple[int, bool]] = set()
        self.reached_with: dict[int, dict[int, bool]] = {}
        self.policy: dict[int, bool] = {}
        self.applied: set[int] = set()
        self.decisions = 0

    def start(self, policy: dict[int, bool]) -> None:
        self.policy, self.applied, self.decisions = policy, set(), 0

    def decide(self, site: int, value: Any) -> bool:
        self.decisions += 1
        if self.decisions > MAX_DECISIONS_PER_RUN:
            raise _Runaway
        d = bool(value)
        if site in self.policy and site not in self.applied:
            d = self.policy[site]
            self.applied.add(site)
        self.reached_with.setdefault(site, dict(self.policy))
        self.covered.add((site, d))
        return d

    def next_policy(self, tried: set[tuple[int, bool]]) -> dict[int, bool] | None:
        for site in sorted(self.reached_with):
            for d in (True, False):
                if (site, d) not in self.covered and (site, d) not in tried:
                    tried.add((site, d))
                    return {**self.reached_with[site], site: d}
        return None


@dataclass
class ExploreStats:
    """What exploring found: runs, branch directions covered, per-inference round trips."""

    runs: int = 0
    failed_runs: int = 0
    sites: int = 0
    directions_covered: int = 0
    region_calls: int = 0      # on the example inputs, one inference
    decisions: int = 0         # host decisions (device -> host reads) on the example inputs


def explore(instrumented_source: str, sites: int, runners: dict[str, RegionRunner],
            example_inputs: Sequence[Any]) -> tuple[ExploreStats, Any]:
    """Run the host program in eager until every reachable branch direction was taken once,
    recording the inputs of every region specialization met on the way. Returns the
    statistics and the output of the natural run (no direction forced)."""
    explorer = Explorer()
    forward = host.make_forward(instrumented_source, "<hwaware host program>",
                                host.namespace(runners, explorer.decide))
    stats = ExploreStats(sites=sites)
    for r in runners.values():
        r.recording, r.calls = True, 0
    tried: set[tuple[int, bool]] = set()
    try:
        with torch.no_grad():
            output = forward(*example_inputs)  # natural run: no direction forced
        stats.region_calls = sum(r.calls for r in runners.values())
        stats.decisions = explorer.decisions
        stats.runs = 1
        natural = {name: set(r.recorded) for name, r in runners.items()}
        while stats.runs < 4 * sites + 4:
            policy = explorer.next_policy(tried)
            if policy is None:
                break
            explorer.start(policy)
            stats.runs += 1
            _forced_run(forward, example_inputs, runners, stats)
    finally:
        for r in runners.values():
            r.recording = False
    for name, r in runners.items():
        r.forced_only = set(r.recorded) - natural[name]
    stats.directions_covered = len(explorer.covered)
    return stats, output


def _forced_run(forward: Callable[..., Any], example_inputs: Sequence[Any],
                runners: dict[str, RegionRunner], stats: ExploreStats) -> None:
    """One run with forced directions; a run that fails was infeasible, and the
    specializations first met on it are forgotten (their inputs may be nonsense)."""
    before = {name: set(r.recorded) for name, r in runners.items()}
    try:
        with torch.no_grad():
            forward(*example_inputs)
    except Exception as err:  # noqa: BLE001 - a forced path may be infeasible
        stats.failed_runs += 1
        log.debug("forced run failed: %s", err)
        for name, r in runners.items():
            for key in set(r.recorded) - before[name]:
                del r.recorded[key]


def same_outputs(got: Any, expected: Any) -> bool:
    """Same nesting, same non-tensor values, tensors of the same shape and dtype and close
    values (the same eager ops, grouped into regions)."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    leaves, spec = pytree.tree_flatten(expected)
    if got_spec != spec:
        return False
    for g, e in zip(got_leaves, leaves, strict=True):
        if isinstance(e, torch.Tensor):
            if not (isinstance(g, torch.Tensor) and g.shape == e.shape and g.dtype == e.dtype
                    and torch.allclose(g, e, rtol=1e-4, atol=1e-5, equal_nan=True)):
                return False
        elif not _equal(g, e):
            return False
    return True


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values with no plain equality are not known equal
        return False


# ----------------------------------------------------------------------------- model
@dataclass
class DynamicInfo:
    """What the compiler decided and measured; shown by `DynamicModel.report()`."""

    model_name: str
    target_name: str
    params: list[str]
    explore: ExploreStats
    dynamo_graphs: int | None = None
    dynamo_breaks: int | None = None
    defaults: int = 0  # how many of the last params have a default
    model_class: str = ""  # module.QualName of the compiled model (eager regions need it)
    fingerprint: str = ""  # of its weights and plain attributes (`model_fingerprint`)


class DynamicModel:
    """A compiled dynamic network: call it like the original module."""

    def __init__(self, host_program: str | ast.Module, runners: dict[str, RegionRunner],
                 info: DynamicInfo):
        """`host_program`: the source `split` generated, or the checked tree
        `host.from_json` read from a saved model."""
        self.host_source = host_program if isinstance(host_program, str) else \
            ast.unparse(host_program)
        self.runners = runners
        self.info = info
        self._forward = host.make_forward(host_program, "<hwaware host program>",
                                          host.namespace(runners, None))
        self.verifier: Any = None  # hwaware.verify.Verifier while calls are being verified

    def __call__(self, *args: Any) -> Any:
        if self.verifier is not None:
            return self.verifier.check(self._call, args, lambda: self._differing_region(args))
        return self._call(*args)

    def _differing_region(self, args: tuple[Any, ...]) -> str | None:
        """Run once more with every region checked against its eager Python: the first region
        (and kernel) that differs, or None."""
        from hwaware.verify import VerificationError

        for runner in self.runners.values():
            runner.checking = True
        try:
            self._call(*args)
        except VerificationError as err:
            return str(err)
        finally:
            for runner in self.runners.values():
                runner.checking = False
        return None

    def _call(self, *args: Any) -> Any:
        params = self.info.params
        if not len(params) - self.info.defaults <= len(args) <= len(params):
            raise InputMismatchError(f"expected {len(params)} input(s) "
                                     f"({', '.join(params)}), got {len(args)}")
        with torch.no_grad():
            return self._forward(*args)

    def redecide(self, *example_inputs: Any, repeats: int = 30) -> DynamicModel:
        """`CompiledModel.redecide` for every compiled specialization the example inputs run
        (on the inputs it is called with): the TVM-vs-PyTorch choices timed again on this
        machine. Specializations these inputs do not reach keep their choices; give inputs
        that take every path to re-time them all. Returns the model itself."""
        seen: dict[int, tuple[CompiledModel, list[Any]]] = {}
        programs = [cm for runner in self.runners.values() for cm in runner.compiled.values()]
        for cm in programs:
            cm.run_flat = _first_inputs_kept(cm, seen)  # type: ignore[method-assign, assignment]
        try:
            self(*example_inputs)
        finally:
            for cm in programs:
                del cm.run_flat  # back to the class's method
        for cm, flat in seen.values():
            if cm.executable is not None:
                cm.redecide(*flat, repeats=repeats)
        return self

    # ----------------------------------------------------------------- report
    def report(self) -> str:
        """Regions, specializations, host round trips, next to what Dynamo makes of it."""
        r = self.runners.values()
        n_specs = sum(len(x.compiled) for x in r)
        eager = [x for x in r if x.eager_reason is not None]
        s = self.info.explore
        lines = [
            f"dynamic model {self.info.model_name} on target {self.info.target_name}: host "
            f"program + {len(self.runners)} static subgraphs (regions), {n_specs} compiled "
            f"specializations, {len(eager)} eager regions",
            f"per inference on the example inputs: {s.region_calls} subgraph calls, "
            f"{s.decisions} host decisions (round trips: {s.region_calls + s.decisions})",
            f"exploration: {s.runs} runs ({s.failed_runs} infeasible), {s.directions_covered} of "
            f"{2 * s.sites} branch directions taken",
        ]
        if self.info.dynamo_graphs is not None:
            lines.append(f"torch.compile (Dynamo) on the same inputs: {self.info.dynamo_graphs} "
                         f"graphs, {self.info.dynamo_breaks} graph breaks")
        lines.append(f"{'region':<11}{'where':<40}{'in':>4}{'out':>5}{'specs':>7}"
                     f"{'tvm kernels':>13}  runs")
        for x in r:
            kernels = sum(sum(k.impl == "tvm" for k in cm.program.kernels.values())
                          for cm in x.compiled.values())
            runs = "eager: " + x.eager_reason if x.eager_reason else "compiled"
            lines.append(f"{x.info.name:<11}{_short(x.info.where):<40}{len(x.info.inputs):>4}"
                         f"{len(x.info.outputs):>5}{len(x.compiled):>7}{kernels:>13}  {runs}")
        return "\n".join(lines)

    # -------------------------------------------------------------- save/load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model to `directory` (its own folder: `hwaware.load` refuses files that
        the save did not write), with `manifest.json` over every file. Regions that run in
        eager PyTorch are saved as their source; `load` rebinds them to the model passed as
        `model=`. Atomic: written beside it and renamed into place
        (`manifest.save_atomically`), so a save killed part-way leaves `directory` as it was."""
        return manifest.save_atomically(directory, "dynamic", FORMAT_VERSION, self._write_files)

    def _write_files(self, out: Path) -> list[str]:
        """Every file of the save into the new, empty folder `out`; the names written."""
        (out / "regions").mkdir()
        files = self._write_host(out)
        regions = [_write_region(out, x, files) for x in self.runners.values()]
        doc = {"format_version": FORMAT_VERSION, "info": asdict(self.info), "regions": regions}
        (out / "dynamic.json").write_text(json.dumps(doc, indent=1))
        return [*files, "dynamic.json"]

    def _write_host(self, out: Path) -> list[str]:
        """The host program: its declarative form (what `load` reads) and, for people, as
        Python (never executed)."""
        doc = host.to_json(self.host_source, self.runners)
        (out / host.HOST_FILE).write_text(json.dumps(doc))
        (out / "host_program.py").write_text(
            f'"""Host program of {self.info.model_name}, generated by hwaware (for reading: '
            f'hwaware runs {host.HOST_FILE}).\n\nEach region_k(...) runs one compiled static '
            'subgraph (see regions/); everything else here\nis the control flow of the '
            'original forward."""\n\n' + self.host_source + "\n")
        return [host.HOST_FILE, "host_program.py"]

    @staticmethod
    def load(directory: Path, model: torch.nn.Module | None = None) -> DynamicModel:
        """Load a saved dynamic model from a folder `hwaware.load` has checked against its
        manifest; `model`: the module it was compiled from (its class, weights and
        attributes), needed where regions run in eager PyTorch. The host program is rebuilt
        from its declarative form (`host.from_json`, checked) before any kernel library is
        loaded."""
        doc = json.loads((directory / "dynamic.json").read_text())
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{directory}: dynamic model format "
                             f"{doc.get('format_version')} is not supported")
        host_file = directory / host.HOST_FILE
        tree = host.from_json(json.loads(host_file.read_text()),
                              [r["name"] for r in doc["regions"]], str(host_file))
        runners: dict[str, RegionRunner] = {}
        missing: dict[str, str] = {}  # output container types returned as dicts: one warning
        for r in doc["regions"]:
            specs = r.pop("specializations")
            runner = RegionRunner(RegionInfo(**r), None, None)
            for s in specs:
                cm = load_compiled(_region_dir(directory, s["dir"]), missing)
                runner.add(_key_from_json(s["key"]), cm)
            runners[runner.info.name] = runner
        outputs.warn_dict_fallback(missing)
        info_doc = doc["info"]
        info_doc["explore"] = ExploreStats(**info_doc["explore"])
        info = DynamicInfo(**info_doc)
        bind_eager_regions(directory, runners, info, model)
        return DynamicModel(tree, runners, info)


def _write_region(out: Path, runner: RegionRunner, files: list[str]) -> dict[str, Any]:
    """Write one region (its source, for people, and each specialization as a compiled model's
    files); its entry of `dynamic.json`. Appends the files written to `files`."""
    name = runner.info.name
    (out / "regions" / f"{name}.py").write_text(runner.info.source + "\n")
    files.append(f"regions/{name}.py")
    specs = []
    for i, (key, cm) in enumerate(runner.compiled.items()):
        sub = out / "regions" / name / str(i)
        sub.mkdir(parents=True)
        files.extend(f"regions/{name}/{i}/{f}" for f in cm.write_files(sub))
        specs.append({"key": _key_to_json(key), "dir": f"{name}/{i}"})
    return {**asdict(runner.info), "eager_reason": runner.eager_reason, "specializations": specs}


def _region_dir(directory: Path, name: str) -> Path:
    """`regions/<name>`, refusing a name that leads out of `regions/`."""
    regions = (directory / "regions").resolve()
    path = (regions / name).resolve()
    if not path.is_relative_to(regions):
        raise ValueError(f"{directory / 'dynamic.json'}: region folder {name!r} is outside "
                         "regions/")
    return path


# ------------------------------------------------------------------- eager regions
def class_name(model: torch.nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def identified(info: DynamicInfo, model: torch.nn.Module) -> DynamicInfo:
    """`info` with `model`'s class and fingerprint (what `load` checks a `model=` against)."""
    info.model_class, info.fingerprint = class_name(model), model_fingerprint(model)
    return info


def model_fingerprint(model: torch.nn.Module) -> str:
    """A digest of what a model computes with besides its code: every parameter and buffer
    (names, dtypes, shapes, values) and every plain attribute (numbers, strings) of every
    submodule (a step count, a scale)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=False).items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {list(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for prefix, module in sorted(model.named_modules()):
        plain = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and type(v) in (bool, int, float, str, type(None))}
        digest.update(f"{prefix} {type(module).__qualname__} {sorted(plain.items())}".encode())
    return digest.hexdigest()[:32]


def bind_eager_regions(directory: Path, runners: dict[str, RegionRunner], info: DynamicInfo,
                       model: torch.nn.Module | None) -> None:
    """Give the regions that run in eager PyTorch their Python back, made again from `model`'s
    forward (never from the saved source, which is for people) and called on `model`. Refuses
    a `model` of another class, or with other weights or attributes than the compiled one, or
    whose forward no longer gives the saved regions (never a wrong number)."""
    eager = [r for r in runners.values() if r.eager_reason is not None]
    if not eager:
        return
    names = ", ".join(f"{r.info.name} ({r.info.where})" for r in eager)
    if model is None:
        raise ValueError(f"{directory}: regions {names} run in eager PyTorch and need the "
                         f"original module: pass hwaware.load(path, model=m), m an instance of "
                         f"{info.model_class or 'the compiled class'} with the same weights")
    if class_name(model) != info.model_class or model_fingerprint(model) != info.fingerprint:
        raise ValueError(f"{directory}: model= is a {class_name(model)} whose weights or "
                         f"attributes differ from the {info.model_class} that was compiled; "
                         f"its eager regions ({names}) would compute other numbers than its "
                         "compiled ones")
    from hwaware.dynamic.driver import eager_region_functions  # it imports this module

    functions = eager_region_functions(model, [r.info for r in eager])
    for runner in eager:
        runner.fn, runner.root = functions[runner.info.name], model


def _short(where: str) -> str:
    path, _, line = where.rpartition(":")
    return f"{Path(path).name}:{line}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _key_to_json(key: Key) -> list[Any]:
    return [list(k) if k[0] != "t" else ["t", list(k[1]), _dtype_name(k[2])] for k in key]


def _key_from_json(doc: list[Any]) -> Key:
    return tuple(("t", tuple(k[1]), torch_dtype(k[2])) if k[0] == "t" else tuple(k)
                 for k in doc)


def _first_inputs_kept(cm: CompiledModel, seen: dict[int, tuple[CompiledModel, list[Any]]]
                       ) -> Callable[[list[Any]], list[Any]]:
    """`cm.run_flat` that records the flat inputs of its first call in `seen`."""
    run = type(cm).run_flat

    def run_flat(flat: list[Any]) -> list[Any]:
        seen.setdefault(id(cm), (cm, list(flat)))
        return run(cm, flat)

    return run_flat
