"""Do the schedules the search can make compute the right numbers? Every family's space, audited.

For each built-in zoo model (tiny shapes), each of its tuning workloads with a family schedule
rule (`hwaware.kernels.families`: conv_block, convnext_block, res_block, attention, gnn, rgcn)
is audited by `hwaware.tvm.space_audit`: `--schedules` schedules as MetaSchedule's evolutionary
search makes them (a fresh design-space sample, its tile sizes then mutated by TVM's
`MutateTileSize`), counted for predicated blocks (what a split that does not divide its loop
leaves), and `--built` of them built and run on this machine's threads against the
unscheduled workload.
A wrong schedule here is a record the tuner could store and, where nothing checks it (a farm
device, a GPU), a build could apply. Session 34 found conv_block's and ConvNeXt's lane splits
racing this way; the fast subset of this check is in the kernel tests.

    python bench/search_spaces.py [--schedules 30] [--built 30] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import CORES, _cpu_name, _versions, write_report  # noqa: E402

from hwaware.capture import capture  # noqa: E402
from hwaware.decompose import rewrite_and_partition  # noqa: E402
from hwaware.kernels import families  # noqa: E402
from hwaware.target import get_target  # noqa: E402
from hwaware.tune import TuningTask, extract_tasks  # noqa: E402
from hwaware.tvm import setup  # noqa: E402
from hwaware.tvm.space_audit import audit  # noqa: E402
from hwaware.zoo import ZOO, get_model  # noqa: E402


def family_tasks() -> list[tuple[str, TuningTask]]:
    """(zoo model, task) for every distinct family workload of the zoo's tiny models."""
    target, seen, found = get_target("host"), set(), []
    fused = set(families())
    for name in sorted(ZOO):
        model, inputs = get_model(name, small=True)
        captured = capture(model.eval(), inputs)
        with warnings.catch_warnings():  # host ops: expected, not this audit's subject
            warnings.simplefilter("ignore")
            _, part = rewrite_and_partition(captured, True)
        for task in extract_tasks(part, captured.example_inputs, target):
            if task.family in fused and task.workload_hash not in seen:
                seen.add(task.workload_hash)
                found.append((name, task))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=30)
    parser.add_argument("--built", type=int, default=30)
    parser.add_argument("--out", default="bench/search-spaces.md")
    args = parser.parse_args()
    target = get_target("host")
    tgt = setup.resolve(target).tvm
    rows, start = [], time.time()
    for model, task in family_tasks():
        found = audit(task.workload, tgt, args.schedules, min(args.built, args.schedules))
        wrong = [why for why in found.wrong if why]
        rows.append(f"| {model} | {task.family} | `{task.workload_hash[:10]}` | "
                    f"{min(found.predicated)}-{max(found.predicated)} | {len(found.wrong)} | "
                    f"{len(wrong)} | {wrong[0][:120] if wrong else ''} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# Searched schedules of every family's space, built and checked",
        "",
        f"CPU: {_cpu_name()} (`{target.key}`), {CORES} threads; {_versions()}. "
        f"`python bench/search_spaces.py --schedules {args.schedules} --built {args.built}` "
        f"({(time.time() - start) / 60:.1f} min). Per workload: {args.schedules} schedules as "
        "the search makes them (a design-space sample, tile sizes mutated 3 times by "
        "`MutateTileSize`); predicated blocks per schedule (min-max; a family whose rule makes "
        "a fixed number, as Winograd's output tiles do, shows it in every schedule); how many "
        "were built and run against the unscheduled workload, and how many computed wrong "
        "numbers.",
        "",
        "| zoo model | family | workload | predicated blocks | built | wrong | first wrong |",
        "|---|---|---|---|---:|---:|---|",
        *rows,
        "",
    ])
    write_report(text, args.out)


if __name__ == "__main__":
    main()
