"""``evcp logs --tx`` against a real journal: the agent (``evcp run``, log_target =
"journal") logs through systemd-python to a systemd-journald of its own, started in a
private mount and PID namespace (a tmpfs over /run, so the machine's journal is not
touched, and everything in the namespace dies with it); ``evcp logs`` runs in the same
namespace (nsenter) and must pick a transaction's lines by their journal fields.

Needs root, unshare/nsenter and systemd-journald: skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.ocpp.csms import Csms
from tests.conftest import RunningAgent, start_charging, status_is, write_config
from tests.e2e.test_cli import REPO

JOURNALD = Path("/usr/lib/systemd/systemd-journald")
MISSING = [
    name
    for name, there in (
        ("root", os.geteuid() == 0),
        ("unshare", shutil.which("unshare") is not None),
        ("nsenter", shutil.which("nsenter") is not None),
        ("journalctl", shutil.which("journalctl") is not None),
        (str(JOURNALD), JOURNALD.exists()),
    )
    if not there
]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"a private journald needs {', '.join(MISSING)}"
)

#: Inside the namespace: a tmpfs over /run (and over /var/log/journal, if there is one),
#: journald on it, then the agent.
SCRIPT = r"""
set -e
mount -t tmpfs tmpfs /run
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
mkdir -p /run/systemd/journal /run/log/journal
"$0" &
while [ ! -S /run/systemd/journal/socket ]; do sleep 0.05; done
exec "$@"
"""


class JournaledAgent:
    def __init__(self, proc: asyncio.subprocess.Process, config: Path) -> None:
        self.proc, self.config = proc, config
        self.agent = RunningAgent(config)

    def namespace_pid(self) -> int:
        """The agent's pid as seen from here (the child of ``unshare``)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return int(children.split()[0])

    async def logs(self, *args: str) -> tuple[int, str, str]:
        done = await asyncio.to_thread(
            subprocess.run,
            ["nsenter", "--target", str(self.namespace_pid()), "--mount", f"--wd={REPO}",
             sys.executable, "-m", "agent", "logs", "--unit", "", *args],
            capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    async def entries(self, *args: str) -> list[dict[str, Any]]:
        code, out, err = await self.logs(*args, "--json")
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
async def journaled(tmp_path: Path, csms: Csms, ca_file: Path) -> AsyncIterator[JournaledAgent]:
    config = write_config(tmp_path, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file,
                          agent_extra='log_target = "journal"')  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
        "sh", "-c", SCRIPT, str(JOURNALD), sys.executable, "-m", "agent", "run",
        "--config", str(config),
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    agent = JournaledAgent(proc, config)
    try:
        async with asyncio.timeout(30):
            while not (agent.agent.socket.exists() and await agent.agent.running()):
                if proc.returncode is not None:
                    assert proc.stderr is not None
                    raise AssertionError((await proc.stderr.read()).decode())
                await asyncio.sleep(0.1)
        yield agent
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)  # unshare kills the namespace's pid 1: all die
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def one_session(agent: RunningAgent, csms: Csms, tag: str) -> tuple[int, int]:
    """Charge and unplug; return (CSMS id, local id)."""
    csms_id = await start_charging(agent, csms, tag=tag)
    local_id = int((await agent.status())["connectors"][0]["transaction_local_id"])
    mark = len(csms.received)
    await agent.sim("unplug")
    await csms.wait_message("StopTransaction", after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    return csms_id, local_id


async def test_logs_tx_picks_a_transactions_lines_by_their_fields(
    journaled: JournaledAgent, csms: Csms
) -> None:
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    first = await one_session(journaled.agent, csms, "TAG-A")
    second = await one_session(journaled.agent, csms, "TAG-B")
    assert first[1] != second[1]

    async def lines_of(tx: str, stop_text: str) -> list[dict[str, Any]]:
        async with asyncio.timeout(20):
            while True:  # journald writes on its own time
                found = await journaled.entries("--tx", tx)
                if any(stop_text in e["MESSAGE"] for e in found):
                    return found
                await asyncio.sleep(0.2)

    csms_id, local_id = second
    by_csms = await lines_of(str(csms_id), f"transaction {csms_id} (local {local_id}) stopped")
    assert {e["EVCP_TRANSACTION"] for e in by_csms} == {str(local_id)}
    messages = [e["MESSAGE"] for e in by_csms]
    # The line logged before the CSMS gave its id is there too (it has the local id only).
    started = [e for e in by_csms if f"transaction local {local_id} started" in e["MESSAGE"]]
    assert len(started) == 1 and "EVCP_CSMS_TRANSACTION" not in started[0], messages
    assert any(f"is the CSMS's transaction {csms_id}" in m for m in messages), messages
    assert all(e.get("EVCP_CONNECTOR") == "1" for e in by_csms)
    assert not any("TAG-A" in m for m in messages)

    by_local = await lines_of(f"local:{first[1]}", f"transaction {first[0]} (local {first[1]})")
    assert {e["EVCP_TRANSACTION"] for e in by_local} == {str(first[1])}
    assert any("TAG-A" in e["MESSAGE"] for e in by_local)

    code, out, err = await journaled.logs("--tx", "987654")
    assert code == 0 and "no journal line names the CSMS's transaction 987654" in err
    assert str(local_id) not in out.replace("-- No entries --", "")
