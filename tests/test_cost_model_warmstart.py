"""The search cost model kept per target (`hwaware.tvm.cost_model`): saved after a tuning
session, loaded by the next one before it measures anything, refused with one warning (and a
cold session) when it is of another TVM version or target or a file is corrupt; never pickled.
Real MetaSchedule sessions on tiny convolutions, a handful of trials each."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hwaware
from hwaware import manifest
from hwaware.capture import capture
from hwaware.cli import main
from hwaware.db import TuningDatabase
from hwaware.target import get_target
from hwaware.tvm import cost_model
from hwaware.tvm.setup import TVM_VERSION
from tests.test_saved_model_safety import _unsafe_uses

FIRST_TRIALS, NEXT_TRIALS = 16, 8


def first_conv() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()).eval(), torch.randn(1, 4, 8, 8)


def next_conv() -> tuple[nn.Module, torch.Tensor]:
    """Another shape of the same operator: what a warm-started session tunes."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval(), torch.randn(1, 8, 6, 6)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """A session of `first_conv`: (its saved cost model folder, its database, its summary)."""
    root = tmp_path_factory.mktemp("models")
    db_path = root / "first.db"
    model, x = first_conv()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cost_model.ROOT_ENV, str(root))
        summary = hwaware.tune(model, (x,), trials=FIRST_TRIALS, db=db_path, show_progress=False)
        return cost_model.model_dir(get_target("host").key), db_path, summary


@pytest.fixture
def models_root(saved: tuple[Path, Path, Any], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the saved folder under a fresh root that sessions in this test use."""
    root = tmp_path / "models"
    monkeypatch.setenv(cost_model.ROOT_ENV, str(root))
    shutil.copytree(saved[0], cost_model.model_dir(get_target("host").key))
    return root


@pytest.fixture
def first_update(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(samples held, booster trained) of the session's cost model when its first measured
    batch reaches it, i.e. before it learned anything from this session."""
    seen: list[tuple[int, bool]] = []
    original = cost_model.WarmXGBModel._cls.update

    def update(self: Any, context: Any, candidates: Any, results: Any) -> None:
        seen.append((self.data_size, self.booster is not None))
        original(self, context, candidates, results)

    monkeypatch.setattr(cost_model.WarmXGBModel._cls, "update", update)
    return seen


def test_a_session_saves_its_data_and_booster(saved: tuple[Path, Path, Any]) -> None:
    folder, _, summary = saved
    meta = json.loads((folder / cost_model.META_FILE).read_text())
    assert meta["target_key"] == get_target("host").key == summary.target_key
    assert meta["samples"] == FIRST_TRIALS and len(meta["groups"]) == 1
    assert meta["versions"]["tvm"] == manifest.writer_versions()["tvm"]
    assert manifest.verify(folder).kind == cost_model.KIND
    data, booster = cost_model.read(folder, summary.target_key)
    assert data.samples == FIRST_TRIALS and booster.num_boosted_rounds() > 0


def test_save_and_load_give_identical_predictions(saved: tuple[Path, Path, Any],
                                                  tmp_path: Path) -> None:
    """A model trained live on the session's measurements, saved and loaded: same data, same
    predictions on the same candidates."""
    _, db_path, summary = saved
    context, candidates, results = _measured_candidates(db_path, summary.tasks[0])
    live = cost_model.WarmXGBModel(2)
    live.update(context, candidates, results)
    assert cost_model.save(live, tmp_path / "saved", summary.target_key) is not None
    loaded = cost_model.warm_model(tmp_path / "saved", summary.target_key, 2)
    assert loaded.data_size == live.data_size == len(candidates)
    assert loaded.last_train_size == live.last_train_size
    (group,) = loaded.data.values()
    for a, b in zip(group.features, live.data[group.group_hash].features, strict=True):
        np.testing.assert_array_equal(a, b)
    live.num_warmup_samples = loaded.num_warmup_samples = 0  # else: random below 100 samples
    np.testing.assert_array_equal(loaded.predict(context, candidates),
                                  live.predict(context, candidates))


def test_a_warm_session_has_data_before_its_first_measurement(
        models_root: Path, tmp_path: Path, first_update: list[tuple[int, bool]]) -> None:
    model, x = next_conv()
    hwaware.tune(model, (x,), trials=NEXT_TRIALS, db=tmp_path / "next.db", show_progress=False)
    assert first_update[0] == (FIRST_TRIALS, True)
    meta = json.loads((cost_model.model_dir(get_target("host").key) / cost_model.META_FILE)
                      .read_text())
    assert meta["samples"] == FIRST_TRIALS + NEXT_TRIALS  # accumulated, newest group last
    assert [g["samples"] for g in meta["groups"]] == [FIRST_TRIALS, NEXT_TRIALS]


def test_cold_start_ignores_the_saved_model(models_root: Path, tmp_path: Path,
                                            first_update: list[tuple[int, bool]]) -> None:
    folder = cost_model.model_dir(get_target("host").key)
    before = (folder / manifest.MANIFEST_FILE).read_text()
    assert main(["tune", "tests.test_cost_model_warmstart:next_conv", "--trials",
                 str(NEXT_TRIALS), "--db", str(tmp_path / "cold.db"), "--cold-start"]) == 0
    assert first_update[0] == (0, False)
    assert (folder / manifest.MANIFEST_FILE).read_text() == before  # neither read nor written


def _resigned(folder: Path) -> None:
    """The manifest written again over the folder's files, as if a save had made them."""
    manifest.write(folder, cost_model.KIND, cost_model.FORMAT_VERSION,
                   [cost_model.BOOSTER_FILE, cost_model.SAMPLES_FILE, cost_model.META_FILE])


def _other_tvm(folder: Path) -> None:
    meta = json.loads((folder / cost_model.META_FILE).read_text())
    meta["versions"]["tvm"] = "0.26.0"
    (folder / cost_model.META_FILE).write_text(json.dumps(meta))
    _resigned(folder)


def _truncated(name: str, resign: bool) -> Any:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
        if resign:
            _resigned(folder)
    return damage


@pytest.mark.parametrize(("damage", "file", "reason"), [
    (_other_tvm, cost_model.META_FILE, "saved by TVM 0.26.0"),
    (None, cost_model.META_FILE, "for target"),
    (_truncated(cost_model.SAMPLES_FILE, resign=False), cost_model.SAMPLES_FILE, "changed"),
    (_truncated(cost_model.SAMPLES_FILE, resign=True), cost_model.SAMPLES_FILE, "unreadable"),
    (_truncated(cost_model.BOOSTER_FILE, resign=True), cost_model.BOOSTER_FILE, "unreadable"),
], ids=["other-tvm", "other-target", "truncated", "truncated-resigned", "corrupt-booster"])
def test_a_refused_model_warns_once_naming_the_file_and_starts_cold(
        saved: tuple[Path, Path, Any], tmp_path: Path, damage: Any, file: str,
        reason: str) -> None:
    folder = tmp_path / "metaschedule"
    shutil.copytree(saved[0], folder)
    key = saved[2].target_key if damage else "llvm-another-cpu-2c-00000000"
    if damage:
        damage(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cost_model.warm_model(folder, key, 2)
    refused = [w for w in caught if issubclass(w.category, cost_model.ColdStartWarning)]
    assert len(refused) == 1, [str(w.message) for w in caught]
    assert str(folder / file) in str(refused[0].message) and reason in str(refused[0].message)
    assert model.data_size == 0 and model.booster is None and not model.data


def test_a_session_with_a_refused_model_runs_cold(models_root: Path, tmp_path: Path,
                                                  first_update: list[tuple[int, bool]]) -> None:
    folder = cost_model.model_dir(get_target("host").key)
    _truncated(cost_model.BOOSTER_FILE, resign=True)(folder)
    model, x = next_conv()
    with pytest.warns(cost_model.ColdStartWarning, match=cost_model.BOOSTER_FILE):
        summary = hwaware.tune(model, (x,), trials=NEXT_TRIALS, db=tmp_path / "next.db",
                               show_progress=False)
    assert summary.trials_measured == NEXT_TRIALS and first_update[0] == (0, False)
    data, _ = cost_model.read(folder, summary.target_key)  # saved again, whole: this session's
    assert data.samples == NEXT_TRIALS


def test_capping_keeps_the_newest_groups() -> None:
    rows = [np.ones((3, 4), np.float32)] * 10  # 48 bytes per sample
    data = cost_model.SearchData(("old", "mid", "new"), (rows[:4], rows[:4], rows[:2]),
                                 (np.ones(4, np.float32), np.ones(4, np.float32) * 2,
                                  np.ones(2, np.float32) * 3))
    assert data.capped(10**6) == data
    assert data.capped(48 * 6).group_hashes == ("mid", "new")
    alone = data.capped(48)  # the newest group alone is too big: its newest samples
    assert alone.group_hashes == ("new",) and alone.samples == 1


def test_nothing_is_pickled(saved: tuple[Path, Path, Any]) -> None:
    source = Path(cost_model.__file__)
    assert _unsafe_uses(source, source.parents[2]) == []
    assert "allow_pickle=True" not in source.read_text()
    with np.load(saved[0] / cost_model.SAMPLES_FILE, allow_pickle=False) as npz:
        assert all(npz[k].dtype.kind in "fi" for k in npz.files)  # numbers, no objects
    assert sorted(p.name for p in saved[0].iterdir()) == sorted(
        [cost_model.BOOSTER_FILE, cost_model.SAMPLES_FILE, cost_model.META_FILE,
         manifest.MANIFEST_FILE])


def _measured_candidates(db_path: Path, task: Any) -> tuple[Any, list[Any], list[Any]]:
    """The task's tuning context, and its stored records as measure candidates with their
    measured times."""
    from tvm.s_tir import meta_schedule as ms

    from hwaware.pipeline import rewrite_and_partition
    from hwaware.tune import extract_tasks
    from hwaware.tvm.database import replay_records
    from hwaware.tvm.setup import resolve

    target = get_target("host")
    model, x = first_conv()
    _, part = rewrite_and_partition(capture(model, (x,)), True)
    (tuning_task,) = [t for t in extract_tasks(part, [x], target)
                      if t.workload_hash == task.workload_hash]
    tvm_target = resolve(target).tvm
    context = ms.TuneContext(mod=tuning_task.workload, target=tvm_target,
                             space_generator="post-order-apply", task_name="t", num_threads=2)
    with TuningDatabase(db_path) as db:
        rows = db.top_records(task.workload_hash, TVM_VERSION, target.key, FIRST_TRIALS)
    candidates, results = [], []
    for row, record in replay_records(rows, ms.database.Workload(tuning_task.workload),
                                      tvm_target):
        sch = _schedule_of(tuning_task.workload, record)
        candidates.append(ms.MeasureCandidate(
            sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
        results.append(ms.runner.RunnerResult(run_secs=[row.mean_us / 1e6], error_msg=None))
    assert len(candidates) >= 8
    return context, candidates, results


def _schedule_of(workload: Any, record: Any) -> Any:
    import tvm

    sch = tvm.s_tir.Schedule(workload)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch
