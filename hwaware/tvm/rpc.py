"""The device farm over TVM RPC: tracker, servers, and measuring on the farm's devices.

Goes in: a `Farm` (tracker address, device key). Comes out: the tracker and server processes
(`serve_tracker`, `serve_device`: TVM's own `tvm.rpc.Tracker` and server loop, the loop run
again after a session whose kernel crashed), the
tracker's summary, MetaSchedule's `RPCRunner` for a tuning session (`tuning_runner`), and
`RpcRunner`, hwaware's `Runner` on a farm device, with `kernel_evaluations`: built kernels
uploaded to a device and timed there by TVM's time evaluator (the re-measure of top records),
and `remote_outputs`: a built kernel run on a device on given inputs, its buffers fetched back
(a tuned record's check on the device it was tuned for, `hwaware.tvm.check.farm_mismatch`).

A TVM RPC server runs whatever a client sends: bind it to a network you trust.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import rpc
from tvm.ir.utils import derived_object
from tvm.rpc.tracker import Tracker
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

from hwaware.farm import Farm
from hwaware.runner import LocalRunner

log = logging.getLogger(__name__)

SERVER_PORT_RANGE = 100  # a server takes the first free port from --port on


def serve_tracker(host: str, port: int) -> None:
    """Run a TVM RPC tracker on host:port until this process is killed."""
    tracker = Tracker(host, port=port, port_end=port + 1)
    log.info("TVM RPC tracker on %s:%d", host, tracker.port)
    tracker.proc.join()


def serve_device(key: str, tracker: tuple[str, int], host: str, port: int) -> None:
    """Run a TVM RPC server for this machine, registered under `key` with the tracker, until
    this process is killed: TVM's own listen loop (each session in a forked process), run
    again whenever it stops. TVM's loop ends for good when a session's process dies (a kernel
    that segfaults: its `_serving` raises out of the loop) while the server process lives on,
    bound and deregistered: one crashing candidate would take the device out of the farm."""
    from tvm.rpc import server as tvm_server

    sock = _listening_socket(host, port)
    bound = sock.getsockname()[1]
    log.info("TVM RPC server %r on %s:%d, tracker %s:%d", key, host, bound, *tracker)
    home = os.getcwd()
    while True:
        try:
            tvm_server._listen_loop(sock, bound, key, tracker, None, None)
        except RuntimeError as err:  # "Child process ... exited unsuccessfully"
            os.chdir(home)  # the session had moved into its work folder
            log.warning("a session's process died (%s); serving again", err)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket listening on the first free port from `port` on (`SERVER_PORT_RANGE` ports)."""
    for candidate in range(port, port + SERVER_PORT_RANGE):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as err:
            sock.close()
            if err.errno != errno.EADDRINUSE:
                raise
            continue
        sock.listen(1)
        return sock
    raise OSError(f"no free port in [{port}, {port + SERVER_PORT_RANGE}) on {host}")


def tracker_summary(tracker: tuple[str, int]) -> dict[str, Any]:
    """TVM's tracker summary: `queue_info` (per key: free, pending) and `server_info`; no
    tracker at that address raises at once, naming it (TVM's client retries for a minute)."""
    try:
        socket.create_connection(tracker, timeout=5).close()
    except OSError as err:
        raise RuntimeError(f"no TVM RPC tracker at {tracker[0]}:{tracker[1]} ({err}); start "
                           "one with `hwaware farm tracker`") from err
    return dict(rpc.connect_tracker(*tracker).summary())


def count_devices(farm: Farm) -> int:
    """How many servers (busy or free) the tracker has under the farm's key."""
    servers = tracker_summary((farm.tracker_host, farm.tracker_port)).get("server_info", [])
    return sum(1 for s in servers if s.get("key") == f"server:{farm.key}")


def rpc_config(farm: Farm) -> Any:
    return ms.runner.RPCConfig(tracker_host=farm.tracker_host, tracker_port=farm.tracker_port,
                               tracker_key=farm.key, session_timeout_sec=farm.session_timeout_s)


def tuning_runner(farm: Farm, evaluator: Any = None) -> Any:
    """MetaSchedule's `RPCRunner` on the farm: one measurement in flight per device (at least
    one), each a session the tracker gives to whichever device of the key is free; a
    measurement whose session broke is run once more (`RetryBrokenSessions`)."""
    devices = count_devices(farm)
    if devices == 0:
        raise RuntimeError(f"the tracker {farm.tracker} has no device under key "
                           f"{farm.key!r} (see `hwaware farm status --tracker {farm.tracker}`)")
    log.info("measuring on %d device(s) of %r via %s", devices, farm.key, farm.tracker)
    return RetryBrokenSessions(ms.runner.RPCRunner(
        rpc_config=rpc_config(farm), evaluator_config=evaluator, max_workers=devices))


BROKEN_SESSION = "RPCRunner: An exception occurred"  # RPCRunnerFuture's words; not a timeout


@derived_object
class RetryBrokenSessions(ms.runner.PyRunner):
    """A runner that measures a candidate once more when its RPC session broke (the device died
    or dropped the connection), on whichever device of the key the tracker gives next; the
    second result stands, failed or not. A candidate that timed out is not retried (it hangs).

    Without it, a device lost mid-measurement leaves a sound candidate recorded as failed, and
    the search never proposes a stored candidate again."""

    def __init__(self, inner: Any):
        super().__init__()
        self.inner = inner

    def run(self, runner_inputs: list[Any]) -> list[Any]:
        futures = self.inner.run(runner_inputs)
        return [_RetriedFuture(self.inner, runner_input, future)
                for runner_input, future in zip(runner_inputs, futures, strict=True)]


@derived_object
class _RetriedFuture(ms.runner.PyRunnerFuture):
    def __init__(self, runner: Any, runner_input: Any, future: Any):
        super().__init__()
        self.runner = runner
        self.runner_input = runner_input
        self.future = future

    def done(self) -> bool:
        return bool(self.future.done())

    def result(self) -> Any:
        result = self.future.result()
        if result.error_msg and str(result.error_msg).startswith(BROKEN_SESSION):
            log.warning("an RPC session broke (%s); measuring the candidate again",
                        str(result.error_msg).strip().splitlines()[-1][:200])
            result = self.runner.run([self.runner_input])[0].result()
        return result


@dataclass(frozen=True)
class RpcRunner:
    """hwaware's `Runner` on a farm device: it times self-timed callables (TVM time evaluators
    of kernels on the device, from `kernel_evaluations`) round-robin, as the local re-measure
    does. It cannot time PyTorch: a TVM RPC server runs TVM modules only."""

    farm: Farm

    def run_us(self, fns: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
        return LocalRunner(block=1, untimed_per_block=0, self_timed=True).run_us(fns, repeats)

    @property
    def device(self) -> str:
        return self.farm.device


@contextmanager
def kernel_evaluations(libs: Sequence[Any], args_info: Any, runner: RpcRunner | None = None,
                       min_repeat_ms: int = 20) -> Iterator[list[Callable[[], float]]]:
    """One callable per built kernel (CPU), each returning its mean seconds per call on the
    same random inputs: on this machine, or (`runner`) on one farm device, held for the
    duration (the kernels uploaded to it once)."""
    if runner is None:
        yield _evaluations(libs, tvm.cpu(), args_info, _local_fill(), min_repeat_ms)
        return
    session = rpc_config(runner.farm).connect_server()
    with tempfile.TemporaryDirectory(prefix="hwaware-rpc-") as tmp:
        remote = [_uploaded(session, lib, Path(tmp) / f"kernel{i}.tar")
                  for i, lib in enumerate(libs)]
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
        yield _evaluations(remote, session.cpu(), args_info, fill, min_repeat_ms)


def remote_outputs(farm: Farm, lib: Any, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A built kernel (CPU) run once on one farm device, in a session of its own, on copies of
    `args`: every buffer after the call, outputs and inputs, in order. A kernel that crashes or
    hangs there breaks its session only (raised here)."""
    session = rpc_config(farm).connect_server()
    device = session.cpu()
    with tempfile.TemporaryDirectory(prefix="hwaware-rpc-") as tmp:
        remote = _uploaded(session, lib, Path(tmp) / "kernel.tar")
        tensors = [tvm.runtime.tensor(a, device) for a in args]
        remote["main"](*tensors)
        return [t.numpy() for t in tensors]


def _uploaded(session: Any, lib: Any, path: Path) -> Any:
    lib.export_library(str(path))
    session.upload(str(path), path.name)
    return session.load_module(path.name)


def _local_fill() -> Any:
    return tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")


def _evaluations(libs: Sequence[Any], device: Any, args_info: Any, fill: Any,
                 min_repeat_ms: int) -> list[Callable[[], float]]:
    (args,) = alloc_argument_common(fill, device, args_info, 1)
    timers = [lib.time_evaluator("main", device, number=1, repeat=1, min_repeat_ms=min_repeat_ms)
              for lib in libs]
    return [_evaluation(timer, args) for timer in timers]


def _evaluation(timer: Any, args: Any) -> Callable[[], float]:
    """One evaluation of a TVM time evaluator: its mean seconds per call."""
    return lambda: float(timer(*args).mean)
