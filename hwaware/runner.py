"""Timing: one `Runner` protocol and the one timing loop every in-process measurement uses.

Goes in: callables (a kernel, its ops in PyTorch, a whole model) and how many runs. Comes out:
per-run times in microseconds, one list per callable. The build's TVM-vs-PyTorch choices (per
kernel and whole model), the tuning session's re-measurement of its best records, the demo and
the benchmarks time through `LocalRunner`; decisions read a quantile of the samples
(`time_in_blocks`). On a device farm, `hwaware.tvm.rpc.RpcRunner` times kernels on a farm device
(the re-measure of a farm session's best records); it cannot time PyTorch, so a build's
TVM-vs-PyTorch choice is always timed here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Runner(Protocol):
    """Times callables on one device."""

    def run_us(self, fns: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
        """Per-run microseconds of each of `fns` (about `repeats` runs each)."""
        ...


@dataclass(frozen=True)
class LocalRunner:
    """Times callables in this process, on the device they run on (CUDA synchronized).

    Each function runs in turns of `block` back-to-back timed calls, each turn after
    `untimed_per_block` untimed calls, the turns of all functions alternating; `warmup_rounds`
    untimed rounds over all functions come first. Back to back (`block` > 1) is how a deployed
    model runs; strict round-robin (`block` = 1) would charge each function for the thread pools
    the previous one left spinning (PyTorch's OpenMP workers spin after every op and halve the
    next TVM kernel's speed), but lets noise hit all alike. `self_timed`: each function times
    itself and returns its seconds per run (TVM's time evaluator, as MetaSchedule's runner
    measures), instead of being timed around its call."""

    block: int = 10
    untimed_per_block: int = 1
    warmup_rounds: int = 0
    self_timed: bool = False

    def run_us(self, fns: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
        samples: list[list[float]] = [[] for _ in fns]
        with torch.no_grad():
            for _ in range(self.warmup_rounds):
                for fn in fns:
                    fn()
            sync = device_sync()
            for _ in range(max(1, repeats // self.block)):
                for fn, times in zip(fns, samples, strict=True):
                    for _ in range(self.untimed_per_block):
                        fn()
                    for _ in range(self.block):
                        times.append(float(fn()) * 1e6 if self.self_timed else _timed_us(fn, sync))
        return samples


def _timed_us(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e6


def device_sync() -> Callable[[], None]:
    """What a timer calls around each timed call so that it times the work and not its launch:
    a CUDA synchronize once this process has used the GPU, else nothing."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def quantile_of(samples: list[float], q: float) -> float:
    """The q-quantile (0 < q < 1, in percent steps) of the samples, interpolated like numpy's
    default; q = 0.5 is the median."""
    return quantiles_of(samples, [q])[0]


def quantiles_of(samples: list[float], qs: Sequence[float]) -> list[float]:
    """`quantile_of` for each of `qs`, the samples sorted once."""
    if len(samples) == 1:
        return [samples[0] for _ in qs]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return [cuts[round(q * 100) - 1] for q in qs]


def time_in_blocks(fns: list[Callable[[], Any]], repeats: int, block: int = 10,
                   quantile: float = 0.5, runner: Runner | None = None) -> list[float]:
    """Median (or another `quantile`) microseconds of each function, timed in alternating blocks
    of back-to-back calls (each block after one untimed call) by `runner` (a `LocalRunner`)."""
    samples = (runner or LocalRunner(block=block)).run_us(fns, repeats)
    return [quantile_of(s, quantile) for s in samples]


@dataclass(frozen=True)
class Timing:
    """One side of a decision: `us`, a quantile of its samples (microseconds); `spread`, their
    interquartile range over their median (0.05: the middle half of the runs lie within 5% of
    each other); `samples`, how many runs."""

    us: float
    spread: float
    samples: int


def timing_of(samples: list[float], quantile: float) -> Timing:
    chosen, q25, median, q75 = quantiles_of(samples, [quantile, 0.25, 0.5, 0.75])
    return Timing(chosen, (q75 - q25) / median if median > 0 else 0.0, len(samples))


# Timing rounds for one decision: the first in blocks of 10 (how a deployed model runs), the
# next ones in blocks of 2 (near-ties re-timed interleaved, so a slow phase of a shared machine
# hits both sides), until the choice is clear, the rounds run out or the time budget is spent.
DECISION_BLOCKS = (10, 2, 2, 2)
TIGHT_SPREAD = 0.05
# The timed runs one decision may spend, in seconds. Without a budget, a whole-model decision
# (3 plans, 90 runs a round, up to 4 rounds; `hwaware.build`) took up to 1,512 runs of the
# model: on a noisy machine, where no round settles a near-tie, 216 s of a 265 s compile of a
# small MobileNetV2; a full-size model's runs take 45-110 ms each. A slow model gets fewer
# runs, each of which averages over more work.
DECISION_BUDGET_S = 3.0


def time_until_clear(fns: list[Callable[[], Any]], repeats: int, quantile: float,
                     margin: float = 0.0, budget_s: float = DECISION_BUDGET_S) -> list[Timing]:
    """Each of `fns` timed for a choice between them, the first chosen only when `margin`
    faster (`Timing`s, over the samples of every round): rounds of about `repeats` runs each
    (`DECISION_BLOCKS`) until the choice is clear (`is_clear`), fewer runs where their timed
    time would pass `budget_s` (the first round's first block always runs, and tells what a run
    costs)."""
    samples: list[list[float]] = [[] for _ in fns]
    timings: list[Timing] = []
    for block in DECISION_BLOCKS:
        runs = repeats
        if not samples[0]:
            _time_more(fns, block, block, samples)
            runs -= block
        affordable = _affordable_runs(samples, budget_s)
        _time_more(fns, min(runs, affordable - affordable % block), block, samples)
        timings = [timing_of(s, quantile) for s in samples]
        if is_clear(timings, margin) or affordable < block:
            break
    return timings


def _time_more(fns: list[Callable[[], Any]], runs: int, block: int,
               samples: list[list[float]]) -> None:
    """`runs` more runs of each of `fns` in blocks of `block`, added to `samples` (none where
    `runs` is under one block)."""
    if runs < block:
        return
    for kept, new in zip(samples, LocalRunner(block=block).run_us(fns, runs), strict=True):
        kept += new


def _affordable_runs(samples: list[list[float]], budget_s: float) -> int:
    """How many more runs of every function fit in what is left of `budget_s`, at their mean
    time so far."""
    spent_us = sum(map(sum, samples))
    one_of_each_us = max(sum(sum(s) / len(s) for s in samples), 1e-3)
    return max(0, int((budget_s * 1e6 - spent_us) / one_of_each_us))


def is_clear(timings: list[Timing], margin: float) -> bool:
    """Whether the timings settle the choice of the fastest side, the first side chosen only
    when `margin` (a fraction) faster than the others: every spread under `TIGHT_SPREAD` (a
    near-tie measured precisely), or the chosen side's lead over each other side larger than
    their two spreads together (noise could not turn the choice around)."""
    if all(t.spread <= TIGHT_SPREAD for t in timings):
        return True
    cost = [t.us * (1 + margin if i == 0 else 1) for i, t in enumerate(timings)]
    best = min(range(len(cost)), key=cost.__getitem__)
    return all(abs(cost[i] / cost[best] - 1) > timings[best].spread + timings[i].spread
               for i in range(len(cost)) if i != best)


def time_interleaved(fns: list[Callable[[], Any]], repeats: int, warmup: int = 3) -> list[float]:
    """Median microseconds of each function, run round-robin so noise hits all alike."""
    samples = LocalRunner(block=1, untimed_per_block=0, warmup_rounds=warmup).run_us(fns, repeats)
    return [statistics.median(s) for s in samples]
