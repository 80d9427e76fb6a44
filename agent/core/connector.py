"""The OCPP 1.6 connector status, as a decision table over the connector's inputs.

Rather than a table of transitions (where a missed edge is a bug that only shows in the
field), the status is *derived*: :data:`RULES` is an ordered table, the first row whose
condition holds gives the status. Every input that matters is in :class:`ConnectorInputs`,
so the same inputs always give the same status, whatever happened before. The only memory
the spec needs (Finishing after a transaction, Preparing while a tag waits for a cable) is
an explicit input. ``docs/connector-status.md`` is generated from this table.

Connector 0 (the charge point as a whole) is Available, Unavailable or Faulted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from drivers.base import FaultCode, VehicleState


class Status(enum.StrEnum):
    AVAILABLE = "Available"
    PREPARING = "Preparing"
    CHARGING = "Charging"
    SUSPENDED_EV = "SuspendedEV"
    SUSPENDED_EVSE = "SuspendedEVSE"
    FINISHING = "Finishing"
    RESERVED = "Reserved"
    UNAVAILABLE = "Unavailable"
    FAULTED = "Faulted"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorInputs:
    """Everything the status depends on."""

    vehicle: VehicleState = VehicleState.ABSENT
    #: A controller fault (from the EVSE controller), or None.
    fault: FaultCode | None = None
    #: The meter stopped answering (after the configured number of misses).
    meter_failed: bool = False
    #: ChangeAvailability: Operative (True) or Inoperative (False).
    operative: bool = True
    transaction: bool = False
    reserved: bool = False
    #: A tag was authorized (or a remote start accepted) and waits for the cable.
    waiting_for_vehicle: bool = False
    #: The EVSE withholds power: the effective limit is below 6 A, so the pilot is paused.
    paused_by_evse: bool = False
    #: A transaction ended while the vehicle stays plugged in.
    finishing: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    when: str
    test: Callable[[ConnectorInputs], bool]
    status: Status


_PLUGGED = (VehicleState.CONNECTED, VehicleState.REQUESTING, VehicleState.CHARGING)

RULES: tuple[Rule, ...] = (
    Rule("controller fault or meter failed", lambda i: i.fault is not None or i.meter_failed,
         Status.FAULTED),
    Rule("inoperative and no transaction", lambda i: not i.operative and not i.transaction,
         Status.UNAVAILABLE),
    Rule("transaction, contactor closed, EV drawing",
         lambda i: i.transaction and i.vehicle is VehicleState.CHARGING, Status.CHARGING),
    Rule("transaction, EVSE withholds power (limit < 6 A or paused)",
         lambda i: i.transaction and i.paused_by_evse, Status.SUSPENDED_EVSE),
    Rule("transaction, EV asks for power, contactor still open",
         lambda i: i.transaction and i.vehicle is VehicleState.REQUESTING,
         Status.SUSPENDED_EVSE),
    Rule("transaction, EV does not ask for power (or left)",
         lambda i: i.transaction, Status.SUSPENDED_EV),
    Rule("transaction ended, vehicle still plugged",
         lambda i: i.finishing and i.vehicle in _PLUGGED, Status.FINISHING),
    Rule("vehicle plugged, no transaction yet", lambda i: i.vehicle in _PLUGGED,
         Status.PREPARING),
    Rule("tag authorized, waiting for the cable", lambda i: i.waiting_for_vehicle,
         Status.PREPARING),
    Rule("reserved", lambda i: i.reserved, Status.RESERVED),
    Rule("otherwise", lambda i: True, Status.AVAILABLE),
)  # fmt: skip


def derive_status(inputs: ConnectorInputs) -> Status:
    """Return the OCPP status for ``inputs`` (the first matching row of :data:`RULES`)."""
    for rule in RULES:
        if rule.test(inputs):
            return rule.status
    raise AssertionError("RULES ends with a catch-all row")  # pragma: no cover


#: FaultCode -> (OCPP ChargePointErrorCode, short info for the CSMS).
ERROR_CODES: dict[FaultCode, str] = {
    FaultCode.GROUND_FAULT: "GroundFailure",
    FaultCode.NO_GROUND: "GroundFailure",
    FaultCode.GFI_SELF_TEST: "GroundFailure",
    FaultCode.STUCK_RELAY: "PowerSwitchFailure",
    FaultCode.RELAY_CLOSURE: "PowerSwitchFailure",
    FaultCode.OVER_TEMPERATURE: "HighTemperature",
    FaultCode.OVER_CURRENT: "OverCurrentFailure",
    FaultCode.DIODE_CHECK: "EVCommunicationError",
    FaultCode.PILOT: "EVCommunicationError",
    FaultCode.VENT_REQUIRED: "OtherError",
    FaultCode.TEMPERATURE_SENSOR: "InternalError",
    FaultCode.COMMUNICATION: "InternalError",
    FaultCode.OTHER: "OtherError",
}


def error_code(inputs: ConnectorInputs) -> str:
    """The StatusNotification errorCode for ``inputs`` ("NoError" unless Faulted)."""
    if inputs.fault is not None:
        return ERROR_CODES[inputs.fault]
    if inputs.meter_failed:
        return "PowerMeterFailure"
    return "NoError"


def connector_zero_status(*, operative: bool, faulted: bool) -> Status:
    """Status of connector 0, the charge point as a whole."""
    if faulted:
        return Status.FAULTED
    return Status.AVAILABLE if operative else Status.UNAVAILABLE


def rules_markdown() -> str:
    """The decision table as Markdown (``docs/connector-status.md`` is this text)."""
    lines = [
        "# Connector status (generated from agent/core/connector.py)",
        "",
        "The first row whose condition holds gives the OCPP 1.6 status of a connector.",
        "Regenerate with `python -c 'from agent.core.connector import rules_markdown as r;"
        ' print(r(), end="")\' > docs/connector-status.md`.',
        "",
        "| # | condition | status |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {rule.when} | {rule.status.value} |" for n, rule in enumerate(RULES, 1)]
    lines += [
        "",
        "Faulted carries an errorCode from the controller's fault:",
        "",
        "| controller fault | errorCode |",
        "|---|---|",
    ]
    lines += [f"| {fault.value} | {code} |" for fault, code in ERROR_CODES.items()]
    lines += ["| meter stopped answering | PowerMeterFailure |", ""]
    return "\n".join(lines)
