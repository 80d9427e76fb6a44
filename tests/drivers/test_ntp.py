"""Tests of drivers.clock.ntp against a real chronyd serving NTP on 127.0.0.1.

chronyd runs with ``-x`` (never touches the host clock) on a free UDP port; a tiny in-process
fake server covers answers chrony will not give (a clock 100 s ahead, kiss-of-death,
garbage). The host clock is never stepped: ``time.clock_settime`` is replaced in every test.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ntplib
import pytest

from drivers.base import ClockSample, DeviceTimeout, FatalDriverError, ProtocolError
from drivers.clock import ntp
from drivers.clock.ntp import ClockGuard, parse_server, query, sync

LOGGER = "evcp.clock"
HOST = "127.0.0.1"


def _find_chronyd() -> str | None:
    found = shutil.which("chronyd")
    if found:
        return found
    for candidate in ("/usr/sbin/chronyd", "/sbin/chronyd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class ChronyServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def _run_chronyd(tmp_path: Path, *, local_stratum: int | None) -> Iterator[ChronyServer]:
    chronyd = _find_chronyd()
    if chronyd is None:
        pytest.skip("chronyd not installed: apt-get install chrony (CI installs it)")
    port = _free_udp_port()
    conf = tmp_path / "chrony.conf"
    lines = [
        f"port {port}",
        f"bindaddress {HOST}",
        f"allow {HOST}",
        "cmdport 0",
        "bindcmdaddress /",
        f"driftfile {tmp_path / 'chrony.drift'}",
        f"pidfile {tmp_path / 'chronyd.pid'}",
    ]
    if local_stratum is not None:
        lines.append(f"local stratum {local_stratum}")
    conf.write_text("\n".join(lines) + "\n")
    if os.geteuid() != 0:
        pytest.skip("chronyd runs only as root (CI and `make test` under .ci/run are root)")
    log_path = tmp_path / "chronyd.log"
    # -x: never touch the host clock. -d: foreground, log to stderr. -u root: keep the
    # privileges needed to write the drift and pid files in tmp_path.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [chronyd, "-x", "-d", "-u", "root", "-f", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 5.0
        client = ntplib.NTPClient()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"chronyd exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                client.request(HOST, version=4, port=port, timeout=0.05)
                break
            except (ntplib.NTPException, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"chronyd did not answer within 5 s:\n{log_path.read_text()}")
                time.sleep(0.005)
        yield ChronyServer(port=port, proc=proc)
    finally:
        proc.terminate()  # by PID
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def chrony(tmp_path: Path) -> Iterator[ChronyServer]:
    """A synchronised chronyd (``local stratum 8``) on a free port of 127.0.0.1."""
    yield from _run_chronyd(tmp_path, local_stratum=8)


@pytest.fixture
def unsynced_chrony(tmp_path: Path) -> Iterator[ChronyServer]:
    """A chronyd without time sources nor ``local``: it answers "unsynchronised"."""
    yield from _run_chronyd(tmp_path, local_stratum=None)


@pytest.fixture
def dead_server() -> str:
    """An address where nothing answers (an unused UDP port)."""
    return f"{HOST}:{_free_udp_port()}"


@dataclass
class FakeNtpServer:
    """A one-thread NTP server whose answers the test chooses."""

    shift_s: float = 0.0
    stratum: int = 2
    leap: int = 0
    mode: int = 4
    ref_id: int = 0x7F000001
    raw_reply: bytes | None = None
    #: False: requests are counted and never answered (a server that went dead).
    answers: bool = True
    port: int = 0
    requests: int = 0
    _sock: socket.socket = field(init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((HOST, 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            self.requests += 1
            if self.answers:
                self._sock.sendto(self._reply(data), peer)

    def _reply(self, data: bytes) -> bytes:
        if self.raw_reply is not None:
            return self.raw_reply
        request = ntplib.NTPPacket()
        request.from_data(data)
        now = ntplib.system_to_ntp_time(time.time() + self.shift_s)
        reply = ntplib.NTPPacket(version=4, mode=self.mode, tx_timestamp=now)
        reply.leap = self.leap
        reply.stratum = self.stratum
        reply.ref_id = self.ref_id
        reply.ref_timestamp = now
        reply.orig_timestamp = request.tx_timestamp
        reply.recv_timestamp = now
        packet: bytes = reply.to_data()
        return packet


@pytest.fixture
def fake_server() -> Iterator[FakeNtpServer]:
    """A server whose clock runs 100 s ahead of the host's."""
    server = FakeNtpServer(shift_s=100.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def silent_server() -> Iterator[FakeNtpServer]:
    """A server that receives the requests (and counts them) but never answers."""
    server = FakeNtpServer(answers=False)
    server.start()
    yield server
    server.stop()


@dataclass
class SetterSpy:
    """A fake ``clock_settime``: records the requested time and when it was requested."""

    calls: list[tuple[float, float]] = field(default_factory=list)

    def __call__(self, epoch_s: float) -> None:
        self.calls.append((epoch_s, time.time()))


@pytest.fixture(autouse=True)
def never_step_host_clock(monkeypatch: pytest.MonkeyPatch) -> SetterSpy:
    """Replace ``time.clock_settime`` so no test can step the real clock."""
    spy = SetterSpy()

    def fake_clock_settime(clk_id: int, epoch_s: float) -> None:
        assert clk_id == time.CLOCK_REALTIME
        spy(epoch_s)

    monkeypatch.setattr(time, "clock_settime", fake_clock_settime)
    return spy


def _server_offset(server: str) -> float:
    """Server time minus host time, measured now."""
    return query(server, timeout_s=1.0).offset_s


# --------------------------------------------------------------------------- query


def test_query_chrony_returns_stratum_8_small_offset(chrony: ChronyServer) -> None:
    sample = query(chrony.address, timeout_s=1.0)

    assert isinstance(sample, ClockSample)
    assert sample.server == chrony.address
    assert sample.stratum == 8
    assert abs(sample.offset_s) < 0.05  # same host, same clock
    assert 0 <= sample.delay_s < 0.5


def test_query_uses_port_argument_when_server_has_none(chrony: ChronyServer) -> None:
    sample = query(HOST, port=chrony.port, timeout_s=1.0)

    assert sample.stratum == 8
    assert sample.server == HOST


def test_query_dead_server_raises_device_timeout_within_timeout(dead_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(DeviceTimeout, match="no answer"):
        query(dead_server, timeout_s=0.3)
    assert time.monotonic() - started < 1.0


def test_query_unresolvable_host_raises_device_timeout() -> None:
    with pytest.raises(DeviceTimeout, match="unreachable"):
        query("no-such-host.invalid", timeout_s=0.3)


def test_query_unsynchronised_chrony_is_rejected(unsynced_chrony: ChronyServer) -> None:
    with pytest.raises(ProtocolError, match="unsynchronised"):
        query(unsynced_chrony.address, timeout_s=1.0)


def test_query_kiss_of_death_is_rejected(fake_server: FakeNtpServer) -> None:
    fake_server.stratum = 0
    fake_server.ref_id = int.from_bytes(b"RATE", "big")

    with pytest.raises(ProtocolError, match="kiss-of-death 'RATE'"):
        query(fake_server.address, timeout_s=1.0)


def test_query_stratum_16_is_rejected(fake_server: FakeNtpServer) -> None:
    fake_server.stratum = 16

    with pytest.raises(ProtocolError, match="stratum 16"):
        query(fake_server.address, timeout_s=1.0)


def test_query_wrong_mode_is_rejected(fake_server: FakeNtpServer) -> None:
    fake_server.mode = 3

    with pytest.raises(ProtocolError, match="mode"):
        query(fake_server.address, timeout_s=1.0)


def test_query_garbage_reply_is_rejected(fake_server: FakeNtpServer) -> None:
    fake_server.raw_reply = b"\x00" * 10

    with pytest.raises(ProtocolError, match="bad answer"):
        query(fake_server.address, timeout_s=1.0)


def test_query_measures_a_large_offset(fake_server: FakeNtpServer) -> None:
    sample = query(fake_server.address, timeout_s=1.0)

    assert sample.offset_s == pytest.approx(100.0, abs=0.05)
    assert sample.stratum == 2


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("pool.ntp.org", ("pool.ntp.org", 123)),
        ("127.0.0.1:11123", ("127.0.0.1", 11123)),
        (" time.example:4123 ", ("time.example", 4123)),
        ("[::1]:1234", ("::1", 1234)),
        ("[::1]", ("::1", 123)),
        ("fe80::1", ("fe80::1", 123)),
    ],
)
def test_parse_server(server: str, expected: tuple[str, int]) -> None:
    assert parse_server(server) == expected


@pytest.mark.parametrize("server", ["", ":123", "host:abc", "host:0", "host:70000", "[::1"])
def test_parse_server_rejects_bad_configuration(server: str) -> None:
    with pytest.raises(FatalDriverError):
        parse_server(server)


# --------------------------------------------------------------------------- sync


async def test_sync_returns_the_sample(
    chrony: ChronyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    sample = await sync([chrony.address], timeout_s=1.0)

    assert sample is not None
    assert sample.server == chrony.address
    assert sample.stratum == 8
    assert any("offset" in r.getMessage() and r.name == LOGGER for r in caplog.records)


async def test_sync_dead_server_returns_none_within_timeout_and_warns(
    dead_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    started = time.monotonic()

    sample = await sync([dead_server], timeout_s=0.3)

    assert sample is None
    assert time.monotonic() - started < 1.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert warnings
    assert "no server answered" in warnings[-1].getMessage()
    assert dead_server in warnings[-1].getMessage()


async def test_sync_does_not_block_the_event_loop(dead_server: str) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        await sync([dead_server], timeout_s=0.3)
    finally:
        task.cancel()
    assert ticks >= 10


async def test_sync_falls_back_to_the_second_server(dead_server: str, chrony: ChronyServer) -> None:
    sample = await sync([dead_server, chrony.address], timeout_s=0.3)

    assert sample is not None
    assert sample.server == chrony.address


async def test_sync_skips_a_bad_server_then_uses_the_next(
    fake_server: FakeNtpServer, chrony: ChronyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake_server.stratum = 0
    fake_server.ref_id = int.from_bytes(b"DENY", "big")

    sample = await sync(["host:notaport", fake_server.address, chrony.address], timeout_s=0.5)

    assert sample is not None
    assert sample.server == chrony.address
    assert "check the configuration" in caplog.text
    assert "DENY" in caplog.text


async def test_sync_stops_at_the_first_good_answer(
    chrony: ChronyServer, fake_server: FakeNtpServer
) -> None:
    sample = await sync([chrony.address, fake_server.address], timeout_s=0.5)

    assert sample is not None
    assert sample.server == chrony.address
    assert fake_server.requests == 0


async def test_sync_empty_server_list_returns_none_at_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    asked: list[str] = []

    def no_query(server: str, **_: object) -> ClockSample:
        asked.append(server)
        raise DeviceTimeout(f"NTP server {server}: no answer")

    monkeypatch.setattr(ntp, "query", no_query)

    assert await sync([]) is None

    assert asked == []  # NTP disabled: no server is asked, not even a default one
    assert "NTP disabled" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_sync_steps_via_callback_when_offset_exceeds_threshold(
    chrony: ChronyServer,
) -> None:
    spy = SetterSpy()

    # chrony shares the host clock, so any offset must step: threshold -1.
    sample = await sync(
        [chrony.address],
        timeout_s=1.0,
        step_threshold_s=-1,
        step_system_clock=True,
        clock_settime=spy,
    )

    assert sample is not None
    assert len(spy.calls) == 1
    requested, called_at = spy.calls[0]
    server_time_at_call = called_at + _server_offset(chrony.address)
    assert abs(requested - server_time_at_call) < 1.0


async def test_sync_steps_by_a_real_offset(fake_server: FakeNtpServer) -> None:
    spy = SetterSpy()

    sample = await sync(
        [fake_server.address], timeout_s=1.0, step_system_clock=True, clock_settime=spy
    )

    assert sample is not None
    assert len(spy.calls) == 1
    requested, called_at = spy.calls[0]
    assert requested == pytest.approx(called_at + 100.0, abs=1.0)


async def test_sync_does_not_step_when_disabled(
    chrony: ChronyServer, fake_server: FakeNtpServer, never_step_host_clock: SetterSpy
) -> None:
    spy = SetterSpy()

    for server in (chrony.address, fake_server.address):
        sample = await sync([server], timeout_s=1.0, step_threshold_s=-1, clock_settime=spy)
        assert sample is not None

    assert spy.calls == []
    assert never_step_host_clock.calls == []


async def test_sync_does_not_step_below_threshold(chrony: ChronyServer) -> None:
    spy = SetterSpy()

    sample = await sync(
        [chrony.address],
        timeout_s=1.0,
        step_threshold_s=0.5,
        step_system_clock=True,
        clock_settime=spy,
    )

    assert sample is not None
    assert spy.calls == []


async def test_sync_default_setter_uses_clock_realtime(
    fake_server: FakeNtpServer, never_step_host_clock: SetterSpy
) -> None:
    # time.clock_settime is replaced by the autouse fixture: nothing is really stepped.
    sample = await sync([fake_server.address], timeout_s=1.0, step_system_clock=True)

    assert sample is not None
    assert len(never_step_host_clock.calls) == 1
    requested, called_at = never_step_host_clock.calls[0]
    assert requested == pytest.approx(called_at + 100.0, abs=1.0)


async def test_sync_refused_step_is_logged_not_raised(
    fake_server: FakeNtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(epoch_s: float) -> None:
        raise PermissionError(1, "Operation not permitted")

    sample = await sync(
        [fake_server.address], timeout_s=1.0, step_system_clock=True, clock_settime=refuse
    )

    assert sample is not None
    assert "cannot step the system clock" in caplog.text


# --------------------------------------------------------------------------- ClockGuard


def _assert_close(actual: datetime, expected: datetime, tolerance_s: float) -> None:
    assert actual.tzinfo is not None
    assert abs((actual - expected).total_seconds()) < tolerance_s


async def test_guard_before_sync_is_the_system_clock() -> None:
    guard = ClockGuard()

    assert not guard.synchronized
    assert guard.sample is None
    assert guard.offset_s == 0.0
    assert guard.last_sync_age_s is None
    _assert_close(guard.now(), datetime.now(UTC), 0.05)


async def test_guard_now_is_close_to_the_server_time(chrony: ChronyServer) -> None:
    guard = ClockGuard(timeout_s=1.0)

    assert await guard.wait_synchronized([chrony.address], attempts=1)

    assert guard.synchronized
    assert guard.sample is not None
    assert guard.sample.stratum == 8
    assert guard.offset_s == guard.sample.offset_s
    assert guard.last_sync_age_s is not None
    server_now = datetime.now(UTC) + timedelta(seconds=_server_offset(chrony.address))
    now = guard.now()
    assert now.tzinfo is UTC
    _assert_close(now, server_now, 0.1)


async def test_guard_corrects_timestamps_when_the_clock_is_not_stepped(
    fake_server: FakeNtpServer,
) -> None:
    guard = ClockGuard(timeout_s=1.0)

    assert await guard.sync([fake_server.address]) is not None

    assert guard.offset_s == pytest.approx(100.0, abs=0.05)
    _assert_close(guard.now(), datetime.now(UTC) + timedelta(seconds=100), 0.1)


async def test_guard_does_not_correct_after_stepping(fake_server: FakeNtpServer) -> None:
    spy = SetterSpy()
    guard = ClockGuard(timeout_s=1.0, step_system_clock=True, clock_settime=spy)

    sample = await guard.sync([fake_server.address])

    assert sample is not None
    assert len(spy.calls) == 1
    assert guard.synchronized
    assert guard.offset_s == 0.0  # the (fake-)stepped system clock is right by itself
    assert guard.sample == sample


async def test_guard_tells_who_listens_when_it_steps_the_clock(fake_server: FakeNtpServer) -> None:
    """The agent records each step as a SettingSystemTime security event."""
    spy = SetterSpy()
    steps: list[float] = []
    guard = ClockGuard(timeout_s=1.0, step_system_clock=True, clock_settime=spy)
    guard.on_step = steps.append

    sample = await guard.sync([fake_server.address])

    assert sample is not None and len(spy.calls) == 1
    assert steps == [sample.offset_s]


async def test_guard_corrects_when_the_step_is_refused(fake_server: FakeNtpServer) -> None:
    def refuse(epoch_s: float) -> None:
        raise PermissionError(1, "Operation not permitted")

    guard = ClockGuard(timeout_s=1.0, step_system_clock=True, clock_settime=refuse)

    assert await guard.sync([fake_server.address]) is not None
    assert guard.offset_s == pytest.approx(100.0, abs=0.05)


async def test_guard_wait_synchronized_gives_up_after_bounded_attempts(
    silent_server: FakeNtpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    guard = ClockGuard(timeout_s=0.2)

    ok = await guard.wait_synchronized([silent_server.address], attempts=3, interval_s=0.05)

    assert ok is False
    assert not guard.synchronized
    assert silent_server.requests == 3  # one query per attempt, then it gives up
    assert "not synchronised after 3 attempt(s)" in caplog.text


async def test_guard_wait_synchronized_retries_until_a_server_answers(
    fake_server: FakeNtpServer,
) -> None:
    fake_server.stratum = 16  # unsynchronised for now
    guard = ClockGuard(timeout_s=0.5)

    async def server_synchronises_later() -> None:
        await asyncio.sleep(0.15)
        fake_server.stratum = 3

    async with asyncio.TaskGroup() as tg:
        tg.create_task(server_synchronises_later())
        ok = await guard.wait_synchronized([fake_server.address], attempts=20, interval_s=0.05)

    assert ok
    assert guard.sample is not None
    assert guard.sample.stratum == 3
    assert fake_server.requests > 1


async def test_guard_wait_synchronized_empty_list_is_disabled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    guard = ClockGuard()

    assert await guard.wait_synchronized([], attempts=3, interval_s=10) is False
    assert "NTP disabled" in caplog.text


async def test_guard_wait_synchronized_rejects_bad_arguments() -> None:
    guard = ClockGuard()
    with pytest.raises(ValueError, match="attempts"):
        await guard.wait_synchronized(["x"], attempts=0)
    with pytest.raises(ValueError, match="interval_s"):
        await guard.wait_synchronized(["x"], attempts=1, interval_s=-1)


async def test_guard_run_periodic_resyncs(fake_server: FakeNtpServer) -> None:
    guard = ClockGuard(timeout_s=0.5)

    async with asyncio.timeout(5):
        task = asyncio.create_task(guard.run_periodic([fake_server.address], interval_s=0.05))
        while fake_server.requests < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert guard.synchronized
    assert guard.offset_s == pytest.approx(100.0, abs=0.05)


async def test_guard_run_periodic_survives_failures(
    fake_server: FakeNtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_sync = ntp._sync

    async def flaky_sync(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return await real_sync(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ntp, "_sync", flaky_sync)
    guard = ClockGuard(timeout_s=0.5)

    async with asyncio.timeout(5):
        task = asyncio.create_task(guard.run_periodic([fake_server.address], interval_s=0.02))
        while not guard.synchronized:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert calls >= 2


async def test_guard_run_periodic_empty_list_returns_at_once() -> None:
    guard = ClockGuard()

    async with asyncio.timeout(1):
        await guard.run_periodic([], interval_s=3600)


async def test_guard_run_periodic_retries_sooner_until_the_first_answer(
    fake_server: FakeNtpServer,
) -> None:
    """The start-up attempts failed (the network came up late): the guard does not wait a
    whole sync interval (an hour by default) with a clock TLS cannot trust; it retries
    after unsynced_retry_s, doubling, and then keeps the normal interval."""
    fake_server.stratum = 16  # not answering usefully yet
    guard = ClockGuard(timeout_s=0.5)
    guard.unsynced_retry_s = 0.05
    guard.unsynced_retry_max_s = 0.2

    async with asyncio.timeout(10):
        task = asyncio.create_task(guard.run_periodic([fake_server.address], interval_s=3600))
        while fake_server.requests < 3:
            await asyncio.sleep(0.01)
        assert not guard.synchronized
        fake_server.stratum = 3
        while not guard.synchronized:
            await asyncio.sleep(0.01)
        answered = fake_server.requests
        await asyncio.sleep(0.5)  # the next sync is an hour away now
        assert fake_server.requests == answered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
