"""The Core profile's requests from the CSMS: RemoteStart/StopTransaction,
ChangeAvailability, UnlockConnector, Reset, ClearCache, and the BootNotification payload.

Each method answers at once (the status the CSMS gets); work that takes time runs in the
background through the charge point's port, never awaiting a CALL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent import __version__
from agent.chargepoint.model import Connector
from agent.config import Config
from agent.core.config_keys import ConfigKeys
from drivers.base import DriverError

if TYPE_CHECKING:  # (annotations only)
    from agent.chargepoint.port import ChargePointPort

log = logging.getLogger("evcp.station")


class Tags(Protocol):
    """What remote start asks of the local list and cache."""

    def parent_of(self, id_tag: str) -> str | None: ...

    def pre_authorized(self, id_tag: str) -> object | None: ...

    def clear_cache(self) -> str: ...


class Reservations(Protocol):
    """What remote start asks of the reservations."""

    def reserved_for_others(self, c: Connector, id_tag: str) -> bool: ...

    def group_may_hold(self, c: Connector) -> bool: ...

    def check_start(
        self, c: Connector, id_tag: str, parent_id_tag: str | None
    ) -> tuple[bool, int | None]: ...


class Core:
    """Core requests. ``remote_problem`` says why a RemoteStartTransaction's
    chargingProfile cannot be taken (Smart Charging), None when it can."""

    def __init__(
        self,
        *,
        port: ChargePointPort,
        cfg: Config,
        keys: ConfigKeys,
        tags: Tags,
        reservations: Reservations,
        remote_problem: Callable[[int, dict[str, Any]], str | None],
        queue_empty: Callable[[], bool],
    ) -> None:
        self.port = port
        self.cfg = cfg
        self.keys = keys
        self.tags = tags
        self.reservations = reservations
        self._remote_problem = remote_problem
        self._queue_empty = queue_empty
        #: ICCID and IMSI read from the modem (``[uplink]``), for BootNotification where
        #: ``[identity] iccid``/``imsi`` are empty.
        self._modem_identity = ("", "")

    def set_modem_identity(self, iccid: str, imsi: str) -> None:
        """What the SIM says (the uplink supervisor reads it before the first boot)."""
        self._modem_identity = (iccid, imsi)

    # ------------------------------------------------------------------ transactions
    def remote_start(
        self, id_tag: str, connector_id: int | None, profile: dict[str, Any] | None
    ) -> str:
        port = self.port
        if connector_id is not None and connector_id not in port.connectors:
            return "Rejected"
        c = port.pick_connector(connector_id, id_tag)
        if c is None or not c.can_start:
            return "Rejected"
        learn_parent = False
        if self.reservations.reserved_for_others(c, id_tag):
            # A reservation for a group (parentIdTag) whose idTag's parent is not known
            # here: the CSMS is asked (Authorize.req, OCPP 1.6 5.13) before deciding.
            learn_parent = (
                port.registered
                and port.outbox.online
                and self.reservations.group_may_hold(c)
                and self.tags.parent_of(id_tag) is None
                and self.tags.pre_authorized(id_tag) is None  # else nobody would be asked
            )
            if not learn_parent:
                log.info("RemoteStartTransaction rejected: connector %d is reserved", c.id)
                return "Rejected"
        if profile is not None and (problem := self._remote_problem(c.id, profile)):
            log.warning("RemoteStartTransaction rejected: its charging profile: %s", problem)
            return "Rejected"
        c.starting = True  # taken until _remote_start has decided
        port.spawn(self._remote_start(c, id_tag, profile, learn_parent), f"remote-start-{c.id}")
        return "Accepted"

    async def _remote_start(
        self, c: Connector, id_tag: str, profile: dict[str, Any] | None, learn_parent: bool
    ) -> None:
        port = self.port
        parent = None
        started = False
        try:
            if self.keys.get_bool("AuthorizeRemoteTxRequests") or learn_parent:
                status, parent = await port.authorize(id_tag)
                if status != "Accepted":
                    log.info("remote start refused: idTag %s", status)
                    return
            if not self.reservations.check_start(c, id_tag, parent)[0]:
                log.info("remote start refused: connector %d is reserved for another"
                         " idTag", c.id)  # fmt: skip
                return
            started = True
        except Exception as exc:  # accepted, so never silent: the log and the CSMS hear it
            log.error("connector %d: RemoteStartTransaction for idTag %s was accepted but"
                      " failed: %s: %s", c.id, id_tag, type(exc).__name__, exc)  # fmt: skip
            c.starting = False
            port.report_start_failure(c, f"remote start failed: {type(exc).__name__}")
            return
        finally:
            c.starting = False  # start_transaction (no await before its check) takes over
            if not started:
                port.refresh_status(c)
        if c.plugged:
            await port.start_transaction(c, id_tag, parent, profile)
        else:
            port.wait_for_vehicle(c, id_tag, parent, profile)

    def remote_stop(self, transaction_id: int) -> str:
        port = self.port
        for c in port.connectors.values():
            if c.tx is not None and port.csms_transaction_id(c) == transaction_id:
                port.spawn(port.stop_transaction(c, "Remote"), f"remote-stop-{c.id}")
                return "Accepted"
        return "Rejected"

    # ------------------------------------------------------------------ the charger
    def change_availability(self, connector_id: int, operative: bool) -> str:
        return self.port.change_availability(connector_id, operative)

    def start_unlock(self, connector_id: int) -> asyncio.Task[Any]:
        """:meth:`unlock` in the background (never cancelled half-way: a stop under way
        must finish); the task's result is the status."""
        return self.port.spawn(self.unlock(connector_id), f"unlock-{connector_id}")

    async def unlock(self, connector_id: int) -> str:
        """UnlockConnector: stop the connector's transaction (UnlockCommand), then release
        the lock, and say whether that worked. NotSupported without a lock to drive."""
        c = self.port.connectors.get(connector_id)
        if c is None or not c.hw.evse.capabilities.supports_unlock:
            return "NotSupported"
        if c.tx is not None:
            await self.port.stop_transaction(c, "UnlockCommand")
        try:
            unlocked = await c.hw.evse.unlock()
        except DriverError as exc:
            log.error("connector %d: unlock failed: %s", c.id, exc)
            return "UnlockFailed"
        return "Unlocked" if unlocked else "UnlockFailed"

    def reset(self, kind: str) -> str:
        """Reset: stop the transactions (SoftReset/HardReset), note the reset for the next
        start, let the sender deliver, restart."""
        self.port.spawn(self._reset(kind), "reset")
        return "Accepted"

    async def _reset(self, kind: str) -> None:
        port = self.port
        reason = "SoftReset" if kind == "Soft" else "HardReset"
        for c in port.connectors.values():
            if c.tx is not None:
                await port.stop_transaction(c, reason)
        port.note_reset(kind)
        # Give the sender a moment to deliver the StopTransaction (it stays queued anyway).
        await self._drain(timeout_s=5.0)
        log.warning("%s reset requested by the CSMS: restarting", kind)
        port.request_restart(kind)

    async def _drain(self, *, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        outbox = self.port.outbox
        deadline = loop.time() + timeout_s
        while loop.time() < deadline and outbox.online:
            if self._queue_empty() and not outbox.volatile:
                return
            await asyncio.sleep(0.05)

    def clear_cache(self) -> str:
        return self.tags.clear_cache()

    def boot_payload(self) -> dict[str, Any]:
        ident = self.cfg.identity
        payload: dict[str, Any] = {
            "chargePointVendor": ident["vendor"][:20],
            "chargePointModel": ident["model"][:20],
            "firmwareVersion": __version__,
        }
        optional = {
            "chargePointSerialNumber": ident["serial_number"][:25],
            "chargeBoxSerialNumber": ident["charge_box_serial_number"][:25],
            "meterType": ident["meter_type"][:25],
            "meterSerialNumber": ident["meter_serial_number"][:25],
            "iccid": (ident["iccid"] or self._modem_identity[0])[:20],
            "imsi": (ident["imsi"] or self._modem_identity[1])[:20],
        }
        payload.update({k: v for k, v in optional.items() if v})
        return payload
