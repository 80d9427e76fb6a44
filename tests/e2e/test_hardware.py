"""The agent's real drivers against the device simulators, with bad input on every wire."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from ocpp.v16 import call

from agent.ocpp.csms import Csms
from tests.conftest import CP_ID, AgentFactory, RunningAgent, start_charging, status_is


def energy_values(payload: dict[str, Any]) -> list[float]:
    return [
        float(sv["value"])
        for mv in payload["meterValue"]
        for sv in mv["sampledValue"]
        if sv.get("measurand") == "Energy.Active.Import.Register"
    ]


async def test_garbage_on_the_controller_line_changes_nothing(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    tx_id = await start_charging(booted, csms)
    for _ in range(3):
        await booted.sim("rapi-garbage")
    mark = len(csms.received)
    mv = await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == tx_id,
                                 after=mark)  # fmt: skip
    assert energy_values(mv.payload)
    state = (await booted.sim("state"))["connectors"][0]
    assert state["controller_mode"] == "enabled"
    assert state["contactor_closed"]
    # No status change was invented from the noise.
    assert [p["status"] for p in csms.messages("StatusNotification")[-1:]] == ["Charging"]
    assert csms.errors == []


async def test_controller_reset_mid_session_restores_the_limit(
    booted: RunningAgent, csms: Csms
) -> None:
    await start_charging(booted, csms)
    profile = {
        "chargingProfileId": 3, "stackLevel": 0, "chargingProfilePurpose": "TxProfile",
        "chargingProfileKind": "Relative",
        "chargingSchedule": {"chargingRateUnit": "A",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 10}]},
    }  # fmt: skip
    result = await csms.call(
        CP_ID, call.SetChargingProfile(connector_id=1, cs_charging_profiles=profile)
    )
    assert result["status"] == "Accepted"
    await booted.wait_status(lambda s: s["connectors"][0]["offered_current_a"] == 10)
    await booted.sim("controller-reset")
    # The controller rebooted ($AB); the driver puts back the agent's current and mode.
    await booted.wait_status(lambda s: s["connectors"][0]["status"] == "Charging")
    state = (await booted.sim("state"))["connectors"][0]
    assert state["offered_current_a"] == 10
    assert state["controller_mode"] == "enabled"
    assert csms.errors == []


async def test_meter_exception_is_reported_not_invented(
    booted: RunningAgent, csms: Csms, caplog: pytest.LogCaptureFixture
) -> None:
    tx_id = await start_charging(booted, csms)
    caplog.set_level(logging.WARNING)
    await booted.sim("meter-exception", code=4)
    await csms.wait_message("StatusNotification", status_is(1, "Faulted"))
    faulted = [p for p in csms.messages("StatusNotification") if p["status"] == "Faulted"][-1]
    assert faulted["errorCode"] == "PowerMeterFailure"
    assert any("exception" in r.getMessage().lower() for r in caplog.records)
    before = len(csms.messages("MeterValues"))
    await booted.sim("meter-exception-clear")
    await csms.wait_message("StatusNotification", status_is(1, "Charging"))
    mark = len(csms.received)
    mv = await csms.wait_message("MeterValues", lambda p: p.get("transactionId") == tx_id,
                                 after=mark)  # fmt: skip
    assert energy_values(mv.payload)
    # Every energy value sent is one the meter gave: they never go backwards.
    values = [v for p in csms.messages("MeterValues") for v in energy_values(p)]
    assert values == sorted(values)
    assert len(csms.messages("MeterValues")) > before
    assert csms.errors == []


async def test_meter_register_survives_an_agent_restart(
    make_agent: AgentFactory, csms: Csms
) -> None:
    agent: RunningAgent = await make_agent()
    await csms.wait_message("StatusNotification", lambda p: p["connectorId"] == 1)
    await start_charging(agent, csms)
    await agent.wait_status(lambda s: s["connectors"][0]["energy_wh"] > 1000)
    await agent.sim("ev-pause")
    status = await agent.wait_status(lambda s: s["connectors"][0]["power_w"] == 0)
    energy_before = status["connectors"][0]["energy_wh"]
    await agent.stop()
    mark = len(csms.received)
    await agent.start()
    stop = await csms.wait_message("StopTransaction", after=mark)
    assert stop.payload["reason"] == "PowerLoss"
    assert stop.payload["meterStop"] >= int(energy_before) - 1
    status = await agent.status()
    assert status["connectors"][0]["energy_wh"] >= energy_before - 1
    assert csms.errors == []
