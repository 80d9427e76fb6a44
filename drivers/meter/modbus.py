"""Modbus energy meters (RTU on a serial port, or TCP), driven by a register map.

This is the only driver-side module that opens pymodbus clients.

- :class:`ModbusBus` owns one bus: a TCP gateway (host:port) or a serial port. Several
  meters on the same bus share one ``ModbusBus`` (the caller creates it and passes it to
  each meter); an :class:`asyncio.Lock` serialises the requests.
- :class:`ModbusMeter` implements :class:`drivers.base.Meter` for one unit id on a bus.
- :func:`meter_from_settings` builds both from the agent's configuration.

Reconnection is ours, not pymodbus': clients are built with ``reconnect_delay=0``, and
after a failed request the client is dropped; the next read opens a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Literal

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from drivers.aio import raise_if_cancelling
from drivers.base import (
    DeviceTimeout,
    FatalDriverError,
    MeterReading,
    ProtocolError,
    TransientDriverError,
)
from drivers.meter.maps import PlannedRead, RegisterMap, decode, load_map, plan_reads

log = logging.getLogger(__name__)

Transport = Literal["tcp", "rtu"]
ModbusClient = AsyncModbusTcpClient | AsyncModbusSerialClient

#: Names of the standard Modbus exception codes, for error messages.
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_TABLES = {3: "holding", 4: "input"}


def describe_registers(function_code: int, address: int, count: int) -> str:
    """``input registers 0x0000..0x0049 (FC4)``: how errors name a read."""
    table = _TABLES.get(function_code, f"FC{function_code}")
    last = address + count - 1
    span = f"0x{address:04X}" if count == 1 else f"0x{address:04X}..0x{last:04X}"
    return f"{table} registers {span} (FC{function_code})"


class ModbusBus:
    """One Modbus bus (serial port or TCP gateway), shared by the meters on it.

    Build it with :meth:`tcp` or :meth:`rtu`. ``timeout_s`` is the wait for one answer,
    ``retries`` how many times pymodbus repeats an unanswered request before the read fails.
    The bus opens itself on the first request and closes when its last meter leaves.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        host: str = "",
        port: int | str,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: int = 1,
        timeout_s: float = 1.0,
        retries: int = 1,
    ) -> None:
        if transport not in ("tcp", "rtu"):
            raise FatalDriverError(f"modbus transport {transport!r} is not 'tcp' or 'rtu'")
        if not timeout_s > 0:
            raise FatalDriverError(f"modbus timeout_s must be positive, got {timeout_s!r}")
        if retries < 0:
            raise FatalDriverError(f"modbus retries must be >= 0, got {retries!r}")
        self.transport: Transport = transport
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.baudrate = baudrate
        self.bytesize = bytesize
        self.parity = parity
        self.stopbits = stopbits
        if transport == "tcp":
            if not host:
                raise FatalDriverError("modbus tcp needs a host")
            try:
                tcp_port = int(port)
            except (TypeError, ValueError):
                raise FatalDriverError(f"modbus tcp port {port!r} is not a number") from None
            if not 0 < tcp_port < 65536:
                raise FatalDriverError(f"modbus tcp port {tcp_port} is out of range")
            self.host = host
            self.port: int | str = tcp_port
            self.description = f"tcp {host}:{tcp_port}"
        else:
            if not isinstance(port, str) or not port:
                raise FatalDriverError(f"modbus rtu needs a serial port path, got {port!r}")
            if parity not in ("N", "E", "O"):
                raise FatalDriverError(f"modbus rtu parity {parity!r} is not N, E or O")
            self.host = ""
            self.port = port
            self.description = f"rtu {port} @{baudrate} {bytesize}{parity}{stopbits}"
        self._lock = asyncio.Lock()
        self._client: ModbusClient | None = None
        self._users: set[int] = set()

    @classmethod
    def tcp(
        cls, host: str, port: int = 502, *, timeout_s: float = 1.0, retries: int = 1
    ) -> ModbusBus:
        """A Modbus TCP gateway or meter at ``host:port``."""
        return cls(transport="tcp", host=host, port=port, timeout_s=timeout_s, retries=retries)

    @classmethod
    def rtu(
        cls,
        port: str,
        *,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: int = 1,
        timeout_s: float = 1.0,
        retries: int = 1,
    ) -> ModbusBus:
        """An RS-485 bus on the serial device ``port`` (e.g. ``/dev/ttyUSB0``)."""
        return cls(
            transport="rtu",
            port=port,
            baudrate=baudrate,
            bytesize=bytesize,
            parity=parity,
            stopbits=stopbits,
            timeout_s=timeout_s,
            retries=retries,
        )

    def __repr__(self) -> str:
        return f"ModbusBus({self.description})"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    # ------------------------------------------------------------------ sharing

    def attach(self, user: object) -> None:
        """Record a meter using the bus (see :meth:`detach`)."""
        self._users.add(id(user))

    async def detach(self, user: object) -> None:
        """Forget a meter; the connection closes when no meter uses the bus. Idempotent."""
        self._users.discard(id(user))
        if not self._users:
            await self.close()

    # ------------------------------------------------------------------ connection

    def _check_port(self) -> None:
        """Configuration errors that no retry can fix -> FatalDriverError."""
        if self.transport != "rtu":
            return
        path = str(self.port)
        if not os.path.exists(path):
            raise FatalDriverError(f"modbus {self.description}: serial port {path} does not exist")
        if not os.access(path, os.R_OK | os.W_OK):
            raise FatalDriverError(f"modbus {self.description}: no read/write permission on {path}")

    def _new_client(self) -> ModbusClient:
        if self.transport == "tcp":
            return AsyncModbusTcpClient(
                self.host,
                port=int(self.port),
                timeout=self.timeout_s,
                retries=self.retries,
                reconnect_delay=0,
                reconnect_delay_max=0,
            )
        return AsyncModbusSerialClient(
            str(self.port),
            framer=FramerType.RTU,
            baudrate=self.baudrate,
            bytesize=self.bytesize,
            parity=self.parity,
            stopbits=self.stopbits,
            timeout=self.timeout_s,
            retries=self.retries,
            reconnect_delay=0,
            reconnect_delay_max=0,
        )

    async def _ensure_client(self) -> ModbusClient:
        """Return a connected client (call with the lock held)."""
        if self._client is not None and self._client.connected:
            return self._client
        self._drop_client()
        self._check_port()
        client = self._new_client()
        try:
            ok = await client.connect()
            raise_if_cancelling()  # pymodbus awaits with wait_for
        except (OSError, ModbusException) as exc:
            client.close()
            raise DeviceTimeout(f"modbus {self.description}: cannot connect: {exc}") from exc
        except asyncio.CancelledError:
            client.close()
            raise
        if not ok or not client.connected:
            client.close()
            raise DeviceTimeout(f"modbus {self.description}: cannot connect")
        self._client = client
        return client

    def _drop_client(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    async def open(self) -> None:
        """Open the bus now. Raises FatalDriverError for a configuration error.

        A bus that cannot be reached now (gateway down, no answer) is not an error here:
        the next read retries and reports :class:`DeviceTimeout`.
        """
        async with self._lock:
            try:
                await self._ensure_client()
            except TransientDriverError as exc:
                log.warning("%s (will retry on the next read)", exc)

    async def close(self) -> None:
        """Close the connection. Idempotent; a later read reopens it."""
        async with self._lock:
            self._drop_client()

    # ------------------------------------------------------------------ requests

    async def read_registers(
        self, *, unit_id: int, function_code: int, address: int, count: int
    ) -> list[int]:
        """Read ``count`` registers; the one place where pymodbus errors are translated.

        Raises DeviceTimeout (no answer, cannot connect), ProtocolError (Modbus exception
        response, malformed answer) or FatalDriverError (serial port missing).
        """
        registers_text = describe_registers(function_code, address, count)
        what = f"unit {unit_id} on {self.description}, {registers_text}"
        async with self._lock:
            client = await self._ensure_client()
            try:
                try:
                    if function_code == 4:
                        response = await client.read_input_registers(
                            address, count=count, device_id=unit_id
                        )
                    elif function_code == 3:
                        response = await client.read_holding_registers(
                            address, count=count, device_id=unit_id
                        )
                    else:
                        raise ProtocolError(f"{what}: function code not supported for reads")
                finally:
                    # pymodbus awaits the answer with wait_for: a cancellation it dropped
                    # wins over its answer and over any error it raised instead.
                    raise_if_cancelling()
            except ModbusIOException as exc:
                self._drop_client()
                if " id=" in str(exc):  # answer from another unit/transaction: garbage
                    raise ProtocolError(f"{what}: mismatched answer: {exc}") from exc
                raise DeviceTimeout(
                    f"{what}: no answer within {self.timeout_s:g} s "
                    f"({self.retries} retr{'y' if self.retries == 1 else 'ies'})"
                ) from exc
            except (ConnectionException, OSError) as exc:
                self._drop_client()
                raise DeviceTimeout(f"{what}: connection lost: {exc}") from exc
            except ModbusException as exc:
                self._drop_client()
                raise ProtocolError(f"{what}: bad answer: {exc}") from exc
            except asyncio.CancelledError:
                # A late answer to a cancelled request must not be taken for the next one.
                self._drop_client()
                raise
            if response.isError():
                code = getattr(response, "exception_code", None)
                if isinstance(code, int):
                    name = EXCEPTION_NAMES.get(code, "unknown")
                    raise ProtocolError(f"{what}: Modbus exception code {code} ({name})")
                self._drop_client()
                raise ProtocolError(f"{what}: error response {response}")
            registers = list(getattr(response, "registers", None) or [])
            if len(registers) != count or any(not 0 <= r <= 0xFFFF for r in registers):
                self._drop_client()
                raise ProtocolError(
                    f"{what}: answered {len(registers)} registers instead of {count}"
                )
            return registers


class ModbusMeter:
    """An energy meter at ``unit_id`` on a :class:`ModbusBus`, read with a register map."""

    def __init__(self, bus: ModbusBus, register_map: RegisterMap, *, unit_id: int = 1) -> None:
        if isinstance(unit_id, bool) or not isinstance(unit_id, int) or not 1 <= unit_id <= 247:
            raise FatalDriverError(f"modbus unit id {unit_id!r} is outside 1..247")
        self.bus = bus
        self.register_map = register_map
        self.unit_id = unit_id
        self.plan: list[PlannedRead] = plan_reads(register_map)
        self.description = f"{register_map.model} unit {unit_id} on {bus.description}"

    def __repr__(self) -> str:
        return f"ModbusMeter({self.description})"

    async def connect(self) -> None:
        """Join the bus and open it. Raises FatalDriverError (e.g. serial port missing)."""
        self.bus.attach(self)
        await self.bus.open()

    async def read(self) -> MeterReading:
        """Read every register of the map once and decode it.

        Raises DeviceTimeout when the meter does not answer and ProtocolError for an
        exception response or a value that cannot be a reading (energy NaN/sentinel).
        """
        blocks: dict[tuple[int, int], list[int]] = {}
        for function_code, start, count in self.plan:
            blocks[(function_code, start)] = await self.bus.read_registers(
                unit_id=self.unit_id, function_code=function_code, address=start, count=count
            )
        try:
            return decode(self.register_map, blocks)
        except ProtocolError as exc:
            raise ProtocolError(f"{self.description}: {exc}") from exc

    async def close(self) -> None:
        """Leave the bus (it closes when no meter is left). Idempotent."""
        await self.bus.detach(self)


def bus_from_settings(
    *,
    transport: str,
    host: str,
    port: int | str,
    baudrate: int = 9600,
    timeout_s: float = 1.0,
    retries: int = 1,
) -> ModbusBus:
    """A bus from the agent's settings: ``port`` is a TCP port or a serial device path."""
    if transport == "tcp":
        return ModbusBus(
            transport="tcp", host=host, port=port, timeout_s=timeout_s, retries=retries
        )
    if transport == "rtu":
        return ModbusBus.rtu(str(port), baudrate=baudrate, timeout_s=timeout_s, retries=retries)
    raise FatalDriverError(f"modbus transport {transport!r} is not 'tcp' or 'rtu'")


def meter_from_settings(
    *,
    model: str,
    transport: str,
    host: str,
    port: int | str,
    unit_id: int,
    baudrate: int = 9600,
    timeout_s: float = 1.0,
    retries: int = 1,
    bus: ModbusBus | None = None,
) -> ModbusMeter:
    """A meter from the agent's settings; ``model`` is a map name or a map file path.

    Meters on the same bus must share one :class:`ModbusBus`: build it once with
    :func:`bus_from_settings` and pass it as ``bus`` (its transport and port must match).
    Raises FatalDriverError for a bad model, map or setting.
    """
    register_map = load_map(model)
    wanted = bus_from_settings(
        transport=transport,
        host=host,
        port=port,
        baudrate=baudrate,
        timeout_s=timeout_s,
        retries=retries,
    )
    if bus is None:
        bus = wanted
    elif (bus.transport, bus.host, bus.port) != (wanted.transport, wanted.host, wanted.port):
        raise FatalDriverError(
            f"meter settings name {wanted.description} but the shared bus is {bus.description}"
        )
    return ModbusMeter(bus, register_map, unit_id=unit_id)
