"""A GSM modem simulator on a pseudo-terminal: it plays the modem's AT port.

The driver (``drivers/uplink/modem.py``) opens the pty's slave path as the modem's serial
port; this simulator answers on the master side like a 3GPP TS 27.007 modem: echo on until
``ATE0``, ``\\r\\n<answer>\\r\\n`` then ``OK``, ``ERROR`` for what it does not know. Only
the radio is fake: the signal and the registration are whatever the test sets.

Test hooks: :meth:`SimModem.lose_registration` / :meth:`SimModem.regain_registration`,
:attr:`SimModem.rssi` (the CSQ value), :meth:`SimModem.inject_bytes` (garbage on the line),
:attr:`SimModem.garble` (prefix every answer line with noise), :attr:`SimModem.silent`
(a modem that stops answering), :attr:`SimModem.commands` (every command received).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from drivers.sim.rapi_device import open_pty

__all__ = ["SimModem"]

log = logging.getLogger("evcp.sim.modem")


class SimModem:
    def __init__(
        self,
        *,
        iccid: str = "89441000301234567890",
        imsi: str = "234150123456789",
        operator: str = "SimTel",
        rssi: int = 20,
    ) -> None:
        self.iccid = iccid
        self.imsi = imsi
        self.operator = operator
        #: AT+CSQ's rssi (0-31, 99 unknown).
        self.rssi = rssi
        self.registered = True
        self.roaming = False
        self.echo = True
        self.silent = False
        #: Bytes written before every answer line (noise on the line).
        self.garble = b""
        self.commands: list[str] = []
        self._master: int | None = None
        self._slave: int | None = None
        self._path = ""
        self._buffer = b""
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def path(self) -> str:
        return self._path

    async def start(self) -> str:
        if self._master is not None:
            return self._path
        self._loop = asyncio.get_running_loop()
        self._master, self._slave, self._path = open_pty()
        self._loop.add_reader(self._master, self._on_readable)
        log.info("sim modem on %s", self._path)
        return self._path

    async def stop(self) -> None:
        if self._master is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._master)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None

    def lose_registration(self) -> None:
        """The network is gone: searching, no operator, no signal. Sends ``+CREG: 2``."""
        self.registered = False
        self._write(b"\r\n+CREG: 2\r\n")

    def regain_registration(self, rssi: int = 20) -> None:
        self.registered = True
        self.rssi = rssi
        self._write(b"\r\n+CREG: 1\r\n")

    def inject_bytes(self, data: bytes) -> None:
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self._master is None:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._master, data)

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return
        if self.echo and not self.silent:
            self._write(data)
        self._buffer += data
        while b"\r" in self._buffer:
            raw, _, self._buffer = self._buffer.partition(b"\r")
            line = raw.strip(b"\n ").decode("ascii", "replace")
            if line:
                self.commands.append(line)
                if not self.silent:
                    self._answer(line)
        if len(self._buffer) > 512:
            self._buffer = b""

    def _send(self, *lines: str, final: str = "OK") -> None:
        out = b""
        for line in lines:
            out += b"\r\n" + self.garble + line.encode() + b"\r\n"
        out += b"\r\n" + final.encode() + b"\r\n"
        self._write(out)

    def _answer(self, line: str) -> None:
        cmd = line.upper()
        if cmd in ("AT", "ATI", "AT+CMEE=1"):
            self._send()
        elif cmd == "ATE0":
            self.echo = False
            self._send()
        elif cmd == "ATE1":
            self.echo = True
            self._send()
        elif cmd == "AT+CSQ":
            self._send(f"+CSQ: {self.rssi if self.registered else 99},99")
        elif cmd == "AT+CREG?":
            stat = (5 if self.roaming else 1) if self.registered else 2
            self._send(f"+CREG: 0,{stat}")
        elif cmd == "AT+COPS?":
            self._send(f'+COPS: 0,0,"{self.operator}",7' if self.registered else "+COPS: 0")
        elif cmd in ("AT+CCID", "AT+ICCID"):
            self._send(f"+CCID: {self.iccid}")
        elif cmd == "AT+CIMI":
            self._send(self.imsi)
        else:
            self._send(final="ERROR")
