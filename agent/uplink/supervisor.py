"""The uplink supervisor: measures each link, applies the rules of ``agent/core/uplink.py``,
makes the chosen link's default route win and tells the OCPP session to reconnect over it.

Tasks (all in :meth:`UplinkSupervisor.run`):

* netlink: carrier, up and addresses of every link's interface, read on every netlink
  link/address event (else every ``link_poll_s``); losing any of them is "down" at once (an interface that does not exist is one warning at
  start, and the link counts as down until it appears);
* one probe loop per link, paced by the rules (sparse on a steady gsm link), woken at once
  when the link (re)appears;
* a ticker that re-decides when a move back falls due or waits for a CALL's answer;
* the modem (a gsm link with ``at_port``): signal and registration every ``modem_poll_s``,
  ICCID and IMSI once.

Every switch is one log line with the reason. A back-end that cannot act is logged once
(again only if its message changes) and the supervisor carries on: the probes and the
status still work and the session still reconnects, over whatever path the OS picks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.config import UplinkConfig
from agent.core.uplink import LinkSpec, Rules, Switch, Uplinks, seconds_until
from drivers.uplink import BackendError
from drivers.uplink.modem import AtModem, ModemError, ModemInfo
from drivers.uplink.netlink import LinkEvents, LinkInfo, LinkMonitor
from drivers.uplink.probe import Prober, ProbeResult

__all__ = ["Backend", "SessionPort", "UplinkSupervisor", "make_backend"]

log = logging.getLogger("evcp.uplink")


class SessionPort(Protocol):
    """What the supervisor needs from the OCPP session."""

    def reconnect(self, reason: str) -> None:
        """Close the WebSocket now and connect again (over the new default route). The
        durable queue resends what was not acknowledged."""

    def call_in_flight(self) -> bool:
        """True while a CALL we sent awaits its CALLRESULT/CALLERROR."""

    def route_chosen(self) -> None:
        """The first choice of a link was made: a connect attempt still waiting (over
        whatever route the OS picked before) or a back-off pause may end now; a
        connection that is up stays."""


class Backend(Protocol):
    name: str

    async def apply(self, interface: str) -> None:
        """Make ``interface``'s default route win. BackendError if it cannot."""

    async def release(self) -> None:
        """Undo what :meth:`apply` did (the OS's choice applies again)."""


def make_backend(cfg: UplinkConfig) -> Backend:
    if cfg.backend == "networkmanager":
        from drivers.uplink.networkmanager import NetworkManagerBackend

        return NetworkManagerBackend(link.interface for link in cfg.links)
    from drivers.uplink.routes import RouteBackend

    return RouteBackend()


@dataclass(slots=True)
class _SwitchRecord:
    at: float  # wall clock
    from_: str | None
    to: str
    reason: str
    forced: bool


class UplinkSupervisor:
    """One per agent, started when the config has an ``[uplink]`` section."""

    def __init__(
        self,
        cfg: UplinkConfig,
        host: str,
        port: int,
        *,
        session: SessionPort | None = None,
        backend: Backend | None = None,
        tls: ssl.SSLContext | None = None,
        link_poll_s: float = 0.5,
        modem_poll_s: float = 60.0,
        reconcile_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        links_reader: Callable[[list[str]], Awaitable[dict[str, LinkInfo]]] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.session = session
        self.backend = backend if backend is not None else make_backend(cfg)
        self.prober = Prober(
            host, port, timeout_s=cfg.probe_timeout_s, tls=tls if cfg.probe_tls else None
        )
        self.rules = Uplinks(
            tuple(LinkSpec(link.name, link.kind, link.priority) for link in cfg.links),
            Rules(
                hold_s=cfg.hold_s,
                probe_interval_s=cfg.probe_interval_s,
                failures_to_down=cfg.failures_to_down,
                successes_to_up=cfg.successes_to_up,
                gsm_probe_interval_s=cfg.gsm_probe_interval_s,
            ),
        )
        self.link_poll_s = link_poll_s
        #: With netlink events, the link state is read on each event and at least this often.
        self.event_fallback_s = 5.0
        self.modem_poll_s = modem_poll_s
        self.reconcile_s = reconcile_s
        self.clock = clock
        self.wall = wall
        self._monitor = LinkMonitor()
        self.links_reader = links_reader or self._monitor.read
        self.on_change = on_change
        self.last_switch: _SwitchRecord | None = None
        self.backend_error: str | None = None
        self.modem: ModemInfo | None = None
        self.modem_error: str | None = None
        self._info: dict[str, LinkInfo] = {}
        self._probes: dict[str, ProbeResult] = {}
        self._kick = {link.name: asyncio.Event() for link in cfg.links}
        self._tick = asyncio.Event()
        self._lock = asyncio.Lock()
        self._warned_missing: set[str] = set()
        self._modem_link = next((lk for lk in cfg.links if lk.at_port), None)
        self._at: AtModem | None = None
        self._modem_lock = asyncio.Lock()
        self._identity_task: asyncio.Future[None] | None = None

    # ------------------------------------------------------------------ outside API

    def attach(self, session: SessionPort) -> None:
        """Connect the OCPP session (it may be created after the supervisor)."""
        self.session = session

    @property
    def active(self) -> str | None:
        return self.rules.active

    def active_kind(self) -> str | None:
        return self.cfg.link(self.rules.active).kind if self.rules.active else None

    def ping_interval_s(self, default: float | None) -> float | None:
        """The WebSocket ping interval for the link in use: ``gsm_ping_interval_s`` over gsm
        (None when it is 0: no pings), else ``default``."""
        if self.active_kind() == "gsm":
            return self.cfg.gsm_ping_interval_s or None
        return default

    async def identity(self, timeout_s: float = 5.0) -> tuple[str, str]:
        """``(iccid, imsi)`` for BootNotification, read from the modem once ("" unknown)."""
        if self._modem_link is None:
            return "", ""
        if self.modem is None or not self.modem.iccid:
            # Not cancelled at the timeout: the query runs in a thread that would carry on
            # on the serial port while the lock let the next query in. It ends on its own.
            if self._identity_task is None or self._identity_task.done():
                self._identity_task = asyncio.ensure_future(self._query_modem(identity=True))
            await asyncio.wait({self._identity_task}, timeout=timeout_s)
        info = self.modem
        return (info.iccid or "", info.imsi or "") if info else ("", "")

    async def switch(self, name: str) -> dict[str, Any]:
        """``evcp uplink switch NAME``: pin a healthy link. ValueError (with the reason) if
        it is unknown or not healthy. Returns :meth:`snapshot`."""
        async with self._lock:
            decision = self.rules.force(name, self.clock())
            if decision is not None:
                await self._switch(decision)
        self._changed()
        return self.snapshot()

    async def release(self) -> dict[str, Any]:
        """``evcp uplink switch --auto``: end a forced choice."""
        self.rules.release()
        await self._evaluate()
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """The ``"uplink"`` object of ``evcp status --json``."""
        links = []
        for link in self.cfg.links:
            state = self.rules.links[link.name]
            info = self._info.get(link.interface)
            probe = self._probes.get(link.name)
            links.append(
                {
                    "name": link.name,
                    "interface": link.interface,
                    "kind": link.kind,
                    "priority": link.priority,
                    "healthy": state.healthy,
                    "active": self.rules.active == link.name,
                    "state": state.health.value,
                    "reason": state.reason,
                    "carrier": bool(info and info.carrier),
                    "addresses": list(info.addresses) if info else [],
                    "last_probe": None
                    if probe is None
                    else {
                        "ok": probe.ok,
                        "detail": probe.detail,
                        "ms": round(probe.elapsed_s * 1000),
                    },
                    "hold_s": self.rules.hold_of(link.name),
                    "flaps": state.flaps,
                }
            )
        last = self.last_switch
        return {
            "active": self.rules.active,
            "backend": self.backend.name,
            "backend_error": self.backend_error,
            "forced": self.rules.forced,
            "waiting_for_call": self.rules.waiting_for_call,
            "last_switch": None
            if last is None
            else {
                "at": datetime.fromtimestamp(last.at, UTC).isoformat(timespec="seconds"),
                "from": last.from_,
                "to": last.to,
                "reason": last.reason,
                "forced": last.forced,
            },
            "links": links,
            "modem": None
            if self._modem_link is None
            else {
                "link": self._modem_link.name,
                "error": self.modem_error,
                **(self.modem.as_dict() if self.modem else {}),
            },
        }

    # ------------------------------------------------------------------ run

    async def run(self) -> None:
        """Supervise until cancelled; on the way out, undo the back-end's routes."""
        tasks = [asyncio.create_task(self._netlink_loop(), name="uplink-netlink")]
        tasks += [
            asyncio.create_task(self._probe_loop(link.name, link.interface), name="uplink-probe")
            for link in self.cfg.links
        ]
        tasks.append(asyncio.create_task(self._ticker(), name="uplink-ticker"))
        if self._modem_link is not None:
            tasks.append(asyncio.create_task(self._modem_loop(), name="uplink-modem"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._monitor.close()
            if self._at is not None:
                self._at.close()
            if self.rules.active is not None:
                with contextlib.suppress(BackendError):
                    await asyncio.shield(self.backend.release())

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _netlink_loop(self) -> None:
        events: LinkEvents | None = LinkEvents()
        try:
            await events.open()  # type: ignore[union-attr]
        except Exception as exc:  # no multicast netlink here: poll instead
            log.warning("uplink: no netlink events (%s); polling every %g s", exc, self.link_poll_s)
            events = None
        try:
            await self._netlink_reads(events)
        finally:
            if events is not None:
                events.close()

    async def _netlink_reads(self, events: LinkEvents | None) -> None:
        names = [link.interface for link in self.cfg.links]
        last_reconcile = self.clock()
        while True:
            try:
                infos = await self.links_reader(names)
            except OSError as exc:
                log.error("uplink: cannot read link state from netlink: %s", exc)
                await asyncio.sleep(max(self.link_poll_s, 5.0))
                continue
            now = self.clock()
            changed = infos != self._info
            self._info = infos
            for link in self.cfg.links:
                info = infos[link.interface]
                if not info.exists and link.interface not in self._warned_missing:
                    self._warned_missing.add(link.interface)
                    log.warning(
                        "uplink: link %s: interface %s does not exist; down until it appears",
                        link.name,
                        link.interface,
                    )
                was = self.rules.links[link.name].present
                self.rules.observe_presence(link.name, info.usable, now, info.why_not)
                if info.usable and was is not True:
                    self._kick[link.name].set()  # probe it now
            if changed:
                await self._evaluate()
            elif self.rules.active and now - last_reconcile >= self.reconcile_s:
                last_reconcile = now  # DHCP may have replaced the route: re-apply
                await self._apply(self.cfg.link(self.rules.active).interface)
            if events is None:
                await asyncio.sleep(self.link_poll_s)
                continue
            # woken by the kernel on a change; a slow read anyway, in case one was missed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.event_fallback_s):
                    await events.next()

    async def _probe_loop(self, name: str, interface: str) -> None:
        kick = self._kick[name]
        while True:
            if self.rules.links[name].present is not False:
                kick.clear()
                result = await self.prober.probe(interface)
                self._probes[name] = result
                self.rules.observe_probe(name, result.ok, self.clock(), result.detail)
                await self._evaluate()
                # a fixed cadence: a probe that timed out does not stretch the interval
                delay = max(0.0, self.rules.probe_delay(name) - result.elapsed_s)
            else:
                delay = 3600.0  # absent: wait for netlink to say it is back
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await kick.wait()

    async def _ticker(self) -> None:
        while True:
            self._tick.clear()
            wait = seconds_until(self.clock(), self.rules.next_move_back_at())
            if self.rules.waiting_for_call:
                wait = min(wait, 0.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, 60.0) + 0.01):
                    await self._tick.wait()
            await self._evaluate()

    async def _evaluate(self) -> None:
        async with self._lock:
            session = self.session
            in_flight = session.call_in_flight() if session is not None else False
            waiting = self.rules.waiting_for_call
            decision = self.rules.decide(self.clock(), call_in_flight=in_flight)
            if decision is not None:
                await self._switch(decision)
            if self.rules.waiting_for_call != waiting:
                self._tick.set()
        self._changed()

    async def _switch(self, decision: Switch) -> None:
        self.last_switch = _SwitchRecord(
            self.wall(), decision.from_, decision.to, decision.reason, decision.forced
        )
        log.warning(
            "uplink: switched %s -> %s: %s",
            decision.from_ or "(none)",
            decision.to,
            decision.reason,
        )
        await self._apply(self.cfg.link(decision.to).interface)
        self._tick.set()
        if self.session is not None and decision.from_ is not None:
            self.session.reconnect(f"uplink switched to {decision.to}: {decision.reason}")
        elif self.session is not None:
            self.session.route_chosen()

    async def _apply(self, interface: str) -> None:
        try:
            await self.backend.apply(interface)
        except BackendError as exc:
            if str(exc) != self.backend_error:
                log.error("uplink: %s", exc)
            self.backend_error = str(exc)
        else:
            if self.backend_error is not None:
                log.info("uplink: %s back-end works again", self.backend.name)
            self.backend_error = None

    async def _modem_loop(self) -> None:
        while True:
            await self._query_modem(identity=self.modem is None or not self.modem.iccid)
            self._changed()
            await asyncio.sleep(self.modem_poll_s)

    async def _query_modem(self, identity: bool) -> None:
        link = self._modem_link
        assert link is not None
        if self._at is None:
            self._at = AtModem(link.at_port, link.at_baudrate)
        try:
            async with self._modem_lock:
                info = await asyncio.to_thread(self._at.query, identity)
        except ModemError as exc:
            if str(exc) != self.modem_error:
                log.warning("uplink: %s", exc)
            self.modem_error = str(exc)
            return
        if not identity and self.modem is not None:
            info = ModemInfo(
                info.rssi_dbm,
                info.csq,
                info.registration,
                info.operator,
                self.modem.iccid,
                self.modem.imsi,
            )
        if self.modem is not None and self.modem.registered and not info.registered:
            log.warning("uplink: modem lost its registration (%s)", info.registration)
        self.modem = info
        self.modem_error = None
