"""TVM set-up: the thread-pool environment, the version, the import-time patch, targets.

Goes in: a target's TVM dict. Comes out: `TVM_VERSION` (part of every database key), a TVM
target, `import_tensor_intrinsics` (~9 s instead of ~55 s) and `fast_build`, MetaSchedule's
builder function without that import.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import tvm

TVM_VERSION = str(tvm.__version__)


def _frames_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    """`inspect.stack()` without reading source files: TVMScript only needs the frames."""
    frame: Any = sys._getframe(1)
    frames = []
    while frame is not None:
        frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                        frame.f_code.co_name, None, None))
        frame = frame.f_back
    return frames


def import_tensor_intrinsics() -> None:
    """Import `tvm.s_tir.tensor_intrin` in ~9 s instead of ~55 s (TuneContext needs it)."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    original = inspect.stack
    inspect.stack = _frames_without_source  # type: ignore[assignment]
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def fast_build(mod: tvm.IRModule, target: tvm.target.Target, _params: Any) -> Any:
    """MetaSchedule builder function: the default one minus the tensor-intrinsics import."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def tvm_target(tvm_dict: dict[str, Any], host: dict[str, Any] | None = None) -> tvm.target.Target:
    """A TVM target from the dict form (target strings are rejected by TVM 0.27)."""
    if host is not None:
        return tvm.target.Target(tvm_dict, host=tvm.target.Target(host))
    return tvm.target.Target(tvm_dict)
