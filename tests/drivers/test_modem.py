"""The modem AT driver against the simulated modem over a real pty: what BootNotification
and status get (ICCID, IMSI, signal, registration), losing registration, and garbage on
the line giving no value rather than a wrong one. (Only the radio is simulated.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from drivers.sim.modem import SimModem
from drivers.uplink.modem import (
    AtModem,
    ModemError,
    ModemInfo,
    parse_ccid,
    parse_cimi,
    parse_cops,
    parse_creg,
    parse_csq,
)


@pytest.fixture
async def modem() -> AsyncIterator[SimModem]:
    sim = SimModem()
    await sim.start()
    yield sim
    await sim.stop()


async def query(sim: SimModem, timeout_s: float = 2.0) -> tuple[AtModem, ModemInfo]:
    at = AtModem(sim.path, timeout_s=timeout_s)
    return at, await asyncio.to_thread(at.query)


async def test_reads_identity_signal_and_registration(modem: SimModem) -> None:
    at, info = await query(modem)
    try:
        assert info.as_dict() == {
            "rssi_dbm": -73,
            "csq": 20,
            "registration": "home",
            "operator": "SimTel",
            "iccid": "89441000301234567890",
            "imsi": "234150123456789",
            "registered": True,
        }
        assert modem.echo is False  # the driver switched echo off
    finally:
        at.close()


async def test_losing_registration_shows_in_the_next_query(modem: SimModem) -> None:
    at = AtModem(modem.path, timeout_s=2.0)
    try:
        assert (await asyncio.to_thread(at.query, False)).registered
        modem.lose_registration()
        info = await asyncio.to_thread(at.query, False)
        assert not info.registered
        assert info.registration == "searching"
        assert info.rssi_dbm is None
        assert info.operator is None
        modem.regain_registration(rssi=10)
        info = await asyncio.to_thread(at.query, False)
        assert (info.registration, info.rssi_dbm) == ("home", -93)
    finally:
        at.close()


async def test_garbage_before_and_between_answers_is_ignored(modem: SimModem) -> None:
    modem.inject_bytes(b"\xff\x00\x1b[2J~~~\r\nRING\r\n+CREG: 5\r\n\xfe")
    modem.garble = b"\x00\x07"
    at, info = await query(modem)
    at.close()
    # control bytes before an answer: the signal/registration/operator regexes still find it
    assert info.rssi_dbm == -73
    assert info.registration == "home"
    assert info.operator == "SimTel"
    assert info.iccid in (None, "89441000301234567890")  # noise on its line: unknown, not wrong


async def test_a_silent_modem_is_a_clear_error_not_a_hang(modem: SimModem) -> None:
    modem.silent = True
    at = AtModem(modem.path, timeout_s=0.3)
    try:
        with pytest.raises(ModemError, match=r"AT\+CSQ: no answer within 0\.3 s"):
            await asyncio.to_thread(at.command, "AT+CSQ")
        # query() degrades to "unknown", it does not raise for a quiet modem
        info = await asyncio.to_thread(at.query)
        assert info.rssi_dbm is None and info.iccid is None and not info.registered
    finally:
        at.close()


async def test_an_unknown_command_is_error(modem: SimModem) -> None:
    at = AtModem(modem.path, timeout_s=2.0)
    try:
        with pytest.raises(ModemError, match="AT\\+FOO: ERROR"):
            await asyncio.to_thread(at.command, "AT+FOO")
    finally:
        at.close()


def test_a_missing_port_is_a_clear_error() -> None:
    with pytest.raises(ModemError, match="cannot open"):
        AtModem("/dev/evcp-no-such-modem").command("AT")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["+CSQ: 31,0"], (-51, 31)),
        (["+CSQ: 0,99"], (-113, 0)),
        (["+CSQ: 99,99"], (None, 99)),
        (["+CSQ: 45,99"], (None, None)),  # out of range: not a value
        (["\x00\x00+CSQ: 12,3"], (-89, 12)),
        (["+CSQ:"], (None, None)),
        ([], (None, None)),
    ],
)
def test_parse_csq(lines: list[str], expected: tuple[int | None, int | None]) -> None:
    assert parse_csq(lines) == expected


def test_parsers_are_robust_to_garbage() -> None:
    assert parse_creg(["+CREG: 2", "+CREG: 0,5"]) == "roaming"  # the URC is skipped
    assert parse_creg(["+CREG: 1"]) is None
    assert parse_creg(["+CGREG: 0,3"]) == "denied"
    assert parse_cops(['+COPS: 0,0,"Op\x01"']) is None
    assert parse_cops(["junk", '+COPS: 0,2,"23415",7']) == "23415"
    assert parse_ccid(["+ICCID: 8944100030123456789F"]) == "8944100030123456789"
    assert parse_ccid(["8944100030123456789"]) == "8944100030123456789"
    assert parse_ccid(["12345678901234567890"]) is None  # not an ICCID (no 89)
    assert parse_ccid(["x8944100030123456789"]) is None
    assert parse_cimi(["ERROR?", "234150123456789"]) == "234150123456789"
    assert parse_cimi(["2341501234567890"]) is None  # 16 digits: not an IMSI
