"""CPU spent polling the hardware at the default cadences (prints figures, asserts nothing).

Runs the real RAPI driver and the real Modbus meter driver against the device simulators
(RAPI on a pty, SDM630 over Modbus TCP) in this process, polling as the agent does by
default: the meter every 10 s ([hardware] meter_poll_s), the controller's `$SY` heartbeat
every 30 s and its safety `$GS` poll every 30 s. The simulators run in a child process, so
only the drivers' CPU is measured.

Usage: python bench/bench_polling.py [--seconds 60] [--meter-poll-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import resource
import shutil
import tempfile
import time
from pathlib import Path

from drivers.evse.rapi import RapiController
from drivers.meter.modbus import meter_from_settings
from drivers.sim import process as sim_process


def scratch(prefix: str, dir: Path | str | None = None) -> Path:
    """A temporary directory removed when the bench exits, after a failure too (atexit)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(seconds: float, meter_poll_s: float) -> None:
    work = scratch("evcp-poll-")
    sim, info = await sim_process.spawn(work / "sim.sock")
    evse = RapiController(port=info["evse_ports"][0])
    meter = meter_from_settings(model="sdm630", transport="tcp", host="127.0.0.1",
                                port=info["meter"]["port"], unit_id=1)  # fmt: skip
    await evse.start()
    await meter.connect()

    async def poll_meter() -> int:
        reads = 0
        while True:
            await meter.read()
            reads += 1
            await asyncio.sleep(meter_poll_s)

    # Round trips, for reference.
    t = time.perf_counter()
    for _ in range(100):
        await meter.read()
    meter_ms = (time.perf_counter() - t) * 10
    t = time.perf_counter()
    for _ in range(100):
        await evse.read_status()
    rapi_ms = (time.perf_counter() - t) * 10

    cpu0, wall0 = cpu_s(), time.monotonic()
    task = asyncio.create_task(poll_meter())
    await asyncio.sleep(seconds)
    task.cancel()
    cpu1, wall1 = cpu_s(), time.monotonic()
    await evse.close()
    await meter.close()
    await sim_process.stop(sim)
    per_hour = (cpu1 - cpu0) / (wall1 - wall0) * 3600
    print(
        f"full SDM630 read over TCP: {meter_ms:.2f} ms; RAPI $GS+$GG status read: {rapi_ms:.2f} ms"
    )
    print(f"CPU polling at the default cadences (meter every {meter_poll_s:g} s, RAPI heartbeat"
          f" and poll every 30 s): {per_hour:.2f} s per hour"
          f" = {per_hour / 36:.4f} % of one core (measured over {wall1 - wall0:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--meter-poll-s", type=float, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.meter_poll_s))
