"""Driver interfaces: what the charge-point logic needs from the hardware.

This module is the seam between evcp's charge-point logic (``agent/``) and a board's
hardware. It imports nothing from ``agent/`` and knows nothing of OCPP: states, fault codes
and units are the hardware's, and the agent maps them to OCPP.

A manufacturer porting evcp to a new board implements :class:`EvseController` (and, when
the meter is not a supported Modbus model, :class:`Meter`). Every docstring states the
*hardware obligation*: what the implementation must guarantee.

Units are part of the names: ``energy_wh`` is watt-hours, ``current_a`` amperes,
``voltage_v`` volts, ``power_w`` watts, ``frequency_hz`` hertz.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: IEC 61851-1: the lowest pilot duty cycle an EV must honour is 6 A.
IEC61851_MIN_CURRENT_A = 6.0


# --------------------------------------------------------------------------- errors


class DriverError(Exception):
    """Base of every error a driver raises."""


class TransientDriverError(DriverError):
    """The device did not answer or answered garbage; retrying later may succeed.

    The agent counts consecutive transient errors and reports the connector Faulted after a
    configured number of misses; it recovers by itself when the device answers again.
    """


class DeviceTimeout(TransientDriverError):
    """The device did not answer within the driver's timeout."""


class ProtocolError(TransientDriverError):
    """The device answered with a malformed, unexpected or negative reply."""


class CurrentNotApplied(ProtocolError):
    """The controller kept another offered current than the one asked for (clamped to its
    range, or not raised while it throttles for temperature). ``applied_a`` is what it
    offers now: the controller's own decision, not a failure to retry."""

    def __init__(self, message: str, applied_a: float) -> None:
        super().__init__(message)
        self.applied_a = applied_a


class FatalDriverError(DriverError):
    """The device cannot be used as it is (port missing, wrong configuration, bad map).

    The agent reports the connector Faulted at once (a :class:`TransientDriverError` from
    the meter counts towards ``meter_miss_limit`` first) and keeps trying -- the
    controller's ``start`` every few seconds, the meter at every poll -- so a device that
    comes back, or appears later, is used without a restart.
    """


# --------------------------------------------------------------------------- meter


#: Per-phase values: L1, L2, L3. ``None`` where the phase is absent or not measured.
PhaseValues = tuple[float | None, float | None, float | None]
NO_PHASES: PhaseValues = (None, None, None)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterReading:
    """One reading of an energy meter.

    Only ``energy_wh`` is mandatory. A value the meter does not measure, or marks as not
    available (NaN, a sentinel), is ``None``: a driver never invents a number.
    """

    energy_wh: float
    power_w: float | None = None
    voltage_v: PhaseValues = NO_PHASES
    current_a: PhaseValues = NO_PHASES
    power_phase_w: PhaseValues = NO_PHASES
    frequency_hz: float | None = None


@runtime_checkable
class Meter(Protocol):
    """An energy meter on the connector's supply.

    Hardware obligations:
    - ``energy_wh`` is the meter's import register, monotonic, in Wh (convert kWh).
    - ``read`` raises :class:`TransientDriverError` (usually :class:`DeviceTimeout`) when the
      meter does not answer, and never returns a made-up reading.
    - ``connect`` may be called again after ``close`` or after an error.
    """

    async def connect(self) -> None:
        """Open the bus (or join the shared bus owner). Raises FatalDriverError."""

    async def read(self) -> MeterReading:
        """Read every register of the model once. Raises TransientDriverError."""

    async def close(self) -> None:
        """Release the bus. Idempotent."""


# --------------------------------------------------------------------------- EVSE


class VehicleState(enum.StrEnum):
    """What the control pilot says about the vehicle (IEC 61851-1 states A to F)."""

    ABSENT = "absent"  # state A: +12 V, no vehicle
    CONNECTED = "connected"  # state B: vehicle connected, not asking for power
    REQUESTING = "requesting"  # state C/D: vehicle asks for power, contactor open
    CHARGING = "charging"  # state C/D with the contactor closed
    FAULT = "fault"  # state E/F or a controller fault
    UNKNOWN = "unknown"  # pilot not evaluated (controller disabled or starting)


class FaultCode(enum.StrEnum):
    """Faults an EVSE controller reports. The agent maps them to OCPP error codes."""

    GROUND_FAULT = "ground_fault"  # residual current (GFCI/RCD) tripped
    NO_GROUND = "no_ground"  # protective earth missing
    STUCK_RELAY = "stuck_relay"  # contactor welded
    RELAY_CLOSURE = "relay_closure"  # contactor does not close
    GFI_SELF_TEST = "gfi_self_test"  # RCD self-test failed
    OVER_TEMPERATURE = "over_temperature"
    OVER_CURRENT = "over_current"  # vehicle draws more than offered
    DIODE_CHECK = "diode_check"  # pilot diode missing
    VENT_REQUIRED = "vent_required"  # state D not allowed
    PILOT = "pilot"  # pilot error
    TEMPERATURE_SENSOR = "temperature_sensor"
    COMMUNICATION = "communication"  # the controller stopped answering
    OTHER = "other"


class ControlMode(enum.StrEnum):
    """What the agent last told the controller to do."""

    ENABLED = "enabled"  # pilot PWM on, contactor follows the vehicle
    PAUSED = "paused"  # pilot steady +12 V, contactor open (sleep)
    DISABLED = "disabled"  # pilot -12 V, contactor open (unavailable)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvseStatus:
    """A snapshot of the controller.

    ``fault`` is set exactly when ``vehicle`` is :attr:`VehicleState.FAULT`.
    ``vendor_code`` is the controller's own code for the state (for logs and OCPP
    vendorErrorCode), e.g. ``"06"`` for an OpenEVSE GFCI fault.
    """

    vehicle: VehicleState
    mode: ControlMode
    offered_current_a: float
    contactor_closed: bool
    fault: FaultCode | None = None
    vendor_code: str | None = None
    current_a: float | None = None
    voltage_v: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EvseCapabilities:
    """Read once at start. ``firmware`` is the controller's version string."""

    min_current_a: float = IEC61851_MIN_CURRENT_A
    max_current_a: float = 32.0
    firmware: str = ""
    supports_unlock: bool = False


StatusListener = Callable[[EvseStatus], None]


@runtime_checkable
class EvseController(Protocol):
    """The controller that owns one connector's control pilot and contactor.

    Hardware obligations:
    - After ``start``, the controller pushes every state change to the listener set with
      ``set_listener`` (from the event loop, never from another thread). It also re-reads
      the state when it suspects a lost notification, so the agent never needs to poll.
    - ``set_offered_current`` below ``capabilities.min_current_a`` is refused with
      :class:`ProtocolError`: the agent pauses instead (``pause``).
    - A controller that has a supervision timer (OpenEVSE ``$SY``) must fall back to a safe
      current by itself when the agent stops talking to it.
    - Every method raises :class:`TransientDriverError` when the controller does not answer.
    """

    capabilities: EvseCapabilities

    def set_listener(self, listener: StatusListener) -> None:
        """Register the one callback that receives every new status."""

    async def start(self) -> None:
        """Open the port, read capabilities, start supervision. Raises FatalDriverError."""

    async def close(self) -> None:
        """Stop supervision and release the port. Idempotent."""

    async def read_status(self) -> EvseStatus:
        """Ask the controller for its state now."""

    async def enable(self) -> None:
        """Offer power: pilot PWM on; the contactor closes when the vehicle asks."""

    async def pause(self) -> None:
        """Stop offering power but keep the vehicle session (pilot +12 V, contactor open)."""

    async def disable(self) -> None:
        """Out of service: pilot -12 V (state F), contactor open at once."""

    async def set_offered_current(self, current_a: float) -> float:
        """Set the pilot's offered current; return what the controller applied."""

    async def unlock(self) -> bool:
        """Release the connector lock. Return False when there is no lock to release."""


# --------------------------------------------------------------------------- clock


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One NTP answer: ``offset_s`` is server time minus local time."""

    server: str
    offset_s: float
    delay_s: float
    stratum: int


@dataclass(slots=True)
class Capabilities:
    """What a board offers; collected at start for ``evcp status``."""

    evse: list[EvseCapabilities] = field(default_factory=list)
