"""An OpenEVSE-compatible controller simulator that plays the *device* on a pseudo-terminal.

The driver (``drivers/evse/rapi.py``) opens the pty's slave path as if it were the serial
port of a real OpenEVSE board; this simulator answers on the master side. It speaks RAPI as
the firmware does (``rapi_proc.cpp``):

* frames: ``$`` always restarts a frame; a frame longer than the 32-byte input buffer is
  silently discarded; XOR (``^``), legacy sum (``*``) and missing checksums are accepted;
  a bad checksum is answered ``$NK`` without a sequence id; an unknown command ``$NK``;
  the sequence id of a command is echoed in its reply;
* ``$AT`` is sent after the reply of every command that changed the state, and whenever the
  :class:`~drivers.sim.physics.SimConnector` changes (the simulator subscribes to it). When a
  car is plugged in and at once asks for power, state B is reported before state C, as the
  pilot goes through 9 V;
* ``$SY`` heartbeat supervision: with ``$SY <interval> <amps>`` configured and no pulse for
  ``interval`` seconds, the current falls back to ``amps`` and pulses get ``$NK`` until the
  miss is acknowledged with ``$SY 165``;
* ``$SC`` clamps to ``[min, max]`` and then answers ``$NK <clamped>``; raising the current
  while over temperature is refused.

State derivation: a fault (``connector.fault`` is a :class:`~drivers.base.FaultCode` value,
mapped to the OpenEVSE code; an unmapped name gives 0x0F) > disabled FF > sleeping FE >
no car 01 > car plugged but not asking for power (or pilot off) 02 > 03. vflags carry
EV_CONNECTED (0x0100) while plugged and CHARGING_ON (0x0040) while the contactor is closed.

The simulator writes ``connector.pilot_on`` and ``connector.offered_current_a`` and calls
``connector.changed()``; the physics closes the contactor.

Test hooks: :meth:`RapiDevice.inject_bytes`, :attr:`RapiDevice.reply_hook` (rewrite or drop
a reply, or write something before it), :attr:`RapiDevice.silent` (a controller that stops
answering), :attr:`RapiDevice.notify` (``$AT`` lost on the line) and
:attr:`RapiDevice.commands` (every command received).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import tty
from collections.abc import Callable

from drivers.base import FaultCode, ProtocolError
from drivers.evse.rapi import (
    EV_CONNECTED,
    FAULT_CODES,
    FLAG_CHARGING_ON,
    HEARTBEAT_ACK,
    STATE_A,
    STATE_B,
    STATE_C,
    STATE_DISABLED,
    STATE_SLEEPING,
    RapiFrame,
    RapiFramer,
    encode_command,
    parse_frame,
)
from drivers.sim.physics import SimConnector

__all__ = ["ESRAPI_BUFLEN", "RAPI_VERSION", "RapiDevice", "ReplyHook", "open_pty"]

log = logging.getLogger("evcp.sim.rapi")

#: The firmware's input buffer, ``$`` and the terminating NUL included.
ESRAPI_BUFLEN = 32
RAPI_VERSION = "5.2.1"
#: Code reported for a fault name that OpenEVSE has no code for.
OTHER_FAULT_STATE = 0x0F

FLAG_NOGND_TRIPPED = 0x0020
FLAG_GFI_TRIPPED = 0x0080
#: GE flags: L2 service level.
ECF_L2 = 0x0001

_FAULT_STATES: dict[str, int] = {code.value: state for state, code in FAULT_CODES.items()}

#: ``reply_hook(command, reply) -> bytes to write instead`` (None: write nothing).
ReplyHook = Callable[[RapiFrame, bytes], bytes | None]


def open_pty() -> tuple[int, int, str]:
    """Open a pseudo-terminal in raw mode: ``(master_fd, slave_fd, slave_path)``.

    The master is non-blocking. Keep the slave fd open for the life of the device: then
    reads on the master never fail with EIO while the driver closes and reopens the port.
    """
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    return master, slave, os.ttyname(slave)


class RapiDevice:
    """A simulated OpenEVSE controller bound to one :class:`SimConnector`."""

    def __init__(
        self,
        connector: SimConnector,
        *,
        firmware: str = "8.2.1-sim",
        min_current_a: int = 6,
        max_current_a: int = 32,
    ) -> None:
        if " " in firmware or not firmware:
            raise ValueError("firmware must be one non-empty token")
        if not 0 < min_current_a <= max_current_a:
            raise ValueError("need 0 < min_current_a <= max_current_a")
        self.connector = connector
        self.firmware = firmware
        self.min_current_a = min_current_a
        self.hw_max_current_a = max_current_a
        self.max_current_a = max_current_a
        #: Every command received (parsed), in order, even while silent.
        self.commands: list[RapiFrame] = []
        #: Frames answered ``$NK`` because they did not parse (bad checksum...).
        self.rejected_frames = 0
        #: Called with each command and its encoded reply; returns what to write instead.
        self.reply_hook: ReplyHook | None = None
        #: False: state changes are not notified with ``$AT`` (a notification lost on the line).
        self.notify = True

        self._mode = "enabled" if connector.pilot_on else "sleeping"
        self._current = self._clamp(round(connector.offered_current_a))
        self._saved_current = self._current
        self._framer = RapiFramer(max_len=ESRAPI_BUFLEN - 1, name="sim rapi")
        self._master: int | None = None
        self._slave: int | None = None
        self._path = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._subscribed = False
        self._silent = False
        self._in_command = False
        self._last_at: tuple[int, int, int, int] | None = None
        self._started_at = time.monotonic()

        self._hb_interval = 0
        self._hb_current = 0
        self._hb_triggered = False
        self._hb_timer: asyncio.TimerHandle | None = None

        self._plugged = connector.ev.plugged
        self._fault: str | None = connector.fault
        self._session_start_wh = connector.energy_wh
        self._charging_since: float | None = None
        self._elapsed_s = 0
        self._gfi_trips = 0
        self._nognd_trips = 0
        self._stuck_trips = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def path(self) -> str:
        """The slave path the driver opens (empty before start)."""
        return self._path

    @property
    def current_a(self) -> int:
        """The pilot current capacity the controller offers now."""
        return self._current

    @property
    def mode(self) -> str:
        """``"enabled"``, ``"sleeping"`` or ``"disabled"``."""
        return self._mode

    @property
    def heartbeat_triggered(self) -> bool:
        """A supervision miss happened and was not acknowledged yet."""
        return self._hb_triggered

    async def start(self) -> str:
        """Open the pty, start answering, return the slave path for the driver."""
        if self._running:
            return self._path
        self._loop = asyncio.get_running_loop()
        self._master, self._slave, self._path = open_pty()
        self._loop.add_reader(self._master, self._on_readable)
        self._running = True
        if not self._subscribed:
            self.connector.subscribe(self._on_connector_changed)
            self._subscribed = True
        self._apply()
        log.info("sim rapi: OpenEVSE simulator on %s", self._path)
        return self._path

    async def stop(self) -> None:
        """Stop answering and close the pty. Idempotent."""
        if not self._running:
            return
        self._running = False
        self._cancel_hb_timer()
        if self._loop is not None and self._master is not None:
            self._loop.remove_reader(self._master)
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        log.info("sim rapi: simulator on %s stopped", self._path)

    @property
    def silent(self) -> bool:
        """While True the controller reads and records commands but never answers."""
        return self._silent

    @silent.setter
    def silent(self, value: bool) -> None:
        self._silent = value
        if not value:
            self._maybe_send_state()

    def reset(self) -> None:
        """Simulate a controller reboot: volatile settings are lost, ``$AB`` is sent.

        The controller comes back enabled with the current saved in "EEPROM" and without
        heartbeat supervision; the car stays plugged.
        """
        log.warning("sim rapi: controller reboot")
        self._cancel_hb_timer()
        self._hb_interval = self._hb_current = 0
        self._hb_triggered = False
        self._mode = "enabled"
        self._current = self._saved_current
        self._framer.reset()
        self._last_at = None
        self._write(encode_command("AB", "00", self.firmware))
        self._apply()

    def inject_bytes(self, b: bytes) -> None:
        """Write raw bytes to the driver (garbage, a crafted frame...)."""
        self._write(b)

    def state_frame(self) -> bytes:
        """The ``$AT`` frame for the current state (without sending it)."""
        return self._encode_at(*self._state())

    # ------------------------------------------------------------------ I/O

    def _write(self, data: bytes) -> None:
        if self._master is None or not data:
            return
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            log.warning("sim rapi: write failed: %s", exc)
            return
        if written < len(data):
            log.warning("sim rapi: pty full, dropped %d byte(s)", len(data) - written)

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("sim rapi: read failed (%s); no longer reading", exc)
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            return
        for line in self._framer.feed_raw(data):
            self._handle_line(line)

    def _handle_line(self, line: bytes) -> None:
        try:
            frame = parse_frame(line)
        except ProtocolError as exc:
            self.rejected_frames += 1
            log.info("sim rapi: rejecting frame: %s", exc)
            if not self._silent:
                self._write(encode_command("NK"))
            return
        self.commands.append(frame)
        if self._silent:
            return
        self._in_command = True
        try:
            ok, values, after = self._process(frame)
        finally:
            self._in_command = False
        encoded = encode_command("OK" if ok else "NK", *values, seq=frame.seq)
        reply = encoded if self.reply_hook is None else self.reply_hook(frame, encoded)
        if reply:
            self._write(reply)
        self._maybe_send_state()
        if after is not None:
            after()

    # ------------------------------------------------------------------ state

    def _clamp(self, amps: int) -> int:
        return max(self.min_current_a, min(self.max_current_a, amps))

    def _apply(self) -> None:
        """Write the pilot to the connector; its listeners (us included) see the change."""
        self.connector.pilot_on = self._mode == "enabled"
        self.connector.offered_current_a = float(self._current)
        self.connector.changed()

    def _state(self) -> tuple[int, int, int, int]:
        """``(evsestate, pilotstate, current capacity, vflags)``."""
        c = self.connector
        plugged = c.ev.plugged
        vflags = 0
        if plugged:
            vflags |= EV_CONNECTED
        if c.contactor_closed:
            vflags |= FLAG_CHARGING_ON
        if not plugged:
            pilot = STATE_A
        elif c.pilot_on and c.ev.wants_power:
            pilot = STATE_C
        else:
            pilot = STATE_B
        if c.fault is not None:
            state = _FAULT_STATES.get(c.fault, OTHER_FAULT_STATE)
            if c.fault == FaultCode.GROUND_FAULT:
                vflags |= FLAG_GFI_TRIPPED
            elif c.fault == FaultCode.NO_GROUND:
                vflags |= FLAG_NOGND_TRIPPED
        elif self._mode == "disabled":
            state = STATE_DISABLED
        elif self._mode == "sleeping":
            state = STATE_SLEEPING
        else:
            state = pilot
        return state, pilot, self._current, vflags

    @staticmethod
    def _encode_at(state: int, pilot: int, capacity: int, vflags: int) -> bytes:
        return encode_command("AT", f"{state:02x}", f"{pilot:02x}", capacity, f"{vflags:04x}")

    def _maybe_send_state(self) -> None:
        """Send ``$AT`` if the state changed since the last one (never inside a command)."""
        if not self._running or self._silent or self._in_command or not self.notify:
            return
        current = self._state()
        if current == self._last_at:
            return
        last = self._last_at
        if last is not None and last[0] == STATE_A and current[0] == STATE_C:
            # The pilot passes through 9 V (B) before the car closes S2 (C).
            self._write(self._encode_at(STATE_B, STATE_B, current[2], EV_CONNECTED))
        self._last_at = current
        self._write(self._encode_at(*current))

    def _on_connector_changed(self) -> None:
        if not self._running:
            return
        c = self.connector
        if c.ev.plugged and not self._plugged:
            self._session_start_wh = c.energy_wh
            self._elapsed_s = 0
        self._plugged = c.ev.plugged
        if c.fault != self._fault:
            if c.fault == FaultCode.GROUND_FAULT:
                self._gfi_trips += 1
            elif c.fault == FaultCode.NO_GROUND:
                self._nognd_trips += 1
            elif c.fault == FaultCode.STUCK_RELAY:
                self._stuck_trips += 1
            self._fault = c.fault
        if c.contactor_closed and self._charging_since is None:
            self._charging_since = time.monotonic()
        elif not c.contactor_closed and self._charging_since is not None:
            self._elapsed_s = self._elapsed()
            self._charging_since = None
        self._maybe_send_state()

    def _elapsed(self) -> int:
        if self._charging_since is None:
            return self._elapsed_s
        return int(time.monotonic() - self._charging_since)

    # ------------------------------------------------------------------ supervision

    def _cancel_hb_timer(self) -> None:
        if self._hb_timer is not None:
            self._hb_timer.cancel()
            self._hb_timer = None

    def _arm_hb_timer(self) -> None:
        self._cancel_hb_timer()
        if self._hb_interval > 0 and self._loop is not None:
            self._hb_timer = self._loop.call_later(self._hb_interval, self._hb_expired)

    def _hb_expired(self) -> None:
        self._hb_timer = None
        if not self._running:
            return
        self._hb_triggered = True
        if self._current > self._hb_current:
            log.warning(
                "sim rapi: no heartbeat for %d s, falling back to %d A",
                self._hb_interval,
                self._hb_current,
            )
            if self._hb_current < self.min_current_a:
                self._mode = "sleeping"
            else:
                self._current = self._hb_current
            self._apply()

    # ------------------------------------------------------------------ commands

    def _process(
        self, frame: RapiFrame
    ) -> tuple[bool, tuple[str | int, ...], Callable[[], None] | None]:
        """Handle one command: ``(ok, reply values, action to run after the reply)``."""
        kind, args = frame.kind, frame.tokens
        c = self.connector
        if kind in ("FE", "FS", "FD"):
            self._mode = {"FE": "enabled", "FS": "sleeping", "FD": "disabled"}[kind]
            self._apply()
            return True, (), None
        if kind == "FR":
            return True, (), self.reset
        if kind == "SC":
            return self._set_current(args)
        if kind == "SY":
            return self._supervision(args)
        if kind == "GS":
            state, pilot, _, vflags = self._state()
            return True, (f"{state:02x}", self._elapsed(), f"{pilot:02x}", f"{vflags:04x}"), None
        if kind == "GG":
            milliamps = round(c.drawn_current_a * 1000)
            millivolts = round(c.voltage_v * 1000)
            return True, (milliamps, millivolts), None
        if kind == "GE":
            return True, (self._current, f"{ECF_L2:04x}"), None
        if kind == "GC":
            return (
                True,
                (self.min_current_a, self.max_current_a, self._current, self.max_current_a),
                None,
            )
        if kind == "GV":
            return True, (self.firmware, RAPI_VERSION), None
        if kind == "GU":
            energy = c.energy_now_wh()
            session_ws = round(max(0.0, energy - self._session_start_wh) * 3600)
            return True, (session_ws, int(energy)), None
        if kind == "G0":
            if self._mode == "disabled":
                return True, (2,), None
            return True, (1 if c.ev.plugged else 0,), None
        if kind == "GF":
            trips = (self._gfi_trips, self._nognd_trips, self._stuck_trips)
            return True, tuple(f"{n:x}" for n in trips), None
        if kind == "GP":
            hot = c.fault == FaultCode.OVER_TEMPERATURE
            return True, (700 if hot else 250, -2560, -2560), None
        if kind == "GY":
            return True, self._supervision_values(), None
        return False, (), None

    def _set_current(
        self, args: tuple[str, ...]
    ) -> tuple[bool, tuple[str | int, ...], Callable[[], None] | None]:
        if len(args) not in (1, 2) or not args[0].isdigit():
            return False, (), None
        amps = int(args[0])
        if len(args) == 2 and args[1] == "M":
            self.max_current_a = max(self.min_current_a, min(self.hw_max_current_a, amps))
            if self._current > self.max_current_a:
                self._current = self.max_current_a
                self._apply()
            return self.max_current_a == amps, (self.max_current_a,), None
        if self.connector.fault == FaultCode.OVER_TEMPERATURE and amps > self._current:
            return False, (self._current,), None
        applied = self._clamp(amps)
        if applied != self._current:
            self._current = applied
            self._apply()
        if len(args) == 1:  # no V/M: persistent
            self._saved_current = applied
        return applied == amps, (applied,), None

    def _supervision_values(self) -> tuple[int, int, int]:
        return self._hb_interval, self._hb_current, int(self._hb_triggered)

    def _supervision(
        self, args: tuple[str, ...]
    ) -> tuple[bool, tuple[str | int, ...], Callable[[], None] | None]:
        if not all(a.isdigit() for a in args):
            return False, self._supervision_values(), None
        ok = True
        if not args:  # pulse
            ok = not self._hb_triggered
            self._arm_hb_timer()
        elif len(args) == 1:  # acknowledge a miss
            if int(args[0]) == HEARTBEAT_ACK and self._hb_triggered:
                self._hb_triggered = False
            else:
                ok = False
        elif len(args) == 2:
            self._hb_interval = min(int(args[0]), 0xFFFF)
            self._hb_current = min(int(args[1]), 0xFF)
            if self._hb_interval == 0:
                self._cancel_hb_timer()
                self._hb_triggered = False
            else:
                self._arm_hb_timer()
        else:
            ok = False
        return ok, self._supervision_values(), None
