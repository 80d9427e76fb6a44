"""Transaction messages the CSMS does not answer, or refuses: never lost.

OCPP 1.6 (section 4.10 of the JSON spec's "transaction-related messages") lets a charge
point skip a transaction message only when the CSMS keeps *failing to process* it. So:

- no answer at all (a timeout) is not a refusal: the message is sent again, for as long as
  it takes, and never given up;
- a CALLERROR TransactionMessageAttempts times is: the message is kept, marked failed, and
  the queue moves on. ``evcp queue`` lists such messages and ``evcp queue retry`` sends them
  again, in their place, once the CSMS is fixed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from ocpp.v16 import call

from agent.ocpp import csms as csms_module
from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, AgentFactory, RunningAgent
from tests.e2e.test_cli import evcp


def intercept_results(
    csms: Csms, monkeypatch: pytest.MonkeyPatch, action: str, answer: Any
) -> dict[str, Any]:
    """Make the CSMS pass each CALLRESULT to ``answer(state, frame)`` for ``action``:
    it returns the frame to send instead, or None to send nothing."""
    original = csms_module._CsmsChargePoint._send
    state: dict[str, Any] = {"last": None, "count": 0}
    csms.listener = lambda item: state.__setitem__("last", item.action)

    async def send(self: Any, message: str) -> None:
        if state["last"] == action and message.startswith("[3,"):
            state["count"] += 1
            frame = answer(state, json.loads(message))
            if frame is None:
                return
            message = json.dumps(frame)
        await original(self, message)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "_send", send)
    return state


async def charge_and_stop(agent: RunningAgent, csms: Csms, meter_values: int = 2) -> None:
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)  # online
    await agent.sim("plug")
    assert "started" in await agent.swipe("TAG-1")
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Charging")
    before = len(csms.messages("MeterValues"))
    await agent.wait_status(
        lambda s: (
            s["queue"]["pending"] + s["queue"]["failed"] >= meter_values + 1
            or len(csms.messages("MeterValues")) >= before + meter_values
        ),
        timeout_s=30,
    )
    assert "stopped" in await agent.swipe("TAG-1")


async def test_unanswered_start_is_sent_again_and_never_given_up(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSMS does not answer the first two StartTransactions at all. Even with
    TransactionMessageAttempts = 1 the agent does not give up: it sends it again until
    it is answered, then the MeterValues and StopTransaction follow with that id."""
    intercept_results(
        csms,
        monkeypatch,
        "StartTransaction",
        lambda state, frame: None if state["count"] <= 2 else frame,
    )
    agent = await make_agent(
        response_timeout_s=1,
        ocpp={"TransactionMessageAttempts": 1, "TransactionMessageRetryInterval": 0},
    )
    await charge_and_stop(agent, csms)
    await csms.wait_message("StopTransaction", timeout_s=30)
    status = await agent.wait_status(lambda s: s["queue"]["pending"] == 0)

    assert status["queue"]["failed"] == 0
    starts = csms.messages("StartTransaction")
    assert len(starts) == 3 and starts[0] == starts[1] == starts[2]  # the same message
    delivered_id = 1003  # the id in the answer the agent got
    tx_meter_values = [m for m in csms.messages("MeterValues") if "transactionId" in m]
    assert tx_meter_values and {m["transactionId"] for m in tx_meter_values} == {delivered_id}
    assert csms.messages("StopTransaction")[0]["transactionId"] == delivered_id


async def test_refused_messages_are_listed_and_sent_again_on_request(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSMS fails to process StartTransaction (CALLERROR InternalError). After
    TransactionMessageAttempts it is given up, and so are the transaction's MeterValues
    and StopTransaction (no transactionId to send them with): all kept, all listed by
    ``evcp queue``. The CSMS is fixed; ``evcp queue retry`` delivers the whole
    transaction, in order, with the id the CSMS now gives."""
    state = intercept_results(
        csms,
        monkeypatch,
        "StartTransaction",
        lambda state, frame: (
            [4, frame[1], "InternalError", "database down", {}] if state["refuse"] else frame
        ),
    )
    state["refuse"] = True
    agent = await make_agent(
        ocpp={"TransactionMessageAttempts": 2, "TransactionMessageRetryInterval": 0}
    )
    await charge_and_stop(agent, csms)
    status = await agent.wait_status(
        lambda s: s["queue"]["pending"] == 0 and s["queue"]["failed"] >= 4, timeout_s=30
    )
    config = str(agent.config)

    listed = await evcp("queue", "--config", config, "--json")
    assert listed.code == 0, listed
    failed = listed.json()["failed"]
    assert len(failed) == status["queue"]["failed"]
    assert failed[0]["action"] == "StartTransaction"
    assert "database down" in failed[0]["last_error"]
    assert failed[-1]["action"] == "StopTransaction"
    assert {m["action"] for m in failed[1:-1]} == {"MeterValues"}
    assert all(m["transaction_id"] is None and m["local_transaction"] for m in failed)
    table = await evcp("queue", "--config", config)
    assert table.code == 0 and "StartTransaction" in table.out and "database down" in table.out
    assert len(csms.messages("StopTransaction")) == 0

    state["refuse"] = False
    mark = len(csms.received)
    retried = await evcp("queue", "retry", "--config", config)
    assert retried.code == 0 and f"{len(failed)} failed" in retried.out, retried
    await csms.wait_message("StopTransaction", after=mark, timeout_s=30)
    status = await agent.wait_status(lambda s: s["queue"]["pending"] == 0)

    assert status["queue"]["failed"] == 0
    delivered = [r for r in csms.received[mark:] if r.action in ("StartTransaction",
                 "StopTransaction") or (r.action == "MeterValues" and "transactionId" in r.payload)]  # fmt: skip
    assert [r.action for r in delivered] == [m["action"] for m in failed]
    tx_id = 1003  # two refused StartTransactions took 1001 and 1002
    assert all(r.payload["transactionId"] == tx_id for r in delivered[1:])
    assert (await evcp("queue", "--config", config, "--json")).json()["failed"] == []


async def test_a_reconnect_the_agent_wants_waits_for_the_answer_in_flight(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSMS changes WebSocketPingInterval (the agent must reconnect to apply it) while
    its answer to StartTransaction is still on the way. The agent waits for that answer
    before it closes the connection, so the CSMS gets the StartTransaction once."""
    changed: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []

    async def change() -> None:
        request = call.ChangeConfiguration(key="WebSocketPingInterval", value="30")
        changed.append(await csms.call(CP_ID, request))

    original = csms_module._CsmsChargePoint._send
    state: dict[str, Any] = {"last": None}
    csms.listener = lambda item: state.__setitem__("last", item.action)

    async def send(self: Any, message: str) -> None:
        if state["last"] == "StartTransaction" and message.startswith("[3,") and not tasks:
            # The ChangeConfiguration goes out first; the StartTransaction's answer after.
            tasks.append(asyncio.create_task(change()))
            await asyncio.sleep(0.5)
        await original(self, message)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "_send", send)
    agent = await make_agent(ocpp={"TransactionMessageRetryInterval": 0})
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    connections = csms.connections
    await agent.sim("plug")
    assert "started" in await agent.swipe("TAG-1")
    await csms.wait_for(lambda: csms.connections > connections, timeout_s=20)
    await agent.wait_status(lambda s: s["csms"]["connected"] and s["queue"]["pending"] == 0)

    await asyncio.wait_for(tasks[0], 5)
    assert changed == [{"status": "Accepted"}]
    assert len(csms.messages("StartTransaction")) == 1
    status = await agent.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    assert status["connectors"][0]["transaction_id"] == 1001


async def test_a_message_the_csms_closes_the_connection_over_1009_is_refused_not_stuck(
    make_agent: AgentFactory, csms: Csms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CSMS that closes the connection with 1009 (message too big) whenever it receives
    the StopTransaction: that is a refusal of that message. After TransactionMessageAttempts
    it is kept as failed and the queue behind it moves on, instead of the same message
    being sent after every reconnect forever."""
    original = csms_module._CsmsChargePoint.route_message

    async def route(self: Any, raw: str) -> None:
        if '"StopTransaction"' in raw:
            self.csms._record(self.id, "StopTransaction", json.loads(raw)[3])
            await self._connection.close(1009, "message too big")
            return
        await original(self, raw)

    monkeypatch.setattr(csms_module._CsmsChargePoint, "route_message", route)
    agent = await make_agent(
        ocpp={"TransactionMessageAttempts": 2, "TransactionMessageRetryInterval": 0}
    )
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await agent.sim("plug")
    assert "started" in await agent.swipe("TAG-1")
    await agent.wait_status(lambda s: s["connectors"][0]["transaction_id"] is not None)
    assert "stopped" in await agent.swipe("TAG-1")
    await agent.wait_status(
        lambda s: s["queue"]["failed"] == 1 and s["queue"]["pending"] == 0, timeout_s=30
    )
    assert len(csms.messages("StopTransaction")) == 2  # TransactionMessageAttempts
    listed = await evcp("queue", "--config", str(agent.config), "--json")
    assert [m["action"] for m in listed.json()["failed"]] == ["StopTransaction"]
