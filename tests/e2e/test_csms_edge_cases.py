"""What an odd (but schema-valid, or nearly valid) CSMS does to the connection.

Found by review: values the schemas allow but nothing can hold (a 64-bit-overflowing
transactionId, an interval of 10**400 s), a CSMS that closes every connection at once, a
lowered HeartbeatInterval, a refused AuthorizationKey frame with an extra field, a
BootNotification.conf Accepted with a field too many. In none of these may the agent die,
loop fast, stall, or log the key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trustme
from ocpp.v16 import call
from websockets.asyncio.server import ServerConnection, serve

from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms
from tests.conftest import (
    CP_ID,
    AgentFactory,
    RunningAgent,
    server_context,
    start_charging,
    write_config,
)


async def stays_alive(agent: RunningAgent, seconds: float = 3.0) -> None:
    await asyncio.sleep(seconds)
    assert agent.task is not None and not agent.task.done(), agent.task


@pytest.mark.parametrize("status", ["Accepted", "Pending"])
async def test_a_huge_boot_interval_is_clamped(
    make_agent: AgentFactory, csms: Csms, status: str
) -> None:
    csms.boot_response = (status, 10**400)
    agent = await make_agent()
    await csms.wait_message("BootNotification")
    await stays_alive(agent, 1.5)
    if status == "Accepted":
        answer = await csms.call(CP_ID, call.GetConfiguration(key=["HeartbeatInterval"]))
        assert answer["configurationKey"][0]["value"] == "86400"
    assert len(csms.messages("BootNotification")) == 1  # the retry is a day away


async def test_a_transaction_id_beyond_64_bits_is_not_used_and_kills_nothing(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """The schema bounds no integer, SQLite stops at 64 bits: such an id is no usable
    answer (retried per TransactionMessageAttempts, then kept as failed), the agent and the
    charging carry on."""
    csms.tx_ids = itertools.count(2**63)
    booted = await make_agent(ocpp={"TransactionMessageRetryInterval": 0})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await booted.sim("plug")
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="A", connector_id=1))
    assert answer["status"] == "Accepted"
    status = await booted.wait_status(lambda s: s["queue"]["failed"] >= 1, timeout_s=20)
    assert status["connectors"][0]["status"] == "Charging"
    await stays_alive(booted, 1)


async def test_a_transaction_id_sent_as_a_string_is_used(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = csms_module._CsmsChargePoint._send

    async def send(self: Any, message: str) -> None:
        await original(self, message.replace('"transactionId":1001', '"transactionId":"1001"'))

    monkeypatch.setattr(csms_module._CsmsChargePoint, "_send", send)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    assert await start_charging(agent, csms) == 1001
    await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == 1001)
    assert len(csms.messages("StartTransaction")) == 1


async def test_reconnect_back_off_grows_when_the_csms_closes_at_once(
    tmp_path: Path, ca: trustme.CA, ca_file: Path
) -> None:
    opened: list[float] = []
    loop = asyncio.get_running_loop()

    async def handler(ws: ServerConnection) -> None:
        opened.append(loop.time())
        await ws.close(1008, "unknown charge point")

    server = await serve(
        handler,
        "127.0.0.1",
        0,
        ssl=server_context(ca),
        subprotocols=["ocpp1.6"],  # type: ignore[list-item]
    )
    port = next(iter(server.sockets)).getsockname()[1]
    config = write_config(tmp_path, url=f"wss://localhost:{port}/ocpp", ca_file=ca_file)
    config.write_text(config.read_text().replace("reconnect_max_s = 0.5", "reconnect_max_s = 60"))
    agent = await RunningAgent(config).start()
    try:
        await asyncio.sleep(6)
    finally:
        await agent.stop()
        server.close()
    # Back-off from 0.1 s, doubling, jitter in [d/2, d]: at most about 8 tries in 6 s.
    assert 3 <= len(opened) <= 10, opened
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert gaps[-1] > 4 * gaps[0], gaps


async def test_a_lowered_heartbeat_interval_applies_at_once(
    booted: RunningAgent, csms: Csms
) -> None:
    answer = await csms.call(CP_ID, call.ChangeConfiguration(key="HeartbeatInterval", value="1"))
    assert answer["status"] == "Accepted"
    mark = len(csms.received)
    await asyncio.sleep(3.5)
    assert len([m for m in csms.received[mark:] if m.action == "Heartbeat"]) >= 2


async def test_a_refused_authorization_key_frame_never_reaches_the_log(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    """The key and value are not side by side (an extra field): the frame is refused
    (FormationViolation), and the value still appears in no log line."""
    secret = "N3wKey-ZZZZ-0123456789"
    caplog.set_level(logging.DEBUG)
    frame = [2, "leak-1", "ChangeConfiguration",
             {"key": "AuthorizationKey", "note": "rotate", "value": secret}]  # fmt: skip
    await csms.call_raw(CP_ID, json.dumps(frame))
    await asyncio.sleep(1.0)
    assert [r.getMessage() for r in caplog.records if secret in r.getMessage()] == []
    assert any("leak-1" in r.getMessage() for r in caplog.records)  # it was logged, redacted


async def test_a_refused_short_authorization_key_does_not_blank_ordinary_words(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    """A value no key can have (under 12 characters here) is refused and is no secret:
    the word does not vanish from every later log line."""
    answer = await csms.call(
        CP_ID, call.ChangeConfiguration(key="AuthorizationKey", value="Charging")
    )
    assert answer["status"] == "Rejected"
    caplog.set_level(logging.INFO)
    await booted.sim("plug")
    assert "started" in await booted.swipe("TAG-1")
    await csms.wait_message("StatusNotification", lambda p: p["status"] == "Charging")
    assert "connector 1: Charging" in caplog.text


async def test_boot_accepted_with_a_field_too_many_registers(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = csms_module._CsmsChargePoint._send

    async def send(self: Any, message: str) -> None:
        if message.startswith("[3,") and '"interval"' in message:
            message = message.replace('"status":"Accepted"', '"status":"Accepted","x":1')
        await original(self, message)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "_send", send)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    assert (await agent.status())["csms"]["registered"]
