"""Build the connectors' drivers from the config: real devices, or the simulators.

``[hardware] driver = "devices"`` opens the meter and controller named in ``[meter]`` and
``[evse]``. ``driver = "sim"`` starts the device simulators as a child process
(``python -m drivers.sim``) and connects the *same* real drivers to them over a pty (RAPI)
and TCP or an RTU pty (Modbus): the demo and the end-to-end tests run the field code paths.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from agent.chargepoint.model import ConnectorHardware
from agent.config import Config
from drivers.evse.rapi import RapiController
from drivers.meter.modbus import bus_from_settings, meter_from_settings
from drivers.sim import process as sim_process

log = logging.getLogger("evcp.hardware")


class HardwareError(Exception):
    """The hardware could not be set up; the message says which part and why."""


@dataclass(slots=True)
class SimProcess:
    """The simulator child process and where its devices are."""

    process: asyncio.subprocess.Process
    info: dict[str, Any]

    @classmethod
    async def start(cls, cfg: Config) -> SimProcess:
        sim, hw = cfg.sim, cfg.hardware
        control = cfg.state_dir / "sim.sock"
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "--connectors", str(hw["connectors"]),
            "--meter-model", sim["meter_model"],
            "--meter-transport", sim["meter_transport"],
            "--time-scale", str(sim["time_scale"]),
            "--ev-max-current", str(sim["ev_max_current_a"]),
            "--ev-phases", str(sim["ev_phases"]),
            "--phases", str(hw["phases"]),
            "--voltage", str(sim["voltage_v"]),
            "--max-current", str(int(hw["max_current_a"])),
            "--state-file", str(cfg.state_dir / "sim-meter.json"),
        ]  # fmt: skip
        try:
            process, info = await sim_process.spawn(control, *args)
        except sim_process.SimulatorStartError as exc:
            raise HardwareError(str(exc)) from None
        log.info(
            "simulated hardware: controllers on %s, %s meter over %s",
            ", ".join(info["evse_ports"]),
            info["meter"]["model"],
            info["meter"]["transport"],
        )
        return cls(process, info)

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one command to the simulator; return its answer."""
        return await sim_process.command(self.info["control"], request)

    async def stop(self) -> None:
        await sim_process.stop(self.process)


async def build(cfg: Config) -> tuple[list[ConnectorHardware], SimProcess | None]:
    """Create (not yet start) each connector's controller and meter drivers."""
    sim: SimProcess | None = None
    evse_cfg, meter_cfg = cfg.evse, cfg.meter
    if cfg.hardware["driver"] == "sim":
        sim = await SimProcess.start(cfg)
        meter_info = sim.info["meter"]
        evse_ports = list(sim.info["evse_ports"])
        meter_settings: dict[str, Any] = {
            "model": meter_info["model"],
            "transport": meter_info["transport"],
            "host": meter_info.get("host", "127.0.0.1"),
            "port": meter_info["port"],
            "baudrate": 9600,
            "timeout_s": 0.5,
            "retries": 1,
        }
        first_unit = 1
    else:
        evse_ports = [evse_cfg["port"]]
        meter_settings = {
            "model": meter_cfg["model"],
            "transport": meter_cfg["transport"],
            "host": meter_cfg["host"],
            "port": meter_cfg["port"],
            "baudrate": meter_cfg["baudrate"],
            "timeout_s": float(meter_cfg["timeout_s"]),
            "retries": meter_cfg["retries"],
        }
        first_unit = int(meter_cfg["unit_id"])
    bus = bus_from_settings(
        transport=meter_settings["transport"],
        host=meter_settings["host"],
        port=meter_settings["port"],
        baudrate=meter_settings["baudrate"],
        timeout_s=meter_settings["timeout_s"],
        retries=meter_settings["retries"],
    )
    hardware = []
    for index, port in enumerate(evse_ports):
        evse = RapiController(
            port=port,
            baudrate=evse_cfg["baudrate"],
            timeout_s=float(evse_cfg["timeout_s"]),
            fallback_current_a=int(evse_cfg["fallback_current_a"]),
        )
        meter = meter_from_settings(unit_id=first_unit + index, bus=bus, **meter_settings)
        hardware.append(ConnectorHardware(evse=evse, meter=meter))
    return hardware, sim
