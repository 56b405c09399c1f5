"""One thread team for PyTorch's ops and hwaware's CPU kernels.

TVM runs a kernel's parallel loops on its own thread pool; PyTorch runs its ops on OpenMP's
(libgomp, in the Linux wheels). Both pools' workers spin-wait after a parallel region, so when
a compiled model mixes the two (kernels left to PyTorch, host decisions of a dynamic network, a
graph break under torch.compile, or just the user's own ops around the call), a kernel called
right after a PyTorch op shares its cores with spinning OpenMP threads. Measured on the 2-core
host: the fused ResNet basic block took 6.3-7.8 ms right after an eager op against 3.8-4.3 ms
back to back; on the OpenMP team it took 3.5-3.7 ms after the eager op.

So the runtime points each CPU kernel library's parallel-launch hook (`__TVMBackendParallelLaunch`,
a function pointer TVM's loader fills in the library) at a small launcher that runs the tasks
as one OpenMP parallel region of the OpenMP runtime PyTorch loaded. The launcher is C, built
once per machine with the system C compiler into hwaware's cache folder. Nothing changes where
that cannot be done (no libgomp in the process, no compiler, an unwritable cache folder, a
library with TVM barriers, or HWAWARE_THREAD_POOL=tvm): the kernels keep TVM's pool. The team
size is PyTorch's (`torch.set_num_threads`), not TVM_NUM_THREADS. This module imports no TVM:
`hwaware.tvm.vm.with_shared_threads` loads a library and hands it to `share_threads`.
"""

from __future__ import annotations

import _ctypes
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCH_HOOK = "__TVMBackendParallelLaunch"
BARRIER_HOOK = "__TVMBackendParallelBarrier"  # kernels that sync inside a region: left alone
LAUNCHER_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

/* TVMBackendParallelLaunch's contract on an OpenMP team: task i of n runs on thread i; the
   kernel splits its loop by the team size it is given. */
int hwaware_openmp_launch(FTVMParallelLambda flambda, void* cdata, int num_task) {
  int error = 0;
  #pragma omp parallel num_threads(num_task > 0 ? num_task : omp_get_max_threads())
  {
    TVMParallelGroupEnv env;
    env.sync_handle = 0;
    env.num_task = omp_get_num_threads();
    int status = flambda(omp_get_thread_num(), &env, cdata);
    if (status != 0) {
      #pragma omp atomic write
      error = status;
    }
  }
  return error;
}
"""


def share_threads(library: str) -> bool:
    """Point the kernel library at `library` (a loaded .so) at PyTorch's OpenMP team; whether
    it was done."""
    launcher = openmp_launcher()
    if launcher is None:
        return False
    handle = ctypes.CDLL(library)  # the already loaded library: same handle, same hooks
    try:
        hook = _pointer(handle, LAUNCH_HOOK)
        if hook is None or _pointer(handle, BARRIER_HOOK) is not None:
            log.debug("%s keeps TVM's thread pool (barriers, or no parallel loops)", library)
            return False
        hook.value = ctypes.cast(launcher.hwaware_openmp_launch, ctypes.c_void_p).value
        return True
    finally:  # drop this reference: the library unloads with TVM's module, as before
        _ctypes.dlclose(handle._handle)


@functools.cache
def openmp_launcher() -> ctypes.CDLL | None:
    """The launcher library, built against the libgomp this process loaded (None: not
    possible here, see the module docstring)."""
    if os.environ.get("HWAWARE_THREAD_POOL", "openmp") == "tvm":
        return None
    return openmp_library("openmp_launch", LAUNCHER_SOURCE)


def openmp_library(name: str, source: str) -> ctypes.CDLL | None:
    """The C `source` (OpenMP code) built once per machine into the cache folder as library
    `name`, linked to the libgomp this process loaded (PyTorch's), and loaded; None where it
    cannot be: no libgomp, no C compiler, a build error, an unwritable cache folder."""
    runtime = _loaded_libgomp()
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if runtime is None or compiler is None:
        log.debug("no %s: libgomp %s, C compiler %s", name, runtime, compiler)
        return None
    key = hashlib.sha256(f"{source}{runtime}{compiler}".encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}_{key}.so"
    try:
        if not path.exists() and not build_c_library(
                compiler, source, ["-O2", "-fopenmp"],
                [str(runtime), f"-Wl,-rpath,{runtime.parent}"], path):
            log.debug("no %s: it did not build", name)
            return None
        return ctypes.CDLL(str(path))
    except OSError as err:  # an unwritable cache folder, a library that does not load
        log.debug("no %s: %s", name, err)
        return None


def _loaded_libgomp() -> Path | None:
    """The libgomp mapped into this process (PyTorch's), if any (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1]
        if Path(path).name.startswith("libgomp") and ".so" in path:
            return Path(path)
    return None


def build_c_library(compiler: str, source: str, flags: list[str], link: list[str], path: Path
                    ) -> bool:
    """Compile C `source` into the shared library `path` (hwaware's small native helpers);
    whether it was built. The file appears atomically: concurrent processes never load a
    partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        src, built = Path(work) / "helper.c", Path(work) / "helper.so"
        src.write_text(source)
        cmd = [compiler, *flags, "-shared", "-fPIC", str(src), "-o", str(built), *link]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            log.debug("%s did not build: %s", path.name, done.stderr[-2000:])
            return False
        os.replace(built, path)
    return True


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hwaware"


def _pointer(handle: ctypes.CDLL, name: str) -> ctypes.c_void_p | None:
    """The library's pointer variable `name` (writable in place), or None if it has none."""
    try:
        return ctypes.c_void_p.in_dll(handle, name)
    except ValueError:
        return None
