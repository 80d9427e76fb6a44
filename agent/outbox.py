"""What the agent has to tell the CSMS: volatile messages and the durable transaction queue.

Two sources feed the single sender (``agent.ocpp.session``), which is the only caller of
``ocpp``'s ``call()`` so that exactly one CALL is in flight, as OCPP-J requires:

- *volatile* messages (StatusNotification, Heartbeat, Authorize, triggered messages): kept
  in memory and dropped when the connection drops (the current status of every connector
  is sent again after a reconnect);
- *transaction* messages (StartTransaction, MeterValues of a transaction,
  StopTransaction): committed to SQLite (``agent.store``: the disk, or for MeterValues a
  stage in RAM) before they are first sent, removed only after their CALLRESULT, sent
  strictly in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ResultHandler = Callable[[dict[str, Any]], None]


class NotConnected(ConnectionError):
    """The message could not be sent: no (accepted) connection to the CSMS."""


@dataclass(slots=True)
class Outgoing:
    action: str
    payload: dict[str, Any]
    #: Called with the camelCase CALLRESULT payload.
    on_result: ResultHandler | None = None
    #: Resolved with the CALLRESULT payload, or failed with the error.
    future: asyncio.Future[dict[str, Any]] | None = None
    #: Allowed before the BootNotification is accepted (only BootNotification itself).
    before_boot: bool = False
    #: Sent only once the durable queue has nothing waiting (a triggered MeterValues of a
    #: running transaction must not overtake that transaction's queued samples).
    after_queue: bool = False


@dataclass(slots=True)
class Outbox:
    volatile: deque[Outgoing] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    online: bool = False

    def send(self, message: Outgoing) -> None:
        """Queue a volatile message; dropped at once when offline."""
        if not self.online:
            self._fail(message, NotConnected("not connected to the CSMS"))
            return
        self.volatile.append(message)
        self.wake.set()

    async def request(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send a volatile CALL and wait for its result. Raises NotConnected or OCPPError."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.send(Outgoing(action, payload, future=future))
        return await future

    def notify_durable(self) -> None:
        """Wake the sender: a transaction message was committed to the store."""
        self.wake.set()

    def go_offline(self) -> None:
        """Drop every volatile message (their futures fail with NotConnected)."""
        self.online = False
        self.drop_volatile("connection to the CSMS lost")

    def drop_volatile(self, why: str) -> None:
        """Drop every volatile message now (their futures fail with NotConnected)."""
        while self.volatile:
            self._fail(self.volatile.popleft(), NotConnected(why))

    @staticmethod
    def _fail(message: Outgoing, exc: Exception) -> None:
        if message.future is not None and not message.future.done():
            message.future.set_exception(exc)
