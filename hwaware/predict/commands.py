"""`hwaware predictor train|eval|adapt`: the latency predictor's command-line half.

Goes in: the profiled samples in `cost_models/data/*.jsonl` (`hwaware profile` makes them) and a
target with a thread count (the device). Samples are split once and for all by a hash of their
architecture id: a fifth of the in-range architectures is held out of training, and the
out-of-range (`ood`) and real (`zoo`) samples are never trained on. A predictor is trained
jointly on the training samples of every device in the data, each described by its own device's
features (`--alone`: its own device's only): on the three CPU kinds measured so far that gives
lower MAPE and higher Spearman on each device's held-out models than its own samples alone
(within ±10%: better on one, slightly worse on two; `bench/predictor.py`). Comes out: the
predictor in `cost_models/<device key>/` with its held-out metrics in its manifest (train), the
metrics table (eval), or a predictor for a new device adapted from another's with a few of its
measurements (adapt).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from hwaware.predict.features import Device
from hwaware.predict.metrics import TABLE_HEADER, Metrics, metrics, noise_floor
from hwaware.predict.predictor import LatencyPredictor, PredictorError
from hwaware.predict.profile import Sample, all_data_files, calm_samples, read_samples

HELD_OUT_SHARE = 5  # one in this many in-range architectures is held out


def is_held_out(sample: Sample) -> bool:
    """Whether a sample is kept out of training (stable: a hash of its architecture id)."""
    return sample.split != "train" or held_out_id(sample.id)


def calm(samples: Sequence[Sample]) -> list[Sample]:
    """The samples timed while the machine ran at its usual speed (`profile.calm_samples`): a
    latency measured on a slowed machine is no ground truth to train on or judge by."""
    return calm_samples(samples)


def held_out_id(arch_id: str) -> bool:
    """Whether an in-range architecture is held out of training (a hash of its id)."""
    return int(hashlib.sha1(arch_id.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def training_samples(samples: Sequence[Sample]) -> list[Sample]:
    return [s for s in calm(samples) if not is_held_out(s)]


def evaluation_splits(samples: Sequence[Sample], adapted_with: Collection[str] | None = None
                      ) -> dict[str, list[Sample]]:
    """Held-out samples by split: "held-out" (in range), "ood", "real". For a predictor adapted
    to this device (`adapted_with`: the ids of the samples it was adapted with), every calm
    sample but those: its base was trained on other devices and saw none of this one's."""
    splits: dict[str, list[Sample]] = {"held-out": [], "ood": [], "real": []}
    for s in calm(samples):
        if is_held_out(s) if adapted_with is None else s.id not in adapted_with:
            splits["held-out" if s.split == "train" else s.split].append(s)
    return splits


def evaluate(predictor: LatencyPredictor, samples: Sequence[Sample]) -> dict[str, Metrics]:
    """Metrics per split and per family of the held-out samples (`evaluation_splits`; an
    adapted predictor's manifest names the samples it was adapted with), and the noise floor
    (the second timing of each held-out model against its first)."""
    results: dict[str, Metrics] = {}
    splits = evaluation_splits(samples, predictor.manifest.get("adapted_with"))
    for name, group in splits.items():
        if group:
            results[name] = _metrics_of(predictor, group)
    held = splits["held-out"]
    for space in sorted({s.space for s in held}):
        results[f"held-out {space}"] = _metrics_of(predictor, [s for s in held if s.space == space])
    everything = [s for group in splits.values() for s in group]
    if everything:
        results["noise floor"] = noise_floor([s.latency_us for s in everything],
                                             [s.latency2_us for s in everything])
    return results


def _metrics_of(predictor: LatencyPredictor, group: Sequence[Sample]) -> Metrics:
    predicted = predictor.predict_samples(group)
    return metrics(list(predicted), [s.measured_us for s in group])


def table(results: dict[str, Metrics]) -> str:
    return "\n".join([TABLE_HEADER, *(m.row(name) for name, m in results.items())])


def run(args: argparse.Namespace) -> int:
    from hwaware.target import get_target

    files = all_data_files(Path(args.data))
    if getattr(args, "device", None):
        device = device_of_data(args.device, files)
    else:
        device = Device.of(get_target(args.target), args.threads)
    everyone = read_samples(files)
    samples = [s for s in everyone if s.device["key"] == device.key]
    models = Path(args.models)
    if args.action == "train":
        joint = not getattr(args, "alone", False)
        return _train(device, everyone if joint else samples, models, prior_of(args), joint)
    if args.action == "eval":
        predictor = LatencyPredictor.load(args.target, threads=args.threads,
                                          directory=models / device.key)
        return _print(evaluate(predictor, samples), args.json)
    return _adapt(args, device, samples, models)


def device_of_data(key: str, files: Sequence[Path]) -> Device:
    """The device its samples in `files` were measured on, by key (a device of another
    machine: its facts are in its samples, not in this machine's targets)."""
    samples = read_samples(files, key)
    if not samples:
        known = sorted({s.device["key"] for s in read_samples(files)})
        raise PredictorError(f"no profiled samples of device {key!r}; the data has: "
                             f"{', '.join(known) or 'none'}")
    return Device(**samples[0].device)


def prior_of(args: argparse.Namespace) -> str:
    """The kernel prior to train with: `--prior` where the parser has it (`hwaware.cli`),
    else "physical" (`LatencyPredictor.train` refuses any other value, naming the choices)."""
    return str(getattr(args, "prior", None) or "physical")


def _train(device: Device, samples: list[Sample], models: Path, prior: str = "physical",
           joint: bool = False) -> int:
    """Train `device`'s predictor on the training share of `samples` (of every device in them
    where `joint`) and judge it on `device`'s held-out ones."""
    predictor = LatencyPredictor.train(training_samples(samples), device, prior=prior,
                                       joint=joint)
    samples = [s for s in samples if s.device["key"] == device.key]
    results = evaluate(predictor, samples)
    predictor.manifest["metrics"] = {k: m.to_json() for k, m in results.items()}
    out = predictor.save(models / device.key)
    print(table(results))
    devices = predictor.manifest["training"].get("devices", {device.key: 0})
    print(f"trained on {predictor.manifest['training']['models']} models "
          f"({predictor.manifest['training']['kernels']} kernels, kernel prior {prior}, "
          f"{len(devices)} device(s)); saved to {out}")
    return 0


def _adapt(args: argparse.Namespace, device: Device, samples: list[Sample], models: Path
           ) -> int:
    """Adapt the base predictor (--base, or the trained one with the most training models)
    to `device` with `--samples` of its measurements, profiling the missing ones first."""
    base_dir = models / args.base if args.base else best_trained(models, exclude=device.key)
    base = LatencyPredictor.load(directory=base_dir)
    pool = training_samples(samples)
    if len(pool) < args.samples and getattr(args, "device", None):
        raise PredictorError(f"{len(pool)} measured models of {device.key} in the data; "
                             f"adapting needs {args.samples}: profile them on its machine")
    if len(pool) < args.samples:
        pool += _profile_for_adapting(args, device, args.samples - len(pool), pool)
    picked = [pool[i] for i in np.random.default_rng(0).permutation(len(pool))[: args.samples]]
    adapted = base.adapt(picked, device)
    results = evaluate(adapted, samples)
    adapted.manifest["metrics"] = {k: m.to_json() for k, m in results.items()}
    out = adapted.save(models / device.key)
    if results:
        print(table(results))
    print(f"adapted {base.key} to {device.key} with {len(picked)} measured models; "
          f"saved to {out}")
    return 0


def best_trained(models: Path, exclude: str) -> Path:
    """The folder of the trained (not adapted) predictor with the most training models."""
    found = []
    for manifest in sorted(models.glob("*/manifest.json")):
        try:
            doc = json.loads(manifest.read_text())
        except ValueError:
            continue
        if "adapted_from" not in doc and manifest.parent.name != exclude:
            found.append((doc.get("training", {}).get("models", 0), manifest.parent))
    if not found:
        raise PredictorError(f"no trained latency predictor in {models} to adapt from: train "
                             "one on a profiled device first (`hwaware predictor train`)")
    return max(found)[1]


def _profile_for_adapting(args: argparse.Namespace, device: Device, missing: int,
                          have: list[Sample]) -> list[Sample]:
    """Measure `missing` more in-range architectures on this device (kept for training)."""
    from hwaware.db import DEFAULT_DB_PATH, TuningDatabase
    from hwaware.predict import profile, spaces
    from hwaware.target import get_target

    done = {s.id for s in have}
    archs = [a for a in spaces.sample("all", 4 * (missing + len(done)), seed=0)
             if a.id not in done and not held_out_id(a.id)][:missing]
    with TuningDatabase(DEFAULT_DB_PATH) as db:
        return profile.profile(archs, get_target(args.target), device, db,
                               Path(args.data) / profile.data_file().name)


def _print(results: dict[str, Metrics], as_json: bool) -> int:
    if as_json:
        print(json.dumps({k: m.to_json() for k, m in results.items()}, indent=1))
    else:
        print(table(results))
    return 0
