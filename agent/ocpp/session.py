"""The life of the CSMS connection: connect, boot, send, heartbeat, reconnect.

:class:`Session` runs forever. Each connection runs two tasks side by side: the
adapter's receive loop and :meth:`Session._sender`, the only caller of ``call()``. When the
socket closes, the sender is cancelled at once (a pending CALL does not wait for
its timeout), volatile messages are dropped, and the loop reconnects after a back-off
delay. Every connect failure (401, TLS, network) is logged in one clear line and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed

from agent.aio import raise_if_cancelling
from agent.assembly import ChargePoint
from agent.config import Config
from agent.features.security.port import SecurityPort
from agent.ocpp.adapter import OcppAdapter
from agent.ocpp.security_connect import ConnectSettings, NoCertificateError, connect_settings
from agent.ocpp.sender import Sender
from agent.ocpp.transport import (
    backoff,
    classify,
    max_frame_bytes,
    open_connection,
    security_event,
)

log = logging.getLogger("evcp.session")

#: A connection that stayed up this long resets the reconnect back-off; one that the CSMS
#: (or a load balancer) closes sooner does not, so the delays keep growing.
STABLE_CONNECTION_S = 30.0

#: An uplink switch closes the connection at once; a CALL already awaiting its answer gets
#: this long first (over a link that still works, the answer is on its way; over a dead
#: one it never comes). The supervisor never *starts* a move back while a CALL waits.
UPLINK_ANSWER_WAIT_S = 1.0

#: The first choice of a link gives up a connect attempt made before it once the attempt
#: is this old (see :meth:`Session.route_chosen`).
ROUTE_CHOSEN_GRACE_S = 3.0


class LinkChoice(Protocol):
    """What the session asks the uplink supervisor (``agent.uplink``), when there is one."""

    def ping_interval_s(self, default: float | None) -> float | None: ...


class _Reconnect(Exception):
    """Raised inside a connection's tasks to close it and connect again."""


class Session:
    """The connection loop; the handlers' :class:`~agent.ocpp.handlers.ConnectionControl`."""

    def __init__(self, *, cfg: Config, charger: ChargePoint, password: str) -> None:
        self.cfg = cfg
        self.charger = charger
        self.station = charger.station
        self.keys = charger.station.keys
        self.password = password
        self._reconnect = asyncio.Event()
        self._reconnect_reason = ""
        self.security = charger.features.security
        #: A profile being tried (a SecurityProfile change, a new certificate) and the
        #: future its first connect attempt resolves: True connected, False failed.
        self._trial: tuple[int, asyncio.Future[bool]] | None = None
        self._no_certificate_logged = False
        #: The uplink supervisor (``[uplink]``), set by the app; None: the OS's route.
        self.uplink: LinkChoice | None = None
        self._adapter: OcppAdapter | None = None
        #: An uplink switch: abort the transport (no close handshake) and reconnect at once.
        self._switching = False
        self._link_changed = asyncio.Event()
        self._attempts = 0
        self._attempt_started = 0.0
        port = self.security.port
        if isinstance(port, SecurityPort):
            port.reconnect_with = self.reconnect_with
        self.sender = Sender(
            station=self.station,
            boot_payload=charger.features.core.boot_payload,
            tags=charger.features.local_auth_list,
            closing=self._reconnect,
            boot_accepted=charger.boot_accepted,
        )
        self.station.request_boot = self.sender.boot_now
        self.station.send_queue_now = self.sender.send_queue_now

    @property
    def registration(self) -> str | None:
        """The last BootNotification status."""
        return self.sender.registration

    # ------------------------------------------------------------------ control
    def wake(self) -> None:
        self.station.outbox.wake.set()

    def apply_change(self, key: str, value: str) -> None:
        """An accepted change of configuration key ``key`` (ChangeConfiguration, or
        ``evcp config set``) that concerns the connection takes effect."""
        if key == "AuthorizationKey" and self.key_changed(value):
            log.warning("new AuthorizationKey set: reconnecting with it")
        elif key == "WebSocketPingInterval":
            self.request_reconnect("WebSocketPingInterval changed")
        elif key == "HeartbeatInterval":
            self.sender.heartbeat_interval_changed()

    async def reconnect_with(self, profile: int) -> bool:
        """Reconnect with security profile ``profile``: True once connected, False when
        that attempt fails (the security service falls back then)."""
        if self._trial is not None and not self._trial[1].done():
            self._trial[1].set_result(False)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._trial = (profile, future)
        self.request_reconnect(f"security profile {profile}")
        try:
            return await future
        finally:
            if self._trial is not None and self._trial[1] is future:
                self._trial = None

    # ------------------------------------------------------------------ uplink (SessionPort)
    def reconnect(self, reason: str) -> None:
        """The uplink supervisor moved the default route: drop this connection without a
        closing handshake (the old link may be dead) and connect again over the new one at
        once, without the back-off delay. The durable queue resends what was not
        acknowledged."""
        self._switching = True
        self._link_changed.set()
        self.request_reconnect(reason)

    def route_chosen(self) -> None:
        """The supervisor's first choice of a link: if not connected yet, end a back-off
        pause, and give up an attempt over the route the OS picked before once it has
        taken ROUTE_CHOSEN_GRACE_S (over a dead link it would hang until its timeout; a
        working one is connected by then)."""
        if self._adapter is not None:
            return
        loop = asyncio.get_running_loop()
        attempt = self._attempts
        delay = max(0.0, self._attempt_started + ROUTE_CHOSEN_GRACE_S - loop.time())

        def nudge() -> None:
            if self._adapter is None and self._attempts == attempt:
                self._link_changed.set()

        loop.call_later(delay, nudge)

    def call_in_flight(self) -> bool:
        """True while a CALL we sent awaits its answer (or we are answering the CSMS's)."""
        adapter = self._adapter
        return adapter is not None and (not adapter.idle.is_set() or adapter.answering)

    def ping_interval_s(self) -> float:
        """The WebSocket ping interval for the next connection: WebSocketPingInterval, or
        ``[uplink] gsm_ping_interval_s`` while on a gsm link (0: no pings)."""
        default = float(self.keys.get_int("WebSocketPingInterval"))
        if self.uplink is None:
            return default
        return self.uplink.ping_interval_s(default) or 0.0

    def ssl_context(self) -> Any:
        """The TLS settings the next connection would use (the uplink probes use them)."""
        return self._settings().ssl_context

    async def _pause(self, delay: float) -> None:
        """The back-off delay before the next attempt; an uplink switch ends it at once."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._link_changed.wait()

    def _settings(self) -> ConnectSettings:
        """How to connect now: the profile being tried, else SecurityProfile; a profile 3
        without a certificate falls back to 2 (it must never lock the charger out)."""
        csms = self.cfg.csms
        profile = self._trial[0] if self._trial else int(self.keys.raw("SecurityProfile"))
        store = self.security.store
        try:
            return connect_settings(
                profile, store=store, ca_file=csms["ca_file"], password=self.password
            )
        except NoCertificateError as exc:
            if not self._no_certificate_logged:
                log.error("%s: connecting with security profile 2 instead", exc)
                self._no_certificate_logged = True
            return connect_settings(2, store=store, ca_file=csms["ca_file"], password=self.password)

    def _trial_over(self, connected: bool) -> None:
        if self._trial is not None and not self._trial[1].done():
            self._trial[1].set_result(connected)

    def request_reconnect(self, reason: str) -> None:
        self._reconnect_reason = reason
        self._reconnect.set()

    def key_changed(self, value: str) -> bool:
        """A new AuthorizationKey was accepted: persist it and reconnect with it."""
        if value == self.password:
            return False
        self.password = value
        self.station.store.put("csms.password", value)
        from agent.logs import set_authorization_key

        set_authorization_key(value)
        self.request_reconnect("new AuthorizationKey")
        return True

    # ------------------------------------------------------------------ connection loop
    async def run(self) -> None:
        csms = self.cfg.csms
        delays = backoff(initial_s=csms["reconnect_min_s"], maximum_s=csms["reconnect_max_s"])
        while True:
            settings = self._settings()
            self._link_changed.clear()
            self._attempts += 1
            self._attempt_started = asyncio.get_running_loop().time()
            try:
                ws = await self._open_unless_switched(
                    open_connection(
                        url=csms["url"],
                        charge_point_id=csms["charge_point_id"],
                        password=settings.password,
                        ssl_context=settings.ssl_context,
                        ping_interval_s=self.ping_interval_s(),
                        proxy=csms["proxy"],
                        max_size=max_frame_bytes(self.keys.get_int("SendLocalListMaxLength")),
                    )
                )
                if ws is None:
                    log.info("uplink switched while connecting: connecting over the new link")
                    self._switching = False
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise_if_cancelling()  # a cancellation turned into an error by a library
                failure = classify(exc)
                self.security.connect_failed(
                    security_event(exc, client_cert=settings.client_certificate), failure.detail
                )
                self._trial_over(False)
                delay = next(delays)
                self.station.last_connect_error = f"{failure.kind}: {failure.detail}"
                log.warning(
                    "cannot connect to the CSMS (%s: %s); retrying in %.1f s",
                    failure.kind,
                    failure.detail,
                    delay,
                )
                await self._pause(delay)
                continue
            log.info("connected to %s as %s", csms["url"], csms["charge_point_id"])
            self._trial_over(True)
            self.station.last_connect_error = None
            loop = asyncio.get_running_loop()
            opened = loop.time()
            await self._serve(ws)
            if loop.time() - opened >= STABLE_CONNECTION_S or self._switching:
                delays = backoff(
                    initial_s=csms["reconnect_min_s"], maximum_s=csms["reconnect_max_s"]
                )
            if self._switching:
                self._switching = False
                log.info("reconnecting at once over the new uplink")
                continue
            delay = next(delays)
            log.info("reconnecting in %.1f s", delay)
            await self._pause(delay)

    async def _open_unless_switched(self, opening: Awaitable[Any]) -> Any:
        """The connection ``opening`` makes, or None when the uplink switched meanwhile (an
        attempt over a dead link would only end at its open timeout)."""
        attempt = asyncio.ensure_future(opening)
        if self.uplink is None:
            return await attempt
        changed = asyncio.ensure_future(self._link_changed.wait())
        try:
            await asyncio.wait({attempt, changed}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            attempt.cancel()
            raise
        finally:
            changed.cancel()
        if attempt.done():
            return attempt.result()
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await attempt
        raise_if_cancelling()
        return None

    async def _serve(self, ws: Any) -> None:
        station = self.station
        adapter = OcppAdapter(
            self.cfg.csms["charge_point_id"],
            ws,
            features=self.charger.features,
            keys=self.keys,
            control=self,
            response_timeout=float(self.cfg.csms["response_timeout_s"]),
        )
        if not self._link_changed.is_set():  # else: opened just as the uplink switched
            self._reconnect.clear()
            self._switching = False
        self._adapter = adapter
        self.sender.connected()
        station.connected = True
        station.outbox.online = True
        if self.registration == "Accepted":
            station.send_all_statuses()
        # Not a TaskGroup: on Python 3.11, when the agent is stopped (this task cancelled)
        # just as the socket closes, a TaskGroup raises the children's ConnectionClosed
        # instead of CancelledError, the cancellation is lost and the agent never stops;
        # and a child failing while the group waits leaves this task marked "cancelling".
        tasks = [
            asyncio.create_task(adapter.start(), name="receive"),
            asyncio.create_task(self.sender.run(adapter), name="sender"),
            asyncio.create_task(self._watch_reconnect(adapter), name="reconnect"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._adapter = None
            station.connected = False
            station.outbox.go_offline()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            if self._switching:  # the old link may be dead: no closing handshake
                ws.transport.abort()
            await ws.close()
        # Retrieve every outcome (no "exception never retrieved"); act on the first one.
        outcomes = [None if task.cancelled() else task.exception() for task in tasks]
        first = next(i for i, task in enumerate(tasks) if task in done)
        exc = outcomes[first]
        if isinstance(exc, ConnectionClosed):
            log.warning("connection to the CSMS closed: %s", exc)
            in_flight = self.sender.in_flight
            if exc.rcvd is not None and exc.rcvd.code == 1009 and in_flight is not None:
                # "Message too big" while a queued message waited for its answer: the CSMS
                # refuses that message. Counted as a failed try, or the queue would send it
                # after every reconnect forever.
                self.sender.queued_failed(in_flight, exc)
        elif isinstance(exc, _Reconnect):
            log.info("reconnecting: %s", self._reconnect_reason)
        elif exc is not None:
            # A bug, or input nothing above foresaw: this connection ends, the agent (and
            # the charging) carries on, and the back-off keeps a repeat from looping fast.
            log.error("%s task failed: %s: %s; reconnecting", tasks[first].get_name(),
                      type(exc).__name__, exc, exc_info=exc)  # fmt: skip
        else:
            log.warning("connection to the CSMS ended (%s stopped)", tasks[first].get_name())

    async def _watch_reconnect(self, cp: OcppAdapter) -> None:
        """Close the connection when the agent wants a new one (a new AuthorizationKey or
        WebSocketPingInterval) -- but first let a CALL in flight get its answer (for at most
        the response timeout): cutting off a StartTransaction would send it twice."""
        await self._reconnect.wait()
        if self._switching:
            if not cp.idle.is_set() or cp.answering:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(UPLINK_ANSWER_WAIT_S):
                        while not cp.idle.is_set() or cp.answering:
                            await asyncio.sleep(0.02)
            raise _Reconnect
        if not cp.idle.is_set() or cp.answering:
            log.info("reconnecting once the messages in flight are answered")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(self.cfg.csms["response_timeout_s"])):
                    while not cp.idle.is_set() or cp.answering:
                        await asyncio.sleep(0.05)
        raise _Reconnect
