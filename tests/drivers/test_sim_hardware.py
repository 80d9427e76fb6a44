"""The simulated charger as a process (``python -m drivers.sim``), driven like the agent does.

The simulator is started as a child process; its one ready line says where its devices
are; the *real* drivers (RapiController over the pty, ModbusMeter over TCP or an RTU pty)
are connected to them, and the simulator is driven through its control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.base import ControlMode, EvseStatus, FaultCode, VehicleState
from drivers.evse.rapi import RapiController
from drivers.meter.modbus import ModbusBus, ModbusMeter, bus_from_settings, meter_from_settings

REPO = Path(__file__).resolve().parents[2]


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.05)


@dataclass
class SimProcess:
    process: asyncio.subprocess.Process
    info: dict[str, Any]
    control: Path

    async def send_line(self, line: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self.control))
        try:
            writer.write(line)
            await writer.drain()
            answer: dict[str, Any] = json.loads(await asyncio.wait_for(reader.readline(), 10))
            return answer
        finally:
            writer.close()

    async def command(self, cmd: str, **extra: Any) -> dict[str, Any]:
        return await self.send_line(json.dumps({"cmd": cmd, **extra}).encode() + b"\n")

    async def ok(self, cmd: str, **extra: Any) -> dict[str, Any]:
        answer = await self.command(cmd, **extra)
        assert answer["ok"] is True, answer
        return answer

    async def connector(self, cid: int) -> dict[str, Any]:
        state = await self.ok("state")
        found: dict[str, Any] = next(c for c in state["connectors"] if c["id"] == cid)
        return found

    async def close_stdin(self) -> int:
        """What the agent does to stop it: close the simulator's standard input."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        return await asyncio.wait_for(self.process.wait(), 10)


SimFactory = Callable[..., Awaitable[SimProcess]]


@pytest.fixture
async def start_sim(tmp_path: Path) -> AsyncIterator[SimFactory]:
    started: list[SimProcess] = []

    async def factory(*args: str) -> SimProcess:
        control = tmp_path / f"sim{len(started)}.sock"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "drivers.sim", *args, "--control", str(control),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        sim = SimProcess(process, {}, control)
        started.append(sim)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        sim.info = json.loads(line)
        return sim

    yield factory
    for sim in started:
        if sim.process.returncode is None:
            try:
                await sim.close_stdin()
            except TimeoutError:
                sim.process.kill()
                await sim.process.wait()
                raise AssertionError("the simulator did not exit when its stdin closed") from None


@contextlib.asynccontextmanager
async def controller(port: str) -> AsyncIterator[tuple[RapiController, list[EvseStatus]]]:
    ctrl = RapiController(port=port, timeout_s=1.0, retries=2)
    seen: list[EvseStatus] = []
    ctrl.set_listener(seen.append)
    await ctrl.start()
    try:
        yield ctrl, seen
    finally:
        await ctrl.close()


@contextlib.asynccontextmanager
async def meter(
    info: dict[str, Any], unit_id: int, bus: ModbusBus | None = None
) -> AsyncIterator[ModbusMeter]:
    m = meter_from_settings(
        model=info["model"],
        transport=info["transport"],
        host=info.get("host", ""),
        port=info["port"],
        unit_id=unit_id,
        timeout_s=1.0,
        retries=1,
        bus=bus,
    )
    await m.connect()
    try:
        yield m
    finally:
        await m.close()


async def test_ready_line_says_where_the_devices_are(start_sim: SimFactory) -> None:
    sim = await start_sim("--connectors", "2")
    assert len(sim.info["evse_ports"]) == 2
    for port in sim.info["evse_ports"]:
        assert stat.S_ISCHR(os.stat(port).st_mode), port  # a pseudo-terminal
    meter_info = sim.info["meter"]
    assert meter_info["transport"] == "tcp"
    assert meter_info["host"] == "127.0.0.1"
    assert isinstance(meter_info["port"], int) and meter_info["port"] > 0
    assert meter_info["model"] == "sdm630"
    assert sim.info["control"] == str(sim.control)
    assert stat.S_ISSOCK(sim.control.stat().st_mode)
    state = await sim.ok("state")
    assert [c["id"] for c in state["connectors"]] == [1, 2]
    assert not any(c["plugged"] for c in state["connectors"])


async def test_control_commands_change_the_state(start_sim: SimFactory) -> None:
    sim = await start_sim("--connectors", "2")
    await sim.ok("plug", connector=1)
    assert (await sim.connector(1))["plugged"] is True
    assert (await sim.connector(2))["plugged"] is False
    await sim.ok("fault", connector=2, code="ground_fault")
    assert (await sim.connector(2))["fault"] == "ground_fault"
    assert (await sim.connector(1))["fault"] is None
    await sim.ok("clear-fault", connector=2)
    assert (await sim.connector(2))["fault"] is None
    await sim.ok("ev-max-current", connector=1, current_a=10)
    assert (await sim.connector(1))["ev_max_current_a"] == 10
    await sim.ok("meter-silent", connector=1)
    assert (await sim.connector(1))["meter_silent"] is True
    await sim.ok("meter-ok", connector=1)
    await sim.ok("unplug", connector=1)
    assert (await sim.connector(1))["plugged"] is False


async def test_bad_control_requests_are_refused(start_sim: SimFactory) -> None:
    sim = await start_sim()
    refused = [
        await sim.command("teleport"),
        await sim.command("plug", connector=9),
        await sim.command("plug", connector="1"),
        await sim.command("fault", connector=1, code="Meltdown"),
        await sim.command("ev-max-current", connector=1, current_a=-3),
        await sim.send_line(b"not json\n"),
        await sim.send_line(b"[1, 2]\n"),
    ]
    for answer in refused:
        assert answer["ok"] is False, answer
        assert isinstance(answer["error"], str) and answer["error"], answer
    assert "teleport" in refused[0]["error"]
    assert "9" in refused[1]["error"]
    assert "Meltdown" in refused[3]["error"]
    # Still serving, and nothing changed.
    state = await sim.connector(1)
    assert state["plugged"] is False
    assert state["fault"] is None
    assert sim.process.returncode is None


async def test_real_drivers_see_a_session(start_sim: SimFactory) -> None:
    """RapiController sees the vehicle; ModbusMeter's energy grows while it charges."""
    sim = await start_sim("--connectors", "2", "--time-scale", "3600")
    port = sim.info["evse_ports"][0]
    async with controller(port) as (ctrl, seen), meter(sim.info["meter"], 1) as m:
        assert ctrl.capabilities.firmware
        status = await ctrl.read_status()
        assert status.vehicle is VehicleState.ABSENT
        first = await m.read()
        assert first.power_w == 0

        await sim.ok("plug", connector=1)

        async def connected() -> bool:
            return bool(seen) and seen[-1].vehicle is VehicleState.CONNECTED

        await eventually(connected)  # pushed by the controller ($AT), not polled
        assert (await ctrl.read_status()).vehicle is VehicleState.CONNECTED

        await ctrl.enable()

        async def charging() -> bool:
            return (await ctrl.read_status()).vehicle is VehicleState.CHARGING

        await eventually(charging)
        status = await ctrl.read_status()
        assert status.mode is ControlMode.ENABLED
        assert status.contactor_closed is True

        async def energy_grows() -> bool:
            reading = await m.read()
            return reading.energy_wh > first.energy_wh and (reading.power_w or 0) > 1000

        await eventually(energy_grows)
        reading = await m.read()
        assert all(v is not None and 200 < v < 260 for v in reading.voltage_v)
        assert any(a is not None and a > 1 for a in reading.current_a)

        # Connector 2 (meter unit 2) is idle all along.
        async with meter(sim.info["meter"], 2) as m2:
            idle = await m2.read()
            assert idle.power_w == 0

        await sim.ok("fault", connector=1, code="ground_fault")

        async def faulted() -> bool:
            return bool(seen) and seen[-1].fault is FaultCode.GROUND_FAULT

        await eventually(faulted)
        assert seen[-1].vehicle is VehicleState.FAULT
        assert seen[-1].contactor_closed is False

        await sim.ok("clear-fault", connector=1)
        await sim.ok("unplug", connector=1)

        async def absent() -> bool:
            return bool(seen) and seen[-1].vehicle is VehicleState.ABSENT

        await eventually(absent)


async def test_rtu_meter(start_sim: SimFactory) -> None:
    sim = await start_sim("--connectors", "2", "--meter-transport", "rtu", "--time-scale", "3600")
    info = sim.info["meter"]
    assert info["transport"] == "rtu"
    assert os.path.exists(info["port"])
    # Both units are on one RS-485 bus (one serial port): the meters share one ModbusBus.
    bus = bus_from_settings(transport="rtu", host="", port=info["port"], timeout_s=1.0)
    async with (
        controller(sim.info["evse_ports"][1]) as (ctrl, _seen),
        meter(info, 2, bus) as m,
        meter(info, 1, bus) as m1,
    ):
        first = await m.read()
        await sim.ok("plug", connector=2)
        await ctrl.enable()

        async def energy_grows() -> bool:
            reading = await m.read()
            return reading.energy_wh > first.energy_wh and (reading.power_w or 0) > 1000

        await eventually(energy_grows)
        assert (await m1.read()).power_w == 0


async def test_exits_when_stdin_closes(start_sim: SimFactory) -> None:
    sim = await start_sim("--connectors", "2")
    assert sim.control.exists()
    assert await sim.close_stdin() == 0
    assert not sim.control.exists()


async def test_no_orphan_when_the_parent_is_killed(tmp_path: Path) -> None:
    """The agent dies without cleaning up (SIGKILL): the simulator still goes away."""
    control = tmp_path / "orphan.sock"
    parent_code = (
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-m', 'drivers.sim', '--control', "
        f"{str(control)!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n"
        "ready = child.stdout.readline()\n"
        "print(child.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", parent_code, cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert parent.stdout is not None
    try:
        child_pid = int(await asyncio.wait_for(parent.stdout.readline(), 20))
        assert control.exists()
    finally:
        parent.kill()
        await parent.wait()

    def alive(pid: int) -> bool:
        # The child was re-parented; it is gone once it no longer answers signal 0 (or is
        # a zombie waiting for init to reap it).
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    async def gone() -> bool:
        return not alive(child_pid)

    try:
        await eventually(gone, timeout_s=10)
    finally:
        if alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)
    assert not control.exists()


def test_simulator_with_an_unknown_meter_model_says_so_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "drivers.sim", "--meter-model", "sdm999",
         "--control", str(tmp_path / "sim.sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unknown meter model 'sdm999'" in result.stderr


async def test_spawn_reports_a_simulator_that_does_not_come_up(tmp_path: Path) -> None:
    from drivers.sim import process as sim_process

    with pytest.raises(sim_process.SimulatorStartError, match="did not start"):
        await sim_process.spawn(tmp_path / "sim.sock", "--meter-model", "sdm999")
