"""The uplink process and the agent's end of it, in real network namespaces (see
tests/e2e/netns.py): the child (``python -m agent.uplink --child``) runs in the "charger"
namespace with the route back-end; a TCP server in the "csms" namespace answers its probes.
The OCPP session is a recording stand-in here (the whole agent across a switch:
tests/e2e/test_uplink_ocpp.py); what is checked is what crosses the pipe: the first choice,
a forced switch and its reconnect, the per-link ping interval, "a CALL awaits its answer"
holding a move back until it is answered, and the route copy removed on an orderly stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.config import load
from agent.uplink.client import UplinkClient, child_argv
from tests.e2e.netns import CSMS_ADDR, Topology, netns_unavailable, socket_in_netns

pytestmark = pytest.mark.skipif((reason := netns_unavailable()) is not None, reason=str(reason))

PORT = 8443
CONFIG = f"""
[csms]
url = "wss://{CSMS_ADDR}:{PORT}/ocpp"
charge_point_id = "CP-1"
password = "0123456789abcdef-test"
[agent]
state_dir = "{{state}}"
[time]
ntp_servers = []
[hardware]
driver = "sim"
[uplink]
backend = "route"
hold_s = 1
probe_interval_s = 0.5
probe_timeout_s = 0.4
failures_to_down = 2
successes_to_up = 1
gsm_probe_interval_s = 1
gsm_ping_interval_s = 5
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
"""


class RecordingSession:
    """Stands in for the OCPP session (see the module docstring)."""

    def __init__(self) -> None:
        self.reconnects: list[str] = []
        self.chosen = 0
        self.in_flight = False

    def reconnect(self, reason: str) -> None:
        self.reconnects.append(reason)

    def call_in_flight(self) -> bool:
        return self.in_flight

    def route_chosen(self) -> None:
        self.chosen += 1


async def until(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def topo() -> AsyncIterator[Topology]:
    topology = Topology()
    await asyncio.to_thread(topology.up)
    try:
        yield topology
    finally:
        await asyncio.to_thread(topology.down)


async def _accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def test_switches_calls_in_flight_and_an_orderly_stop_across_the_pipe(
    topo: Topology, tmp_path: Path
) -> None:
    server = await asyncio.start_server(_accept, sock=socket_in_netns(topo.csms, CSMS_ADDR, PORT))
    path = tmp_path / "evcp.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    client = UplinkClient(load(path), argv=topo.exec_argv(topo.charger, child_argv(path)))
    session = RecordingSession()
    client.attach(session)
    task = asyncio.create_task(client.run())
    try:
        await until("wifi chosen", lambda: client.active == "wifi")
        await until("the first choice relayed", lambda: session.chosen == 1)
        assert session.reconnects == []  # a first choice is not a reconnect
        assert topo.route_dev() == "wifi0"
        assert client.ping_interval_s(30.0) == 30.0

        def gsm_healthy() -> bool:
            return any(lk["name"] == "gsm" and lk["healthy"] for lk in client.snapshot()["links"])

        await until("gsm healthy", gsm_healthy)
        snap = await client.switch("gsm")
        assert snap["active"] == "gsm" and snap["forced"] == "gsm"
        assert session.reconnects == ["uplink switched to gsm: forced by the operator"]
        assert topo.route_dev() == "gsm0"
        assert client.ping_interval_s(30.0) == 5.0  # gsm_ping_interval_s

        # a CALL awaits its answer: the move back (wifi healthy beyond hold_s) waits for it
        session.in_flight = True
        snap = await client.release()
        assert snap["forced"] is None
        await until("the move back due", lambda: client.snapshot()["waiting_for_call"])
        assert client.active == "gsm" and len(session.reconnects) == 1
        session.in_flight = False  # answered: relayed to the child, which moves back
        await until("the move back", lambda: len(session.reconnects) == 2)
        assert session.reconnects[1].startswith("uplink switched to wifi: wifi healthy for")
        assert client.active == "wifi" and topo.route_dev() == "wifi0"
        assert any(r.get("metric") == 10 for r in topo.default_routes())  # the route copy
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
    # the orderly stop: the child removed its route copy, the OS's own routes apply
    assert sorted((r["dev"], r.get("metric")) for r in topo.default_routes()) == [
        ("gsm0", 700),
        ("wifi0", 600),
    ]


async def test_a_killed_uplink_process_is_replaced_and_the_connection_follows_its_choice(
    topo: Topology, tmp_path: Path
) -> None:
    server = await asyncio.start_server(_accept, sock=socket_in_netns(topo.csms, CSMS_ADDR, PORT))
    path = tmp_path / "evcp.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    argv = topo.exec_argv(topo.charger, child_argv(path))
    client = UplinkClient(load(path), argv=argv, restart_min_s=0.1)
    session = RecordingSession()
    client.attach(session)
    task = asyncio.create_task(client.run())
    try:
        await until("wifi chosen", lambda: client.active == "wifi")
        await until(
            "gsm healthy",
            lambda: any(lk["name"] == "gsm" and lk["healthy"] for lk in client.snapshot()["links"]),
        )
        await client.switch("gsm")
        assert topo.route_dev() == "gsm0" and len(session.reconnects) == 1
        first = client.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)  # no clean-up: its route copy on gsm0 stays
        # the new process starts afresh (nothing forced) and picks wifi: the session follows
        await until("the reconnect over wifi", lambda: len(session.reconnects) == 2)
        assert session.reconnects[1] == "uplink process restarted: now on wifi"
        assert client.pid != first and client.snapshot()["process"]["restarts"] == 1
        assert topo.route_dev() == "wifi0"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
    assert sorted((r["dev"], r.get("metric")) for r in topo.default_routes()) == [
        ("gsm0", 700),
        ("wifi0", 600),
    ]
