"""The firmware service's port onto the charge point and the session, built from the
charge point's :class:`~agent.chargepoint.port.ChargePointPort`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.outbox import NotConnected

if TYPE_CHECKING:  # (annotations only)
    from agent.chargepoint.port import ChargePointPort


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
        #: The security service's signature check and security log: set by the assembly.
        self.verify: Callable[[Path, str, str], Awaitable[str]] | None = None
        self.security_log: Callable[[Path, float | None, float | None], None] | None = None

    async def send_firmware_status(self, status: str, request_id: int | None = None) -> None:
        self.on_status(status)
        if request_id is None:
            await self._send("FirmwareStatusNotification", {"status": status})
        else:
            payload = {"status": status, "requestId": request_id}
            await self._send("SignedFirmwareStatusNotification", payload)

    async def send_diagnostics_status(self, status: str) -> None:
        await self._send("DiagnosticsStatusNotification", {"status": status})

    async def send_log_status(self, status: str, request_id: int | None) -> None:
        payload: dict[str, Any] = {"status": status}
        if request_id is not None:
            payload["requestId"] = request_id
        await self._send("LogStatusNotification", payload)

    async def _send(self, action: str, payload: dict[str, Any]) -> None:
        if not self.port.outbox.online:
            raise NotConnected(f"{action} {payload['status']}: not connected to the CSMS")
        await self.port.outbox.request(action, payload)

    async def verify_firmware(self, path: Path, signature: str, signing_certificate: str) -> str:
        if self.verify is None:  # no security feature: nothing signed can be verified
            return "InvalidCertificate"
        return await self.verify(path, signature, signing_certificate)

    def write_security_log(self, target: Path, oldest: float | None, latest: float | None) -> None:
        if self.security_log is None:
            raise OSError("no security log on this charger")
        self.security_log(target, oldest, latest)

    def when_idle(self, callback: Callable[[], None]) -> None:
        self.port.when_idle(callback)

    def block_charging(self, blocked: bool) -> None:
        self.port.block_charging(blocked, "a firmware update is installing")

    def firmware_version(self) -> str:
        return __version__

    def status_summary(self) -> dict[str, Any]:
        return self.summary()
