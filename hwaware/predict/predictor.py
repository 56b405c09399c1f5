"""`LatencyPredictor`: a model's latency on a device as hwaware would compile it, without compiling.

Goes in: a model and example inputs (or a `Decomposition`), a trained predictor for a device
(`cost_models/<device key>/`), optionally a tuning database. The model is decomposed into the
kernels the build would make (`hwaware.decompose`: capture -> rewrite -> partition, no TVM
build); each kernel gets a time: `measured` when the database holds this kernel's as-built time
on this device (`hwaware profile` stores them), else `predicted` by an XGBoost regressor of
the log ratio of its time to a physical baseline (`features.baseline_us`: FLOPs at peak plus
bytes at bandwidth; a ratio carries over to kernels larger than any trained on, a time would
not; or, `prior="pretrained"`, of its time, boosting on from a regressor pretrained on that
baseline over the kernels of thousands of unmeasured architectures, `predict.pretrain`), or
`unknown` when its family or one
of its ops was never seen in training (still estimated by the same regressor, with one warning;
never a silent zero). A second, whole-model regressor predicts the ratio of the measured model
latency to the sum of its kernels' times (host ops, calls, thread wake-ups, cache effects);
it is trained on out-of-fold kernel predictions, so it also corrects the kernel regressor's
systematic errors as they appear on unseen architectures. One-block models (the `block`
family: one block of a real network at real scale, `KERNEL_ONLY_SPACES`) train the kernel
regressor only: their kernels are the real-scale ones the whole networks lack, but a one-kernel
model's whole-model ratio is mostly noise, and learning it made whole networks' estimates
worse. The build runs a model as its kernels called one by one, or, where it has no host op
and that is `MARGIN` faster, as one TVM call (`hwaware.build`); the profiler keeps the build's
timing of both plans, so there are two such regressors, one per plan (the one-call one where
the data has `MIN_ONE_CALL_MODELS` models timed both ways), and the prediction chooses between
them as the build does.

Comes out: a `LatencyEstimate`: `total_ms`, the whole-model term, and one `KernelEstimate` row
per kernel and per host op (family "host": an op the host program runs in PyTorch) with its
signature, family, shapes, ms and source.

Saved as XGBoost JSON (never pickle) plus `manifest.json`: feature schema version, device,
versions, training size and metrics. `adapt` fits a few-shot correction for a device the
predictor was not trained on (log-linear on the base prediction, shrunk toward the identity).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb

from hwaware.build import MARGIN
from hwaware.predict import PRIORS, device_dir
from hwaware.predict.features import (
    CATEGORY_NAMES,
    FEATURE_SCHEMA_VERSION,
    KERNEL_FEATURE_NAMES,
    MODEL_FEATURE_NAMES,
    MODEL_TOTAL_NAMES,
    Device,
    is_known_family,
    kernel_features,
    log_baseline_us,
    model_features,
    model_rows,
    model_totals,
    op_category,
)
from hwaware.predict.pretrain import PRETRAIN_ARCHS, PRETRAIN_SEED, pretraining_set
from hwaware.predict.profile import AS_BUILT, versions

MIN_TRAINING_MODELS = 20
FOLDS = 5
KERNEL_PARAMS = {"objective": "reg:squarederror", "eta": 0.05, "max_depth": 7,
                 "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 2.0,
                 "seed": 0}
KERNEL_ROUNDS = 600
MODEL_PARAMS = {"objective": "reg:squarederror", "eta": 0.05, "max_depth": 3,
                "subsample": 0.9, "min_child_weight": 3.0, "lambda": 5.0, "seed": 0}
MODEL_ROUNDS = 200
PRETRAIN_ROUNDS = 300  # of the pretrained kernel regressor, before fine-tuning adds `rounds`
FILES = ("kernel_model.json", "model_model.json")
# The whole-model regressor of the model run as one TVM call (`profile.ONE_CALL_PLANS`); the
# predictor chooses between it and the kernel calls as the build does (`hwaware.build.MARGIN`)
ONE_CALL_FILE = "one_call_model.json"
# profiled families whose models label kernels only, not the whole-model term (see above;
# bench/data/README.md has the figures)
KERNEL_ONLY_SPACES = frozenset({"block"})
MIN_ONE_CALL_MODELS = 10  # fewer of the device's models timed as one call: kernel calls only
TABLE_FILE = "kernel_table.json"  # signature -> measured microseconds, from the training data
# An adapted predictor's own files: the kernel correction regressor, and the kernels measured
# on its device (in the models it was adapted with)
CORRECTION_FILE = "kernel_correction.json"
DEVICE_TABLE_FILE = "device_kernel_table.json"
# The kernel correction of `adapt`: the log ratio of a kernel's time on the new device to the
# base predictor's estimate, a shallow, strongly regularised regressor (10 models give some
# 50-500 kernels), so it learns how the device differs by kernel kind and size (a second
# thread speeds up large kernels, not small ones; AVX-512 speeds up compute-bound ones) and
# not the base estimates' own noise
CORRECTION_PARAMS = {"objective": "reg:squarederror", "eta": 0.1, "max_depth": 2,
                     "subsample": 1.0, "min_child_weight": 5.0, "lambda": 10.0, "seed": 0}
CORRECTION_ROUNDS = 40
MIN_CORRECTION_KERNELS = 10


class PredictorError(ValueError):
    """A predictor that cannot be trained, found, or loaded (the message says why and what to
    run)."""


class UnknownKernelWarning(UserWarning):
    """A kernel of a family or with ops the predictor was never trained on: estimated anyway."""


@dataclass(frozen=True)
class KernelEstimate:
    signature: str
    family: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shapes: tuple[tuple[int, ...], ...]
    ms: float
    source: str  # "measured", "predicted" or "unknown"


@dataclass(frozen=True)
class LatencyEstimate:
    """A model's predicted latency on one device."""

    model: str
    device: str
    total_ms: float
    overhead_ms: float  # the whole-model term: total minus the kernels' sum
    kernels: tuple[KernelEstimate, ...]

    def table(self) -> str:
        lines = [f"{self.model} on {self.device}: {self.total_ms:.3f} ms "
                 f"({len(self.kernels)} kernels, whole-model term {self.overhead_ms:+.3f} ms)",
                 f"{'family':<16}{'ms':>10}  {'source':<10}signature"]
        lines += [f"{k.family:<16}{k.ms:>10.4f}  {k.source:<10}{k.signature}"
                  for k in self.kernels]
        return "\n".join(lines)


@dataclass
class TrainingSet:
    """Samples (`profile.Sample`) flattened for XGBoost. Samples of other devices than `device`
    (a joint predictor's) are described by their own device's features."""

    samples: list[Any]
    device: Device
    prior: str = "physical"  # the kernel label's baseline: PRIORS
    base: xgb.Booster | None = None  # the pretrained kernel regressor fine-tuning continues
    kernel_rows: np.ndarray = field(init=False)
    kernel_log_ratio: np.ndarray = field(init=False)  # the label: log(measured us / baseline us)
    kernel_log_baseline: np.ndarray = field(init=False)
    kernel_owner: np.ndarray = field(init=False)  # the sample index of each kernel row
    signatures: list[str] = field(init=False)
    devices: list[Device] = field(init=False)  # each sample's

    def __post_init__(self) -> None:
        rows, labels, baselines, owners, self.signatures = [], [], [], [], []
        self.devices = [self.device if s.device["key"] == self.device.key else Device(**s.device)
                        for s in self.samples]
        for i, (s, device) in enumerate(zip(self.samples, self.devices, strict=True)):
            for record, us in zip(s.records, s.kernel_us, strict=True):
                rows.append(kernel_features(record, device))
                baselines.append(_log_baseline(record, device, self.prior))
                labels.append(math.log(max(us, 1e-3)) - baselines[-1])
                owners.append(i)
                self.signatures.append(record.signature)
        self.kernel_rows = np.asarray(rows, dtype=np.float32).reshape(-1,
                                                                      len(KERNEL_FEATURE_NAMES))
        self.kernel_log_ratio = np.asarray(labels, dtype=np.float32)
        self.kernel_log_baseline = np.asarray(baselines, dtype=np.float64)
        self.kernel_owner = np.asarray(owners, dtype=np.int64)


class LatencyPredictor:
    """Kernel and whole-model regressors for one device (see module docstring)."""

    def __init__(self, kernel_model: xgb.Booster, model_model: xgb.Booster,
                 manifest: dict[str, Any], table: dict[str, float], db: Any = None,
                 kernel_correction: xgb.Booster | None = None,
                 device_table: dict[str, float] | None = None,
                 one_call_model: xgb.Booster | None = None):
        self.kernel_model = kernel_model
        self.model_model = model_model  # the model as kernel calls
        self.one_call_model = one_call_model  # the model as one TVM call (None: never)
        self.table = table  # kernels measured in the training data, by signature
        # adapted: the base estimates' correction for this device, and its measured kernels
        self.kernel_correction = kernel_correction
        self.device_table = device_table or {}
        self.manifest = manifest
        self.db = db
        self.device = Device(**manifest["feature_device"])  # what the features describe
        self.key = str(manifest["device"]["key"])  # the device the latencies are for
        self.correction = tuple(manifest.get("correction", (0.0, 1.0)))
        self.overhead = list(manifest.get("overhead_us", [0.0, 0.0, 0.0]))
        self.known_ops = frozenset(manifest.get("known_op_categories", CATEGORY_NAMES))
        self.prior = str(manifest.get("kernel_prior", "physical"))

    # ----------------------------------------------------------------- training
    @staticmethod
    def train(samples: Sequence[Any], device: Device, *, rounds: int = KERNEL_ROUNDS,
              prior: str = "physical", min_models: int = MIN_TRAINING_MODELS,
              pretrain_archs: int = PRETRAIN_ARCHS, joint: bool = False) -> LatencyPredictor:
        """Fit both regressors on `samples` (profiled on `device`). `prior`: what the kernel
        regressor learns relative to: "physical" (`features.baseline_us`, free statistics of
        the kernel: its FLOPs and bytes on the device), "none" (its time itself), or
        "pretrained" (its time, boosting on from a regressor pretrained on the baselines of
        the kernels of `pretrain_archs` unmeasured architectures: `predict.pretrain`).
        `min_models`: fewer samples of `device` are refused, also when `joint` (a device
        without them is adapted to: `adapt`; `bench/predictor.py` goes below the default).
        `joint`: train on the samples of every device in `samples`, each described by its own
        device's features (one regressor learns how kernels differ between CPU kinds and
        thread counts; only the kernels measured on `device` answer as measured), else on
        `device`'s alone."""
        if prior not in PRIORS:
            raise PredictorError(f"prior {prior!r}: choose one of {', '.join(PRIORS)}")
        own = _enough_samples(samples, device, min_models)
        samples = list(samples) if joint else own
        if not samples:
            raise PredictorError("no profiled models to train on")
        base, pretraining = (pretrained_kernel_model(device, pretrain_archs)
                             if prior == "pretrained" else (None, None))
        data = TrainingSet(list(samples), device, prior, base)
        oof = _out_of_fold_kernel_us(data, rounds)
        kernel_model = _fit(data.kernel_rows, data.kernel_log_ratio, KERNEL_PARAMS, rounds, base)
        calls_us, one_call_us = zip(*(_whole_model_labels(s) for s in samples), strict=True)
        overhead = _fit_overhead(data, oof, calls_us)
        model_model = _fit(*_model_rows(data, oof, overhead, calls_us), MODEL_PARAMS,
                           MODEL_ROUNDS)
        one_call_rows, one_call_ratios = _model_rows(data, oof, overhead, one_call_us)
        # only where `device`'s own samples have the build's plan timings: without them its
        # models' latencies (whichever plan the build chose) all trained the kernel-call one
        timed_here = sum(u is not None and s.device["key"] == device.key
                         for s, u in zip(samples, one_call_us, strict=True))
        one_call_model = (_fit(one_call_rows, one_call_ratios, MODEL_PARAMS, MODEL_ROUNDS)
                          if timed_here >= MIN_ONE_CALL_MODELS else None)
        manifest = {**_manifest(device, device, samples, data), "overhead_us": overhead,
                    "kernel_prior": prior}
        manifest["training"]["one_call_models"] = len(one_call_ratios)
        if joint:
            manifest["training"]["devices"] = dict(Counter(s.device["key"] for s in samples))
        if pretraining is not None:
            manifest["pretraining"] = pretraining
        return LatencyPredictor(kernel_model, model_model, manifest, measured_table(own),
                                one_call_model=one_call_model)

    def adapt(self, samples: Sequence[Any], device: Device) -> LatencyPredictor:
        """This predictor corrected for `device` from a few of its measured models (few-shot
        transfer without retraining). Kernel level: the models' kernels measured on `device`
        answer for themselves, and a shallow regressor of the log ratio of each of their times
        to this predictor's estimate (`CORRECTION_PARAMS`) corrects every other kernel's
        estimate; a device does not differ by one factor (and one scale cannot change a
        ranking). Model level: one scale, the median ratio of
        measured to predicted latency, applied only where it stands out of the ratios' own
        spread (a correction fitted to 10 noisy ratios made predictions worse than none on
        devices that differ little; a fitted slope as well fitted the base predictor's
        errors). Needs at least 3 samples."""
        samples = [s for s in samples if s.device["key"] == device.key]
        if len(samples) < 3:
            raise PredictorError(f"{len(samples)} measured models of device {device.key}; "
                                 "adapting needs at least 3 (10-20 recommended)")
        base = self.unadapted() if "adapted_from" in self.manifest else self
        manifest = {**base.manifest, "device": device.to_json(), "correction": [0.0, 1.0],
                    "adapted_from": base.key, "base_device": base.manifest["device"],
                    "adapt_samples": len(samples), "created_at": time.time(),
                    "adapted_with": sorted(s.id for s in samples)}
        adapted = LatencyPredictor(base.kernel_model, base.model_model, manifest, base.table,
                                   self.db, base.kernel_correction_for(samples),
                                   measured_table(samples), base.one_call_model)
        predicted = np.log(adapted.predict_samples(samples, corrected=False))
        measured = np.log([s.measured_us for s in samples])
        adapted.correction = (_significant_median(measured - predicted), 1.0)
        adapted.manifest["correction"] = list(adapted.correction)
        return adapted

    def kernel_correction_for(self, samples: Sequence[Any]) -> xgb.Booster | None:
        """The kernel correction regressor fitted to the kernels of `samples` (measured on
        another device): None where they hold fewer than `MIN_CORRECTION_KERNELS` timed
        kernels."""
        records = [r for s in samples for r, us in zip(s.records, s.kernel_us, strict=True)
                   if us > 0]
        if len(records) < MIN_CORRECTION_KERNELS:
            return None
        measured = np.asarray([us for s in samples for us in s.kernel_us if us > 0])
        estimated, _ = self.kernel_times(records, use_db=False)
        return _fit(self._rows(records), np.log(measured) - np.log(np.maximum(estimated, 1e-3)),
                    CORRECTION_PARAMS, CORRECTION_ROUNDS)

    def unadapted(self) -> LatencyPredictor:
        """The predictor this one was adapted from (its kernel and whole-model regressors,
        without this device's corrections and measured kernels)."""
        manifest = {k: v for k, v in self.manifest.items()
                    if k not in ("correction", "adapted_from", "adapt_samples", "base_device",
                                 "adapted_with")}
        manifest["device"] = self.manifest.get("base_device", self.manifest["device"])
        return LatencyPredictor(self.kernel_model, self.model_model, manifest, self.table,
                                self.db, one_call_model=self.one_call_model)

    def with_db(self, db: Any) -> LatencyPredictor:
        """This predictor answering with `db`'s measured kernels."""
        return LatencyPredictor(self.kernel_model, self.model_model, self.manifest, self.table,
                                db, self.kernel_correction, self.device_table,
                                self.one_call_model)

    # -------------------------------------------------------------- prediction
    def predict(self, model: Any, example_inputs: Any, calibration: Sequence[Any] | None = None
                ) -> Any:
        """The latency `model` will have once hwaware compiles it for this device: a
        `LatencyEstimate`; with `calibration` inputs, a model with value-dependent control
        flow gets a `dynamic.DynamicEstimate` (per path, expected, p95)."""
        from hwaware.decompose import decompose

        if calibration is not None:
            from hwaware.predict.dynamic import predict_dynamic

            return predict_dynamic(self, model, _inputs(example_inputs), calibration)
        return self.predict_decomposition(decompose(model, example_inputs))

    def predict_decomposition(self, decomposition: Any) -> LatencyEstimate:
        records = list(decomposition.priced)
        us, sources = self.kernel_times(records)
        unknown = [r for r, s in zip(records, sources, strict=True) if s == "unknown"]
        if unknown:
            warnings.warn(
                f"hwaware: {len(unknown)} kernel(s) of {decomposition.model} are of a kind the "
                f"latency predictor was not trained on (estimated anyway): "
                f"{', '.join(sorted({_kind(r) for r in unknown}))}", UnknownKernelWarning,
                stacklevel=3)
        total_us = self._total_us(records, decomposition.host_steps, us)
        kernels = tuple(KernelEstimate(r.signature, r.family, r.input_shapes, r.output_shapes,
                                       float(u) / 1e3, s)
                        for r, u, s in zip(records, us, sources, strict=True))
        return LatencyEstimate(decomposition.model, self.key, total_us / 1e3,
                               (total_us - float(np.sum(us))) / 1e3, kernels)

    def kernel_times(self, records: Sequence[Any], use_db: bool = True
                     ) -> tuple[np.ndarray, list[str]]:
        """Each kernel's microseconds and source: measured on this device (the database, then
        the training data's table; adapted: the kernels measured on its device), else
        predicted (or unknown: predicted all the same). An adapted predictor's estimates are
        the base device's (its table, else its regressor) times the kernel correction."""
        rows = self._rows(records)
        us = self._regressor_us(rows, records)
        sources = [self._source(r) for r in records]
        own_table = "adapted_from" not in self.manifest  # else: another device's times
        for i, record in enumerate(records):
            if record.signature in self.table:
                us[i] = self.table[record.signature]
                sources[i] = "measured" if own_table else "predicted"
        us *= self._correction_factors(rows)
        for i, record in enumerate(records):
            measured = self._measured_us(record.signature) if use_db else None
            if measured is None:
                measured = self.device_table.get(record.signature)
            if measured is not None:
                us[i], sources[i] = measured, "measured"
        return us, sources

    def predict_kernels(self, records: Sequence[Any], corrected: bool = True) -> np.ndarray:
        """Predicted microseconds of many kernels at once (the regressor only, and an adapted
        predictor's kernel correction unless not `corrected`)."""
        rows = self._rows(records)
        us = self._regressor_us(rows, records)
        return us * self._correction_factors(rows) if corrected else us

    def _rows(self, records: Sequence[Any]) -> np.ndarray:
        """The kernels' feature rows (cached per kernel: search loops meet them again)."""
        return np.asarray([_cached_features(r, self.device) for r in records],
                          dtype=np.float32).reshape(-1, len(KERNEL_FEATURE_NAMES))

    def _regressor_us(self, rows: np.ndarray, records: Sequence[Any]) -> np.ndarray:
        if not records:
            return np.zeros(0)
        log_baselines = np.asarray([_log_baseline(r, self.device, self.prior)
                                    for r in records])
        return np.exp(self.kernel_model.inplace_predict(rows).astype(np.float64) + log_baselines)

    def _correction_factors(self, rows: np.ndarray) -> np.ndarray | float:
        """An adapted predictor's kernel correction (1 where it has none)."""
        if self.kernel_correction is None or not len(rows):
            return 1.0
        return np.exp(self.kernel_correction.inplace_predict(rows).astype(np.float64))

    def predict_samples(self, samples: Sequence[Any], corrected: bool = True) -> np.ndarray:
        """Predicted whole-model microseconds of profiled samples, without the database (it
        holds the held-out models' own measurements; evaluation must not see them)."""
        totals = []
        for s in samples:
            records = s.records
            us, _ = self.kernel_times(records, use_db=False)
            totals.append(self._total_us(records, s.host_steps, us, corrected))
        return np.asarray(totals)

    def _total_us(self, records: list[Any], host_steps: int, kernel_us: np.ndarray,
                  corrected: bool = True) -> float:
        totals = model_totals(records, host_steps, list(kernel_us))
        return float(self.total_us_of_totals(totals[None, :], corrected)[0])

    def total_us_of_totals(self, totals: np.ndarray, corrected: bool = True) -> np.ndarray:
        """Whole-model microseconds of many models at once from their additive totals
        (`features.model_totals`, one row per model): the kernels' sum plus the linear
        overhead term, times the whole-model regressor's ratio (of the model as kernel calls,
        or as one TVM call where it has no host op and that is `MARGIN` faster, as the build
        chooses), and the device correction."""
        rows = model_rows(totals, self.device)
        per_kernel, per_host_step, per_call = self.overhead
        column = MODEL_TOTAL_NAMES.index
        base = np.maximum(totals[:, column("kernel_sum_us")]
                          + per_kernel * totals[:, column("kernels")]
                          + per_host_step * totals[:, column("host_steps")] + per_call, 1e-3)
        total = base * np.exp(self.model_model.inplace_predict(rows).astype(np.float64))
        if self.one_call_model is not None:
            one_call = base * np.exp(self.one_call_model.inplace_predict(rows).astype(np.float64))
            chosen = (totals[:, column("host_steps")] == 0) & (one_call * (1 + MARGIN) < total)
            total = np.where(chosen, one_call, total)
        if corrected and self.correction != (0.0, 1.0):
            a, b = self.correction
            total = np.exp(a + b * np.log(np.maximum(total, 1e-3)))
        return np.asarray(total)

    def _source(self, record: Any) -> str:
        known = is_known_family(record.family) and record.family in self.manifest.get(
            "known_families", [record.family])
        ops_known = all(op_category(op) in self.known_ops for op in record.ops)
        return "predicted" if known and ops_known else "unknown"

    def _measured_us(self, signature: str) -> float | None:
        if self.db is None:
            return None
        times = [m.run_us for m in self.db.kernel_measurements(self.key, signature)
                 if m.impl == AS_BUILT]
        return float(np.median(times)) if times else None

    # --------------------------------------------------------------- save/load
    def save(self, directory: str | Path | None = None) -> Path:
        """Write the regressors (XGBoost JSON) and the manifest to `directory` (default:
        `cost_models/<device key>/`)."""
        out = Path(directory) if directory else device_dir(self.key)
        out.mkdir(parents=True, exist_ok=True)
        boosters = {FILES[0]: self.kernel_model, FILES[1]: self.model_model,
                    CORRECTION_FILE: self.kernel_correction, ONE_CALL_FILE: self.one_call_model}
        tables = {TABLE_FILE: self.table, DEVICE_TABLE_FILE: self.device_table}
        for name in (CORRECTION_FILE, DEVICE_TABLE_FILE, ONE_CALL_FILE):  # of an earlier save
            (out / name).unlink(missing_ok=True)
        for name, booster in boosters.items():
            if booster is not None:
                booster.save_model(out / name)
        for name, table in tables.items():
            if table or name == TABLE_FILE:
                (out / name).write_text(json.dumps(table, sort_keys=True, indent=0))
        files = {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                 for name in (*boosters, *tables) if (out / name).exists()}
        manifest = {**self.manifest, "files": files}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        self.manifest = manifest
        return out

    @staticmethod
    def load(target: Any = "host", db: Any = None, threads: int | None = None,
             directory: str | Path | None = None) -> LatencyPredictor:
        """The predictor saved for `target` run with `threads` (or the one in `directory`);
        `db` (a `TuningDatabase` or its path) supplies measured kernel times."""
        from hwaware.db import open_db
        from hwaware.target import get_target

        tgt = get_target(target)
        key = Device.of(tgt, threads).key
        folder = Path(directory) if directory else device_dir(key)
        manifest = _read_manifest(folder, target, key, threads)
        boosters = [_read_booster(folder / name, manifest) for name in FILES]
        table = _read_table(folder / TABLE_FILE, manifest)
        saved = manifest.get("files", {})
        correction, one_call = (_read_booster(folder / name, manifest) if name in saved else None
                                for name in (CORRECTION_FILE, ONE_CALL_FILE))
        device_table = _read_table(folder / DEVICE_TABLE_FILE, manifest) \
            if DEVICE_TABLE_FILE in saved else None
        return LatencyPredictor(boosters[0], boosters[1], manifest, table, open_db(db),
                                correction, device_table, one_call)


# ------------------------------------------------------------------------------- helpers
def _enough_samples(samples: Sequence[Any], device: Device, least: int) -> list[Any]:
    """The samples of `device`, or a `PredictorError` where they are fewer than `least`."""
    own = [s for s in samples if s.device["key"] == device.key]
    if len(own) < least:
        raise PredictorError(
            f"{len(own)} profiled models exist for device {device.key}; training needs "
            f"at least {least}: run `hwaware profile --samples {least * 5}` for this target "
            "first")
    return own


@functools.lru_cache(maxsize=4)
def pretrained_kernel_model(device: Device, archs: int = PRETRAIN_ARCHS
                            ) -> tuple[xgb.Booster, dict[str, Any]]:
    """The kernel regressor pretrained for `device` on the log baselines of the kernels of
    `archs` unmeasured architectures (`pretrain.pretraining_set`), and what the manifest
    records of it. Fine-tuning boosts on from it (`xgb.train(xgb_model=...)` copies it): its
    trees stay in the saved regressor, which then answers log microseconds like prior "none".
    Continued boosting rather than the pretrained answer as an extra feature: trees cannot
    extrapolate a feature either, and one booster saves and loads like the other priors."""
    start = time.perf_counter()
    data = pretraining_set(device, archs, PRETRAIN_SEED)
    booster = _fit(data.rows, data.log_baseline_us, KERNEL_PARAMS, PRETRAIN_ROUNDS)
    return booster, {**data.describe(), "rounds": PRETRAIN_ROUNDS,
                     "seconds": round(time.perf_counter() - start, 1)}


@functools.lru_cache(maxsize=200_000)
def _cached_features(record: Any, device: Device) -> list[float]:
    """Kernel features, computed once per (kernel, device): search loops meet the same
    kernels again and again."""
    return kernel_features(record, device)


@functools.lru_cache(maxsize=200_000)
def _log_baseline(record: Any, device: Device, prior: str) -> float:
    """log of the kernel's baseline microseconds (cached like its features: search loops
    price the same kernels again and again)."""
    if prior != "physical":  # "none", "pretrained": the regressor answers log microseconds
        return 0.0
    return log_baseline_us(record, device)


def _inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    return (example_inputs,)


def _kind(record: Any) -> str:
    if not is_known_family(record.family):
        return f"family {record.family}"
    ops = sorted({op for op in record.ops if op_category(op) == "other_op"})
    return f"{record.family} with {', '.join(ops)}" if ops else record.family


def _fit(rows: np.ndarray, labels: np.ndarray, params: dict[str, Any], rounds: int,
         base: xgb.Booster | None = None) -> xgb.Booster:
    """`rounds` rounds of boosting, on from `base` where given (which stays unchanged)."""
    matrix = xgb.DMatrix(rows, label=labels, feature_names=None)
    return xgb.train(params, matrix, num_boost_round=rounds, xgb_model=base)


def measured_table(samples: Sequence[Any]) -> dict[str, float]:
    """Each kernel signature measured in `samples`: its median microseconds."""
    times: dict[str, list[float]] = {}
    for s in samples:
        for record, us in zip(s.records, s.kernel_us, strict=True):
            if us > 0:
                times.setdefault(record.signature, []).append(us)
    return {sig: float(np.median(t)) for sig, t in times.items()}


def _out_of_fold_kernel_us(data: TrainingSet, rounds: int) -> np.ndarray:
    """Each kernel's microseconds as a predictor that never saw its model would give them:
    measured in another fold's models, else predicted by a regressor trained on those."""
    fold_of_sample = np.random.default_rng(0).permutation(len(data.samples)) % FOLDS
    fold = fold_of_sample[data.kernel_owner]
    result = np.zeros(len(data.kernel_log_ratio))
    for k in range(FOLDS):
        held = fold == k
        if not held.any() or held.all():
            continue
        booster = _fit(data.kernel_rows[~held], data.kernel_log_ratio[~held], KERNEL_PARAMS,
                       rounds, data.base)
        result[held] = np.exp(booster.inplace_predict(data.kernel_rows[held])
                              + data.kernel_log_baseline[held])
        tables = {key: measured_table([s for i, s in enumerate(data.samples)
                                       if fold_of_sample[i] != k and s.device["key"] == key])
                  for key in {d.key for d in data.devices}}
        for row in np.flatnonzero(held):
            owner = data.kernel_owner[row]
            known = tables[data.devices[owner].key].get(data.signatures[row])
            if known is not None:
                result[row] = known
    return result


def _whole_model_labels(sample: Any) -> tuple[float | None, float | None]:
    """The sample's latency as kernel calls and as one call, the whole-model regressors'
    labels (`Sample.plan_latencies`); none for a sample of `KERNEL_ONLY_SPACES`."""
    return (None, None) if sample.space in KERNEL_ONLY_SPACES else sample.plan_latencies()


def _base_us(kernel_us: Any, kernels: int, host_steps: int, overhead: list[float]) -> float:
    """The kernels' sum plus the linear whole-model term (per kernel call, per host op step,
    per model call); the regressor of the whole-model term predicts the ratio to this."""
    per_kernel, per_host_step, per_call = overhead
    return max(float(np.sum(kernel_us)) + per_kernel * kernels + per_host_step * host_steps
               + per_call, 1e-3)


def _fit_overhead(data: TrainingSet, kernel_us: np.ndarray, latencies: Sequence[float | None]
                  ) -> list[float]:
    """Non-negative least squares of (model latency - kernels' sum) on the counts of kernel
    calls and host op steps and a constant: the additive part of the whole-model term, fitted
    to the models' `latencies` as kernel calls (None: not known). Each model's row is divided
    by its latency (relative errors: the gaps of models of tens of milliseconds must not set a
    per-call cost for models of a hundred microseconds)."""
    from scipy.optimize import nnls

    rows, gaps, weights = [], [], []
    for i, (s, latency) in enumerate(zip(data.samples, latencies, strict=True)):
        if latency is None:
            continue
        us = kernel_us[data.kernel_owner == i]
        rows.append([float(len(us)), float(s.host_steps), 1.0])
        gaps.append(latency - float(np.sum(us)))
        weights.append(1.0 / latency)
    w = np.asarray(weights)
    coefficients, _ = nnls(np.asarray(rows) * w[:, None], np.asarray(gaps) * w)
    return [float(c) for c in coefficients]


def _model_rows(data: TrainingSet, kernel_us: np.ndarray, overhead: list[float],
                latencies: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    """The whole-model regressor's rows and labels (log of each model's latency in one plan,
    None where not known, over its kernels' sum plus the linear overhead term)."""
    rows, ratios = [], []
    for i, (s, latency) in enumerate(zip(data.samples, latencies, strict=True)):
        if latency is None:
            continue
        us = kernel_us[data.kernel_owner == i]
        rows.append(model_features(s.records, s.host_steps, list(us), data.devices[i]))
        base = _base_us(us, len(us), s.host_steps, overhead)
        ratios.append(math.log(latency) - math.log(base))
    return (np.asarray(rows, dtype=np.float32).reshape(-1, len(MODEL_FEATURE_NAMES)),
            np.asarray(ratios, dtype=np.float32))


def _significant_median(log_ratios: np.ndarray) -> float:
    """The median log ratio, or 0 where it is within two standard errors (robust: from the
    median absolute deviation) of no change."""
    median = float(np.median(log_ratios))
    spread = 1.4826 * float(np.median(np.abs(log_ratios - median)))
    return median if abs(median) > 2 * spread / math.sqrt(len(log_ratios)) else 0.0


def _manifest(device: Device, feature_device: Device, samples: Sequence[Any],
              data: TrainingSet) -> dict[str, Any]:
    families = sorted({r.family for s in samples for r in s.records})
    categories = sorted({op_category(op) for s in samples for r in s.records for op in r.ops})
    return {
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
        "device": device.to_json(), "feature_device": feature_device.to_json(),
        "versions": {**versions(), "xgboost": xgb.__version__},
        "training": {"models": len(samples), "kernels": int(len(data.kernel_log_ratio)),
                     "spaces": sorted({s.space for s in samples}),
                     "cpus": sorted({s.cpu for s in samples})},
        "known_families": families, "known_op_categories": categories,
        "correction": [0.0, 1.0], "created_at": time.time(),
    }


def _read_manifest(folder: Path, target: Any, key: str, threads: int | None) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.exists():
        flag = f" --threads {threads}" if threads else ""
        raise PredictorError(
            f"no latency predictor for target {target} ({key}) in {folder}: make one with "
            f"`hwaware profile --target {target}{flag}` then `hwaware predictor train "
            f"--target {target}{flag}`")
    try:
        manifest = json.loads(path.read_text())
        version = manifest["feature_schema_version"]
        Device(**manifest["feature_device"])
    except (ValueError, KeyError, TypeError) as err:
        raise PredictorError(f"{path}: corrupt predictor manifest ({err})") from err
    if version != FEATURE_SCHEMA_VERSION:
        raise PredictorError(
            f"{path}: predictor made with feature schema version {version}; this hwaware "
            f"computes version {FEATURE_SCHEMA_VERSION}: train it again "
            f"(`hwaware predictor train --target {target}`)")
    return dict(manifest)


def _check_file(path: Path, manifest: dict[str, Any]) -> None:
    if not path.exists():
        raise PredictorError(f"{path}: missing predictor file")
    expected = manifest.get("files", {}).get(path.name)
    if expected and hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise PredictorError(f"{path}: corrupt predictor file (its checksum differs from the "
                             "manifest's)")


def _read_table(path: Path, manifest: dict[str, Any]) -> dict[str, float]:
    _check_file(path, manifest)
    try:
        table = json.loads(path.read_text())
        return {str(k): float(v) for k, v in table.items()}
    except (ValueError, AttributeError, TypeError) as err:
        raise PredictorError(f"{path}: corrupt predictor file ({err})") from err


def _read_booster(path: Path, manifest: dict[str, Any]) -> xgb.Booster:
    _check_file(path, manifest)
    booster = xgb.Booster()
    try:
        booster.load_model(path)
    except xgb.core.XGBoostError as err:
        raise PredictorError(f"{path}: corrupt predictor file ({err})") from err
    return booster
