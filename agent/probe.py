"""``evcp probe meter|evse``: talk to the configured device once, for board bring-up.

Prints what was read, or one line saying which port, address or register failed.
With ``[hardware] driver = "sim"`` the simulators are started and probed instead.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from agent.config import Config
from agent.hardware import HardwareError, build
from drivers.base import DriverError, EvseController, Meter


async def _probe(cfg: Config, device: str) -> dict[str, Any]:
    hardware, sim = await build(cfg)
    try:
        if device == "meter":
            meter: Meter = hardware[0].meter
            await meter.connect()
            try:
                reading = await meter.read()
            finally:
                await meter.close()
            return {
                "energy_wh": float(reading.energy_wh),
                "power_w": reading.power_w,
                "voltage_v": list(reading.voltage_v),
                "current_a": list(reading.current_a),
            }
        evse: EvseController = hardware[0].evse
        await evse.start()
        try:
            status = await evse.read_status()
            firmware = evse.capabilities.firmware
        finally:
            await evse.close()
        state = status.fault.value if status.fault else status.vehicle.value
        return {
            "state": state,
            "offered_current_a": float(status.offered_current_a),
            "firmware": firmware,
        }
    finally:
        if sim is not None:
            await sim.stop()


def probe(cfg: Config, device: str, *, as_json: bool) -> int:
    try:
        result = asyncio.run(_probe(cfg, device))
    except (DriverError, HardwareError) as exc:
        print(f"evcp: probe {device} failed: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<18} {value}")
    return 0
