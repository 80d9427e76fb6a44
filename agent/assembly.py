"""Assembly: the charge point and the feature profiles, wired through their ports.

:func:`assemble` is what ``agent.app`` (and a test that needs the charge point without
sockets) calls: it builds the :class:`~agent.chargepoint.station.Station` and one service
per feature profile, and gives each what it may use. A new feature is built here.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.chargepoint.model import Clock, ConnectorHardware
from agent.chargepoint.station import Station
from agent.config import Config
from agent.core.config_keys import ConfigKeys
from agent.core.security import EventType
from agent.features.core.service import Core
from agent.features.firmware.lazy import FirmwareFeature
from agent.features.firmware.port import FirmwarePort
from agent.features.local_auth_list.authorizer import Authorizer
from agent.features.remote_trigger.service import RemoteTrigger
from agent.features.reservation.service import Reservations
from agent.features.security.port import SecurityPort
from agent.features.security.service import SecurityService
from agent.features.security.service import build as build_security
from agent.features.smart_charging.profiles import ChargingProfiles
from agent.features.smart_charging.service import SmartCharging
from agent.outbox import Outgoing
from agent.store import Store

if TYPE_CHECKING:
    from agent.features.firmware.service import FirmwareService

#: How often the charge-point certificate's expiry is checked besides each connection.
RENEWAL_CHECK_S = 86400


@dataclass(slots=True)
class Features:
    """One service per OCPP feature profile."""

    core: Core
    smart_charging: SmartCharging
    local_auth_list: Authorizer
    reservation: Reservations
    remote_trigger: RemoteTrigger
    firmware: FirmwareFeature
    security: SecurityService
    #: Runs a feature's follow-up work in the background (the charge point's tasks).
    spawn: Callable[[Coroutine[Any, Any, Any], str], object]


@dataclass(slots=True)
class ChargePoint:
    """The charge point and its features, as the adapter, the session and the control
    socket use them."""

    station: Station
    features: Features

    async def start(self) -> None:
        """Load the profiles, start the hardware, reload the reservations, carry on with a
        firmware update or a diagnostics upload that was under way."""
        self.features.smart_charging.profiles.load()
        await self.station.start(before_first_status=self.features.reservation.load)
        self.features.firmware.start()
        self.features.security.started()
        self.station.spawn(self._renewal_checks(), "certificate-renewal")

    async def _renewal_checks(self) -> None:
        """Daily: a charge-point certificate near its expiry asks for a new one (also
        checked at every connection)."""
        while True:
            await asyncio.sleep(RENEWAL_CHECK_S)
            await self.features.security.check_renewal()

    def boot_accepted(self) -> None:
        """The CSMS accepted our BootNotification: the firmware's health proof; the
        security events kept meanwhile go out, the certificate's expiry is checked."""
        self.features.firmware.on_boot_accepted()
        self.station.spawn(self.features.security.on_connected(), "security-connected")
        # Start-up is over (the config, the schemas, the TLS handshake): collect the cycles
        # it left now, not at some later full collection, so that their room is reused
        # (about 0.1 MiB less resident memory while charging).
        gc.collect()

    async def close(self) -> None:
        await self.features.firmware.stop()
        self.features.reservation.close()
        await self.station.close()


def assemble(
    *,
    cfg: Config,
    store: Store,
    keys: ConfigKeys,
    clock: Clock,
    hardware: list[ConnectorHardware],
    request_restart: Callable[[str], None],
) -> ChargePoint:
    connector_ids = list(range(1, len(hardware) + 1))
    profiles = ChargingProfiles(
        store=store,
        keys=keys,
        connector_ids=connector_ids,
        max_current_a=float(cfg.hardware["max_current_a"]),
        voltage_v=float(cfg.hardware["nominal_voltage_v"]),
        phases=int(cfg.hardware["phases"]),
    )
    authorizer = Authorizer(store=store, keys=keys, now=clock.now)
    station = Station(
        cfg=cfg,
        store=store,
        keys=keys,
        clock=clock,
        hardware=hardware,
        request_restart=request_restart,
        limits=profiles,
        tags=authorizer,
    )
    reservations = Reservations(port=station, store=store, keys=keys, tags=authorizer)
    station.guard = reservations
    smart = SmartCharging(port=station, profiles=profiles)
    core = Core(
        port=station,
        cfg=cfg,
        keys=keys,
        tags=authorizer,
        reservations=reservations,
        remote_problem=smart.remote_problem,
        queue_empty=lambda: store.queue_head() is None,
    )
    trigger = RemoteTrigger(port=station)
    security_port = SecurityPort(station, store)
    security = build_security(cfg, keys=keys, port=security_port)
    security.events.send_now = security_port.send_now
    firmware_port = FirmwarePort(station)
    firmware_port.on_status = lambda status: (
        security.raise_event(EventType.FIRMWARE_UPDATED, f"evcp {__version__} installed")
        if status == "Installed"
        else None
    )
    firmware_port.verify = security.verify_firmware
    firmware_port.security_log = security.write_security_log

    def firmware_service() -> FirmwareService:
        from agent.features.firmware.service import FirmwareService, Settings

        return FirmwareService(firmware_port, Settings.from_config(cfg))

    firmware = FirmwareFeature(firmware_port, cfg.firmware_dir, firmware_service)
    for message, status in (
        ("FirmwareStatusNotification", firmware.firmware_status),
        ("DiagnosticsStatusNotification", firmware.diagnostics_status),
    ):
        trigger.register(message, _status_sender(station, message, status))
    features = Features(
        core=core,
        smart_charging=smart,
        local_auth_list=authorizer,
        reservation=reservations,
        remote_trigger=trigger,
        firmware=firmware,
        security=security,
        spawn=station.spawn,
    )
    return ChargePoint(station, features)


def _status_sender(
    station: Station, action: str, status: Callable[[], str]
) -> Callable[[int | None], None]:
    """A TriggerMessage sender: the feature's current status, as a volatile message."""

    def send(_connector_id: int | None) -> None:
        station.outbox.send(Outgoing(action, {"status": status()}))

    return send
