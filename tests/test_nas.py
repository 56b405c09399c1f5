"""Architecture search: spaces as data, the latency table against the real decomposition and
the predictor, NSGA-II (reproducible, limits, bad input) and the CLI end to end."""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import hwaware
from hwaware.cli import main
from hwaware.decompose import decompose
from hwaware.nas import Arch, LatencyTable, SpaceError, get_space, search, space_names
from hwaware.predict import COST_MODELS_DIR
from hwaware.predict.predictor import LatencyPredictor

PREDICTOR_DIR = COST_MODELS_DIR / "llvm-znver5-2c-4ed1a17c"  # shipped; loads on any machine
SPACES = ("ofa-mbv3", "resnet", "transformer", "gnn")


@pytest.fixture(scope="module", autouse=True)
def block_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh on-disk block cache: these tests decompose for real."""
    path = tmp_path_factory.mktemp("nas_cache")
    saved = os.environ.get("HWAWARE_NAS_CACHE")
    os.environ["HWAWARE_NAS_CACHE"] = str(path)
    yield path
    if saved is None:
        del os.environ["HWAWARE_NAS_CACHE"]
    else:
        os.environ["HWAWARE_NAS_CACHE"] = saved


@pytest.fixture(scope="module")
def predictor() -> LatencyPredictor:
    return LatencyPredictor.load(directory=PREDICTOR_DIR)


@pytest.fixture(scope="module")
def gnn_table(predictor: LatencyPredictor) -> LatencyTable:
    return LatencyTable(space="gnn", predictor=predictor)


def _smallest(name: str, seed: int = 0) -> Arch:
    """A small architecture of the space (lowest choice of every gene but a few random)."""
    space = get_space(name)
    row = space.encode(space.sample(1, seed))[0]
    rng = np.random.default_rng(seed)
    row[rng.random(len(row)) < 0.8] = 0
    return space.decode(row)


def test_shipped_spaces() -> None:
    assert {*SPACES, "ofa-mbv3-exit"} <= set(space_names())


@pytest.mark.parametrize("name", SPACES)
def test_space_samples_are_reproducible_hashable_json_and_encode_back(name: str) -> None:
    space = get_space(name)
    archs = space.sample(5, seed=3)
    assert archs == space.sample(5, seed=3) and archs != space.sample(5, seed=4)
    assert len({hash(a) for a in archs}) == len(set(archs))
    again = [space.validate(json.loads(json.dumps(a))) for a in archs]
    assert again == archs and [hash(a) for a in again] == [hash(a) for a in archs]
    assert [space.decode(r) for r in space.encode(archs)] == archs
    edited = copy.deepcopy(archs[0])  # OFA's finder edits deep copies in place
    assert isinstance(edited, dict) and not isinstance(edited, Arch)
    with pytest.raises(TypeError, match="frozen"):
        archs[0][next(iter(archs[0]))] = 0  # type: ignore[index]


@pytest.mark.parametrize("name", SPACES)
def test_each_slot_depends_only_on_its_declared_genes(name: str) -> None:
    """The batched table reads a slot's block from the genes `slot_genes` names: changing any
    other gene must not change that slot's block in context."""
    from hwaware.nas.table import _boundary

    space = get_space(name)
    rng = random.Random(0)

    def keys(arch: Arch) -> list[object]:
        blocks = space.blocks(arch)
        active = [b for b in blocks if b is not None]
        out: list[object] = []
        for slot, b in enumerate(blocks):
            if b is None:
                out.append(None)
                continue
            i = sum(x is not None for x in blocks[:slot])
            prev = active[i - 1] if i else None
            nxt = active[i + 1] if i + 1 < len(active) else None
            out.append((_boundary(prev), b, _boundary(nxt)))
        return out

    for arch in space.sample(40, seed=1):
        before = keys(arch)
        for slot, genes in enumerate(space.builder.slot_genes()):
            row = space.encode([arch])[0]
            for col, gene in enumerate(space.genes):
                if gene.label not in genes:
                    row[col] = rng.randrange(len(gene.choices))
            assert keys(space.decode(row))[slot] == before[slot], (slot, genes)


def test_bad_architectures_and_space_files_are_named(tmp_path: Path) -> None:
    space = get_space("ofa-mbv3")
    arch = space.sample(1)[0].to_dict()
    with pytest.raises(SpaceError, match=r"ks\[2\] = 9 is not allowed; allowed: 3, 5, 7"):
        space.validate({**arch, "ks": [3, 3, 9] + arch["ks"][3:]})
    with pytest.raises(SpaceError, match="image_size = 100 is not allowed"):
        space.validate({**arch, "image_size": 100})
    with pytest.raises(SpaceError, match="unknown field.*width"):
        space.validate({**arch, "width": 1})
    with pytest.raises(SpaceError, match="'d' must be a list of 5"):
        space.validate({**arch, "d": [2, 2]})
    broken = tmp_path / "mine.json"
    broken.write_text('{"name": "mine",\n "builder": "gnn",\n "genes": [oops]}')
    with pytest.raises(SpaceError, match=r"mine.json:3:.*not valid JSON"):
        get_space(broken)
    with pytest.raises(SpaceError, match="unknown space 'nope'"):
        get_space("nope")


@pytest.mark.parametrize("name", SPACES)
def test_table_kernels_are_the_real_decomposition_and_agree_with_the_predictor(
        name: str, predictor: LatencyPredictor) -> None:
    table = LatencyTable(space=name, predictor=predictor)
    space = table.space
    archs = [_smallest(name, 0), _smallest(name, 1)] if name == "transformer" \
        else [_smallest(name)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch in archs:
            model, inputs = space.build(arch), space.example_inputs(arch)
            real = decompose(model, inputs)
            table_kernels = table.kernels(arch)
            assert collections.Counter(k.signature for k in table_kernels) == \
                collections.Counter(k.signature for k in real.priced)
            expected = predictor.predict_decomposition(real).total_ms
            assert table.latency_ms(arch) == pytest.approx(expected, rel=1e-5)
        batch = table.latency_ms_batch(space.encode(archs))
    assert np.allclose(batch, [table.latency_ms(a) for a in archs], rtol=1e-6)


@pytest.mark.parametrize("name", SPACES)
def test_space_architectures_compile_and_match_eager(name: str) -> None:
    space = get_space(name)
    arch = _smallest(name, 2)
    model, inputs = space.build(arch), space.example_inputs(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = hwaware.compile(model, inputs, trials=0, db=None)
    torch.manual_seed(7)
    other = tuple(torch.randn_like(x) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        expected = model(*other)
    torch.testing.assert_close(compiled(*other), expected, rtol=1e-3, atol=1e-3)


def test_ofa_style_dicts_get_the_same_answer(gnn_table: LatencyTable,
                                            predictor: LatencyPredictor) -> None:
    table = LatencyTable(space="ofa-mbv3", predictor=predictor)
    arch = _smallest("ofa-mbv3", 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms = table.latency_ms(arch)
    assert table.get_efficiency(arch.to_dict()) == ms
    ms_batch, sources = table.latency_ms_batch([arch], return_source=True)
    assert ms_batch[0] == pytest.approx(ms) and sources[0] in ("measured", "predicted")


def test_blocks_are_read_back_from_the_disk_cache(gnn_table: LatencyTable,
                                                 predictor: LatencyPredictor,
                                                 block_cache: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    archs = gnn_table.space.sample(3, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [gnn_table.latency_ms(a) for a in archs]
    import hwaware.nas.table

    def no_decomposition(*args: object) -> None:
        raise AssertionError("decomposed a block the disk cache holds")

    monkeypatch.setattr(hwaware.nas.table, "chain_kernels", no_decomposition)
    again = LatencyTable(space="gnn", predictor=predictor)
    assert again.kernel_cache.path.parent == block_cache and again.kernel_cache.entries
    assert [again.latency_ms(a) for a in archs] == pytest.approx(expected, rel=1e-9)
    assert len(again.kernel_cache.entries) == len(gnn_table.kernel_cache.entries)


def test_nsga2_is_reproducible_and_respects_the_limits(gnn_table: LatencyTable) -> None:
    calls: list[Arch] = []

    def objective(arch: Arch) -> float:
        calls.append(arch)
        return float(arch["hidden"] * arch["layers"])

    runs = [search("gnn", table=gnn_table, objective=objective, latency_ms=0.8,
                   max_params=40_000, evals=60, population=12, seed=5) for _ in range(2)]
    assert [p.arch for p in runs[0].front] == [p.arch for p in runs[1].front]
    front = runs[0].front
    assert runs[0].met_limit and front
    assert all(p.latency_ms <= 0.8 and p.params <= 40_000 for p in front)
    rejected = [p.arch for p in runs[0].evaluated if not p.feasible]
    assert rejected and not set(rejected) & set(calls)  # never evaluated
    objectives = [p.objective for p in front]
    assert objectives == sorted(objectives)  # faster points are worse on the objective


def test_a_limit_no_architecture_meets_returns_the_fastest(gnn_table: LatencyTable) -> None:
    with pytest.warns(UserWarning, match="no architecture of gnn met the limits"):
        result = search("gnn", table=gnn_table, latency_ms=1e-6, evals=24, population=12)
    assert not result.met_limit and len(result.front) == 1
    assert result.front[0].latency_ms == min(p.latency_ms for p in result.evaluated)


def test_cli_search_end_to_end_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                           ) -> None:
    args = ["nas", "search", "--space", "gnn", "--evals", "24", "--population", "12",
            "--latency-ms", "2", "--predictor", str(PREDICTOR_DIR), "--db", str(tmp_path / "t.db"),
            "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
        first = (tmp_path / "evaluated.jsonl").read_text().splitlines()
        assert main(args) == 0  # resumes: the archive's architectures are not evaluated again
    out = capsys.readouterr().out
    assert "architectures evaluated" in out
    front = json.loads((tmp_path / "front.json").read_text())
    assert front["front"] and front["space"] == "gnn"
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    assert (tmp_path / "front.csv").read_text().count("\n") == len(front["front"]) + 1
    lines = (tmp_path / "evaluated.jsonl").read_text().splitlines()
    archs = [json.dumps(json.loads(line)["arch"], sort_keys=True) for line in lines]
    assert len(archs) == len(set(archs)) and lines[:len(first)] == first
    model = get_space("gnn").build(front["front"][0]["arch"])
    assert isinstance(model, torch.nn.Module)


def test_linas_measures_the_front_stores_it_and_refits(gnn_table: LatencyTable,
                                                      predictor: LatencyPredictor,
                                                      tmp_path: Path) -> None:
    from hwaware.db import TuningDatabase

    db = TuningDatabase(tmp_path / "linas.db")
    table = LatencyTable(space="gnn", predictor=predictor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search("gnn", table=table, latency_ms=2.0, evals=30, population=10,
                        measure_every=2, measure_top=2, db=db, out_dir=tmp_path / "out")
    assert len(result.measured) >= 3 and all(ms > 0 for ms in result.measured.values())
    lines = (tmp_path / "out" / "measured.jsonl").read_text().splitlines()
    assert len(lines) == len(result.measured)
    assert table.predictor is not predictor and table.predictor.db is db
    assert "adapted_from" in table.predictor.manifest
    device_key = json.loads(lines[0])["device"]["key"]
    assert len(db.model_measurements(device_key)) == len(lines)
    assert db.kernel_measurements(device_key)  # the measured kernels now answer for themselves


def test_device_specific_space_keeps_the_efficient_choices(gnn_table: LatencyTable,
                                                          tmp_path: Path) -> None:
    from hwaware.nas.specialize import specialize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        everything = specialize(gnn_table.space, gnn_table, samples=30, keep=0.0)
        strict = specialize(gnn_table.space, gnn_table, samples=30, keep=1.0, minimum=2)
    assert {c.gene for c in everything.choices} == {"aggregator", "hidden", "heads"}
    assert all(c.kept for c in everything.choices)
    for gene in ("aggregator", "hidden"):
        rows = [c for c in strict.choices if c.gene == gene]
        kept = sorted((c for c in rows if c.kept), key=lambda c: -c.roofline_share)
        assert len(kept) == 2 and kept[0].roofline_share == max(c.roofline_share for c in rows)
    path = strict.write(tmp_path / "gnn-here.json")
    derived = get_space(path)
    assert derived.name.startswith("gnn@") and derived.groups["layers"] == \
        gnn_table.space.groups["layers"]  # not specialised: a depth
    allowed = {c.choice for c in strict.choices if c.gene == "hidden" and c.kept}
    assert {a["hidden"] for a in derived.sample(50)} <= allowed
    assert "hidden" in strict.table() and "-" in strict.table()


def _exit_arch(thresholds: list[float], exits: tuple[int, ...] = (1, 1, 1)) -> Arch:
    space = get_space("ofa-mbv3-exit")
    return space.validate({**_smallest("ofa-mbv3-exit", 3).to_dict(), "exit": list(exits),
                           "threshold": thresholds})


def test_early_exit_space_prices_each_path_and_weights_them(predictor: LatencyPredictor
                                                            ) -> None:
    """A dynamic network's expected latency: each path (leave at an exit, or run to the head
    past the exit heads it tried) priced from its blocks, weighted by the exit rates."""
    table = LatencyTable(space="ofa-mbv3-exit", predictor=predictor)
    static = LatencyTable(space="ofa-mbv3", predictor=predictor)
    arch = _exit_arch([0.5, 0.7, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = table.path_latencies(arch)
        assert [p.name for p, _, _ in paths] == ["exit1", "exit2", "exit3", "all"]
        assert sum(p.probability for p, _, _ in paths) == pytest.approx(1.0)
        times = [ms for _, ms, _ in paths]
        assert times == sorted(times)
        expected = sum(p.probability * ms for p, ms, _ in paths)
        assert table.latency_ms(arch) == pytest.approx(expected)
        base = {k: v for k, v in arch.to_dict().items() if k not in ("exit", "threshold")}
        assert table.latency_ms({**arch.to_dict(), "exit": [0, 0, 0]}) == \
            pytest.approx(static.latency_ms(base))  # no exit: the static network
        always = LatencyTable(space="ofa-mbv3-exit", predictor=predictor,
                              exit_rates=lambda arch: [1.0, 1.0, 1.0])
        assert always.latency_ms(arch) == pytest.approx(times[0])
        assert table.latency_ms_batch([arch])[0] == pytest.approx(expected)


@pytest.mark.parametrize(("threshold", "exits"), [(0.0, (1, 1, 1)), (1.1, (0, 1, 0))])
def test_early_exit_architectures_compile_and_match_eager(threshold: float,
                                                         exits: tuple[int, ...]) -> None:
    """Threshold 0: every input leaves at the first exit; above 1: none ever does."""
    space = get_space("ofa-mbv3-exit")
    arch = _exit_arch([0.5, 0.5, 0.5], exits)
    model, inputs = space.build(arch), space.example_inputs(arch)
    model.thresholds = {k: threshold for k in model.thresholds}  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = hwaware.compile(model, inputs, trials=0, db=None)
    for seed in (1, 2):
        torch.manual_seed(seed)
        x = torch.randn_like(inputs[0])
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-3, atol=1e-3)
