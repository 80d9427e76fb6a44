"""Firmware Management, loaded when it has work: most of a charger's life no update or
upload is under way, and the service with its state machine costs about 1.8 MiB of
resident memory (``python -X importtime``; figures in README). :class:`FirmwareFeature`
stands in for it: idle statuses and the BootNotification hook are answered without it,
and the first request (or a pending update found at start) loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.features.firmware.port import FirmwarePort

if TYPE_CHECKING:
    from agent.features.firmware.service import FirmwareService

#: Files in the spool that mean the service has something to carry on with at start (its
#: state, a hand-over to the installer, the installer's verdict).
PENDING_FILES = ("state.json", "install.request", "install.result")
IDLE = "Idle"


class FirmwareFeature:
    """The Firmware Management feature, its service loaded on first need.

    Args:
        port: the service's port onto the charge point (kept here: the composition root
            sets what a diagnostics bundle says of the agent).
        spool: the service's spool directory (``[firmware] spool_dir``).
        build: makes the service (imports it).
    """

    def __init__(
        self, port: FirmwarePort, spool: Path, build: Callable[[], FirmwareService]
    ) -> None:
        self.port = port
        self.spool = spool
        self._build = build
        self._service: FirmwareService | None = None
        self._registered = False

    @property
    def loaded(self) -> bool:
        return self._service is not None

    @property
    def service(self) -> FirmwareService:
        """The service, loaded and started now if it was not yet."""
        if self._service is None:
            service = self._build()
            service.begin()
            if self._registered:
                service.on_boot_accepted()
            self._service = service
        return self._service

    def start(self) -> None:
        """At the agent's start: load the service only if it has something to carry on."""
        if any((self.spool / name).exists() for name in PENDING_FILES):
            _ = self.service

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()

    def on_boot_accepted(self) -> None:
        self._registered = True
        if self._service is not None:
            self._service.on_boot_accepted()

    def firmware_status(self) -> str:
        return IDLE if self._service is None else self._service.firmware_status()

    def diagnostics_status(self) -> str:
        return IDLE if self._service is None else self._service.diagnostics_status()
