"""The public decomposition: the kernels a compile would build, as frozen records."""

from __future__ import annotations

import warnings

import pytest
import torch

import hwaware
from hwaware.decompose import Decomposition, KernelRecord, decompose
from hwaware.tvm.setup import TVM_VERSION
from hwaware.zoo import get_model
from tests.helpers import kernels_built


@pytest.mark.parametrize("name, family", [("mobilenetv2_block", "conv_block"),
                                          ("gcn_2layer", "gnn"),
                                          ("transformer_encoder_layer", "attention")])
def test_records_name_the_kernels_the_build_compiles(name: str, family: str) -> None:
    model, inputs = get_model(name, small=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = decompose(model, inputs)
        compiled = hwaware.compile(model, inputs, db=None, show_progress=False)
    assert isinstance(found, Decomposition) and family in {k.family for k in found.kernels}
    built = {k.signature for k in kernels_built(compiled)} | \
        set(compiled.info.dissolved)  # a fused kernel slower than PyTorch here is dissolved
    assert {k.signature for k in found.kernels if k.family == family} <= built
    for record in found.kernels:
        assert KernelRecord.from_json(record.to_json()) == record
        assert record.bytes_moved > 0 and record.bytes_moved >= record.weight_bytes
        assert all(all(d > 0 or d == -1 for d in shape) for shape in record.input_shapes)
    assert found.flops == sum(k.flops for k in found.kernels) > 0


def test_a_linear_kernel_has_its_shapes_flops_and_bytes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU()).eval()
    (record,) = decompose(model, (torch.randn(8, 64),)).kernels
    assert record.family == "matmul" and record.ops[0] == "aten.linear.default"
    assert record.input_shapes == ((8, 64),) and record.output_shapes == ((8, 32),)
    assert record.flops == 2 * 8 * 64 * 32
    assert record.weight_bytes == (64 * 32 + 32) * 4
    assert record.bytes_moved == record.weight_bytes + (8 * 64 + 8 * 32) * 4
    assert record.arithmetic_intensity == pytest.approx(record.flops / record.bytes_moved)


def test_host_ops_have_records_in_program_order() -> None:
    from hwaware.predict import spaces

    model, inputs = spaces.Architecture("gnn", {
        "kind": "handwritten", "nodes": 50, "degree": 4, "features": 8, "hidden": [],
        "classes": 4}).build()
    found = decompose(model, inputs)
    assert found.host_steps == len(found.host_records) > 0
    assert all(r.family == "host" and len(r.ops) == 1 for r in found.host_records)
    scatter = [r for r in found.host_records if r.ops[0] == "aten.index_add.default"]
    assert scatter and all(r.bytes_moved > 0 and r.flops == 0 for r in scatter)
    assert scatter[-1].output_shapes == ((50, 4),)
    assert found.priced == found.kernels + found.host_records
    assert {r.signature for r in found.kernels}.isdisjoint(r.signature for r in scatter)


def test_a_record_of_another_schema_is_refused() -> None:
    doc = decompose(torch.nn.Linear(4, 4).eval(), (torch.randn(1, 4),)).kernels[0].to_json()
    with pytest.raises(ValueError, match="schema 99"):
        KernelRecord.from_json(doc.replace('"schema_version": 1', '"schema_version": 99'))


def test_a_build_stores_each_kernel_schema_beside_its_measurements(db) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 16)
    compiled = hwaware.compile(model, (x,), db=db, show_progress=False)
    measured = {m.signature for m in db.kernel_measurements(compiled.info.target_key)}
    assert measured
    for signature in measured:
        record = db.kernel(signature)
        assert record is not None and record.signature == signature
        assert db.kernel_workloads(signature, TVM_VERSION, compiled.info.target_key)
