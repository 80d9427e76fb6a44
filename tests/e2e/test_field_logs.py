"""Logs a field engineer can read: a failing meter or controller is logged once when it
fails and once when it recovers (not on every poll), and every line about a connector or a
transaction carries the journald fields ``evcp logs --tx`` matches (EVCP_CONNECTOR,
EVCP_TRANSACTION = the local id, EVCP_CSMS_TRANSACTION once the CSMS gave its id).

The agent runs in the test's event loop on the simulated hardware (the real RAPI driver
on a pty, the real Modbus driver against the meter simulator); the records are captured
with pytest's log capture, which sees the same ``extra`` fields the journal handler sends.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from agent.ocpp.csms import Csms
from tests.conftest import AgentFactory, RunningAgent, start_charging, status_is


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def fields(record: logging.LogRecord) -> dict[str, str]:
    return {k: v for k, v in vars(record).items() if k.startswith("EVCP_")}


async def misses_at_least(agent: RunningAgent, count: int) -> None:
    """Wait until the agent has missed ``count`` meter reads (its status says so)."""

    def missed(status: dict[str, Any]) -> bool:
        fault = status["connectors"][0]["fault"] or ""
        return "reads missed" in fault and int(fault.split("(")[1].split()[0]) >= count

    await agent.wait_status(missed, timeout_s=30)


async def test_a_silent_meter_is_logged_once_then_once_when_it_answers(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evcp")
    await booted.sim("meter-silent")
    # meter_miss_limit is 2 and the meter is polled every 0.5 s: 12 misses are 10 polls
    # after the connector went Faulted.
    await misses_at_least(booted, 12)
    failed = lines(caplog, "connector 1: meter failed")
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]
    assert failed[0].levelno == logging.ERROR and "Faulted" in failed[0].getMessage()
    assert fields(failed[0]) == {"EVCP_CONNECTOR": "1"}
    assert lines(caplog, "still failing") == []
    assert len(lines(caplog, "connector 1: meter read failed")) <= 1  # before the limit

    mark = len(csms.received)
    await booted.sim("meter-ok")
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)
    recovered = lines(caplog, "connector 1: meter recovered after")
    assert len(recovered) == 1 and fields(recovered[0]) == {"EVCP_CONNECTOR": "1"}
    assert "failed attempts" in recovered[0].getMessage()


async def test_a_failing_meter_during_a_transaction_names_it(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    csms_id = await start_charging(booted, csms)
    local_id = (await booted.status())["connectors"][0]["transaction_local_id"]
    caplog.set_level(logging.INFO, logger="evcp")
    mark = len(csms.received)
    await booted.sim("meter-exception", code=4)  # a Modbus exception: not a timeout
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"), after=mark)
    await misses_at_least(booted, 10)  # ten polls of a meter answering an exception
    unusable = lines(caplog, "connector 1: meter failed: ")
    assert len(unusable) == 1, [r.getMessage() for r in caplog.records]
    assert "Modbus exception code 4" in unusable[0].getMessage()
    assert fields(unusable[0]) == {
        "EVCP_CONNECTOR": "1",
        "EVCP_TRANSACTION": str(local_id),
        "EVCP_CSMS_TRANSACTION": str(csms_id),
    }
    assert len(lines(caplog, "meter lost while charging")) == 1

    await booted.sim("meter-exception-clear")
    await csms.wait_message("StatusNotification", status_is(1, "Charging"), after=mark)
    assert len(lines(caplog, "connector 1: meter recovered after")) == 1


async def test_transaction_lines_name_both_ids_and_carry_the_fields(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="evcp")
    csms_id = await start_charging(booted, csms, tag="LOG-TAG")
    local_id = (await booted.status())["connectors"][0]["transaction_local_id"]
    mark = len(csms.received)
    await booted.sim("unplug")
    await csms.wait_message("StopTransaction", after=mark)
    await csms.wait_message("StatusNotification", status_is(1, "Available"), after=mark)

    started = lines(caplog, f"transaction local {local_id} started")
    assert len(started) == 1  # logged before the CSMS answered: the local id only
    assert fields(started[0]) == {"EVCP_CONNECTOR": "1", "EVCP_TRANSACTION": str(local_id)}
    link = lines(caplog, f"transaction local {local_id} is the CSMS's transaction {csms_id}")
    assert len(link) == 1
    stopped = lines(caplog, f"transaction {csms_id} (local {local_id}) stopped (EVDisconnected)")
    assert len(stopped) == 1
    both = {
        "EVCP_CONNECTOR": "1",
        "EVCP_TRANSACTION": str(local_id),
        "EVCP_CSMS_TRANSACTION": str(csms_id),
    }
    assert fields(link[0]) == fields(stopped[0]) == both
    # Every line about connector 1 says so in a field, and a line logged while the
    # transaction ran names it.
    about = [r for r in caplog.records if r.getMessage().startswith("connector 1:")]
    assert len(about) >= 4
    assert all(fields(r).get("EVCP_CONNECTOR") == "1" for r in about)
    during = [r for r in about if "offering" in r.getMessage() or "Charging" in r.getMessage()]
    assert during and all(fields(r).get("EVCP_TRANSACTION") == str(local_id) for r in during)


async def test_a_controller_that_does_not_answer_is_logged_once_then_when_it_does(
    make_agent: AgentFactory,
    csms: Csms,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The simulated controller is there from the start; its driver's start is made to
    fail (a fake: a controller that does not answer at all cannot be simulated on the pty
    without taking the simulator down) until the test lets it through."""
    import asyncio

    from agent.chargepoint import station as station_module
    from drivers.base import DeviceTimeout
    from drivers.evse.rapi import RapiController

    caplog.set_level(logging.INFO, logger="evcp")
    monkeypatch.setattr(station_module, "CONTROLLER_RETRY_S", 0.1)
    original = RapiController.start
    attempts: list[int] = []
    answering = asyncio.Event()

    async def start(self: Any) -> Any:
        if not answering.is_set():
            attempts.append(1)
            raise DeviceTimeout("no reply to $GV")
        return await original(self)

    monkeypatch.setattr(RapiController, "start", start)
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    async with asyncio.timeout(30):
        while len(attempts) < 12:
            await asyncio.sleep(0.05)
    failed = lines(caplog, "connector 1: EVSE controller failed")
    assert len(failed) == 1 and "no reply to $GV" in failed[0].getMessage()
    assert fields(failed[0]) == {"EVCP_CONNECTOR": "1"}
    assert lines(caplog, "EVSE controller still failing") == []
    answering.set()
    await agent.wait_status(lambda s: s["connectors"][0]["status"] == "Available")
    recovered = lines(caplog, "connector 1: EVSE controller recovered after")
    assert len(recovered) == 1 and fields(recovered[0]) == {"EVCP_CONNECTOR": "1"}
