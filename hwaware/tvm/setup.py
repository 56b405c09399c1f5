"""TVM set-up: the version, the import-time patch, targets resolved once.

Goes in: a hwaware `Target`. Comes out: `TVM_VERSION` (part of every database key), the
`ResolvedTarget` (the target, its TVM target and its database key, built once per process),
`import_tensor_intrinsics` (~9 s instead of ~55 s) and `fast_build`, MetaSchedule's builder
function without that import.
"""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import tvm

from hwaware.target import Target

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


@dataclass(frozen=True)
class ResolvedTarget:
    """A `Target` resolved for TVM, once: every stage takes its TVM target and database key
    from here (`resolve`), none rebuilds them."""

    target: Target
    tvm: tvm.target.Target

    @property
    def key(self) -> str:
        """The database key of the target's records."""
        return self.target.key


@functools.cache
def resolve(target: Target) -> ResolvedTarget:
    """The target resolved for TVM (the same object for equal targets in a process)."""
    return ResolvedTarget(target, tvm_target(target.tvm, target.host_tvm))
