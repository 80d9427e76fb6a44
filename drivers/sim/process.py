"""The device simulators as a child process (``python -m drivers.sim``), for whoever needs
them on the real wire: the agent with ``[hardware] driver = "sim"``, the benchmarks, a
hardware-in-the-loop rig.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any


class SimulatorStartError(RuntimeError):
    """The simulator process did not come up (it printed no device list in time)."""


async def spawn(
    control: Path, *options: str, start_timeout_s: float = 20.0
) -> tuple[asyncio.subprocess.Process, dict[str, Any]]:
    """Start the simulators with ``options`` (see ``python -m drivers.sim --help``) and a
    control socket at ``control``; return the process and where its devices are (its first
    line: ``{"evse_ports": [...], "meter": {...}, "control": ...}``)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "drivers.sim", *options, "--control", str(control),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(start_timeout_s):
            line = await process.stdout.readline()
        info: dict[str, Any] = json.loads(line)
    except (TimeoutError, ValueError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise SimulatorStartError("the hardware simulator did not start") from None
    return process, info


async def stop(process: asyncio.subprocess.Process, timeout_s: float = 5.0) -> None:
    """End the simulators (they exit when their stdin closes; killed after ``timeout_s``)."""
    if process.returncode is not None:
        return
    if process.stdin is not None:
        process.stdin.close()
    try:
        async with asyncio.timeout(timeout_s):
            await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def command(control: Path | str, request: dict[str, Any]) -> dict[str, Any]:
    """Send one command (e.g. ``{"cmd": "plug", "connector": 1}``) to the simulators'
    control socket; return their answer."""
    reader, writer = await asyncio.open_unix_connection(str(control))
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        answer: dict[str, Any] = json.loads(await reader.readline())
        return answer
    finally:
        writer.close()
