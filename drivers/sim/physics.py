"""The electrical model shared by the device simulators.

One :class:`SimConnector` per connector holds what the wire-level simulators agree on: the
virtual EV on the cable, the pilot and contactor (written by the EVSE controller simulator)
and the energy that flowed (read by the meter simulator). The simulators speak the real
wire protocols; this module is only their common physics and has no I/O.

Physics: while the contactor is closed and the EV wants power, the EV draws
``min(offered, ev.max_current_a)`` on each of its phases at the nominal voltage; the energy
register integrates that power over (monotonic) time, scaled by ``time_scale`` so that tests
and demos can run an hour of charging in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class VirtualEV:
    """A car on the cable. ``wants_power`` False is a car that paused itself (SuspendedEV)."""

    plugged: bool = False
    max_current_a: float = 32.0
    phases: int = 3
    wants_power: bool = True


Listener = Callable[[], None]


@dataclass(slots=True)
class SimConnector:
    """Shared state of one simulated connector. Call :meth:`changed` after every write."""

    connector_id: int = 1
    phases: int = 3
    voltage_v: float = 230.0
    frequency_hz: float = 50.0
    time_scale: float = 1.0
    ev: VirtualEV = field(default_factory=VirtualEV)
    #: Pilot PWM on (controller enabled and not sleeping).
    pilot_on: bool = True
    offered_current_a: float = 32.0
    contactor_closed: bool = False
    #: Fault injected on the controller, by OCPP-independent name (see rapi_device).
    fault: str | None = None
    #: Fault injected on the meter: it stops answering.
    meter_silent: bool = False
    energy_wh: float = 0.0
    _last: float = field(default_factory=time.monotonic)
    _listeners: list[Listener] = field(default_factory=list)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` after every change of the EV, pilot, contactor or fault."""
        self._listeners.append(listener)

    def changed(self) -> None:
        """Integrate energy up to now, re-evaluate the contactor and notify listeners."""
        self.advance()
        self.contactor_closed = (
            self.fault is None and self.pilot_on and self.ev.plugged and self.ev.wants_power
        )
        for listener in list(self._listeners):
            listener()

    def advance(self, now: float | None = None) -> None:
        """Integrate the energy register from the last call to ``now`` (monotonic s)."""
        now = time.monotonic() if now is None else now
        elapsed_h = max(0.0, now - self._last) * self.time_scale / 3600.0
        self._last = now
        self.energy_wh += self.power_w * elapsed_h

    @property
    def drawn_current_a(self) -> float:
        """Current per active phase that the EV draws now."""
        if not self.contactor_closed:
            return 0.0
        return max(0.0, min(self.offered_current_a, self.ev.max_current_a))

    @property
    def active_phases(self) -> int:
        return min(self.phases, self.ev.phases)

    def phase_currents_a(self) -> tuple[float, float, float]:
        i = self.drawn_current_a
        n = self.active_phases
        return (i if n >= 1 else 0.0, i if n >= 2 else 0.0, i if n >= 3 else 0.0)

    def phase_voltages_v(self) -> tuple[float, float, float]:
        v = self.voltage_v
        n = self.phases
        return (v if n >= 1 else 0.0, v if n >= 2 else 0.0, v if n >= 3 else 0.0)

    def phase_powers_w(self) -> tuple[float, float, float]:
        currents = self.phase_currents_a()
        volts = self.phase_voltages_v()
        return (currents[0] * volts[0], currents[1] * volts[1], currents[2] * volts[2])

    @property
    def power_w(self) -> float:
        return sum(self.phase_powers_w())

    def energy_now_wh(self) -> float:
        """The energy register, integrated up to this instant."""
        self.advance()
        return self.energy_wh
