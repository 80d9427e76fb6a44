"""Meter readings to OCPP sampled values: units, phases, nothing invented."""

from __future__ import annotations

from agent.core.metering import energy_register_wh, sampled_values
from drivers.base import MeterReading

READING = MeterReading(
    energy_wh=12345.9,
    power_w=7360.0,
    voltage_v=(230.0, 231.0, None),
    current_a=(16.0, 16.0, None),
    frequency_hz=50.0,
)
ALL = [
    "Energy.Active.Import.Register", "Power.Active.Import", "Current.Import", "Voltage",
    "Current.Offered", "Power.Offered", "Frequency",
]  # fmt: skip


def values(reading: MeterReading = READING, measurands: list[str] = ALL) -> list[dict[str, str]]:
    return sampled_values(
        reading,
        measurands=measurands,
        context="Sample.Periodic",
        offered_current_a=16.0,
        nominal_voltage_v=230.0,
        phases=2,
    )


def test_units_phases_and_context() -> None:
    out = {(v["measurand"], v.get("phase")): v for v in values()}
    assert out[("Energy.Active.Import.Register", None)]["value"] == "12345"
    assert out[("Energy.Active.Import.Register", None)]["unit"] == "Wh"
    assert out[("Power.Active.Import", None)] | {} == {
        "value": "7360.0", "unit": "W", "context": "Sample.Periodic", "format": "Raw",
        "measurand": "Power.Active.Import", "location": "Outlet",
    }  # fmt: skip
    assert out[("Current.Import", "L1")]["unit"] == "A"
    assert out[("Voltage", "L2-N")]["value"] == "231.0"
    assert out[("Current.Offered", None)]["value"] == "16.0"
    assert out[("Power.Offered", None)]["value"] == f"{16 * 230 * 2:.1f}"
    assert "unit" not in out[("Frequency", None)]  # OCPP 1.6 has no Hz unit


def test_absent_phases_and_missing_values_are_left_out() -> None:
    out = values()
    assert ("Current.Import", "L3") not in {(v["measurand"], v.get("phase")) for v in out}
    bare = values(MeterReading(energy_wh=1.0), ["Power.Active.Import", "Voltage", "Frequency"])
    assert bare == []


def test_only_requested_measurands_in_order() -> None:
    out = values(measurands=["Power.Active.Import", "Energy.Active.Import.Register"])
    assert [v["measurand"] for v in out] == ["Power.Active.Import", "Energy.Active.Import.Register"]


def test_meter_start_is_integer_wh() -> None:
    assert energy_register_wh(READING) == 12345
