"""The security service's port onto the charge point and the session
(:class:`agent.features.security.service.SessionPort`), for the running agent."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.outbox import Outgoing
from agent.store import Store

if TYPE_CHECKING:  # (annotations only)
    from agent.chargepoint.port import ChargePointPort


async def _no_session(profile: int) -> bool:
    return False


class SecurityPort:
    """CALLs go through the single sender (volatile), critical notifications through
    the durable queue, and a reconnect with another profile through the session, which
    sets :attr:`reconnect_with` once it exists."""

    def __init__(self, port: ChargePointPort, store: Store) -> None:
        self.port = port
        self.store = store
        #: ``(profile) -> connected``: set by the session.
        self.reconnect_with: Callable[[int], Awaitable[bool]] = _no_session

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.port.outbox.request(action, payload)

    def enqueue_durable(self, action: str, payload: dict[str, Any]) -> None:
        self.store.enqueue(action, payload, None)
        self.port.outbox.notify_durable()

    def send_now(self, payload: dict[str, Any]) -> bool:
        """A non-critical SecurityEventNotification, now if connected and registered."""
        if not (self.port.outbox.online and self.port.registered):
            return False
        self.port.outbox.send(Outgoing("SecurityEventNotification", payload))
        return True

    async def reconnect(self, profile: int) -> bool:
        return await self.reconnect_with(profile)

    def now(self) -> datetime:
        return self.port.now()
