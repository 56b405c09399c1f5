"""The main job (`make demo` / `hwaware demo`): tune, compile and time a sample network here.

Goes in: a zoo model name, a trial budget and the database path. Comes out: one table on stdout,
eager vs torch.compile (Inductor) vs hwaware untuned vs hwaware tuned, in ms and as speed-ups over
eager, measured in one run, interleaved, medians; the timings also go into the database's model
measurements, tied to the tuning session (`hwaware report` shows them). The tuning records stay
in the database, so a second run skips the tuning and finishes in about a minute.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

DEMO_TRIALS = 192
REPEATS = 50

log = logging.getLogger(__name__)


def run_demo(model_name: str = "mobilenetv2_block", trials: int | None = None,
             db_path: str = "tuning_logs/hwaware.db", with_inductor: bool = True) -> int:
    """Run the demo and print its table; returns a process exit code."""
    cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    import torch

    import hwaware
    from hwaware.runner import time_in_blocks, time_interleaved
    from hwaware.zoo import get_model

    torch.set_num_threads(cores)
    budget = DEMO_TRIALS if trials is None else trials
    model, inputs = get_model(model_name)
    target = hwaware.get_target("host")
    print(f"hwaware demo: {model_name} at batch 1 on {target.description}; database {db_path}")
    impls: dict[str, Callable[[], Any]] = {"eager": lambda: model(*inputs)}
    started = time.time()
    if with_inductor:
        impls["torch.compile (Inductor)"] = _inductor(model, inputs)
    print("compiling hwaware untuned (no tuning records: PyTorch's kernels for contractions)")
    untuned = hwaware.compile(model, inputs, db=None)
    impls["hwaware untuned"] = lambda: untuned(*inputs)
    print(f"tuning session: {budget} trials (records already in the database are reused)")
    summary = hwaware.tune(model, inputs, trials=budget, db=db_path)
    print(summary.table())
    tuned = hwaware.compile(model, inputs, db=db_path)
    impls["hwaware tuned"] = lambda: tuned(*inputs)
    print(tuned.report())
    _check_all(impls, model, inputs)
    blocks = time_in_blocks(list(impls.values()), REPEATS)
    interleaved = time_interleaved(list(impls.values()), REPEATS)
    print(_table(list(impls), blocks, interleaved, budget, summary.trials_measured))
    _store_timings(db_path, model_name, target.key, summary.session_id,
                   dict(zip(impls, zip(blocks, interleaved, strict=True), strict=True)))
    print(f"total {time.time() - started:.0f} s")
    return 0


IMPL_KEYS = {"eager": "eager", "torch.compile (Inductor)": "inductor",
             "hwaware untuned": "hwaware-untuned", "hwaware tuned": "hwaware"}


def _store_timings(db_path: str, model_name: str, target_key: str, session_id: str,
                   timings_us: dict[str, tuple[float, float]]) -> None:
    """Each implementation's model latency (block median) into the database's model
    measurements, tied to the tuning session (what `hwaware report` reads for speed-ups); the
    spread is how far the round-robin median lies from it."""
    from hwaware.db import ModelMeasurement, open_db

    db = open_db(db_path)
    assert db is not None  # a path always opens a database
    for name, (block_us, rr_us) in timings_us.items():
        db.commit_model_measurement(ModelMeasurement(
            model=model_name, target_key=target_key, impl=IMPL_KEYS.get(name, name),
            latency_us=block_us, spread_us=abs(block_us - rr_us), kernels=[], device=db.device,
            session_id=session_id, created_at=time.time()))


def _inductor(model: Any, inputs: tuple[Any, ...]) -> Callable[[], Any]:
    import torch

    print("compiling torch.compile (Inductor)")
    compiled = torch.compile(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(*inputs)
    return lambda: compiled(*inputs)


def _check_all(impls: dict[str, Callable[[], Any]], model: Any, inputs: tuple[Any, ...]) -> None:
    import torch

    with torch.no_grad():
        expected = model(*inputs)
        for name, fn in impls.items():
            got = fn()
            if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
                raise RuntimeError(f"{name} differs from eager PyTorch")


def _table(names: list[str], blocks_us: list[float], interleaved_us: list[float], budget: int,
           measured: int) -> str:
    lines = [f"\n{'implementation':<28}{'ms':>9}{'vs eager':>10}{'ms (rr)':>10}{'vs eager':>10}",
             "-" * 67]
    for name, us, rr in zip(names, blocks_us, interleaved_us, strict=True):
        lines.append(f"{name:<28}{us / 1e3:>9.3f}{blocks_us[0] / us:>9.2f}x"
                     f"{rr / 1e3:>10.3f}{interleaved_us[0] / rr:>9.2f}x")
    lines.append(f"(medians of {REPEATS} calls in one run: first in alternating blocks of "
                 "back-to-back calls, then strict round-robin (rr), which charges each runtime "
                 "for the thread pools the previous one left spinning; tuning budget "
                 f"{budget} trials, {measured} measured this run; 'vs eager' > 1 is faster)")
    return "\n".join(lines)
