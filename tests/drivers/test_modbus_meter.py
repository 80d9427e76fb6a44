"""The Modbus meter driver against the real pymodbus meter simulator (TCP and RTU on a pty).

Wire contents are checked with a plain pymodbus client and ``struct``, from the meters'
documented formats, so that a wrong scale or word order in a map cannot hide behind a
matching mistake in the simulator.
"""

from __future__ import annotations

import asyncio
import math
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from drivers.base import DeviceTimeout, FatalDriverError, Meter, MeterReading, ProtocolError
from drivers.meter.maps import RegisterMap, load_map
from drivers.meter.modbus import ModbusBus, ModbusMeter, bus_from_settings, meter_from_settings
from drivers.sim.modbus_meter import SimMeterServer, start_meter_server
from drivers.sim.physics import SimConnector, VirtualEV

TIMEOUT_S = 0.2
ENERGY_WH = 12_345_678.0


def charging_connector(energy_wh: float = ENERGY_WH, *, phases: int = 3) -> SimConnector:
    """A connector drawing 16 A per phase at 230 V; time_scale 0 freezes the energy."""
    connector = SimConnector(
        phases=phases,
        time_scale=0.0,
        energy_wh=energy_wh,
        offered_current_a=16.0,
        ev=VirtualEV(plugged=True, phases=phases),
    )
    connector.changed()
    assert connector.contactor_closed
    return connector


def absent(values: Sequence[float | None]) -> list[bool]:
    """Which phases are None (not available)."""
    return [value is None for value in values]


def bus_for(server: SimMeterServer) -> ModbusBus:
    if server.serial_path is not None:
        return ModbusBus.rtu(server.serial_path, timeout_s=TIMEOUT_S, retries=0)
    assert server.port is not None
    return ModbusBus.tcp("127.0.0.1", server.port, timeout_s=TIMEOUT_S, retries=0)


Start = Callable[..., Awaitable[SimMeterServer]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start simulators for a test and stop them all at its end."""
    started: list[SimMeterServer] = []

    async def _start(
        units: dict[int, SimConnector], register_map: RegisterMap, transport: str = "tcp"
    ) -> SimMeterServer:
        server = await start_meter_server(units, register_map, transport=transport)
        started.append(server)
        return server

    yield _start
    for server in started:
        await server.stop()


# --------------------------------------------------------------------------- wire format

#: model -> (function code, energy address, register count, words -> kWh)
ENERGY_ON_THE_WIRE: dict[str, tuple[int, int, int, Callable[[Sequence[int]], float]]] = {
    "sdm630": (4, 0x0048, 2, lambda w: struct.unpack(">f", struct.pack(">HH", *w))[0]),
    "sdm120": (4, 0x0048, 2, lambda w: struct.unpack(">f", struct.pack(">HH", *w))[0]),
    "abb_b23": (3, 0x5000, 4, lambda w: struct.unpack(">Q", struct.pack(">4H", *w))[0] / 100),
    "em340": (4, 0x0034, 2, lambda w: struct.unpack(">i", struct.pack(">HH", w[1], w[0]))[0] / 10),
}


@pytest.mark.parametrize("model", sorted(ENERGY_ON_THE_WIRE))
async def test_simulator_shows_energy_as_the_real_meter_does(start: Start, model: str) -> None:
    server = await start({1: charging_connector()}, load_map(model))
    fc, address, count, to_kwh = ENERGY_ON_THE_WIRE[model]
    client = AsyncModbusTcpClient("127.0.0.1", port=server.port or 0, timeout=1, retries=0)
    await client.connect()
    try:
        if fc == 4:
            response = await client.read_input_registers(address, count=count, device_id=1)
        else:
            response = await client.read_holding_registers(address, count=count, device_id=1)
    finally:
        client.close()
    assert not response.isError()
    assert to_kwh(response.registers) == pytest.approx(ENERGY_WH / 1000, abs=0.1)


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
@pytest.mark.parametrize(
    ("model", "energy_resolution_wh"),
    [("sdm630", 1.0), ("abb_b23", 10.0), ("em340", 100.0)],
)
async def test_three_phase_meter_reads_the_physics_in_si_units(
    start: Start,
    model: str,
    energy_resolution_wh: float,
    transport: str,
) -> None:
    server = await start({1: charging_connector()}, load_map(model), transport)
    meter = ModbusMeter(bus_for(server), load_map(model), unit_id=1)
    await meter.connect()
    try:
        reading = await meter.read()
    finally:
        await meter.close()
    assert reading.energy_wh == pytest.approx(ENERGY_WH, abs=energy_resolution_wh)
    assert reading.voltage_v == pytest.approx((230.0, 230.0, 230.0))
    assert reading.current_a == pytest.approx((16.0, 16.0, 16.0))
    assert reading.power_w == pytest.approx(3 * 230.0 * 16.0)
    assert reading.power_phase_w == pytest.approx((3680.0, 3680.0, 3680.0))
    assert reading.frequency_hz == pytest.approx(50.0)


async def test_single_phase_meter_reports_only_l1(
    start: Start,
) -> None:
    server = await start({1: charging_connector(phases=1)}, load_map("sdm120"))
    meter = ModbusMeter(bus_for(server), load_map("sdm120"))
    reading = await meter.read()
    await meter.close()
    assert absent(reading.voltage_v) == [False, True, True]
    assert reading.voltage_v[0] == pytest.approx(230.0)
    assert absent(reading.current_a) == [False, True, True]
    assert reading.current_a[0] == pytest.approx(16.0)
    assert reading.power_w == pytest.approx(3680.0)


async def test_energy_follows_the_charging_physics(
    start: Start,
) -> None:
    connector = charging_connector(energy_wh=1000.0)
    server = await start({1: connector}, load_map("sdm630"))
    meter = ModbusMeter(bus_for(server), load_map("sdm630"))
    first = await meter.read()
    connector.time_scale = 3600.0  # one second of test time is one hour of charging
    connector.advance()
    await asyncio.sleep(0.05)
    second = await meter.read()
    await meter.close()
    # 11 040 W for >= 0.05 h is at least 552 Wh.
    assert second.energy_wh - first.energy_wh >= 500.0


# --------------------------------------------------------------------------- values not available


async def test_sentinels_and_nan_on_the_wire_are_none(
    start: Start,
) -> None:
    abb = await start({1: charging_connector()}, load_map("abb_b23"))
    abb.set_registers(1, 3, 0x5B02, [0xFFFF, 0xFFFF])  # voltage L2, uint32
    abb.set_registers(1, 3, 0x5B14, [0x7FFF, 0xFFFF])  # total power, int32
    abb.set_registers(1, 3, 0x5B2C, [0xFFFF])  # frequency, uint16
    meter = ModbusMeter(bus_for(abb), load_map("abb_b23"))
    reading = await meter.read()
    assert absent(reading.voltage_v) == [False, True, False]
    assert reading.voltage_v[0] == pytest.approx(230.0)
    assert reading.power_w is None
    assert reading.frequency_hz is None
    assert reading.energy_wh == pytest.approx(ENERGY_WH, abs=10)
    abb.clear_registers()
    assert (await meter.read()).power_w == pytest.approx(11040.0)
    await meter.close()

    nan = list(struct.unpack(">HH", struct.pack(">f", math.nan)))
    sdm = await start({1: charging_connector()}, load_map("sdm630"))
    sdm.set_registers(1, 4, 0x0046, nan)  # frequency
    sdm.set_registers(1, 4, 0x0006, list(struct.unpack(">HH", struct.pack(">f", math.inf))))
    meter = ModbusMeter(bus_for(sdm), load_map("sdm630"))
    reading = await meter.read()
    assert reading.frequency_hz is None
    assert absent(reading.current_a) == [True, False, False]
    assert reading.current_a[1] == pytest.approx(16.0)
    sdm.set_registers(1, 4, 0x0048, nan)  # energy
    with pytest.raises(ProtocolError, match=r"unit 1 .*energy_import"):
        await meter.read()
    await meter.close()

    em340 = await start({1: charging_connector()}, load_map("em340"))
    em340.set_registers(1, 4, 0x0002, [0xFFFF, 0x7FFF])  # int32 0x7FFFFFFF, low word first
    meter = ModbusMeter(bus_for(em340), load_map("em340"))
    reading = await meter.read()
    await meter.close()
    assert absent(reading.voltage_v) == [False, True, False]
    assert reading.voltage_v[2] == pytest.approx(230.0)


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_silent_meter_times_out_then_recovers(start: Start, transport: str) -> None:
    connector = charging_connector()
    server = await start({3: connector}, load_map("sdm630"), transport)
    meter = ModbusMeter(bus_for(server), load_map("sdm630"), unit_id=3)
    await meter.connect()
    assert (await meter.read()).energy_wh == pytest.approx(ENERGY_WH, abs=1)

    connector.meter_silent = True
    with pytest.raises(DeviceTimeout) as info:
        await meter.read()
    message = str(info.value)
    where = f"127.0.0.1:{server.port}" if transport == "tcp" else str(server.serial_path)
    assert where in message
    assert "unit 3" in message
    assert "0x0000" in message  # the first register of the failed read

    connector.meter_silent = False
    assert (await meter.read()).energy_wh == pytest.approx(ENERGY_WH, abs=1)
    await meter.close()


async def test_exception_response_is_a_protocol_error_naming_code_and_register(
    start: Start,
) -> None:
    server = await start({1: charging_connector()}, load_map("abb_b23"))
    meter = ModbusMeter(bus_for(server), load_map("abb_b23"))
    server.exception_code[1] = 2
    with pytest.raises(ProtocolError) as info:
        await meter.read()
    assert "exception code 2" in str(info.value)
    assert "0x5000" in str(info.value)
    assert "unit 1" in str(info.value)
    del server.exception_code[1]
    assert (await meter.read()).energy_wh == pytest.approx(ENERGY_WH, abs=10)
    await meter.close()


async def test_absent_unit_on_an_rtu_bus_does_not_answer(
    start: Start,
) -> None:
    server = await start({1: charging_connector()}, load_map("sdm630"), "rtu")
    meter = ModbusMeter(bus_for(server), load_map("sdm630"), unit_id=9)
    with pytest.raises(DeviceTimeout, match="unit 9"):
        await meter.read()
    await meter.close()


async def test_tcp_meter_recovers_after_the_gateway_restarts(
    start: Start,
) -> None:
    register_map = load_map("sdm630")
    connector = charging_connector()
    server = await start({1: connector}, register_map)
    port = server.port
    assert port is not None
    meter = ModbusMeter(bus_for(server), register_map)
    await meter.connect()
    await meter.read()
    await server.stop()
    with pytest.raises(DeviceTimeout, match=f"127.0.0.1:{port}"):
        await meter.read()
    restarted = await start_meter_server({1: connector}, register_map, port=port)
    try:
        assert (await meter.read()).energy_wh == pytest.approx(ENERGY_WH, abs=1)
    finally:
        await meter.close()
        await restarted.stop()


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_gateway_is_transient_not_fatal() -> None:
    port = free_tcp_port()
    meter = ModbusMeter(ModbusBus.tcp("127.0.0.1", port, timeout_s=TIMEOUT_S), load_map("sdm630"))
    await meter.connect()  # not fatal: the gateway may come up later
    with pytest.raises(DeviceTimeout, match=f"127.0.0.1:{port}"):
        await meter.read()
    await meter.close()


async def test_missing_serial_port_is_fatal(tmp_path: Path) -> None:
    meter = ModbusMeter(ModbusBus.rtu(str(tmp_path / "ttyUSB9")), load_map("sdm630"))
    with pytest.raises(FatalDriverError, match="ttyUSB9"):
        await meter.connect()
    with pytest.raises(FatalDriverError, match="ttyUSB9"):
        await meter.read()


async def test_short_answer_is_a_protocol_error() -> None:
    """A device that answers fewer registers than asked sends garbage, not a reading."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.readexactly(12):
                tid, _proto, _length, unit, fc = struct.unpack(">HHHBB", request[:8])
                pdu = struct.pack(">BBH", fc, 2, 0x4242)  # one register, whatever was asked
                writer.write(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    device = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = device.sockets[0].getsockname()[1]
    meter = ModbusMeter(ModbusBus.tcp("127.0.0.1", port, timeout_s=TIMEOUT_S), load_map("sdm630"))
    try:
        with pytest.raises(ProtocolError, match="1 registers instead of 74"):
            await meter.read()
    finally:
        await meter.close()
        device.close()
        await device.wait_closed()


# --------------------------------------------------------------------------- sharing a bus


@pytest.mark.parametrize("transport", ["tcp", "rtu"])
async def test_two_meters_share_one_bus_concurrently(start: Start, transport: str) -> None:
    register_map = load_map("abb_b23")  # two requests per read: interleaving would show
    server = await start(
        {1: charging_connector(1_000_000.0), 2: charging_connector(2_000_000.0)},
        register_map,
        transport,
    )
    bus = bus_for(server)
    one = ModbusMeter(bus, register_map, unit_id=1)
    two = ModbusMeter(bus, register_map, unit_id=2)
    await one.connect()
    await two.connect()

    async def read_many(meter: ModbusMeter) -> list[MeterReading]:
        return [await meter.read() for _ in range(10)]

    first, second = await asyncio.gather(read_many(one), read_many(two))
    assert [r.energy_wh for r in first] == [pytest.approx(1_000_000.0, abs=10)] * 10
    assert [r.energy_wh for r in second] == [pytest.approx(2_000_000.0, abs=10)] * 10
    assert server.requests == {1: 20, 2: 20}  # no retried or lost request

    await one.close()
    assert bus.connected  # meter two still uses it
    await two.close()
    assert not bus.connected
    await one.close()  # idempotent


# --------------------------------------------------------------------------- settings


async def test_meter_from_settings_reads_the_simulator(
    start: Start,
) -> None:
    server = await start({5: charging_connector()}, load_map("em340"))
    meter = meter_from_settings(
        model="em340",
        transport="tcp",
        host="127.0.0.1",
        port=str(server.port),
        unit_id=5,
        timeout_s=TIMEOUT_S,
        retries=0,
    )
    assert isinstance(meter, Meter)
    await meter.connect()
    assert (await meter.read()).energy_wh == pytest.approx(ENERGY_WH, abs=100)
    await meter.close()


def test_meter_from_settings_shares_a_matching_bus_only() -> None:
    bus = bus_from_settings(transport="rtu", host="", port="/dev/ttyUSB0")
    one = meter_from_settings(
        model="sdm630", transport="rtu", host="", port="/dev/ttyUSB0", unit_id=1, bus=bus
    )
    two = meter_from_settings(
        model="abb_b23", transport="rtu", host="", port="/dev/ttyUSB0", unit_id=2, bus=bus
    )
    assert one.bus is two.bus is bus
    with pytest.raises(FatalDriverError, match="ttyUSB1"):
        meter_from_settings(
            model="sdm630", transport="rtu", host="", port="/dev/ttyUSB1", unit_id=3, bus=bus
        )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model": "nosuchmeter"}, "nosuchmeter"),
        ({"transport": "udp"}, "udp"),
        ({"unit_id": 0}, "unit id"),
        ({"port": "http"}, "port"),
    ],
)
def test_bad_settings_are_fatal(overrides: dict[str, object], match: str) -> None:
    settings: dict[str, object] = {
        "model": "sdm630",
        "transport": "tcp",
        "host": "127.0.0.1",
        "port": 502,
        "unit_id": 1,
    }
    settings.update(overrides)
    with pytest.raises(FatalDriverError, match=match):
        meter_from_settings(**settings)  # type: ignore[arg-type]


async def test_late_rtu_answer_is_not_taken_for_the_next_one(start: Start) -> None:
    connector = charging_connector(energy_wh=1000.0)
    server = await start({1: connector}, load_map("sdm630"), "rtu")
    meter = ModbusMeter(bus_for(server), load_map("sdm630"))
    server.response_delay_s[1] = TIMEOUT_S * 1.5
    with pytest.raises(DeviceTimeout):
        await meter.read()
    await asyncio.sleep(TIMEOUT_S)  # the late answer (energy 1000 Wh) is now on the line
    server.response_delay_s[1] = 0.0
    connector.energy_wh = 2000.0
    assert (await meter.read()).energy_wh == pytest.approx(2000.0)
    await meter.close()


# --------------------------------------------------------------------------- cancellation


async def test_a_polling_loop_always_ends_when_cancelled(start: Start) -> None:
    """The agent stops its meter polling by cancelling it. On Python 3.11 pymodbus's
    wait_for drops a cancellation that lands in the same loop iteration as the answer; the
    driver must still end the loop (or SIGTERM would never stop the agent). The
    cancellation is thrown at many instants around the answers."""
    server = await start({1: charging_connector()}, load_map("sdm630"))
    meter = ModbusMeter(bus_for(server), load_map("sdm630"), unit_id=1)
    await meter.connect()
    loop = asyncio.get_running_loop()
    answers = 0

    async def poll() -> None:
        nonlocal answers
        while True:
            await meter.read()
            answers += 1

    try:
        for attempt in range(200):
            task = loop.create_task(poll())
            # Spread the cancel over a few reads: before, during and just after an answer.
            await asyncio.sleep(0.0002 * (attempt % 25))
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=2)
            assert done, f"attempt {attempt}: the polling loop ignored its cancellation"
            assert task.cancelled()
    finally:
        await meter.close()
    assert answers > 0
