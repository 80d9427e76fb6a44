"""NTP time keeping: query servers, optionally step the system clock, correct timestamps.

The agent must know the right time before it trusts a TLS certificate (validity dates) and
before it stamps OCPP messages. Boards without a battery-backed RTC start in 1970, so the
agent synchronises at start (:meth:`ClockGuard.wait_synchronized`) and then periodically
(:meth:`ClockGuard.run_periodic`).

Two ways of being right:

- ``step_system_clock=True`` (the agent owns the clock, needs ``CAP_SYS_TIME``): when the
  offset exceeds ``step_threshold_s`` the system clock is stepped with
  ``clock_settime(CLOCK_REALTIME)``.
- ``step_system_clock=False`` (the default; chronyd/systemd-timesyncd or nobody owns the
  clock): the system clock is left alone and :meth:`ClockGuard.now` adds the measured offset,
  so OCPP timestamps are right anyway.

Queries use ntplib's blocking client; :func:`sync` runs them in a worker thread so the event
loop is never blocked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import ntplib

from drivers.base import ClockSample, DeviceTimeout, DriverError, FatalDriverError, ProtocolError

logger = logging.getLogger("evcp.clock")

NTP_PORT = 123
#: NTP version sent in requests.
NTP_VERSION = 4
#: Mode of a server's reply to a client request (RFC 5905).
_MODE_SERVER = 4
#: Leap indicator 3: "alarm condition, clock not synchronized".
_LEAP_UNSYNCHRONIZED = 3
#: Highest stratum of a synchronised server; 16 means unsynchronised, 0 a kiss-of-death.
_MAX_STRATUM = 15
#: Extra time allowed per server on top of ``timeout_s`` for name resolution.
_RESOLVE_ALLOWANCE_S = 5.0

ClockSetter = Callable[[float], None]


def _set_realtime_clock(epoch_s: float) -> None:
    """Default clock setter: step ``CLOCK_REALTIME`` (needs CAP_SYS_TIME)."""
    time.clock_settime(time.CLOCK_REALTIME, epoch_s)


def parse_server(server: str, default_port: int = NTP_PORT) -> tuple[str, int]:
    """Split ``"host"``, ``"host:port"``, ``"[v6]:port"`` or a bare IPv6 literal.

    Raises :class:`FatalDriverError` for an empty host or an invalid port (a configuration
    error: retrying will not help).
    """
    text = server.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise FatalDriverError(f"NTP server {server!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise FatalDriverError(f"NTP server {server!r}: junk after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    # More than one ':' without brackets: a bare IPv6 address, no port.
    if not host:
        raise FatalDriverError(f"NTP server {server!r}: empty host")
    port = default_port
    if port_text:
        try:
            port = int(port_text)
        except ValueError:
            raise FatalDriverError(f"NTP server {server!r}: invalid port") from None
    if not 0 < port < 65536:
        raise FatalDriverError(f"NTP server {server!r}: port {port} out of range")
    return host, port


def query(server: str, *, port: int = NTP_PORT, timeout_s: float = 2.0) -> ClockSample:
    """Ask one NTP server for the time (blocking; at most about ``timeout_s`` plus DNS).

    ``server`` is ``"host"`` or ``"host:port"``; ``port`` is used when it has no port.

    Raises:
        DeviceTimeout: no answer within ``timeout_s``, or the server is unreachable
            (name does not resolve, network unreachable, port refused).
        ProtocolError: the answer is malformed, or the server is not synchronised
            (stratum 0 = kiss-of-death, stratum >= 16, leap indicator 3).
        FatalDriverError: ``server`` is not a valid ``host[:port]``.
    """
    host, real_port = parse_server(server, port)
    try:
        stats = ntplib.NTPClient().request(
            host, version=NTP_VERSION, port=real_port, timeout=timeout_s
        )
    except ntplib.NTPException as exc:
        # ntplib turns its socket timeout into an NTPException with this message.
        if str(exc).startswith("No response received"):
            raise DeviceTimeout(f"NTP server {server}: no answer within {timeout_s} s") from exc
        raise ProtocolError(f"NTP server {server}: bad answer: {exc}") from exc
    except OSError as exc:
        raise DeviceTimeout(f"NTP server {server}: unreachable: {exc}") from exc

    stratum = int(stats.stratum)
    if int(stats.leap) == _LEAP_UNSYNCHRONIZED:
        # An unsynchronised chronyd answers leap 3, stratum 0, reference id 0.
        raise ProtocolError(
            f"NTP server {server}: unsynchronised (leap indicator 3, stratum {stratum})"
        )
    if stratum == 0:
        kiss = _kiss_code(int(stats.ref_id))
        raise ProtocolError(f"NTP server {server}: kiss-of-death {kiss!r} (stratum 0)")
    if stratum > _MAX_STRATUM:
        raise ProtocolError(f"NTP server {server}: unsynchronised (stratum {stratum})")
    if int(stats.mode) != _MODE_SERVER:
        raise ProtocolError(f"NTP server {server}: unexpected mode {stats.mode} in reply")
    if not stats.tx_timestamp or not stats.recv_timestamp:
        raise ProtocolError(f"NTP server {server}: reply without a receive/transmit timestamp")
    # The origin timestamp echoes our request's transmit time: a reply that does not (0,
    # or from another exchange) answers nothing we asked, and would step the clock by
    # decades (RFC 5905 8: the "bogus" test).
    round_trip_s = float(stats.dest_timestamp) - float(stats.orig_timestamp)
    if not stats.orig_timestamp or not -1.0 <= round_trip_s <= timeout_s + 1.0:
        raise ProtocolError(f"NTP server {server}: reply does not match our request")
    offset_s = float(stats.offset)
    delay_s = float(stats.delay)
    if not (math.isfinite(offset_s) and math.isfinite(delay_s)):
        raise ProtocolError(f"NTP server {server}: non-finite offset or delay")
    if not -1.0 <= delay_s <= timeout_s + 1.0:
        raise ProtocolError(f"NTP server {server}: impossible round-trip delay {delay_s:.3g} s")
    return ClockSample(server=server, offset_s=offset_s, delay_s=delay_s, stratum=stratum)


def _kiss_code(ref_id: int) -> str:
    """The 4 ASCII characters of a kiss-of-death reference id (e.g. ``"RATE"``)."""
    raw = ref_id.to_bytes(4, "big", signed=False)
    return raw.decode("ascii", errors="replace").rstrip("\x00")


async def _sync(
    servers: Sequence[str],
    *,
    timeout_s: float,
    step_threshold_s: float,
    step_system_clock: bool,
    clock_settime: ClockSetter | None,
) -> tuple[ClockSample, bool] | None:
    """:func:`sync`, also telling whether the system clock was stepped."""
    if not servers:
        logger.info("NTP disabled: no servers configured; the system clock is trusted as is")
        return None
    sample: ClockSample | None = None
    for server in servers:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout_s + _RESOLVE_ALLOWANCE_S):
                sample = await asyncio.to_thread(query, server, timeout_s=timeout_s)
        except TimeoutError:
            logger.info("NTP server %s: no answer (name resolution too slow)", server)
        except FatalDriverError as exc:
            logger.warning("NTP server ignored, check the configuration: %s", exc)
        except DriverError as exc:
            logger.info("%s", exc)
        else:
            break
    if sample is None:
        logger.warning(
            "NTP: no server answered (tried %s); clock not synchronised", ", ".join(servers)
        )
        return None

    stepped = False
    if step_system_clock and abs(sample.offset_s) > step_threshold_s:
        setter = clock_settime if clock_settime is not None else _set_realtime_clock
        new_epoch_s = time.time() + sample.offset_s
        try:
            setter(new_epoch_s)
        except OSError as exc:
            logger.error(
                "NTP: cannot step the system clock by %+.3f s (%s); correcting timestamps instead",
                sample.offset_s,
                exc,
            )
        else:
            stepped = True
            logger.warning(
                "NTP: stepped the system clock by %+.3f s to %s (server %s, stratum %d)",
                sample.offset_s,
                datetime.fromtimestamp(new_epoch_s, UTC).isoformat(timespec="milliseconds"),
                sample.server,
                sample.stratum,
            )
    if not stepped:
        logger.info(
            "NTP: offset %+.6f s, delay %.6f s from %s (stratum %d)%s",
            sample.offset_s,
            sample.delay_s,
            sample.server,
            sample.stratum,
            "" if abs(sample.offset_s) <= step_threshold_s else "; system clock not stepped",
        )
    return sample, stepped


async def sync(
    servers: list[str],
    *,
    timeout_s: float = 2.0,
    step_threshold_s: float = 0.5,
    step_system_clock: bool = False,
    clock_settime: Callable[[float], None] | None = None,
) -> ClockSample | None:
    """Query ``servers`` in order and return the first good answer, or ``None``.

    Each query runs in a worker thread. When ``step_system_clock`` is true and the offset's
    magnitude exceeds ``step_threshold_s``, the system clock is stepped by calling
    ``clock_settime(new_epoch_seconds)`` (default: ``time.clock_settime(CLOCK_REALTIME)``);
    a refused step (``OSError``, e.g. no CAP_SYS_TIME) is logged and not raised.

    Returns ``None`` (with a warning) when no server answered, and at once (with an info
    line) when ``servers`` is empty: NTP is disabled.
    """
    result = await _sync(
        servers,
        timeout_s=timeout_s,
        step_threshold_s=step_threshold_s,
        step_system_clock=step_system_clock,
        clock_settime=clock_settime,
    )
    return None if result is None else result[0]


class ClockGuard:
    """The agent's view of the right time.

    Keeps the last NTP sample. :meth:`now` is the system time plus :attr:`offset_s`: the
    measured offset while the system clock was not stepped, ``0`` after a successful step
    (the system clock is then right by itself). Use it for every OCPP timestamp.

    Only touch a ClockGuard from its event loop.
    """

    #: Before the first good answer, :meth:`run_periodic` retries after this many seconds,
    #: doubling up to :attr:`unsynced_retry_max_s`.
    unsynced_retry_s = 10.0
    unsynced_retry_max_s = 300.0

    def __init__(
        self,
        *,
        timeout_s: float = 2.0,
        step_threshold_s: float = 0.5,
        step_system_clock: bool = False,
        clock_settime: Callable[[float], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.step_threshold_s = step_threshold_s
        self.step_system_clock = step_system_clock
        self._clock_settime = clock_settime
        self._sample: ClockSample | None = None
        self._offset_s = 0.0
        self._synced_at_monotonic: float | None = None
        #: Called with the offset (s) after each step of the system clock (the agent
        #: records it as a SettingSystemTime security event).
        self.on_step: Callable[[float], None] = lambda offset_s: None

    @property
    def sample(self) -> ClockSample | None:
        """The last good NTP answer, or ``None`` before the first one."""
        return self._sample

    @property
    def offset_s(self) -> float:
        """Seconds :meth:`now` adds to the system time (0 before sync and after a step)."""
        return self._offset_s

    @property
    def synchronized(self) -> bool:
        """True once a server has answered (the correction then stays valid)."""
        return self._sample is not None

    @property
    def last_sync_age_s(self) -> float | None:
        """Seconds since the last good answer, or ``None`` before the first one."""
        if self._synced_at_monotonic is None:
            return None
        return time.monotonic() - self._synced_at_monotonic

    def now(self) -> datetime:
        """The corrected current time, UTC, timezone-aware."""
        return datetime.now(UTC) + timedelta(seconds=self._offset_s)

    async def sync(self, servers: Sequence[str]) -> ClockSample | None:
        """One :func:`sync` with this guard's settings; remembers a good answer."""
        result = await _sync(
            servers,
            timeout_s=self.timeout_s,
            step_threshold_s=self.step_threshold_s,
            step_system_clock=self.step_system_clock,
            clock_settime=self._clock_settime,
        )
        if result is None:
            return None
        sample, stepped = result
        self._sample = sample
        self._offset_s = 0.0 if stepped else sample.offset_s
        self._synced_at_monotonic = time.monotonic()
        if stepped:
            self.on_step(sample.offset_s)
        return sample

    async def wait_synchronized(
        self, servers: Sequence[str], *, attempts: int = 5, interval_s: float = 2.0
    ) -> bool:
        """Try to synchronise up to ``attempts`` times, ``interval_s`` apart.

        Returns True on success. Gives up with a warning and returns False so that the agent
        can start anyway (it then keeps trying in :meth:`run_periodic`). Returns False at once
        when ``servers`` is empty (NTP disabled).
        """
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if interval_s < 0:
            raise ValueError("interval_s must not be negative")
        if not servers:
            logger.info("NTP disabled: no servers configured; the system clock is trusted as is")
            return False
        for attempt in range(1, attempts + 1):
            if await self.sync(servers) is not None:
                return True
            if attempt < attempts:
                await asyncio.sleep(interval_s)
        logger.warning(
            "NTP: clock not synchronised after %d attempt(s); starting anyway with the "
            "system clock (TLS certificate dates may be judged wrongly)",
            attempts,
        )
        return False

    async def run_periodic(self, servers: Sequence[str], interval_s: float) -> None:
        """Re-synchronise every ``interval_s`` seconds, forever (put it in a TaskGroup).

        The first sync happens after one interval (call :meth:`wait_synchronized` at start).
        Until a sync has succeeded (a board without a battery-backed clock whose network
        came up late), it retries sooner: after :attr:`unsynced_retry_s`, doubling up to
        :attr:`unsynced_retry_max_s` (never beyond ``interval_s``) -- with a wrong clock, no
        TLS certificate can be judged. Failures are logged and never end the loop. Returns
        at once when ``servers`` is empty.
        """
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if not servers:
            logger.info("NTP disabled: no periodic synchronisation")
            return
        retry_s = self.unsynced_retry_s
        while True:
            if self.synchronized:
                await asyncio.sleep(interval_s)
            else:
                await asyncio.sleep(min(retry_s, interval_s))
                retry_s = min(retry_s * 2, self.unsynced_retry_max_s)
            try:
                await self.sync(servers)
            except Exception:
                logger.exception("NTP: periodic synchronisation failed unexpectedly")
