"""What hwaware did with a model, as the conformance harness reports it: the warnings it emitted
and the share of the model's FLOPs that ran on its TVM kernels (coverage).

Imports only torch (hwaware lazily), so the fresh process that checks `hwaware.load` uses it too.

FLOPs, both sides counted as 2 x multiply-accumulates of contractions (conv, matmul, attention),
element-wise work not counted:
- the model's: `torch.utils.flop_counter.FlopCounterMode` over one eager forward;
- on TVM: `KernelSpec.flops` summed over the kernels whose `impl` is "tvm", for every compiled
  program a forward calls, times the number of calls. A static `CompiledModel` is one program
  called once. A `DynamicModel` calls its regions' compiled specializations: the calls are
  counted on the path the input takes. Under `torch.compile`, the programs are those of the
  graphs Dynamo handed the backend (see `RecordingBackend`), counted per call as well.
hwaware counts a causal attention kernel's FLOPs as the half it computes, the flop counter the
whole: a causal model fully on TVM shows under 100%. An ONNX build is one TVM kernel whose FLOPs
TVM estimates (element-wise ops included), so its share is not comparable and not reported as
coverage.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


# ------------------------------------------------------------------------------ warnings
@dataclass
class Caught:
    """hwaware's warnings (Python warnings and WARNING log records of the `hwaware` logger)."""

    texts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Count, the first warning that matters, and the distinct texts (at most 8)."""
        return {"warnings": len(self.texts), "first_warning": first_warning(self.texts),
                "warning_texts": list(dict.fromkeys(self.texts))[:8]}


# warnings that say where things run, not that something went wrong
INFORMATIONAL = ("UnsupportedOpWarning", "have no tuned record")


def first_warning(texts: list[str]) -> str:
    """The first warning that is not informational (an op TVM cannot import, an untuned ONNX
    workload), else the first."""
    serious = [t for t in texts if not any(word in t for word in INFORMATIONAL)]
    return (serious or texts or [""])[0]


class _ListHandler(logging.Handler):
    def __init__(self, caught: Caught):
        super().__init__(logging.WARNING)
        self.caught = caught

    def emit(self, record: logging.LogRecord) -> None:
        self.caught.texts.append(_one_line(f"log {record.name}: {record.getMessage()}"))


@contextmanager
def hwaware_warnings() -> Iterator[Caught]:
    """Collect the warnings hwaware emits inside the block (other libraries' are ignored)."""
    caught = Caught()
    logger = logging.getLogger("hwaware")
    handler = _ListHandler(caught)
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            yield caught
        finally:
            logger.removeHandler(handler)
            for w in records:
                text = str(w.message)
                if "hwaware" in text or w.category.__module__.startswith("hwaware"):
                    caught.texts.append(_one_line(f"{w.category.__name__}: {text}"))


def _one_line(text: str, n: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 3] + "..."


# ---------------------------------------------------------------------------------- FLOPs
def eager_flops(model: Callable[..., Any], inputs: Sequence[Any]) -> int:
    """FLOPs of one eager forward, as PyTorch's flop counter counts them (plus the CPU
    flash-attention op, for which torch 2.13's counter has no formula and counts 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_flash: _attention_flops})
    with torch.no_grad(), _frozen(model), counter:
        model(*inputs)
    return int(counter.get_total_flops())


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """Parameters without requires_grad for a while: the flop counter's module tracker hooks
    the autograd graph of every tensor argument that requires grad, and fails on a parameter
    passed to a submodule under no_grad (DeBERTa's relative embeddings)."""
    params = [p for p in getattr(model, "parameters", list)() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _attention_flops(query: Sequence[int], key: Sequence[int], value: Sequence[int],
                     *args: Any, **kwargs: Any) -> int:
    """QK^T and PV of an attention, on the shapes of (batch, heads, seq, dim) operands (key
    and value may have fewer heads: grouped-query attention)."""
    *batch, s_q, d_qk = query
    s_k, d_v = key[-2], value[-1]
    return 2 * math.prod(batch) * s_q * s_k * (d_qk + d_v)


def program_tvm_flops(compiled: Any) -> int:
    """FLOPs of one call of a `CompiledModel` that run on TVM kernels."""
    return sum(k.flops for k in compiled.program.kernels.values() if k.impl == "tvm")


def compiled_programs(compiled: Any) -> list[Any]:
    """The `CompiledModel`s a compiled model is made of (its regions', for a DynamicModel)."""
    runners = getattr(compiled, "runners", None)
    if runners is None:
        return [compiled]
    return [cm for r in runners.values() for cm in r.compiled.values()]


def tvm_flops_on(compiled: Any, inputs: Sequence[Any]) -> int:
    """FLOPs on TVM kernels when `compiled` (CompiledModel or DynamicModel) runs `inputs`."""
    if getattr(compiled, "runners", None) is None:
        return program_tvm_flops(compiled)
    programs = compiled_programs(compiled)
    with _counting_calls(programs) as calls, torch.no_grad():
        compiled(*inputs)
    return sum(program_tvm_flops(cm) * calls[id(cm)] for cm in programs)


@contextmanager
def _counting_calls(programs: list[Any]) -> Iterator[Counter[int]]:
    """Count `run_flat` calls per CompiledModel (how a DynamicModel's regions run them)."""
    calls: Counter[int] = Counter()
    for cm in programs:
        cm.run_flat = _counted(cm.run_flat, calls, id(cm))
    try:
        yield calls
    finally:
        for cm in programs:
            del cm.run_flat  # back to the class's method


def _counted(fn: Callable[..., Any], calls: Counter[int], key: int) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        calls[key] += 1
        return fn(*args)
    return run


def coverage_pct(tvm: int, total: int) -> float | None:
    return None if total <= 0 else round(100.0 * tvm / total, 1)


# -------------------------------------------------------------------------- torch.compile
@dataclass
class GraphRecord:
    """One graph Dynamo handed the backend: what the backend returned, and its calls."""

    fn: Any
    calls: int = 0
    tvm_flops: int = 0  # summed over calls


class RecordingBackend:
    """The registered `hwaware` backend (looked up by name, as `torch.compile` does), with a
    record of every graph it compiled and of the TVM FLOPs each call of those graphs ran.
    Use as `torch.compile(model, backend=RecordingBackend(), options=...)`."""

    def __init__(self, name: str = "hwaware"):
        from torch._dynamo.backends.registry import lookup_backend

        self.inner = lookup_backend(name)
        self.__name__ = f"recording_{name}"
        self.graphs: list[GraphRecord] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any
                 ) -> Callable[..., Any]:
        record = GraphRecord(self.inner(gm, example_inputs, **kwargs))
        self.graphs.append(record)

        def run(*args: Any) -> Any:
            out = record.fn(*args)
            record.calls += 1
            record.tvm_flops += _graph_call_tvm_flops(record.fn, args)
            return out
        return run

    def reset_counts(self) -> None:
        for g in self.graphs:
            g.calls, g.tvm_flops = 0, 0

    def tvm_flops(self) -> int:
        return sum(g.tvm_flops for g in self.graphs)

    def fell_back(self) -> int:
        """Graphs that run eagerly: the backend returned no hwaware program for them."""
        return sum(not _is_hwaware(g.fn) for g in self.graphs)


def _is_hwaware(fn: Any) -> bool:
    """The backend compiled at least one variant of the graph with hwaware."""
    return bool(fn.compiled()) if hasattr(fn, "compiled_for") else hasattr(fn, "hwaware_compiled")


def _graph_call_tvm_flops(fn: Any, args: Sequence[Any]) -> int:
    """TVM FLOPs of one call of a backend-compiled graph (of the variant, for these sizes and
    parameters, that served the call)."""
    compiled = fn.compiled_for(args) if hasattr(fn, "compiled_for") else \
        getattr(fn, "hwaware_compiled", None)
    return 0 if compiled is None else program_tvm_flops(compiled)


def describe_error(err: BaseException) -> str:
    """`Type: first line of the message` (what the report groups failures by)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):  # TVM's errors end with their message
        lines = lines[::-1]
    return _one_line(f"{type(err).__name__}: {lines[0] if lines else ''}", 240)


def error_detail(err: BaseException) -> str:
    """Where the error was raised (the innermost hwaware frame, else the innermost frame) and
    its whole message, on one line: what a fixer needs beyond the first line."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if "/hwaware/" in f.filename] or frames
    where = "?"
    if ours:
        frame = ours[-1]
        where = f"{'/'.join(frame.filename.split('/')[-2:])}:{frame.lineno} {frame.name}"
    return _one_line(f"at {where}: {type(err).__name__}: {err}", 1500)
