"""A Modbus energy-meter simulator: a real pymodbus server, over TCP or RTU on a pty pair.

One unit id per connector. At the instant of every request the unit's registers are
computed from the shared physics (:class:`SimConnector`) through the model's register map
(:func:`drivers.meter.maps.encode`), so a client reads exactly what a meter of that model
would show on that connector.

Faults, per unit:

- ``connector.meter_silent = True``: the unit does not answer at all (the client times out);
- ``server.exception_code[unit] = 2``: the unit answers every request with that Modbus
  exception code (``None`` or ``del`` to stop);
- ``server.response_delay_s[unit] = 0.5``: the unit answers late (registers are computed
  after the delay);
- ``server.set_registers(unit, fc, address, words)``: fixed raw words override the physics
  for those registers (e.g. NaN or sentinel values), until :meth:`clear_registers`.

On RTU, a unit id that is not simulated does not answer either, as on a real RS-485 bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from dataclasses import dataclass, field
from functools import partial

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.base import MeterReading
from drivers.meter.maps import RegisterMap, encode, plan_reads
from drivers.sim.physics import SimConnector

Transport = str  # "tcp" | "rtu"


def reading_from_connector(connector: SimConnector) -> MeterReading:
    """What an ideal meter on ``connector`` measures at this instant."""
    return MeterReading(
        energy_wh=connector.energy_now_wh(),
        power_w=connector.power_w,
        voltage_v=connector.phase_voltages_v(),
        current_a=connector.phase_currents_a(),
        power_phase_w=connector.phase_powers_w(),
        frequency_hz=connector.frequency_hz,
    )


class PtyPair:
    """Two pseudo-terminals joined back to back, like a null-modem cable.

    ``server_path`` and ``client_path`` are the two ends. Bytes are relayed between the two
    masters by the event loop; both slaves stay open here so that the masters never see EIO
    when a user closes and reopens its end.
    """

    def __init__(self) -> None:
        self._master_a, self._slave_a = os.openpty()
        self._master_b, self._slave_b = os.openpty()
        for fd in (self._slave_a, self._slave_b):
            tty.setraw(fd)
        for fd in (self._master_a, self._master_b):
            os.set_blocking(fd, False)
        self.server_path = os.ttyname(self._slave_a)
        self.client_path = os.ttyname(self._slave_b)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master_a, self._relay, self._master_a, self._master_b)
        self._loop.add_reader(self._master_b, self._relay, self._master_b, self._master_a)

    def _relay(self, source: int, target: int) -> None:
        try:
            data = os.read(source, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        try:
            os.write(target, data)
        except OSError:
            pass  # a full buffer loses bytes, as an overrun serial line does

    def close(self) -> None:
        if self._loop is not None:
            for fd in (self._master_a, self._master_b):
                self._loop.remove_reader(fd)
            self._loop = None
        for fd in (self._master_a, self._master_b, self._slave_a, self._slave_b):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(eq=False)
class SimMeterServer:
    """A running meter simulator. Use :func:`start_meter_server` to create one."""

    units: dict[int, SimConnector]
    register_map: RegisterMap
    transport: Transport
    #: The bound TCP port (TCP only).
    port: int | None = None
    #: The client-side serial device (RTU only).
    serial_path: str | None = None
    #: Per unit: answer every request with this Modbus exception code.
    exception_code: dict[int, int] = field(default_factory=dict)
    #: Per unit: wait this long before answering (a slow meter, or a late answer).
    response_delay_s: dict[int, float] = field(default_factory=dict)
    #: Number of read requests answered (or refused) per unit.
    requests: dict[int, int] = field(default_factory=dict)
    _overrides: dict[int, dict[tuple[int, int], list[int]]] = field(default_factory=dict)
    _server: ModbusTcpServer | ModbusSerialServer | None = None
    _pty: PtyPair | None = None

    def set_registers(self, unit: int, function_code: int, address: int, words: list[int]) -> None:
        """Serve these raw words at ``address`` instead of the physics, until cleared."""
        if any(not 0 <= w <= 0xFFFF for w in words):
            raise ValueError(f"not 16-bit words: {words}")
        self._overrides.setdefault(unit, {})[(function_code, address)] = list(words)

    def clear_registers(self, unit: int | None = None) -> None:
        """Drop the overrides of ``unit`` (or of every unit)."""
        if unit is None:
            self._overrides.clear()
        else:
            self._overrides.pop(unit, None)

    async def _action(
        self,
        unit: int,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus before it answers a request for ``unit``."""
        del address, count
        connector = self.units.get(unit)
        if connector is None or connector.meter_silent:
            raise NoSuchIdException(f"unit {unit} is silent")  # no answer at all
        self.requests[unit] = self.requests.get(unit, 0) + 1
        delay = self.response_delay_s.get(unit, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)
        code = self.exception_code.get(unit)
        if code:
            return ExcCodes(code)
        if set_values is not None:
            return ExcCodes.ILLEGAL_FUNCTION  # a meter's measurements are read-only
        words = encode(self.register_map, reading_from_connector(connector))
        words.update(self._overrides.get(unit, {}))
        for (fc, first), values in words.items():
            if fc != function_code:
                continue
            offset = first - start_address
            if offset >= 0 and offset + len(values) <= len(registers):
                registers[offset : offset + len(values)] = values
        return None

    def _device(self, unit: int) -> SimDevice:
        """A device whose holding and input registers span the map's planned reads."""
        blocks: dict[int, list[SimData]] = {3: [], 4: []}
        for fc in (3, 4):
            reads = [r for r in plan_reads(self.register_map) if r.function_code == fc]
            if reads:
                first = min(r.start for r in reads)
                last = max(r.start + r.length for r in reads)
                blocks[fc].append(
                    SimData(first, count=last - first, values=0, datatype=DataType.REGISTERS)
                )
            else:
                blocks[fc].append(SimData(0, datatype=DataType.INVALID))
        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=unit,
            simdata=(list(bits), list(bits), blocks[3], blocks[4]),
            action=partial(self._action, unit),
        )

    async def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._server is not None:
            server, self._server = self._server, None
            await server.shutdown()  # type: ignore[no-untyped-call]
        if self._pty is not None:
            pty, self._pty = self._pty, None
            pty.close()


async def start_meter_server(
    units: dict[int, SimConnector],
    register_map: RegisterMap,
    *,
    transport: Transport = "tcp",
    host: str = "127.0.0.1",
    port: int = 0,
    baudrate: int = 9600,
) -> SimMeterServer:
    """Start a simulator serving ``units`` (unit id -> connector) with ``register_map``.

    TCP binds ``host:port`` (0 picks a free port; see ``.port``). RTU creates a pty pair
    and serves on one end; clients open ``.serial_path``.
    """
    if not units:
        raise ValueError("at least one unit is needed")
    if any(not 1 <= unit <= 247 for unit in units):
        raise ValueError(f"unit ids must be in 1..247: {sorted(units)}")
    sim = SimMeterServer(units=dict(units), register_map=register_map, transport=transport)
    devices = [sim._device(unit) for unit in sorted(units)]
    # Unit 0 stands for "every other unit": silent at every address, as an absent device.
    devices.append(
        SimDevice(
            id=0,
            simdata=[SimData(0, count=0x10000, values=0, datatype=DataType.REGISTERS)],
            action=partial(sim._action, 0),
        )
    )
    if transport == "tcp":
        tcp_server = ModbusTcpServer(devices, address=(host, port), ignore_missing_devices=True)
        await tcp_server.serve_forever(background=True)
        sim._server = tcp_server
        sockets = getattr(tcp_server.transport, "sockets", None) or []
        sim.port = int(sockets[0].getsockname()[1]) if sockets else port
    elif transport == "rtu":
        pty = PtyPair()
        pty.start()
        sim._pty = pty
        serial_server = ModbusSerialServer(
            devices,
            framer=FramerType.RTU,
            port=pty.server_path,
            baudrate=baudrate,
            ignore_missing_devices=True,
        )
        try:
            await serial_server.serve_forever(background=True)
        except BaseException:
            pty.close()
            raise
        sim._server = serial_server
        sim.serial_path = pty.client_path
    else:
        raise ValueError(f"transport {transport!r} is not 'tcp' or 'rtu'")
    return sim
