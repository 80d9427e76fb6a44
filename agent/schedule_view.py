"""``evcp schedule``: the composite charging schedule as JSON, a table and a terminal plot.

The agent computes the schedule (``SmartCharging.composite_schedule`` in ``agent.features.smart_charging``); this module only turns
OCPP's ``chargingSchedulePeriod`` (offsets from ``startSchedule``) into absolute periods and
renders them. The chart is plain text, so it works over any SSH session.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any


def periods_from_schedule(schedule: dict[str, Any]) -> list[dict[str, Any]]:
    """OCPP chargingSchedule -> ``[{"start": ISO-8601, "limit": float, "number_phases": int}]``."""
    start = datetime.fromisoformat(schedule["startSchedule"].replace("Z", "+00:00"))
    out = []
    for period in schedule["chargingSchedulePeriod"]:
        at = start + timedelta(seconds=int(period["startPeriod"]))
        out.append(
            {
                "start": at.isoformat().replace("+00:00", "Z"),
                "limit": float(period["limit"]),
                "number_phases": int(period.get("numberPhases", 3)),
            }
        )
    return out


def as_json(connector_id: int, schedule: dict[str, Any]) -> dict[str, Any]:
    return {
        "connector_id": connector_id,
        "unit": schedule["chargingRateUnit"],
        "periods": periods_from_schedule(schedule),
    }


def table(view: dict[str, Any]) -> str:
    unit = view["unit"]
    lines = [f"Composite schedule, connector {view['connector_id']} (next 24 h, limit in {unit})"]
    lines.append(f"{'from (UTC)':<22} {'limit':>9}  phases")
    for period in view["periods"]:
        start = period["start"].replace("T", " ").replace("Z", "")[:19]
        lines.append(f"{start:<22} {period['limit']:>7.1f} {unit}  {period['number_phases']}")
    return "\n".join(lines)


def plot(view: dict[str, Any], *, hours: int = 24, width: int = 50) -> str:
    """An hour-by-hour bar chart of the lowest limit in each hour (plain text)."""
    periods = view["periods"]
    if not periods:
        return ""
    starts = [datetime.fromisoformat(p["start"].replace("Z", "+00:00")) for p in periods]
    t0 = starts[0]
    top = max(p["limit"] for p in periods) or 1.0
    unit = view["unit"]
    lines = [f"Limit per hour ({unit}, lowest in the hour), from {t0:%Y-%m-%d %H:%M} UTC"]
    for hour in range(hours):
        begin, end = t0 + timedelta(hours=hour), t0 + timedelta(hours=hour + 1)
        in_hour = [
            p["limit"]
            for i, p in enumerate(periods)
            if starts[i] < end and (i + 1 == len(periods) or starts[i + 1] > begin)
        ]
        low = min(in_hour)
        bar = "#" * round(low / top * width)
        lines.append(f"{begin:%H:%M} |{bar:<{width}}| {low:7.1f}")
    return "\n".join(lines)
