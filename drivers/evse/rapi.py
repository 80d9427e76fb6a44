"""OpenEVSE RAPI driver: an :class:`~drivers.base.EvseController` over a serial line.

The module has two layers:

* Pure, I/O-free protocol helpers (:func:`checksum_xor`, :func:`encode_command`,
  :func:`parse_frame`, :class:`RapiFramer`, :func:`status_from_state`). The device simulator
  (``drivers/sim/rapi_device.py``) reuses them.
* :class:`RapiController`, which talks to the controller with pyserial-asyncio-fast.

Frames
------
``$cmd arg arg :SS^HH\\r``: ``SS`` is a sequence id (two hex digits, 01..FF) that the
controller echoes in its ``$OK``/``$NK`` reply, ``HH`` the XOR of every byte before ``^``.
Asynchronous frames (``$AT`` state change, ``$AB`` boot, ``$AN`` button, ``$WF`` WiFi) may
arrive at any time, before or after a reply; the reader task demultiplexes them.

State mapping
-------------
``status_from_state(evsestate, pilotstate, vflags, offered_a)``; ``vendor_code`` is always
the two-hex-digit ``evsestate`` (upper case), ``contactor_closed`` is vflag ``0x0040``
(CHARGING_ON), and ``mode`` is ENABLED unless stated otherwise below.

=========  ==========================  ====================================  ============
evsestate  OpenEVSE meaning            vehicle                               mode
=========  ==========================  ====================================  ============
00         unknown (re-evaluating)     UNKNOWN                               ENABLED
01         A: not connected            ABSENT                                ENABLED
02         B: connected, ready         CONNECTED                             ENABLED
03         C: charging                 CHARGING if vflag 0x0040 else         ENABLED
                                       REQUESTING
04         D: vent required            FAULT / VENT_REQUIRED                 ENABLED
05         diode check failed          FAULT / DIODE_CHECK                   ENABLED
06         GFCI fault                  FAULT / GROUND_FAULT                  ENABLED
07         no ground                   FAULT / NO_GROUND                     ENABLED
08         stuck relay                 FAULT / STUCK_RELAY                   ENABLED
09         GFI self-test failed        FAULT / GFI_SELF_TEST                 ENABLED
0A         over temperature            FAULT / OVER_TEMPERATURE              ENABLED
0B         over current                FAULT / OVER_CURRENT                  ENABLED
0C         pilot error                 FAULT / PILOT                         ENABLED
0D         temperature sensor fault    FAULT / TEMPERATURE_SENSOR            ENABLED
0E         relay closure fault         FAULT / RELAY_CLOSURE                 ENABLED
FE         sleeping                    CONNECTED if vflag 0x0100             PAUSED
                                       (EV_CONNECTED) or pilotstate is 02/03,
                                       else ABSENT
FF         disabled                    as for FE                             DISABLED
other      not defined by OpenEVSE     FAULT / OTHER                         ENABLED
=========  ==========================  ====================================  ============

Driver behaviour
----------------
* One command in flight at a time; every command carries a fresh sequence id. A reply with
  another sequence id is dropped (logged). No reply within ``timeout_s`` -> the command is
  re-sent (with a new id) up to ``retries`` times, then :class:`~drivers.base.DeviceTimeout`.
  ``$NK`` -> :class:`~drivers.base.ProtocolError`. A ``$NK`` without a sequence id means the
  controller received our frame garbled; the command is re-sent like on a timeout.
* Supervision: ``start`` sends ``$SY <supervision_timeout_s> <fallback_current_a>`` so the
  controller falls back to the fallback current by itself when the agent dies; a ``$SY``
  pulse goes out every ``heartbeat_interval_s``. When a pulse is refused (a miss happened),
  the driver acknowledges it (``$SY 165``) and re-applies the offered current.
* ``$AB`` (the controller rebooted): the driver re-configures supervision, re-applies the
  last offered current and mode the agent asked for, re-reads the state and notifies.
* Safety poll: ``$GS`` every ``poll_interval_s`` in case an ``$AT`` was lost.
* When a command exhausts its retries the listener receives a FAULT status with
  :attr:`~drivers.base.FaultCode.COMMUNICATION`; the next answered command re-reads the state
  and notifies the real status again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, Literal

from drivers.aio import raise_if_cancelling
from drivers.base import (
    ControlMode,
    CurrentNotApplied,
    DeviceTimeout,
    DriverError,
    EvseCapabilities,
    EvseStatus,
    FatalDriverError,
    FaultCode,
    ProtocolError,
    StatusListener,
    TransientDriverError,
    VehicleState,
)

__all__ = [
    "EV_CONNECTED",
    "FAULT_CODES",
    "FLAG_CHARGING_ON",
    "HEARTBEAT_ACK",
    "MAX_FRAME_LEN",
    "STATE_A",
    "STATE_B",
    "STATE_C",
    "STATE_DISABLED",
    "STATE_SLEEPING",
    "STATE_UNKNOWN",
    "ChecksumKind",
    "RapiController",
    "RapiFrame",
    "RapiFramer",
    "checksum_sum",
    "checksum_xor",
    "encode_command",
    "parse_frame",
    "status_from_state",
]

log = logging.getLogger("evcp.rapi")

# --------------------------------------------------------------------------- constants

SOC: Final = 0x24  # '$'
EOC: Final = 0x0D  # '\r'
LF: Final = 0x0A
#: Longest frame (from ``$`` up to, not including, CR) the driver accepts from a controller.
MAX_FRAME_LEN: Final = 64
#: OpenEVSE parses at most 10 space-separated tokens (command, arguments, sequence id).
MAX_TOKENS: Final = 10
#: ``$SY 165`` (0xA5) acknowledges a missed heartbeat.
HEARTBEAT_ACK: Final = 165

STATE_UNKNOWN: Final = 0x00
STATE_A: Final = 0x01
STATE_B: Final = 0x02
STATE_C: Final = 0x03
STATE_SLEEPING: Final = 0xFE
STATE_DISABLED: Final = 0xFF

FLAG_CHARGING_ON: Final = 0x0040
EV_CONNECTED: Final = 0x0100

#: evsestate code -> fault.
FAULT_CODES: Final[dict[int, FaultCode]] = {
    0x04: FaultCode.VENT_REQUIRED,
    0x05: FaultCode.DIODE_CHECK,
    0x06: FaultCode.GROUND_FAULT,
    0x07: FaultCode.NO_GROUND,
    0x08: FaultCode.STUCK_RELAY,
    0x09: FaultCode.GFI_SELF_TEST,
    0x0A: FaultCode.OVER_TEMPERATURE,
    0x0B: FaultCode.OVER_CURRENT,
    0x0C: FaultCode.PILOT,
    0x0D: FaultCode.TEMPERATURE_SENSOR,
    0x0E: FaultCode.RELAY_CLOSURE,
}

ChecksumKind = Literal["xor", "sum", "none"]

_KIND_RE: Final = re.compile(r"[A-Z][A-Z0-9]")
_HEX2_RE: Final = re.compile(r"[0-9A-Fa-f]{2}")
_FORBIDDEN_IN_ARG: Final = frozenset(" $^*\r\n")

# --------------------------------------------------------------------------- pure protocol


def checksum_xor(data: bytes) -> int:
    """XOR of every byte (the ``^HH`` checksum, computed over ``$`` up to before ``^``)."""
    chk = 0
    for byte in data:
        chk ^= byte
    return chk


def checksum_sum(data: bytes) -> int:
    """8-bit sum of every byte (the legacy ``*HH`` checksum)."""
    return sum(data) & 0xFF


def encode_command(
    cmd: str, *args: str | int, seq: int | None = None, checksum: ChecksumKind = "xor"
) -> bytes:
    """Encode one frame, e.g. ``encode_command("SC", 16, "V", seq=5)`` -> ``b"$SC 16 V :05^XX\\r"``.

    Also encodes replies and notifications (``"OK"``, ``"AT"``...), as the simulator does.
    Raises ValueError for a malformed command, argument or sequence id.
    """
    if not _KIND_RE.fullmatch(cmd):
        raise ValueError(f"RAPI command must be a letter and a letter or digit: {cmd!r}")
    parts = ["$" + cmd]
    for arg in args:
        text = str(arg)
        if not text or not text.isascii() or not text.isprintable():
            raise ValueError(f"bad RAPI argument {text!r}")
        if _FORBIDDEN_IN_ARG.intersection(text) or text.startswith(":"):
            raise ValueError(f"RAPI argument may not contain spaces or $^*: {text!r}")
        parts.append(text)
    if seq is not None:
        if not 1 <= seq <= 0xFF:
            raise ValueError(f"RAPI sequence id must be 1..255, not {seq}")
        parts.append(f":{seq:02X}")
    if len(parts) > MAX_TOKENS:
        raise ValueError(f"RAPI frames carry at most {MAX_TOKENS} tokens")
    body = " ".join(parts).encode("ascii")
    if checksum == "xor":
        return body + b"^%02X\r" % checksum_xor(body)
    if checksum == "sum":
        return body + b"*%02X\r" % checksum_sum(body)
    return body + b"\r"


@dataclass(frozen=True, slots=True)
class RapiFrame:
    """One parsed frame: ``kind`` is the two-character command (``"GS"``, ``"OK"``, ``"AT"``),
    ``tokens`` its arguments (without the sequence id), ``seq`` the sequence id if any."""

    kind: str
    tokens: tuple[str, ...] = ()
    seq: int | None = None
    checksum: ChecksumKind = "xor"

    @property
    def is_reply(self) -> bool:
        return self.kind in ("OK", "NK")

    @property
    def is_async(self) -> bool:
        """Notifications the controller sends on its own (``$A*``, ``$WF``)."""
        return self.kind.startswith("A") or self.kind == "WF"


def parse_frame(line: bytes, *, require_checksum: bool = False) -> RapiFrame:
    """Parse one frame (``$`` ... with or without the trailing CR).

    Accepts the XOR (``^``) and legacy sum (``*``) checksums, and no checksum unless
    ``require_checksum``. Raises :class:`~drivers.base.ProtocolError` on anything malformed.
    """
    raw = line.rstrip(b"\r\n")
    if not raw.startswith(b"$"):
        raise ProtocolError(f"RAPI frame does not start with '$': {raw!r}")
    if b"$" in raw[1:]:
        raise ProtocolError(f"RAPI frame contains a second '$': {raw!r}")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"RAPI frame is not ASCII: {raw!r}") from None
    if not text.isprintable():
        raise ProtocolError(f"RAPI frame contains control characters: {raw!r}")

    marks = [i for i in (text.find("^"), text.find("*")) if i >= 0]
    kind: ChecksumKind = "none"
    if marks:
        at = min(marks)
        body, mark, digits = text[:at], text[at], text[at + 1 :]
        if not _HEX2_RE.fullmatch(digits):
            raise ProtocolError(f"malformed RAPI checksum {digits!r} in {raw!r}")
        data = body.encode("ascii")
        if mark == "^":
            kind, expected = "xor", checksum_xor(data)
        else:
            kind, expected = "sum", checksum_sum(data)
        if int(digits, 16) != expected:
            raise ProtocolError(
                f"bad RAPI checksum {mark}{digits.upper()} (expected {expected:02X}) in {raw!r}"
            )
    elif require_checksum:
        raise ProtocolError(f"RAPI frame without checksum: {raw!r}")
    else:
        body = text

    parts = body[1:].split(" ")
    if "" in parts:
        raise ProtocolError(f"empty token in RAPI frame {raw!r}")
    if len(parts) > MAX_TOKENS:
        raise ProtocolError(f"too many tokens in RAPI frame {raw!r}")
    if not _KIND_RE.fullmatch(parts[0]):
        raise ProtocolError(f"bad RAPI command {parts[0]!r} in {raw!r}")
    tokens = parts[1:]
    seq: int | None = None
    if tokens and tokens[-1].startswith(":"):
        digits = tokens.pop()[1:]
        if not _HEX2_RE.fullmatch(digits):
            raise ProtocolError(f"malformed RAPI sequence id in {raw!r}")
        seq = int(digits, 16)
        if seq == 0:
            raise ProtocolError(f"RAPI sequence id 00 is reserved: {raw!r}")
    return RapiFrame(parts[0], tuple(tokens), seq, kind)


class RapiFramer:
    """Incremental splitter: feed it bytes as they arrive, get complete frames back.

    A ``$`` always starts a new frame (an unfinished one is dropped: resync). Bytes outside
    a frame are counted as garbage; a frame longer than ``max_len`` (``$`` included, CR
    excluded) is dropped whole. Nothing here raises: bad input is counted and logged.
    """

    def __init__(
        self, *, max_len: int = MAX_FRAME_LEN, require_checksum: bool = False, name: str = "rapi"
    ) -> None:
        self.max_len = max_len
        self.require_checksum = require_checksum
        self.name = name
        #: Frames dropped: truncated by a new ``$``, too long, or unparsable.
        self.dropped = 0
        #: Bytes received outside any frame.
        self.garbage_bytes = 0
        self._buf = bytearray()
        self._in_frame = False
        self._overflow = False

    def reset(self) -> None:
        self._buf.clear()
        self._in_frame = False
        self._overflow = False

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("%s: dropped RAPI frame (%s): %r", self.name, why, bytes(self._buf[:80]))

    def feed_raw(self, data: bytes) -> list[bytes]:
        """Return the complete frames in ``data`` (``$`` up to, not including, CR)."""
        out: list[bytes] = []
        garbage = 0
        buf = self._buf
        for byte in data:
            if byte == SOC:
                if self._in_frame:
                    self._drop("truncated by a new '$'")
                buf.clear()
                buf.append(byte)
                self._in_frame = True
                self._overflow = False
            elif byte in (EOC, LF):
                if self._in_frame:
                    if self._overflow:
                        self._drop(f"longer than {self.max_len} bytes")
                    else:
                        out.append(bytes(buf))
                    buf.clear()
                    self._in_frame = False
                    self._overflow = False
            elif self._in_frame:
                if len(buf) >= self.max_len:
                    self._overflow = True
                else:
                    buf.append(byte)
            else:
                garbage += 1
        if garbage:
            self.garbage_bytes += garbage
            log.debug("%s: ignored %d byte(s) outside RAPI frames", self.name, garbage)
        return out

    def feed(self, data: bytes) -> list[RapiFrame]:
        """Return the frames in ``data`` that parse; the others are dropped and counted."""
        frames: list[RapiFrame] = []
        for raw in self.feed_raw(data):
            try:
                frames.append(parse_frame(raw, require_checksum=self.require_checksum))
            except ProtocolError as exc:
                self.dropped += 1
                log.warning("%s: dropped RAPI frame: %s", self.name, exc)
        return frames


def status_from_state(evsestate: int, pilotstate: int, vflags: int, offered_a: float) -> EvseStatus:
    """Map an OpenEVSE state (``$GS``/``$AT`` fields) to an :class:`EvseStatus`.

    See the table in the module docstring.
    """
    contactor = bool(vflags & FLAG_CHARGING_ON)
    vendor = f"{evsestate & 0xFF:02X}"
    mode = ControlMode.ENABLED
    fault: FaultCode | None = None
    if evsestate == STATE_UNKNOWN:
        vehicle = VehicleState.UNKNOWN
    elif evsestate == STATE_A:
        vehicle = VehicleState.ABSENT
    elif evsestate == STATE_B:
        vehicle = VehicleState.CONNECTED
    elif evsestate == STATE_C:
        vehicle = VehicleState.CHARGING if contactor else VehicleState.REQUESTING
    elif evsestate in (STATE_SLEEPING, STATE_DISABLED):
        mode = ControlMode.PAUSED if evsestate == STATE_SLEEPING else ControlMode.DISABLED
        connected = bool(vflags & EV_CONNECTED) or pilotstate in (STATE_B, STATE_C)
        vehicle = VehicleState.CONNECTED if connected else VehicleState.ABSENT
    else:
        vehicle = VehicleState.FAULT
        fault = FAULT_CODES.get(evsestate, FaultCode.OTHER)
    return EvseStatus(
        vehicle=vehicle,
        mode=mode,
        offered_current_a=float(offered_a),
        contactor_closed=contactor,
        fault=fault,
        vendor_code=vendor,
    )


def _int_token(frame: RapiFrame, index: int, base: int, what: str) -> int:
    try:
        return int(frame.tokens[index], base)
    except (IndexError, ValueError):
        raise ProtocolError(
            f"RAPI ${frame.kind} {' '.join(frame.tokens)!r}: missing or bad {what}"
        ) from None


# --------------------------------------------------------------------------- controller


@dataclass(slots=True)
class _Pending:
    seq: int
    future: asyncio.Future[RapiFrame]
    #: ``_async_gen`` when the reply was dispatched.
    async_gen: int = 0


_MODE_COMMANDS: Final[dict[ControlMode, str]] = {
    ControlMode.ENABLED: "FE",
    ControlMode.PAUSED: "FS",
    ControlMode.DISABLED: "FD",
}


class RapiController:
    """An OpenEVSE controller on a serial port (RAPI protocol). See the module docstring."""

    capabilities: EvseCapabilities

    def __init__(
        self,
        *,
        port: str,
        baudrate: int = 115200,
        timeout_s: float = 1.0,
        retries: int = 2,
        heartbeat_interval_s: float = 30,
        supervision_timeout_s: int = 100,
        fallback_current_a: int = 6,
        poll_interval_s: float = 30.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if not 0 <= supervision_timeout_s <= 0xFFFF:
            raise ValueError("supervision_timeout_s must be 0 (off) .. 65535")
        if supervision_timeout_s and not 0 < heartbeat_interval_s < supervision_timeout_s:
            raise ValueError("heartbeat_interval_s must be > 0 and < supervision_timeout_s")
        if not 0 <= fallback_current_a <= 0xFF:
            raise ValueError("fallback_current_a must be 0..255")
        self.port = port
        self.capabilities = EvseCapabilities(supports_unlock=False)
        self._baudrate = baudrate
        self._timeout_s = timeout_s
        self._retries = retries
        self._heartbeat_interval_s = heartbeat_interval_s
        self._supervision_timeout_s = supervision_timeout_s
        self._fallback_current_a = fallback_current_a
        self._poll_interval_s = poll_interval_s

        self._listener: StatusListener | None = None
        self._lock = asyncio.Lock()
        self._framer = RapiFramer(require_checksum=True, name=f"rapi {port}")
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: _Pending | None = None
        self._seq = 0
        self._started = False
        self._port_lost = False
        self._comm_lost = False

        self._offered_a = 0.0
        self._intent_mode: ControlMode | None = None
        self._intent_current: int | None = None
        self._last_status: EvseStatus | None = None
        self._last_key: EvseStatus | None = None
        #: Counts ``$AT`` frames; a ``$GS`` reply followed by an ``$AT`` is stale.
        self._async_gen = 0
        self._async_status: EvseStatus | None = None
        self._reply_async_gen = 0

    # ------------------------------------------------------------------ public API

    @property
    def last_status(self) -> EvseStatus | None:
        """The last status passed to the listener (or read)."""
        return self._last_status

    @property
    def frames_dropped(self) -> int:
        """Frames from the controller dropped as garbled, truncated or too long."""
        return self._framer.dropped

    def set_listener(self, listener: StatusListener) -> None:
        self._listener = listener

    async def start(self) -> None:
        """Open the port, read firmware and capabilities, configure supervision.

        Raises FatalDriverError when the port cannot be opened, TransientDriverError when the
        controller does not answer (the port is closed again in that case).
        """
        if self._started:
            return
        await self._open_port()
        self._started = True
        try:
            gv = await self.request("GV")
            firmware = gv.tokens[0] if gv.tokens else ""
            gc = await self.request("GC")
            min_a = _int_token(gc, 0, 10, "minimum current")
            hmax_a = _int_token(gc, 1, 10, "maximum current")
            pilot_a = _int_token(gc, 2, 10, "pilot current")
            cmax_a = _int_token(gc, 3, 10, "configured maximum") if len(gc.tokens) > 3 else 0
            max_a = min(hmax_a, cmax_a) if cmax_a > 0 else hmax_a
            self.capabilities = EvseCapabilities(
                min_current_a=float(min_a),
                max_current_a=float(max_a),
                firmware=firmware,
                supports_unlock=False,
            )
            self._offered_a = float(pilot_a)
            await self._configure_supervision()
            self._publish(await self._read_state(), force=True)
        except BaseException:
            await self.close()
            raise
        if self._supervision_timeout_s:
            self._spawn(self._heartbeat_loop(), "heartbeat")
        if self._poll_interval_s > 0:
            self._spawn(self._poll_loop(), "poll")
        log.info(
            "rapi %s: OpenEVSE firmware %s, %g..%g A, supervision %s",
            self.port,
            firmware or "?",
            self.capabilities.min_current_a,
            self.capabilities.max_current_a,
            f"{self._supervision_timeout_s} s -> {self._fallback_current_a} A"
            if self._supervision_timeout_s
            else "off",
        )

    async def close(self) -> None:
        """Stop the background tasks and release the port. Idempotent."""
        self._started = False
        tasks = list(self._tasks)
        if self._reader_task is not None:
            tasks.append(self._reader_task)
        self._tasks.clear()
        self._reader_task = None
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        for task in tasks:
            if task is not current:
                with contextlib.suppress(BaseException):
                    await task
        self._fail_pending(TransientDriverError(f"rapi {self.port}: driver closed"))
        await self._close_port()

    async def read_status(self) -> EvseStatus:
        """``$GS`` (+ ``$GG`` for current and voltage when the controller has meters)."""
        try:
            gg = await self.request("GG")
        except ProtocolError:
            gg = None  # no ammeter/voltmeter compiled in: $NK
        # $GS last: nothing may be awaited between _read_state and _publish (see there).
        status = await self._read_state()
        if gg is not None:
            milliamps = _int_token(gg, 0, 10, "current")
            millivolts = _int_token(gg, 1, 10, "voltage") if len(gg.tokens) > 1 else -1
            status = dataclasses.replace(
                status,
                current_a=milliamps / 1000.0 if milliamps >= 0 else None,
                voltage_v=millivolts / 1000.0 if millivolts >= 0 else None,
            )
        self._publish(status)
        return status

    async def enable(self) -> None:
        await self._set_mode(ControlMode.ENABLED)

    async def pause(self) -> None:
        await self._set_mode(ControlMode.PAUSED)

    async def disable(self) -> None:
        await self._set_mode(ControlMode.DISABLED)

    async def set_offered_current(self, current_a: float) -> float:
        """``$SC <amps> V`` (volatile: not written to EEPROM). Returns the applied amps.

        The amps are rounded down to an integer. Below ``capabilities.min_current_a`` the
        command is refused without being sent. A ``$NK`` (the controller clamped the value or
        refused to raise it while over temperature) raises ProtocolError naming the value the
        controller applied.
        """
        if not math.isfinite(current_a):
            raise ValueError(f"offered current must be finite, not {current_a}")
        amps = math.floor(current_a)
        if amps < self.capabilities.min_current_a:
            raise ProtocolError(
                f"rapi {self.port}: {current_a:g} A is below the controller minimum "
                f"{self.capabilities.min_current_a:g} A (pause instead)"
            )
        self._intent_current = amps
        return await self._apply_current(amps)

    async def unlock(self) -> bool:
        """OpenEVSE has no connector lock."""
        return False

    async def request(self, cmd: str, *args: str | int) -> RapiFrame:
        """Send one command and return its ``$OK`` reply; ``$NK`` raises ProtocolError."""
        reply = await self._exchange(cmd, *args)
        if reply.kind != "OK":
            detail = " ".join(reply.tokens)
            raise ProtocolError(
                f"rapi {self.port}: controller refused ${cmd}"
                + (f" {' '.join(map(str, args))}" if args else "")
                + (f" ({detail})" if detail else "")
            )
        return reply

    # ------------------------------------------------------------------ commands

    async def _set_mode(self, mode: ControlMode) -> None:
        # The intent is recorded first: if the controller reboots while the command is in
        # flight, the recovery re-applies it.
        self._intent_mode = mode
        await self.request(_MODE_COMMANDS[mode])

    async def _apply_current(self, amps: int) -> float:
        reply = await self._exchange("SC", amps, "V")
        applied: int | None = None
        if reply.tokens:
            try:
                applied = int(reply.tokens[0])
            except ValueError:
                applied = None
        if applied is not None:
            self._offered_a = float(applied)
        if reply.kind != "OK":
            if applied is not None:
                # The controller keeps the value it applied; that is the intent now.
                self._intent_current = applied
                raise CurrentNotApplied(
                    f"rapi {self.port}: controller refused {amps} A and applies {applied} A"
                    " (clamped to its range, or not raised while over temperature)",
                    float(applied),
                )
            raise ProtocolError(f"rapi {self.port}: controller refused {amps} A")
        if applied is None:
            raise ProtocolError(f"rapi {self.port}: $SC reply without the applied current")
        return float(applied)

    async def _configure_supervision(self) -> None:
        if not self._supervision_timeout_s:
            return
        reply = await self.request("SY", self._supervision_timeout_s, self._fallback_current_a)
        if len(reply.tokens) >= 3 and reply.tokens[2] not in ("0", "00"):
            log.warning("rapi %s: controller reports a missed heartbeat; acknowledging", self.port)
            await self.request("SY", HEARTBEAT_ACK)

    async def _read_state(self) -> EvseStatus:
        """``$GS``. An ``$AT`` read after the reply (in the same chunk, before this task
        resumed) reports a newer state than the reply: that ``$AT``'s status is returned
        instead. Callers must publish the result without awaiting anything first."""
        gs = await self.request("GS")
        evsestate = _int_token(gs, 0, 16, "evse state")
        pilotstate = _int_token(gs, 2, 16, "pilot state")
        vflags = _int_token(gs, 3, 16, "vflags")
        if self._reply_async_gen != self._async_gen and self._async_status is not None:
            log.debug("rapi %s: $GS reply superseded by a later $AT", self.port)
            return self._async_status
        return status_from_state(evsestate, pilotstate, vflags, self._offered_a)

    async def _exchange(self, cmd: str, *args: str | int) -> RapiFrame:
        """Send ``cmd`` and return the ``$OK``/``$NK`` reply with the matching sequence id."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            writer = await self._ensure_open()
            attempts = self._retries + 1
            garbled = False
            for attempt in range(1, attempts + 1):
                seq = self._next_seq()
                frame = encode_command(cmd, *args, seq=seq)
                future: asyncio.Future[RapiFrame] = loop.create_future()
                pending = self._pending = _Pending(seq, future)
                try:
                    async with asyncio.timeout(self._timeout_s):
                        writer.write(frame)
                        await writer.drain()
                        reply = await future
                except TimeoutError:
                    log.warning(
                        "rapi %s: no reply to %r (attempt %d/%d)",
                        self.port,
                        frame,
                        attempt,
                        attempts,
                    )
                    continue
                except (OSError, ConnectionError) as exc:
                    self._port_lost = True
                    self._mark_comm_lost()
                    raise TransientDriverError(f"rapi {self.port}: write failed: {exc}") from exc
                finally:
                    self._pending = None
                if reply.seq is None:
                    garbled = True
                    log.warning(
                        "rapi %s: controller rejected %r as garbled (attempt %d/%d)",
                        self.port,
                        frame,
                        attempt,
                        attempts,
                    )
                    continue
                self._reply_async_gen = pending.async_gen
                self._mark_alive()
                return reply
        self._mark_comm_lost()
        if garbled:
            raise ProtocolError(
                f"rapi {self.port}: controller kept rejecting ${cmd} as garbled "
                f"({attempts} attempts)"
            )
        raise DeviceTimeout(f"rapi {self.port}: no reply to ${cmd} after {attempts} attempts")

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFF + 1  # 01..FF, 00 is reserved
        return self._seq

    # ------------------------------------------------------------------ port

    async def _open_port(self) -> None:
        import serial_asyncio_fast  # local import: the pure helpers need no pyserial

        try:
            reader, writer = await serial_asyncio_fast.open_serial_connection(
                url=self.port, baudrate=self._baudrate, exclusive=True
            )
        except (OSError, ValueError) as exc:  # serial.SerialException is an OSError
            raise FatalDriverError(f"rapi {self.port}: cannot open serial port: {exc}") from exc
        self._reader, self._writer = reader, writer
        self._port_lost = False
        self._framer.reset()
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="rapi-reader")
        log.info("rapi %s: serial port open at %d baud", self.port, self._baudrate)

    async def _close_port(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):  # not wait_for: see raise_if_cancelling
                await writer.wait_closed()
        log.info("rapi %s: serial port closed", self.port)

    async def _ensure_open(self) -> asyncio.StreamWriter:
        if not self._started:
            raise DriverError(f"rapi {self.port}: driver not started")
        if self._port_lost or self._writer is None:
            log.warning("rapi %s: reopening the serial port", self.port)
            if self._reader_task is not None:
                self._reader_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._reader_task
                self._reader_task = None
                raise_if_cancelling()  # the suppress above may have eaten our own cancel
            await self._close_port()
            try:
                await self._open_port()
            except FatalDriverError as exc:
                self._mark_comm_lost()
                raise TransientDriverError(str(exc)) from exc
        assert self._writer is not None
        return self._writer

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(1024)
                if not data:
                    break
                for frame in self._framer.feed(data):
                    try:
                        self._dispatch(frame)
                    except Exception:
                        log.exception("rapi %s: error handling %s", self.port, frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("rapi %s: serial read failed: %s", self.port, exc)
        else:
            log.error("rapi %s: serial port reached end of file", self.port)
        self._port_lost = True
        self._fail_pending(TransientDriverError(f"rapi {self.port}: serial port lost"))
        self._mark_comm_lost()  # until a reopened port answers again

    def _fail_pending(self, exc: Exception) -> None:
        pending = self._pending
        if pending is not None and not pending.future.done():
            pending.future.set_exception(exc)

    # ------------------------------------------------------------------ incoming frames

    def _dispatch(self, frame: RapiFrame) -> None:
        if frame.is_reply:
            pending = self._pending
            if (
                pending is not None
                and not pending.future.done()
                and (frame.seq == pending.seq or (frame.seq is None and frame.kind == "NK"))
            ):
                pending.async_gen = self._async_gen
                pending.future.set_result(frame)
            else:
                log.warning(
                    "rapi %s: dropping $%s %s with sequence id %s (expected %s)",
                    self.port,
                    frame.kind,
                    " ".join(frame.tokens),
                    "none" if frame.seq is None else f"{frame.seq:02X}",
                    "none" if pending is None else f"{pending.seq:02X}",
                )
        elif frame.kind == "AT":
            self._on_async_state(frame)
        elif frame.kind == "AB":
            self._on_boot(frame)
        elif frame.kind == "AN":
            log.info("rapi %s: button press %s", self.port, " ".join(frame.tokens))
        elif frame.kind == "WF":
            log.info("rapi %s: WiFi mode request %s", self.port, " ".join(frame.tokens))
        else:
            log.debug("rapi %s: ignoring unexpected frame %s", self.port, frame)

    def _on_async_state(self, frame: RapiFrame) -> None:
        try:
            evsestate = _int_token(frame, 0, 16, "evse state")
            pilotstate = _int_token(frame, 1, 16, "pilot state")
            capacity = _int_token(frame, 2, 10, "current capacity")
            vflags = _int_token(frame, 3, 16, "vflags")
        except ProtocolError as exc:
            log.warning("rapi %s: %s", self.port, exc)
            return
        self._offered_a = float(capacity)
        self._async_gen += 1
        self._async_status = status_from_state(evsestate, pilotstate, vflags, capacity)
        self._publish(self._async_status)

    def _on_boot(self, frame: RapiFrame) -> None:
        firmware = frame.tokens[1] if len(frame.tokens) > 1 else ""
        log.warning(
            "rapi %s: controller rebooted (code %s, firmware %s); re-applying the agent's "
            "settings (current %s A, mode %s)",
            self.port,
            frame.tokens[0] if frame.tokens else "?",
            firmware or "?",
            self._intent_current if self._intent_current is not None else "unchanged",
            self._intent_mode.value if self._intent_mode is not None else "unchanged",
        )
        if firmware and firmware != self.capabilities.firmware:
            self.capabilities = dataclasses.replace(self.capabilities, firmware=firmware)
        for task in list(self._tasks):
            if task.get_name() == "rapi-recover":
                task.cancel()
        self._spawn(self._recover_after_reboot(), "recover")

    async def _recover_after_reboot(self) -> None:
        try:
            await self._configure_supervision()
            if self._intent_current is not None:
                try:
                    await self._apply_current(self._intent_current)
                except ProtocolError as exc:
                    log.error("rapi %s: re-applying the current after reboot: %s", self.port, exc)
            if self._intent_mode is not None:
                await self.request(_MODE_COMMANDS[self._intent_mode])
            self._publish(await self._read_state(), force=True)
            log.info("rapi %s: settings re-applied after the controller reboot", self.port)
        except TransientDriverError as exc:
            log.error("rapi %s: recovery after the controller reboot failed: %s", self.port, exc)

    # ------------------------------------------------------------------ status

    def _publish(self, status: EvseStatus, *, force: bool = False) -> None:
        """Remember ``status`` and pass it to the listener if it differs from the last one."""
        key = dataclasses.replace(status, current_a=None, voltage_v=None)
        self._last_status = status
        if not force and key == self._last_key:
            return
        self._last_key = key
        if self._listener is None:
            return
        try:
            self._listener(status)
        except Exception:
            log.exception("rapi %s: status listener failed", self.port)

    def _mark_comm_lost(self) -> None:
        if self._comm_lost:
            return
        self._comm_lost = True
        last = self._last_status
        log.error("rapi %s: controller stopped answering", self.port)
        self._publish(
            EvseStatus(
                vehicle=VehicleState.FAULT,
                mode=self._intent_mode or (last.mode if last else ControlMode.ENABLED),
                offered_current_a=self._offered_a,
                contactor_closed=last.contactor_closed if last else False,
                fault=FaultCode.COMMUNICATION,
            )
        )

    def _mark_alive(self) -> None:
        if not self._comm_lost:
            return
        self._comm_lost = False
        log.info("rapi %s: controller answers again", self.port)
        if self._started:
            self._spawn(self._refresh(), "refresh")

    async def _refresh(self) -> None:
        try:
            self._publish(await self._read_state())
        except TransientDriverError as exc:
            log.warning("rapi %s: state refresh failed: %s", self.port, exc)

    # ------------------------------------------------------------------ background tasks

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"rapi-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval_s)
            try:
                reply = await self._exchange("SY")
                if reply.kind == "NK":
                    log.warning(
                        "rapi %s: controller missed a heartbeat and fell back to %d A; "
                        "acknowledging and re-applying the offered current",
                        self.port,
                        self._fallback_current_a,
                    )
                    await self.request("SY", HEARTBEAT_ACK)
                    if self._intent_current is not None:
                        await self._apply_current(self._intent_current)
            except TransientDriverError as exc:
                log.warning("rapi %s: heartbeat failed: %s", self.port, exc)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                self._publish(await self._read_state())
            except TransientDriverError as exc:
                log.warning("rapi %s: state poll failed: %s", self.port, exc)
