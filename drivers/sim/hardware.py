"""The simulated charger as its own process: EVs, OpenEVSE controllers and a Modbus meter.

``python -m drivers.sim`` starts, per connector, a virtual EV, an OpenEVSE-compatible
controller on a pseudo-terminal (RAPI) and one unit of a Modbus meter (TCP, or RTU on a pty
pair), all sharing one physics model per connector. It prints one JSON line on stdout when
ready, telling the agent where to connect its *real* drivers::

    {"evse_ports": ["/dev/pts/5"], "meter": {"transport": "tcp", "host": "127.0.0.1",
     "port": 40211, "model": "sdm630"}, "control": "/var/lib/evcp/sim.sock"}

It is then driven through a Unix socket (JSON lines): ``plug``, ``unplug``, ``fault``,
``clear-fault``, ``ev-pause``, ``ev-resume``, ``ev-max-current``, ``meter-silent``,
``meter-ok``, ``meter-exception``, ``meter-exception-clear``, ``controller-reset``,
``rapi-garbage``, ``state``. With ``--state-file`` the meters' energy registers survive a
restart, as a real meter's do. It exits when its standard input closes
(its parent, the agent, went away), so no simulator outlives the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.base import DriverError, FaultCode
from drivers.meter.maps import load_map
from drivers.sim.modbus_meter import SimMeterServer, start_meter_server
from drivers.sim.physics import SimConnector, VirtualEV
from drivers.sim.rapi_device import RapiDevice


@dataclass(slots=True)
class SimHardware:
    connectors: dict[int, SimConnector]
    devices: dict[int, RapiDevice]
    meter: SimMeterServer
    evse_ports: list[str]
    meter_model: str

    def info(self, control: str) -> dict[str, Any]:
        meter: dict[str, Any] = {
            "transport": self.meter.transport,
            "model": self.meter_model,
        }
        if self.meter.transport == "tcp":
            meter.update(host="127.0.0.1", port=self.meter.port)
        else:
            meter.update(port=self.meter.serial_path)
        return {"evse_ports": self.evse_ports, "meter": meter, "control": control}

    def state(self) -> dict[str, Any]:
        out = []
        for cid, c in self.connectors.items():
            out.append(
                {
                    "id": cid,
                    "plugged": c.ev.plugged,
                    "ev_wants_power": c.ev.wants_power,
                    "ev_max_current_a": c.ev.max_current_a,
                    "pilot_on": c.pilot_on,
                    "offered_current_a": c.offered_current_a,
                    "contactor_closed": c.contactor_closed,
                    "fault": c.fault,
                    "meter_silent": c.meter_silent,
                    "power_w": c.power_w,
                    "energy_wh": c.energy_now_wh(),
                    "controller_mode": self.devices[cid].mode,
                }
            )
        return {"connectors": out}

    def save(self, path: Path) -> None:
        """Persist the energy registers (a real meter keeps its register across reboots)
        and which cars are plugged in (a power cut does not unplug a car)."""
        data = {str(cid): c.energy_now_wh() for cid, c in self.connectors.items()}
        plugged = {str(cid): c.ev.plugged for cid, c in self.connectors.items()}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"energy_wh": data, "plugged": plugged}))
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text())
            data = saved["energy_wh"]
            plugged = saved.get("plugged", {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        for cid, c in self.connectors.items():
            value = data.get(str(cid))
            if isinstance(value, int | float) and value >= 0:
                c.energy_wh = float(value)
            if isinstance(plugged, dict) and plugged.get(str(cid)) is True:
                c.ev.plugged = True

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Apply one control command; raise ValueError with a message on bad input."""
        cmd = request.get("cmd")
        if cmd == "state":
            return self.state()
        cid = request.get("connector", 1)
        if not isinstance(cid, int) or cid not in self.connectors:
            raise ValueError(f"no connector {cid!r} (have {sorted(self.connectors)})")
        c = self.connectors[cid]
        if cmd == "plug":
            c.ev.plugged = True
            c.ev.wants_power = True
        elif cmd == "unplug":
            c.ev.plugged = False
        elif cmd == "ev-pause":
            c.ev.wants_power = False
        elif cmd == "ev-resume":
            c.ev.wants_power = True
        elif cmd == "ev-max-current":
            value = request.get("current_a")
            if not isinstance(value, int | float) or not 0 <= value <= 80:
                raise ValueError("current_a must be a number from 0 to 80")
            c.ev.max_current_a = float(value)
        elif cmd == "fault":
            code = request.get("code")
            try:
                c.fault = FaultCode(str(code)).value
            except ValueError:
                known = ", ".join(f.value for f in FaultCode)
                raise ValueError(f"unknown fault {code!r} (known: {known})") from None
        elif cmd == "clear-fault":
            c.fault = None
        elif cmd == "meter-silent":
            c.meter_silent = True
        elif cmd == "meter-ok":
            c.meter_silent = False
        elif cmd == "controller-reset":
            self.devices[cid].reset()
            return {}
        elif cmd == "rapi-garbage":
            # Line noise on the controller's UART: bytes that are no RAPI frame.
            self.devices[cid].inject_bytes(b"\x00\xff$#garbage\r$AT zz^00\r\x7f")
            return {}
        elif cmd == "meter-exception":
            code = request.get("code", 4)
            if not isinstance(code, int) or not 1 <= code <= 11:
                raise ValueError("code must be a Modbus exception code from 1 to 11")
            self.meter.exception_code[cid] = code
            return {}
        elif cmd == "meter-exception-clear":
            self.meter.exception_code.pop(cid, None)
            return {}
        else:
            raise ValueError(f"unknown command {cmd!r}")
        c.changed()
        return {}


async def start(
    *,
    connectors: int,
    meter_model: str,
    meter_transport: str,
    time_scale: float,
    ev_max_current_a: float,
    ev_phases: int,
    phases: int,
    voltage_v: float,
    max_current_a: int,
) -> SimHardware:
    sims: dict[int, SimConnector] = {}
    devices: dict[int, RapiDevice] = {}
    ports: list[str] = []
    for cid in range(1, connectors + 1):
        conn = SimConnector(
            connector_id=cid,
            phases=phases,
            voltage_v=voltage_v,
            time_scale=time_scale,
            ev=VirtualEV(max_current_a=ev_max_current_a, phases=ev_phases),
            pilot_on=False,
            offered_current_a=float(max_current_a),
        )
        device = RapiDevice(conn, max_current_a=max_current_a)
        ports.append(await device.start())
        sims[cid] = conn
        devices[cid] = device
    meter = await start_meter_server(
        sims,
        load_map(meter_model),
        transport="rtu" if meter_transport == "rtu" else "tcp",
    )
    return SimHardware(sims, devices, meter, ports, meter_model)


async def serve_control(path: Path, hardware: SimHardware) -> asyncio.AbstractServer:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("request must be a JSON object")
                    answer = {"ok": True, **hardware.command(request)}
                except ValueError as exc:
                    answer = {"ok": False, "error": str(exc)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(client, path=str(path))
    os.chmod(path, 0o600)
    return server


async def _wait_stdin_eof() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data and not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), readable)
    try:
        await done
    finally:
        loop.remove_reader(sys.stdin.fileno())


async def _save_every(hardware: SimHardware, path: Path | None, interval_s: float) -> None:
    if path is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        hardware.save(path)


async def main_async(args: argparse.Namespace) -> int:
    hardware = await start(
        connectors=args.connectors,
        meter_model=args.meter_model,
        meter_transport=args.meter_transport,
        time_scale=args.time_scale,
        ev_max_current_a=args.ev_max_current,
        ev_phases=args.ev_phases,
        phases=args.phases,
        voltage_v=args.voltage,
        max_current_a=args.max_current,
    )
    state_file = Path(args.state_file) if args.state_file else None
    if state_file is not None:
        hardware.load(state_file)
    control = Path(args.control)
    server = await serve_control(control, hardware)
    print(json.dumps(hardware.info(str(control))), flush=True)
    saver = asyncio.get_running_loop().create_task(_save_every(hardware, state_file, 1.0))
    try:
        await _wait_stdin_eof()
    finally:
        saver.cancel()
        if state_file is not None:
            hardware.save(state_file)
        server.close()
        for device in hardware.devices.values():
            await device.stop()
        await hardware.meter.stop()
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m drivers.sim", description=__doc__)
    parser.add_argument("--connectors", type=int, default=1)
    parser.add_argument("--meter-model", default="sdm630")
    parser.add_argument("--meter-transport", choices=("tcp", "rtu"), default="tcp")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--ev-max-current", type=float, default=32.0)
    parser.add_argument("--ev-phases", type=int, default=3)
    parser.add_argument("--phases", type=int, default=3)
    parser.add_argument("--voltage", type=float, default=230.0)
    parser.add_argument("--max-current", type=int, default=32)
    parser.add_argument("--control", required=True, help="Unix socket for sim commands")
    parser.add_argument("--state-file", help="keep the meters' energy registers in this file")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        return 0
    except DriverError as exc:  # e.g. an unknown meter model: one line, no traceback
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
