"""Runtime: executables on disk and in memory, VMs, and VM functions as torch -> torch calls.

Goes in: an executable (built here, or a saved library). Comes out: a Relax VM and callables
that take and return torch tensors (DLPack both ways); CPU kernels built or loaded here run on
PyTorch's OpenMP team (`hwaware.threads`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from hwaware import layout, threads

SHARED_ATTR = "_hwaware_shared_threads"
_ALIGNMENT = 64  # TVM's kAllocAlignment: compiled kernels may assume it


def load_executable(path: str) -> Any:
    """A saved kernel library; a runnable CPU one runs its kernels on PyTorch's OpenMP team
    (`hwaware.threads`)."""
    module = tvm.runtime.load_module(path)
    if path.endswith(".so"):
        threads.share_threads(path)
    return module


class LibraryFile:
    """A kernel library another process built and wrote to `path`, loaded here. A loaded
    library cannot be exported again, so saving it copies the file."""

    def __init__(self, path: str):
        self.path = path
        self.module = load_executable(path)


def make_vm(executable: Any, device_kind: str = "cpu", share_threads: bool = False) -> Any:
    """A VM for `executable`; `share_threads`: a CPU executable built in this process runs its
    kernels on PyTorch's OpenMP team (`hwaware.threads`)."""
    if isinstance(executable, LibraryFile):
        executable = executable.module
    if share_threads and device_kind == "cpu" and isinstance(executable, tvm.runtime.Executable):
            executable = with_shared_threads(executable)
    device = tvm.cuda() if device_kind == "cuda" else tvm.cpu()
    return relax.VirtualMachine(executable, device)


def torch_callable(vm: Any, name: str, num_outputs: int | None = None
                   ) -> Callable[..., list[Any]]:
    """A VM function as a torch -> torch call. tvm-ffi passes torch tensors by DLPack and
    hands torch tensors back; a tuple result is read element by element (faster than
    iterating the Array, which matters for batch-1 kernels of a few microseconds)."""
    import torch
    from tvm_ffi import container

    func = vm[name]
    get_item = container._ffi_api.ArrayGetItem
    to_torch = torch.from_dlpack

    def as_torch(o: Any) -> Any:
        return o if isinstance(o, torch.Tensor) else to_torch(o)

    def call(*tensors: torch.Tensor) -> list[torch.Tensor]:
        args = [t if t.is_contiguous() and not t.data_ptr() % _ALIGNMENT else _compact(t)
                for t in tensors]
        out = func(*args)
        if isinstance(out, (torch.Tensor, tvm.runtime.Tensor)):
            return [as_torch(out)]
        n = len(out) if num_outputs is None else num_outputs
        return [as_torch(get_item(out, i)) for i in range(n)]

    return call


def _compact(t: Any) -> Any:
    """`t` in fresh, aligned, contiguous storage (a channels-last result of oneDNN or a
    user's channels-last input through the fast converter)."""
    import torch

    if t.is_contiguous():
        return t.clone(memory_format=torch.contiguous_format)
    return layout.to_contiguous(t)  # new storage, aligned as every allocation


def export_executable(executable: Any, path: str, cross: bool = False) -> None:
    """Write the library: a shared object, or for a cross target a tar of object files that
    `load_executable` links on the device with its own compiler."""
    if isinstance(executable, LibraryFile):
        shutil.copyfile(executable.path, path)
    elif cross:
        from tvm.support.tar import tar

        executable.export_library(path, fcompile=tar)
    else:
        executable.export_library(path)


def with_shared_threads(executable: Any) -> Any:
    """An in-memory CPU executable as a loaded library whose kernels use PyTorch's OpenMP team
    (`executable` itself where that cannot be done). The library file is deleted once loaded
    (the mapping stays); the result is kept on `executable` for the next VM of it (the build
    times several plans on one executable)."""
    if threads.openmp_launcher() is None:
        return executable
    shared = getattr(executable, SHARED_ATTR, None)
    if shared is None:
        shared = _load_shared(executable)
        setattr(executable, SHARED_ATTR, shared)
    return shared


def _load_shared(executable: Any) -> Any:
    folder = Path(tempfile.mkdtemp(prefix="hwaware-kernels-"))
    try:
        path = str(folder / "kernels.so")
        executable.export_library(path)
        module = tvm.runtime.load_module(path)
        return module if threads.share_threads(path) else executable
    finally:
        shutil.rmtree(folder, ignore_errors=True)
