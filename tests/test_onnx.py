"""ONNX frontend: ONNX files compile, tune into the same database and save/load like torch models;
unsafe or malformed files are refused before anything is read."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from onnx.external_data_helper import set_external_data

import hwaware
from hwaware import onnx_import
from hwaware.onnx_import import OnnxImportError
from hwaware.tvm import ir
from hwaware.tvm.setup import TVM_VERSION

RTOL, ATOL = 1e-3, 1e-4


class ConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class TwoOutputMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.fc1(x))
        return self.fc2(hidden), hidden


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, **kwargs: Any) -> Path:
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, input_names=["x"], **kwargs)
    return path


def assert_close(got: Any, expected: Any) -> None:
    got_flat = got if isinstance(got, tuple) else (got,)
    expected_flat = expected if isinstance(expected, tuple) else (expected,)
    assert len(got_flat) == len(expected_flat)
    for g, e in zip(got_flat, expected_flat, strict=True):
        assert isinstance(g, torch.Tensor) and g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.Tensor, Path]:
    torch.manual_seed(0)
    model, x = ConvNet().eval(), torch.randn(1, 3, 8, 8)
    return model, x, export(model, x, tmp_path_factory.mktemp("conv") / "conv.onnx")


@pytest.fixture(scope="module")
def conv_compiled(conv: Any, tmp_path_factory: pytest.TempPathFactory) -> hwaware.CompiledModel:
    db = tmp_path_factory.mktemp("conv_db") / "t.db"
    return hwaware.compile(conv[2], target="host", db=db, trials=0)


# -------------------------------------------------------------------- correctness
def test_conv_onnx_matches_eager(conv: Any, conv_compiled: hwaware.CompiledModel) -> None:
    model, x, _ = conv
    with torch.no_grad():
        assert_close(conv_compiled(x), model(x))
    spec = conv_compiled.program.kernels[onnx_import.KERNEL_NAME]
    assert spec.impl == "tvm" and spec.steps == [] and spec.flops > 0


def test_two_output_mlp_matches_eager(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, x = TwoOutputMLP().eval(), torch.randn(2, 16)
    path = export(model, x, tmp_path / "mlp.onnx")
    compiled = hwaware.compile(path, target="host", db=tmp_path / "t.db", trials=0)
    with torch.no_grad():
        out = compiled(x)
        assert isinstance(out, tuple) and len(out) == 2
        assert_close(out, model(x))


def test_wrong_input_shape_is_refused(conv: Any, conv_compiled: hwaware.CompiledModel) -> None:
    with pytest.raises(hwaware.runtime.InputMismatchError, match=r"float32\[1, 3, 8, 8\]"):
        conv_compiled(torch.randn(2, 3, 8, 8))


def test_save_load_round_trip(conv: Any, conv_compiled: hwaware.CompiledModel,
                              tmp_path: Path) -> None:
    model, x, _ = conv
    out_dir = conv_compiled.save(tmp_path / "saved")
    assert (out_dir / "kernels.so").is_file() and (out_dir / "program.json").is_file()
    loaded = hwaware.load(out_dir)
    assert loaded.program.kernels[onnx_import.KERNEL_NAME].impl == "tvm"
    with torch.no_grad():
        assert_close(loaded(x), model(x))


def test_a_build_past_the_time_limit_falls_back_with_one_warning(
        conv: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """LLVM sat for hours on one kernel (MobileNetV2's last conv): the build is stopped at the
    limit, and the model runs, right, on ONNX's reference evaluator."""
    model, x, path = conv
    monkeypatch.setattr(onnx_import, "BUILD_TIMEOUT_S", 0.01)
    with caplog.at_level(logging.WARNING, logger="hwaware.onnx_import"):
        compiled = hwaware.compile(path, target="host", db=None)
    slow = [r for r in caplog.records if "ran past 0 s" in r.getMessage()]
    assert len(slow) == 1 and str(path) in slow[0].getMessage()
    assert compiled.program.kernels[onnx_import.KERNEL_NAME].impl == "onnx-reference"
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert_close(compiled(x2), model(x2))


def test_kernel_without_torch_steps_never_falls_back(conv: Any, conv_compiled: Any) -> None:
    """Without its TVM library the ONNX kernel raises instead of silently returning nothing."""
    _, x, _ = conv
    no_library = hwaware.CompiledModel(conv_compiled.program, None, conv_compiled.info)
    with pytest.raises(RuntimeError, match="no PyTorch implementation"):
        no_library(x)


# ------------------------------------------------------------------------- tuning
def test_tuning_writes_records_that_the_build_uses(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 16)
    path = export(model, x, tmp_path / "linear.onnx")
    db_path = tmp_path / "tune.db"
    target = hwaware.get_target("host")
    with caplog.at_level(logging.WARNING, logger="hwaware.onnx_import"):
        compiled = hwaware.compile(path, target="host", db=db_path, trials=4, show_progress=False)
    assert "no tuned record" not in caplog.text  # the build found the session's records

    db = hwaware.TuningDatabase(db_path)
    tasks = onnx_import.import_onnx_file(path, target).tasks
    assert [t.family for t in tasks] == ["matmul"]
    records = db.records_for_target(target.key, TVM_VERSION)
    assert len(records) >= 1 and {r.workload_hash for r in records} == {tasks[0].workload_hash}
    assert db.top_records(tasks[0].workload_hash, TVM_VERSION, target.key, 1)
    with torch.no_grad():
        assert_close(compiled(x), model(x))

    again = onnx_import.tune_onnx(path, target="host", db=db_path, trials=4, show_progress=False)
    assert again.trials_measured == 0  # resumed: the budget is already in the database
    assert again.tasks[0].trials_before == len(db.records_for_target(target.key, TVM_VERSION))


def test_untuned_contractions_are_reported(conv: Any, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    target = hwaware.get_target("host")
    tasks = onnx_import.import_onnx_file(conv[2], target).tasks
    assert sorted(t.family for t in tasks) == ["conv2d", "matmul"]
    with caplog.at_level(logging.WARNING, logger="hwaware.onnx_import"):
        onnx_import._warn_untuned(tasks, hwaware.TuningDatabase(tmp_path / "empty.db"), target)
    assert "2 of 2 ONNX contraction workloads have no tuned record" in caplog.text


# ------------------------------------------------------------------ static shapes
def test_dynamic_dims_need_input_shapes(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model, x = TwoOutputMLP().eval(), torch.randn(3, 16)
    path = export(model, x, tmp_path / "dyn.onnx", dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(OnnxImportError, match=r"input 'x'.*batch.*static shapes"):
        hwaware.compile(path, target="host", db=None)
    with pytest.raises(ValueError, match=r"\['nope'\].*\['x'\]"):
        onnx_import.compile_onnx(path, db=None, input_shapes={"nope": [3, 16]})
    compiled = onnx_import.compile_onnx(path, db=None, input_shapes={"x": [3, 16]})
    with torch.no_grad():
        assert_close(compiled(x), model(x))


# -------------------------------------------------------------------- bad inputs
def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        hwaware.compile(missing, target="host", db=None)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe this is not a protobuf \x00\x01" * 8],
                         ids=["empty", "garbage"])
def test_not_an_onnx_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(OnnxImportError, match=re.escape(str(bad)) + ".*not an ONNX model"):
        hwaware.compile(bad, target="host", db=None)


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt to read external data or to import into TVM."""
    calls: list[str] = []

    def spy(name: str) -> Any:
        return lambda *a, **k: calls.append(name)

    monkeypatch.setattr(onnx_import, "load_external_data_for_model", spy("load_model"))
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", spy("tensor"))
    monkeypatch.setattr(onnx.external_data_helper, "_open_external_data_fd", spy("open"))
    monkeypatch.setattr(ir, "import_onnx", spy("import"))
    return calls


def externalise(src: Path, dst: Path, location: str) -> str:
    """Copy the ONNX model at `src` to `dst` with its first weight stored at `location`
    (written there for real, so only the location check can stop the read)."""
    model = onnx.load(str(src))
    tensor = model.graph.initializer[0]
    data = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
    data_file = Path(location) if os.path.isabs(location) else dst.parent / location
    data_file.parent.mkdir(parents=True, exist_ok=True)
    if not data_file.exists():
        data_file.write_bytes(data)
    tensor.raw_data = data
    set_external_data(tensor, location, offset=0, length=len(data))
    tensor.ClearField("raw_data")
    for field in ("float_data", "int64_data", "int32_data"):
        tensor.ClearField(field)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(model.SerializeToString())
    return tensor.name


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(conv: Any, tmp_path: Path, no_reads: list,
                                                     kind: str) -> None:
    outside = tmp_path / "outside" / "evil.bin"
    model_file = tmp_path / "model" / "m.onnx"
    if kind == "symlink":
        outside.parent.mkdir(parents=True)
        outside.write_bytes(b"\0" * 4096)
        model_file.parent.mkdir(parents=True)
        (model_file.parent / "link.bin").symlink_to(outside)
    location = {"parent": "../evil.bin", "absolute": str(outside), "symlink": "link.bin"}[kind]
    name = externalise(conv[2], model_file, location)
    with pytest.raises(OnnxImportError) as err:
        hwaware.compile(model_file, target="host", db=None)
    assert repr(name) in str(err.value) and repr(location) in str(err.value)
    assert "outside the model's folder" in str(err.value)
    assert no_reads == []


def test_external_data_inside_the_folder_loads(conv: Any, tmp_path: Path) -> None:
    model, x, src = conv
    model_file = tmp_path / "model" / "m.onnx"
    externalise(src, model_file, "weights/w0.bin")
    loaded = onnx_import.load_onnx(model_file)
    assert not any(onnx_import._is_external(t) for t in loaded.graph.initializer)
    compiled = hwaware.compile(model_file, target="host", db=None)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
