"""Latency predictor benchmark: accuracy, learning curve, few-shot transfer and speed.

    python bench/predictor.py [--target host] [--data cost_models/data] [--out FILE.md]
                              [--curve-only | --skip-curve] [--skip-speed]

Reads the profiled samples (`hwaware profile` writes them to cost_models/data/*.jsonl) and
reports, on this CPU:
1. accuracy on held-out architectures (a fifth of the in-range samples, by a hash of their id),
   on out-of-range ones (`ood`), on the built-in zoo models (`real`), per family, beside the
   noise floor (two timings of one compiled model);
2. the learning curve: held-out and out-of-range accuracy when training on n measured models
   only (3 random draws of n, averaged), for each kernel prior (`none`: the regressor learns
   times; `physical`: ratios to FLOPs at peak plus bytes at bandwidth; `pretrained`: times,
   boosting on from a regressor pretrained on the baselines of the kernels of thousands of
   unmeasured architectures, `hwaware.predict.pretrain`), and how many measured models each
   needs to reach the bars (±10% >= 95%, Spearman >= 0.95);
3. few-shot transfer: the predictor of the base device adapted to each other device in the
   data (another thread count, AVX2 code instead of AVX-512 on this CPU, another CPU kind)
   with 10 of that device's measurements, against that device's held-out models (3 draws);
4. speed: batched kernel predictions per second, and `predict(model)` on a new model after
   warm-up (decomposition included).
No timing here is an assertion; figures go to the markdown file.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwaware.predict import DATA_DIR  # noqa: E402
from hwaware.predict.commands import (  # noqa: E402
    evaluate,
    evaluation_splits,
    table,
    training_samples,
)
from hwaware.predict.features import Device  # noqa: E402
from hwaware.predict.metrics import TABLE_HEADER, Metrics, metrics  # noqa: E402
from hwaware.predict.predictor import PRIORS, LatencyPredictor  # noqa: E402
from hwaware.predict.profile import (  # noqa: E402
    Sample,
    all_data_files,
    cpu_kind,
    read_samples,
)
from hwaware.target import get_target  # noqa: E402

CURVE_SIZES = (5, 10, 20, 40, 80, 160)
CURVE_DRAWS = 3
CURVE_SPLITS = ("held-out", "ood")
BARS = (("within_10", 0.95, "±10% >= 95%"), ("spearman", 0.95, "Spearman >= 0.95"))
ADAPT_SAMPLES = 10
MIN_TRANSFER_BASE = 50  # training models a device needs to be transferred from
DRAWS = 3


def accuracy(base: Device, samples: list[Sample]) -> tuple[LatencyPredictor, str]:
    """This device's held-out metrics, trained on its models alone and jointly on every
    device's (the shipped way); the predictor trained alone (transfer starts from it)."""
    own = [s for s in samples if s.device["key"] == base.key]
    alone = LatencyPredictor.train(training_samples(own), base)
    joint = LatencyPredictor.train(training_samples(samples), base, joint=True)
    devices = joint.manifest["training"]["devices"]
    text = (f"## Accuracy on {base.key}\n\nHeld out: "
            + ", ".join(f"{k} {len(v)}" for k, v in evaluation_splits(own).items())
            + f".\n\n### Trained on this device's {len(training_samples(own))} models alone "
            f"({alone.manifest['training']['kernels']} kernels)\n\n"
            + table(evaluate(alone, own))
            + f"\n\n### Trained jointly on {joint.manifest['training']['models']} models of "
            f"{len(devices)} devices (the shipped way: `hwaware predictor train`)\n\n"
            + ", ".join(f"{k} {n}" for k, n in sorted(devices.items())) + ".\n\n"
            + table(evaluate(joint, own)))
    return alone, text


def learning_curve(base: Device, samples: list[Sample]) -> str:
    own = [s for s in samples if s.device["key"] == base.key]
    train, splits = training_samples(own), evaluation_splits(own)
    sizes = [n for n in CURVE_SIZES if n < len(train)] + [len(train)]
    curve = {(n, prior): _curve_point(base, train, splits, n, prior)
             for n in sizes for prior in PRIORS}
    rows = [TABLE_HEADER.replace("| split |", "| training models, kernel prior, split |")]
    rows += [curve[n, prior][split].row(f"{n}, {prior}, {split}")
             for n in sizes for prior in PRIORS for split in CURVE_SPLITS]
    pretraining = LatencyPredictor.train(train[:CURVE_SIZES[0]], base, prior="pretrained",
                                         min_models=CURVE_SIZES[0]).manifest["pretraining"]
    return ("## Learning curve (held-out in-range and out-of-range models)\n\n"
            f"Kernel prior `none`: the kernel regressor learns a kernel's time; `physical`: the "
            "ratio of its time to its FLOPs at peak plus its bytes at bandwidth (free statistics "
            "of the kernel); `pretrained`: its time, boosting on from a regressor pretrained on "
            f"the log baselines of the {pretraining['kernels']} distinct kernels of "
            f"{pretraining['archs']} unmeasured architectures (seed {pretraining['seed']}, "
            f"{pretraining['rounds']} rounds; {pretraining['seconds']} s with the "
            "decompositions cached). Below the full set, each row is the mean of "
            f"{CURVE_DRAWS} random draws of n training models.\n\n" + "\n".join(rows)
            + "\n\n" + _measurements_needed(curve, sizes))


def _curve_point(base: Device, train: list[Sample], splits: dict[str, list[Sample]], n: int,
                 prior: str) -> dict[str, Metrics]:
    """Metrics per split of predictors trained on `n` models (mean over draws)."""
    draws = CURVE_DRAWS if n < len(train) else 1
    found: dict[str, list[Metrics]] = {split: [] for split in CURVE_SPLITS}
    for draw in range(draws):
        order = np.random.default_rng(draw).permutation(len(train)) if draws > 1 \
            else np.arange(len(train))
        predictor = LatencyPredictor.train([train[i] for i in order[:n]], base, prior=prior,
                                           min_models=CURVE_SIZES[0])
        for split in CURVE_SPLITS:
            group = splits[split]
            found[split].append(metrics(list(predictor.predict_samples(group)),
                                        [s.measured_us for s in group]))
    return {split: _mean(ms) for split, ms in found.items()}


def _mean(ms: list[Metrics]) -> Metrics:
    fields = {k: float(np.mean([getattr(m, k) for m in ms])) for k in Metrics.__annotations__}
    return Metrics(**{**fields, "n": ms[0].n})


def _measurements_needed(curve: dict[tuple[int, str], dict[str, Metrics]], sizes: list[int]
                         ) -> str:
    """The fewest measured models with which each prior reaches each bar, per split."""
    rows = ["| kernel prior | split | " + " | ".join(label for _, _, label in BARS) + " |",
            "|---|---|" + "---:|" * len(BARS)]
    for prior in PRIORS:
        for split in CURVE_SPLITS:
            cells = [_needed([(n, getattr(curve[n, prior][split], field)) for n in sizes], bar)
                     for field, bar, _ in BARS]
            rows.append(f"| {prior} | {split} | " + " | ".join(cells) + " |")
    return ("Measured models needed to reach the bars (mean over draws; `first`: the fewest "
            "that reach it, `held from`: the fewest from which every larger size in the curve "
            "stays at or above it):\n\n" + "\n".join(rows))


def _needed(curve: list[tuple[int, float]], bar: float) -> str:
    """Where a learning curve ((models, value) by size) first reaches `bar`, and from where
    it holds."""
    reached = [n for n, value in curve if value >= bar]
    if not reached:
        best, at = max((value, n) for n, value in curve)
        return f"not reached (best {best:.3f} at {at})"
    held = [n for i, (n, _) in enumerate(curve) if all(v >= bar for _, v in curve[i:])]
    if held and held[0] == reached[0]:
        return f"{reached[0]} models"
    return f"first {reached[0]}, held from {held[0] if held else 'never'}"


def transfer(base_predictor: LatencyPredictor, samples: list[Sample]) -> str:
    """`base_predictor` (trained on its device alone) adapted to each other device with a few
    of its measurements, beside the joint predictor of all devices trained with that
    device's own training models (draw "joint")."""
    keys = sorted({s.device["key"] for s in samples} - {base_predictor.key})
    rows = ["| device | adapt samples | draw | ±10% | ±5% | MAPE | Spearman | Kendall | "
            "unadapted ±10% | unadapted Spearman |", "|---|---:|---:|---:|---:|---:|---:|---:|"
            "---:|---:|"]
    for key in keys:
        own = [s for s in samples if s.device["key"] == key]
        device = Device(**own[0].device)
        pool, held = training_samples(own), evaluation_splits(own)["held-out"]
        if len(pool) < ADAPT_SAMPLES or len(held) < 5:
            rows.append(f"| {key} | too few samples ({len(own)}) | | | | | | | | |")
            continue
        measured = [s.measured_us for s in held]
        raw = metrics(list(base_predictor.predict_samples(held)), measured)
        for draw in range(DRAWS):
            adapted = base_predictor.adapt(_picked(pool, draw), device)
            m = metrics(list(adapted.predict_samples(held)), measured)
            rows.append(f"| {key} | {ADAPT_SAMPLES} | {draw} | {100 * m.within_10:.1f}% | "
                        f"{100 * m.within_5:.1f}% | {m.mape:.1f}% | {m.spearman:.3f} | "
                        f"{m.kendall:.3f} | {100 * raw.within_10:.1f}% | {raw.spearman:.3f} |")
        joint = LatencyPredictor.train(training_samples(samples), device, joint=True,
                                       min_models=1)
        m = metrics(list(joint.predict_samples(held)), measured)
        rows.append(f"| {key} | {len(pool)} (joint) | joint | {100 * m.within_10:.1f}% | "
                    f"{100 * m.within_5:.1f}% | {m.mape:.1f}% | {m.spearman:.3f} | "
                    f"{m.kendall:.3f} | | |")
    return (f"## Few-shot transfer from {base_predictor.key} ({ADAPT_SAMPLES} measurements of "
            "the new device; metrics on its held-out models)\n\n" + "\n".join(rows))


def transfer_into(base: Device, samples: list[Sample]) -> str:
    """The other direction: a predictor trained on each other device with enough data (another
    CPU kind), adapted to `base` (this machine) with its measurements, judged on `base`'s
    held-out models, beside `base`'s own predictor trained on all its training models."""
    own = [s for s in samples if s.device["key"] == base.key]
    pool, held = training_samples(own), evaluation_splits(own)["held-out"]
    rows = ["| trained on | its models | adapt samples | draw | ±10% | ±5% | MAPE | Spearman | "
            "Kendall | unadapted ±10% | unadapted Spearman |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    others = sorted({s.device["key"] for s in samples} - {base.key})
    if len(pool) < ADAPT_SAMPLES or len(held) < 5:
        return f"## Few-shot transfer into {base.key}\n\nToo few samples of it."
    measured = [s.measured_us for s in held]
    cpu = own[0].cpu if own else ""
    everyone_else = training_samples([s for s in samples if s.cpu != cpu])  # other CPU kinds
    bases = [(key, theirs, LatencyPredictor.train(theirs, Device(**theirs[0].device)))
             for key in others
             for theirs in [training_samples([s for s in samples if s.device["key"] == key])]
             if len(theirs) >= MIN_TRANSFER_BASE]
    kinds = sorted({s.cpu for s in everyone_else})
    bases.append((f"joint: every other CPU kind ({', '.join(kinds)})", everyone_else,
                  LatencyPredictor.train(everyone_else, base, joint=True, min_models=0)))
    for name, theirs, trained in bases:
        raw = metrics(list(trained.predict_samples(held)), measured)
        for draw in range(DRAWS):
            picked = _picked(pool, draw)
            m = metrics(list(trained.adapt(picked, base).predict_samples(held)), measured)
            rows.append(_transfer_row(name, len(theirs), f"{ADAPT_SAMPLES}", draw, m, raw))
    for draw in range(DRAWS):  # the few measurements trained on with everyone else's
        picked = _picked(pool, draw)
        joint = LatencyPredictor.train(everyone_else + picked, base, joint=True, min_models=0)
        m = metrics(list(joint.predict_samples(held)), measured)
        rows.append(_transfer_row("joint: every other CPU kind and the 10 of this device",
                                  len(everyone_else), f"{ADAPT_SAMPLES} (trained on)", draw, m,
                                  None))
    return (f"## Few-shot transfer into {base.key} (a predictor of other devices adapted with "
            f"{ADAPT_SAMPLES} measurements of this one, or trained with them; metrics on its "
            f"{len(held)} held-out models)\n\n" + "\n".join(rows))


def _picked(pool: list[Sample], draw: int) -> list[Sample]:
    """`ADAPT_SAMPLES` of `pool`, drawn by `draw`."""
    order = np.random.default_rng(draw).permutation(len(pool))
    return [pool[i] for i in order[:ADAPT_SAMPLES]]


def _transfer_row(name: str, models: int, adapt: str, draw: int, m: Metrics,
                  raw: Metrics | None) -> str:
    unadapted = f"{100 * raw.within_10:.1f}% | {raw.spearman:.3f}" if raw else " | "
    return (f"| {name} | {models} | {adapt} | {draw} | {100 * m.within_10:.1f}% | "
            f"{100 * m.within_5:.1f}% | {m.mape:.1f}% | {m.spearman:.3f} | {m.kendall:.3f} | "
            f"{unadapted} |")


def speed(predictor: LatencyPredictor, samples: list[Sample]) -> str:
    import hwaware
    from hwaware.zoo import get_model

    records = [r for s in samples for r in s.records]
    batch = [records[i % len(records)] for i in range(100_000)]
    predictor.predict_kernels(batch[:1000])
    start = time.perf_counter()
    predictor.predict_kernels(batch)
    per_second = len(batch) / (time.perf_counter() - start)
    lines = [f"- batched kernel predictions: {per_second:,.0f} per second ({len(batch):,} "
             f"kernels, {len(records):,} distinct)"]
    for name in ("mobilenetv2_block", "resnet_bottleneck", "transformer_encoder_layer"):
        model, inputs = get_model(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            predictor.predict(*get_model("small_cnn"))  # warm-up: imports, first export
            times = []
            for _ in range(3):
                start = time.perf_counter()
                est = predictor.predict(model, inputs)
                times.append(time.perf_counter() - start)
        lines.append(f"- `predict({name})` on a model it has not seen: "
                     f"{statistics.median(times):.2f} s median of 3 ({len(est.kernels)} kernels, "
                     f"estimate {est.total_ms:.3f} ms)")
    del hwaware
    return "## Speed\n\n" + "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default="host")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", default=str(DATA_DIR))
    p.add_argument("--out", default=None)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--curve-only", action="store_true", help="the learning curve alone")
    p.add_argument("--skip-curve", action="store_true",
                   help="no learning curve (it decomposes 2000 unmeasured architectures for the "
                   "pretrained prior the first time: about 8 minutes on 2 cores)")
    args = p.parse_args()
    base = Device.of(get_target(args.target), args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples = read_samples(all_data_files(Path(args.data)))
    cpu = f"{platform.machine()} {cpu_kind()}"
    parts = [f"# Latency predictor on {cpu} ({base.key})\n\nCommand: `python bench/predictor.py "
             f"{' '.join(sys.argv[1:])}`. Samples: {len(samples)} in {args.data}. Latencies are "
             "lower quartiles of blocks of back-to-back calls (`hwaware.predict.profile`)."]
    if args.curve_only:
        parts.append(learning_curve(base, samples))
    else:
        predictor, text = accuracy(base, samples)
        curve = [] if args.skip_curve else [learning_curve(base, samples)]
        parts += [text, *curve, transfer(predictor, samples), transfer_into(base, samples)]
        if not args.skip_speed:
            parts.append(speed(predictor, samples))
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
