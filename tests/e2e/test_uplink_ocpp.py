"""The OCPP connection across an uplink switch, in real network namespaces (see
tests/e2e/netns.py for the topology).

The agent runs as its own process (``python -m agent run``, simulated hardware, the route
back-end) inside the "charger" namespace; the test CSMS runs in this process over WSS,
listening inside the "csms" namespace. A transaction runs (RemoteStartTransaction, a
MeterValues every second) while the WiFi link fails -- (a) it loses its carrier, (b) its
router silently drops everything meant for the CSMS -- and the test checks what the CSMS
sees: a new connection from the charger's gsm0 address, and every transaction message the
agent queued (its log says which) delivered once, in order. Also: ICCID and IMSI from the
simulated modem (on a pty) in BootNotification.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from ocpp.v16 import call

from agent.control import request as control_request
from agent.ocpp.csms import Csms
from drivers.sim.modem import SimModem
from tests.conftest import CP_ID, PASSWORD, server_context, write_config
from tests.e2e.netns import (
    CSMS_ADDR,
    LINKS,
    ROOT,
    Topology,
    netns_unavailable,
    socket_in_netns,
)

pytestmark = pytest.mark.skipif((reason := netns_unavailable()) is not None, reason=str(reason))

PORT = 8443
QUEUED = re.compile(r"queued (\w+) #(\d+) of transaction (\d+) taken at (\S+)")
WIFI_ADDR, GSM_ADDR = LINKS["wifi"][1], LINKS["gsm"][1]

UPLINK = """
[uplink]
backend = "route"
hold_s = {hold_s}
probe_interval_s = 1.0
probe_timeout_s = 0.9
failures_to_down = 3
successes_to_up = 2
gsm_probe_interval_s = 30
gsm_ping_interval_s = 0.5    # WebSocketPingInterval is 0 (no pings) in these tests

[[uplink.links]]
name = "wifi"
interface = "wifi0"
kind = "wifi"
priority = 1

[[uplink.links]]
name = "gsm"
interface = "gsm0"
kind = "gsm"
priority = 2
{gsm_extra}
"""


@dataclass
class Agent:
    proc: asyncio.subprocess.Process
    config: Path
    log_path: Path

    async def control(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.to_thread(
            control_request, self.config.parent / "control.sock", payload, timeout_s=5.0
        )

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def status(self) -> dict[str, Any]:
        return await self.control({"cmd": "status"})


AgentFactory = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def topo() -> AsyncIterator[Topology]:
    topology = Topology()
    await asyncio.to_thread(topology.up)
    try:
        yield topology
    finally:
        await asyncio.to_thread(topology.down)


@pytest.fixture
async def csms(topo: Topology, ca: trustme.CA) -> AsyncIterator[Csms]:
    server = Csms(passwords={CP_ID: PASSWORD})
    sock = socket_in_netns(topo.csms, CSMS_ADDR, PORT)
    await server.start(server_context(ca, CSMS_ADDR), sock=sock)
    yield server
    await server.stop()


@pytest.fixture
async def agent(
    topo: Topology, csms: Csms, ca_file: Path, tmp_path: Path
) -> AsyncIterator[AgentFactory]:
    started: list[Agent] = []

    async def start(gsm_extra: str = "", hold_s: float = 3600) -> Agent:
        config = write_config(
            tmp_path,
            url=f"wss://{CSMS_ADDR}:{PORT}/ocpp",
            ca_file=ca_file,
            time_scale=60.0,
            response_timeout_s=10,
            ocpp={"MeterValueSampleInterval": 1, "WebSocketPingInterval": 0},
            extra=UPLINK.format(gsm_extra=gsm_extra, hold_s=hold_s),
        )
        log_path = tmp_path / "agent.log"
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC")}  # fmt: skip
        with log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                *topo.exec_argv(
                    topo.charger, [sys.executable, "-m", "agent", "run", "--config", str(config)]
                ),
                cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        started.append(Agent(proc, config, log_path))
        return started[-1]

    yield start
    for a in started:
        if a.proc.returncode is None:
            a.proc.terminate()  # SIGTERM to `ip netns exec`, which is the agent (it execs)
            try:
                await asyncio.wait_for(a.proc.wait(), 30)
            except TimeoutError:
                a.proc.kill()
                await a.proc.wait()


async def until(what: str, check: Callable[[], Awaitable[bool]], agent: Agent,
                timeout_s: float = 60.0) -> None:  # fmt: skip
    """Poll ``check`` until true; fail with the agent's log after a generous timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert agent.proc.returncode is None, f"the agent exited:\n{agent.log()}"
        assert loop.time() < deadline, f"timed out waiting for {what}:\n{agent.log()[-6000:]}"
        await asyncio.sleep(0.1)


async def uplink_active(agent: Agent) -> str | None:
    with contextlib.suppress(Exception):
        uplink = (await agent.status()).get("uplink") or {}
        active: str | None = uplink.get("active")
        return active
    return None


async def meter_values_of(csms: Csms, tx_id: int) -> list[dict[str, Any]]:
    return [p for p in csms.messages("MeterValues") if p.get("transactionId") == tx_id]


@pytest.mark.parametrize("fault", ["carrier", "silent"])
async def test_a_transaction_runs_across_a_switch_to_gsm_and_nothing_is_lost_or_doubled(
    topo: Topology, csms: Csms, agent: AgentFactory, fault: str
) -> None:
    a = await agent()
    await csms.wait_message("BootNotification", timeout_s=60)
    assert csms.peers == [WIFI_ADDR]  # over wifi0 first
    await until("wifi active", lambda: _is(uplink_active(a), "wifi"), a)
    await until(
        "gsm probed healthy",
        lambda: _link_healthy(a, "gsm"),
        a,
    )

    # a transaction, started by the CSMS
    await a.control({"cmd": "sim", "request": {"cmd": "plug", "connector": 1}})
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="TAG-1", connector_id=1))
    assert answer["status"] == "Accepted"
    start = await csms.wait_message("StartTransaction", timeout_s=30)
    tx_id = 1001
    await csms.wait_for(lambda: len([p for p in csms.messages("MeterValues")
                                     if p.get("transactionId") == tx_id]) >= 2,
                        timeout_s=30)  # fmt: skip

    # The fault, between two MeterValues: once the last one is acknowledged. (A fault that
    # cuts off the CSMS's answer to a CALL it received gets that CALL sent again after the
    # reconnect: no charger can tell whether it arrived. The agent only resends what was
    # not acknowledged, which this test checks; see tests/e2e/test_powerloss.py.)
    await until("the MeterValues acknowledged", lambda: _queue_empty(a), a)
    if fault == "carrier":
        topo.carrier("wifi", False)
    else:
        topo.blackhole("wifi", True)
    await csms.wait_for(lambda: GSM_ADDR in csms.peers, timeout_s=60)
    assert csms.peers == [WIFI_ADDR, GSM_ADDR]  # one reconnect, over gsm
    status = await a.status()
    assert status["uplink"]["active"] == "gsm"
    assert status["uplink"]["last_switch"]["from"] == "wifi"
    assert topo.route_dev() == "gsm0"
    after = len(await meter_values_of(csms, tx_id))
    await csms.wait_for(lambda: len([p for p in csms.messages("MeterValues")
                                     if p.get("transactionId") == tx_id]) >= after + 2,
                        timeout_s=30)  # fmt: skip

    # WebSocket keep-alive per link kind: no pings over wifi, gsm_ping_interval_s over gsm
    async def pinged_over_gsm() -> bool:
        return "> PING" in a.log().partition("uplink: switched wifi -> gsm")[2]

    await until("a WebSocket ping over gsm", pinged_over_gsm, a)
    assert "> PING" not in a.log().partition("uplink: switched wifi -> gsm")[0]

    answer = await csms.call(CP_ID, call.RemoteStopTransaction(transaction_id=tx_id))
    assert answer["status"] == "Accepted"
    stop = await csms.wait_message("StopTransaction", timeout_s=30)
    assert stop.payload["transactionId"] == tx_id

    await until("the queue emptied", lambda: _queue_empty(a), a)

    # what the CSMS got of the transaction, against what the agent queued (its log)
    got = [
        (r.action, _taken(r.action, r.payload))
        for r in csms.received
        if r.action in ("StartTransaction", "StopTransaction")
        or (r.action == "MeterValues" and r.payload.get("transactionId") == tx_id)
    ]
    queued = [(action, taken) for action, _seq, _local, taken in QUEUED.findall(a.log())]
    assert queued, "no 'queued ... taken at' lines: is the QUEUED pattern still the log line?"
    assert got == queued, (
        got,
        queued,
    )  # each once, in the order taken: nothing lost, nothing twice
    stamps = [taken for _action, taken in got]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert start.payload["connectorId"] == 1
    assert all(p["transactionId"] == tx_id for p in csms.messages("MeterValues")
               if "transactionId" in p)  # fmt: skip
    assert status["queue"]["dropped"] == 0
    assert csms.errors == []
    switches = [line for line in a.log().splitlines() if "uplink: switched" in line]
    assert len(switches) == 2, switches  # the start, and wifi -> gsm: one line each
    assert "wifi -> gsm" in switches[1]


async def _queue_empty(agent: Agent) -> bool:
    queue = (await agent.status())["queue"]
    return bool(queue["pending"] == 0 and queue["failed"] == 0)


def _taken(action: str, payload: dict[str, Any]) -> str:
    if action == "MeterValues":
        return str(payload["meterValue"][0]["timestamp"])
    return str(payload["timestamp"])


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _link_healthy(agent: Agent, name: str) -> bool:
    with contextlib.suppress(Exception):
        uplink = (await agent.status()).get("uplink") or {}
        return any(lk["name"] == name and lk["healthy"] for lk in uplink.get("links", []))
    return False


async def test_iccid_and_imsi_of_the_modem_go_into_boot_notification(
    csms: Csms, agent: AgentFactory
) -> None:
    modem = SimModem()
    path = await modem.start()
    try:
        a = await agent(gsm_extra=f'at_port = "{path}"')
        boot = await csms.wait_message("BootNotification", timeout_s=60)
        assert boot.payload["iccid"] == "89441000301234567890"
        assert boot.payload["imsi"] == "234150123456789"
        status = await a.status()
        modem_status = status["uplink"]["modem"]
        assert modem_status["iccid"] == "89441000301234567890"
        assert modem_status["rssi_dbm"] == -73
    finally:
        await modem.stop()


async def evcp(*argv: str) -> tuple[int, str, str]:
    """The ``evcp`` command line, as its own process (in the test's own namespace: the
    control socket is a path)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_evcp_uplink_switch_forces_a_link_and_evcp_status_shows_it(
    topo: Topology, csms: Csms, agent: AgentFactory
) -> None:
    a = await agent(hold_s=1)
    config = str(a.config)
    await csms.wait_message("BootNotification", timeout_s=60)
    await until("gsm probed healthy", lambda: _link_healthy(a, "gsm"), a)

    code, out, err = await evcp("uplink", "switch", "gsm", "--config", config)
    assert code == 0, err
    assert out.startswith("Uplink   gsm (forced) via the route back-end"), out
    await csms.wait_for(lambda: csms.peers == [WIFI_ADDR, GSM_ADDR], timeout_s=60)
    assert topo.route_dev() == "gsm0"

    code, out, err = await evcp("status", "--config", config)
    assert code == 0, err
    assert "Uplink   gsm (forced) via the route back-end" in out
    assert re.search(r"\* gsm +gsm0 +healthy", out), out
    assert re.search(r"last switch \S+: wifi -> gsm \(forced by the operator\)", out), out
    code, out, err = await evcp("status", "--json", "--config", config)
    assert json.loads(out)["uplink"]["forced"] == "gsm"

    code, out, err = await evcp("uplink", "switch", "lte", "--config", config)
    assert (code, out) == (1, "")
    assert "no link named 'lte'" in err
    assert csms.peers == [WIFI_ADDR, GSM_ADDR]  # nothing moved

    # the choice back to the rules: wifi has been healthy for longer than the hold
    code, out, err = await evcp("uplink", "switch", "auto", "--config", config)
    assert code == 0, err
    await csms.wait_for(lambda: csms.peers == [WIFI_ADDR, GSM_ADDR, WIFI_ADDR], timeout_s=60)
    status = await a.status()
    assert status["uplink"]["active"] == "wifi" and status["uplink"]["forced"] is None
    assert len([ln for ln in a.log().splitlines() if "uplink: switched" in ln]) == 3


async def test_csms_reachable_only_over_gsm_from_the_start(
    topo: Topology, csms: Csms, agent: AgentFactory
) -> None:
    # The WiFi router is dead both ways (here: it drops what goes to the CSMS and what comes
    # back to the charger), so the OS's own choice (wifi0, metric 600) leads nowhere: a
    # connect attempt made over it before the supervisor's first choice is given up.
    topo.blackhole("wifi", True)
    topo.ip(topo.routers["wifi"], "route", "add", "blackhole", f"{WIFI_ADDR}/32")
    a = await agent()
    await csms.wait_message("BootNotification", timeout_s=90)
    assert csms.peers == [GSM_ADDR]
    status = await a.status()
    assert status["uplink"]["active"] == "gsm"
    assert status["uplink"]["last_switch"]["from"] is None  # a first choice, not a switch

    async def registered() -> bool:
        csms_status = (await a.status())["csms"]
        return bool(csms_status["connected"] and csms_status["registered"])

    await until("the agent registered", registered, a)
    assert csms.peers == [GSM_ADDR]

    # an orderly stop removes the agent's copy of the route: the OS's own choice applies
    assert any(r.get("metric") == 10 for r in topo.default_routes())
    a.proc.terminate()
    assert await asyncio.wait_for(a.proc.wait(), 30) == 0
    assert sorted((r["dev"], r.get("metric")) for r in topo.default_routes()) == [
        ("gsm0", 700),
        ("wifi0", 600),
    ]
