"""Without an ``[uplink]`` section the agent behaves as before: no ``"uplink"`` in the
status, nothing to switch, no modem identity in BootNotification. With one, the supervisor
runs in its own process: pyroute2 never enters the agent's memory.
(The uplink at work: tests/e2e/test_uplink_ocpp.py, in network namespaces.)"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent.ocpp.csms import Csms
from tests.conftest import RunningAgent, write_config

ROOT = Path(__file__).resolve().parents[2]


async def test_without_an_uplink_section_nothing_changes(booted: RunningAgent, csms: Csms) -> None:
    status = await booted.status()
    assert "uplink" not in status
    answer = await booted.control({"cmd": "uplink-switch", "link": "gsm"})
    assert answer == {
        "ok": False,
        "error": "no [uplink] section in the config: nothing to switch",
    }
    boot = csms.messages("BootNotification")[0]
    assert "iccid" not in boot and "imsi" not in boot


AGENT_WITH_UPLINK = """
import asyncio, json, os, signal, sys
from agent import app
from agent.config import load
from agent.control import request

async def main():
    cfg = load(sys.argv[1])
    agent = asyncio.create_task(app.run(cfg))
    uplink = None
    for _ in range(2400):
        await asyncio.sleep(0.05)
        if agent.done():
            agent.result()
        try:
            status = await asyncio.to_thread(request, cfg.control_socket, {"cmd": "status"},
                                             timeout_s=5)
        except Exception:
            continue
        uplink = status.get("uplink")
        if uplink and uplink["process"]["running"] and all(
            "does not exist" in link["reason"] for link in uplink["links"]
        ):
            break
    loaded = sorted(m for m in sys.modules
                    if m.split(".")[0] == "pyroute2" or m.startswith("drivers.uplink"))
    print(json.dumps({"loaded": loaded, "uplink": uplink}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # the agent's own orderly stop
    await agent

asyncio.run(main())
"""

UPLINK = """
[uplink]
[[uplink.links]]
name = "wifi"
interface = "evcpnone0"
kind = "wifi"
priority = 1
[[uplink.links]]
name = "gsm"
interface = "evcpnone1"
kind = "gsm"
priority = 2
"""


async def test_with_an_uplink_section_pyroute2_stays_out_of_the_agent(tmp_path: Path) -> None:
    """The supervisor (and pyroute2, ~12 MiB) runs in the uplink process, not the agent.
    (The interfaces do not exist: no link is ever chosen, no route of this machine moves.)"""
    config = write_config(tmp_path, url="wss://127.0.0.1:9/ocpp", ca_file=None, extra=UPLINK)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", AGENT_WITH_UPLINK, str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode == 0, err.decode()[-4000:]
    result = json.loads(out)
    uplink = result["uplink"]
    assert uplink is not None and uplink["process"]["running"], err.decode()[-4000:]
    assert result["loaded"] == []  # neither pyroute2 nor drivers.uplink in the agent
    child = uplink["process"]["pid"]
    assert child != proc.pid
    # the supervisor ran in the child, which the agent's stop ended
    assert "uplink: link wifi: interface evcpnone0 does not exist" in err.decode()
    assert not Path(f"/proc/{child}").exists() or (
        "agent.uplink" not in Path(f"/proc/{child}/cmdline").read_text()
    )
