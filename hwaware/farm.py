"""The device farm: where a tuning session measures when the devices are not this machine.

Goes in: a tracker address (`HOST:PORT`) and a device key, as the user gives them. Comes out:
`Farm`, the frozen description every stage passes along (tune -> MetaSchedule's `RPCRunner`,
the re-measure of top records -> `hwaware.tvm.rpc.RpcRunner`), and the `hwaware farm`
commands' work: start a TVM RPC tracker or server in this process, or print the tracker's
devices and queues. The RPC mechanics are TVM's own (`tvm.rpc`), in `hwaware.tvm.rpc`.

Security: a TVM RPC server runs whatever code a client sends it (uploaded native libraries,
arbitrary files). Servers and trackers bind to 127.0.0.1 unless told otherwise; expose them
only on a network you trust.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_TRACKER_PORT = 9190
SECURITY_WARNING = ("A TVM RPC server runs whatever code a client sends it (native libraries, "
                    "files): bind it to a network you trust; the default is 127.0.0.1 only.")


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); a bad one raises naming it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad tracker address {address!r}: expected HOST:PORT, "
                         f"e.g. {LOOPBACK}:{DEFAULT_TRACKER_PORT}")
    return host, int(port)


@dataclass(frozen=True)
class Farm:
    """The devices of one key behind one TVM RPC tracker: where a session measures.

    `session_timeout_s`: how long one measurement (one RPC session: upload, allocate, time) may
    take before it counts as failed; a request also waits up to this long for a free device."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_s: int = 60

    @classmethod
    def of(cls, rpc: str, key: str | None) -> Farm:
        """The farm from user input: `rpc` is the tracker's HOST:PORT, `key` the devices' key."""
        host, port = parse_address(rpc)
        if not key:
            raise ValueError("measuring on a farm needs the devices' key (--key K, key=...): "
                             "the key its servers registered with (`hwaware farm status`)")
        return cls(host, port, key)

    @property
    def tracker(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    @property
    def device(self) -> str:
        """What the database records as the device of each measurement made on this farm."""
        return f"rpc:{self.key}"


def farm_of(rpc: str | None, key: str | None) -> Farm | None:
    """The farm the user asked for, or None (measure on this machine); a key without a tracker
    (or the reverse) raises."""
    if rpc is None:
        if key:
            raise ValueError(f"key={key!r} names farm devices but no tracker was given "
                             "(--rpc HOST:PORT, rpc=...)")
        return None
    return Farm.of(rpc, key)


def run_tracker(host: str, port: int) -> None:
    """Serve a TVM RPC tracker until killed."""
    from hwaware.tvm import rpc

    _warn_if_exposed(host)
    rpc.serve_tracker(host, port)


def run_server(key: str, tracker: str, host: str, port: int) -> None:
    """Serve one device (this machine) under `key` to the tracker until killed."""
    from hwaware.tvm import rpc

    address = parse_address(tracker)
    _warn_if_exposed(host)
    rpc.serve_device(key, address, host, port)


def _warn_if_exposed(host: str) -> None:
    if host not in (LOOPBACK, "localhost", "::1"):
        log.warning("binding to %s: %s", host, SECURITY_WARNING)


def status(tracker: str) -> dict[str, Any]:
    """The tracker's devices: per key, its servers' addresses and its queue (free, pending)."""
    from hwaware.tvm import rpc

    summary = rpc.tracker_summary(parse_address(tracker))
    devices: dict[str, Any] = {key: {"servers": [], **queue}
                               for key, queue in summary.get("queue_info", {}).items()}
    for server in summary.get("server_info", []):
        key = server["key"].split(":", 1)[-1]  # 'server:KEY'
        devices.setdefault(key, {"servers": [], "free": 0, "pending": 0})
        devices[key]["servers"].append(":".join(map(str, server["addr"])))
    return devices


def status_table(devices: dict[str, Any]) -> str:
    """`status` as a table: one line per key."""
    lines = [f"{'key':<20}{'servers':>8}{'free':>6}{'pending':>9}  addresses"]
    for key, d in sorted(devices.items()):
        lines.append(f"{key:<20}{len(d['servers']):>8}{d.get('free', 0):>6}"
                     f"{d.get('pending', 0):>9}  {' '.join(d['servers'])}")
    return "\n".join(lines)
