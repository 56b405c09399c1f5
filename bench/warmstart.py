"""Warm-started tuning: does a search cost model trained on other workloads reach a cold
session's final latency in fewer trials? (issue 19's bar: in <= 1/3 of the trials)

Set A (pretraining): the conv2d tasks of the zoo's `small_cnn` at width 16 (32 px) and width 24
(24 px). Set B (compared): its conv2d tasks at width 32 (16 px): the same operator family,
other shapes (no workload of B is in A). hwaware's own task extraction makes both sets.

1. A session over A with no saved cost model: it saves one (`hwaware.tvm.cost_model`).
2. Per repeat, over B, the same budget per task, each with a fresh database (no record of B
   anywhere): a cold session (`cold_start=True`) and a warm one (from a copy of 1.'s model).

Per task: the cold session's final best, and the first trial of the warm session whose best is
at most that (the ratio to the cold session's trials: the bar is <= 1/3). Overall: the sum of
the tasks' bests (the network's kernel time), and the first trial of the warm session (counted
over all tasks, in measured order) at which its sum is at most the cold session's final sum.
Trials are the records of each session's database in the order they were measured.

    python bench/warmstart.py [--pretrain-trials 48] [--trials 64] [--repeats 1] \
        [--out bench/warmstart-znver5-2c.md]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's hwaware

PRETRAIN = ((16, 32), (24, 24))  # small_cnn (width, pixels) of set A
COMPARE = ((32, 16),)  # of set B


@dataclass
class Curve:
    """One session's measurements over set B: per task, the best-so-far after each trial."""

    per_task: dict[str, list[float]]  # task name -> best microseconds after its k-th trial
    order: list[tuple[str, float]]  # (task name, microseconds) in measured order, all tasks
    seconds: float


def conv_tasks(shapes: tuple[tuple[int, int], ...], target: Any) -> list[Any]:
    """The conv2d tuning tasks of `small_cnn` at each (width, pixels)."""
    from hwaware.capture import capture
    from hwaware.decompose import rewrite_and_partition
    from hwaware.tune import extract_tasks
    from hwaware.zoo import build_small_cnn

    tasks: dict[str, Any] = {}
    for width, pixels in shapes:
        model, inputs = build_small_cnn(width=width, hw=pixels)
        _, part = rewrite_and_partition(capture(model, inputs), True)
        for task in extract_tasks(part, list(inputs), target):
            if task.family == "conv2d":
                tasks.setdefault(task.workload_hash, task)
    return list(tasks.values())


def session(tasks: list[Any], target: Any, db_path: Path, per_task: int,
            models_root: Path | None) -> Curve:
    """One tuning session over `tasks` into a new database; cold when `models_root` is None,
    else warm from (and saving to) the cost model under `models_root`."""
    from hwaware.db import TuningDatabase
    from hwaware.tune import tune_tasks
    from hwaware.tvm.cost_model import ROOT_ENV
    from hwaware.tvm.setup import TVM_VERSION

    if models_root is not None:
        os.environ[ROOT_ENV] = str(models_root)
    start = time.time()
    with TuningDatabase(db_path) as db:
        tune_tasks(tasks, target, db, per_task * len(tasks), "warmstart-bench",
                   cold_start=models_root is None)
        rows = db.records_for_target(target.key, TVM_VERSION)
    seconds = time.time() - start
    names = {t.workload_hash: t.name for t in tasks}
    order = [(names[r.workload_hash], r.mean_us if r.mean_us is not None else math.inf)
             for r in rows]
    per_task: dict[str, list[float]] = {t.name: [] for t in tasks}
    for name, us in order:
        best = per_task[name][-1] if per_task[name] else math.inf
        per_task[name].append(min(best, us))
    return Curve(per_task, order, seconds)


def first_reaching(bests: list[float], goal: float) -> int | None:
    """1-based trial at which the best-so-far is at most `goal`; None if never."""
    return next((i + 1 for i, us in enumerate(bests) if us <= goal), None)


def overall_curve(curve: Curve) -> list[float]:
    """The sum of the tasks' best microseconds after each trial of the session (inf until every
    task has a measurement)."""
    best: dict[str, float] = dict.fromkeys(curve.per_task, math.inf)
    sums = []
    for name, us in curve.order:
        best[name] = min(best[name], us)
        sums.append(sum(best.values()))
    return sums


def compare(cold: Curve, warm: Curve) -> list[str]:
    """Markdown rows: per task, then overall."""
    rows = []
    for name, cold_bests in cold.per_task.items():
        goal, warm_bests = cold_bests[-1], warm.per_task[name]
        reach = first_reaching(warm_bests, goal)
        rows.append(_row(name, goal, len(cold_bests), warm_bests[0], warm_bests[-1], reach))
    cold_sum, warm_sum = overall_curve(cold), overall_curve(warm)
    reach = first_reaching(warm_sum, cold_sum[-1])
    first_full = next((s for s in warm_sum if math.isfinite(s)), math.inf)
    rows.append(_row("**overall (sum of bests)**", cold_sum[-1], len(cold_sum), first_full,
                     warm_sum[-1], reach))
    return rows


def _row(name: str, goal: float, trials: int, warm_first: float, warm_final: float,
         reach: int | None) -> str:
    reached = "not reached" if reach is None else f"{reach}"
    ratio = "-" if reach is None else f"{reach / trials:.2f}"
    return (f"| {name} | {goal:.1f} | {trials} | {warm_first:.1f} | {warm_final:.1f} | "
            f"{reached} | {ratio} |")


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} logical CPUs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-trials", type=int, default=48, help="per task of set A")
    p.add_argument("--trials", type=int, default=64, help="per task of set B, each session")
    p.add_argument("--repeats", type=int, default=1, help="cold/warm pairs over set B")
    p.add_argument("--out", default="bench/results/warmstart.md")
    args = p.parse_args()

    from hwaware.target import get_target
    from hwaware.tvm.cost_model import SUBDIR, ColdStartWarning, model_dir

    warnings.simplefilter("error", ColdStartWarning)  # a warm session that started cold: stop

    target = get_target("host")
    pretrain, compared = conv_tasks(PRETRAIN, target), conv_tasks(COMPARE, target)
    assert not {t.workload_hash for t in pretrain} & {t.workload_hash for t in compared}
    lines = [f"# Warm-started tuning: {cpu_name()}", "",
             f"Command: `python {' '.join(sys.argv)}`", "",
             f"Target `{target.key}`. Set A (pretraining): {len(pretrain)} conv2d tasks, "
             f"{args.pretrain_trials} trials each. Set B (compared): {len(compared)} conv2d "
             f"tasks, {args.trials} trials each per session, fresh database per session.", ""]
    with tempfile.TemporaryDirectory(prefix="hwaware-warmstart-") as tmp:
        work = Path(tmp)
        pretrained = session(pretrain, target, work / "a.db", args.pretrain_trials,
                             work / "a-models")
        saved = model_dir(target.key)  # under a-models: the session set the root
        lines += [f"Pretraining session over A: {pretrained.seconds:.0f} s.", ""]
        for repeat in range(args.repeats):
            cold = session(compared, target, work / f"cold-{repeat}.db", args.trials, None)
            root = work / f"warm-{repeat}-models"
            shutil.copytree(saved, root / target.key / SUBDIR)  # A's model, unchanged
            warm = session(compared, target, work / f"warm-{repeat}.db", args.trials, root)
            lines += [f"## Repeat {repeat + 1}: cold session {cold.seconds:.0f} s, warm "
                      f"session {warm.seconds:.0f} s", "",
                      "| task | cold final best us | cold trials | warm first best us | "
                      "warm final best us | warm trial reaching cold final | ratio |",
                      "|---|---|---|---|---|---|---|", *compare(cold, warm), ""]
            print("\n".join(lines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
