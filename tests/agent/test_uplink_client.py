"""The agent's end of the uplink process (:class:`agent.uplink.client.UplinkClient`) against
the real child (``python -m agent.uplink --child``): the status comes from the child,
switch requests get the child's answer, a bad line from the child is ignored with one log
line, a child that dies is said to be down and is started again, and stopping the client
stops the child in order.

The links' interfaces do not exist here (no namespace needed, nothing on this machine's
routes is touched: no link is ever healthy, so the route back-end never acts); the child
is the real one all the same. The OCPP session is a recording stand-in (the session itself
is in the namespace tests, tests/e2e/test_uplink_ocpp.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.config import load
from agent.uplink.client import UplinkClient, child_argv
from agent.uplink.control import handle_switch, status_lines

CONFIG = """
[csms]
url = "wss://127.0.0.1:9/ocpp"
charge_point_id = "CP-1"
password = "0123456789abcdef-test"
[agent]
state_dir = "{state}"
[time]
ntp_servers = []
[hardware]
driver = "sim"
[uplink]
probe_interval_s = 0.5
probe_timeout_s = 0.2
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


Started = Callable[..., Awaitable[UplinkClient]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Started]:
    path = tmp_path / "evcp.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    cfg = load(path)
    tasks: list[asyncio.Task[None]] = []

    async def started(**kwargs: object) -> UplinkClient:
        client = UplinkClient(cfg, **kwargs)  # type: ignore[arg-type]
        client.attach(RecordingSession())
        tasks.append(asyncio.create_task(client.run()))
        await until("the uplink process's first snapshot", lambda: client.running)
        return client

    yield started
    for task in tasks:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_status_and_switch_answers_come_from_the_uplink_process(start: Started) -> None:
    client = await start()
    assert client.pid is not None and client.pid != os.getpid()
    await until(
        "the missing interfaces seen",
        lambda: "does not exist" in client.snapshot()["links"][0]["reason"],
    )
    snap = client.snapshot()
    assert snap["active"] is None and snap["backend"] == "route"
    assert [(lk["name"], lk["interface"], lk["healthy"]) for lk in snap["links"]] == [
        ("wifi", "evcpnone0", False),
        ("gsm", "evcpnone1", False),
    ]
    assert snap["process"] == {"running": True, "pid": client.pid, "restarts": 0, "error": None}
    assert client.ping_interval_s(30.0) == 30.0  # no link in use: WebSocketPingInterval

    answer = await handle_switch({"link": "lte"}, client, uid=0)
    assert answer == {"ok": False, "error": "no link named 'lte' (links: wifi, gsm)"}
    answer = await handle_switch({"link": "gsm"}, client, uid=0)
    assert answer["ok"] is False and "link 'gsm' is not healthy" in answer["error"]
    answer = await handle_switch({"link": "auto"}, client, uid=0)
    assert answer["ok"] is True and answer["uplink"]["forced"] is None
    assert await client.identity() == ("", "")  # no modem configured


async def test_a_bad_line_from_the_uplink_process_is_ignored_with_one_log_line(
    start: Started, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # the real child, after two lines that are not the protocol (a stray print, say)
    config = tmp_path / "evcp.toml"
    noisy = (
        "import os, sys; sys.stdout.write('garbage {\\n[1, 2]\\n'); sys.stdout.flush();"
        f" os.execv(sys.executable, {child_argv(config)!r})"
    )
    caplog.set_level(logging.WARNING, logger="evcp.uplink")
    client = await start(argv=[sys.executable, "-c", noisy])
    bad = [r.getMessage() for r in caplog.records if "ignoring a bad line" in r.getMessage()]
    assert bad == [
        "uplink: ignoring a bad line from the uplink process: b'garbage {\\n'",
        "uplink: ignoring a bad line from the uplink process: b'[1, 2]\\n'",
    ]
    assert client.snapshot()["process"]["running"] is True
    answer = await handle_switch({"link": "auto"}, client, uid=0)
    assert answer["ok"] is True  # the protocol carries on


async def test_while_the_uplink_process_is_down_status_says_so(
    start: Started, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="evcp.uplink")
    client = await start(restart_min_s=3600)
    pid = client.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until("the death seen", lambda: not client.running)
    snap = client.snapshot()
    why = snap["process"]["error"]
    # "was killed (SIGKILL)"; asyncio says "code 255" when it could not read the status
    assert why in (
        "the uplink process was killed (SIGKILL); restarting it",
        "the uplink process exited (code 255); restarting it",
    )
    assert snap["process"] == {"running": False, "pid": None, "restarts": 0, "error": why}
    assert snap["active"] is None
    assert all(not lk["healthy"] and lk["reason"] == why for lk in snap["links"])
    assert f"         {why}" in status_lines(snap)
    answer = await handle_switch({"link": "wifi"}, client, uid=0)
    assert answer == {"ok": False, "error": why}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        f"uplink: {why.removesuffix('; restarting it')}; restarting it in 3600 s"
        " (the agent carries on over the routes as they are)"
    ]


async def test_an_uplink_process_that_dies_is_started_again(start: Started) -> None:
    client = await start(restart_min_s=0.1)
    first = client.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await until("a new uplink process", lambda: client.running and client.pid != first)
    snap = client.snapshot()
    assert snap["process"]["restarts"] == 1
    assert [lk["name"] for lk in snap["links"]] == ["wifi", "gsm"]
    second = client.pid
    assert second is not None
    os.kill(second, signal.SIGTERM)  # an orderly exit of the child is a death all the same
    await until("a third uplink process", lambda: client.running and client.pid != second)
    assert client.snapshot()["process"]["restarts"] == 2


async def test_stopping_the_client_stops_the_uplink_process_in_order(tmp_path: Path) -> None:
    path = tmp_path / "evcp.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    client = UplinkClient(load(path))
    task = asyncio.create_task(client.run())
    await until("the uplink process's first snapshot", lambda: client.running)
    proc = client._proc
    assert proc is not None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert proc.returncode == 0  # SIGTERM: the supervisor ended (and released) in order
    assert client.pid is None
