"""The pretraining set: free statistics of thousands of unmeasured architectures' kernels.

FBNetV3's predictor pretraining, for a tree regressor: before it sees a single measurement, the
kernel regressor learns a proxy target that costs nothing to compute, then continues boosting on
the measured kernels (`LatencyPredictor.train(prior="pretrained")`).

Goes in: a device, how many architectures (`PRETRAIN_ARCHS`) and a seed. The architectures are
drawn from the predictor's parametric spaces (`spaces.sample`, an equal share per whole-network
family, `spaces.NETWORK_FAMILIES`; one in `OOD_SHARE` beyond the training range, so the proxy
covers kernels larger than any measured) and decomposed (capture -> rewrite -> partition:
nothing is compiled or measured); each architecture's kernels are cached on disk
(`cache.KernelRecordCache`, keyed by its id and the decomposing code's fingerprint), so only
the first run pays for the decompositions.
Comes out: a `PretrainingSet`: the distinct kernels (first seen first, by signature), their feature
rows (`features.kernel_features`) and the proxy target, the log of the kernel's physical
baseline on the device (`features.log_baseline_us`: FLOPs at peak plus bytes at bandwidth plus a
call's floor). FLOPs or bytes alone are features already and not on a time scale; the baseline
combines them on the scale of the label the fine-tuning continues on (log microseconds).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwaware.decompose import KernelRecord
from hwaware.predict.cache import KernelRecordCache, code_fingerprint
from hwaware.predict.features import Device, kernel_matrix, log_baseline_us
from hwaware.predict.spaces import NETWORK_FAMILIES, Architecture, sample

log = logging.getLogger(__name__)

PRETRAIN_ARCHS = 2000
PRETRAIN_SEED = 0
OOD_SHARE = 4  # one in this many pretraining architectures is drawn beyond the range
CACHE_NAME = "predict-spaces"


@dataclass(frozen=True)
class PretrainingSet:
    """Distinct kernels of the sampled architectures, their features and proxy targets."""

    archs: int
    seed: int
    signatures: tuple[str, ...]
    rows: np.ndarray  # float32, one `features.KERNEL_FEATURE_NAMES` row per kernel
    log_baseline_us: np.ndarray  # the proxy target
    seconds: float  # to make the set (decompositions found in the cache cost nothing)

    def describe(self) -> dict[str, object]:
        """What a predictor's manifest records of its pretraining."""
        return {"archs": self.archs, "seed": self.seed, "kernels": len(self.signatures),
                "proxy": "log baseline_us", "spaces": "hwaware.predict.spaces (all)",
                "ood_share": 1 / OOD_SHARE}


def pretraining_archs(count: int = PRETRAIN_ARCHS, seed: int = PRETRAIN_SEED
                      ) -> list[Architecture]:
    """Up to `count` distinct architectures, an equal share of every predictor space, in range
    and (one in `OOD_SHARE`) beyond it, the same for the same seed. A space smaller than its
    share gives all it has (the in-range transformers are 192)."""
    beyond = count // OOD_SHARE
    archs = []
    for ood, total in ((False, count - beyond), (True, beyond)):
        for i, name in enumerate(NETWORK_FAMILIES):
            share = total // len(NETWORK_FAMILIES) + (i < total % len(NETWORK_FAMILIES))
            archs += sample(name, share, seed=seed, ood=ood)
    return archs


def pretraining_records(archs: list[Architecture], directory: Path | None = None
                        ) -> list[KernelRecord]:
    """The distinct kernels of `archs` (first seen first), decomposing those not cached."""
    cache = KernelRecordCache(_cache_dir(directory) / f"{CACHE_NAME}-"
                              f"{code_fingerprint(CACHE_NAME)}.jsonl")
    missing = [a for a in archs if cache.lookup(a.id) is None]
    for arch in _progress(missing):
        records = _decompose(arch)
        if records is not None:
            cache.store(arch.id, records, 0)
    distinct: dict[str, KernelRecord] = {}
    for arch in archs:
        for record in (cache.lookup(arch.id) or ([], 0))[0]:
            distinct.setdefault(record.signature, record)
    return list(distinct.values())


def pretraining_set(device: Device, count: int = PRETRAIN_ARCHS, seed: int = PRETRAIN_SEED,
                    directory: Path | None = None) -> PretrainingSet:
    """The pretraining set of `count` architectures for `device` (see the module docstring)."""
    start = time.perf_counter()
    records = pretraining_records(pretraining_archs(count, seed), directory)
    targets = np.asarray([log_baseline_us(r, device) for r in records], dtype=np.float32)
    return PretrainingSet(count, seed, tuple(r.signature for r in records),
                          kernel_matrix(records, device), targets,
                          time.perf_counter() - start)


def _decompose(arch: Architecture) -> list[KernelRecord] | None:
    """The architecture's kernels, or None (logged) where it does not decompose."""
    from hwaware.decompose import decompose

    try:
        model, inputs = arch.build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(decompose(model, inputs).kernels)
    except Exception as err:  # noqa: BLE001 - one architecture must not stop pretraining
        log.warning("pretraining: %s does not decompose (%s: %s); skipped", arch.id,
                    type(err).__name__, err)
        return None


def _cache_dir(directory: Path | None) -> Path:
    from hwaware.threads import cache_dir

    return directory or cache_dir() / "predict"


def _progress(archs: list[Architecture]) -> Iterable[Architecture]:
    if len(archs) < 20:
        return archs
    from tqdm import tqdm

    return tqdm(archs, desc="decompose pretraining architectures", unit="model")
