"""``evcp demo --serve`` as a newcomer runs it: the demo CSMS and the agent stay up, the
printed config drives them with ``evcp status`` and ``evcp sim``, and Ctrl-C (SIGINT)
stops everything and removes the demo's directory."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from pathlib import Path

from tests.e2e.test_cli import REPO, evcp


async def read_until(stream: asyncio.StreamReader, pattern: str, seen: list[str]) -> re.Match[str]:
    async with asyncio.timeout(60):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("the demo ended early:\n" + "".join(seen))
            seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match


async def test_demo_serve_stays_up_for_status_and_sim_then_cleans_up() -> None:
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "demo", "--serve", "--time-scale", "600",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert demo.stdout is not None and demo.stderr is not None
    seen: list[str] = []
    try:
        agent_pid = int((await read_until(demo.stdout, r"\(pid (\d+)\)", seen)).group(1))
        config = (await read_until(demo.stdout, r"^Config: (\S+)$", seen)).group(1)
        await read_until(demo.stdout, r"Ctrl-C", seen)

        status = await evcp("status", "--config", config)
        assert status.code == 0, status
        assert "connected" in status.out and "not connected" not in status.out
        assert "Available" in status.out

        plug = await evcp("sim", "plug", "1", "--config", config)
        assert plug.code == 0, plug
        swipe = await evcp("sim", "swipe", "DEMO-TAG-01", "--config", config)
        assert "transaction started" in swipe.out, swipe
        await read_until(demo.stdout, r"StatusNotification connector 1: Charging", seen)
        table = await evcp("status", "--config", config)
        assert "Charging" in table.out, table

        demo.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await demo.wait()
        assert code == 0, "".join(seen) + (await demo.stderr.read()).decode()
        assert not Path(config).parent.exists()  # the demo's directory is gone
        async with asyncio.timeout(15):
            while Path(f"/proc/{agent_pid}").exists():  # and so is its agent
                await asyncio.sleep(0.1)
        after = await evcp("status", "--config", config)
        after.assert_clean_error(2, config)  # (the config went with the directory)
    finally:
        if demo.returncode is None:
            demo.kill()
            with contextlib.suppress(ProcessLookupError):
                await demo.wait()
