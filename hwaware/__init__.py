"""hwaware: a hardware-aware compiler and autotuning plugin for PyTorch, on Apache TVM.

Public API (everything else is internal):
- `compile(model, example_inputs, target=..., db=..., trials=..., strict=..., fuse=...)` ->
  `CompiledModel`, or `DynamicModel` (host program + compiled regions) when forward branches on
  tensor values; `fuse=False` leaves out the fused kernel families (`hwaware.kernels`)
- `tune(model, example_inputs, target=..., trials=..., db=..., fuse=..., rpc=..., key=...)`
  -> `SessionSummary` (`rpc`/`key`: measure on a TVM RPC device farm, see `hwaware.farm`)
- `load(directory, model=None)` -> `CompiledModel` or `DynamicModel` (`model`: the original
  module, for a dynamic model whose regions run in eager PyTorch); checks every file against the
  folder's `manifest.json` first. A saved model holds native code: trust it like a program
- `decompose(model, example_inputs)` -> `Decomposition`: the kernels a compile would build, each
  a frozen `KernelRecord` (signature, family, shapes, FLOPs, bytes), without building them
- `LatencyPredictor.load(target=..., db=...)` -> `.predict(model, example_inputs)`: the latency
  the model will have once compiled, per kernel and in total, without compiling
  (`hwaware.predict`; imported on first use)
- `get_target(name)`, `list_targets()`, `Target`
- `TuningDatabase`
`torch.compile(model, backend="hwaware")` works after install without importing this package.
"""

from hwaware.db import TuningDatabase
from hwaware.decompose import Decomposition, KernelRecord, decompose
from hwaware.dynamic.model import DynamicModel
from hwaware.load import load
from hwaware.pipeline import compile, tune  # noqa: A004 - mirrors torch.compile
from hwaware.runtime import CompiledModel
from hwaware.target import Target, get_target, list_targets

__all__ = [
    "CompiledModel",
    "LatencyPredictor",
    "Decomposition",
    "DynamicModel",
    "KernelRecord",
    "Target",
    "TuningDatabase",
    "compile",
    "decompose",
    "get_target",
    "list_targets",
    "load",
    "tune",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """`hwaware.LatencyPredictor` without importing XGBoost for every user of the compiler."""
    if name == "LatencyPredictor":
        from hwaware.predict.predictor import LatencyPredictor

        return LatencyPredictor
    raise AttributeError(f"module 'hwaware' has no attribute {name!r}")
