"""The device farm over TVM RPC, on loopback: a real tracker and two real servers started with
`hwaware farm`, a tuning session measured across them, and one server killed (SIGKILL) in the
middle of it: the session finishes on the other, and every record it had committed stays, each
naming the farm's device; tuned records checked on a farm device, a crashing one included."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import hwaware
from hwaware import farm
from hwaware.cli import main as cli_main
from hwaware.db import TuningDatabase, candidate_key
from tests.helpers import crashing_record_workload, wrong_best_database

KEY = "loopfarm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`hwaware ARGS` in its own process group (killed as a whole, like a machine dying)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "hwaware.cli", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_servers(tracker: str, count: int, procs: list[subprocess.Popen[bytes]],
                      timeout_s: float = 90.0) -> dict[str, object]:
    deadline = time.time() + timeout_s
    while True:
        exited = [p.args for p in procs if p.poll() is not None]
        assert not exited, f"exited early (see their logs): {exited}"
        try:
            devices = farm.status(tracker)
            if len(devices.get(KEY, {}).get("servers", [])) == count:
                return devices
        except (OSError, RuntimeError):
            pass  # the tracker is not listening yet
        if time.time() > deadline:
            raise TimeoutError(f"the tracker {tracker} never had {count} servers of {KEY!r}")
        time.sleep(0.5)


@dataclass
class LoopbackFarm:
    tracker: str
    servers: list[subprocess.Popen[bytes]]
    logs: list[Path]


@pytest.fixture(scope="module")
def loopback_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackFarm]:
    """A tracker and two servers for the module (the status test runs first: the session test
    kills a server)."""
    tmp_path = tmp_path_factory.mktemp("farm")
    port = _free_port()
    tracker = f"127.0.0.1:{port}"
    procs = [_start(["farm", "tracker", "--port", str(port)], tmp_path / "tracker.log")]
    try:
        _wait_for_servers(tracker, 0, procs)  # the tracker listens: servers register at once
        procs += [_start(["farm", "server", "--key", KEY, "--tracker", tracker,
                          "--port", str(_free_port())], tmp_path / f"server{i}.log")
                  for i in range(2)]
        _wait_for_servers(tracker, 2, procs)
        yield LoopbackFarm(tracker, procs[1:], [tmp_path / f"server{i}.log" for i in range(2)])
    finally:
        for proc in procs:
            _kill(proc)


def conv_block() -> tuple[nn.Module, torch.Tensor]:
    """A tiny MobileNetV2 block: one fused conv_block task, re-measured after the search."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)).eval()
    return model, torch.randn(1, 8, 8, 8)


Records = dict[str, tuple[str, float | None, int]]


def _records(path: Path) -> Records:
    """candidate -> (device, mean_us, number of run times) of every record in the database."""
    with TuningDatabase(path) as db:
        rows = db.db.execute("SELECT candidate, device, mean_us, run_secs FROM records")
        return {c: (d, m, len(json.loads(r))) for c, d, m, r in rows.fetchall()}


def _sessions_served(log: Path) -> int:
    return log.read_text().count("connected from")


def _kill_mid_measurement(path: Path, server: subprocess.Popen[bytes], log: Path,
                          seen: Records) -> threading.Thread:
    """Once the session has committed records (`seen`: those), SIGKILL `server` as soon as it
    serves another measurement (or once 8 records are in, should it get none)."""
    def watch() -> None:
        while not seen:
            time.sleep(0.2)
            if path.exists():
                seen.update(_records(path))
        served = _sessions_served(log)
        while _sessions_served(log) == served and len(_records(path)) < 8:
            time.sleep(0.05)
        _kill(server)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_status_lists_the_devices_and_queues(loopback_farm: LoopbackFarm,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["farm", "status", "--tracker", loopback_farm.tracker]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith(KEY))
    assert line.split()[1:4] == ["2", "2", "0"]  # servers, free, pending
    assert line.count("127.0.0.1:") == 2


def test_session_survives_a_killed_server(loopback_farm: LoopbackFarm, tmp_path: Path) -> None:
    path = tmp_path / "farm.db"
    model, x = conv_block()
    before_kill: Records = {}
    # 16 trials: the fixed-decision schedule first (1), then one batch of 15
    watcher = _kill_mid_measurement(path, loopback_farm.servers[0], loopback_farm.logs[0],
                                    before_kill)
    summary = hwaware.tune(model, (x,), trials=16, db=path, show_progress=False,
                           rpc=loopback_farm.tracker, key=KEY)
    watcher.join(timeout=5)
    assert loopback_farm.servers[0].poll() is not None, "the server was killed mid-session"
    after = _records(path)
    assert summary.trials_measured == 16 and len(after) == 16
    assert set(before_kill) <= set(after)  # nothing committed before the kill is lost
    assert {device for device, _, _ in after.values()} == {f"rpc:{KEY}"}
    # a measurement the kill broke was run again on the other server, not recorded as failed
    assert [c for c, (_, us, _) in after.items() if us is None] == []
    measured_after_kill = [c for c, (_, us, _) in after.items() if c not in before_kill and us]
    assert len(measured_after_kill) >= 10, "the surviving server measured the rest"
    # the re-measure of the best records ran on the farm too (30 rounds each)
    assert any(runs == 30 for _, _, runs in after.values())
    assert len(farm.status(loopback_farm.tracker)[KEY]["servers"]) == 1
    (task,) = summary.tasks
    assert task.family == "conv_block" and task.best_us is not None


def test_bad_farm_arguments_exit_2_naming_them(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["tune", "resnet_basic_block", "--rpc", "no-port", "--key", KEY]) == 2
    assert "'no-port'" in capsys.readouterr().err
    assert cli_main(["tune", "resnet_basic_block", "--key", KEY]) == 2
    assert "--rpc" in capsys.readouterr().err
    assert cli_main(["tune", "resnet_basic_block", "--rpc", "127.0.0.1:9190"]) == 2
    assert "--key" in capsys.readouterr().err
    closed = _free_port()  # nothing listens there
    assert cli_main(["farm", "status", "--tracker", f"127.0.0.1:{closed}"]) == 2
    assert f"no TVM RPC tracker at 127.0.0.1:{closed}" in capsys.readouterr().err


def test_help_says_a_server_runs_any_code(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["farm"], ["farm", "server"], ["farm", "tracker"]):
        with pytest.raises(SystemExit):
            cli_main([*command, "--help"])
        assert "runs whatever code a client sends" in " ".join(capsys.readouterr().out.split())


def test_tuned_records_are_checked_on_a_farm_device(loopback_farm: LoopbackFarm,
                                                    tmp_path: Path) -> None:
    """The records a session measured on the farm are checked on a farm device (the reference
    and the record built here, run there, compared here): a right record passes, a wrong one
    is named with its error, one whose kernel segfaults breaks only its own session and is
    named too: its server serves again (TVM's own server loop would stop for good). The
    session's re-measure uses this check (`checked` with the farm)."""
    from hwaware.target import get_target
    from hwaware.tvm import check, database
    from hwaware.tvm.setup import TVM_VERSION, resolve

    resolved = resolve(get_target("host"))
    on_farm = farm.Farm.of(loopback_farm.tracker, KEY)
    alive = [p for p in loopback_farm.servers if p.poll() is None]
    served = sum(_sessions_served(log) for log in loopback_farm.logs)
    task, bad_key, good_key = wrong_best_database(tmp_path / "wrong.db")
    with TuningDatabase(tmp_path / "wrong.db") as db:
        rows = db.top_records(task.workload_hash, TVM_VERSION, resolved.key, 2)
        checked = database.SqliteDatabase.checked(db, resolved, on_farm.device, on_farm)
    assert checked.verify and checked.farm == on_farm
    traces = {candidate_key(row.trace_json): row.trace_json for row in rows}
    assert check.farm_mismatch(task.workload, traces[good_key], resolved.tvm, on_farm) is None
    wrong = check.farm_mismatch(task.workload, traces[bad_key], resolved.tvm, on_farm)
    assert wrong is not None and "max abs error" in wrong
    workload, crash, fine = crashing_record_workload()
    crashed = check.farm_mismatch(workload, crash, resolved.tvm, on_farm)
    assert crashed is not None and "on the farm device" in crashed
    assert check.farm_mismatch(workload, fine, resolved.tvm, on_farm) is None
    assert sum(_sessions_served(log) for log in loopback_farm.logs) >= served + 6
    assert all(p.poll() is None for p in alive)
    assert any("serving again" in log.read_text() for log in loopback_farm.logs)
    _wait_for_servers(loopback_farm.tracker, len(alive), alive)
