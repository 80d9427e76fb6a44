"""RAPI round-trip time over the OpenEVSE simulator on a pseudo-terminal.

Usage: ``./.venv/bin/python bench/bench_rapi.py [--reads N]``

Sends ``$GS`` N times (default 500) through :class:`drivers.evse.rapi.RapiController` and
prints p50/p99/max of the command -> reply time. The simulator runs in the same event loop,
so this measures the driver, the pty and the simulator together: not a real 115200 baud line
(where a ``$GS`` exchange alone takes about 3 ms on the wire).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.evse.rapi import RapiController
from drivers.sim.physics import SimConnector
from drivers.sim.rapi_device import RapiDevice


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, round(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def run(reads: int) -> list[float]:
    device = RapiDevice(SimConnector())
    path = await device.start()
    ctrl = RapiController(port=path, timeout_s=1.0, poll_interval_s=0)
    try:
        await ctrl.start()
        for _ in range(20):  # warm-up
            await ctrl.request("GS")
        samples: list[float] = []
        for _ in range(reads):
            t0 = time.perf_counter()
            await ctrl.request("GS")
            samples.append(time.perf_counter() - t0)
        return samples
    finally:
        await ctrl.close()
        await device.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=500, help="number of $GS reads")
    args = parser.parse_args()
    samples = sorted(asyncio.run(run(args.reads)))
    ms = [s * 1000 for s in samples]
    print(f"RAPI $GS round trip over a pty simulator ({len(ms)} reads)")
    print(f"  python {platform.python_version()} on {platform.machine()} {platform.system()}")
    print(f"  p50  {percentile(ms, 50):.3f} ms")
    print(f"  p99  {percentile(ms, 99):.3f} ms")
    print(f"  max  {ms[-1]:.3f} ms")
    print(f"  mean {statistics.fmean(ms):.3f} ms")


if __name__ == "__main__":
    main()
