"""Smart Charging requests (OCPP 1.6 section 5.16, 5.5, 5.7): SetChargingProfile,
ClearChargingProfile, GetCompositeSchedule. The logic is in
:mod:`agent.features.smart_charging`."""

from __future__ import annotations

from typing import Any

from ocpp.charge_point import camel_to_snake_case, snake_to_camel_case
from ocpp.routing import on
from ocpp.v16 import call_result
from ocpp.v16.enums import Action

from agent.ocpp.handlers import Handlers


class SmartChargingHandlers(Handlers):
    @on(Action.set_charging_profile)
    def on_set_charging_profile(self, connector_id: int, cs_charging_profiles: dict[str, Any],
                                **_: Any) -> Any:  # fmt: skip
        body = snake_to_camel_case(cs_charging_profiles)
        status = self.features.smart_charging.set_charging_profile(connector_id, body)
        return call_result.SetChargingProfile(status=status)

    @on(Action.clear_charging_profile)
    def on_clear_charging_profile(self, id: int | None = None, connector_id: int | None = None,
                                  charging_profile_purpose: str | None = None,
                                  stack_level: int | None = None, **_: Any) -> Any:  # fmt: skip
        status = self.features.smart_charging.clear_charging_profile(
            id, connector_id, charging_profile_purpose, stack_level
        )
        return call_result.ClearChargingProfile(status=status)

    @on(Action.get_composite_schedule)
    def on_get_composite_schedule(self, connector_id: int, duration: int,
                                  charging_rate_unit: str | None = None, **_: Any) -> Any:  # fmt: skip
        result = self.features.smart_charging.composite_schedule(
            connector_id, duration, charging_rate_unit
        )
        if result is None:
            return call_result.GetCompositeSchedule(status="Rejected")
        start, schedule = result
        return call_result.GetCompositeSchedule(
            status="Accepted",
            connector_id=connector_id,
            schedule_start=start,
            charging_schedule=camel_to_snake_case(schedule),
        )
