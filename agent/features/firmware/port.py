"""The firmware service's port onto the charge point and the session, built from the
charge point's :class:`~agent.chargepoint.port.ChargePointPort`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.chargepoint.port import ChargePointPort
from agent.outbox import NotConnected


class FirmwarePort:
    """:class:`agent.features.firmware.service.ChargePointPort` for the running agent.

    Statuses go as volatile messages (sent once the BootNotification is Accepted; one
    that finds the connection down is logged by the service and not repeated: the
    CSMS asks with TriggerMessage)."""

    def __init__(self, port: ChargePointPort) -> None:
        self.port = port
        #: The status for a diagnostics bundle: set by the composition root (``agent.app``).
        self.summary: Callable[[], dict[str, Any]] = dict
        #: Told every firmware status (the security log records an installed update).
        self.on_status: Callable[[str], None] = lambda status: None

    async def send_firmware_status(self, status: str) -> None:
        self.on_status(status)
        await self._send("FirmwareStatusNotification", status)

    async def send_diagnostics_status(self, status: str) -> None:
        await self._send("DiagnosticsStatusNotification", status)

    async def _send(self, action: str, status: str) -> None:
        if not self.port.outbox.online:
            raise NotConnected(f"{action} {status}: not connected to the CSMS")
        await self.port.outbox.request(action, {"status": status})

    def when_idle(self, callback: Callable[[], None]) -> None:
        self.port.when_idle(callback)

    def block_charging(self, blocked: bool) -> None:
        self.port.block_charging(blocked, "a firmware update is installing")

    def firmware_version(self) -> str:
        return __version__

    def status_summary(self) -> dict[str, Any]:
        return self.summary()
