"""The charge point's model: a connector, its hardware and its running transaction.

Plain data with the derived facts the status table needs (``Connector.inputs``); the
behaviour lives in :mod:`agent.chargepoint.station` and its parts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from agent.core.connector import ConnectorInputs
from drivers.base import (
    ControlMode,
    EvseController,
    EvseStatus,
    FaultCode,
    Meter,
    MeterReading,
    VehicleState,
)

#: idTagInfo status values (OCPP 1.6 AuthorizationStatus).
ID_TAG_STATUSES = ("Accepted", "Blocked", "Expired", "Invalid", "ConcurrentTx")

#: Vehicle states with a vehicle on the cable.
PLUGGED = (VehicleState.CONNECTED, VehicleState.REQUESTING, VehicleState.CHARGING)


class Clock(Protocol):
    def now(self) -> datetime: ...


@dataclass(slots=True)
class ConnectorHardware:
    evse: EvseController
    meter: Meter


@dataclass(slots=True)
class ActiveTx:
    local_id: int
    id_tag: str
    meter_start_wh: int
    start: datetime
    begin_sample: list[dict[str, Any]]
    parent_id_tag: str | None = None
    #: StopTxnSampledData (Sample.Periodic) and StopTxnAlignedData (Sample.Clock) values
    #: taken during the transaction, for StopTransaction's transactionData. In memory only:
    #: after a power loss the StopTransaction carries what is left (the MeterValues of the
    #: transaction were queued durably on their own).
    samples: list[dict[str, Any]] = field(default_factory=list)
    samples_bytes: int = 0
    suspended_invalid: bool = False
    #: Register (Wh) at which energy stops after the CSMS invalidated the idTag and
    #: StopTransactionOnInvalidId is false: the register then + MaxEnergyOnInvalidId.
    invalid_energy_limit_wh: int | None = None
    #: A stop is under way (it awaits the last meter reading): a second one must not queue
    #: another StopTransaction (RemoteStop and an unplug at the same moment).
    stopping: bool = False
    #: The stop has its last reading: the controller is paused before the transaction
    #: closes (no current is offered with no transaction open).
    energy_off: bool = False
    #: The highest register (Wh) read during the transaction: meterStop is never below it
    #: (a meter replaced or reset mid-session must not erase the energy already delivered;
    #: a restart after a power loss uses the same stored maximum).
    highest_wh: int = 0


@dataclass(slots=True)
class Connector:
    id: int
    hw: ConnectorHardware
    evse_status: EvseStatus | None = None
    reading: MeterReading | None = None
    reading_at: datetime | None = None  # when ``reading`` was taken
    #: The last register the meter gave and when, accepted or not: the baseline against
    #: which the next one is judged plausible.
    last_raw: tuple[float, datetime] | None = None
    meter_misses: int = 0
    meter_failed: bool = False
    operative: bool = True
    charger_operative: bool = True  # connector 0's availability: the charger as a whole
    #: No new transaction (a firmware update is installing): Unavailable until it ends.
    blocked: bool = False
    pending_inoperative: bool | None = None  # Scheduled availability change
    tx: ActiveTx | None = None
    starting: bool = False  # a transaction is being started (authorizing, reading the meter)
    controller_up: bool = False  # the EVSE controller's driver started
    actuate_failed: bool = False  # the last command to the controller failed: retry it
    last_vehicle: VehicleState | None = None  # the last vehicle state that was not a fault
    waiting_tag: tuple[str, str | None] | None = None  # (idTag, parentIdTag)
    waiting_profile: dict[str, Any] | None = None  # from RemoteStartTransaction
    waiting_deadline: asyncio.TimerHandle | None = None
    finishing: bool = False
    reserved: bool = False  # held by a reservation (agent.features.reservation)
    limit_a: float = 0.0
    applied_mode: ControlMode | None = None
    applied_current_a: float | None = None
    paused_by_evse: bool = False
    observed: tuple[str, str, str | None] | None = None
    reported: tuple[str, str, str | None] | None = None
    status_timer: asyncio.TimerHandle | None = None
    sampler: asyncio.Task[None] | None = None
    actuate_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def vehicle(self) -> VehicleState:
        return self.evse_status.vehicle if self.evse_status else VehicleState.UNKNOWN

    @property
    def usable(self) -> bool:
        """Operative itself and as part of the charger (connector 0 Operative too), and
        not blocked (a firmware update is installing)."""
        return self.operative and self.charger_operative and not self.blocked

    @property
    def can_start(self) -> bool:
        """Free for a new transaction: usable, no fault, a working meter, none running."""
        return (
            self.tx is None
            and not self.starting
            and self.usable
            and self.inputs().fault is None
            and not self.meter_failed
        )

    @property
    def plugged(self) -> bool:
        return self.vehicle in (
            VehicleState.CONNECTED,
            VehicleState.REQUESTING,
            VehicleState.CHARGING,
        )

    def inputs(self) -> ConnectorInputs:
        status = self.evse_status
        if status is not None:
            fault = status.fault
        else:  # no word from the controller yet: Faulted (InternalError) until it starts
            fault = None if self.controller_up else FaultCode.COMMUNICATION
        return ConnectorInputs(
            vehicle=self.vehicle,
            fault=fault,
            meter_failed=self.meter_failed,
            operative=self.usable,
            transaction=self.tx is not None,
            reserved=self.reserved,
            waiting_for_vehicle=self.waiting_tag is not None,
            paused_by_evse=self.paused_by_evse,
            finishing=self.finishing,
        )

    @property
    def offered_current_a(self) -> float:
        if self.applied_mode is ControlMode.ENABLED and self.applied_current_a is not None:
            return self.applied_current_a
        return 0.0
