"""Search cost model: MetaSchedule's XGBoost model kept per target, so each tuning session
starts from what the previous ones learned.

Goes in: a target key; after a session, the `WarmXGBModel` it trained. Comes out:
`cost_models/<target key>/metaschedule/` (`model_dir`), written atomically
(`hwaware.manifest.save_atomically`) after every session:
- `booster.json`: the XGBoost booster (`save_model`, JSON), trained on exactly the stored data;
- `samples.npz`: every stored candidate's feature rows and measured cost, in plain numeric
  arrays (read with `allow_pickle=False`; TVM's own `XGBModel.save` pickles object arrays);
- `cost_model.json`: format version, target key, TVM / xgboost versions, groups (MetaSchedule
  workload hashes) with their sample counts;
- `manifest.json`: a SHA-256 of each file.

The stored data is capped at `MAX_FEATURE_BYTES` of features (float32), newest groups first
(this session's workloads are the newest), so a target's folder stays a few MB however many
sessions it has seen.

`warm_model` makes the session's cost model from that folder: data, sample count and booster
as a live model has them after training, so the search ranks candidates with it from its
first generation. A folder of another TVM version or target, or with a corrupt, truncated or
missing file, gives one `ColdStartWarning` naming the file and reason, and the session starts
cold (never fails). Root folder: `cost_models/`, or `$HWAWARE_SEARCH_MODELS_DIR`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import xgboost as xgb
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup
from tvm.s_tir.meta_schedule.utils import shash2hex

from hwaware import manifest
from hwaware.predict import device_dir

FORMAT_VERSION = 1
KIND = "search-cost-model"
SUBDIR = "metaschedule"
ROOT_ENV = "HWAWARE_SEARCH_MODELS_DIR"
MAX_FEATURE_BYTES = 8 << 20  # float32 feature rows kept, newest groups first (~12.8k rows)
BOOSTER_FILE, SAMPLES_FILE, META_FILE = "booster.json", "samples.npz", "cost_model.json"

log = logging.getLogger(__name__)


class ColdStartWarning(UserWarning):
    """The saved search cost model cannot be used: the tuning session starts cold."""


class CostModelError(ValueError):
    """A saved search cost model that cannot be loaded (the message names the file)."""


@derived_object
class WarmXGBModel(ms.cost_model.XGBModel._cls):  # type: ignore[name-defined,misc]
    """MetaSchedule's `XGBModel` that can start from a saved state (`warm_model`) and knows
    which workload groups this session measured (the newest, kept first when capping).

    TVM retrains only once the data grew by a fifth since the last training: counted over
    the loaded data too, a session would not retrain before hundreds of new samples, and a
    short one would never learn its own workloads. Here the rule counts this session's
    samples, so a warm model retrains when a cold one would, on the loaded data plus the
    new."""

    data_size: int
    last_train_size: int

    def __init__(self, cores: int):
        super().__init__(num_tuning_cores=cores)
        self.loaded_samples = 0
        self.session_groups: dict[str, None] = {}  # ordered set of group hashes

    def update(self, context: Any, candidates: list[Any], results: list[Any]) -> None:
        self.session_groups[shash2hex(context.mod)] = None
        loaded = self.loaded_samples
        self.data_size -= loaded
        self.last_train_size = max(0, self.last_train_size - loaded)
        try:
            super().update(context, candidates, results)
        finally:
            self.data_size += loaded
            self.last_train_size += loaded

    def retrain(self) -> None:
        """Train on all the data held (TVM's `update`, step 5: each group's costs as ratios
        to its best)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = [np.divide(g.min_cost, g.costs, out=np.zeros_like(g.costs),
                                where=g.costs != 0) for g in self.data.values()]
        self._train(xs=list(chain.from_iterable(g.features for g in self.data.values())),
                    ys=np.concatenate(ratios, axis=0))
        self.last_train_size = self.data_size


@dataclass(frozen=True)
class SearchData:
    """A cost model's training data, per workload group (oldest first), in plain arrays."""

    group_hashes: tuple[str, ...]
    features: tuple[list[np.ndarray], ...]  # per group: one (rows, width) array per sample
    costs: tuple[np.ndarray, ...]  # per group: seconds per sample

    @property
    def samples(self) -> int:
        return sum(len(c) for c in self.costs)

    @staticmethod
    def of(model: Any, newest: Iterable[str]) -> SearchData:
        """The model's data, the groups in `newest` moved last (in their order)."""
        last = [h for h in newest if h in model.data]
        order = [h for h in model.data if h not in last] + last
        return SearchData(tuple(order), tuple(list(model.data[h].features) for h in order),
                          tuple(np.asarray(model.data[h].costs, np.float32) for h in order))

    def capped(self, max_bytes: int) -> SearchData:
        """The newest groups whose features fit in `max_bytes` (at least the newest group,
        then its newest samples that fit)."""
        kept, used = 0, 0
        for features in reversed(self.features):
            size = sum(f.nbytes for f in features)
            if kept and used + size > max_bytes:
                break
            kept, used = kept + 1, used + size
        out = SearchData(self.group_hashes[-kept:], self.features[-kept:], self.costs[-kept:])
        if used <= max_bytes:
            return out
        per_sample = max(1, used // max(1, out.samples))
        n = max(1, max_bytes // per_sample)
        return SearchData(out.group_hashes, (out.features[0][-n:],), (out.costs[0][-n:],))

    def to_arrays(self) -> dict[str, np.ndarray]:
        all_features = list(chain.from_iterable(self.features))
        return {"features": np.concatenate(all_features, axis=0).astype(np.float32),
                "rows": np.asarray([len(f) for f in all_features], np.int64),
                "costs": np.concatenate(self.costs).astype(np.float32),
                "group_samples": np.asarray([len(c) for c in self.costs], np.int64)}

    @staticmethod
    def from_arrays(group_hashes: list[str], arrays: dict[str, np.ndarray], where: Path
                    ) -> SearchData:
        features, rows, costs, sizes = (arrays[k] for k in
                                        ("features", "rows", "costs", "group_samples"))
        if features.ndim != 2 or rows.sum() != len(features) or len(rows) != len(costs) or \
                sizes.sum() != len(costs) or len(sizes) != len(group_hashes) or \
                (sizes < 1).any() or (rows < 1).any():
            raise CostModelError(f"{where}: inconsistent arrays (features {features.shape}, "
                                 f"{len(rows)} samples, {len(costs)} costs, {len(sizes)} "
                                 f"groups of {len(group_hashes)} named)")
        samples = np.split(features, np.cumsum(rows)[:-1])
        bounds = np.cumsum(sizes)[:-1]
        return SearchData(tuple(group_hashes),
                          tuple(list(g) for g in _split_list(samples, bounds)),
                          tuple(np.split(costs, bounds)))


def _split_list(items: list[np.ndarray], bounds: np.ndarray) -> list[list[np.ndarray]]:
    edges = [0, *bounds.tolist(), len(items)]
    return [items[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def model_dir(target_key: str) -> Path:
    """`cost_models/<target key>/metaschedule/` (`$HWAWARE_SEARCH_MODELS_DIR` replaces
    `cost_models/`)."""
    root = os.environ.get(ROOT_ENV)
    return device_dir(target_key, Path(root) if root else None) / SUBDIR


def warm_model(directory: Path | None, target_key: str, cores: int) -> WarmXGBModel:
    """The session's cost model: from the state saved in `directory` when it holds a usable
    one for `target_key`, else a new one (cold; with one `ColdStartWarning` when a saved state
    is refused). `directory` None: cold, nothing read."""
    model = WarmXGBModel(cores)
    if directory is None or not directory.exists():
        return model
    try:
        data, booster = read(directory, target_key)
    except (CostModelError, manifest.ManifestError) as err:
        warnings.warn(f"hwaware: search cost model not used, tuning starts cold: {err}",
                      ColdStartWarning, stacklevel=2)
        return model
    load_into(model, data, booster, cores)
    log.info("search cost model warm-started from %s: %d samples in %d workload groups",
             directory, data.samples, len(data.group_hashes))
    return model


def load_into(model: WarmXGBModel, data: SearchData, booster: xgb.Booster, cores: int
              ) -> None:
    """Give `model` the state a live model has right after training on `data`."""
    _set_data(model, data)
    booster.set_param({"nthread": cores})
    model.booster = booster


def _set_data(model: WarmXGBModel, data: SearchData) -> None:
    model.data = OrderedDict(
        (h, FeatureGroup(h, list(f), c))
        for h, f, c in zip(data.group_hashes, data.features, data.costs, strict=True))
    model.data_size = model.loaded_samples = model.last_train_size = data.samples


def save(model: WarmXGBModel, directory: Path, target_key: str) -> Path | None:
    """Save the model's data (capped, this session's groups newest) and a booster trained on
    exactly that data into `directory`, atomically; None when it holds no data or the folder
    cannot be written (one warning: the next session starts cold)."""
    if not model.data:
        return None
    data = SearchData.of(model, model.session_groups).capped(MAX_FEATURE_BYTES)
    if data.samples != model.data_size or model.last_train_size != model.data_size:
        _set_data(model, data)
        model.retrain()

    def write_files(folder: Path) -> list[str]:
        model.booster.save_model(folder / BOOSTER_FILE)
        np.savez_compressed(folder / SAMPLES_FILE, **data.to_arrays())  # type: ignore[arg-type]
        (folder / META_FILE).write_text(json.dumps(_meta(data, target_key), indent=1))
        return [BOOSTER_FILE, SAMPLES_FILE, META_FILE]

    try:
        return manifest.save_atomically(directory, KIND, FORMAT_VERSION, write_files)
    except OSError as err:  # the session's records are in the database already
        warnings.warn(f"hwaware: search cost model not saved to {directory}: {err}",
                      ColdStartWarning, stacklevel=2)
        return None


def _meta(data: SearchData, target_key: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "target_key": target_key,
            "versions": {**manifest.writer_versions(), "xgboost": xgb.__version__},
            "max_feature_bytes": MAX_FEATURE_BYTES, "samples": data.samples,
            "groups": [{"workload": h, "samples": len(c)}
                       for h, c in zip(data.group_hashes, data.costs, strict=True)]}


def read(directory: Path, target_key: str) -> tuple[SearchData, xgb.Booster]:
    """The data and booster saved in `directory`; raises `CostModelError` /
    `manifest.ManifestError` naming the file that is corrupt, missing or of another TVM
    version or target."""
    found = manifest.verify(directory)  # every file's SHA-256: truncation, corruption
    if found.kind != KIND or found.format_version != FORMAT_VERSION:
        raise CostModelError(f"{directory / manifest.MANIFEST_FILE}: a {found.kind!r} save, "
                             f"format {found.format_version}; expected {KIND!r} format "
                             f"{FORMAT_VERSION}")
    meta = _read_meta(directory / META_FILE, target_key)
    path = directory / SAMPLES_FILE
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("features", "rows", "costs", "group_samples")}
        data = SearchData.from_arrays([g["workload"] for g in meta["groups"]], arrays, path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
        raise CostModelError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    booster = xgb.Booster()
    try:
        booster.load_model(directory / BOOSTER_FILE)
    except xgb.core.XGBoostError as err:
        raise CostModelError(f"{directory / BOOSTER_FILE}: unreadable booster ({err})") from err
    return data, booster


def _read_meta(path: Path, target_key: str) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
        tvm_version, key = meta["versions"]["tvm"], meta["target_key"]
        meta["groups"] = [{"workload": str(g["workload"]), "samples": int(g["samples"])}
                          for g in meta["groups"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CostModelError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    ours = manifest.writer_versions()["tvm"]
    if tvm_version != ours:
        raise CostModelError(f"{path}: saved by TVM {tvm_version}, this is TVM {ours} (its "
                             "features and workload hashes differ)")
    if key != target_key:
        raise CostModelError(f"{path}: for target {key}, not {target_key}")
    return dict(meta)
