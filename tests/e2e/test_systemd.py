"""The agent under systemd's notify protocol (Type=notify, WatchdogSec): ``evcp run`` as a
separate process, with NOTIFY_SOCKET pointing at a datagram socket the test reads, as
systemd's would be.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.ocpp.csms import Csms
from tests.conftest import RunningAgent, start_charging, write_config


class NotifySocket:
    """What systemd listens on: collects every sd_notify datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._read)

    def _read(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.messages.append(self._sock.recv(4096).decode())
            self._changed.set()

    def count(self, word: str) -> int:
        return sum(word in message.splitlines() for message in self.messages)

    async def wait(self, word: str, times: int = 1, timeout_s: float = 20) -> None:
        async with asyncio.timeout(timeout_s):
            while self.count(word) < times:
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()


async def start_agent(
    tmp_path: Path, csms: Csms, ca_file: Path, env: dict[str, str]
) -> asyncio.subprocess.Process:
    config = tmp_path / "evcp.toml"
    if not config.exists():
        write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}  # fmt: skip
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**clean, **env},
    )  # fmt: skip


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


async def stop(proc: asyncio.subprocess.Process) -> bytes:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return err


async def test_ready_watchdog_and_stopping_are_sent(
    tmp_path: Path, csms: Csms, ca_file: Path, notify: NotifySocket
) -> None:
    proc = await start_agent(
        tmp_path, csms, ca_file, {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    )
    try:
        await notify.wait("READY=1")
        ready = next(m for m in notify.messages if "READY=1" in m.splitlines())
        assert any(line.startswith("STATUS=evcp ") for line in ready.splitlines())
        # WatchdogSec=1: pinged at least every half period, so several within 3 s.
        await notify.wait("WATCHDOG=1", times=3, timeout_s=10)
    finally:
        err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    assert notify.count("STOPPING=1") == 1
    assert notify.count("READY=1") == 1


async def test_a_watchdog_meant_for_another_process_is_not_fed(
    tmp_path: Path, csms: Csms, ca_file: Path, notify: NotifySocket
) -> None:
    """WATCHDOG_PID names the process systemd watches (sd_watchdog_enabled(3)): a child
    that inherited the variables must not feed it."""
    proc = await start_agent(
        tmp_path, csms, ca_file,
        {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"},
    )  # fmt: skip
    try:
        await notify.wait("READY=1")
        await asyncio.sleep(1.5)  # more than seven watchdog periods of 0.2 s
    finally:
        err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    assert notify.count("WATCHDOG=1") == 0


async def test_a_notify_socket_that_went_away_does_not_stop_the_agent(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    proc = await start_agent(
        tmp_path, csms, ca_file,
        {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "1000000"},
    )  # fmt: skip
    try:
        await csms.wait_message("BootNotification", timeout_s=20)
        await asyncio.sleep(1.5)  # a few watchdog pings into the void
        assert proc.returncode is None
    finally:
        err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err


async def test_sigterm_mid_session_closes_the_transaction_with_reboot_at_the_next_start(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    """``systemctl restart evcp`` (or a reboot) while a car charges: an orderly stop, so
    the transaction is closed with Reason Reboot -- not PowerLoss -- and the meter's
    register as meterStop."""
    proc = await start_agent(tmp_path, csms, ca_file, {})
    view = RunningAgent(tmp_path / "evcp.toml")  # the control socket of that process
    try:
        await csms.wait_message("BootNotification", timeout_s=20)
        tx_id = await start_charging(view, csms)
        start = await csms.wait_message("StartTransaction")
        await csms.wait_message("MeterValues", lambda p: p["transactionId"] == tx_id)
        energy_wh = (await view.status())["connectors"][0]["energy_wh"]
    finally:
        err = await stop(proc)
    assert proc.returncode == 0, err.decode()

    mark = len(csms.received)
    proc = await start_agent(tmp_path, csms, ca_file, {})
    try:
        stop_tx = await csms.wait_message("StopTransaction", after=mark, timeout_s=20)
    finally:
        await stop(proc)
    assert stop_tx.payload["transactionId"] == tx_id
    assert stop_tx.payload["reason"] == "Reboot"
    assert stop_tx.payload["meterStop"] >= max(start.payload["meterStart"], int(energy_wh))
    assert csms.errors == []


async def test_a_reset_is_a_reload_to_systemd_not_a_stop(
    tmp_path: Path, csms: Csms, ca_file: Path, notify: NotifySocket
) -> None:
    """A Soft Reset restarts the agent inside the process: RELOADING=1 then READY=1.
    STOPPING=1 there would start the unit's stop timeout, and systemd would SIGKILL the
    agent TimeoutStopSec later (a READY=1 in the stopping state does not count)."""
    from ocpp.v16 import call

    from tests.conftest import CP_ID

    proc = await start_agent(tmp_path, csms, ca_file, {"NOTIFY_SOCKET": str(notify.path)})
    try:
        await notify.wait("READY=1")
        await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
        assert (await csms.call(CP_ID, call.Reset(type="Soft")))["status"] == "Accepted"
        await notify.wait("READY=1", times=2)
    finally:
        err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    lines = [line for m in notify.messages for line in m.splitlines() if "=1" in line]
    assert lines[:3] == ["READY=1", "RELOADING=1", "READY=1"], lines
    assert lines.count("STOPPING=1") == 1 and lines[-1] == "STOPPING=1", lines


async def test_sigterm_while_waiting_for_ntp_stops_at_once(
    tmp_path: Path, csms: Csms, ca_file: Path
) -> None:
    """The clock is synchronised before the first TLS connection, which can take a while
    with no NTP server answering: a SIGTERM meanwhile stops the agent at once, cleanly."""
    import time as _time

    config = write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    text = config.read_text().replace("ntp_servers = []", 'ntp_servers = ["127.0.0.1:9"]')
    config.write_text(text)
    proc = await start_agent(tmp_path, csms, ca_file, {})
    await asyncio.sleep(2.0)  # in the NTP wait: nothing answers on port 9
    assert proc.returncode is None
    started = _time.monotonic()
    err = await stop(proc)
    assert proc.returncode == 0, err.decode()
    assert _time.monotonic() - started < 5
    assert b"Traceback" not in err
    assert b"stopping on signal (while starting)" in err, err.decode()
