"""The Smart Charging profile's requests: SetChargingProfile, ClearChargingProfile,
GetCompositeSchedule.

The profiles themselves live in :class:`~agent.features.smart_charging.profiles.ChargingProfiles`
(validation, replacement, persistence, limits); this service checks the request against
the charge point and has it actuate after a change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.features.smart_charging.profiles import ChargingProfiles

if TYPE_CHECKING:  # (annotations only)
    from agent.chargepoint.port import ChargePointPort

#: The longest GetCompositeSchedule answered (longer requests get this much).
MAX_COMPOSITE_S = 7 * 86400


class SmartCharging:
    def __init__(self, *, port: ChargePointPort, profiles: ChargingProfiles) -> None:
        self.port = port
        self.profiles = profiles

    def set_charging_profile(self, connector_id: int, body: dict[str, Any]) -> str:
        port = self.port
        if connector_id != 0 and connector_id not in port.connectors:
            return "Rejected"
        c = port.connectors.get(connector_id)
        tx = port.tx_for_profiles(c) if c is not None else None
        status = self.profiles.set(connector_id, body, tx, now=port.now())
        if status == "Accepted":
            port.actuate_all()
        return status

    def composite_schedule(
        self, connector_id: int, duration_s: int, unit: str | None
    ) -> tuple[str, dict[str, Any]] | None:
        """GetCompositeSchedule: ``(scheduleStart, chargingSchedule)`` or None (Rejected).

        At most MAX_COMPOSITE_S ahead: the schedule is computed on the event loop, and a
        year of daily profiles would hold it (pilot, pings, watchdog) for seconds."""
        port = self.port
        c = port.connectors.get(connector_id)
        return self.profiles.composite(
            connector_id,
            port.now(),
            min(duration_s, MAX_COMPOSITE_S),
            unit,
            port.tx_for_profiles(c) if c is not None else None,
            hardware_max_a=port.hardware_max_a(c) if c is not None else None,
        )

    def clear_charging_profile(
        self,
        profile_id: int | None,
        connector_id: int | None,
        purpose: str | None,
        stack_level: int | None,
    ) -> str:
        status = self.profiles.clear(profile_id, connector_id, purpose, stack_level)
        if status == "Accepted":
            self.port.actuate_all()
        return status

    def remote_problem(self, connector_id: int, body: dict[str, Any]) -> str | None:
        """Why RemoteStartTransaction's chargingProfile cannot be taken (None: it can)."""
        return self.profiles.remote_problem(connector_id, body)
