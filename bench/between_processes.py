"""Between-process noise: profiled architectures compiled and timed again in this process.

    python bench/between_processes.py [--count 30] [--threads 2] [--out FILE.jsonl]

Reads this CPU's profile data (`cost_models/data/<cpu kind>.jsonl`), compiles and times its
first `--count` in-range architectures again with the profiler (`hwaware.predict.profile`),
and prints, per architecture, the latency then and now, their ratio, and the references
(gather and slowdown) taken before each timing: how far ground truth moves between processes
and machine states, beside the two-timings noise of one process. The new samples go to
`--out` (default: a temporary file), never into the training data. No figure is an assertion.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwaware.predict import profile, spaces  # noqa: E402
from hwaware.predict.features import Device  # noqa: E402
from hwaware.target import get_target  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    target = get_target("host")
    device = Device.of(target, args.threads)
    known = profile.read_samples([profile.data_file()], device.key)
    profile._remember_fastest_reference(known, device.threads)
    out = args.out or Path(tempfile.mkdtemp()) / "again.jsonl"
    ratios = []
    print("| architecture | then (us) | now (us) | now/then | gather ref then / now (us) | "
          "slowdown then / now |\n|---|---:|---:|---:|---:|---:|")
    for then in [s for s in known if s.split == "train"][: args.count]:
        arch = spaces.Architecture(then.arch["space"], then.arch["config"])
        now = profile.measure(arch, target, device, None, then.split)
        with out.open("a") as f:
            f.write(now.to_json() + "\n")
        ratios.append(now.measured_us / then.measured_us)
        print(f"| {then.id} | {then.measured_us:.0f} | {now.measured_us:.0f} | "
              f"{ratios[-1]:.2f} | {then.gather_reference_us:.0f} / "
              f"{now.gather_reference_us:.0f} | {then.slowdown:.2f} / {now.slowdown:.2f} |",
              flush=True)
    within = sum(abs(r - 1) <= 0.10 for r in ratios) / max(len(ratios), 1)
    print(f"\n{len(ratios)} architectures: {within:.0%} within ±10% of their first timing, "
          f"median |change| {statistics.median(abs(r - 1) for r in ratios):.1%}; new samples "
          f"in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
