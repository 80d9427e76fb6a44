"""A GSM/LTE modem's AT command port (pyserial): signal, registration, operator, ICCID, IMSI.

Commands are 3GPP TS 27.007: ``AT+CSQ`` (signal: rssi 0-31 -> -113..-51 dBm, 99 unknown),
``AT+CREG?`` (registration: 1 home, 5 roaming), ``AT+COPS?`` (operator), ``AT+CCID`` (the
SIM's ICCID; some modems answer ``+CCID:``, ``+ICCID:`` or the bare digits) and ``AT+CIMI``
(the IMSI, bare digits). Parsing looks for the expected answer among the lines and ignores
everything else -- echo, unsolicited result codes (``RING``, ``+CREG: 2``), line noise -- so
a modem that prints garbage gives ``None`` for what it did not answer, never a wrong value.

Synchronous (pyserial); the supervisor runs :meth:`AtModem.query` in a thread.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import serial

from drivers.base import TransientDriverError

__all__ = [
    "AtModem",
    "ModemError",
    "ModemInfo",
    "parse_ccid",
    "parse_cimi",
    "parse_cops",
    "parse_creg",
    "parse_csq",
]


class ModemError(TransientDriverError):
    """The modem did not answer, or answered ERROR."""


REGISTRATION = {
    0: "not registered",
    1: "home",
    2: "searching",
    3: "denied",
    4: "unknown",
    5: "roaming",
}

_CSQ = re.compile(r"\+CSQ:\s*(\d{1,2})\s*,\s*(\d{1,2})\b")
_CREG = re.compile(r"\+C(?:E|G)?REG:\s*(\d)\s*,\s*(\d)\b")
_COPS = re.compile(r'\+COPS:\s*\d\s*,\s*\d\s*,\s*"([^"\x00-\x1f]{1,64})"')
_ICCID = re.compile(r"^(?:\+I?CCID:\s*)?(89\d{16,18}[0-9Ff]?)$")
_IMSI = re.compile(r"^(\d{6,15})$")


def _clean(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def parse_csq(lines: list[str]) -> tuple[int | None, int | None]:
    """``(rssi_dbm, csq)`` from ``+CSQ: <rssi>,<ber>``; None for 99 (unknown) or no answer."""
    for line in _clean(lines):
        if m := _CSQ.search(line):
            csq = int(m.group(1))
            if csq == 99:
                return None, 99
            if 0 <= csq <= 31:
                return -113 + 2 * csq, csq
    return None, None


def parse_creg(lines: list[str]) -> str | None:
    """The registration state's name from ``+CREG: <n>,<stat>`` (not an unsolicited
    ``+CREG: <stat>``, which has one number)."""
    for line in _clean(lines):
        if m := _CREG.search(line):
            return REGISTRATION.get(int(m.group(2)), "unknown")
    return None


def parse_cops(lines: list[str]) -> str | None:
    for line in _clean(lines):
        if m := _COPS.search(line):
            return m.group(1)
    return None


def parse_ccid(lines: list[str]) -> str | None:
    """The ICCID: 19-20 digits starting 89 (ITU-T E.118), a trailing F dropped."""
    for line in _clean(lines):
        if m := _ICCID.match(line):
            return m.group(1).rstrip("Ff")
    return None


def parse_cimi(lines: list[str]) -> str | None:
    for line in _clean(lines):
        if m := _IMSI.match(line):
            return m.group(1)
    return None


@dataclass(frozen=True, slots=True)
class ModemInfo:
    rssi_dbm: int | None = None
    csq: int | None = None
    registration: str | None = None
    operator: str | None = None
    iccid: str | None = None
    imsi: str | None = None

    @property
    def registered(self) -> bool:
        return self.registration in ("home", "roaming")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "registered": self.registered}


_FINAL = re.compile(r"^(OK|ERROR|\+CME ERROR:.*|\+CMS ERROR:.*|NO CARRIER)$")


class AtModem:
    """One AT port. Not thread-safe: one caller at a time."""

    def __init__(self, port: str, baudrate: int = 115200, timeout_s: float = 1.0) -> None:
        self.port = port
        self.baudrate = baudrate
        self.timeout_s = timeout_s
        self._serial: serial.Serial | None = None

    def open(self) -> None:
        if self._serial is not None:
            return
        try:
            self._serial = serial.Serial(self.port, self.baudrate, timeout=0.05)
        except (serial.SerialException, OSError) as exc:
            raise ModemError(f"modem {self.port}: cannot open: {exc}") from None
        try:
            self.command("ATE0")  # no echo from here on
        except ModemError:
            pass  # some modems answer the first command late; the queries retry

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None

    def command(self, cmd: str) -> list[str]:
        """Send ``cmd``; the answer's lines (final result code excluded). ModemError on
        ERROR or no final result code within the timeout."""
        self.open()
        port = self._serial
        assert port is not None
        try:
            port.reset_input_buffer()  # drop noise and unsolicited codes from before
            port.write(cmd.encode("ascii") + b"\r")
            deadline = time.monotonic() + self.timeout_s
            buffer = b""
            lines: list[str] = []
            while time.monotonic() < deadline:
                buffer += port.read(256)
                *complete, buffer = re.split(rb"[\r\n]+", buffer)
                for raw in complete:
                    line = raw.decode("ascii", "replace").strip()
                    if not line or line == cmd:
                        continue  # blank, or the echo
                    if _FINAL.match(line):
                        if line != "OK":
                            raise ModemError(f"modem {self.port}: {cmd}: {line}")
                        return lines
                    lines.append(line)
        except (serial.SerialException, OSError) as exc:
            self.close()
            raise ModemError(f"modem {self.port}: {exc}") from None
        raise ModemError(f"modem {self.port}: {cmd}: no answer within {self.timeout_s:g} s")

    def _ask(self, cmd: str) -> list[str]:
        try:
            return self.command(cmd)
        except ModemError:
            if self._serial is None:
                raise  # the port itself failed
            return []

    def query(self, identity: bool = True) -> ModemInfo:
        """Signal, registration, operator and (``identity``) ICCID and IMSI. A command the
        modem refuses or garbles leaves its field None; a port that fails raises."""
        rssi, csq = parse_csq(self._ask("AT+CSQ"))
        registration = parse_creg(self._ask("AT+CREG?"))
        operator = parse_cops(self._ask("AT+COPS?"))
        iccid = parse_ccid(self._ask("AT+CCID")) if identity else None
        imsi = parse_cimi(self._ask("AT+CIMI")) if identity else None
        return ModemInfo(rssi, csq, registration, operator, iccid, imsi)
