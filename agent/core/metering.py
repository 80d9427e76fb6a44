"""Turn a meter reading into OCPP 1.6 sampledValue entries.

Pure functions: the caller passes the reading, the offered current, the measurand list
(from MeterValuesSampledData, MeterValuesAlignedData, StopTxnSampledData) and the context.
A measurand the meter did not deliver (None) is left out: nothing is invented.
"""

from __future__ import annotations

import math
from typing import Any

from drivers.base import MeterReading

PHASES = ("L1", "L2", "L3")
#: Two units in the last place of a float32 (its 24-bit significand), relative.
FLOAT32_EPSILON = 2.0**-23


def _value(number: float, *, digits: int = 1) -> str:
    return f"{number:.{digits}f}"


def energy_register_wh(reading: MeterReading) -> int:
    """The energy register as the integer Wh that meterStart / meterStop carry: the whole
    Wh delivered (12345.9 Wh is 12345), allowing for float32's representation error (a
    float32 kWh register gives 10.006 kWh as 10005.9996 Wh, which is 10006).
    """
    value = reading.energy_wh
    return math.floor(value + abs(value) * FLOAT32_EPSILON)


def sampled_values(
    reading: MeterReading,
    *,
    measurands: list[str],
    context: str,
    offered_current_a: float,
    nominal_voltage_v: float,
    phases: int,
) -> list[dict[str, Any]]:
    """Return the sampledValue list (camelCase dicts, as on the wire) for ``measurands``."""
    out: list[dict[str, Any]] = []

    def add(measurand: str, value: str, unit: str | None, phase: str | None = None) -> None:
        entry: dict[str, Any] = {
            "value": value,
            "context": context,
            "format": "Raw",
            "measurand": measurand,
            "location": "Outlet",
        }
        if phase is not None:
            entry["phase"] = phase
        if unit is not None:
            entry["unit"] = unit
        out.append(entry)

    for measurand in measurands:
        if measurand == "Energy.Active.Import.Register":
            add(measurand, str(energy_register_wh(reading)), "Wh")
        elif measurand == "Power.Active.Import":
            if reading.power_w is not None:
                add(measurand, _value(reading.power_w), "W")
        elif measurand == "Current.Import":
            for phase, current in zip(PHASES, reading.current_a, strict=True):
                if current is not None:
                    add(measurand, _value(current, digits=2), "A", phase)
        elif measurand == "Voltage":
            for phase, voltage in zip(PHASES, reading.voltage_v, strict=True):
                if voltage is not None:
                    add(measurand, _value(voltage), "V", f"{phase}-N")
        elif measurand == "Current.Offered":
            add(measurand, _value(offered_current_a), "A")
        elif measurand == "Power.Offered":
            add(measurand, _value(offered_current_a * nominal_voltage_v * phases), "W")
        elif measurand == "Frequency" and reading.frequency_hz is not None:
            # OCPP 1.6 has no unit of measure for Hz: the unit is left out.
            add(measurand, _value(reading.frequency_hz, digits=2), None)
    return out


def meter_value(timestamp: str, sampled: list[dict[str, Any]]) -> dict[str, Any]:
    """One MeterValue entry."""
    return {"timestamp": timestamp, "sampledValue": sampled}
