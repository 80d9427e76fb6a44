"""Time one full SDM630 read through the Modbus meter driver, over TCP and RTU (pty).

Runs the pymodbus meter simulator in the same event loop, so the figures include both
client and server work. Usage::

    ./.venv/bin/python bench/bench_modbus.py [--reads 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from drivers.meter.maps import load_map, plan_reads
from drivers.meter.modbus import ModbusBus, ModbusMeter
from drivers.sim.modbus_meter import SimMeterServer, start_meter_server
from drivers.sim.physics import SimConnector, VirtualEV

WARMUP = 10


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``samples``."""
    ordered = sorted(samples)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


async def bench(transport: str, reads: int) -> tuple[float, float, float]:
    register_map = load_map("sdm630")
    connector = SimConnector(ev=VirtualEV(plugged=True), offered_current_a=16.0, energy_wh=1e6)
    connector.changed()
    server: SimMeterServer = await start_meter_server(
        {1: connector}, register_map, transport=transport
    )
    try:
        if transport == "tcp":
            assert server.port is not None
            bus = ModbusBus.tcp("127.0.0.1", server.port, timeout_s=1.0, retries=0)
        else:
            assert server.serial_path is not None
            bus = ModbusBus.rtu(server.serial_path, timeout_s=1.0, retries=0)
        meter = ModbusMeter(bus, register_map, unit_id=1)
        await meter.connect()
        for _ in range(WARMUP):
            await meter.read()
        samples: list[float] = []
        for _ in range(reads):
            started = time.perf_counter()
            await meter.read()
            samples.append(time.perf_counter() - started)
        await meter.close()
    finally:
        await server.stop()
    return percentile(samples, 0.5), percentile(samples, 0.99), statistics.fmean(samples)


async def main(reads: int) -> None:
    plan = plan_reads(load_map("sdm630"))
    print(f"SDM630: {len(plan)} request(s) per read {[tuple(r) for r in plan]}, {reads} reads")
    for transport, label in (("tcp", "TCP (loopback)"), ("rtu", "RTU (pty pair)")):
        p50, p99, mean = await bench(transport, reads)
        print(
            f"{label:16s} p50 {p50 * 1e3:7.3f} ms   p99 {p99 * 1e3:7.3f} ms   "
            f"mean {mean * 1e3:7.3f} ms"
        )
    # A pty has no baud rate: on a real RS-485 line the bytes themselves take time.
    frame_bytes = sum(8 + 5 + 2 * count for _, _, count in plan)
    for baud in (9600, 19200, 38400):
        wire_ms = (frame_bytes * 10 + 2 * len(plan) * 3.5 * 10) / baud * 1e3
        print(f"  on a real line at {baud:5d} 8N1 the frames alone take ~{wire_ms:.0f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300, help="timed reads per transport")
    args = parser.parse_args()
    asyncio.run(main(args.reads))
