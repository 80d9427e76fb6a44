"""When a transaction may start, and what a CSMS request then finds.

Edge cases a review found: two starts racing on one connector while the meter is slow; a
start on a connector Faulted by its meter; a connector made Operative while the charger
(connector 0) is Inoperative; a Scheduled availability change and a restart; a
TriggerMessage for MeterValues when MeterValuesSampledData yields nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import (
    CP_ID,
    AgentFactory,
    RunningAgent,
    start_charging,
    status_is,
    write_config,
)


def statuses(csms: Csms, connector: int, after: int = 0) -> list[str]:
    return [r.payload["status"] for r in csms.received[after:]
            if r.action == "StatusNotification" and r.payload["connectorId"] == connector]  # fmt: skip


@pytest.fixture
async def patient(tmp_path: Path, csms: Csms, ca_file: Path) -> AsyncIterator[RunningAgent]:
    """An agent that waits out 100 missed meter polls before it calls the meter failed."""
    directory = tmp_path / "patient"
    directory.mkdir()
    config = write_config(directory, url=f"wss://localhost:{csms.port}/ocpp", ca_file=ca_file)
    config.write_text(config.read_text().replace("meter_miss_limit = 2", "meter_miss_limit = 100"))
    agent = await RunningAgent(config).start()
    yield agent
    await agent.stop()


async def plugged_with_a_silent_meter(agent: RunningAgent, csms: Csms) -> int:
    """Online, a car plugged in, the meter silent (a start now waits on a meter read).
    Returns the CSMS's message count at that point."""
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await agent.sim("plug")
    await csms.wait_message("StatusNotification", status_is(1, "Preparing"))
    await agent.sim("meter-silent")
    return len(csms.received)


async def test_two_remote_starts_while_the_meter_is_slow_make_one_transaction(
    patient: RunningAgent, csms: Csms
) -> None:
    mark = await plugged_with_a_silent_meter(patient, csms)
    first = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="A", connector_id=1))
    second = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="B", connector_id=1))
    await patient.sim("meter-ok")
    await csms.wait_message("StartTransaction", after=mark, timeout_s=15)
    await asyncio.sleep(2)
    starts = [r.payload for r in csms.received[mark:] if r.action == "StartTransaction"]
    assert (first["status"], second["status"]) == ("Accepted", "Rejected")
    assert [s["idTag"] for s in starts] == ["A"]


async def test_a_swipe_while_a_remote_start_reads_the_meter_starts_nothing_more(
    patient: RunningAgent, csms: Csms
) -> None:
    mark = await plugged_with_a_silent_meter(patient, csms)
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="A", connector_id=1))
    assert answer["status"] == "Accepted"
    swiped = asyncio.create_task(patient.swipe("B"))
    await asyncio.sleep(0.5)
    await patient.sim("meter-ok")
    result = await swiped
    await csms.wait_message("StartTransaction", after=mark, timeout_s=15)
    await asyncio.sleep(2)
    starts = [r.payload["idTag"] for r in csms.received[mark:] if r.action == "StartTransaction"]
    assert starts == ["A"] and "started" not in result, (starts, result)


async def test_no_remote_start_on_a_connector_whose_meter_failed(
    booted: RunningAgent, csms: Csms
) -> None:
    await booted.sim("plug")
    await booted.sim("meter-silent")
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"), timeout_s=15)
    mark = len(csms.received)
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="A", connector_id=1))
    assert answer["status"] == "Rejected"
    assert "started" not in await booted.swipe("A")
    await asyncio.sleep(1)
    assert not [r for r in csms.received[mark:] if r.action == "StartTransaction"]


async def test_a_connector_is_unusable_while_the_charger_is_inoperative(
    booted: RunningAgent, csms: Csms
) -> None:
    answer = await csms.call(CP_ID, call.ChangeAvailability(connector_id=0, type="Inoperative"))
    assert answer["status"] == "Accepted"
    await csms.wait_message("StatusNotification", status_is(1, "Unavailable"))
    mark = len(csms.received)
    answer = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Operative"))
    assert answer["status"] == "Accepted"
    await booted.sim("plug")
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="A", connector_id=1))
    assert answer["status"] == "Rejected"
    await asyncio.sleep(1)
    assert "Available" not in statuses(csms, 1, mark)
    assert (await booted.status())["connectors"][0]["status"] == "Unavailable"

    await csms.call(CP_ID, call.ChangeAvailability(connector_id=0, type="Operative"))
    await csms.wait_message("StatusNotification", status_is(1, "Preparing"), after=mark)


async def test_a_scheduled_inoperative_survives_a_restart(booted: RunningAgent, csms: Csms) -> None:
    await start_charging(booted, csms)
    answer = await csms.call(CP_ID, call.ChangeAvailability(connector_id=1, type="Inoperative"))
    assert answer["status"] == "Scheduled"
    await booted.stop()
    mark = len(csms.received)
    await booted.start()
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["reason"] == "PowerLoss"
    await csms.wait_message("StatusNotification", status_is(1, "Unavailable"), after=mark)
    answer = await csms.call(CP_ID, call.RemoteStartTransaction(id_tag="X", connector_id=1))
    assert answer["status"] == "Rejected"


async def test_triggered_meter_values_when_the_sampled_data_yields_nothing(
    make_agent: AgentFactory, csms: Csms
) -> None:
    """MeterValuesSampledData empty: a triggered MeterValues still carries the energy
    register (the CSMS asked for a reading), and the agent carries on."""
    agent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await start_charging(agent, csms)
    answer = await csms.call(
        CP_ID, call.ChangeConfiguration(key="MeterValuesSampledData", value="")
    )
    assert answer["status"] == "Accepted"
    mark = len(csms.received)
    answer = await csms.call(
        CP_ID, call.TriggerMessage(requested_message="MeterValues", connector_id=1)
    )
    assert answer["status"] == "Accepted"
    triggered = await csms.wait_message("MeterValues", after=mark)
    values = triggered.payload["meterValue"][0]["sampledValue"]
    assert [v["measurand"] for v in values] == ["Energy.Active.Import.Register"]
    assert values[0]["context"] == "Trigger"
    assert agent.task is not None and not agent.task.done()


async def test_an_authorization_given_during_a_fault_starts_when_it_clears(
    booted: RunningAgent, csms: Csms
) -> None:
    """A car plugged in, the controller faults (a ground-fault trip), a card is presented
    meanwhile ("authorized: plug in"): when the fault clears, the charge starts, without
    unplugging and plugging in again."""
    await booted.sim("plug")
    await csms.wait_message("StatusNotification", status_is(1, "Preparing"))
    await booted.sim("fault", code="GroundFailure")
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"))
    result = await booted.swipe("TAG-1", 1)
    assert "started" not in result, result
    mark = len(csms.received)
    await booted.sim("clear-fault")
    start = await csms.wait_message("StartTransaction", after=mark)
    assert start.payload["idTag"] == "TAG-1"
