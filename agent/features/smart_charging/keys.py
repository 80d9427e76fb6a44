"""Smart Charging configuration keys (OCPP 1.6 section 9.4)."""

from __future__ import annotations

from agent.core.config_keys import RO, KeySpec, Kind, bool_key, int_key

KEYS: tuple[KeySpec, ...] = (
    int_key("ChargeProfileMaxStackLevel", 10, minimum=0, maximum=100, access=RO),
    KeySpec(
        "ChargingScheduleAllowedChargingRateUnit",
        Kind.CSL,
        "Current,Power",
        access=RO,
        choices=("Current", "Power"),
        max_items=2,
    ),
    int_key("ChargingScheduleMaxPeriods", 48, minimum=1, maximum=1000, access=RO),
    bool_key("ConnectorSwitch3to1PhaseSupported", False, access=RO),
    int_key("MaxChargingProfilesInstalled", 20, minimum=1, maximum=1000, access=RO),
)
