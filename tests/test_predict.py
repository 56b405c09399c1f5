"""Latency predictor: training, save/load, refusals, sources, metrics, dynamic networks,
few-shot adaptation, and one real profiling run (TVM build and timing on this CPU).

Most tests use synthetic samples whose latencies follow a known law of the kernels' sizes,
so they check that the predictor learns, not what this machine measures (no timed asserts).
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hwaware
from hwaware.build import MARGIN
from hwaware.db import TuningDatabase
from hwaware.decompose import Decomposition, KernelRecord
from hwaware.predict import commands, pretrain, profile, spaces
from hwaware.predict.dynamic import predict_dynamic, summarize
from hwaware.predict.features import FEATURE_SCHEMA_VERSION, Device
from hwaware.predict.metrics import metrics, noise_floor
from hwaware.predict.predictor import (
    PRETRAIN_ROUNDS,
    LatencyPredictor,
    PredictorError,
    UnknownKernelWarning,
    measured_table,
    pretrained_kernel_model,
)
from hwaware.target import get_target

DEVICE = Device.of(get_target("host"))
OTHER = Device.of(get_target("host"), 1) if DEVICE.threads > 1 else \
    replace(DEVICE, key=DEVICE.key + "-other")
FAMILY_OPS = {"conv2d": ("aten.conv2d.default", "aten.relu.default"),
              "matmul": ("aten.linear.default", "aten.gelu.default"),
              "elementwise": ("aten.add.Tensor",)}


def _record(family: str, size: int, rng: random.Random) -> KernelRecord:
    flops = 0 if family == "elementwise" else size * rng.choice([8, 32, 128])
    return KernelRecord(
        signature=f"{family}:{rng.getrandbits(48):012x}", family=family, ops=FAMILY_OPS[family],
        input_shapes=((1, size),), output_shapes=((1, size),), dtypes=("float32",) * 2,
        attributes="[]", flops=flops, bytes_moved=8 * size, weight_bytes=0)


def _law_us(record: KernelRecord) -> float:
    """The synthetic device: a fixed cost per kernel plus compute and memory terms."""
    return 3.0 + record.flops / 4e4 + record.bytes_moved / 2e3


def _compute_bound_slower_us(record: KernelRecord) -> float:
    """Another synthetic device: compute 2.5x slower, calls and memory as fast (one core of
    two, or narrower vectors, does that)."""
    return 3.0 + record.flops / 1.6e4 + record.bytes_moved / 2e3


def _sample(i: int, device: Device = DEVICE, scale: float = 1.0, split: str = "train",
            log2_sizes: tuple[float, float] = (8, 16),
            law: Callable[[KernelRecord], float] = _law_us) -> profile.Sample:
    rng = random.Random(i)
    records = [_record(rng.choice(list(FAMILY_OPS)), int(2 ** rng.uniform(*log2_sizes)), rng)
               for _ in range(rng.randint(2, 8))]
    host_steps = rng.randint(0, 3)
    kernels = [{**asdict(r), "us": scale * law(r)} for r in records]
    total = scale * (sum(law(r) for r in records) + 6.0 * host_steps + 4.0)
    return profile.Sample(
        id=f"synthetic-{i}", arch={"space": "synthetic", "config": {"i": i}}, split=split,
        device=device.to_json(), cpu="test", kernels=kernels, host_steps=host_steps,
        latency_us=total, latency2_us=total * 1.01, eager_us=total, unattributed_us=0.0,
        compile_s=0.0, versions={})


def _one_call_sample(i: int) -> profile.Sample:
    """A synthetic model the build also timed as one TVM call: without host ops one call
    saves each kernel's 3 us call cost and runs the kernels 5% faster, and the build chose it
    where `MARGIN` (10%) faster (small models: yes; large ones: no)."""
    s = _sample(i)
    calls = s.latency_us
    if s.host_steps:
        return replace(s, plan="all-tvm", plan_us={"all-tvm": calls})
    one = 0.95 * sum(us - 3.0 for us in s.kernel_us) + 4.0
    plan = "chained" if one * (1 + MARGIN) < calls else "all-tvm"
    chosen = one if plan == "chained" else calls
    return replace(s, plan=plan, latency_us=chosen, latency2_us=chosen * 1.01,
                   plan_us={"all-tvm": calls, "chained": one, "kernel-calls": calls})


@pytest.fixture(scope="module")
def trained() -> LatencyPredictor:
    return LatencyPredictor.train([_sample(i) for i in range(80)], DEVICE, rounds=300)


def test_predicts_held_out_synthetic_models(trained: LatencyPredictor) -> None:
    held = [_sample(i) for i in range(1000, 1040)]
    m = metrics(list(trained.predict_samples(held)), [s.latency_us for s in held])
    assert m.within_10 >= 0.8 and m.spearman >= 0.95, m


def test_kernels_larger_than_any_trained_on_are_priced_by_their_size(
        trained: LatencyPredictor) -> None:
    """Kernels 8-64x larger than the training's largest: a regressor of times would price them
    all at the largest trained kernel's time; the ratio to the physical baseline scales."""
    rng = random.Random(5)
    big = [_record(family, 2 ** rng.randint(19, 22), rng) for family in FAMILY_OPS
           for _ in range(10)]
    predicted = trained.predict_kernels(big)
    law = np.asarray([_law_us(r) for r in big])
    assert np.all(np.abs(predicted / law - 1) < 0.3), predicted / law



def test_one_block_models_label_kernels_but_not_the_whole_model_term() -> None:
    """Samples of the `block` family (`KERNEL_ONLY_SPACES`) train the kernel regressor, not the
    whole-model one: here their whole-model latencies are twice their kernels' sum (the noise
    a one-block model's ratio carries, exaggerated), on models like the networks'; the networks
    are still priced right, and every block's kernel is a training row."""
    def block(i: int) -> profile.Sample:
        s = _sample(i)
        return replace(s, arch={"space": "block", "config": {"i": i}},
                       latency_us=2 * s.latency_us, latency2_us=2 * s.latency2_us)

    samples = [_sample(i) for i in range(60)] + [block(i) for i in range(100, 160)]
    predictor = LatencyPredictor.train(samples, DEVICE, rounds=300)
    assert predictor.manifest["training"]["kernels"] == sum(len(s.kernels) for s in samples)
    held = [_sample(i) for i in range(1000, 1040)]
    m = metrics(list(predictor.predict_samples(held)), [s.latency_us for s in held])
    assert m.within_10 >= 0.8 and m.spearman >= 0.95, m


def test_save_load_round_trip_gives_identical_predictions(trained: LatencyPredictor,
                                                          tmp_path: Path) -> None:
    out = trained.save(tmp_path / "p")
    loaded = LatencyPredictor.load(directory=out)
    held = [_sample(i) for i in range(2000, 2010)]
    assert np.array_equal(trained.predict_samples(held), loaded.predict_samples(held))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    assert manifest["training"]["models"] == 80
    assert {"tvm", "torch", "xgboost"} <= set(manifest["versions"])
    assert not list(out.glob("*.pkl")) and not list(out.glob("*.pickle"))


def test_the_whole_model_plan_is_chosen_as_the_build_chooses_it(tmp_path: Path) -> None:
    """Samples keep the build's timing of every plan it weighed: the predictor learns the
    model as kernel calls and as one TVM call apart, and takes the one call where the build
    would (no host op, `MARGIN` faster); it round-trips through save/load."""
    samples = [_one_call_sample(i) for i in range(120)]
    assert {s.plan for s in samples} == {"chained", "all-tvm"}
    one_call = samples[0] if samples[0].plan == "chained" else next(
        s for s in samples if s.plan == "chained")
    assert one_call.plan_latencies() == (pytest.approx(one_call.plan_us["kernel-calls"]),
                                         one_call.measured_us)
    predictor = LatencyPredictor.train(samples, DEVICE, rounds=300)
    assert predictor.one_call_model is not None
    assert predictor.manifest["training"]["one_call_models"] == sum(
        s.plan_latencies()[1] is not None for s in samples)
    held = [_one_call_sample(i) for i in range(1000, 1060)]
    predicted = predictor.predict_samples(held)
    m = metrics(list(predicted), [s.measured_us for s in held])
    assert m.within_10 >= 0.8 and m.spearman >= 0.95, m
    chained = [p for p, s in zip(predicted, held, strict=True) if s.plan == "chained"]
    calls = [s.plan_us["kernel-calls"] for s in held if s.plan == "chained"]
    assert np.median(np.asarray(chained) / calls) < 0.9  # priced as one call, not as calls
    loaded = LatencyPredictor.load(directory=predictor.save(tmp_path / "p"))
    assert np.array_equal(loaded.predict_samples(held), predicted)


def test_a_joint_predictor_learns_two_devices_apart() -> None:
    """Trained on two devices' samples (each described by its own device's features), the
    predictor of one device prices its held-out models by that device's law, not an average
    of both, and answers as measured from its own device's kernels only."""
    mine = [_sample(i) for i in range(60)]
    theirs = [_sample(i, OTHER, law=_compute_bound_slower_us) for i in range(100, 160)]
    joint = LatencyPredictor.train(mine + theirs, DEVICE, rounds=300, joint=True)
    assert joint.manifest["training"]["devices"] == {DEVICE.key: 60, OTHER.key: 60}
    assert joint.table == measured_table(mine)
    for device, law, first in ((DEVICE, _law_us, 1000), (OTHER, _compute_bound_slower_us, 2000)):
        held = [_sample(i, device, law=law) for i in range(first, first + 40)]
        predictor = joint if device == DEVICE else LatencyPredictor.train(
            mine + theirs, OTHER, rounds=300, joint=True)
        m = metrics(list(predictor.predict_samples(held)), [s.latency_us for s in held])
        assert m.within_10 >= 0.8, (device.key, m)
    alone = LatencyPredictor.train(mine + theirs, DEVICE, rounds=50)
    assert alone.manifest["training"]["models"] == 60  # not joint: its own device's only
    with pytest.raises(PredictorError, match="training needs at least"):
        LatencyPredictor.train(theirs[:5], DEVICE, joint=True)


def test_kernel_prior_is_saved_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    samples = [_sample(i) for i in range(30)]
    plain = LatencyPredictor.train(samples, DEVICE, rounds=50, prior="none")
    loaded = LatencyPredictor.load(directory=plain.save(tmp_path / "p"))
    held = [_sample(i) for i in range(3000, 3010)]
    assert loaded.prior == "none"
    assert np.array_equal(plain.predict_samples(held), loaded.predict_samples(held))
    with pytest.raises(PredictorError, match="prior 'flops'.*physical, none, pretrained"):
        LatencyPredictor.train(samples, DEVICE, prior="flops")


PRETRAIN_ARCHS = 10  # a small pretraining set: decomposed in a few seconds, then cached


@pytest.fixture(scope="module")
def pretrained() -> LatencyPredictor:
    return LatencyPredictor.train([_sample(i) for i in range(40)], DEVICE, rounds=150,
                                  prior="pretrained", pretrain_archs=PRETRAIN_ARCHS)


def test_pretrained_prior_learns_and_round_trips(pretrained: LatencyPredictor,
                                                 tmp_path: Path) -> None:
    held = [_sample(i) for i in range(1000, 1040)]
    m = metrics(list(pretrained.predict_samples(held)), [s.latency_us for s in held])
    assert m.within_10 >= 0.8 and m.spearman >= 0.95, m
    out = pretrained.save(tmp_path / "p")
    loaded = LatencyPredictor.load(directory=out)
    assert loaded.prior == "pretrained"
    assert np.array_equal(pretrained.predict_samples(held), loaded.predict_samples(held))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kernel_prior"] == "pretrained"
    info = manifest["pretraining"]
    assert (info["archs"], info["seed"]) == (PRETRAIN_ARCHS, pretrain.PRETRAIN_SEED)
    assert info["kernels"] > 10 and info["proxy"] == "log baseline_us"


def test_pretrained_trees_stay_under_the_fine_tuned_ones(pretrained: LatencyPredictor) -> None:
    """Fine-tuning boosts on from the pretrained regressor (which it leaves unchanged): the
    saved regressor holds both sets of trees, and the pretrained one alone answers the proxy."""
    base, _ = pretrained_kernel_model(DEVICE, PRETRAIN_ARCHS)
    assert pretrained.kernel_model.num_boosted_rounds() == PRETRAIN_ROUNDS + 150
    assert base.num_boosted_rounds() == PRETRAIN_ROUNDS
    data = pretrain.pretraining_set(DEVICE, PRETRAIN_ARCHS)
    error = base.inplace_predict(data.rows) - data.log_baseline_us
    assert np.mean(np.abs(error)) < 0.1, np.abs(error).max()


def test_pretraining_set_is_reproducible(tmp_path: Path) -> None:
    """Same seed, same architectures and rows, decomposed afresh or read from the cache;
    another seed, other architectures."""
    ids = [a.id for a in pretrain.pretraining_archs(5, seed=0)]
    assert ids == [a.id for a in pretrain.pretraining_archs(5, seed=0)] and len(set(ids)) == 5
    assert ids != [a.id for a in pretrain.pretraining_archs(5, seed=1)]
    assert sum(a.split("-")[0] == "cnn" for a in ids) == 2  # one in range, one beyond
    first = pretrain.pretraining_set(DEVICE, 5, seed=0, directory=tmp_path / "a")
    cached = pretrain.pretraining_set(DEVICE, 5, seed=0, directory=tmp_path / "a")
    fresh = pretrain.pretraining_set(DEVICE, 5, seed=0, directory=tmp_path / "b")
    for other in (cached, fresh):
        assert other.signatures == first.signatures
        assert np.array_equal(other.rows, first.rows)
        assert np.array_equal(other.log_baseline_us, first.log_baseline_us)
    assert len(set(first.signatures)) == len(first.signatures) > 5
    (cache,) = (tmp_path / "a").glob("predict-spaces-*.jsonl")  # one line per architecture
    assert [json.loads(line)["key"] for line in cache.read_text().splitlines()] == ids


def test_prior_option_of_the_train_command() -> None:
    import argparse

    from hwaware.cli import _parser

    parser = _parser()
    args = parser.parse_args(["predictor", "train", "--prior", "pretrained"])
    assert commands.prior_of(args) == "pretrained"
    assert commands.prior_of(parser.parse_args(["predictor", "train"])) == "physical"
    assert commands.prior_of(argparse.Namespace()) == "physical"  # a parser without --prior
    with pytest.raises(SystemExit):
        parser.parse_args(["predictor", "train", "--prior", "flops"])


def test_feature_version_mismatch_is_refused_naming_both(trained: LatencyPredictor,
                                                         tmp_path: Path) -> None:
    out = trained.save(tmp_path / "p")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["feature_schema_version"] = FEATURE_SCHEMA_VERSION + 7
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PredictorError, match=f"version {FEATURE_SCHEMA_VERSION + 7}.*version "
                                             f"{FEATURE_SCHEMA_VERSION}"):
        LatencyPredictor.load(directory=out)


def test_corrupt_or_missing_files_are_refused_by_name(trained: LatencyPredictor,
                                                      tmp_path: Path) -> None:
    out = trained.save(tmp_path / "p")
    (out / "kernel_model.json").write_text("{not json")
    with pytest.raises(PredictorError, match="kernel_model.json: corrupt"):
        LatencyPredictor.load(directory=out)
    (out / "manifest.json").write_text("[1, 2")
    with pytest.raises(PredictorError, match="manifest.json: corrupt"):
        LatencyPredictor.load(directory=out)
    with pytest.raises(PredictorError, match="hwaware profile --target host.*predictor train"):
        LatencyPredictor.load(directory=tmp_path / "nothing")


def test_too_few_samples_says_how_many_exist_and_are_needed() -> None:
    with pytest.raises(PredictorError, match="7 profiled models .* at least 20"):
        LatencyPredictor.train([_sample(i) for i in range(7)], DEVICE)
    with pytest.raises(PredictorError, match="0 profiled models"):
        LatencyPredictor.train([_sample(i, OTHER) for i in range(30)], DEVICE)


def test_sources_measured_predicted_unknown(trained: LatencyPredictor, tmp_path: Path) -> None:
    rng = random.Random(5)
    seen, other_target, fresh = (_record("conv2d", 4096, rng) for _ in range(3))
    odd = replace(_record("matmul", 4096, rng), family="fft", ops=("aten.fft_rfft.default",))
    with TuningDatabase(tmp_path / "t.db") as db:
        db.commit_kernel_measurement(seen.signature, trained.key, profile.AS_BUILT, 123.0,
                                     "conv2d")
        db.commit_kernel_measurement(other_target.signature, "llvm-other-2c-00000000",
                                     profile.AS_BUILT, 999.0, "conv2d")
        trained.db = db
        with pytest.warns(UnknownKernelWarning, match="family fft"):
            est = trained.predict_decomposition(
                Decomposition("m", (seen, other_target, fresh, odd), (), 0))
        trained.db = None
    sources = [k.source for k in est.kernels]
    assert sources == ["measured", "predicted", "predicted", "unknown"]
    assert est.kernels[0].ms == pytest.approx(0.123)
    assert est.kernels[1].ms != pytest.approx(0.999)  # another target's record is not used
    assert all(k.ms > 0 for k in est.kernels)
    assert est.total_ms == pytest.approx(sum(k.ms for k in est.kernels) + est.overhead_ms)


def test_metrics_on_a_fixed_set() -> None:
    m = metrics([1.05, 0.8, 2.0, 4.4], [1.0, 1.0, 2.0, 4.0])
    assert m.n == 4
    assert m.within_10 == pytest.approx(0.75) and m.within_5 == pytest.approx(0.5)
    assert m.mape == pytest.approx(100 * (0.05 + 0.2 + 0 + 0.1) / 4)
    assert m.rmse == pytest.approx(math.sqrt((0.05**2 + 0.2**2 + 0 + 0.4**2) / 4))
    assert m.spearman == pytest.approx(0.9486832980505138)
    assert m.kendall == pytest.approx(0.9128709291752769)
    assert noise_floor([1.0, 2.0], [1.0, 2.0]).mape == 0.0
    with pytest.raises(ValueError, match="positive"):
        metrics([1.0], [0.0])


def test_adapt_to_another_device_with_ten_samples(trained: LatencyPredictor) -> None:
    slower = [_sample(i, OTHER, scale=1.8) for i in range(3000, 3050)]
    adapted = trained.adapt(slower[:10], OTHER)
    assert adapted.key == OTHER.key and adapted.manifest["adapted_from"] == DEVICE.key
    rest = slower[10:]
    before = metrics(list(trained.predict_samples(rest)), [s.latency_us for s in rest])
    after = metrics(list(adapted.predict_samples(rest)), [s.latency_us for s in rest])
    assert before.within_10 < 0.2 and after.within_10 >= 0.8, (before, after)
    with pytest.raises(PredictorError, match="at least 3"):
        trained.adapt(slower[:2], OTHER)


def test_adapting_corrects_kernels_by_kind_not_one_scale(trained: LatencyPredictor,
                                                         tmp_path: Path) -> None:
    """A device whose compute is slower but whose calls and memory are not: no one scale fits
    both small and large models; the kernel correction learns which kernels slow down."""
    other = [_sample(i, OTHER, law=_compute_bound_slower_us) for i in range(4000, 4060)]
    adapted = trained.adapt(other[:10], OTHER)
    rest = other[10:]
    measured = [s.latency_us for s in rest]
    after = metrics(list(adapted.predict_samples(rest)), measured)
    one_scale = replace_kernel_labels(other[:10])
    scaled = metrics(list(trained.adapt(one_scale, OTHER).predict_samples(rest)), measured)
    assert after.within_10 >= 0.8 and after.within_10 > scaled.within_10 + 0.2, (after, scaled)
    loaded = LatencyPredictor.load(directory=adapted.save(tmp_path / "adapted"))
    assert np.array_equal(loaded.predict_samples(rest), adapted.predict_samples(rest))
    assert loaded.manifest["adapted_from"] == DEVICE.key
    again = loaded.adapt(other[10:20], OTHER)  # from the base, not on top of the first
    assert again.manifest["adapted_from"] == DEVICE.key and again.key == OTHER.key


def replace_kernel_labels(samples: list[profile.Sample]) -> list[profile.Sample]:
    """The samples without kernel times (only whole-model latencies: one scale is all an
    adaptation can fit)."""
    return [replace(s, kernels=[{**k, "us": 0.0} for k in s.kernels]) for s in samples]


# ----------------------------------------------------------------------- dynamic networks
def test_expected_latency_from_known_path_latencies() -> None:
    a, b = ("region_0", ("t",)), ("region_1", ("t",))
    paths = [[(a, [])]] * 3 + [[(a, []), (b, [])]]
    est = summarize("toy", "dev", paths, {a: 1.0, b: 4.0})
    assert [(p.regions, p.ms, p.frequency) for p in est.paths] == [
        (("region_0",), 1.0, 0.75), (("region_0", "region_1"), 5.0, 0.25)]
    assert est.expected_ms == pytest.approx(0.75 * 1.0 + 0.25 * 5.0)
    assert est.p95_ms == pytest.approx(np.percentile([1, 1, 1, 5], 95))


class EarlyExit(nn.Module):
    """Exits after the first block when the input's mean is positive."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 16)
        self.second = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        if x.mean() > 0:
            return h
        return self.second(h)


def test_dynamic_network_paths_follow_the_calibration_inputs(trained: LatencyPredictor) -> None:
    model = EarlyExit().eval()
    calibration = [torch.randn(1, 16).abs() * (1 if i % 4 else -1) for i in range(8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownKernelWarning)
        est = predict_dynamic(trained, model, (torch.randn(1, 16),), calibration)
    assert [p.frequency for p in est.paths] == [0.75, 0.25]
    short, long = est.paths
    assert len(long.regions) > len(short.regions) and long.ms > short.ms
    assert est.expected_ms == pytest.approx(0.75 * short.ms + 0.25 * long.ms)
    assert est.p95_ms == pytest.approx(long.ms)


# ----------------------------------------------------------------------- real profiling
def test_profile_measures_and_attributes_real_builds(tmp_path: Path) -> None:
    archs = [spaces.Architecture("cnn", {"resolution": 16, "stages": [
        {"width": 8, "kernel": 3, "depth": 1}]}),
        spaces.Architecture("transformer", {"d_model": 16, "heads": 2, "ffn_ratio": 2,
                                            "layers": 1, "seq": 8})]
    out = tmp_path / "data.jsonl"
    with TuningDatabase(tmp_path / "t.db") as db:
        new = profile.profile(archs, get_target("host"), DEVICE, db, out, repeats=10,
                              show_progress=False)
        assert [s.id for s in new] == [a.id for a in archs]
        assert profile.profile(archs, get_target("host"), DEVICE, db, out, repeats=10,
                               show_progress=False) == []  # resumed: nothing left
        for s in new:
            model, inputs = spaces.Architecture(s.arch["space"], s.arch["config"]).build()
            import hwaware

            expected = hwaware.decompose(model, inputs)
            assert [r.signature for r in s.records] == [k.signature for k in expected.priced]
            assert all(us > 0 for us in s.kernel_us) and s.latency_us > 0
            assert s.plan in s.plan_us and s.measured_us in s.plan_latencies()
            assert db.model_measurements(DEVICE.key, s.id)[0].latency_us == s.measured_us
            measured = db.kernel_measurements(DEVICE.key, s.records[0].signature)
            assert [m.impl for m in measured].count(profile.AS_BUILT) == 1
    assert [s.id for s in profile.read_samples([out], DEVICE.key)] == [a.id for a in archs]
    assert profile.read_samples([out], "another-device") == []


def test_profile_times_each_host_op(tmp_path: Path) -> None:
    arch = spaces.Architecture("gnn", {"kind": "handwritten", "nodes": 40, "degree": 4,
                                       "features": 8, "hidden": [], "classes": 4})
    sample = profile.measure(arch, get_target("host"), DEVICE, None, repeats=10)
    hosts = [(r, us) for r, us in zip(sample.records, sample.kernel_us, strict=True)
             if r.family == "host"]
    assert len(hosts) == sample.host_steps > 0
    assert all(us > 0 for _, us in hosts)
    assert "aten.index_add.default" in {r.ops[0] for r, _ in hosts}
    assert sample.reference_us > 0 and sample.gather_reference_us > 0 and sample.slowdown >= 1.0
    assert profile.Sample.from_json(sample.to_json()).records == sample.records


def test_profile_samples_the_search_spaces_too() -> None:
    archs = spaces.sample("nas:ofa-mbv3", 3, seed=5)
    assert len({a.id for a in archs}) == 3
    assert [a.id for a in spaces.sample("nas:ofa-mbv3", 3, seed=5)] == [a.id for a in archs]
    assert all(a.to_json()["space"] == "nas:ofa-mbv3" for a in archs)
    with pytest.raises(ValueError, match="no out-of-range split"):
        spaces.sample("nas:ofa-mbv3", 3, ood=True)
    with pytest.raises(ValueError, match="nas:<a space"):
        spaces.sample("no-such-family", 3)


def test_block_family_samples_real_scale_blocks_that_fuse_as_real_ones_do() -> None:
    archs = spaces.sample("block", 60, seed=3)
    assert [a.id for a in spaces.sample("block", 60, seed=3)] == [a.id for a in archs]
    assert {a.config["block"] for a in archs} == set(spaces.BLOCK_BUILDERS)
    assert all(spaces.block_macs(a.config) <= spaces.BLOCK_MACS for a in archs)
    assert max(spaces.block_macs(a.config) for a in archs) > 50e6  # real scale, not toy
    import hwaware

    image = {"cin": 16, "resolution": 8, "stride": 1}
    fused = {  # a small config of each fused kind -> the family its kernel must be
        "res": ({**image, "cout": 16, "bottleneck": 4}, "res_block"),
        "mbconv": ({**image, "cout": 16, "expand": 4, "kernel": 3, "se": True}, "conv_block"),
        "convnext": ({"cin": 16, "resolution": 8, "kernel": 7}, "convnext_block"),
        "attention": ({"heads": 2, "head_dim": 8, "seq": 16, "causal": True}, "attention"),
        "encoder": ({"d_model": 32, "heads": 2, "ffn_ratio": 2, "tokens": 8}, "attention"),
    }
    for kind, (config, family) in fused.items():
        model, inputs = spaces.Architecture("block", {"block": kind, **config}).build()
        assert family in {r.family for r in hwaware.decompose(model, inputs).kernels}, kind


def test_attribution_charges_built_kernels_to_decomposed_ones() -> None:
    decomposed = {"k0_conv2d": ("conv", "relu"), "k1_matmul": ("mm",)}
    built = {"k0_conv2d": ["conv"], "k1_elementwise": ["relu"], "k2_x": ["mm", "extra"],
             "k3_y": ["orphan"]}
    labels, rest = profile.attribute(decomposed, built, {"k0_conv2d": 10.0,
                                                         "k1_elementwise": 2.0, "k2_x": 6.0,
                                                         "k3_y": 1.0})
    assert labels == {"k0_conv2d": 12.0, "k1_matmul": 6.0} and rest == 1.0


def test_cli_train_and_eval_on_profiled_data(tmp_path: Path, capsys: pytest.CaptureFixture
                                             ) -> None:
    from hwaware.cli import main

    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    lines = [_sample(i).to_json() for i in range(60)]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    args = ["predictor", "train", "--data", str(data), "--models", str(models)]
    assert main(args) == 0
    assert "held-out" in capsys.readouterr().out
    assert (models / DEVICE.key / "manifest.json").exists()
    assert main(["predictor", "eval", "--json", "--data", str(data), "--models", str(models)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["held-out"]["n"] == sum(commands.is_held_out(_sample(i)) for i in range(60))
    assert main(["predictor", "eval", "--data", str(data), "--models", str(tmp_path)]) == 2
    assert "hwaware predictor train" in capsys.readouterr().err


def test_cli_trains_a_device_measured_on_another_machine(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """`--device KEY` trains the predictor of a device of the data that is not this machine's
    (its facts come from its samples), jointly on every device's training samples unless
    `--alone`; an unknown key names the keys the data has."""
    from hwaware.cli import main

    far = replace(DEVICE, key="llvm-far-away-8c", threads=8, peak_gflops=999.0)
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    far_samples = [_sample(i, far) for i in range(60)]
    (data / "far.jsonl").write_text("".join(s.to_json() + "\n" for s in far_samples))
    (data / "here.jsonl").write_text("".join(_sample(i).to_json() + "\n" for i in range(30)))
    args = ["predictor", "train", "--device", far.key, "--data", str(data), "--models",
            str(models)]
    assert main(args) == 0
    trained = LatencyPredictor.load(directory=models / far.key).manifest
    assert trained["feature_device"] == far.to_json()
    assert trained["training"]["devices"] == {
        far.key: len(commands.training_samples(far_samples)),
        DEVICE.key: len(commands.training_samples([_sample(i) for i in range(30)]))}
    assert main([*args, "--alone"]) == 0
    alone = LatencyPredictor.load(directory=models / far.key).manifest["training"]
    assert "devices" not in alone and alone["models"] == trained["training"]["devices"][far.key]
    capsys.readouterr()
    assert main([*args[:2], "--device", "nowhere", *args[4:]]) == 2
    assert far.key in capsys.readouterr().err


def test_cli_adapt_judges_on_every_sample_of_the_device_it_did_not_adapt_with(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The base predictor never saw the device it is adapted to: the adapted one is judged on
    every calm sample of that device but the ones it was adapted with (not only the fifth
    `is_held_out` keeps out of training), and `predictor eval` of it judges the same ones."""
    from hwaware.cli import main

    far = replace(DEVICE, key="llvm-far-away-8c", threads=8, peak_gflops=999.0)
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    (data / "here.jsonl").write_text("".join(_sample(i).to_json() + "\n" for i in range(60)))
    far_samples = [_sample(i, far, scale=2.0) for i in range(100, 130)]
    (data / "far.jsonl").write_text("".join(s.to_json() + "\n" for s in far_samples))
    common = ["--data", str(data), "--models", str(models)]
    assert main(["predictor", "train", *common]) == 0
    assert main(["predictor", "adapt", "--device", far.key, "--samples", "10", *common]) == 0
    manifest = LatencyPredictor.load(directory=models / far.key).manifest
    assert len(manifest["adapted_with"]) == 10
    assert manifest["metrics"]["held-out"]["n"] == len(far_samples) - 10
    capsys.readouterr()
    assert main(["predictor", "eval", "--json", "--device", far.key, *common]) == 0
    assert json.loads(capsys.readouterr().out)["held-out"]["n"] == len(far_samples) - 10


@pytest.mark.parametrize("folder", sorted(p.parent for p in Path(
    __file__).resolve().parent.parent.joinpath("cost_models").glob("*/manifest.json")),
    ids=lambda p: p.name)
def test_shipped_predictors_load_and_predict(folder: Path) -> None:
    """Every predictor in the repository loads (on any CPU) and predicts a model it has not
    seen: a positive total equal to its kernels plus its whole-model term."""
    predictor = LatencyPredictor.load(directory=folder)
    assert predictor.key == folder.name
    model, inputs = spaces.Architecture("mobilenet", {"resolution": 24, "stem": 8, "blocks": [
        {"width": 8, "expand": 2, "kernel": 3, "stride": 1, "se": False}]}).build()
    est = predictor.predict(model, inputs)
    assert est.total_ms > 0 and all(k.ms > 0 for k in est.kernels)
    assert est.total_ms == pytest.approx(sum(k.ms for k in est.kernels) + est.overhead_ms)


def test_step_times_cover_every_step_of_a_whole_run() -> None:
    from hwaware.zoo import get_model

    model, inputs = get_model("resnet_basic_block")
    compiled = hwaware.compile(model, inputs)
    times = compiled.step_times_us(list(inputs), runs=5, quantile=0.25)
    assert len(times) == len(compiled.program.steps) and all(t > 0 for t in times)
    torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-4)


def test_profiling_waits_while_the_machine_runs_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference workloads' times as a busy machine gives them: the profiler waits until
    each runs within the tolerance of its fastest seen. The gather reference slows alone (the
    host's slow placement of the two vCPUs), and that is enough to wait."""
    times = iter([(100.0, 250.0, 390.0), (104.0, 1300.0, 390.0), (180.0, 900.0, 400.0),
                  (103.0, 260.0, 380.0)])  # compute, gather, gather on one thread
    calls = iter(w for triple in times for w in triple)
    monkeypatch.setattr(profile, "reference_us", lambda workload: next(calls))
    monkeypatch.setattr(profile, "CALM_WAIT_S", 0.0)
    monkeypatch.setattr(profile, "CALM_TRIES", 30)  # the tests' own default is 1 (conftest)
    monkeypatch.setattr(profile, "_FASTEST_REFERENCE", {})
    assert profile.wait_until_calm(2) == (1.0, {"compute": 100.0, "gather": 250.0})
    assert profile.wait_until_calm(2) == (pytest.approx(1.04),
                                          {"compute": 103.0, "gather": 260.0})


def test_a_sample_whose_timings_disagree_is_neither_trained_on_nor_judged_by() -> None:
    """A stall the reference check missed: the model timed at its speed once, then its second
    timing and its kernels 145x slower (a real sample: 110 us, then 16 ms)."""
    good = _sample(1)
    stalled = replace(good, latency2_us=good.latency_us * 145,
                      kernels=[{**k, "us": k["us"] * 145} for k in good.kernels])
    slow_kernels = replace(good, kernels=[{**k, "us": k["us"] * 3} for k in good.kernels])
    assert good.timed_calm and not stalled.timed_calm and not slow_kernels.timed_calm
    assert commands.calm([good, stalled, slow_kernels]) == [good]


def test_a_new_devices_first_slow_state_is_seen_without_history(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first reference of a device that has none runs in the slow placement: its two
    threads run the gather 3.3x slower than one thread does."""
    monkeypatch.setattr(profile, "_FASTEST_REFERENCE", {})
    times = iter([100.0, 1300.0, 390.0])
    monkeypatch.setattr(profile, "reference_us", lambda workload: next(times))
    assert profile.machine_slowdown(2)[0] == pytest.approx(1300.0 / 390.0)


def test_samples_whose_references_were_slow_are_judged_again_with_the_whole_data_set() -> None:
    """A process that started slow took its slow references for the machine's speed; the
    whole data set shows them 5x the fastest, and those samples are left out."""
    samples = [replace(_sample(i), reference_us=200.0, slowdown=1.0,
                       gather_reference_us=1300.0 if i < 5 else 260.0) for i in range(20)]
    assert commands.calm(samples) == samples[5:]
    old = [replace(s, reference_us=0.0, gather_reference_us=0.0) for s in samples]
    assert commands.calm(old) == old  # samples without references: judged by the rest


def test_samples_timed_on_a_slowed_machine_are_neither_trained_on_nor_judged_by() -> None:
    samples = [replace(_sample(i), slowdown=1.8 if i % 3 == 0 else 1.02) for i in range(60)]
    slowed = {s.id for s in samples if s.slowdown > profile.CALM_TOLERANCE}
    kept = commands.training_samples(samples) + [
        s for group in commands.evaluation_splits(samples).values() for s in group]
    assert kept and not slowed & {s.id for s in kept}
