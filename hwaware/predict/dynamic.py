"""Latency of dynamic networks (early exits, gates, adaptive loops): per path, expected, p95.

Goes in: a model whose forward branches or loops on tensor values, calibration inputs (what
the deployed model will see), and a `LatencyPredictor`. hwaware compiles such a model as a host
program around static regions (`hwaware.dynamic`); here the host program runs in eager PyTorch
on each calibration input, with every region call recorded (which region, for which input
shapes). Each region specialization met is decomposed and predicted like a static model; a
region that cannot be made static runs in eager PyTorch in a compiled model too, and its time
is measured here (source "eager", the one measurement this makes).

Comes out: a `DynamicEstimate`: each distinct path (the sequence of region calls) with its
predicted latency and its measured frequency over the calibration inputs, the expected latency
(frequency-weighted) and the 95th percentile over the calibration inputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hwaware.predict.predictor import LatencyEstimate, LatencyPredictor

Call = tuple[str, Any]  # (region name, specialization key)


@dataclass(frozen=True)
class PathEstimate:
    regions: tuple[str, ...]  # region names in call order
    ms: float
    frequency: float  # share of the calibration inputs that took this path


@dataclass(frozen=True)
class DynamicEstimate:
    model: str
    device: str
    paths: tuple[PathEstimate, ...]  # most frequent first
    expected_ms: float
    p95_ms: float
    regions: dict[str, float]  # "region [shapes]" -> predicted ms of one call

    @property
    def total_ms(self) -> float:
        """The expected latency (what a search loop compares)."""
        return self.expected_ms

    def table(self) -> str:
        lines = [f"{self.model} on {self.device}: expected {self.expected_ms:.3f} ms, "
                 f"p95 {self.p95_ms:.3f} ms over {len(self.paths)} paths",
                 f"{'frequency':>10}{'ms':>10}  path"]
        lines += [f"{p.frequency:>10.2%}{p.ms:>10.3f}  {' -> '.join(p.regions)}"
                  for p in self.paths]
        return "\n".join(lines)


def predict_dynamic(predictor: LatencyPredictor, model: torch.nn.Module,
                    example_inputs: Sequence[Any], calibration: Sequence[Any]
                    ) -> DynamicEstimate | LatencyEstimate:
    """See module docstring; a model without value-dependent control flow gets the static
    estimate (one path)."""
    from hwaware.dynamic.driver import plan_model

    if not calibration:
        raise ValueError("calibration needs at least one input (the inputs whose paths are "
                         "counted)")
    planned = plan_model(model)
    if planned is None:
        return predictor.predict(model, example_inputs)
    from hwaware.dynamic.driver import make_runners

    staged, plan = planned
    runners = make_runners(staged, plan)
    paths = [record_path(runners, plan, _as_tuple(x)) for x in calibration]
    region_ms = _region_times(predictor, runners, paths, type(model).__name__)
    return summarize(type(model).__name__, predictor.key, paths, region_ms)


def summarize(model: str, device: str, paths: list[list[tuple[Call, list[Any]]]],
              region_ms: dict[Call, float]) -> DynamicEstimate:
    """Per-path latencies, frequencies, expected latency and p95 from each calibration input's
    path and each region specialization's time."""
    per_input = [sum(region_ms[call] for call, _ in path) for path in paths]
    names = [tuple(call[0] for call, _ in path) for path in paths]
    counts = Counter(names)
    latency_of = {n: ms for n, ms in zip(names, per_input, strict=True)}
    estimates = tuple(PathEstimate(n, latency_of[n], c / len(paths))
                      for n, c in counts.most_common())
    labels = {f"{call[0]} {_shapes(call[1])}": ms for call, ms in region_ms.items()}
    return DynamicEstimate(model, device, estimates, float(np.mean(per_input)),
                           float(np.percentile(per_input, 95)), labels)


def record_path(runners: dict[str, Any], plan: Any, inputs: tuple[Any, ...]
                ) -> list[tuple[Call, list[Any]]]:
    """The region calls one run of the host program makes on `inputs` (eager PyTorch), each
    with its arguments."""
    from hwaware.dynamic.host import make_forward, namespace
    from hwaware.dynamic.model import specialization_key

    calls: list[tuple[Call, list[Any]]] = []

    def recording(name: str, runner: Any) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            calls.append(((name, specialization_key(runner.info, args)), list(args)))
            return runner.fn(runner.root, *args)
        return call

    recorders = {n: recording(n, r) for n, r in runners.items()}
    forward = make_forward(plan.source(), "<hwaware host program>", namespace(recorders, None))
    with torch.no_grad():
        forward(*inputs)
    return calls


def _region_times(predictor: LatencyPredictor, runners: dict[str, Any],
                  paths: list[list[tuple[Call, list[Any]]]], model: str) -> dict[Call, float]:
    first_args: dict[Call, list[Any]] = {}
    for path in paths:
        for call, args in path:
            first_args.setdefault(call, args)
    return {call: _region_ms(predictor, runners[call[0]], call, args, model)
            for call, args in first_args.items()}


def _region_ms(predictor: LatencyPredictor, runner: Any, call: Call, args: list[Any],
               model: str) -> float:
    """One region specialization's predicted time (measured in eager PyTorch when it cannot
    be made static: it runs in eager in the compiled model too)."""
    from hwaware.capture import CaptureError, capture
    from hwaware.decompose import decomposition_of, rewrite_and_partition
    from hwaware.dynamic.model import graph_inputs, unspecializable

    key = call[1]
    if runner.eager_reason is None and unspecializable(runner.info, key) is None:
        try:
            module = runner.module_for(key, args)
            captured = capture(module, tuple(graph_inputs(key, args)), name=f"{model}.{call[0]}")
            _, part = rewrite_and_partition(captured)
            return predictor.predict_decomposition(decomposition_of(part)).total_ms
        except CaptureError:
            pass
    return _eager_ms(runner, args)


def _eager_ms(runner: Any, args: list[Any]) -> float:
    from hwaware.predict.profile import TIMING_QUANTILE
    from hwaware.runner import time_in_blocks

    with torch.no_grad():
        (us,) = time_in_blocks([lambda: runner.fn(runner.root, *args)], 20,
                               quantile=TIMING_QUANTILE)
    return us / 1e3


def _shapes(key: Any) -> str:
    return str(key)[:60]


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else tuple(x) if isinstance(x, list) else (x,)
