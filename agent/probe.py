"""``evcp probe meter|evse``: talk to the configured device once, for board bring-up.

Prints what was read, or one line saying which port, address or register failed.
With ``[hardware] driver = "sim"`` the simulators are started and probed instead; they get
a state directory of their own, so a probe never disturbs an agent running on the same
config (its simulator's control socket lives in the agent's state directory).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import tempfile
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
                "power_phase_w": list(reading.power_phase_w),
                "frequency_hz": reading.frequency_hz,
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


def probe_once(cfg: Config, device: str) -> dict[str, Any]:
    """Read ``device`` ("meter" or "evse") once; raise DriverError or HardwareError."""
    # The drivers' and pymodbus' retry warnings would otherwise reach stderr through
    # logging's last-resort handler: the caller reports the failure in one line.
    root = logging.getLogger()
    quiet = logging.NullHandler()
    if not root.handlers:
        root.addHandler(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="evcp-probe-") as scratch:
            if cfg.hardware["driver"] == "sim":
                cfg = dataclasses.replace(cfg, agent={**cfg.agent, "state_dir": scratch})
            return asyncio.run(_probe(cfg, device))
    finally:
        root.removeHandler(quiet)


def probe(cfg: Config, device: str, *, as_json: bool) -> int:
    try:
        result = probe_once(cfg, device)
    except (DriverError, HardwareError) as exc:
        print(f"evcp: probe {device} failed: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<18} {value}")
    return 0
