"""A small CSMS built with the ``ocpp`` library, for the demo and the end-to-end tests.

It serves WSS on 127.0.0.1 with a throw-away CA (made with ``trustme`` by the caller),
checks HTTP Basic Auth (user = the charge point id in the path, as OCPP requires), and
records every message a charge point sends. The library validates each incoming CALL and
each CALLRESULT against the OCPP 1.6 JSON schemas; a message that fails is answered with a
CALLERROR, and every CALLERROR this CSMS sends is recorded in :attr:`Csms.errors`, so a test
can assert that the agent never sent an invalid message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from ocpp.charge_point import snake_to_camel_case
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("evcp.csms")
_LIB_LOG = logging.getLogger("evcp.csms.lib")
_LIB_LOG.setLevel(logging.CRITICAL)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Received:
    charge_point_id: str
    action: str
    payload: dict[str, Any]


class _CsmsChargePoint(ChargePoint):
    def __init__(self, cp_id: str, ws: ServerConnection, csms: Csms) -> None:
        super().__init__(cp_id, ws, response_timeout=csms.response_timeout, logger=_LIB_LOG)
        self.csms = csms

    async def route_message(self, raw_msg: str) -> None:
        try:
            frame = json.loads(raw_msg)
        except ValueError:
            frame = None
        if isinstance(frame, list) and len(frame) == 4 and frame[0] == 2:
            self.csms._record(self.id, frame[2], frame[3])
        await super().route_message(raw_msg)

    async def _send(self, message: str) -> None:
        if message.startswith("[4,"):
            self.csms.errors.append(message)
            log.warning("CSMS answered with a CALLERROR: %s", message)
        await self._connection.send(message)

    @on(Action.boot_notification)
    def on_boot(self, **_: Any) -> Any:
        status, interval = self.csms.boot_response
        return call_result.BootNotification(current_time=_now(), interval=interval, status=status)

    @on(Action.heartbeat)
    def on_heartbeat(self, **_: Any) -> Any:
        return call_result.Heartbeat(current_time=_now())

    @on(Action.authorize)
    def on_authorize(self, id_tag: str, **_: Any) -> Any:
        return call_result.Authorize(id_tag_info=self.csms.tag_info(id_tag))

    @on(Action.start_transaction)
    def on_start(self, id_tag: str, **_: Any) -> Any:
        return call_result.StartTransaction(
            transaction_id=next(self.csms.tx_ids),
            id_tag_info=self.csms.tag_info(id_tag),
        )

    @on(Action.stop_transaction)
    def on_stop(self, **_: Any) -> Any:
        return call_result.StopTransaction(id_tag_info={"status": "Accepted"})

    @on(Action.meter_values)
    def on_meter_values(self, **_: Any) -> Any:
        return call_result.MeterValues()

    @on(Action.status_notification)
    def on_status(self, **_: Any) -> Any:
        return call_result.StatusNotification()

    @on(Action.data_transfer)
    def on_data_transfer(self, **_: Any) -> Any:
        return call_result.DataTransfer(status="Accepted")

    @on(Action.diagnostics_status_notification)
    def on_diagnostics_status(self, **_: Any) -> Any:
        return call_result.DiagnosticsStatusNotification()

    @on(Action.firmware_status_notification)
    def on_firmware_status(self, **_: Any) -> Any:
        return call_result.FirmwareStatusNotification()

    # --- the OCPP 1.6 security extensions
    @on(Action.security_event_notification)
    def on_security_event(self, **_: Any) -> Any:
        return call_result.SecurityEventNotification()

    @on(Action.sign_certificate)
    def on_sign_certificate(self, csr: str, **_: Any) -> Any:
        self.csms.csrs.append(csr)
        return call_result.SignCertificate(status="Accepted" if self.csms.sign_csr else "Rejected")

    @on(Action.log_status_notification)
    def on_log_status(self, **_: Any) -> Any:
        return call_result.LogStatusNotification()

    @on(Action.signed_firmware_status_notification)
    def on_signed_firmware_status(self, **_: Any) -> Any:
        return call_result.SignedFirmwareStatusNotification()


def _client_cn(connection: ServerConnection) -> str | None:
    """The CN of the client certificate the TLS layer verified, if one was sent."""
    peer = connection.transport.get_extra_info("peercert") or {}
    subject = dict(item[0] for item in peer.get("subject", ()))
    cn = subject.get("commonName")
    return str(cn) if cn else None


@dataclass
class Csms:
    """A test and demo CSMS. ``async with Csms(...).running(ssl_context)`` starts it."""

    passwords: dict[str, str]
    boot_response: tuple[str, int] = ("Accepted", 300)
    accepted_tags: set[str] | None = None  # None: every tag is accepted
    parents: dict[str, str] = field(default_factory=dict)  # idTag -> parentIdTag
    response_timeout: float = 10.0
    received: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    auth_failures: int = 0
    connections: int = 0
    tx_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1001))
    port: int = 0
    #: SignCertificate: the CSRs received, and whether to accept them.
    csrs: list[str] = field(default_factory=list)
    sign_csr: bool = True
    #: Per accepted connection: the client certificate's CN (security profile 3), or None.
    client_cns: list[str | None] = field(default_factory=list)
    #: Per accepted connection: the charge point's address as this CSMS sees it.
    peers: list[str] = field(default_factory=list)
    #: Called with every message a charge point sends (the demo prints a timeline).
    listener: Callable[[Received], None] | None = None
    _server: Server | None = None
    _cps: dict[str, _CsmsChargePoint] = field(default_factory=dict)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def tag_status(self, id_tag: str) -> str:
        if self.accepted_tags is None or id_tag in self.accepted_tags:
            return "Accepted"
        return "Invalid"

    def tag_info(self, id_tag: str) -> dict[str, Any]:
        """The idTagInfo answered for ``id_tag``: its status and, from ``parents``, its
        group (parentIdTag)."""
        info: dict[str, Any] = {"status": self.tag_status(id_tag)}
        if id_tag in self.parents:
            info["parentIdTag"] = self.parents[id_tag]
        return info

    def _record(self, cp_id: str, action: str, payload: dict[str, Any]) -> None:
        item = Received(cp_id, action, payload)
        self.received.append(item)
        if self.listener is not None:
            self.listener(item)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ------------------------------------------------------------------ server
    def _check_auth(self, connection: ServerConnection, request: Request) -> Response | None:
        cp_id = request.path.strip("/").split("/")[-1]
        if _client_cn(connection) == cp_id:
            return None  # security profile 3: a client certificate the TLS layer verified
        header = request.headers.get("Authorization", "")
        ok = False
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                ok = user == cp_id and self.passwords.get(cp_id) == password
            except (binascii.Error, UnicodeDecodeError):
                ok = False
        if not ok:
            self.auth_failures += 1
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad credentials\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        cp_id = ws.request.path.strip("/").split("/")[-1] if ws.request else "?"
        if ws.subprotocol != "ocpp1.6":
            await ws.close(1002, "subprotocol ocpp1.6 required")
            return
        cp = _CsmsChargePoint(cp_id, ws, self)
        self.client_cns.append(_client_cn(ws))
        self.peers.append(str(ws.remote_address[0]) if ws.remote_address else "?")
        self._cps[cp_id] = cp
        self.connections += 1
        await self._notify()
        try:
            await cp.start()
        except ConnectionClosed:
            pass
        finally:
            if self._cps.get(cp_id) is cp:
                del self._cps[cp_id]
            await self._notify()

    async def start(self, ssl_context: ssl.SSLContext, *, host: str = "127.0.0.1",
                    port: int = 0, sock: socket.socket | None = None) -> None:  # fmt: skip
        """Listen on ``host:port``, or on ``sock``, a listening socket made elsewhere (the
        uplink tests make one inside a network namespace)."""
        self._server = await serve(
            self._handler,
            None if sock is not None else host,
            None if sock is not None else port,
            sock=sock,
            ssl=ssl_context,
            subprotocols=["ocpp1.6"],  # type: ignore[list-item]
            process_request=self._check_auth,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def connected(self, cp_id: str) -> bool:
        return cp_id in self._cps

    async def disconnect(self, cp_id: str) -> None:
        """Drop the charge point's connection (it will reconnect)."""
        cp = self._cps.get(cp_id)
        if cp is not None:
            await cp._connection.close()

    # ------------------------------------------------------------------ test helpers
    async def call(self, cp_id: str, payload: Any, *, timeout_s: float = 10.0) -> dict[str, Any]:
        """Send a CALL to the charge point; return its result as a camelCase dict."""
        await self.wait_connected(cp_id, timeout_s=timeout_s)
        result = await self._cps[cp_id].call(payload, suppress=False)
        converted: dict[str, Any] = snake_to_camel_case(
            {k: v for k, v in vars(result).items() if v is not None}
        )
        return converted

    async def call_raw(self, cp_id: str, frame: str) -> None:
        """Send any text frame (well-formed or not) to the charge point."""
        await self.wait_connected(cp_id)
        await self._cps[cp_id]._connection.send(frame)

    async def wait_connected(self, cp_id: str, *, timeout_s: float = 10.0) -> None:
        await self.wait_for(lambda: cp_id in self._cps, timeout_s=timeout_s)

    async def wait_for(self, predicate: Any, *, timeout_s: float = 10.0) -> None:
        """Wait until ``predicate()`` is true (re-checked on every received message)."""

        async def until() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(until(), timeout_s)

    async def wait_message(self, action: str, match: Any = None, *, after: int = 0,
                           timeout_s: float = 10.0) -> Received:  # fmt: skip
        """Wait for a message ``action`` (received at index >= ``after``) matching ``match``."""
        found: list[Received] = []

        def check() -> bool:
            for item in self.received[after:]:
                if item.action == action and (match is None or match(item.payload)):
                    found.append(item)
                    return True
            return False

        await self.wait_for(check, timeout_s=timeout_s)
        return found[0]

    def messages(self, action: str) -> list[dict[str, Any]]:
        return [r.payload for r in self.received if r.action == action]


__all__ = ["Csms", "Received", "call"]
