"""``evcp schedule``: the composite charging schedule as JSON, a table and a terminal plot.

The agent computes the schedule (``Station.composite_schedule``); this module only turns
OCPP's ``chargingSchedulePeriod`` (offsets from ``startSchedule``) into absolute periods and
renders them. The plot uses ``plotext``, imported only here, so the daemon never loads it.
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


def plot(view: dict[str, Any], *, hours: float = 24.0, width: int = 80, height: int = 15) -> str:
    """A step chart of the limit over the next ``hours`` (text, for the terminal)."""
    import plotext as plt

    periods = view["periods"]
    if not periods:
        return ""
    t0 = datetime.fromisoformat(periods[0]["start"].replace("Z", "+00:00"))
    xs: list[float] = []
    ys: list[float] = []
    for i, period in enumerate(periods):
        at = datetime.fromisoformat(period["start"].replace("Z", "+00:00"))
        x = (at - t0).total_seconds() / 3600
        if i:
            xs.append(x)
            ys.append(ys[-1])
        xs.append(x)
        ys.append(period["limit"])
    xs.append(hours)
    ys.append(ys[-1])
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")
    plt.plot(xs, ys, marker="braille")
    plt.xlim(0, hours)
    plt.ylim(0, max(max(ys) * 1.1, 1))
    plt.xlabel("hours from now")
    plt.title(f"limit ({view['unit']})")
    text: str = plt.build()
    return text
